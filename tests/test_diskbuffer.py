"""The durable buffer on a real disk: order, acks, persistence, overflow, crash recovery,
damaged stores (property-based), and a full filesystem (a real size-limited tmpfs)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import fill_disk, tmpfs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ocpp_edge.store.diskbuffer import FILENAME, DiskBuffer

ROOT = Path(__file__).resolve().parent.parent


def drain(buf: DiskBuffer) -> list[bytes]:
    out = []
    while True:
        batch = buf.take(100)
        if not batch:
            return out
        for rec in batch:
            out.append(rec.payload)
            buf.ack(rec)


class TestFifo:
    def test_order_ack_and_persistence(self, tmp_path):
        b = DiskBuffer(tmp_path, 1000, 10**7)
        for i in range(10):
            b.append("t", b"m%d" % i)
        first = b.take(3)
        b.ack(first[1])  # out of order: it leaves at once (the next test)
        assert len(b) == 9 and b.unsent == 7
        b.ack(first[0])
        assert len(b) == 8 and b.unsent == 7
        b.commit()
        b.close()
        b = DiskBuffer(tmp_path, 1000, 10**7)
        assert drain(b) == [b"m%d" % i for i in range(2, 10)]  # m2 was never acked

    def test_acknowledged_out_of_order_is_never_handed_out_again(self, tmp_path):
        # The offline gate lets a charge point's messages pass another's held one, so the
        # broker acknowledges them ahead of it: neither the rewind of a dropped connection
        # nor a restart may publish them twice.
        b = DiskBuffer(tmp_path, 1000, 10**7)
        for i in range(5):
            b.append("t", b"m%d" % i)
        m0, m1, m2 = b.take(3)
        b.ack(m2)
        b.ack(m1)
        assert (len(b), b.unsent) == (3, 2)
        assert b.rewind() == 1  # m0
        assert [r.payload for r in b.take(10)] == [b"m0", b"m3", b"m4"]
        assert b.commit()
        b.close()
        b = DiskBuffer(tmp_path, 1000, 10**7)
        assert drain(b) == [b"m0", b"m3", b"m4"]

    def test_only_what_is_unacknowledged_at_commit_is_written(self, tmp_path):
        import sqlite3
        b = DiskBuffer(tmp_path, 1000, 10**7)
        for i in range(100):
            b.append("t", b"%d" % i)
        for rec in b.take(60):
            b.ack(rec)  # delivered within the commit interval
        assert b.commit()
        rows = sqlite3.connect(tmp_path / FILENAME).execute(
            "SELECT payload FROM msg ORDER BY seq").fetchall()
        assert [r[0] for r in rows] == [b"%d" % i for i in range(60, 100)]
        b.close()
        assert drain(DiskBuffer(tmp_path, 1000, 10**7)) == [b"%d" % i for i in range(60, 100)]

    def test_rewind_sends_in_flight_again_in_order(self, tmp_path):
        b = DiskBuffer(tmp_path, 1000, 10**7)
        for i in range(5):
            b.append("t", b"%d" % i)
        got = b.take(3)
        b.ack(got[0])
        assert b.rewind() == 2
        assert [r.payload for r in b.take(10)] == [b"1", b"2", b"3", b"4"]

    def test_new_messages_queue_behind_a_backlog(self, tmp_path):
        b = DiskBuffer(tmp_path, 10**6, 10**9)
        for i in range(2500):
            b.append("t", b"%d" % i)
        b.commit()
        out = [r.payload for r in b.take(1000)]
        b.append("t", b"new")
        out += drain(b)
        assert out == [b"%d" % i for i in range(2500)] + [b"new"]

    def test_uncommitted_messages_are_lost_with_the_process_committed_ones_are_not(
            self, tmp_path):
        script = textwrap.dedent(f"""
            import os, sys
            sys.path.insert(0, {str(ROOT)!r})
            from ocpp_edge.store.diskbuffer import DiskBuffer
            b = DiskBuffer({str(tmp_path)!r}, 1000, 10**7)
            for i in range(5):
                b.append("t", b"c%d" % i)
            b.commit()
            for i in range(5):
                b.append("t", b"u%d" % i)
            os._exit(9)  # like kill -9: no close, no commit
            """)
        subprocess.run([sys.executable, "-c", script], check=False)
        assert drain(DiskBuffer(tmp_path, 1000, 10**7)) == [b"c%d" % i for i in range(5)]


class TestOverflow:
    @staticmethod
    def full(tmp_path, policy):
        b = DiskBuffer(tmp_path, 4, 10**7, policy)
        b.append("t", b"T1", important=True)
        b.append("t", b"n1")
        b.append("t", b"T2", important=True)
        b.append("t", b"n2")
        return b

    def test_drop_oldest_spares_transactions(self, tmp_path):
        b = self.full(tmp_path, "drop_oldest")
        assert b.append("t", b"n3") is not None
        assert b.append("t", b"n4") is not None
        assert b.append("t", b"n5") is not None  # only T1, T2, n4... left to choose from
        assert drain(b) == [b"T1", b"T2", b"n4", b"n5"]
        assert b.dropped == 3

    def test_drop_oldest_drops_a_transaction_only_for_a_transaction(self, tmp_path):
        b = DiskBuffer(tmp_path, 2, 10**7, "drop_oldest")
        b.append("t", b"T1", important=True)
        b.append("t", b"T2", important=True)
        assert b.append("t", b"n1") is None  # a plain message never evicts a transaction
        assert b.append("t", b"T3", important=True) is not None  # the oldest one goes
        assert drain(b) == [b"T2", b"T3"]

    def test_drop_newest_refuses_newcomers_but_not_transactions(self, tmp_path):
        b = self.full(tmp_path, "drop_newest")
        assert b.append("t", b"n3") is None
        assert b.append("t", b"T3", important=True) is not None  # evicts n2, the newest plain
        assert drain(b) == [b"T1", b"n1", b"T2", b"T3"]

    def test_in_flight_messages_are_never_dropped(self, tmp_path):
        b = DiskBuffer(tmp_path, 2, 10**7, "drop_oldest")
        b.append("t", b"a")
        b.append("t", b"b")
        b.take(2)
        assert b.append("t", b"c") is None
        assert b.dropped == 1

    def test_bytes_bound(self, tmp_path):
        b = DiskBuffer(tmp_path, 10**6, 2000, "drop_oldest")
        for i in range(100):
            b.append("t", b"x" * 100 + b"%d" % i)
        assert b.bytes <= 2000 and len(b) < 100 and b.dropped == 100 - len(b)
        assert drain(b)[-1].endswith(b"99")


# -- crash recovery --------------------------------------------------------------------

BATCHES = 6
PER_BATCH = 40


@pytest.fixture(scope="module")
def crashed_store(tmp_path_factory) -> tuple[Path, list[list[bytes]]]:
    """A store left by a process killed after six group commits, WAL not checkpointed."""
    d = tmp_path_factory.mktemp("crashed")
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from ocpp_edge.store.diskbuffer import DiskBuffer
        b = DiskBuffer({str(d)!r}, 10**6, 10**9)
        for k in range({BATCHES}):
            for i in range({PER_BATCH}):
                b.append("ocpp/cp/CP%d" % k, b"batch%d-%03d" % (k, i) + b"x" * 50)
            b.commit()
        os._exit(9)
        """)
    subprocess.run([sys.executable, "-c", script], check=False)
    assert (d / (FILENAME + "-wal")).stat().st_size > 0
    batches = [[b"batch%d-%03d" % (k, i) + b"x" * 50 for i in range(PER_BATCH)]
               for k in range(BATCHES)]
    return d, batches


def copy_store(src: Path, dst: Path) -> None:
    for name in os.listdir(src):
        shutil.copy(src / name, dst / name)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fraction=st.floats(0, 1))
def test_torn_wal_recovers_to_the_last_good_commit(crashed_store, tmp_path_factory, fraction):
    src, batches = crashed_store
    d = tmp_path_factory.mktemp("torn")
    copy_store(src, d)
    wal = d / (FILENAME + "-wal")
    size = wal.stat().st_size
    with open(wal, "r+b") as f:
        f.truncate(int(size * fraction))  # the tail of the log never reached the disk
    got = drain(DiskBuffer(d, 10**6, 10**9))
    whole = [m for batch in batches for m in batch]
    # a prefix made of whole commits: never half a batch, never a reordering
    assert got == whole[:len(got)] and len(got) % PER_BATCH == 0
    if fraction == 1:
        assert got == whole


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(["", "-wal"]), where=st.floats(0, 1),
       junk=st.binary(min_size=1, max_size=64))
def test_garbled_store_starts_and_keeps_what_is_intact(crashed_store, tmp_path_factory,
                                                         which, where, junk):
    src, batches = crashed_store
    d = tmp_path_factory.mktemp("garbled")
    copy_store(src, d)
    victim = d / (FILENAME + which)
    size = victim.stat().st_size
    with open(victim, "r+b") as f:
        f.seek(min(int(size * where), size - 1))
        f.write(junk)
    buf = DiskBuffer(d, 10**6, 10**9)  # never raises
    got = drain(buf)
    whole = [m for batch in batches for m in batch]
    assert all(m in whole for m in got)  # nothing invented
    assert got == sorted(got, key=whole.index)  # in order
    if buf.moved_aside:
        assert all(p.exists() for p in buf.moved_aside)  # kept for inspection
    buf.append("t", b"after")  # and the store works
    buf.commit()


def test_unreadable_store_is_moved_aside_and_replaced(tmp_path):
    (tmp_path / FILENAME).write_bytes(b"this is not a database at all" * 100)
    buf = DiskBuffer(tmp_path, 10, 10**6)
    assert len(buf) == 0 and buf.moved_aside
    assert buf.moved_aside[0].read_bytes().startswith(b"this is not")


# -- a full disk ----------------------------------------------------------------------------

@pytest.fixture
def tiny_fs(tmp_path):
    with tmpfs(tmp_path / "tiny", "4m") as mnt:
        yield mnt



def test_full_disk_never_raises_and_resumes(tiny_fs):
    b = DiskBuffer(tiny_fs, 10**6, 10**9, spill_max=300)
    sent = []

    def put(i):
        if b.append("ocpp/cp/X", b"%06d" % i + b"y" * 200) is not None:
            sent.append(i)
        if i % 50 == 49:
            b.commit()

    for i in range(1000):
        put(i)
    assert b.write_errors == 0
    ballast = tiny_fs / "ballast"
    fill_disk(ballast)  # the disk is full now
    for i in range(1000, 2000):
        put(i)
    assert b.write_errors > 0 and b.dropped > 0  # noticed, dropped by policy, went on
    ballast.unlink()  # space returns
    assert b.commit() is True
    for i in range(2000, 2100):
        put(i)
    b.commit()
    got = [int(p[:6]) for p in drain(b)]
    assert got == sorted(got) and set(got) <= set(sent)
    assert set(range(1000)) <= set(got)  # what was committed before the disk filled
    assert set(range(2000, 2100)) <= set(got)  # and everything after it emptied


# -- a model of the FIFO, for any interleaving of operations --------------------------------

_ops = st.lists(st.one_of(
    st.tuples(st.just("append"), st.integers(1, 300)),
    st.tuples(st.just("take"), st.integers(1, 700)),
    st.tuples(st.just("ack"), st.integers(0, 700)),
    st.just(("rewind", 0)),
    st.just(("commit", 0)),
    st.just(("reopen", 0)),
), max_size=40)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_ops)
def test_any_interleaving_keeps_order_and_loses_nothing(tmp_path_factory, ops):
    """Appends, takes (of any size, around the read-ahead's bounds), in-order acks,
    rewinds, commits and clean reopenings, against a model: what is handed out is always
    the oldest unsent messages in order, a message is handed out again only after a
    rewind or a reopening, and draining at the end yields exactly the unacked ones."""
    import ocpp_edge.store.diskbuffer as db_mod

    d = tmp_path_factory.mktemp("fifo")
    b = DiskBuffer(d, 10**6, 10**9)
    next_id = 0
    unacked: list[bytes] = []  # the model: stored and not acked, in order
    in_flight: list = []  # records handed out and not acked, in order
    sent = 0  # how many of unacked are in flight
    small = (db_mod.READ_AHEAD, db_mod.AHEAD_MAX)
    db_mod.READ_AHEAD, db_mod.AHEAD_MAX = 50, 120  # reach the bounds with small numbers
    try:
        for op, n in ops:
            if op == "append":
                for _ in range(n):
                    payload = b"%d" % next_id
                    next_id += 1
                    assert b.append("t", payload) is not None
                    unacked.append(payload)
            elif op == "take":
                got = b.take(n)
                want = unacked[sent:sent + n]
                assert [r.payload for r in got] == want
                in_flight += got
                sent += len(got)
            elif op == "ack":
                k = min(n, len(in_flight))
                for rec in in_flight[:k]:
                    b.ack(rec)
                del in_flight[:k]
                del unacked[:k]
                sent -= k
                assert len(b) == len(unacked)
            elif op == "rewind":
                assert b.rewind() == len(in_flight)
                in_flight, sent = [], 0
            elif op == "commit":
                assert b.commit()
            else:
                b.close()
                b = DiskBuffer(d, 10**6, 10**9)
                in_flight, sent = [], 0
        b.rewind()
        assert drain(b) == unacked
    finally:
        db_mod.READ_AHEAD, db_mod.AHEAD_MAX = small
        b.close()
