"""Presence on MQTT: the gateway's retained status and charge point events.

Pure: payloads and topics from plain values; no I/O, no tornado, no paho (``ops/operations.py``
publishes them). Modelled on EMQX so that a backend written for EMQX can reuse its
handlers (EMQX 4 ``emqx_mod_presence``; EMQX 5 ``apps/emqx/src/emqx_sys.erl``,
``on_client_connected`` / ``on_client_disconnected``; for gateway clients EMQX 5 publishes
them on
``$SYS/brokers/${node}/gateway/ocpp/clients/${clientid}/connected|disconnected``).

Topics (``ocpp.mountpoint`` + template; ``off`` disables either):

* ``ocpp.upstream.status_topic`` (default ``sys/${node}/status``): retained. ``online``
  is published on every connection to the broker, before anything from the buffer; the
  will (published by the broker when the connection is lost without a DISCONNECT: the
  gateway was killed, crashed, or lost its network) and the message sent before a clean
  stop say ``offline``.
* ``ocpp.upstream.event_topic`` (default ``sys/${node}/clients/${cid}/${event}``):
  ``${event}`` is ``connected`` or ``disconnected``. Not retained. These go through the
  disk buffer with the OCPP messages, so they keep their place in the charge point's
  stream: ``connected`` is on the wire before the charge point's first message (its
  BootNotification), ``disconnected`` after its last one and after the CALLERRORs that
  answer the backend's calls the charge point can no longer answer; and an event that
  happens while the broker is away is delivered when it is back (``ts`` says when it
  happened).

``${node}`` is the gateway's MQTT client id (``mqtt.client_id``), as EMQX's ``${node}`` is
its node name: every gateway on a broker has its own status topic.

Differences from EMQX's payloads, all additions or spellings a JSON consumer copes with:
``username`` is ``null`` without HTTP Basic credentials (EMQX 4 wrote ``"undefined"``);
``proto_ver`` is the version from the subprotocol (``"1.6"``, ``"2.0.1"``, ``"2.1"``; EMQX
only speaks 1.6); extra keys ``node``, ``event``, ``peerport``, ``listener``,
``subprotocol``, ``auth`` and, when disconnected, ``close_code`` (the WebSocket close code,
when there was one) and ``description`` (the reason in words). ``reason`` uses EMQX's
words where EMQX has one (``kicked``, ``discarded``, ``keepalive_timeout``,
``sock_closed``) and these otherwise: ``shutdown``, ``upstream_down``,
``internal_error``, ``closed``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

# Declared with the other placeholders, where the configuration check can see them.
from ocpp_edge.core.router import EVENT_PLACEHOLDERS, STATUS_PLACEHOLDERS  # noqa: F401

CONNECTED = "connected"
DISCONNECTED = "disconnected"

ONLINE = "online"
OFFLINE = "offline"

# The reasons the gateway gives Session.close() / CloseConnection, in words, and the
# EMQX-style identifier each is reported as (events and the close-reason metric label).
KICKED = "kicked by the operator"
_REASONS = {
    KICKED: "kicked",  # EMQX: kick through the API or CLI
    "replaced by a new connection": "discarded",  # EMQX: session discarded by a new one
    "heartbeat timeout": "keepalive_timeout",  # EMQX's OCPP keepalive (heartbeats)
    "gateway shutting down": "shutdown",
    "upstream link down": "upstream_down",  # ocpp.upstream_down_policy = close_stations
    "internal error": "internal_error",
}
_CLOSED_BY_PEER = "connection closed"  # "connection closed, code 1000"


def reason_code(description: str) -> str:
    """The identifier for a close reason given in words."""
    if description.startswith(_CLOSED_BY_PEER):
        return "sock_closed"  # EMQX OCPP: {sock_closed, Reason}
    return _REASONS.get(description, "closed")


def proto_ver(subprotocol: str) -> str:
    """``ocpp1.6`` → ``1.6`` (EMQX's emqx_ocpp_connection: {<<"OCPP">>, <<"1.6">>})."""
    return subprotocol[4:] if subprotocol.lower().startswith("ocpp") else subprotocol


def millis(unix_time: float) -> int:
    return int(unix_time * 1000)


def encode(obj: Mapping) -> bytes:
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode()


def status_payload(status: str, *, node: str, version: str, started_at: str,
                   now: float | None, reason: str | None = None,
                   local_mode: bool | None = None) -> bytes:
    """The retained status. ``now`` None: a will, whose time is not known in advance.
    ``local_mode`` (ocpp.upstream_down_policy = local): whether the gateway answers the
    charge points itself because the backend is silent; republished when it changes."""
    obj: dict = {"status": status, "node": node, "version": version,
                 "started_at": started_at}
    if reason is not None:
        obj["reason"] = reason
    if local_mode is not None:
        obj["local_mode"] = local_mode
    if now is not None:
        obj["ts"] = millis(now)
    return encode(obj)


def client_info(*, cid: str, username: str | None, ip: str, peer_port: int | None,
                sock_port: int, subprotocol: str, listener: str, auth: str,
                connected_at: float, keepalive: float, node: str) -> dict:
    """The fields both events carry (EMQX's ``common_infos`` plus ours)."""
    return {
        "clientid": cid, "username": username, "ipaddress": ip, "sockport": sock_port,
        "protocol": "ocpp", "proto_name": "OCPP", "proto_ver": proto_ver(subprotocol),
        "connected_at": millis(connected_at),
        # ours
        "node": node, "peerport": peer_port, "listener": listener,
        "subprotocol": subprotocol, "auth": auth, "keepalive": int(keepalive),
    }


def connected_payload(info: Mapping, now: float) -> bytes:
    # EMQX's on_client_connected adds keepalive, clean_start and expiry_interval; an OCPP
    # connection has no session to resume.
    return encode({**info, "event": CONNECTED, "clean_start": True, "expiry_interval": 0,
                   "ts": millis(now)})


def disconnected_payload(info: Mapping, description: str, close_code: int | None,
                         now: float) -> bytes:
    # EMQX's on_client_disconnected: common infos + reason + disconnected_at.
    return encode({**info, "event": DISCONNECTED, "reason": reason_code(description),
                   "description": description, "close_code": close_code,
                   "disconnected_at": millis(now), "ts": millis(now)})
