"""Handshake and connection rules (SPEC "Connection"), checked on the wire: raw HTTP for
status lines and headers, the ``websockets`` client for close codes."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time

import pytest
import websockets

KEY = base64.b64encode(os.urandom(16)).decode()


def handshake(port: int, path: str, protocols: str | None = "ocpp1.6") -> tuple[str, dict]:
    """Send a WebSocket upgrade request; return the status line and response headers."""
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {KEY}", "Sec-WebSocket-Version: 13"]
    if protocols is not None:
        lines.append(f"Sec-WebSocket-Protocol: {protocols}")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    head = data.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return head[0], headers


class TestChargePointId:
    @pytest.mark.parametrize("path", [
        "/ocpp/", "/ocpp", "/ocpp/CP%2F1", "/ocpp/CP%2f1", "/ocpp/a+b", "/ocpp/a%2Bb",
        "/ocpp/a%23b", "/ocpp/a%00b", "/ocpp/a%0Ab", "/ocpp/a%7Fb", "/ocpp/" + "x" * 49,
    ])
    def test_rejected_with_400_before_upgrade(self, gateway, path):
        status, headers = handshake(gateway.port, path)
        assert status == "HTTP/1.1 400 Invalid charge point id"
        assert "sec-websocket-accept" not in headers and "upgrade" not in headers

    def test_undecodable_id_is_400(self, gateway):
        status, headers = handshake(gateway.port, "/ocpp/%FF%FE")
        assert status.startswith("HTTP/1.1 400 ")
        assert "sec-websocket-accept" not in headers

    def test_48_characters_and_percent_decoding_accepted(self, gateway):
        status, _ = handshake(gateway.port, "/ocpp/" + "x" * 48)
        assert status == "HTTP/1.1 101 Switching Protocols"
        status, _ = handshake(gateway.port, "/ocpp/CP%20001")  # "CP 001"
        assert status == "HTTP/1.1 101 Switching Protocols"

    def test_other_paths_are_404(self, gateway):
        assert handshake(gateway.port, "/other/CP1")[0].startswith("HTTP/1.1 404")
        assert handshake(gateway.port, "/ocpp/a/b")[0].startswith("HTTP/1.1 404")


class TestSubprotocol:
    def test_server_preference_among_offered(self, gateway):
        _, h = handshake(gateway.port, "/ocpp/P1", "ocpp2.0.1, ocpp1.6")
        assert h["sec-websocket-protocol"] == "ocpp1.6"

    @pytest.mark.parametrize("proto", ["ocpp2.0.1", "ocpp2.1"])
    def test_single_offer_echoed(self, gateway, proto):
        _, h = handshake(gateway.port, "/ocpp/P2", proto)
        assert h["sec-websocket-protocol"] == proto

    def test_unsupported_offer_never_answered_and_closed(self, gateway):
        status, h = handshake(gateway.port, "/ocpp/P3", "ocpp1.5, mqtt")
        assert status == "HTTP/1.1 101 Switching Protocols"
        assert "sec-websocket-protocol" not in h

        async def closed():
            async with websockets.connect(f"{gateway.url}/P3", subprotocols=["ocpp1.5"]) as ws:
                with pytest.raises(websockets.ConnectionClosed) as info:
                    await asyncio.wait_for(ws.recv(), 5)
                return info.value.rcvd.code

        assert asyncio.run(closed()) == 1002

    def test_no_offer_uses_default_without_echo(self, gateway):
        status, h = handshake(gateway.port, "/ocpp/P4", None)
        assert status == "HTTP/1.1 101 Switching Protocols"
        assert "sec-websocket-protocol" not in h

        async def talk():
            async with websockets.connect(f"{gateway.url}/P4") as ws:
                await ws.send("garbage")
                return json.loads(await asyncio.wait_for(ws.recv(), 5))

        # the default (ocpp1.6) is in force: 1.6 spelling
        assert asyncio.run(talk())[:3] == [4, "-1", "FormationViolation"]

    def test_no_offer_refused_when_configured(self, make_gateway, broker):
        gw = make_gateway(broker.port, "ocpp.fail_if_no_subprotocol = true\n")

        async def closed():
            async with websockets.connect(f"{gw.url}/P5") as ws:
                with pytest.raises(websockets.ConnectionClosed) as info:
                    await asyncio.wait_for(ws.recv(), 5)
                return info.value.rcvd.code

        assert asyncio.run(closed()) == 1002


class TestFrames:
    def test_binary_frame_closes_1003(self, gateway):
        async def go():
            async with websockets.connect(f"{gateway.url}/B1", subprotocols=["ocpp1.6"]) as ws:
                await ws.send(b'[2,"1","Heartbeat",{}]')
                with pytest.raises(websockets.ConnectionClosed) as info:
                    await asyncio.wait_for(ws.recv(), 5)
                return info.value.rcvd.code

        assert asyncio.run(go()) == 1003

    def test_oversize_frame_closes_1009(self, make_gateway, broker):
        gw = make_gateway(broker.port, "ocpp.max_frame_size = 1KB\n")

        async def go():
            async with websockets.connect(f"{gw.url}/B2", subprotocols=["ocpp1.6"]) as ws:
                await ws.send('[2,"1","DataTransfer",{"data":"' + "x" * 1100 + '"}]')
                with pytest.raises(websockets.ConnectionClosed) as info:
                    await asyncio.wait_for(ws.recv(), 5)
                return info.value.rcvd.code

        assert asyncio.run(go()) == 1009

    def test_frame_under_the_limit_passes(self, make_gateway, broker, backend):
        gw = make_gateway(broker.port, "ocpp.max_frame_size = 1KB\n")

        async def go():
            async with websockets.connect(f"{gw.url}/B3", subprotocols=["ocpp1.6"]) as ws:
                await ws.send('[2,"1","DataTransfer",{"vendorId":"V","data":"' + "x" * 900 + '"}]')
                await asyncio.sleep(0.2)

        asyncio.run(go())
        assert backend.expect("ocpp/cp/B3")[1]["Action"] == "DataTransfer"


def test_second_connection_replaces_the_first(gateway, backend):
    async def go():
        async with websockets.connect(f"{gateway.url}/DUP", subprotocols=["ocpp1.6"]) as first:
            async with websockets.connect(f"{gateway.url}/DUP",
                                          subprotocols=["ocpp1.6"]) as second:
                with pytest.raises(websockets.ConnectionClosed) as info:
                    await asyncio.wait_for(first.recv(), 5)
                assert info.value.rcvd.code == 1000
                # the new connection is the one the backend reaches
                await asyncio.get_running_loop().run_in_executor(None, lambda: backend.publish(
                    "ocpp/cs/DUP", {"MessageTypeId": 2, "UniqueId": "r", "Action": "Reset",
                                    "Payload": {"type": "Soft"}}))
                assert json.loads(await asyncio.wait_for(second.recv(), 5)) == [
                    2, "r", "Reset", {"type": "Soft"}]

    asyncio.run(go())


class TestLiveness:
    def test_slow_handshake_is_cut_off(self, make_gateway, broker):
        gw = make_gateway(broker.port, "ocpp.handshake_timeout = 1s\n")
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
            s.sendall(b"GET /ocpp/SLOW HTTP/1.1\r\nHost: x\r\n")  # and never finish
            start = time.monotonic()
            assert s.recv(100) == b""  # the server hung up
            assert 0.5 < time.monotonic() - start < 5

    def test_silent_charge_point_is_closed_by_heartbeat_checking(self, make_gateway, broker):
        gw = make_gateway(broker.port, "ocpp.default_heartbeat_interval = 1s\n"
                                       "ocpp.heartbeat_checking_times_backoff = 1\n")

        async def go():
            async with websockets.connect(f"{gw.url}/HB", subprotocols=["ocpp1.6"]) as ws:
                start = asyncio.get_running_loop().time()
                with pytest.raises(websockets.ConnectionClosed) as info:
                    await asyncio.wait_for(ws.recv(), 10)
                return info.value.rcvd, asyncio.get_running_loop().time() - start

        rcvd, waited = asyncio.run(go())
        assert (rcvd.code, rcvd.reason) == (1000, "heartbeat timeout")
        assert 0.9 <= waited < 3

    def test_server_pings_and_closes_without_pong(self, make_gateway, broker):
        gw = make_gateway(broker.port, "ocpp.ping_interval = 1s\nocpp.ping_timeout = 1s\n")
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
            s.sendall((f"GET /ocpp/PING HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                       f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n"
                       "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: ocpp1.6\r\n\r\n"
                       ).encode())
            data = b""
            while b"\r\n\r\n" not in data:
                data += s.recv(4096)
            data = data.split(b"\r\n\r\n", 1)[1]
            start = time.monotonic()
            opcodes = []
            while True:  # read server frames (unmasked) until the connection ends
                while len(data) < 2:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                if len(data) < 2:
                    break
                opcode, length = data[0] & 0x0F, data[1] & 0x7F
                while len(data) < 2 + length:
                    data += s.recv(4096)
                opcodes.append((opcode, round(time.monotonic() - start, 1)))
                data = data[2 + length:]
                if opcode == 0x8:  # close
                    break
        assert opcodes[0][0] == 0x9, opcodes  # a ping came first, about a second in
        assert 0.5 <= opcodes[0][1] < 2.5
        assert opcodes[-1][0] == 0x8 and opcodes[-1][1] < 6, opcodes  # no pong: closed

    def test_ponging_charge_point_stays_connected(self, make_gateway, broker):
        # With interval == timeout, a too-tight check would close healthy sockets.
        gw = make_gateway(broker.port, "ocpp.ping_interval = 1s\nocpp.ping_timeout = 1s\n")

        async def go():
            async with websockets.connect(f"{gw.url}/PONG", subprotocols=["ocpp1.6"],
                                          ping_interval=None) as ws:
                await asyncio.sleep(3.5)  # three pings answered by the client library
                await ws.send("garbage")
                return json.loads(await asyncio.wait_for(ws.recv(), 5))

        assert asyncio.run(go())[0] == 4
