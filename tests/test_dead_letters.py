"""The buffer's dead-letter table (issue 16, failure 1): a message the broker will not take
leaves the FIFO for the ``dead`` table, with its reason and time, in the same commit;
the messages behind it flow; it survives restarts and a crash never half-moves it.
Real files; the broker side is tests/test_broker_refusals.py."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from ocpp_edge.store.diskbuffer import FILENAME, DiskBuffer
from ocpp_edge.store.gate import GatedBuffer

ROOT = Path(__file__).resolve().parent.parent


def rows(path: Path, table: str) -> list[tuple]:
    db = sqlite3.connect(path / FILENAME)
    try:
        if table == "msg":
            return db.execute("SELECT seq, topic, payload FROM msg ORDER BY seq").fetchall()
        return db.execute("SELECT seq, topic, payload, reason, time FROM dead "
                          "ORDER BY seq").fetchall()
    finally:
        db.close()


def drain(buf) -> list[bytes]:
    out = []
    while batch := buf.take(100):
        for rec in batch:
            out.append(rec.payload)
            buf.ack(rec)
    return out


def filled(path: Path, n: int = 4) -> DiskBuffer:
    b = DiskBuffer(path, 1000, 10**7)
    for i in range(n):
        b.append("ocpp/cp/CP.dot" if i == 0 else "ocpp/cp/CP1", b"m%d" % i)
    assert b.commit()
    return b


def test_the_oldest_in_flight_moves_to_the_dead_table_and_the_rest_flows(tmp_path):
    b = filled(tmp_path)
    first, *rest = b.take(4)
    before = time.time()
    assert b.dead_letter(first, "the broker closed the connection 3 times")
    assert b.dead_letters == 1
    assert len(b) == 3 and b.rewind() == 3  # the connection is gone: the rest is unsent
    assert drain(b) == [b"m1", b"m2", b"m3"]  # never m0 again
    assert b.commit()
    assert rows(tmp_path, "msg") == []
    [(seq, topic, payload, reason, when)] = rows(tmp_path, "dead")
    assert (seq, topic, payload, reason) == (first.seq, "ocpp/cp/CP.dot", b"m0",
                                             "the broker closed the connection 3 times")
    assert before <= when <= time.time()
    b.close()


def test_it_survives_a_restart_and_is_counted_there(tmp_path):
    b = filled(tmp_path)
    b.dead_letter(b.take(1)[0], "refused")
    b.close()
    b = DiskBuffer(tmp_path, 1000, 10**7)
    assert b.dead_letters == 1
    assert drain(b) == [b"m1", b"m2", b"m3"]
    b.close()


def test_a_message_behind_others_in_flight_can_go_too(tmp_path):
    b = filled(tmp_path)
    recs = b.take(4)
    assert b.dead_letter(recs[2], "refused")
    assert len(b) == 3
    b.ack(recs[0])
    assert b.rewind() == 2  # m1 and m3 were in flight, m2 is gone
    assert [r.payload for r in b.take(10)] == [b"m1", b"m3"]
    b.commit()
    b.close()
    assert [r[2] for r in rows(tmp_path, "msg")] == [b"m1", b"m3"]
    assert [r[2] for r in rows(tmp_path, "dead")] == [b"m2"]


def test_an_acknowledged_message_is_not_given_up_on(tmp_path):
    b = filled(tmp_path)
    rec = b.take(1)[0]
    b.ack(rec)
    assert not b.dead_letter(rec, "late")
    assert b.dead_letter(b.take(1)[0], "x")  # the next one can
    assert b.dead_letters == 1
    b.close()


def test_a_message_not_yet_written_goes_straight_to_the_dead_table(tmp_path):
    b = DiskBuffer(tmp_path, 1000, 10**7)
    b.append("ocpp/cp/CP.dot", b"new")  # not INSERTed before the next commit
    b.dead_letter(b.take(1)[0], "refused")
    assert b.commit()
    assert rows(tmp_path, "msg") == []
    assert [r[2] for r in rows(tmp_path, "dead")] == [b"new"]
    b.close()


def test_through_the_offline_gate(tmp_path):
    inner = filled(tmp_path)
    gated = GatedBuffer(inner, lambda payload: payload, hold_timeout=60, clock=time.monotonic)
    assert gated.dead_letter(gated.take(1)[0], "refused")
    assert inner.dead_letters == 1 and drain(gated) == [b"m1", b"m2", b"m3"]
    inner.close()


def _run(script: str) -> None:
    subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from ocpp_edge.store.diskbuffer import DiskBuffer
        """) + textwrap.dedent(script)], check=False)


def test_a_crash_before_the_commit_leaves_the_message_where_it_was(tmp_path):
    _run(f"""
        b = DiskBuffer({str(tmp_path)!r}, 1000, 10**7)
        b.append("ocpp/cp/CP.dot", b"m0"); b.append("ocpp/cp/CP1", b"m1")
        b.commit()
        b.dead_letter(b.take(1)[0], "refused")
        os._exit(9)  # like kill -9: no commit
        """)
    b = DiskBuffer(tmp_path, 1000, 10**7)
    assert b.dead_letters == 0 and rows(tmp_path, "dead") == []
    assert drain(b) == [b"m0", b"m1"]  # judged again after the restart
    b.close()


def test_a_crash_after_the_commit_keeps_it_moved(tmp_path):
    _run(f"""
        b = DiskBuffer({str(tmp_path)!r}, 1000, 10**7)
        b.append("ocpp/cp/CP.dot", b"m0"); b.append("ocpp/cp/CP1", b"m1")
        b.commit()
        b.dead_letter(b.take(1)[0], "refused")
        b.commit()
        os._exit(9)
        """)
    b = DiskBuffer(tmp_path, 1000, 10**7)
    assert b.dead_letters == 1 and [r[2] for r in rows(tmp_path, "dead")] == [b"m0"]
    assert drain(b) == [b"m1"]
    b.close()


def test_a_store_from_before_the_dead_table_gets_one(tmp_path):
    db = sqlite3.connect(tmp_path / FILENAME)
    db.executescript("CREATE TABLE msg (seq INTEGER PRIMARY KEY, topic TEXT NOT NULL, "
                     "payload BLOB NOT NULL, important INTEGER NOT NULL DEFAULT 0);"
                     "INSERT INTO msg VALUES (7, 'ocpp/cp/CP1', x'6f6c64', 0);")
    db.close()
    b = DiskBuffer(tmp_path, 1000, 10**7)
    assert b.dead_letters == 0
    rec = b.take(1)[0]
    assert rec.payload == b"old"
    b.dead_letter(rec, "refused")
    b.close()
    assert [r[0] for r in rows(tmp_path, "dead")] == [7]
