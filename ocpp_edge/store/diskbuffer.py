"""The durable upstream FIFO: SQLite in WAL mode, group commit, removal on the broker's ack.

The guarantee (SPEC "When the upstream link is down"): a message the gateway accepted is
published at least once, in order, unless the overflow policy dropped it (counted and
logged) or the host lost power within ``fsync_interval`` of its arrival. It holds across
broker restarts, ``kill -9`` and power cuts.

Why SQLite: it already solves atomic commit and crash recovery, and it is in the standard
library; the measurements that decided it over a hand-written log are in BENCHMARKS.md.

How:

* ``append`` returns a :class:`~ocpp_edge.buffer.Record` at once; the buffer's ``seq``
  (the row id) is the durable identity, paho's mid is only a handle. The row is INSERTed
  later, in one ``executemany`` with the others of its interval: at the next commit, or
  before anything reads the table.
* ``commit`` — called by the gateway every ``fsync_interval`` while there are changes —
  commits the transaction: one WAL append + fsync (``synchronous=FULL``) for all the
  messages and deletions of that interval. A message the broker acknowledged before its
  commit is not written at all: it is delivered, and writing it only to delete it would
  cost CPU and flash wear for nothing. Nothing is durable before its commit either way,
  so the guarantee is the same.
* ``take`` hands out the oldest unsent records after a cursor, in order: a backlog of any
  size, or one found at start-up, goes out ahead of new messages. They are read from the
  table ``READ_AHEAD`` rows per SELECT into a read-ahead queue; once the queue holds every
  unsent row, new appends join it too, so a live gateway hands out what it just stored
  without reading it back (bounded by ``AHEAD_MAX``; past that the table is read again).
  The table stays the truth: anything unusual (a rewind, a drop, a failed write) empties
  the queue. While the disk refuses writes, records are served from memory (the spill).
* ``ack`` marks a record delivered; the contiguous acked prefix is DELETEd (a range delete)
  in the next commit. A record acknowledged ahead of an older one in flight (the offline
  gate lets a charge point's messages pass another's held one) is DELETEd at once by its
  seq. ``rewind`` makes everything in flight and not acknowledged unsent again.
* Full (``max_messages`` / ``max_bytes``): ``drop_oldest`` removes the oldest unsent
  message, ``drop_newest`` refuses the newcomer; transaction messages (flag ``important``)
  are dropped only when no other message could be.
* A full disk (ENOSPC) never raises out of here: the failed batch stays in memory and is
  written again at the next commit; meanwhile the memory it may use is bounded and the
  overflow policy applies. Everything resumes when space returns.
* Dead letters: a message the broker will not take (it drops the connection each time the
  message is published, see north/uplink.py) is moved by ``dead_letter`` to the ``dead``
  table, with the reason and the time, in the same commit that removes it from ``msg``:
  it is never published again, survives restarts, and the messages behind it flow.
  ``dead_letters`` counts the table's rows.
* Recovery: SQLite replays its WAL to the last good commit by itself. A file that does not
  open or fails ``PRAGMA quick_check`` is moved aside (never deleted), every row that can
  still be read is copied into a fresh store, and the gateway starts regardless.

Length: one SQLite store with its crash recovery (salvage of a damaged file), full-disk
handling, group commits, the read-ahead queue and the dead-letter table; each needs the
others' invariants, so they stay together.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from ocpp_edge.store.record import DROP_NEWEST, DROP_OLDEST, RECORD_OVERHEAD, Record

log = logging.getLogger("ocpp_edge.buffer")

FILENAME = "buffer.sqlite3"
SPILL_MAX = 20_000  # records held in memory at most while the disk refuses writes
READ_AHEAD = 2_000  # rows read per SELECT when the table is read (a backlog drains)
AHEAD_MAX = 4_000  # records at most in the read-ahead queue (~1-2 MB of MeterValues)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS msg (
    seq INTEGER PRIMARY KEY,          -- the durable identity; rows leave in seq order
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    important INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS msg_expendable ON msg (important, seq);
CREATE TABLE IF NOT EXISTS dead (
    seq INTEGER PRIMARY KEY,          -- the message's seq in msg
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    reason TEXT NOT NULL,             -- why the gateway gave up on it
    time REAL NOT NULL                -- when, in seconds since the Unix epoch
);
"""


class DiskBuffer:
    """A bounded, durable FIFO with a send cursor: ``append`` → ``take`` → ``ack`` /
    ``rewind``, plus ``commit`` every fsync interval."""

    def __init__(self, directory: str | os.PathLike, max_messages: int, max_bytes: int,
                 overflow: str = DROP_OLDEST, clock: Callable[[], float] = time.monotonic,
                 spill_max: int = SPILL_MAX) -> None:
        if overflow not in (DROP_OLDEST, DROP_NEWEST):
            raise ValueError(f"unknown overflow policy {overflow!r}")
        self.dir = Path(directory)
        self.path = self.dir / FILENAME
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.overflow = overflow
        self.spill_max = spill_max
        self._clock = clock
        self.dropped = 0
        self.commits = 0
        self.write_errors = 0
        self.moved_aside: list[Path] = []
        self.salvaged = 0
        self._drops_since_log = 0
        self._last_drop_log = -1e9
        self._last_error_log = -1e9

        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._db = self._open()
        except sqlite3.Error as exc:  # e.g. a directory the service may not write
            raise OSError(f"cannot open the buffer {self.path}: {exc}") from None
        count, stored, last_seq = self._db.execute(
            "SELECT count(*), coalesce(sum(length(CAST(topic AS BLOB)) + length(payload)), 0),"
            " coalesce(max(seq), 0) FROM msg").fetchone()
        self._count = count
        self.bytes = stored + count * RECORD_OVERHEAD
        self.dead_letters = self._db.execute("SELECT count(*) FROM dead").fetchone()[0]
        self._dead: list[tuple] = []  # dead-letter rows not committed yet
        self._next_seq = last_seq + 1
        self._cursor = 0  # every row with seq ≤ cursor has been handed out (or acked)
        self._in_flight: deque[Record] = deque()
        # seqs in flight acknowledged ahead of an older one, already out of the table and
        # the counts (see ack)
        self._acked_early: set[int] = set()
        self._uncommitted: list[Record] = []  # appended since the last good commit
        self._pending: list[Record] = []  # appended, not INSERTed yet (see _flush)
        self._spill: deque[Record] = deque()  # appended while the disk refuses writes
        # Unsent records after the cursor, contiguous from cursor + 1 (the read-ahead);
        # _ahead_all: it holds every such row of the table, so appends may join it.
        self._ahead: deque[Record] = deque()
        self._ahead_all = False
        self._dropped: set[int] = set()  # dropped by policy since the last good commit
        self._delete_upto = 0  # every seq ≤ this is acked: range-deleted at commit
        self._deleted_upto = 0
        self._failing = False
        self.dirty = False
        # Called when the first change after a commit arrives: the gateway arms its
        # group-commit timer then, so an idle gateway never wakes up for the buffer.
        self.on_dirty: Callable[[], None] = lambda: None
        self._db.execute("BEGIN")
        if count:
            log.info("buffer %s: %d message(s) (%d bytes) waiting from before the restart",
                     self.path, count, self.bytes)

    # -- opening and recovery ------------------------------------------------------------

    def _connect(self, path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # each commit is fsynced: the group commit
        # Keep the log small: checkpoint every ~1 MB of WAL, and truncate it afterwards
        # (a Pi's SD card, or a small partition, must not fill up with a stale log).
        db.execute("PRAGMA wal_autocheckpoint=256")
        db.execute("PRAGMA journal_size_limit=1048576")
        db.executescript(_SCHEMA)
        return db

    def _open(self) -> sqlite3.Connection:
        try:
            db = self._connect(self.path)
            ok = db.execute("PRAGMA quick_check").fetchone()[0]
            if ok == "ok":
                return db
            db.close()
            problem = f"integrity check failed: {ok}"
        except sqlite3.DatabaseError as exc:
            problem = str(exc)
        return self._recover(problem)

    def _recover(self, problem: str) -> sqlite3.Connection:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = self.path.with_name(f"{FILENAME}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                dst = Path(str(aside) + suffix)
                os.replace(src, dst)
                self.moved_aside.append(dst)
        rows = _salvage(aside) if aside.exists() else []
        dead = _salvage_dead(aside) if aside.exists() else []
        db = self._connect(self.path)
        if rows or dead:
            db.execute("BEGIN")
            db.executemany("INSERT INTO msg (seq, topic, payload, important) VALUES (?,?,?,?)",
                           rows)
            db.executemany("INSERT OR REPLACE INTO dead (seq, topic, payload, reason, time) "
                           "VALUES (?,?,?,?,?)", dead)
            db.execute("COMMIT")
        self.salvaged = len(rows)
        log.error("buffer %s was damaged (%s): moved aside to %s; %d message(s) recovered "
                  "from it, the rest could not be read", self.path, problem, aside, len(rows))
        return db

    # -- the FIFO ------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._count

    @property
    def unsent(self) -> int:
        return self._count - (len(self._in_flight) - len(self._acked_early))

    def append(self, topic: str, payload: bytes, important: bool = False) -> Record | None:
        """Store a message; returns its record, or None if the overflow policy dropped it.

        ``important`` marks a transaction message, dropped only when nothing else can be."""
        rec = Record(self._next_seq, topic, payload, important)
        self._next_seq += 1
        if rec.size > self.max_bytes:
            self._count_drop(rec.topic)
            return None
        while True:
            # While the disk refuses writes, memory is the bound that matters.
            spill_full = len(self._spill) >= self.spill_max
            if not (spill_full or self._count >= self.max_messages
                    or self.bytes + rec.size > self.max_bytes):
                break
            if not self._drop_one(rec, spill_only=spill_full):
                self._count_drop(rec.topic)
                return None
        if self._failing:
            self._spill.append(rec)
        else:
            self._pending.append(rec)
            if self._ahead_all:
                if len(self._ahead) < AHEAD_MAX:
                    self._ahead.append(rec)
                else:
                    self._ahead_all = False  # the table will have it; read back in its turn
        self._uncommitted.append(rec)
        self._count += 1
        self.bytes += rec.size
        self._touch()
        return rec

    def _flush(self) -> bool:
        """INSERT the pending records not yet acknowledged (into the open transaction);
        False if the disk refused (then they are served from the spill)."""
        pending = self._pending
        if not pending:
            return True
        self._pending = []
        rows = [(r.seq, r.topic, r.payload, int(r.important)) for r in pending if not r.acked]
        if not rows:
            return True
        try:
            self._db.executemany("INSERT INTO msg (seq, topic, payload, important) "
                                 "VALUES (?,?,?,?)", rows)
        except sqlite3.Error as exc:
            self._write_failed(exc)
            return False
        return True

    def take(self, n: int) -> list[Record]:
        """Hand out up to ``n`` unsent records, oldest first: the table's, then the spill."""
        ahead = self._ahead
        if len(ahead) < n and not self._ahead_all:
            self._flush()  # the table must hold everything before it is read
            after = ahead[-1].seq if ahead else self._cursor
            limit = max(n, READ_AHEAD)
            rows = self._db.execute(
                "SELECT seq, topic, payload, important FROM msg WHERE seq > ? "
                "ORDER BY seq LIMIT ?", (after, limit)).fetchall()
            dropped = self._dropped  # a failed commit may have brought dropped rows back
            ahead.extend(Record(seq, topic, payload, bool(important))
                         for seq, topic, payload, important in rows
                         if not dropped or seq not in dropped)
            # Fewer rows than asked for: the queue now holds the table's whole unsent tail.
            self._ahead_all = len(rows) < limit and not self._failing
        if len(ahead) <= n:
            out = list(ahead)
            ahead.clear()
        else:
            out = [ahead.popleft() for _ in range(n)]
        if out:
            self._cursor = max(self._cursor, out[-1].seq)
        spill = self._spill
        while spill and len(out) < n:
            if spill[0].seq > self._cursor:
                self._cursor = spill[0].seq
                out.append(spill.popleft())
            else:
                spill.popleft()  # already handed out from the table
        self._in_flight.extend(out)
        return out

    def ack(self, rec: Record) -> None:
        """The broker acknowledged ``rec``: it leaves the table at the next commit."""
        if rec.acked:
            return
        rec.acked = True
        flight = self._in_flight
        if flight and flight[0] is not rec:
            if flight[0].seq < rec.seq <= flight[-1].seq:  # in flight (seqs increase)
                self._ack_early(rec)
            return
        early = self._acked_early
        while flight and flight[0].acked:
            head = flight.popleft()
            self._delete_upto = head.seq
            if early and head.seq in early:
                early.discard(head.seq)  # counted out when it was acknowledged
                continue
            self._count -= 1
            self.bytes -= head.size
        self._touch()

    def _ack_early(self, rec: Record) -> None:
        """``rec`` was acknowledged while an older record is still in flight: the offline
        gate (store/gate.py) lets one charge point's messages pass another's held one. It
        leaves the table now, not with the acknowledged prefix, so that neither a rewind
        nor a restart hands it out again (each would publish it twice); it stays in
        flight, already counted out, until the prefix reaches it."""
        self._acked_early.add(rec.seq)
        self._remove_now(rec.seq, rec.size)

    def _remove_now(self, seq: int, size: int) -> None:
        """The stored message ``seq`` leaves the table now (in the open transaction) and
        the counts, outside the acknowledged prefix: acknowledged early, dead-lettered or
        dropped by policy. A failed commit deletes it again (``_dropped``)."""
        self._dropped.add(seq)
        if not self._failing:
            try:
                self._db.execute("DELETE FROM msg WHERE seq = ?", (seq,))
            except sqlite3.Error as exc:
                self._write_failed(exc)
        self._count -= 1
        self.bytes -= size
        self._touch()

    def dead_letter(self, rec: Record, reason: str) -> bool:
        """Give up on ``rec`` (handed out by ``take``, not acknowledged): it moves to the
        ``dead`` table with ``reason`` at the next commit and is never handed out again.
        False if it was acknowledged (or given up on) already."""
        if rec.acked:
            return False
        self._dead.append((rec.seq, rec.topic, rec.payload, reason, time.time()))
        self.dead_letters += 1
        flight = self._in_flight
        if flight and flight[0] is rec:  # the usual case: the oldest message in flight
            self.ack(rec)  # leaves msg with the acknowledged prefix, in the same commit
            return True
        # Anywhere else: out of msg as a message dropped by policy is (not counted as one).
        rec.acked = True  # a failed commit never writes it again
        try:
            flight.remove(rec)
        except ValueError:
            pass
        self._forget_ahead()
        self._remove_now(rec.seq, rec.size)
        return True

    def rewind(self) -> int:
        """The connection dropped: everything in flight becomes unsent again, in order."""
        self._forget_ahead()
        n = len(self._in_flight) - len(self._acked_early)
        if self._in_flight:
            first = self._in_flight[0].seq
            self._cursor = first - 1
            if self._failing and self._uncommitted:
                # records not in the table (appended since the last good commit) go back
                # to the spill; the table's are read again from the cursor
                oldest = self._uncommitted[0].seq
                back = [r for r in self._in_flight if r.seq >= oldest and not r.acked]
                self._spill.extendleft(reversed(back))
            self._in_flight.clear()
            self._acked_early.clear()  # out of the table and the counts already
        return n

    def _forget_ahead(self) -> None:
        """Empty the read-ahead: the next ``take`` reads the table after the cursor."""
        self._ahead.clear()
        self._ahead_all = False

    # -- overflow --------------------------------------------------------------------------

    def _drop_one(self, newcomer: Record, spill_only: bool = False) -> bool:
        """Drop one stored, unsent message by policy; False if the newcomer must go."""
        newest = self.overflow == DROP_NEWEST
        if newest and not newcomer.important:
            return False
        victim = self._find_victim(True, newest, spill_only)
        if victim is None and not newcomer.important:
            return False
        if victim is None and not newest:
            victim = self._find_victim(False, False, spill_only)
        if victim is None:
            return False
        seq, size, topic = victim
        self._forget_ahead()
        for rec in self._spill:
            if rec.seq == seq:
                self._spill.remove(rec)
                break
        for rec in self._uncommitted:
            if rec.seq == seq:
                rec.acked = True  # never written again after a failed commit
                break
        self._remove_now(seq, size)
        self._count_drop(topic)
        return True

    def _find_victim(self, expendable_only: bool, newest: bool,
                     spill_only: bool = False) -> tuple | None:
        """(seq, size, topic) of the oldest (newest) unsent message that may go."""
        self._flush()  # the table must hold everything before it is read
        floor = self._cursor  # everything at or below it is in flight or gone
        spill = [r for r in self._spill if r.seq > floor and not r.acked
                 and (not expendable_only or not r.important)]
        if newest and spill:
            r = spill[-1]
            return r.seq, r.size, r.topic
        if spill_only:
            return (spill[0].seq, spill[0].size, spill[0].topic) if spill else None
        row = self._db.execute(
            "SELECT seq, length(CAST(topic AS BLOB)) + length(payload), topic FROM msg "
            "WHERE seq > ?" + (" AND important = 0" if expendable_only else "")
            + " ORDER BY seq " + ("DESC" if newest else "ASC") + " LIMIT 1",
            (floor,)).fetchone()
        if row is not None:
            return row[0], row[1] + RECORD_OVERHEAD, row[2]
        if spill:
            r = spill[0]
            return r.seq, r.size, r.topic
        return None

    # -- commit ----------------------------------------------------------------------------

    def _touch(self) -> None:
        if not self.dirty:
            self.dirty = True
            self.on_dirty()

    def commit(self) -> bool:
        """Make everything appended, acked and dropped so far durable (one fsync)."""
        if not self.dirty:
            return True
        if not self._failing and not self._flush():
            return False
        db = self._db
        try:
            if self._failing:
                if not db.in_transaction:
                    # Reclaim the log's space first: after ENOSPC, that is often all the
                    # room the disk has.
                    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                    db.execute("BEGIN")
                # The failed batch (and the spill) may have been rolled back: write it
                # again. INSERT OR REPLACE makes this right whether or not it was.
                db.executemany(
                    "INSERT OR REPLACE INTO msg (seq, topic, payload, important) "
                    "VALUES (?,?,?,?)", [(r.seq, r.topic, r.payload, int(r.important))
                                         for r in self._uncommitted if not r.acked])
                db.executemany("DELETE FROM msg WHERE seq = ?",
                               [(seq,) for seq in self._dropped])
            if self._delete_upto > self._deleted_upto:
                db.execute("DELETE FROM msg WHERE seq <= ?", (self._delete_upto,))
            if self._dead:
                db.executemany("INSERT OR REPLACE INTO dead (seq, topic, payload, reason, "
                               "time) VALUES (?,?,?,?,?)", self._dead)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._write_failed(exc)
            return False
        self.commits += 1
        if self._failing:
            log.warning("buffer %s: the disk takes writes again; %d message(s) held in "
                        "memory are stored now", self.path, len(self._uncommitted))
            self._failing = False
            self._spill.clear()
        self._deleted_upto = self._delete_upto
        self._dead.clear()
        self._uncommitted.clear()
        self._dropped.clear()
        self.dirty = False
        db.execute("BEGIN")
        return True

    def _write_failed(self, exc: sqlite3.Error) -> None:
        # ENOSPC ("database or disk is full"), EIO...: nothing raises into the gateway.
        # What the table held at the last good commit stays; the newer records are
        # served from memory (the spill) and written again at the next commit.
        self.write_errors += 1
        self._forget_ahead()
        if not self._failing:
            unsent = {r.seq for r in self._in_flight}
            self._spill.extend(r for r in self._uncommitted
                               if not r.acked and r.seq not in unsent and r.seq > self._cursor)
            self._failing = True
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
        now = self._clock()
        if now - self._last_error_log >= 10.0:
            log.error("buffer %s: cannot write (%s); %d message(s) held in memory until "
                      "the disk takes them", self.path, exc, len(self._uncommitted))
            self._last_error_log = now

    def close(self) -> None:
        self.commit()
        try:
            if self._db.in_transaction:
                self._db.execute("COMMIT")
            self._db.close()
        except sqlite3.Error as exc:
            log.error("buffer %s: closing failed: %s", self.path, exc)

    # -- reporting -------------------------------------------------------------------------

    def _count_drop(self, topic: str) -> None:
        self.dropped += 1
        self._drops_since_log += 1
        now = self._clock()
        if now - self._last_drop_log >= 10.0:
            log.warning("upstream buffer full (%d messages, %d bytes): dropped %d message(s) "
                        "by %s, last on %s; %d dropped in total", self._count, self.bytes,
                        self._drops_since_log, self.overflow, topic, self.dropped)
            self._last_drop_log = now
            self._drops_since_log = 0


def _salvage_dead(path: Path) -> list[tuple]:
    """The dead letters of a damaged store, if its dead table can still be read whole."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return db.execute("SELECT seq, topic, payload, reason, time FROM dead").fetchall()
        finally:
            db.close()
    except sqlite3.Error:
        return []


def _salvage(path: Path, max_queries: int = 20_000) -> list[tuple]:
    """Every row of a damaged store that can still be read, in seq order."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return []
    rows: dict[int, tuple] = {}
    budget = [max_queries]

    def read(lo: int, hi: int) -> None:
        # Read [lo, hi]; on an error split the range, down to single rows.
        if budget[0] <= 0 or lo > hi:
            return
        budget[0] -= 1
        try:
            for row in db.execute("SELECT seq, topic, payload, important FROM msg "
                                  "WHERE seq BETWEEN ? AND ? ORDER BY seq", (lo, hi)):
                if (isinstance(row[1], str) and isinstance(row[2], bytes | bytearray)
                        and row[3] in (0, 1)):
                    rows[row[0]] = (row[0], row[1], bytes(row[2]), row[3])
            return
        except sqlite3.Error:
            if lo == hi:
                return
        mid = (lo + hi) // 2
        read(lo, mid)
        read(mid + 1, hi)

    try:
        top = db.execute("SELECT max(seq) FROM msg").fetchone()[0] or 0
    except sqlite3.Error:
        top = 1 << 40
    read(1, top)
    db.close()
    return [rows[k] for k in sorted(rows)]
