"""The offline mode's durable state on a real disk: every method, persistence across
reopenings, transaction ids that never go back (``kill -9`` included), torn logs, damaged
files moved aside, the operator's list, and a full filesystem (a real size-limited tmpfs)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import fill_disk, tmpfs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st_

from ocpp_edge.core.local import Authorization, Knowledge
from ocpp_edge.errors import ConfigError
from ocpp_edge.store import localstate
from ocpp_edge.store.localstate import (
    DEFAULT_TRANSACTION_IDS,
    FILENAME,
    RESTART_SKIP,
    LocalState,
    load_authorization_list,
)

ROOT = Path(__file__).resolve().parent.parent
SMALL = (100, 199)  # a range without the restart skip (fewer than 100,000 ids)
LOGGER = "ocpp_edge.localstate"


def rows(path: Path, query: str) -> list[tuple]:
    """What another connection finds in the file: what was committed."""
    db = sqlite3.connect(path)
    try:
        return db.execute(query).fetchall()
    finally:
        db.close()


@pytest.fixture
def path(tmp_path) -> Path:
    return tmp_path / FILENAME


def test_it_is_what_the_offline_core_needs(path):
    from ocpp_edge.core.offline import Memory
    st = LocalState(path)
    for protocol in (Knowledge, Memory):
        for name in dir(protocol):
            if name.startswith("_"):
                continue
            if isinstance(getattr(protocol, name), property):
                assert isinstance(getattr(type(st), name), property), name
            else:
                assert callable(getattr(st, name)), name


# -- the authorization cache and the operator's list ------------------------------------------

class TestAuthorizations:
    def test_learn_read_and_persist(self, path):
        st = LocalState(path)
        assert st.authorization("TAG1") is None and st.authorizations_cached == 0
        st.learn_authorization("TAG1", Authorization("Accepted", 1_900_000_000.5, "GRP"),
                               1000.0)
        st.learn_authorization("eMAID:X1", Authorization("Accepted", None, "G", "Central"),
                               1000.5)
        st.learn_authorization("ISO14443:04A2B3", Authorization("Blocked"), 1001.0)
        assert st.authorization("TAG1") == Authorization("Accepted", 1_900_000_000.5, "GRP")
        assert st.authorizations_cached == 3
        assert st.commit()
        assert rows(path, "SELECT id_key, status, expires, parent, parent_type, learnt "
                          "FROM auth ORDER BY learnt") == [
            ("tag1", "Accepted", 1_900_000_000.5, "GRP", None, 1000.0),
            ("emaid:x1", "Accepted", None, "G", "Central", 1000.5),
            ("iso14443:04a2b3", "Blocked", None, None, None, 1001.0)]
        st.close()
        st = LocalState(path)
        assert st.authorization("TAG1") == Authorization("Accepted", 1_900_000_000.5, "GRP")
        assert st.authorization("ISO14443:04A2B3") == Authorization("Blocked")
        assert st.authorization("eMAID:X1") == Authorization("Accepted", None, "G", "Central")
        assert st.authorizations_cached == 3

    def test_ids_are_case_insensitive(self, path):
        st = LocalState(path, authorization_list={"ListTag": Authorization("Blocked")})
        st.learn_authorization("04a2B31c", Authorization("Accepted"), 1.0)
        assert st.authorization("04A2B31C") == st.authorization("04a2b31c") \
            == Authorization("Accepted")
        st.learn_authorization("04A2B31C", Authorization("Invalid"), 2.0)  # the same id
        assert st.authorizations_cached == 1
        assert st.authorization("LISTTAG") == Authorization("Blocked")
        st.close()
        assert LocalState(path).authorization("04a2b31C") == Authorization("Invalid")

    def test_a_later_answer_replaces_the_entry(self, path):
        st = LocalState(path)
        st.learn_authorization("TAG1", Authorization("Accepted"), 1.0)
        st.commit()
        st.learn_authorization("TAG1", Authorization("Invalid"), 2.0)  # the backend changed
        st.close()
        st = LocalState(path)
        assert st.authorization("TAG1") == Authorization("Invalid")
        assert st.authorizations_cached == 1
        assert rows(path, "SELECT learnt FROM auth") == [(2.0,)]

    def test_the_operator_list_wins_over_the_cache_and_is_not_stored(self, path):
        listed = {"TAG1": Authorization("Blocked"), "TAG2": Authorization("Accepted", 5.0)}
        st = LocalState(path, authorization_list=listed)
        st.learn_authorization("TAG1", Authorization("Accepted"), 1.0)
        st.learn_authorization("TAG3", Authorization("Accepted"), 1.0)
        assert st.authorization("TAG1") == Authorization("Blocked")  # the list wins
        assert st.authorization("TAG2") == Authorization("Accepted", 5.0)  # list only
        assert st.authorization("TAG3") == Authorization("Accepted")  # cache only
        assert st.authorizations_cached == 2 and st.authorizations_listed == 2
        st.set_authorization_list({})  # a reload without the list
        assert st.authorization("TAG1") == Authorization("Accepted")
        assert st.authorization("TAG2") is None
        st.close()
        assert LocalState(path).authorization("TAG2") is None


# -- BootNotification intervals ----------------------------------------------------------------

def test_boot_intervals_are_remembered(path):
    st = LocalState(path)
    assert st.boot_interval("CP1") is None
    st.remember_boot("CP1", 300)
    st.remember_boot("CP2", 60)
    st.remember_boot("CP1", 900)
    assert st.boot_interval("CP1") == 900
    st.close()
    st = LocalState(path)
    assert (st.boot_interval("CP1"), st.boot_interval("CP2"), st.boot_interval("CP3")) == \
        (900, 60, None)
    st.remember_boot("CP2", 60)  # unchanged: nothing to write
    assert not st.dirty


# -- OCPP 1.6 transaction ids ------------------------------------------------------------------

class TestTransactions:
    def test_ids_mappings_and_their_end(self, path):
        st = LocalState(path, SMALL)
        a, b, c = (st.new_transaction_id(cid) for cid in ("CP1", "CP2", "CP1"))
        assert (a, b, c) == (100, 101, 102)
        assert st.transactions_open == 3
        assert st.is_local("CP1", a) and not st.is_local("CP2", a) and not st.is_local("CP1", 7)
        assert st.backend_id("CP1", a) is None  # not known yet
        assert st.transaction(a) == ("CP1", None) and st.transaction(99) is None
        st.map_transaction("CP1", a, 5001)
        assert st.backend_id("CP1", a) == 5001 and st.backend_id("CP2", a) is None
        assert st.local_id("CP1", 5001) == a and st.local_id("CP2", 5001) is None
        assert st.transaction(a) == ("CP1", 5001)
        st.end_transaction("CP2", a)  # not CP2's: nothing happens
        assert st.is_local("CP1", a)
        st.end_transaction("CP1", a)
        assert not st.is_local("CP1", a) and st.local_id("CP1", 5001) is None
        assert st.backend_id("CP1", a) is None and st.transactions_open == 2
        st.end_transaction("CP1", a)  # twice: harmless
        st.commit()
        assert sorted(rows(path, "SELECT local_id, cid, backend_id FROM tx")) == [
            (101, "CP2", None), (102, "CP1", None)]
        assert rows(path, "SELECT value FROM meta WHERE key = 'next_tx'") == [(103,)]

    def test_mappings_survive_a_restart(self, path):
        st = LocalState(path, SMALL)
        a = st.new_transaction_id("CP1")
        b = st.new_transaction_id("CP2")
        st.map_transaction("CP2", b, 77)
        st.close()
        st = LocalState(path, SMALL)
        assert st.is_local("CP1", a) and st.backend_id("CP1", a) is None
        assert st.backend_id("CP2", b) == 77 and st.local_id("CP2", 77) == b
        assert st.transactions_open == 2
        st.map_transaction("CP1", a, 78)  # the answer comes after the restart
        st.close()
        assert LocalState(path, SMALL).local_id("CP1", 78) == a

    def test_a_new_backend_id_replaces_the_old_one(self, path):
        st = LocalState(path, SMALL)
        a = st.new_transaction_id("CP1")
        st.map_transaction("CP1", a, 1)
        st.map_transaction("CP1", a, 2)
        assert st.local_id("CP1", 1) is None and st.local_id("CP1", 2) == a

    def test_mapping_an_unknown_local_id_keeps_it(self, path):
        st = LocalState(path, SMALL)
        st.map_transaction("CP1", 150, 9)  # pruned meanwhile, or a state that was lost
        assert st.is_local("CP1", 150) and st.local_id("CP1", 9) == 150
        assert st.new_transaction_id("CP1") == 100
        st.close()
        assert LocalState(path, SMALL).backend_id("CP1", 150) == 9

    def test_ids_strictly_increase_across_reopenings(self, path):
        seen = []
        for _ in range(4):
            st = LocalState(path, SMALL)
            seen += [st.new_transaction_id("CP1") for _ in range(3)]
            st.close()
        assert seen == list(range(100, 112))  # small range: no restart skip
        seen = []
        path = path.with_name("other.sqlite")
        for _ in range(4):
            st = LocalState(path)  # the default range
            seen += [st.new_transaction_id("CP1") for _ in range(3)]
            st.close()
        assert seen == sorted(set(seen)) and seen[0] == DEFAULT_TRANSACTION_IDS[0]
        # every start skips RESTART_SKIP ids: an id not yet committed when the process
        # died is never handed out again
        assert seen[3] == seen[2] + 1 + RESTART_SKIP

    def test_an_unused_start_still_moves_the_counter(self, path):
        # a run that hands ids out and dies before its first commit must not see them
        # handed out again by the next run: the skip is committed at start
        st = LocalState(path)
        st.new_transaction_id("CP1")
        st.close()
        before = rows(path, "SELECT value FROM meta")[0][0]
        LocalState(path)  # and never committed or closed: like a kill -9
        assert rows(path, "SELECT value FROM meta")[0][0] == before + RESTART_SKIP

    def test_the_range_wraps_skipping_ids_still_mapped(self, path, caplog):
        caplog.set_level(logging.WARNING, logger=LOGGER)
        st = LocalState(path, (1, 5))
        ids = [st.new_transaction_id(f"CP{i}") for i in range(5)]
        assert ids == [1, 2, 3, 4, 5]
        st.end_transaction("CP1", 2)
        st.end_transaction("CP3", 4)
        st.commit()
        assert st.new_transaction_id("CPX") == 2
        assert any("used up" in r.message for r in caplog.records
                   if r.levelno == logging.WARNING)
        st.close()
        st = LocalState(path, (1, 5))
        assert st.new_transaction_id("CPY") == 4  # wrapped state survives a restart

    def test_a_full_range_gives_up_the_oldest_mapping(self, path, caplog):
        caplog.set_level(logging.ERROR, logger=LOGGER)
        t = [1000.0]
        st = LocalState(path, (1, 3), clock=lambda: t[0])
        for cid in ("A", "B", "C"):
            t[0] += 1
            st.new_transaction_id(cid)
        assert st.new_transaction_id("D") == 1  # A's, the oldest
        assert not st.is_local("A", 1) and st.is_local("D", 1)
        assert any("all 3 ids" in r.message for r in caplog.records)

    def test_a_changed_range_is_followed(self, path):
        st = LocalState(path, (1, 1000))
        st.new_transaction_id("CP1")
        st.close()
        assert LocalState(path, (500, 600)).new_transaction_id("CP1") == 500

    def test_prune_drops_what_was_never_ended(self, path):
        t = [1000.0]
        st = LocalState(path, SMALL, clock=lambda: t[0])
        old = st.new_transaction_id("CP1")
        t[0] = 1010.0
        older = st.new_transaction_id("CP2")  # noqa: F841
        t[0] = 2000.0
        fresh = st.new_transaction_id("CP3")
        st.map_transaction("CP1", old, 42)
        st.commit()
        assert st.prune_transactions(1500.0) == [("CP1", old), ("CP2", old + 1)]
        assert st.local_id("CP1", 42) is None and st.transactions_open == 1
        assert st.prune_transactions(1500.0) == []
        st.close()
        st = LocalState(path, SMALL)
        assert [st.is_local(c, i) for c, i in (("CP1", old), ("CP3", fresh))] == [False, True]

    def test_bad_ranges_are_refused(self, path):
        for bad in ((5, 4), (0, 2**31), (1.0, 5)):
            with pytest.raises(ValueError):
                LocalState(path, bad)


# -- CALLs answered locally ----------------------------------------------------------------------

class TestAnswered:
    REQ = {"connectorId": 1, "idTag": "TAG1", "meterStart": 0, "timestamp": "2025-01-01T00:00:00Z"}
    ANS = {"payload": {"transactionId": 1_900_000_000, "idTagInfo": {"status": "Accepted"}}}

    def test_remember_take_once(self, path):
        st = LocalState(path)
        assert st.take_answered("CP1", "u1") is None and st.answered_pending == 0
        st.remember_answered("CP1", "u1", "StartTransaction", self.REQ, self.ANS, 10.0)
        st.remember_answered("CP1", "u2", "Heartbeat", {}, {"payload": {"currentTime": "x"}},
                             11.0)
        assert st.answered_pending == 2
        assert st.take_answered("CP2", "u1") is None  # another charge point's id
        assert st.take_answered("CP1", "u1") == ("StartTransaction", self.REQ, self.ANS)
        assert st.take_answered("CP1", "u1") is None  # taken
        assert st.answered_pending == 1

    def test_survives_a_restart_and_is_taken_once(self, path):
        st = LocalState(path)
        st.remember_answered("CP1", "u1", "StartTransaction", self.REQ, self.ANS, 10.0)
        st.remember_answered("CP1", "u2", "Authorize", {"idTag": "é"}, {"error": "x"}, 11.0)
        st.commit()
        assert [json.loads(r[0]) for r in rows(path, "SELECT request FROM answered "
                                                     "ORDER BY created")] == \
            [self.REQ, {"idTag": "é"}]
        st.close()
        st = LocalState(path)
        assert st.answered_pending == 2
        assert st.take_answered("CP1", "u2") == ("Authorize", {"idTag": "é"}, {"error": "x"})
        st.close()
        st = LocalState(path)
        assert st.answered_pending == 1
        assert st.take_answered("CP1", "u2") is None
        assert st.take_answered("CP1", "u1") == ("StartTransaction", self.REQ, self.ANS)
        assert st.answered_pending == 0

    def test_the_same_id_again_replaces_and_counts_once(self, path):
        st = LocalState(path)
        st.remember_answered("CP1", "1", "Heartbeat", {}, {"payload": {"n": 1}}, 1.0)
        st.commit()
        st.remember_answered("CP1", "1", "Heartbeat", {}, {"payload": {"n": 2}}, 2.0)  # committed
        st.remember_answered("CP1", "1", "Heartbeat", {}, {"payload": {"n": 3}}, 3.0)  # in memory
        assert st.answered_pending == 1
        st.close()
        st = LocalState(path)
        assert st.answered_pending == 1
        assert st.take_answered("CP1", "1") == ("Heartbeat", {}, {"payload": {"n": 3}})

    def test_the_caller_may_change_its_dicts_afterwards(self, path):
        st = LocalState(path)
        req = {"a": 1}
        st.remember_answered("CP1", "u", "X", req, {"payload": {}}, 1.0)
        req["a"] = 2
        assert st.take_answered("CP1", "u")[1] == {"a": 1}

    def test_prune(self, path):
        st = LocalState(path)
        for i in range(10):
            st.remember_answered("CP1", f"c{i}", "MeterValues", {"i": i}, {"payload": {}},
                                 100.0 + i)
        st.commit()  # c0..c9 in the table
        st.remember_answered("CP1", "c3", "MeterValues", {"i": 3}, {"payload": {}}, 500.0)
        st.remember_answered("CP1", "m0", "MeterValues", {}, {"payload": {}}, 101.0)
        st.remember_answered("CP1", "m1", "MeterValues", {}, {"payload": {}}, 600.0)
        st.take_answered("CP1", "c0")
        assert st.answered_pending == 11
        # older than 105: c1, c2, c4 (c3 is newer now), m0; c0 is gone already
        assert st.prune_answered(105.0) == 4
        assert st.answered_pending == 7
        assert st.take_answered("CP1", "c2") is None and st.take_answered("CP1", "m0") is None
        assert st.prune_answered(105.0) == 0
        st.close()
        st = LocalState(path)
        assert st.answered_pending == 7
        assert sorted(k for (k,) in rows(path, "SELECT unique_id FROM answered")) == \
            ["c3", "c5", "c6", "c7", "c8", "c9", "m1"]
        assert st.prune_answered(1e12) == 7 and st.answered_pending == 0
        st.close()
        assert rows(path, "SELECT count(*) FROM answered") == [(0,)]


# -- commit, dirty, close ----------------------------------------------------------------------

def test_dirty_and_on_dirty(path):
    st = LocalState(path)
    calls = []
    st.on_dirty = lambda: calls.append(1)
    assert not st.dirty and st.commit()  # nothing to do
    st.remember_boot("CP1", 10)
    st.learn_authorization("T", Authorization("Accepted"), 1.0)
    assert st.dirty and calls == [1]  # once per batch of changes
    assert st.commit() and not st.dirty
    st.new_transaction_id("CP1")
    assert calls == [1, 1]


def test_nothing_is_in_the_file_before_commit(path):
    st = LocalState(path, SMALL)
    st.learn_authorization("T", Authorization("Accepted"), 1.0)
    st.new_transaction_id("CP1")
    st.remember_answered("CP1", "u", "X", {}, {}, 1.0)
    assert rows(path, "SELECT count(*) FROM auth") == [(0,)]
    assert rows(path, "SELECT count(*) FROM tx") == [(0,)]
    st.commit()
    assert rows(path, "SELECT count(*) FROM auth") == [(1,)]
    assert rows(path, "SELECT count(*) FROM tx") == [(1,)]
    assert rows(path, "SELECT count(*) FROM answered") == [(1,)]


def test_a_missing_directory_is_created(tmp_path):
    st = LocalState(tmp_path / "a" / "b" / FILENAME)
    st.remember_boot("CP1", 1)
    st.close()
    assert LocalState(tmp_path / "a" / "b" / FILENAME).boot_interval("CP1") == 1


def test_a_path_that_cannot_be_a_file_raises_and_moves_nothing(tmp_path):
    (tmp_path / "dir").mkdir()
    with pytest.raises(OSError, match="cannot open the local state"):
        LocalState(tmp_path / "dir")
    assert os.listdir(tmp_path) == ["dir"]


# -- kill -9 and torn logs ---------------------------------------------------------------------

CHILD = """
import os, sys, time
sys.path.insert(0, {root!r})
from ocpp_edge.core.local import Authorization
from ocpp_edge.store.localstate import LocalState
st = LocalState({path!r})
for k in range({batches}):
    for i in range(5):
        st.learn_authorization("T%d-%d" % (k, i), Authorization("Accepted", 2e9 + k), 100.0 + k)
        st.remember_answered("CP%d" % i, "u%d" % k, "Authorize", {{"idTag": "T%d-%d" % (k, i)}},
                             {{"payload": {{"idTagInfo": {{"status": "Accepted"}}}}}}, 100.0 + k)
    tid = st.new_transaction_id("CP0")
    print("id", tid, flush=True)
    if k % 2:
        st.map_transaction("CP0", tid, 9000 + k)
    st.remember_boot("CP%d" % k, 60 + k)
    st.commit()
print("committed", flush=True)
{after}
"""

UNCOMMITTED = """
for k in range(50):  # fewer than RESTART_SKIP
    print("id", st.new_transaction_id("CP9"), flush=True)
st.end_transaction("CP0", 1900000000)
st.map_transaction("CP0", 1900000002, 1)
print("uncommitted", flush=True)
n = 0
while True:  # busy with work that is never committed
    n += 1
    st.learn_authorization("U%d" % n, Authorization("Accepted"), 1.0)
    st.remember_answered("CPU", "x%d" % n, "Heartbeat", {}, {}, 1.0)
    st.remember_boot("CP0", n)
"""


def expected_committed(st: LocalState, batches: int) -> None:
    """The state the child committed, exactly."""
    assert st.authorizations_cached == 5 * batches
    for k in range(batches):
        for i in range(5):
            assert st.authorization(f"T{k}-{i}") == Authorization("Accepted", 2e9 + k)
        assert st.boot_interval(f"CP{k}") == 60 + k
    assert st.authorization("U1") is None and st.boot_interval("CP0") == 60
    assert st.answered_pending == 5 * batches
    assert st.take_answered("CP2", f"u{batches - 1}") == (
        "Authorize", {"idTag": f"T{batches - 1}-2"},
        {"payload": {"idTagInfo": {"status": "Accepted"}}})
    first = DEFAULT_TRANSACTION_IDS[0]
    assert st.transactions_open == batches
    for k in range(batches):
        assert st.is_local("CP0", first + k)
        assert st.backend_id("CP0", first + k) == (9000 + k if k % 2 else None)


def test_kill_9_keeps_exactly_what_was_committed(tmp_path):
    path = tmp_path / FILENAME
    script = textwrap.dedent(CHILD).format(root=str(ROOT), path=str(path), batches=4,
                                           after=textwrap.dedent(UNCOMMITTED))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            text=True)
    handed_out, committed = [], None
    try:
        for line in proc.stdout:
            if line.startswith("id "):
                handed_out.append(int(line.split()[1]))
            elif line.strip() == "committed":
                committed = list(handed_out)
            elif line.strip() == "uncommitted":
                break
        time.sleep(0.3)  # let it work on uncommitted changes a while
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert committed is not None and len(handed_out) == len(committed) + 50
    assert (path.parent / (FILENAME + "-wal")).stat().st_size > 0  # not checkpointed
    st = LocalState(path)
    expected_committed(st, 4)
    new = st.new_transaction_id("CP1")
    assert new > max(committed)
    assert new > max(handed_out)  # even above the ones never committed (RESTART_SKIP)


@pytest.fixture(scope="module")
def crashed(tmp_path_factory) -> Path:
    """A state left by a process killed after eight commits, its log not checkpointed."""
    d = tmp_path_factory.mktemp("crashed")
    script = textwrap.dedent(CHILD).format(root=str(ROOT), path=str(d / FILENAME),
                                           batches=8, after="os._exit(9)")
    subprocess.run([sys.executable, "-c", script], check=False, capture_output=True)
    return d


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.4, 0.5, 0.63, 0.8, 0.9, 0.99, 1.0])
def test_a_torn_log_gives_a_whole_committed_prefix(crashed, tmp_path, fraction):
    for name in os.listdir(crashed):
        shutil.copy(crashed / name, tmp_path / name)
    wal = tmp_path / (FILENAME + "-wal")
    with open(wal, "r+b") as f:
        f.truncate(int(wal.stat().st_size * fraction))  # the tail never reached the disk
    st = LocalState(tmp_path / FILENAME)
    batches = st.authorizations_cached // 5
    assert st.authorizations_cached == 5 * batches  # never half a commit
    if batches:
        expected_committed(st, batches)
    if fraction == 1.0:
        assert batches == 8
    assert st.new_transaction_id("CP1") >= DEFAULT_TRANSACTION_IDS[0] + batches


# -- damaged files -------------------------------------------------------------------------------

def moved_aside_once(caplog, path: Path, st: LocalState) -> Path:
    errors = [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    aside = st.moved_aside[0]
    text = errors[0].getMessage()
    assert str(path) in text and str(aside) in text
    assert "cached authorizations" in text and "boot intervals" in text \
        and "transaction id mappings" in text
    assert aside.name.startswith(FILENAME + ".corrupt-") and aside.name.endswith("Z")
    return aside


def works(path: Path, transaction_ids=DEFAULT_TRANSACTION_IDS) -> int:
    st = LocalState(path, transaction_ids)
    st.learn_authorization("T", Authorization("Accepted"), 1.0)
    tid = st.new_transaction_id("CP1")
    st.close()
    st = LocalState(path, transaction_ids)
    assert st.authorization("T") == Authorization("Accepted") and st.is_local("CP1", tid)
    st.close()
    return tid


def test_garbage_is_moved_aside_and_replaced(path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    path.write_bytes(b"this is not a database at all\n" * 200)
    st = LocalState(path, SMALL)
    aside = moved_aside_once(caplog, path, st)
    assert aside.read_bytes().startswith(b"this is not")
    assert st.authorizations_cached == 0 and st.new_transaction_id("CP1") == 100
    st.close()
    works(path, SMALL)


def test_a_truncated_database_is_moved_aside_and_replaced(path, caplog):
    st = LocalState(path, SMALL)
    for i in range(3000):
        st.learn_authorization(f"TAG{i:05d}", Authorization("Accepted"), float(i))
    st.new_transaction_id("CP1")
    st.close()  # a clean close checkpoints: everything is in the main file
    assert not (path.parent / (FILENAME + "-wal")).exists()
    data = path.read_bytes()
    assert len(data) > 3 * 4096
    path.write_bytes(data[:len(data) // 2])
    caplog.set_level(logging.INFO, logger=LOGGER)
    st = LocalState(path, SMALL)
    moved_aside_once(caplog, path, st)
    assert st.authorizations_cached == 0
    st.close()
    works(path, SMALL)


@pytest.mark.parametrize("damage", ["newer schema", "foreign database", "missing table"])
def test_another_schema_is_moved_aside_and_ids_continue(path, caplog, damage):
    st = LocalState(path, SMALL)
    for _ in range(5):
        last = st.new_transaction_id("CP1")
    st.close()
    db = sqlite3.connect(path)
    if damage == "newer schema":
        db.execute("PRAGMA user_version = 2")
    elif damage == "foreign database":
        db.execute("PRAGMA user_version = 0")
    else:
        db.execute("DROP TABLE boot")
    db.commit()
    db.close()
    caplog.set_level(logging.INFO, logger=LOGGER)
    st = LocalState(path, SMALL)
    moved_aside_once(caplog, path, st)
    assert st.transactions_open == 0
    # the counter was still readable: ids are not handed out a second time
    assert st.new_transaction_id("CP1") == last + 1
    st.close()


@pytest.fixture(scope="module")
def closed_state(tmp_path_factory) -> Path:
    """A cleanly closed state (checkpointed: everything in the main file), 30 pages."""
    path = tmp_path_factory.mktemp("closed") / FILENAME
    st = LocalState(path, SMALL)
    for i in range(1000):
        st.learn_authorization(f"TAG{i:05d}", Authorization("Accepted", 2e9, "G"), float(i))
    for i in range(80):
        st.map_transaction(f"CP{i}", st.new_transaction_id(f"CP{i}"), 5000 + i)
        st.remember_boot(f"CP{i}", 60 + i)
        st.remember_answered(f"CP{i}", "u", "Authorize", {"idTag": "x" * 100},
                             {"payload": {"idTagInfo": {"status": "Accepted"}}}, float(i))
    st.close()
    return path


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st_.floats(0, 1), junk=st_.binary(min_size=1, max_size=64))
def test_any_damage_starts_a_working_state(closed_state, tmp_path_factory, where, junk):
    d = tmp_path_factory.mktemp("garbled")
    path = d / FILENAME
    shutil.copy(closed_state, path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(min(int(size * where), size - 1))
        f.write(junk)
    st = LocalState(path, SMALL)  # never raises
    if st.moved_aside:
        assert st.authorizations_cached == 0 and st.transactions_open == 0
    for i in range(80):  # whatever was read can be used
        st.take_answered(f"CP{i}", "u")
    st.prune_answered(1e12)
    st.prune_transactions(1e12)
    st.learn_authorization("NEW", Authorization("Accepted"), 1.0)
    tid = st.new_transaction_id("CPN")
    assert st.commit()
    st.close()
    st = LocalState(path, SMALL)
    assert st.authorization("NEW") == Authorization("Accepted") and st.is_local("CPN", tid)
    st.close()


def test_damage_found_after_opening_is_rebuilt_from_memory(closed_state, tmp_path, caplog):
    """Damage that the quick check at start does not see (a row that disagrees with its
    index) shows when a write touches it: the file is moved aside and written again from
    memory, the answered CALLs copied from it as far as they can be read."""
    path = tmp_path / FILENAME
    data = closed_state.read_bytes()
    for offset in range(len(data) - 1, len(data) - 4096, -1):  # the last page: answered
        path.write_bytes(data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1:])
        db = sqlite3.connect(path)
        try:
            quick, full = (db.execute(f"PRAGMA {c}").fetchall()
                           for c in ("quick_check", "integrity_check"))
        except sqlite3.DatabaseError:
            continue
        finally:
            db.close()
        if quick == [("ok",)] and "missing from index" in str(full):
            damaged = [(cid, uid) for cid, uid, created, _ in rows(  # (the table's values)
                path, "SELECT cid, unique_id, created, request FROM answered NOT INDEXED")
                if created != float(cid[2:])]  # made by closed_state: CP<i> at <i>
            if len(damaged) == 1:
                damaged = damaged[0]
                break
    else:
        pytest.fail("no such damage found to test with")
    caplog.set_level(logging.INFO, logger=LOGGER)
    st = LocalState(path, SMALL)
    assert not st.moved_aside and st.answered_pending == 80  # it looks fine
    other = "CP3" if damaged[0] != "CP3" else "CP4"
    assert st.take_answered(other, "u") is not None
    st.learn_authorization("NEW", Authorization("Accepted"), 1.0)
    tid = st.new_transaction_id("CPN")
    assert st.commit() and not st.moved_aside
    assert st.take_answered(*damaged) is not None
    assert st.commit()  # deleting its row found the damage: rebuilt
    assert len(st.moved_aside) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "written again from memory" in errors[0]
    assert str(st.moved_aside[0]) in errors[0] and " 0 locally answered" in errors[0]
    assert st.answered_pending == 78
    st.close()
    st = LocalState(path, SMALL)
    assert not st.moved_aside and st.answered_pending == 78
    assert st.take_answered(*damaged) is None and st.take_answered(other, "u") is None
    assert st.take_answered("CP50" if damaged[0] != "CP50" else "CP51", "u") is not None
    assert st.authorizations_cached == 1001 and st.authorization("TAG00999")
    assert st.transactions_open == 81 and st.is_local("CPN", tid)
    assert st.backend_id("CP7", 107) == 5007 and st.boot_interval("CP79") == 139
    assert rows(path, "PRAGMA integrity_check") == [("ok",)]
    assert st.new_transaction_id("CPN") == tid + 1


def test_an_empty_file_is_a_new_state_without_complaint(path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    path.write_bytes(b"")
    st = LocalState(path, SMALL)
    assert not st.moved_aside and not caplog.records
    st.close()
    works(path, SMALL)


def test_two_damaged_files_in_one_second_keep_both(path):
    for junk in (b"first" * 1000, b"second" * 1000):
        path.write_bytes(junk)
        LocalState(path).close()
    asides = sorted(p.name for p in path.parent.iterdir() if ".corrupt-" in p.name
                    and not p.name.endswith(("-wal", "-shm")))
    assert len(asides) == 2


# -- a full disk -----------------------------------------------------------------------------

@pytest.fixture
def tiny_fs(tmp_path):
    with tmpfs(tmp_path / "tiny", "2m") as mnt:
        yield mnt



def test_a_full_disk_keeps_the_state_in_memory_and_resumes(tiny_fs, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    path = tiny_fs / FILENAME
    st = LocalState(path, SMALL, held_max=40)
    st.learn_authorization("BEFORE", Authorization("Accepted"), 1.0)
    st.new_transaction_id("CP1")
    assert st.commit()
    ballast = tiny_fs / "ballast"
    fill_disk(ballast)  # the disk is full now
    body = {"blob": "x" * 50_000}  # more than the log's free room: the disk must grow
    results = []
    for i in range(60):
        st.remember_answered("CP1", f"u{i}", "DataTransfer", body, {"payload": {}}, 2.0)
        st.learn_authorization(f"T{i}", Authorization("Accepted"), 2.0)
        st.new_transaction_id("CP1")
        results.append(st.commit())
    assert False in results and st.write_errors > 0
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "cannot write" in errors[0].getMessage()  # once per episode
    # memory still answers, and ids keep increasing
    assert st.authorization("T59") == Authorization("Accepted")
    assert st.transactions_open == 61 and st.new_transaction_id("CP1") == 161
    # the bodies held in memory are bounded: the oldest went
    assert st.answered_dropped > 0
    assert st.answered_pending == 60 - st.answered_dropped
    assert st.take_answered("CP1", "u59") is not None
    left = st.answered_pending
    ballast.unlink()  # space returns
    assert st.commit()
    assert any("takes writes again" in r.getMessage() for r in caplog.records
               if r.levelno == logging.WARNING)
    st.close()
    st = LocalState(path, SMALL)
    assert st.authorization("BEFORE") and st.authorization("T59")
    assert st.authorizations_cached == 61 and st.transactions_open == 62
    assert st.answered_pending == left
    assert left == sum(st.take_answered("CP1", f"u{i}") is not None for i in range(60))
    assert st.new_transaction_id("CP1") == 162


# -- the operator's list -------------------------------------------------------------------------

GOOD = """\ufeff# the site's own cards
04A2B31C
DEADBEEF   Blocked          # lost card
CAFE0001   accepted  2026-12-31T23:59:59Z

CAFE0002   2026-06-30T00:00:00+02:00
   ISO14443:04A2B31C5D6E80
eMAID:DE-ABC-C12345678-X   ConcurrentTx  2026-01-01T00:00:00.5z
a#b NotAtThisTime
04:A2:3B:1C:5D:6E:7F
KeyCode:""" + "k" * 255 + "\n"


def test_the_list_file(tmp_path):
    f = tmp_path / "ids.txt"
    f.write_text(GOOD, encoding="utf-8")
    got = load_authorization_list(f)
    assert got == {
        "04A2B31C": Authorization("Accepted"),
        "DEADBEEF": Authorization("Blocked"),
        "CAFE0001": Authorization("Accepted", 1798761599.0),
        "CAFE0002": Authorization("Accepted", 1782770400.0),
        "ISO14443:04A2B31C5D6E80": Authorization("Accepted"),
        "eMAID:DE-ABC-C12345678-X": Authorization("ConcurrentTx", 1767225600.5),
        "a#b": Authorization("NotAtThisTime"),
        "04:A2:3B:1C:5D:6E:7F": Authorization("Accepted"),
        "KeyCode:" + "k" * 255: Authorization("Accepted"),
    }
    assert load_authorization_list(str(f)) == got
    st = LocalState(tmp_path / FILENAME, authorization_list=got)
    st.learn_authorization("DEADBEEF", Authorization("Accepted"), 1.0)
    assert st.authorization("DEADBEEF") == Authorization("Blocked")


@pytest.mark.parametrize("line, words", [
    ("TAG Maybe", "unknown status 'Maybe'"),
    ("TAG Accepted tomorrow", "not an RFC 3339 date-time"),
    ("TAG 2026-12-31T23:59:59", "time zone"),
    ("TAG 2026-12-31", "time zone"),
    ("TAG 2026-13-31T00:00:00Z", "not an RFC 3339"),
    ("TAG Accepted 2026-12-31T23:59:59Z extra", "unexpected 'extra'"),
    ("ABCDEFGHIJKLMNOPQRSTU", "at most 20"),
    ("ISO14443:" + "x" * 256, "1 to 255"),
    (":" + "x" * 30, "token type"),
    ("ISO14443:" + "x" * 20 + "\x07", "control character"),
    ("OK1\nOK1 Blocked", "listed twice (also on line 3)"),
    ("ok1\nOK1", "listed twice (also on line 3)"),
])
def test_list_errors_name_the_file_and_line(tmp_path, line, words):
    f = tmp_path / "ids.txt"
    f.write_text("# header\n\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_authorization_list(f)
    expected_line = 3 + line.count("\n")
    assert err.value.line == expected_line and err.value.path == str(f)
    assert str(err.value).startswith(f"{f}:{expected_line}: ")
    assert words in str(err.value)


def test_an_unreadable_list(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the authorization list") as err:
        load_authorization_list(tmp_path / "missing.txt")
    assert err.value.path == str(tmp_path / "missing.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="cannot read"):
        load_authorization_list(tmp_path / "bin.txt")


def test_module_constants_are_documented():
    assert "ocpp.offline.authorization_list" in (load_authorization_list.__doc__ or "")
    assert localstate.PLAIN_MAX == 20 and localstate.TOKEN_MAX == 255
