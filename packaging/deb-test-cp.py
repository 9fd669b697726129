#!/usr/bin/python3
"""A charge point for packaging/deb-test, stdlib only: runs inside the test container
with Debian's python3 and nothing else.

    deb-test-cp.py URL [--user ID --password PW] [--cafile PEM] [--control DIR]
    deb-test-cp.py URL --expect-status 401

Without --expect-status it opens an OCPP 1.6 WebSocket (HTTP Basic when --user is
given), sends a BootNotification and waits for the backend's CALLRESULT. With --control
it then writes DIR/connected and holds the connection open, answering pings, until
DIR/go appears (the test reloads the service meanwhile): a connection closed before
that fails. Then a Heartbeat must get its CALLRESULT too, and a frame that is not JSON
must get a CALLERROR (the gateway logs a warning for it). Exit 0 when all of that
happened, 1 otherwise; every step is printed.

With --expect-status it only checks that the handshake is refused with that HTTP status.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import select
import socket
import ssl
import struct
import sys
import time
from urllib.parse import urlsplit

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def say(*args) -> None:
    print("cp:", *args, flush=True)


class Closed(Exception):
    pass


class WebSocket:
    def __init__(self, url: str, user: str | None, password: str | None,
                 cafile: str | None, timeout: float = 15.0) -> None:
        u = urlsplit(url)
        port = u.port or (443 if u.scheme == "wss" else 80)
        raw = socket.create_connection((u.hostname, port), timeout=timeout)
        if u.scheme == "wss":
            ctx = ssl.create_default_context(cafile=cafile)
            raw = ctx.wrap_socket(raw, server_hostname=u.hostname)
            say(f"TLS {raw.version()} {raw.cipher()[0]}")
        self.sock = raw
        self.buf = b""
        key = base64.b64encode(os.urandom(16)).decode()
        head = [f"GET {u.path} HTTP/1.1", f"Host: {u.hostname}:{port}", "Upgrade: websocket",
                "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
                "Sec-WebSocket-Version: 13", "Sec-WebSocket-Protocol: ocpp1.6"]
        if user is not None:
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            head.append(f"Authorization: Basic {token}")
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise Closed("connection closed during the handshake")
            self.buf += chunk
        header, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = header.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {k.strip().lower(): v.strip()
                        for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
        self.accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()

    def send(self, text: str, opcode: int = 1) -> None:
        data = text.encode() if isinstance(text, str) else text
        mask = os.urandom(4)
        n = len(data)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise Closed("connection closed by the gateway (EOF)")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def recv(self, timeout: float) -> str:
        """The next text message; pings are answered on the way."""
        self.sock.settimeout(timeout)
        while True:
            b1, b2 = self._read(2)
            opcode, n = b1 & 0x0F, b2 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8))[0]
            payload = self._read(n)
            if opcode == 9:
                self.send(payload, opcode=10)
            elif opcode == 8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                raise Closed(f"close frame from the gateway: {code} {payload[2:]!r}")
            elif opcode == 1:
                return payload.decode()

    def pending(self) -> bool:
        if self.buf or (isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()):
            return True
        return bool(select.select([self.sock], [], [], 0.1)[0])

    def close(self) -> None:
        try:
            self.send(struct.pack("!H", 1000), opcode=8)
            self.recv(5)
        except (Closed, OSError):
            pass
        self.sock.close()


def call(ws: WebSocket, uid: str, action: str, payload: dict, timeout: float = 20.0) -> list:
    ws.send(json.dumps([2, uid, action, payload]))
    say(f"sent {action} {uid}")
    while True:
        msg = json.loads(ws.recv(timeout))
        if msg[1] == uid:
            return msg
        say(f"(ignored {msg})")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--user")
    ap.add_argument("--password")
    ap.add_argument("--cafile")
    ap.add_argument("--control")
    ap.add_argument("--expect-status", type=int)
    ap.add_argument("--hold", type=float, default=120.0, help="longest wait for DIR/go")
    a = ap.parse_args()

    ws = WebSocket(a.url, a.user, a.password, a.cafile)
    if a.expect_status is not None:
        ok = ws.status == a.expect_status
        say(f"handshake answered HTTP {ws.status} "
            f"(www-authenticate: {ws.headers.get('www-authenticate', '-')}); "
            f"expected {a.expect_status}: {'ok' if ok else 'WRONG'}")
        return 0 if ok else 1
    if ws.status != 101:
        say(f"handshake refused: HTTP {ws.status}")
        return 1
    if ws.headers.get("sec-websocket-accept") != ws.accept:
        say("bad Sec-WebSocket-Accept")
        return 1
    if ws.headers.get("sec-websocket-protocol") != "ocpp1.6":
        say(f"subprotocol not echoed: {ws.headers.get('sec-websocket-protocol')!r}")
        return 1
    say("connected, subprotocol ocpp1.6")

    reply = call(ws, "boot-1", "BootNotification",
                 {"chargePointModel": "m", "chargePointVendor": "v"})
    say(f"BootNotification answer: {json.dumps(reply)}")
    if reply[0] != 3 or reply[2].get("status") != "Accepted":
        return 1

    if a.control:
        open(os.path.join(a.control, "connected"), "w").close()
        say("holding the connection until the test says go")
        deadline = time.monotonic() + a.hold
        go = os.path.join(a.control, "go")
        try:
            while not os.path.exists(go):
                if time.monotonic() > deadline:
                    say("no go within --hold")
                    return 1
                if ws.pending():
                    say(f"(message while holding: {ws.recv(5)})")
        except (Closed, OSError) as exc:
            say(f"connection DROPPED while holding: {exc}")
            return 1
        say("go: the connection stayed open")

    try:
        reply = call(ws, "hb-1", "Heartbeat", {})
        say(f"Heartbeat answer: {json.dumps(reply)}")
        if reply[0] != 3 or "currentTime" not in reply[2]:
            return 1
        ws.send("this is not json")
        say("sent a frame that is not JSON")
        reply = json.loads(ws.recv(20))
        say(f"answer: {json.dumps(reply)}")
        if reply[0] != 4:
            return 1
    except (Closed, OSError) as exc:
        say(f"connection lost: {exc}")
        return 1
    ws.close()
    say("closed with 1000; all steps passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
