"""What offline operation remembers (``ocpp.upstream_down_policy = local``): one small
SQLite file, mirrored in memory.

Kept, per site:

* the **authorization cache**: the status, expiry and parent the backend gave each id it
  answered for (an ``Accepted`` one and a later ``Invalid`` alike: the newest answer wins),
  plus the operator's **authorization list** (``ocpp.offline.authorization_list``, read by
  :func:`load_authorization_list`; not stored, read again at each start), which wins over
  the cache. Ids are compared without regard to case (both OCPP versions say so; the
  key is case-folded here: ``core.local`` leaves that to the store);
* the **BootNotification interval** the backend last accepted for each charge point;
* **OCPP 1.6 transaction ids** handed out locally: a counter over a configured range the
  backend does not use, and the mapping local id → (charge point, backend id or NULL);
* the **CALLs answered locally** whose replay the backend has not answered yet: action,
  request and the answer the charge point got (JSON text), so that the backend's answer is
  reconciled even when it arrives after a restart.

How:

* Every read the message path makes is a dict lookup: the cache, the list, the intervals
  and the transaction mappings live in dicts and are loaded at start. The one exception
  is the request/answer bodies of the answered CALLs: a long outage leaves tens of
  thousands of them (megabytes), so they stay on disk and :meth:`LocalState.take_answered`
  reads one row by its primary key; it costs nothing when none are pending.
* Writes change memory at once and mark the row dirty; :meth:`LocalState.commit` writes
  every dirty row in one transaction and commits it (WAL, ``synchronous=FULL``: one
  fsync). Nothing is durable before its commit; after a commit all of it is, against
  ``kill -9`` and power loss. The gateway calls ``commit`` once per event-loop turn with
  changes (``dirty`` / ``on_dirty``, as for the disk buffer).
* A **full disk** or an I/O error never raises out of here: ``commit`` rolls back, logs
  once per episode and returns False; memory keeps the state and the next ``commit``
  writes all of it again. Meanwhile the bodies of answered CALLs held in memory are bounded
  (``held_max``; the oldest go first, counted in ``answered_dropped``).
* **Transaction ids** come from one counter for the whole site, so a local id names one
  transaction (:meth:`LocalState.transaction` needs no charge point). The counter is written
  with the mapping row, in the same commit. At every start it also jumps ahead by
  :data:`RESTART_SKIP` (written at once): an id handed out in the last event-loop turn
  before a ``kill -9`` (answered, not yet committed) is not handed out again. When the
  range is used up the counter wraps to its start, skipping ids still mapped (WARNING).
* A file that is **not a usable database** (not SQLite, damaged, another schema version)
  is moved aside to ``<name>.corrupt-<UTC time>`` (with its ``-wal``/``-shm``), never
  deleted, with one ERROR line; a fresh state is created. Only the transaction id counter
  is read back from it if it can be (so ids are not handed out twice); the cached
  authorizations, boot intervals, transaction mappings and answered CALLs are lost.
  An environment problem (a directory the service may not write, a full disk on
  creation) raises :class:`OSError` instead: the file is not to blame.

Length: one SQLite file with in-memory mirrors of four tables, full-disk and damaged-
file recovery, and the operator list's parser (about 100 lines) with its error
positions.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path

from ocpp_edge.core.local import Authorization
from ocpp_edge.errors import ConfigError

log = logging.getLogger("ocpp_edge.localstate")

FILENAME = "local.sqlite"
SCHEMA_VERSION = 1
DEFAULT_TRANSACTION_IDS = (1_900_000_000, 2_147_483_647)
RESTART_SKIP = 100  # ids skipped at each start (ranges of at least 100,000 ids)
HELD_MAX = 20_000  # answered CALLs held in memory at most while the disk refuses writes

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE auth (
    id_key TEXT PRIMARY KEY,             -- case-folded
    status TEXT NOT NULL, expires REAL, parent TEXT, parent_type TEXT,
    learnt REAL NOT NULL                 -- epoch seconds of the backend's answer
) WITHOUT ROWID;
CREATE TABLE boot (cid TEXT PRIMARY KEY, interval INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE tx (
    local_id INTEGER PRIMARY KEY,        -- unique on the site: one counter
    cid TEXT NOT NULL, backend_id INTEGER, created REAL NOT NULL
);
CREATE TABLE answered (
    cid TEXT NOT NULL, unique_id TEXT NOT NULL, action TEXT NOT NULL,
    request TEXT NOT NULL, answer TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (cid, unique_id)
) WITHOUT ROWID;
CREATE INDEX answered_created ON answered (created);
"""

# SQLite errors that say nothing about the file itself: raised, never "moved aside".
_ENVIRONMENT = ("SQLITE_CANTOPEN", "SQLITE_IOERR", "SQLITE_FULL", "SQLITE_NOMEM",
                "SQLITE_READONLY", "SQLITE_PERM", "SQLITE_BUSY", "SQLITE_LOCKED",
                "SQLITE_AUTH")
_LOST = ("cached authorizations, remembered boot intervals, transaction id mappings and "
         "locally answered CALLs awaiting the backend's answer are lost")


class _Unusable(Exception):
    """The file is not a database of ours (not SQLite, damaged, another schema)."""


# A damaged file can also make sqlite3 fail to decode an error message or a schema text.
_DB_ERRORS = (sqlite3.Error, UnicodeDecodeError)
_OPEN_ERRORS = (*_DB_ERRORS, _Unusable)


def _environmental(exc: Exception) -> bool:
    name = getattr(exc, "sqlite_errorname", "") or ""
    return name.startswith(_ENVIRONMENT)


def _dumps(value: object) -> str:
    # ASCII: a lone surrogate a peer sent as a JSON escape stays an escape (SQLite text
    # must be valid UTF-8).
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True)


def _text(value: str) -> str:
    """``value`` as SQLite can store it: unchanged unless it holds a lone surrogate (a
    JSON escape like "\\ud800" decodes to one), which becomes backslash escapes, the
    same way each time, so lookups and the file agree."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass").decode("utf-8", "backslashreplace")
    return value


def _safe_auth(auth: Authorization) -> Authorization:
    fields = (auth.status, auth.parent, auth.parent_type)
    clean = tuple(None if f is None else _text(f) if isinstance(f, str) else f
                  for f in fields)
    if clean == fields:
        return auth
    return Authorization(clean[0], auth.expires, clean[1], clean[2])


class LocalState:
    """The offline mode's durable knowledge (implements ``core.local.Knowledge`` and
    ``core.offline.Memory``). Reads are dict lookups; writes are durable after
    :meth:`commit`."""

    def __init__(self, path: str | os.PathLike,
                 transaction_ids: tuple[int, int] = DEFAULT_TRANSACTION_IDS,
                 authorization_list: Mapping[str, Authorization] | None = None, *,
                 clock: Callable[[], float] = time.time, held_max: int = HELD_MAX) -> None:
        lo, hi = transaction_ids
        if not (type(lo) is int and type(hi) is int and -2**31 <= lo <= hi <= 2**31 - 1):
            raise ValueError(f"transaction id range {transaction_ids!r}: two 32-bit "
                             "integers, the first not above the second")
        self.path = Path(path)
        self._lo, self._hi = lo, hi
        self._clock = clock
        self.held_max = held_max
        self._list: dict[str, Authorization] = _folded(authorization_list or {})
        self._auth: dict[str, Authorization] = {}
        self._boot: dict[str, int] = {}
        # local id -> (charge point, backend id or None, created epoch seconds)
        self._tx: dict[int, tuple[str, int | None, float]] = {}
        self._rev: dict[tuple[str, int], int] = {}  # (charge point, backend id) -> local id
        self._next_tx = lo
        self._answered_n = 0  # pending answered CALLs, in the table and in memory
        self._answered_db_n = 0  # of which in the table at the last good commit
        # Changed since the last good commit (written by commit()):
        self._dirty_auth: dict[str, float] = {}  # id_key -> learnt
        self._dirty_boot: set[str] = set()
        self._dirty_tx: set[int] = set()
        self._dirty_next = False
        # (cid, unique_id) -> (action, request JSON, answer JSON, created), None: delete
        self._answered: dict[tuple[str, str], tuple[str, str, str, float] | None] = {}
        self._held = 0  # non-None values in _answered
        self._held_order: deque[tuple[str, str]] = deque()  # their keys, oldest first
        self._stored_next = False  # the file holds a transaction id counter
        self._failing = False
        self._damaged: str | None = None  # a read found the file damaged: rebuild it
        self._closed = False
        self._read_error_logged = False
        self.dirty = False
        self.on_dirty: Callable[[], None] = lambda: None
        self.commits = 0
        self.write_errors = 0
        self.answered_dropped = 0
        self.moved_aside: list[Path] = []

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OSError(f"cannot create the directory of {self.path}: {exc}") from None
        self._db: sqlite3.Connection | None = self._open()
        if RESTART_SKIP and hi - lo + 1 >= 1000 * RESTART_SKIP and self._stored_next:
            self._next_tx += RESTART_SKIP
            self._dirty_next = True
            self._touch()
        if self._dirty_next:
            self.commit()  # at once: before any id is handed out

    # -- opening -------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a commit is fsynced
            db.execute("PRAGMA wal_autocheckpoint=256")  # keep the log near 1 MB
            db.execute("PRAGMA journal_size_limit=1048576")
        except BaseException:
            db.close()
            raise
        return db

    def _open(self) -> sqlite3.Connection:
        db = None
        try:
            db = self._connect()
            self._load(db)
            return db
        except _OPEN_ERRORS as exc:
            if db is not None:
                db.close()
            if isinstance(exc, sqlite3.Error) and _environmental(exc):
                raise OSError(f"cannot open the local state {self.path}: {exc}") from None
            problem = str(exc)
        self._reset_memory()
        aside = self._move_aside()
        salvaged = _salvage_counter(aside)
        try:
            db = self._connect()
            self._load(db)
        except _OPEN_ERRORS as exc:
            raise OSError(f"cannot create the local state {self.path}: {exc}") from None
        if salvaged is not None and salvaged > self._next_tx:
            self._next_tx = salvaged
            self._stored_next = True
            self._dirty_next = True
            self._touch()
        log.error("local state %s is not usable (%s): moved aside to %s, a fresh one is "
                  "created; %s; local transaction ids %s", self.path, problem, aside, _LOST,
                  f"continue from {self._next_tx}" if salvaged is not None
                  else f"start again at {self._next_tx} (the old counter was unreadable)")
        return db

    def _load(self, db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if version == 0 and tables == 0:  # new (or an empty file)
            db.executescript(f"BEGIN;{_SCHEMA}PRAGMA user_version={SCHEMA_VERSION};COMMIT;")
            self._stored_next = False
            return
        if version != SCHEMA_VERSION:
            raise _Unusable(f"schema version {version}, this program reads {SCHEMA_VERSION}")
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise _Unusable(f"integrity check failed: {check}")
        try:
            for key, status, expires, parent, parent_type in db.execute(
                    "SELECT id_key, status, expires, parent, parent_type FROM auth"):
                self._auth[str(key)] = Authorization(
                    str(status), None if expires is None else float(expires),
                    None if parent is None else str(parent),
                    None if parent_type is None else str(parent_type))
            for cid, interval in db.execute("SELECT cid, interval FROM boot"):
                self._boot[sys.intern(cid)] = int(interval)
            for local_id, cid, backend_id, created in db.execute(
                    "SELECT local_id, cid, backend_id, created FROM tx"):
                cid = sys.intern(str(cid))
                backend_id = None if backend_id is None else int(backend_id)
                self._tx[int(local_id)] = (cid, backend_id, float(created))
                if backend_id is not None:
                    self._rev[cid, backend_id] = int(local_id)
            row = db.execute("SELECT value FROM meta WHERE key = 'next_tx'").fetchone()
            self._stored_next = row is not None
            if row is not None:
                self._next_tx = max(int(row[0]), self._lo)
            self._answered_n = self._answered_db_n = \
                db.execute("SELECT count(*) FROM answered").fetchone()[0]
        except (TypeError, ValueError, OverflowError) as exc:
            raise _Unusable(f"a row of an unexpected type: {exc}") from None

    def _reset_memory(self) -> None:
        self._auth.clear()
        self._boot.clear()
        self._tx.clear()
        self._rev.clear()
        self._next_tx = self._lo
        self._answered_n = self._answered_db_n = 0

    def _move_aside(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while aside.exists():
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
            n += 1
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                dst = Path(str(aside) + suffix)
                os.replace(src, dst)
                self.moved_aside.append(dst)
        return aside

    # -- the authorization cache and the operator's list ---------------------------------

    def authorization(self, id_key: str) -> Authorization | None:
        """What is known about ``id_key`` (any case): the operator's list entry, else the
        backend's last answer for it, else None. Returned as stored: the caller compares
        ``expires`` (epoch seconds) with its clock."""
        key = _text(id_key).casefold()
        found = self._list.get(key)
        return found if found is not None else self._auth.get(key)

    def learn_authorization(self, id_key: str, auth: Authorization, now: float) -> None:
        """The backend answered for ``id_key`` at ``now`` (epoch seconds): any status,
        so a tag it now refuses is refused offline too."""
        key = _text(id_key).casefold()
        self._auth[key] = _safe_auth(auth)
        self._dirty_auth[key] = now
        self._touch()

    @property
    def authorizations_cached(self) -> int:
        return len(self._auth)

    @property
    def authorizations_listed(self) -> int:
        return len(self._list)

    def set_authorization_list(self, entries: Mapping[str, Authorization]) -> None:
        """Replace the operator's list (a configuration reload); nothing is written."""
        self._list = _folded(entries)

    # -- BootNotification intervals ------------------------------------------------------

    def boot_interval(self, cid: str) -> int | None:
        return self._boot.get(cid)

    def remember_boot(self, cid: str, interval: int) -> None:
        """The backend Accepted ``cid``'s BootNotification with this interval."""
        if self._boot.get(cid) == interval:
            return
        cid = sys.intern(cid)
        self._boot[cid] = interval
        self._dirty_boot.add(cid)
        self._touch()

    # -- OCPP 1.6 transaction ids ---------------------------------------------------------

    def new_transaction_id(self, cid: str) -> int:
        """The next local transaction id for ``cid``'s StartTransaction, recorded as a
        mapping with no backend id yet. Ids increase (across restarts too) until the
        range is used up; then they start again at its beginning, skipping ids still
        mapped."""
        lo, hi, tx = self._lo, self._hi, self._tx
        n = self._next_tx
        for _ in range(len(tx) + 1):
            if n > hi:
                log.warning("local transaction ids: the range %d-%d is used up; starting "
                            "again at %d (skipping the %d still mapped)", lo, hi, lo, len(tx))
                n = lo
            if n not in tx:
                break
            n += 1
        else:  # every id of the range is mapped: the oldest transaction gives its id up
            n = min((k for k in tx if lo <= k <= hi), key=lambda k: tx[k][2])
            log.error("local transaction ids: all %d ids of the range %d-%d are mapped; "
                      "the oldest mapping (%s, local id %d) is dropped to reuse its id",
                      hi - lo + 1, lo, hi, tx[n][0], n)
            self.end_transaction(tx[n][0], n)
        cid = sys.intern(cid)
        tx[n] = (cid, None, self._clock())
        self._dirty_tx.add(n)
        self._next_tx = n + 1
        self._dirty_next = True
        self._touch()
        return n

    def map_transaction(self, cid: str, local_id: int, backend_id: int) -> None:
        """The backend answered the replayed StartTransaction: its id is ``backend_id``."""
        cid = sys.intern(cid)
        old = self._tx.get(local_id)
        if old is not None:
            if old[1] is not None and self._rev.get((old[0], old[1])) == local_id:
                del self._rev[old[0], old[1]]
            created = old[2]
        else:  # pruned meanwhile, or from a lost state: keep it for the rest of the session
            created = self._clock()
        self._tx[local_id] = (cid, backend_id, created)
        self._rev[cid, backend_id] = local_id
        self._dirty_tx.add(local_id)
        self._touch()

    def transaction(self, local_id: int) -> tuple[str, int | None] | None:
        """(charge point, backend id or None) of a local id still mapped, else None."""
        found = self._tx.get(local_id)
        return None if found is None else (found[0], found[1])

    def backend_id(self, cid: str, local_id: int) -> int | None:
        """The backend's id for ``cid``'s local ``local_id``; None: not known (yet)."""
        found = self._tx.get(local_id)
        return found[1] if found is not None and found[0] == cid else None

    def is_local(self, cid: str, local_id: int) -> bool:
        """``local_id`` was handed out to ``cid`` by us and its transaction has not ended."""
        found = self._tx.get(local_id)
        return found is not None and found[0] == cid

    def local_id(self, cid: str, backend_id: int) -> int | None:
        """The local id ``cid`` knows for the backend's ``backend_id`` (for commands)."""
        return self._rev.get((cid, backend_id))

    def end_transaction(self, cid: str, local_id: int) -> None:
        """The transaction is over (its StopTransaction was answered): drop the mapping."""
        found = self._tx.get(local_id)
        if found is None or found[0] != cid:
            return
        del self._tx[local_id]
        if found[1] is not None and self._rev.get((cid, found[1])) == local_id:
            del self._rev[cid, found[1]]
        self._dirty_tx.add(local_id)
        self._touch()

    def prune_transactions(self, older_than: float) -> list[tuple[str, int]]:
        """Drop the mappings created before ``older_than`` (epoch seconds): transactions
        a charge point never ended. Returns (charge point, local id) of each, oldest
        first."""
        old = sorted((created, local_id, cid) for local_id, (cid, _, created)
                     in self._tx.items() if created < older_than)
        for _, local_id, cid in old:
            self.end_transaction(cid, local_id)
        return [(cid, local_id) for _, local_id, cid in old]

    @property
    def transactions_open(self) -> int:
        return len(self._tx)

    # -- CALLs answered locally -------------------------------------------------------------

    def remember_answered(self, cid: str, unique_id: str, action: str, request: dict,
                          answer: dict, now: float) -> None:
        """``cid``'s CALL ``unique_id`` was answered locally with ``answer``; keep it until
        the backend answers its replay. A second CALL with the same id replaces it."""
        key = (cid, _text(unique_id))
        row = (action, _dumps(request), _dumps(answer), now)
        if not self._answered_exists(key):
            self._answered_n += 1
        if self._answered.get(key) is None:
            self._held += 1
        self._answered[key] = row
        self._held_order.append(key)
        self._touch()
        if self._failing and self._held > self.held_max:
            self._drop_held()

    def take_answered(self, cid: str, unique_id: str) -> tuple[str, dict, dict] | None:
        """(action, request, answer) of ``cid``'s CALL ``unique_id`` if it was answered
        locally, forgotten from now on; None otherwise."""
        if not self._answered_n:
            return None
        key = (cid, _text(unique_id))
        if key in self._answered:
            row = self._answered[key]
            if row is None:
                return None
            self._held -= 1
        else:
            row = self._select_answered(key) if self._answered_db_n else None
            if row is None:
                return None
        self._answered[key] = None
        self._answered_n -= 1
        self._touch()
        try:
            return row[0], json.loads(row[1]), json.loads(row[2])
        except ValueError as exc:
            log.error("local state %s: the stored CALL %s of %s is unreadable (%s); its "
                      "answer is treated as not answered locally", self.path, unique_id,
                      cid, exc)
            return None

    def has_answered(self, cid: str, unique_id: str) -> bool:
        """Whether ``cid``'s CALL ``unique_id`` was answered locally and awaits the
        backend's answer (a charge point reusing an id must not be confused with it)."""
        return bool(self._answered_n) and self._answered_exists((cid, _text(unique_id)))

    @property
    def answered_pending(self) -> int:
        return self._answered_n

    def prune_answered(self, older_than: float) -> int:
        """Forget the CALLs answered locally before ``older_than`` (epoch seconds): the
        backend never answered their replay. Returns how many."""
        if not self._answered_n:
            return 0
        mem = self._answered
        gone = [key for key, row in mem.items() if row is not None and row[3] < older_than]
        if self._answered_db_n:
            rows = self._read("SELECT cid, unique_id FROM answered WHERE created < ?",
                              (older_than,), all_rows=True) or []
            gone += [key for key in rows if key not in mem]
        for key in gone:
            if mem.get(key) is not None:
                self._held -= 1
            mem[key] = None
        self._answered_n -= len(gone)
        if gone:
            self._touch()
        return len(gone)

    def _answered_exists(self, key: tuple[str, str]) -> bool:
        if key in self._answered:
            return self._answered[key] is not None
        return bool(self._answered_db_n) and self._select_answered(key) is not None

    def _select_answered(self, key: tuple[str, str]) -> tuple | None:
        return self._read("SELECT action, request, answer, created FROM answered "
                          "WHERE cid = ? AND unique_id = ?", key)

    def _read(self, sql: str, params: tuple, all_rows: bool = False):
        """A query on the committed state; None if it cannot be read (logged once). A
        damaged file is rebuilt at the next commit."""
        if self._db is None:
            return None
        try:
            cursor = self._db.execute(sql, params)
            return cursor.fetchall() if all_rows else cursor.fetchone()
        except _DB_ERRORS as exc:
            if not _environmental(exc):
                self._damaged = str(exc)
                self._touch()
            if not self._read_error_logged:
                log.error("local state %s: cannot read (%s)", self.path, exc)
                self._read_error_logged = True
            return None

    def _drop_held(self) -> None:
        """The disk refuses writes and too many answered CALLs wait in memory: forget
        the oldest (their replay's answer will be passed on as not answered locally)."""
        mem, order = self._answered, self._held_order
        while order:
            key = order.popleft()
            if mem.get(key) is not None:
                break
        else:
            return
        mem[key] = None  # and any committed row of that CALL goes too
        self._held -= 1
        self._answered_n -= 1
        self.answered_dropped += 1
        if self.answered_dropped in (1, 10, 100) or self.answered_dropped % 1000 == 0:
            log.warning("local state %s: the disk refuses writes; %d locally answered "
                        "CALL(s) forgotten so far to bound memory", self.path,
                        self.answered_dropped)

    # -- durability ---------------------------------------------------------------------------

    def _touch(self) -> None:
        if not self.dirty:
            self.dirty = True
            self.on_dirty()

    def commit(self) -> bool:
        """Write every change since the last good commit and commit (one fsync): durable
        against ``kill -9`` and power loss. False (logged once per episode) if the disk
        refuses; memory keeps the state and the next commit writes it again. A file found
        damaged meanwhile is moved aside and rebuilt from memory."""
        if not self.dirty:
            return True
        if self._damaged is not None or self._db is None:
            return self._rebuild(self._damaged or "it could not be created again")
        db = self._db
        try:
            if self._failing:
                # Reclaim the log's space first: after ENOSPC, often all the room there is.
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            db.execute("BEGIN")
            self._write(db)
            db.execute("COMMIT")
        except _DB_ERRORS as exc:
            self._rollback()
            if not _environmental(exc):  # SQLITE_CORRUPT...: the file, not the disk
                return self._rebuild(str(exc))
            self._write_failed(exc)
            return False
        except Exception:  # a value SQLite cannot take: never leave the transaction open
            self._rollback()
            self.write_errors += 1
            log.exception("local state %s: a commit failed; the state is kept in memory",
                          self.path)
            return False
        self._committed()
        return True

    def _write(self, db: sqlite3.Connection) -> None:
        """Every change since the last good commit, into the open transaction."""
        if self._dirty_auth:
            auth = self._auth
            db.executemany(
                "INSERT OR REPLACE INTO auth (id_key, status, expires, parent, "
                "parent_type, learnt) VALUES (?,?,?,?,?,?)",
                [(k, a.status, a.expires, a.parent, a.parent_type, learnt)
                 for k, learnt in self._dirty_auth.items() for a in (auth[k],)])
        if self._dirty_boot:
            db.executemany("INSERT OR REPLACE INTO boot (cid, interval) VALUES (?,?)",
                           [(cid, self._boot[cid]) for cid in self._dirty_boot])
        if self._dirty_tx:
            tx = self._tx
            db.executemany("DELETE FROM tx WHERE local_id = ?",
                           [(k,) for k in self._dirty_tx if k not in tx])
            db.executemany(
                "INSERT OR REPLACE INTO tx (local_id, cid, backend_id, created) "
                "VALUES (?,?,?,?)", [(k, *tx[k]) for k in self._dirty_tx if k in tx])
        if self._dirty_next:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('next_tx', ?)",
                       (self._next_tx,))
        if self._answered:
            mem = self._answered
            db.executemany("DELETE FROM answered WHERE cid = ? AND unique_id = ?",
                           [k for k, row in mem.items() if row is None])
            db.executemany(
                "INSERT OR REPLACE INTO answered (cid, unique_id, action, request, "
                "answer, created) VALUES (?,?,?,?,?,?)",
                [(*k, *row) for k, row in mem.items() if row is not None])

    def _committed(self) -> None:
        self.commits += 1
        if self._failing:
            log.warning("local state %s: the disk takes writes again; the offline state "
                        "held in memory is stored now", self.path)
            self._failing = False
        self._dirty_auth.clear()
        self._dirty_boot.clear()
        self._dirty_tx.clear()
        self._dirty_next = False
        self._answered.clear()
        self._held = 0
        self._held_order.clear()
        self._answered_db_n = self._answered_n
        self._stored_next = True
        self.dirty = False

    def _rollback(self) -> None:
        if self._db is not None and self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except _DB_ERRORS:
                pass

    def _write_failed(self, exc: Exception) -> None:
        self.write_errors += 1
        self._rollback()
        if not self._failing:
            self._failing = True
            log.error("local state %s: cannot write (%s); the offline state is kept in "
                      "memory and written when the disk takes it", self.path, exc)

    def _rebuild(self, problem: str) -> bool:
        """The file turned out damaged after it was opened: move it aside and write a
        new one from memory, which holds everything but the bodies of the answered
        CALLs; those are copied from the old file as far as it can be read."""
        if self._db is not None:
            try:
                self._db.close()
            except _DB_ERRORS:
                pass
            self._db = None
        expected = self._answered_n
        aside = self._move_aside()
        try:
            db = self._connect()
            self._load(db)  # a new file: the schema only; memory is left as it is
        except _OPEN_ERRORS as exc:
            self._damaged = None  # nothing to move aside any more: try creating again
            self._write_failed(exc)
            return False
        self._db = db
        self._damaged = None
        self._read_error_logged = False
        try:
            db.execute("BEGIN")
            learnt = self._copy_answered(aside, db)
            now = self._clock()
            self._dirty_auth = {k: learnt.get(k, now) for k in self._auth}
            self._dirty_boot = set(self._boot)
            self._dirty_tx = set(self._tx)
            self._dirty_next = True
            self._write(db)
            db.execute("COMMIT")
            self._answered_n = db.execute("SELECT count(*) FROM answered").fetchone()[0]
        except _DB_ERRORS as exc:
            self._write_failed(exc)  # the answered CALLs copied are lost with it
            return False
        lost = max(0, expected - self._answered_n)
        log.error("local state %s is damaged (%s): moved aside to %s and written again "
                  "from memory; cached authorizations, boot intervals and transaction id "
                  "mappings are kept, %d locally answered CALL(s) awaiting the backend's "
                  "answer could not be read back", self.path, problem, aside, lost)
        self._committed()
        return True

    def _copy_answered(self, aside: Path, db: sqlite3.Connection) -> dict[str, float]:
        """Copy the answered CALLs of a damaged file into ``db`` (streamed: they may be
        many), as far as they can be read; returns the learnt time of each cached id."""
        learnt: dict[str, float] = {}
        try:
            old = sqlite3.connect(f"file:{aside}?mode=ro", uri=True)
        except _DB_ERRORS:
            return learnt
        try:
            for key, when in old.execute("SELECT id_key, learnt FROM auth"):
                if isinstance(when, int | float):
                    learnt[key] = float(when)
        except _DB_ERRORS:
            pass
        mem, batch = self._answered, []
        insert = ("INSERT OR IGNORE INTO answered (cid, unique_id, action, request, "
                  "answer, created) VALUES (?,?,?,?,?,?)")
        try:
            for row in old.execute("SELECT cid, unique_id, action, request, answer, "
                                   "created FROM answered"):
                if (all(isinstance(v, str) for v in row[:5])
                        and isinstance(row[5], int | float) and row[:2] not in mem):
                    batch.append(row)
                    if len(batch) >= 1000:
                        db.executemany(insert, batch)
                        batch = []
        except _DB_ERRORS:
            pass
        finally:
            old.close()
        if batch:
            db.executemany(insert, batch)
        return learnt

    def close(self) -> None:
        """Commit what is pending and close (a failed commit is logged, not raised)."""
        if self._closed:
            return
        self.commit()
        self._closed = True
        if self._db is not None:
            try:
                self._db.close()
            except _DB_ERRORS as exc:
                log.error("local state %s: closing failed: %s", self.path, exc)
            self._db = None


def _folded(entries: Mapping[str, Authorization]) -> dict[str, Authorization]:
    return {key.casefold(): auth for key, auth in entries.items()}


def _salvage_counter(aside: Path) -> int | None:
    """The next transaction id a moved-aside state would have handed out, if readable."""
    if not aside.exists():
        return None
    try:
        db = sqlite3.connect(f"file:{aside}?mode=ro", uri=True)
    except _DB_ERRORS:
        return None
    found: list[int] = []
    for query in ("SELECT value FROM meta WHERE key = 'next_tx'",
                  "SELECT max(local_id) + 1 FROM tx"):
        try:
            row = db.execute(query).fetchone()
            if row is not None and type(row[0]) is int:
                found.append(row[0])
        except _DB_ERRORS:
            pass
    db.close()
    return max(found) if found else None


# -- the operator's authorization list -----------------------------------------------------

STATUSES = ("Accepted", "Blocked", "Expired", "Invalid", "ConcurrentTx",  # 1.6 and 2.x
            "NoCredit", "NotAllowedTypeEVSE", "NotAtThisLocation", "NotAtThisTime",
            "Unknown")  # 2.0.1 / 2.1 only
_STATUS = {s.lower(): s for s in STATUSES}
PLAIN_MAX = 20  # an OCPP 1.6 idTag is a CiString20
TYPE_MAX = 20  # an OCPP 2.x IdTokenType.type
TOKEN_MAX = 255  # an OCPP 2.1 idToken (2.0.1: 36)


def load_authorization_list(path: str | os.PathLike) -> dict[str, Authorization]:
    """Read the operator's authorization list (``ocpp.offline.authorization_list``).

    While the backend is away, an id on this list gets the status given here, whatever
    the authorization cache learnt from the backend. The file is UTF-8 text, one id per
    line::

        # comments start with '#' at the start of a line or after a blank
        04A2B31C                                  # an OCPP 1.6 idTag: Accepted, no expiry
        DEADBEEF   Blocked
        CAFE0001   Accepted  2026-12-31T23:59:59Z
        CAFE0002   2026-06-30T00:00:00+02:00     # the status may be left out before a date
        ISO14443:04A2B31C5D6E80                   # an OCPP 2.x token: <type>:<idToken>
        eMAID:DE-ABC-C12345678-X   Accepted

    * ``<id> [<status>] [<expiry>]``, separated by blanks. The id contains no blank.
    * ``<status>``: an OCPP AuthorizationStatus, any case: Accepted (the default),
      Blocked, Expired, Invalid, ConcurrentTx, and OCPP 2.x's NoCredit,
      NotAllowedTypeEVSE, NotAtThisLocation, NotAtThisTime, Unknown.
    * ``<expiry>``: an RFC 3339 date-time with its time zone (``Z`` or ``±hh:mm``). The
      entry expires then, as a cached one does.
    * An OCPP 1.6 idTag is written as the charge point sends it; it has at most 20
      characters. An OCPP 2.x token is written ``<type>:<idToken>`` (the type as in its
      IdTokenType, e.g. ISO14443, eMAID, Central, KeyCode, MacAddress), the form ids of
      2.x charge points are looked up in; type at most 20, idToken at most 255
      characters. The file does not know which version a line is for, so an id is
      accepted if it fits either: up to 20 characters as they are, longer ones only in
      the ``<type>:<idToken>`` form. Case does not matter (``tag1`` is ``TAG1``).
    * An entry has no parent (group) id.
    * An id listed twice (in any case), an unknown status, a date without a time zone, an
      id too long: :class:`~ocpp_edge.errors.ConfigError` naming the file and the line.
    """
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the authorization list: {exc}", path=name) from None
    out: dict[str, Authorization] = {}
    where: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        words = []
        for word in line.split():
            if word.startswith("#"):
                break
            words.append(word)
        if not words:
            continue

        def fail(message: str, number: int = number) -> ConfigError:
            return ConfigError(message, path=name, line=number)

        id_key, rest = words[0], words[1:]
        _check_id(id_key, fail)
        status = "Accepted"
        if rest and not rest[0][:1].isdigit():
            found = _STATUS.get(rest.pop(0).lower())
            if found is None:
                raise fail(f"unknown status {words[1]!r} for {id_key!r}; one of "
                           + ", ".join(STATUSES))
            status = found
        expires = None
        if rest:
            expires = _parse_expiry(rest.pop(0), fail)
        if rest:
            raise fail(f"unexpected {rest[0]!r} after the expiry; a line is "
                       "<id> [<status>] [<expiry>]")
        folded = id_key.casefold()
        if folded in where:
            raise fail(f"{id_key!r} is listed twice (also on line {where[folded]})")
        out[id_key] = Authorization(status, expires)
        where[folded] = number
    return out


def _check_id(id_key: str, fail: Callable[[str], ConfigError]) -> None:
    if not id_key.isprintable():
        raise fail(f"the id {id_key!r} contains a control character")
    if len(id_key) <= PLAIN_MAX:
        return
    kind, sep, token = id_key.partition(":")
    if not sep:
        raise fail(f"the id {id_key!r} has {len(id_key)} characters: an OCPP 1.6 idTag "
                   f"has at most {PLAIN_MAX}; write an OCPP 2.x token as <type>:<idToken>")
    if not kind or len(kind) > TYPE_MAX:
        raise fail(f"the token type of {id_key!r} must have 1 to {TYPE_MAX} characters")
    if not token or len(token) > TOKEN_MAX:
        raise fail(f"the idToken of {id_key!r} must have 1 to {TOKEN_MAX} characters")


def _parse_expiry(text: str, fail: Callable[[str], ConfigError]) -> float:
    try:
        when = datetime.fromisoformat(text.upper())
    except ValueError:
        raise fail(f"expiry {text!r} is not an RFC 3339 date-time, "
                   "e.g. 2026-12-31T23:59:59Z") from None
    if when.tzinfo is None:
        raise fail(f"expiry {text!r} needs a time and a time zone (Z or ±hh:mm), "
                   "e.g. 2026-12-31T23:59:59Z")
    return when.timestamp()
