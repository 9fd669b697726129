"""Who may open a charge point connection: the HTTP part of OCPP security profiles 1–3.

Sans-I/O: the listener hands over what the handshake carried (id, ``Authorization``
header, the verified client certificate, the peer's address) and the time; the answer is
:class:`Accepted` or a :class:`Refusal` with the HTTP status to send before any upgrade.

The order of the checks, and why:

0. A verified client certificate (profile 3) that names this id is accepted at once,
   before the two checks below: the site CA vouching for the id makes it known, and a
   certificate cannot be guessed and costs no password hash, so failures of other
   chargers behind the same address (a site router doing NAT) must not lock it out.
1. An address with ``auth.max_failures`` failed attempts within ``auth.failure_window``
   gets 429 without any further work: guessing is slowed down and no slow hash is
   computed for it (the daemon is single-threaded; every hash is loop time).
2. ``auth.known_ids_only``: an id without an entry in the password file gets 404
   (OCPP-J 1.6 §3.1.1 / 2.0.1 Part 4 §3.1.1: "the CSMS SHOULD respond with 404 when it
   does not recognise the identity"). Counted as a failure, so ids cannot be enumerated
   quickly.
3. A verified client certificate naming another charge point is 403, whatever else the
   request carries (a password included).
4. HTTP Basic (profiles 1 and 2, OCPP 1.6 Security Whitepaper §2.3 / 2.0.1 Part 2
   A00.FR.2xx): the user name must equal the id and the password must match the entry in
   the password file; otherwise 401 with ``WWW-Authenticate``.
5. Nothing presented: accepted only where anonymous charge points are allowed
   (``auth.allow_anonymous`` or the listener's own ``allow_anonymous``) and only for an
   id with no password on record; otherwise 401.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Protocol

REALM = 'Basic realm="ocpp-edge", charset="UTF-8"'  # RFC 7617 §2, §2.1
MAX_TRACKED_ADDRESSES = 10000  # failure history kept for at most this many addresses


def peer_names(cert: dict, field: str) -> list[str]:
    """The names of ``field`` ("cn" or "dns") in a verified peer certificate, as
    ``SSLSocket.getpeercert()`` returns it."""
    if field == "cn":
        return [value for rdn in cert.get("subject", ()) for key, value in rdn
                if key == "commonName"]
    return [value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]


def peer_identity_problem(cert: dict | None, cid: str, field: str) -> str | None:
    """Why a verified client certificate does not prove the identity ``cid``, or None.

    The certificate of one charge point must not open the connection of another
    (OCPP 2.0.1 Part 2 A00.FR.417 puts the identity in the CN). With ``cn`` the
    subject must hold exactly one commonName and it must equal ``cid``, exactly (the id
    is also the MQTT topic level); with ``dns`` one of the subjectAltName DNS names must
    equal it, ignoring ASCII letter case (below).
    """
    if not cert:
        return "no verified client certificate"
    names = peer_names(cert, field)
    if field == "cn":
        if len(names) != 1:
            return f"the certificate has {len(names)} commonName values, not one"
        if names[0] != cid:
            return f"the certificate is for {names[0]!r}, not {cid!r}"
        return None
    # DNS names compare case-insensitively, ASCII letters only (RFC 4343 §3, RFC 6125
    # §6.4.1), and CAs store them in lower case (`ocpp-edge cert issue` does, as X.509
    # tools commonly do): an exact match refused charge point "CP-D" its own certificate
    # for "cp-d" (found by tests/test_security.py). Non-ASCII ids never match: str.lower()
    # would map e.g. U+212A KELVIN SIGN to an ASCII "k".
    if cid.isascii() and cid.lower() in {n.lower() for n in names if n.isascii()}:
        return None
    return f"no subjectAltName DNS name of the certificate is {cid!r}"


class Credentials(Protocol):
    def known(self, cid: str) -> bool: ...
    def check(self, cid: str, password: bytes) -> bool: ...


@dataclass(frozen=True)
class Accepted:
    method: str                 # "certificate" | "password" | "anonymous"


@dataclass(frozen=True)
class Refusal:
    status: int                 # HTTP status sent instead of 101
    reason: str                 # the HTTP reason phrase
    why: str                    # for the log (never a password)
    headers: tuple[tuple[str, str], ...] = ()


def _unauthorized(why: str) -> Refusal:
    return Refusal(401, "Unauthorized", why, (("WWW-Authenticate", REALM),))


class FailureLimiter:
    """Failed attempts per source address in a sliding window, bounded in memory."""

    def __init__(self, max_failures: int, window: float) -> None:
        self.max_failures = max_failures
        self.window = window
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, address: str, now: float) -> deque[float] | None:
        times = self._failures.get(address)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[address]
            return None
        return times

    def retry_after(self, address: str, now: float) -> float | None:
        """Seconds until ``address`` may try again, or None when it may now."""
        times = self._recent(address, now)
        if times is None or len(times) < self.max_failures:
            return None
        return times[0] + self.window - now

    def failed(self, address: str, now: float) -> None:
        times = self._recent(address, now)
        if times is None:
            times = self._failures[address] = deque()
            if len(self._failures) > MAX_TRACKED_ADDRESSES:
                self._failures.popitem(last=False)  # the longest-untouched address
        else:
            self._failures.move_to_end(address)
        times.append(now)
        # Trimmed here rather than by deque(maxlen=...): a reload may raise max_failures,
        # and a history capped at the old value could then never reach the new one.
        while len(times) > self.max_failures:
            times.popleft()


def basic_password(authorization: str, cid: str) -> bytes | str:
    """The password of a Basic ``Authorization`` header for user ``cid``, as bytes;
    a str says why there is none.

    The decoded credentials must start with ``<cid>:``; everything after that colon is
    the password, byte for byte (OCPP 1.6 keys may be raw 20-byte values, so nothing is
    decoded as text). Matching the known id as a prefix, instead of splitting at the first
    colon, also serves ids that contain a colon.
    """
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return f"the Authorization scheme is {scheme[:20]!r}, not Basic"
    try:
        raw = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return "the Basic credentials are not valid base64"
    prefix = cid.encode() + b":"
    if not raw.startswith(prefix):
        return "the user name is not the charge point id"
    return raw[len(prefix):]


def password_candidates(password: bytes) -> list[bytes]:
    """What to check for a received password. A 1.6 charge point given a 20-byte
    AuthorizationKey as 40 hex digits may send those digits (the usual reading) or the 20
    raw bytes (a known firmware quirk); a raw 20-byte value is also tried as hex."""
    candidates = [password]
    if len(password) == 20 and not password.isascii():
        candidates += [password.hex().encode(), password.hex().upper().encode()]
    return candidates


class Authenticator:
    def __init__(self, credentials: Credentials, *, known_ids_only: bool, max_failures: int,
                 failure_window: float) -> None:
        self.credentials = credentials
        self.known_ids_only = known_ids_only
        self.limiter = FailureLimiter(max_failures, failure_window)

    def decide(self, *, cid: str, address: str, now: float, authorization: str | None,
               peer_cert: dict | None, peer_cert_id: str, allow_anonymous: bool
               ) -> Accepted | Refusal:
        if peer_cert and peer_identity_problem(peer_cert, cid, peer_cert_id) is None:
            # Profile 3 (OCPP 1.6 Security Whitepaper ed. 2 §2.3, 2.0.1 Part 2 A00): the
            # TLS handshake has authenticated this id. Neither the per-address failure
            # limit (it slows down guessing; nothing to guess here) nor known_ids_only
            # (the site CA issued a certificate for this id) applies. Found by
            # tests/test_security.py: one charger with a wrong password behind a site's
            # NAT router locked out every certificate-holding charger behind it.
            return Accepted("certificate")
        wait = self.limiter.retry_after(address, now)
        if wait is not None:
            return Refusal(429, "Too Many Requests",
                           f"too many failed attempts from {address}; next try in "
                           f"{math.ceil(wait)} s", (("Retry-After", str(math.ceil(wait))),))
        refusal = self._check(cid, authorization, peer_cert, peer_cert_id, allow_anonymous)
        if isinstance(refusal, Refusal):
            self.limiter.failed(address, now)
        return refusal

    def _check(self, cid: str, authorization: str | None, peer_cert: dict | None,
               peer_cert_id: str, allow_anonymous: bool) -> Accepted | Refusal:
        if self.known_ids_only and not self.credentials.known(cid):
            return Refusal(404, "Not Found", "unknown charge point id "
                           "(auth.known_ids_only = true)")
        if peer_cert:
            problem = peer_identity_problem(peer_cert, cid, peer_cert_id)
            if problem:
                return Refusal(403, "Forbidden", f"client certificate: {problem}")
            return Accepted("certificate")
        if authorization is not None:
            password = basic_password(authorization, cid)
            if isinstance(password, str):
                return _unauthorized(password)
            if any(self.credentials.check(cid, p) for p in password_candidates(password)):
                return Accepted("password")
            return _unauthorized("wrong password or no password on record for this id")
        if allow_anonymous:
            # An id with a password on record must present it, even here: otherwise
            # anybody reaching an anonymous listener could take its place (a second
            # connection replaces the first, SPEC "Connection").
            if self.credentials.known(cid):
                return _unauthorized("this id has a password on record and presented none")
            return Accepted("anonymous")
        return _unauthorized("no credentials (anonymous charge points are not allowed)")
