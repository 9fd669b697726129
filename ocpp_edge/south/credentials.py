"""Charge point passwords (security profiles 1 and 2): the password file and its hashes.

Stdlib only and no sockets, so the gateway, the configuration check and ``ocpp-edge
passwd`` share one implementation, and tests need no network.

The file (``auth.password_file``, default ``/etc/ocpp-edge/passwords``)
----------------------------------------------------------------------------------

UTF-8 text, one entry per line::

    # comment lines and blank lines are kept as they are
    CP-0001:scrypt$ln=14,r=8,p=1$<salt>$<key>

* The charge point id comes first, exactly as the gateway sees it (percent-decoded from
  the URL), then ``:``, then the hash. Ids may contain ``:`` (the line is split on its
  LAST colon; hashes never contain one), but they follow the gateway's rules
  (``cid_problem``): 1 to 48 characters, no ``/``, ``+``, ``#`` or control character.
* A line is a comment when its first non-blank character is ``#`` (never part of an id).
* The hash is self-describing, in the style of the PHC string format:
  ``scrypt$ln=<log2 N>,r=<block size>,p=<parallelism>$<salt>$<derived key>``, salt (16
  bytes) and key (32 bytes) in standard base64 without padding. Plain-text passwords are
  refused when the file is read.
* The file must never be readable by everyone: new files are written 0640 (the service
  reads it through its group), rewritten files keep their owner and group and lose any
  permission for others. ``PasswordFile.warnings`` reports a file others can read.

Why scrypt with N=2^14, r=8, p=1
--------------------------------

A stolen copy of the file must not give the passwords back cheaply, so the hash is
salted and memory-hard (``hashlib.scrypt``, OpenSSL's). N=2^14, r=8 (16 MiB, the
parameters scrypt's author gives for interactive logins) took about 55 ms per hash on
the 2-vCPU x86-64 development machine (2^13: 25 ms, 2^15: 145 ms); a small ARM site
controller is several times slower. The gateway is a single-threaded event loop, so
every check stalls all charge points for that long: hence the success cache below, and
the per-address limit on failed attempts in the gateway. The keys OCPP charge points use
are random (16 to 20 bytes, OCPP 1.6 Security Whitepaper ed. 2, ``AuthorizationKey``;
16 to 40 characters, OCPP 2.0.1 ``BasicAuthPassword``), so a heavier setting would
protect little more.

Passwords are bytes
-------------------

An OCPP 1.6 ``AuthorizationKey`` is configured in hexadecimal, and a charge point may
send the bytes it represents, which need not be text (Security Whitepaper ed. 2; OCTT
test case TC_085_CS). The gateway therefore hands over the Basic password as received,
after base64 decoding (and decides which forms of it to try, ``auth``), and this module
compares those bytes: never decoded, normalised or stripped. ``ocpp-edge passwd
--generate`` stores the key's 40 hexadecimal digits.

Timing
------

Derived keys are compared with ``hmac.compare_digest``. A check for an unknown id costs
one hash against a dummy entry, so the response time does not tell which ids exist.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import hmac
import os
import re
import secrets
import stat
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from ocpp_edge.errors import OcppEdgeError

DEFAULT_PASSWORD_FILE = "/etc/ocpp-edge/passwords"
MAX_CID_LENGTH = 48
SCHEME = "scrypt"
DEFAULT_LN = 14  # N = 2**14
DEFAULT_R = 8
DEFAULT_P = 1
SALT_BYTES = 16
KEY_BYTES = 32
NEW_FILE_MODE = 0o640

# Parameters accepted when reading a hash: anything stronger than the defaults within
# reason, and weaker ones down to a floor, but nothing that would let a damaged or
# hostile entry make one check take seconds or gigabytes.
_LN_RANGE = range(10, 21)
_R_RANGE = range(1, 33)
_P_RANGE = range(1, 17)
_MAX_MEMORY = 256 * 1024 * 1024  # 128 * r * N bytes

_FORBIDDEN_IN_CID = re.compile(r"[/+#\x00-\x1f\x7f-\x9f]")  # C0 and C1 controls
_B64_RE = re.compile(r"[A-Za-z0-9+/]+")
_PARAMS_RE = re.compile(r"ln=(\d{1,2}),r=(\d{1,2}),p=(\d{1,2})")

# Keys the success cache; fresh in each process, so cached tags mean nothing elsewhere.
_CACHE_KEY = secrets.token_bytes(32)


class CredentialsError(OcppEdgeError):
    """The password file (or a hash, or an id given to it) is wrong.

    ``path`` and ``line`` point at the offending entry when there is one; ``str()`` is
    the whole sentence, ``path:line: reason``.
    """

    def __init__(self, reason: str, *, path: str | None = None,
                 line: int | None = None) -> None:
        self.reason = reason
        self.path = path
        self.line = line
        where = path if line is None else f"{path}:{line}"
        super().__init__(f"{where}: {reason}" if path else reason)


def cid_problem(cid: str | None) -> str | None:
    """Why ``cid`` (already percent-decoded) is not an acceptable charge point id, or None.

    The id becomes an MQTT topic level, so it must not contain the separator ``/`` nor
    the wildcards ``+`` and ``#`` (SPEC "Security": nothing a charge point sends may reach
    another charge point's topics); control characters have no place in an id, a log line
    or a file. 48 characters is the longest identity OCPP 2.0.1 allows a charging
    station (identifierString[48]).
    """
    if not cid:
        return "the charge point id (last path segment) is empty"
    if len(cid) > MAX_CID_LENGTH:
        return f"the charge point id is longer than {MAX_CID_LENGTH} characters"
    if _FORBIDDEN_IN_CID.search(cid):
        return "the charge point id contains '/', '+', '#' or a control character"
    return None


# --- hashes ---------------------------------------------------------------------------

def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _b64decode(text: str) -> bytes:
    if not _B64_RE.fullmatch(text):
        raise ValueError("not base64")
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


@dataclass(frozen=True)
class _Scrypt:
    ln: int
    r: int
    p: int
    salt: bytes
    key: bytes

    @classmethod
    def parse(cls, text: str) -> _Scrypt:
        """Read ``scrypt$ln=..,r=..,p=..$salt$key``; ValueError says what is wrong."""
        scheme, sep, rest = text.partition("$")
        if not sep:
            raise ValueError("the hash is not in the form scrypt$ln=..,r=..,p=..$salt$key "
                             "(plain-text passwords are not accepted: use ocpp-edge passwd)")
        if scheme != SCHEME:
            raise ValueError(f"unknown hash scheme {scheme!r} (only {SCHEME!r} is known)")
        parts = rest.split("$")
        if len(parts) != 3:
            raise ValueError("malformed scrypt hash: expected scrypt$ln=..,r=..,p=..$salt$key")
        m = _PARAMS_RE.fullmatch(parts[0])
        if not m:
            raise ValueError(f"malformed scrypt parameters {parts[0]!r} "
                             "(expected ln=<n>,r=<n>,p=<n>)")
        ln, r, p = (int(g) for g in m.groups())
        if ln not in _LN_RANGE or r not in _R_RANGE or p not in _P_RANGE \
                or 128 * r * (1 << ln) > _MAX_MEMORY:
            raise ValueError(f"scrypt parameters {parts[0]!r} out of range "
                             f"(ln {_LN_RANGE.start}-{_LN_RANGE.stop - 1}, "
                             f"r {_R_RANGE.start}-{_R_RANGE.stop - 1}, "
                             f"p {_P_RANGE.start}-{_P_RANGE.stop - 1}, at most 256 MiB)")
        try:
            salt, key = _b64decode(parts[1]), _b64decode(parts[2])
        except (ValueError, binascii.Error):
            raise ValueError("malformed scrypt hash: salt or key is not base64") from None
        if len(salt) < 8 or len(key) < 16:
            raise ValueError("malformed scrypt hash: salt or key too short")
        return cls(ln, r, p, salt, key)

    def derive(self, password: bytes) -> bytes:
        n = 1 << self.ln
        return hashlib.scrypt(password, salt=self.salt, n=n, r=self.r, p=self.p,
                              dklen=len(self.key), maxmem=129 * self.r * n + (1 << 20))

    def matches(self, password: bytes) -> bool:
        return hmac.compare_digest(self.derive(password), self.key)

    def format(self) -> str:
        return (f"{SCHEME}$ln={self.ln},r={self.r},p={self.p}"
                f"${_b64encode(self.salt)}${_b64encode(self.key)}")


def _need_bytes(password: object) -> bytes:
    if not isinstance(password, bytes | bytearray | memoryview):
        raise TypeError("passwords are bytes (exactly as the charge point sends them)")
    return bytes(password)


def hash_password(password: bytes, *, ln: int = DEFAULT_LN, r: int = DEFAULT_R,
                  p: int = DEFAULT_P) -> str:
    """The salted scrypt hash of ``password`` in the file's format."""
    password = _need_bytes(password)
    proto = _Scrypt(ln, r, p, secrets.token_bytes(SALT_BYTES), b"\0" * KEY_BYTES)
    _Scrypt.parse(proto.format())  # the same range checks as when reading
    entry = _Scrypt(ln, r, p, proto.salt, proto.derive(password))
    return entry.format()


def verify(hash: str, password: bytes) -> bool:
    """Whether ``password`` matches ``hash``; CredentialsError if ``hash`` is malformed."""
    password = _need_bytes(password)
    try:
        entry = _Scrypt.parse(hash)
    except ValueError as exc:
        raise CredentialsError(str(exc)) from None
    return entry.matches(password)


# --- the file -------------------------------------------------------------------------

@dataclass(frozen=True)
class _Line:
    raw: bytes              # as in the file, line ending included
    number: int
    cid: str | None = None  # None: comment or blank line
    hash: str | None = None


def _parse(data: bytes, path: str) -> list[_Line]:
    """Every line of the file; CredentialsError (path:line) on the first bad one."""
    lines: list[_Line] = []
    first_line: dict[str, int] = {}
    for number, raw in enumerate(data.splitlines(keepends=True), start=1):
        try:
            text = raw.rstrip(b"\r\n").decode("utf-8")
        except UnicodeDecodeError:
            raise CredentialsError("not UTF-8 text", path=path, line=number) from None
        if not text.strip() or text.lstrip().startswith("#"):
            lines.append(_Line(raw, number))
            continue
        cid, sep, hash_text = text.rpartition(":")
        if not sep:
            raise CredentialsError("expected <charge point id>:<hash>", path=path,
                                   line=number)
        problem = cid_problem(cid)
        if problem:
            raise CredentialsError(problem.replace(" (last path segment)", ""), path=path,
                                   line=number)
        if cid in first_line:
            raise CredentialsError(f"second entry for {cid!r} (the first is on line "
                                   f"{first_line[cid]})", path=path, line=number)
        try:
            _Scrypt.parse(hash_text.strip())
        except ValueError as exc:
            raise CredentialsError(str(exc), path=path, line=number) from None
        first_line[cid] = number
        lines.append(_Line(raw, number, cid, hash_text.strip()))
    return lines


class PasswordFile:
    """The charge point passwords, read once; ``check`` is what the gateway calls.

    To reload (SIGHUP), ``load`` a new object and replace the old one: a file that fails
    to load leaves the running object untouched, and the new object starts with an empty
    success cache, so a changed or removed password takes effect at once.

    The success cache: the daemon is single-threaded and one scrypt check costs tens of
    milliseconds (module docstring), during which no charge point is served. Charge
    points reconnect often (network drops, reboots, a gateway restart brings all of them
    back at once), so a correct password is remembered per id as HMAC-SHA256 under a
    random per-process key: not the password, and useless outside this process. Only
    successes are cached and only one tag per id is kept, so the cache holds at most one
    small entry per charge point in the file and wrong guesses never grow it.
    """

    def __init__(self, entries: dict[str, str] | None = None, *,
                 path: str | None = None) -> None:
        self.path = path
        self.warnings: list[str] = []
        self._entries: dict[str, _Scrypt] = {}
        for cid, hash_text in (entries or {}).items():
            problem = cid_problem(cid)
            if problem:
                raise CredentialsError(f"{cid!r}: {problem}", path=path)
            try:
                self._entries[cid] = _Scrypt.parse(hash_text)
            except ValueError as exc:
                raise CredentialsError(f"{cid!r}: {exc}", path=path) from None
        self._ok: dict[str, bytes] = {}
        # An unknown id is checked against this, with the parameters most entries use,
        # so that it costs what a known id costs.
        common = Counter((e.ln, e.r, e.p) for e in self._entries.values()).most_common(1)
        ln, r, p = common[0][0] if common else (DEFAULT_LN, DEFAULT_R, DEFAULT_P)
        self._dummy = _Scrypt(ln, r, p, secrets.token_bytes(SALT_BYTES),
                              secrets.token_bytes(KEY_BYTES))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PasswordFile:
        """Read ``path``.

        A missing file raises ``FileNotFoundError`` unchanged, so the caller can tell it
        from a broken one (e.g. no password has been set yet); any other problem raises
        ``CredentialsError`` naming the file, and the line where there is one.
        """
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise CredentialsError(f"cannot read: {exc.strerror or exc}", path=path) from None
        entries = {line.cid: line.hash for line in _parse(data, path)
                   if line.cid is not None and line.hash is not None}
        self = cls(entries, path=path)
        if st.st_mode & stat.S_IROTH:
            self.warnings.append(f"{path} is readable by every user (mode "
                                 f"{stat.S_IMODE(st.st_mode):04o}): chmod o-rwx {path}")
        return self

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, cid: object) -> bool:
        return cid in self._entries

    def known(self, cid: str) -> bool:
        """Whether ``cid`` has an entry (for ``auth.known_ids_only``)."""
        return cid in self._entries

    def ids(self) -> list[str]:
        return list(self._entries)

    def check(self, cid: str, password: bytes) -> bool:
        """Whether ``password`` (the bytes received) is the password of ``cid``."""
        password = _need_bytes(password)
        tag = hmac.new(_CACHE_KEY, password, hashlib.sha256).digest()
        cached = self._ok.get(cid)
        if cached is not None and hmac.compare_digest(cached, tag):
            return True
        entry = self._entries.get(cid)
        if entry is None:
            self._dummy.matches(password)  # the same cost as a known id: no id oracle
            return False
        if not entry.matches(password):
            return False
        self._ok[cid] = tag
        return True


# --- editing the file -----------------------------------------------------------------

def set_entry(path: str | os.PathLike[str], cid: str, password: bytes) -> bool:
    """Add or replace the entry of ``cid``; True if it replaced one.

    Other lines, comments included, are kept byte for byte and in place; a new entry is
    appended. The file is replaced atomically (``atomic_write``), so the gateway reading
    it on a reload sees the old file or the new one, never half of one.
    """
    problem = cid_problem(cid)
    if problem:
        raise CredentialsError(problem.replace(" (last path segment)", ""))
    password = _need_bytes(password)
    if not password:
        raise CredentialsError("the password is empty")
    new = f"{cid}:{hash_password(password)}\n".encode()

    def change(lines: list[_Line]) -> tuple[list[bytes], bool]:
        out = [line.raw for line in lines]
        for i, line in enumerate(lines):
            if line.cid == cid:
                ending = line.raw[len(line.raw.rstrip(b"\r\n")):] or b"\n"
                out[i] = new.rstrip(b"\n") + ending
                return out, True
        if out and not out[-1].endswith((b"\n", b"\r")):
            out[-1] += b"\n"
        return out + [new], False

    return _edit(os.fspath(path), change, create=True)


def remove_entry(path: str | os.PathLike[str], cid: str) -> bool:
    """Remove the entry of ``cid``; False if there was none (the file is then untouched)."""

    def change(lines: list[_Line]) -> tuple[list[bytes], bool]:
        kept = [line.raw for line in lines if line.cid != cid]
        return kept, len(kept) != len(lines)

    return _edit(os.fspath(path), change, create=False)


def _edit(path: str, change, *, create: bool) -> bool:
    path = os.path.realpath(path)  # edit the file a symbolic link points to, keep the link
    directory = os.path.dirname(path)
    with _locked(directory):
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            if not create:
                return False
            st, data = None, b""
        except OSError as exc:
            raise CredentialsError(f"cannot read: {exc.strerror or exc}", path=path) from None
        lines, changed = change(_parse(data, path))
        if not changed and st is not None and not create:
            return False
        if st is None:
            atomic_write(path, b"".join(lines), mode=NEW_FILE_MODE,
                         gid=_directory_gid(directory))
        else:
            # Keep owner, group and mode, minus any permission for others.
            atomic_write(path, b"".join(lines), mode=stat.S_IMODE(st.st_mode) & 0o770,
                         uid=st.st_uid, gid=st.st_gid)
        return changed


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[None]:
    """Serialise concurrent edits (two ``ocpp-edge passwd`` at once would lose one).

    The lock is on the directory, not the file, because the file is replaced by rename.
    """
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        raise CredentialsError("no such directory", path=directory) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _directory_gid(directory: str) -> int | None:
    """The group a new private file gets: its directory's, when running as root.

    The service runs as its own user and group and reads its secrets through the group;
    the package creates the configuration directories with that group. A non-root user
    cannot give files away, so the file keeps the user's group then.
    """
    if os.geteuid() != 0:
        return None
    return os.stat(directory).st_gid


def atomic_write(path: str, data: bytes, *, mode: int, uid: int | None = None,
                 gid: int | None = None) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file only.

    The temporary file is created in the same directory (rename is atomic only within a
    file system) with no permission beyond the owner's until ``mode``, owner and group
    are set, then written, fsynced, renamed over ``path``, and the directory is fsynced
    so the rename survives a power cut. Ownership changes that are not allowed raise
    ``CredentialsError`` rather than leaving a file the service cannot read.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                               suffix=".tmp")
    try:
        try:
            if uid is not None or gid is not None:
                st = os.fstat(fd)
                want_uid = st.st_uid if uid is None or os.geteuid() != 0 else uid
                want_gid = st.st_gid if gid is None else gid
                if (want_uid, want_gid) != (st.st_uid, st.st_gid):
                    os.fchown(fd, want_uid, want_gid)
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except PermissionError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise CredentialsError(f"cannot keep the owner/group of the file or write it "
                               f"({exc.strerror}); run as root", path=path) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
