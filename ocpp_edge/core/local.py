"""Local answers: what the gateway tells a charge point itself while the backend is away.

The job (issue 15): under ``ocpp.upstream_down_policy = local`` a CALL from a charge point
is still stored and forwarded, but while the central system cannot be reached it is
answered at once, here, from what the gateway learnt from the backend's own earlier
answers (``learned_*``), so that the charge point keeps charging instead of seeing
CALLERRORs (which make it retry transaction messages: OCPP 1.6 §4.8, 2.0.1 E13). When
the backend later answers the replayed CALL, ``disagreement`` says whether it told the
charge point something else, and the ``*_transaction_id`` helpers rewrite 1.6 local
transaction ids to the backend's and back.

Contract: pure functions; no I/O, no clock (``now`` is passed in, epoch seconds), no
state but what ``Knowledge`` (the on-disk store) returns. They never raise on any
payload: a missing or garbage field gives a defined answer (``local_answer``: an answer
valid against the response schema, or a CALLERROR); should anything still go wrong,
including the Knowledge object raising, ``local_answer`` returns an ``InternalError``
CALLERROR whose description starts with "local answer failed". Imports: the standard
library and ``ocpp_edge.core.ocppj`` only (sans-I/O core).

What each action gets is the table ``ANSWERS[version][action]`` (text for the README);
any other action: ``ANSWER_OTHERWISE``. The table makes this module a little longer than
the code alone.

Authorization expiry, the one place where the versions differ:

- 1.6 ``idTagInfo.expiryDate`` is the tag's own expiry: an Accepted entry past it is
  answered ``Expired`` (1.6 §3.5.1: "When the validity of an Authorization Cache entry
  expires, it SHALL be changed to expired"), whatever ``unknown_id`` says: a known id
  that is not Accepted is never an unknown one (1.6 §3.5.4).
- 2.x ``idTokenInfo.cacheExpiryDateTime`` bounds how long the cached answer may be used
  (its name; 2.0.1 C10): past it, an Accepted entry is answered as an unknown id
  (``unknown_id``), since the gateway no longer holds a decision; accepting strangers but
  refusing a driver whose cache entry merely aged would be absurd. The schema's wording
  ("after which the token must be considered invalid") would also allow ``Expired``; with
  the default ``unknown_id = reject`` both refuse (``Unknown``), the choice only matters
  with ``accept``. A refusal (Blocked, Invalid, ...) is never turned into acceptance by
  the clock: it stays what the backend said.

A cached status the version does not have (an operator list typo, a 2.x word for 1.6) is
answered ``Invalid``. IdTokens are case insensitive in both specs; keys here are exact
(``id_key``), folding case is the store's choice.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Protocol

from ocpp_edge.core.ocppj.errors import InternalError, OcppError
from ocpp_edge.core.ocppj.messages import Version

V16, V201, V21 = Version.V16, Version.V201, Version.V21


@dataclass(frozen=True, slots=True)
class Authorization:
    status: str                     # 1.6 AuthorizationStatus; 2.x AuthorizationStatusEnumType
    expires: float | None = None    # epoch s: 1.6 idTagInfo.expiryDate; 2.x cacheExpiryDateTime
    parent: str | None = None       # 1.6 parentIdTag; 2.x groupIdToken.idToken
    parent_type: str | None = None  # 2.x groupIdToken.type (added; "Central" when unknown)


class Knowledge(Protocol):
    def authorization(self, id_key: str) -> Authorization | None: ...
    def boot_interval(self, cid: str) -> int | None: ...
    def new_transaction_id(self, cid: str) -> int: ...


@dataclass(frozen=True, slots=True)
class LocalOptions:
    unknown_id: str = "reject"      # "reject" | "accept" (anything else: reject)
    pending_interval: int = 60      # BootNotification Pending: retry after this many s
    data_transfer: str = "reject"   # "reject" | "accept" (anything else: reject)


@dataclass(frozen=True, slots=True)
class LocalAnswer:
    payload: dict | None
    error: OcppError | None = None
    transaction_id: int | None = None
    id_key: str | None = None


# -- the table ---------------------------------------------------------------------------

_ACK_16 = ("DiagnosticsStatusNotification", "FirmwareStatusNotification", "LogStatusNotification",
           "MeterValues", "SecurityEventNotification", "SignedFirmwareStatusNotification",
           "StatusNotification")
_ACK_2X = ("ClearedChargingLimit", "FirmwareStatusNotification", "LogStatusNotification",
           "MeterValues", "NotifyChargingLimit", "NotifyCustomerInformation",
           "NotifyDisplayMessages", "NotifyEvent", "NotifyMonitoringReport", "NotifyReport",
           "PublishFirmwareStatusNotification", "ReportChargingProfiles",
           "ReservationStatusUpdate", "SecurityEventNotification", "StatusNotification")
_ACK_21 = ("BatterySwap", "ClosePeriodicEventStream", "NotifyDERAlarm", "NotifyDERStartStop",
           "NotifyPriorityCharging", "NotifySettlement", "ReportDERControl")
_COMMON = {"BootNotification": "boot", "Heartbeat": "heartbeat",
           "DataTransfer": "data_transfer", "SignCertificate": "rejected"}
_KINDS: dict[str, dict[str, str]] = {
    V16: {**_COMMON, **dict.fromkeys(_ACK_16, "ack"), "Authorize": "authorize16",
          "StartTransaction": "start16", "StopTransaction": "stop16"},
    V201: {**_COMMON, **dict.fromkeys(_ACK_2X, "ack"), "Authorize": "authorize2x",
           "TransactionEvent": "transaction_event", "Get15118EVCertificate": "failed_exi",
           "GetCertificateStatus": "failed", "NotifyEVChargingNeeds": "rejected",
           "NotifyEVChargingSchedule": "rejected"},
}
_KINDS[V21] = {**_KINDS[V201], **dict.fromkeys(_ACK_21, "ack"),
               "GetCertificateChainStatus": "failed_chain", "OpenPeriodicEventStream": "rejected",
               "PullDynamicScheduleUpdate": "rejected", "VatNumberValidation": "error",
               "NotifyPeriodicEventStream": "send"}

_CACHE_16 = ("status from the authorization cache (learnt from the backend's answers, plus "
             "the operator list): an Accepted entry past its expiryDate is Expired; expiryDate "
             "and parentIdTag copied; an unknown id: Invalid, or Accepted with "
             "ocpp.offline.unknown_id = accept (1.6 §3.5.1, §3.5.4)")
_CACHE_2X = ("status from the authorization cache: an Accepted entry past its "
             "cacheExpiryDateTime counts as unknown; cacheExpiryDateTime and groupIdToken "
             "copied; an unknown id: Unknown, or Accepted with ocpp.offline.unknown_id = accept; "
             "an idToken of type NoAuthorization: Accepted (2.0.1 C10, C12, C15)")
_TEXT = {
    "boot": ("status Accepted with the interval of the backend's last Accepted answer to this "
             "charge point (remembered on disk), else Pending with "
             "ocpp.offline.boot_retry_interval; currentTime: the gateway's clock "
             "(1.6 §4.2; 2.0.1 B01, B02)"),
    "heartbeat": "currentTime: the gateway's clock (1.6 §4.6; 2.0.1 G02)",
    "ack": "the empty answer {}: a notification only needs acknowledging",
    "data_transfer": ("status Rejected, or Accepted with ocpp.offline.data_transfer = accept "
                      "(1.6 §4.3; 2.0.1 P02)"),
    "rejected": "status Rejected: only the backend can decide it",
    "failed": "status Failed: only the backend can check a certificate (2.0.1 M06)",
    "failed_exi": ("status Failed, exiResponse empty: only the backend can get an EV "
                   "certificate (2.0.1 M01, M02)"),
    "failed_chain": ("each requested certificate: status Failed, nextUpdate now "
                     "(a request that cannot be echoed: the CALLERROR below)"),
    "authorize16": "idTagInfo: " + _CACHE_16,
    "start16": ("idTagInfo as Authorize, and a fresh local transactionId from the store, also "
                "when the idTag is not Accepted (1.6 §4.8)"),
    "stop16": "{} ; with an idTag: idTagInfo as Authorize (1.6 §4.10)",
    "authorize2x": "idTokenInfo: " + _CACHE_2X,
    "transaction_event": "{} ; with an idToken: idTokenInfo as Authorize (2.0.1 E01-E07, E05)",
    "error": "CALLERROR InternalError: the answer's content is the backend's alone",
    "send": "a SEND: never answered (sent as a CALL: the CALLERROR below)",
}
ANSWERS: dict[str, dict[str, str]] = {
    version: {action: _TEXT[kind] for action, kind in sorted(kinds.items())}
    for version, kinds in _KINDS.items()}
ANSWER_OTHERWISE = ("any other action (one a central system sends, a vendor's, an unknown "
                    "one): CALLERROR InternalError 'the central system is unreachable' "
                    "(OCPP-J 1.6 §4.2.3, 2.0.1 Part 4 §4.3: the receiver could not process "
                    "it; the CALL is still stored and forwarded)")

_STATUS_16 = frozenset({"Accepted", "Blocked", "Expired", "Invalid", "ConcurrentTx"})
_STATUS_2X = _STATUS_16 | {"NoCredit", "NotAllowedTypeEVSE", "NotAtThisLocation",
                           "NotAtThisTime", "Unknown"}
_TOKEN_TYPES_201 = frozenset({"Central", "eMAID", "ISO14443", "ISO15693", "KeyCode", "Local",
                              "MacAddress", "NoAuthorization"})
_ID_ACTIONS_16 = frozenset({"Authorize", "StartTransaction", "StopTransaction"})
_UPSTREAM_TX = {"MeterValues": ("transactionId",), "StopTransaction": ("transactionId",)}
# 1.6 CSMS→CP schemas carrying a transactionId (RemoteStartTransaction's TxProfile should
# not have one, 1.6 §5.11, but if it does it is the backend's id).
_DOWNSTREAM_TX = {"RemoteStopTransaction": ("transactionId",),
                  "SetChargingProfile": ("csChargingProfiles", "transactionId"),
                  "RemoteStartTransaction": ("chargingProfile", "transactionId")}
_TX_PATHS = {**_UPSTREAM_TX, **_DOWNSTREAM_TX}


# -- times -------------------------------------------------------------------------------

_RFC3339 = re.compile(r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(\.\d+)?"
                      r"([Zz]|[+-]\d\d:?\d\d)?", re.ASCII)


def parse_time(text: object) -> float | None:
    """RFC 3339 (``Z`` or an offset, any fraction) → epoch seconds; None if unparseable.
    A time without offset is read as UTC (1.6 recommends UTC everywhere)."""
    m = _RFC3339.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None:
        return None
    y, mo, d, h, mi, s = (int(g) for g in m.groups()[:6])
    frac, zone = m.group(7), m.group(8)
    try:
        tz = UTC
        if zone and zone not in ("Z", "z"):
            digits = zone[1:].replace(":", "")
            offset = timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
            tz = timezone(-offset if zone[0] == "-" else offset)
        # a leap second (:60) is read as :59 + its fraction
        return (datetime(y, mo, d, h, mi, min(s, 59), tzinfo=tz).timestamp()
                + (float(frac) if frac else 0.0))
    except (ValueError, OverflowError):
        return None


def _iso(epoch: object) -> str | None:
    try:
        dt = datetime.fromtimestamp(math.floor(epoch), UTC)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError, OSError):
        return None
    return (f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T"
            f"{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}Z")


def format_time(epoch: float) -> str:
    """Epoch seconds → RFC 3339 UTC, whole seconds ("2026-12-04T05:21:03Z": the form every
    charge point parses); an impossible time gives the epoch itself."""
    return _iso(epoch) or "1970-01-01T00:00:00Z"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: object) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


# -- ids and authorization ---------------------------------------------------------------

def id_key(version: str, action: str, payload: dict) -> str | None:
    """The id a request presents: 1.6 ``idTag`` (Authorize, StartTransaction,
    StopTransaction); 2.x ``"<type>:<idToken>"`` (Authorize, TransactionEvent)."""
    if not isinstance(payload, dict) or not isinstance(action, str):
        return None
    if version == V16:
        tag = payload.get("idTag") if action in _ID_ACTIONS_16 else None
        return tag if isinstance(tag, str) else None
    if version in (V201, V21) and action in ("Authorize", "TransactionEvent"):
        tok = payload.get("idToken")
        if isinstance(tok, dict) and isinstance(tok.get("type"), str) \
                and isinstance(tok.get("idToken"), str):
            return f'{tok["type"]}:{tok["idToken"]}'
    return None


def _group(version: str, parent: object, ptype: object) -> dict | None:
    if not isinstance(parent, str) or len(parent) > (36 if version == V201 else 255):
        return None
    ok = ptype in _TOKEN_TYPES_201 if version == V201 else \
        isinstance(ptype, str) and 0 < len(ptype) <= 20
    return {"idToken": parent, "type": ptype if ok else "Central"}


def _id_info(version: str, key: str | None, token_type: object, knowledge: Knowledge,
             now: float, options: LocalOptions) -> dict:
    """idTagInfo (1.6) / idTokenInfo (2.x) for ``key``, from the cache or the policy."""
    v16 = version == V16
    if key is None:
        return {"status": "Invalid"}  # no readable id: nothing to authorize
    auth = knowledge.authorization(key)
    status = getattr(auth, "status", None) if auth is not None else None
    if isinstance(status, str):
        if status not in (_STATUS_16 if v16 else _STATUS_2X):
            status = "Invalid"
        expires = _finite(getattr(auth, "expires", None))
        lapsed = expires is not None and expires <= now
        parent = getattr(auth, "parent", None)
        if v16:
            if lapsed and status == "Accepted":
                status = "Expired"  # OCPP 1.6 §3.5.1: an expired cache entry is Expired
            info = {"status": status}
            stamp = _iso(expires) if expires is not None else None
            if stamp:
                info["expiryDate"] = stamp
            if isinstance(parent, str) and len(parent) <= 20:
                info["parentIdTag"] = parent  # 1.6 §3.5.1: the cache holds the IdTagInfo
            return info
        if not (lapsed and status == "Accepted"):  # 2.0.1 C10: past it, the entry is void
            info = {"status": status}
            stamp = _iso(expires) if expires is not None and not lapsed else None
            if stamp:
                info["cacheExpiryDateTime"] = stamp
            group = _group(version, parent, getattr(auth, "parent_type", None))
            if group:
                info["groupIdToken"] = group  # 2.0.1 C09: group matching for stop
            return info
    # An unknown id. 2.x NoAuthorization: the station started without authorization
    # (free vend); refusing it would stop a running session (2.0.1 E05).
    if not v16 and token_type == "NoAuthorization":
        return {"status": "Accepted"}
    # OCPP 1.6 §3.5.4 / 2.0.1 C15: unknown ids may be accepted offline, by configuration.
    if options.unknown_id == "accept":
        return {"status": "Accepted"}
    return {"status": "Invalid" if v16 else "Unknown"}


def _chain_failed(payload: dict, now: float) -> dict | None:
    """2.1 GetCertificateChainStatus: each requested certificate Failed, or None."""
    requests = payload.get("certificateStatusRequests")
    if not isinstance(requests, list) or not 1 <= len(requests) <= 4:
        return None
    out = []
    for request in requests:
        hashes = request.get("certificateHashData") if isinstance(request, dict) else None
        if not isinstance(hashes, dict) or request.get("source") not in ("CRL", "OCSP") \
                or hashes.get("hashAlgorithm") not in ("SHA256", "SHA384", "SHA512"):
            return None
        data = {"hashAlgorithm": hashes["hashAlgorithm"]}
        for name, limit in (("issuerNameHash", 128), ("issuerKeyHash", 128),
                            ("serialNumber", 40)):
            value = hashes.get(name)
            if not isinstance(value, str) or len(value) > limit:
                return None
            data[name] = value
        out.append({"certificateHashData": data, "source": request["source"],
                    "status": "Failed", "nextUpdate": format_time(now)})
    return {"certificateStatus": out}


def _unreachable(action: object) -> InternalError:
    return InternalError(f"the central system is unreachable; only it can answer {action}")


# -- the answers -------------------------------------------------------------------------

def local_answer(version: str, action: str, payload: dict, cid: str, knowledge: Knowledge,
                 now: float, options: LocalOptions) -> LocalAnswer:
    """The answer to a charge point's CALL while the backend is away (see ``ANSWERS``)."""
    try:
        return _answer(version, action, payload if isinstance(payload, dict) else {}, cid,
                       knowledge, now, options)
    except Exception as exc:  # noqa: BLE001 - the contract: an answer, never an exception
        return LocalAnswer(None, InternalError(
            f"local answer failed ({type(exc).__name__}: {exc}); the central system is "
            "unreachable"))


def _answer(version: str, action: str, payload: dict, cid: str, knowledge: Knowledge,
            now: float, options: LocalOptions) -> LocalAnswer:
    kinds = _KINDS.get(version) if isinstance(version, str) else None
    kind = kinds.get(action) if kinds is not None and isinstance(action, str) else None
    key = id_key(version, action, payload)
    if kind == "ack":
        return LocalAnswer({})
    if kind == "heartbeat":
        return LocalAnswer({"currentTime": format_time(now)})  # 1.6 §4.6, 2.0.1 G02
    if kind == "boot":
        interval = knowledge.boot_interval(cid)
        if _is_int(interval) and interval >= 0:
            # The backend accepted this charge point before: it may carry on (2.0.1 B01).
            return LocalAnswer({"currentTime": format_time(now), "interval": interval,
                                "status": "Accepted"})
        # 1.6 §4.2, 2.0.1 B02: Pending; the interval is the wait before the next boot.
        pending = options.pending_interval
        return LocalAnswer({"currentTime": format_time(now), "status": "Pending",
                            "interval": pending if _is_int(pending) and pending >= 0 else 60})
    if kind == "data_transfer":  # 1.6 §4.3, 2.0.1 P02: the vendor's backend decides
        return LocalAnswer({"status": "Accepted" if options.data_transfer == "accept"
                            else "Rejected"})
    if kind == "rejected":
        return LocalAnswer({"status": "Rejected"})
    if kind == "failed":
        return LocalAnswer({"status": "Failed"})
    if kind == "failed_exi":
        return LocalAnswer({"status": "Failed", "exiResponse": ""})
    if kind == "failed_chain":
        chain = _chain_failed(payload, now)
        return LocalAnswer(chain) if chain is not None else LocalAnswer(None, _unreachable(action))
    if kind in ("authorize16", "authorize2x"):
        field = "idTagInfo" if kind == "authorize16" else "idTokenInfo"
        token = payload.get("idToken")
        token_type = token.get("type") if isinstance(token, dict) else None
        return LocalAnswer({field: _id_info(version, key, token_type, knowledge, now, options)},
                           id_key=key)
    if kind == "start16":
        # OCPP 1.6 §4.8: the answer "MUST include a transaction id and an authorization
        # status value": a transactionId also when the idTag is not Accepted.
        info = _id_info(version, key, None, knowledge, now, options)
        tx = knowledge.new_transaction_id(cid)
        if not _is_int(tx):
            return LocalAnswer(None, InternalError(
                "local answer failed (no local transaction id); the central system is "
                "unreachable"), id_key=key)
        return LocalAnswer({"idTagInfo": info, "transactionId": tx}, transaction_id=tx,
                           id_key=key)
    if kind == "stop16":  # 1.6 §4.10: idTagInfo only when the request has an idTag
        if key is None:
            return LocalAnswer({})
        return LocalAnswer({"idTagInfo": _id_info(version, key, None, knowledge, now, options)},
                           id_key=key)
    if kind == "transaction_event":
        token = payload.get("idToken")
        if key is None:  # no (readable) idToken: nothing to authorize
            return LocalAnswer({})
        return LocalAnswer({"idTokenInfo": _id_info(version, key, token.get("type"), knowledge,
                                                    now, options)}, id_key=key)
    # "error", "send", another direction's action, a vendor's, an unknown one, an unknown
    # version: only the backend can answer (OCPP-J InternalError: we could not process it).
    return LocalAnswer(None, _unreachable(action), id_key=key)


# -- what backend answers teach ----------------------------------------------------------

def learned_authorization(version: str, action: str, request: dict,
                          response: dict) -> tuple[str, Authorization] | None:
    """The cache entry a backend answer teaches (1.6 §3.5.1, 2.0.1 C10), or None."""
    key = id_key(version, action, request)
    if key is None or not isinstance(response, dict):
        return None
    v16 = version == V16
    info = response.get("idTagInfo" if v16 else "idTokenInfo")
    if not isinstance(info, dict) or not isinstance(info.get("status"), str):
        return None
    if v16:
        parent = info.get("parentIdTag")
        return key, Authorization(info["status"], parse_time(info.get("expiryDate")),
                                  parent if isinstance(parent, str) else None)
    group = info.get("groupIdToken")
    parent = group.get("idToken") if isinstance(group, dict) else None
    ptype = group.get("type") if isinstance(group, dict) else None
    return key, Authorization(info["status"], parse_time(info.get("cacheExpiryDateTime")),
                              parent if isinstance(parent, str) else None,
                              ptype if isinstance(ptype, str) else None)


def learned_boot_interval(action: str, response: dict) -> int | None:
    """BootNotification Accepted → its interval (to answer a reboot during an outage)."""
    if action != "BootNotification" or not isinstance(response, dict) \
            or response.get("status") != "Accepted":
        return None
    interval = response.get("interval")
    return interval if _is_int(interval) and interval >= 0 else None


def _status(part: object) -> str | None:
    status = part.get("status") if isinstance(part, dict) else None
    return status if isinstance(status, str) else None


def disagreement(version: str, action: str, local: dict, backend: dict) -> str | None:
    """One line when the backend's answer differs from the local one in what matters: the
    idTagInfo/idTokenInfo status, or the answer's own status (BootNotification, ...)."""
    if not isinstance(local, dict) or not isinstance(backend, dict):
        return None
    field, word = ("idTagInfo", "idTag") if version == V16 else ("idTokenInfo", "idToken")
    mine, theirs = _status(local.get(field)), _status(backend.get(field))
    if mine and theirs and mine != theirs:
        return f"{action}: {word} status {mine} locally, {theirs} by the backend"
    mine, theirs = _status(local), _status(backend)
    if mine and theirs and mine != theirs:
        return f"{action}: status {mine} locally, {theirs} by the backend"
    return None


# -- 1.6 transaction ids -----------------------------------------------------------------

def _tx_at(payload: object, path: tuple[str, ...] | None) -> int | None:
    node = payload
    for name in path or ():
        node = node.get(name) if isinstance(node, dict) else None
    return node if path and _is_int(node) else None


def upstream_transaction_id(version: str, action: str, payload: dict) -> int | None:
    """1.6 MeterValues / StopTransaction ``transactionId`` (an int, not a bool)."""
    if version != V16 or not isinstance(action, str):
        return None
    return _tx_at(payload, _UPSTREAM_TX.get(action))


def downstream_transaction_id(version: str, action: str, payload: dict) -> int | None:
    """1.6 RemoteStopTransaction.transactionId, SetChargingProfile.csChargingProfiles.
    transactionId, RemoteStartTransaction.chargingProfile.transactionId."""
    if version != V16 or not isinstance(action, str):
        return None
    return _tx_at(payload, _DOWNSTREAM_TX.get(action))


def response_transaction_id(version: str, action: str, response: dict) -> int | None:
    """(added) The transactionId of a 1.6 StartTransaction answer."""
    if version != V16 or action != "StartTransaction":
        return None
    return _tx_at(response, ("transactionId",))


def with_transaction_id(action: str, payload: dict, new_id: int) -> dict:
    """A copy of ``payload`` with the transactionId field of ``action`` (upstream or
    downstream, as above) set to ``new_id`` where present; the input is not modified (the
    dicts on the field's path are copied, the rest is shared). 1.6 only: those paths do
    not exist in 2.x payloads, which come back unchanged."""
    if not isinstance(payload, dict):
        return payload
    out = dict(payload)
    path = _TX_PATHS.get(action) if isinstance(action, str) else None
    node = out
    for name in (path or ())[:-1]:
        child = node.get(name)
        if not isinstance(child, dict):
            return out
        node[name] = dict(child)
        node = node[name]
    if path and path[-1] in node:
        node[path[-1]] = new_id
    return out
