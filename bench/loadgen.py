"""Benchmark load generator: many OCPP-J 1.6 charge points in one process.

Benchmark code only.  Raw OCPP-J text frames (no OCPP library), subprotocol ``ocpp1.6``,
charge point ids ``CP00001``, ``CP00002``, ... (``--first``/``--count``), one asyncio loop.
Every charge point answers any downstream CALL with an empty CALLRESULT ``[3,id,{}]``.

WebSocket client (``--client``): ``raw`` (default), the small RFC 6455 client below, or
``tornado`` (``tornado.websocket.websocket_connect``).  The load generators share one core
with Mosquitto and the backend; measured there, Tornado's client cost ~170 us of CPU per
CALL and the raw one ~70 us, and with Tornado's the load side could not saturate the
floor (BENCHMARKS.md).  Neither needs anything beyond the product's own dependencies.

Modes
  closed  each charge point keeps exactly one CALL outstanding: the next one is sent as soon
          as the previous one is answered -> answered CALLs/s at saturation.
  open    CALLs are sent at a fixed aggregate ``--rate``, round robin over the charge points
          (a charge point whose previous CALL is still unanswered is skipped and counted, so
          OCPP's one-outstanding-CALL rule is never broken) -> round-trip latency.
  idle    every charge point only sends a Heartbeat each ``--idle-heartbeat`` s (the
          heartbeats of all of them spread evenly over that interval); runs until ``stop``
          (or EOF) on stdin, then prints ``RESULT {json}`` -> memory and wake-ups of a system
          holding many idle connections.
  probe   one charge point (``CPPROBE``) sends Heartbeats until one is answered; exit 0 on
          success, 1 when ``--timeout`` passes.  Used to wait until a system is ready.

In closed and open mode ``--active K`` puts only the first K charge points under load; the
others behave as in idle mode (a Heartbeat each ``--idle-heartbeat`` s, from READY on), and
their answers are counted apart (``hb_*``), never in the CALL figures.

Protocol with the driver (bench/run.py), closed and open modes:
  1. connect all charge points (+ a BootNotification each unless --no-boot), then print
     ``READY {json}`` on stdout;
  2. read ``go T0 T1`` on stdin (wall-clock epoch seconds): load starts at once (the time
     until T0 is warm-up), only [T0, T1) is measured, no new CALL is started after T1;
  3. wait up to ``--drain`` seconds for outstanding answers, print ``RESULT {json}``, exit.
Latencies are CALL->CALLRESULT round trips measured at the charge point (perf_counter,
from just before the frame is written to the moment the answer frame is delivered) for
CALLs sent inside the window.
"""

import argparse
import asyncio
import base64
import hashlib
import json
import os
import random
import sys
import time
from urllib.parse import urlsplit

from harness import raise_nofile
from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClosedError, websocket_connect

SUBPROTOCOL = "ocpp1.6"
STAMP = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
PAYLOADS = {
    "Heartbeat": "{}",
    "MeterValues": json.dumps({
        "connectorId": 1, "transactionId": 1,
        "meterValue": [{"timestamp": STAMP, "sampledValue": [
            {"value": "1234.5", "measurand": "Energy.Active.Import.Register", "unit": "Wh"}]}],
    }, separators=(",", ":")),
    "StatusNotification": json.dumps({
        "connectorId": 1, "errorCode": "NoError", "status": "Available"},
        separators=(",", ":")),
}
BOOT = json.dumps({"chargePointVendor": "bench", "chargePointModel": "loadgen"},
                  separators=(",", ":"))


WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class ClosedError(Exception):
    pass


class RawWebSocket(asyncio.Protocol):
    """A deliberately small RFC 6455 client on an asyncio Protocol (``--client raw``).

    Why not a library: the load side shares one core with Mosquitto and the backend, and
    Tornado's client spends most of its time in IOStream bookkeeping (an epoll
    re-registration per read); this client parses every frame that arrived in one
    ``data_received`` call and writes each frame with one ``transport.write``.  It speaks
    exactly what the benchmark needs: the upgrade handshake (checked: 101,
    Sec-WebSocket-Accept, the chosen subprotocol), unfragmented or fragmented text frames
    in, masked text frames out, ping -> pong, close.  asyncio enables TCP_NODELAY itself.
    """

    def __init__(self, on_frame, host, path, subprotocol):
        self.on_frame = on_frame
        self.request = (
            "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: %s\r\n\r\n")
        self.key = base64.b64encode(os.urandom(16)).decode()
        self.request = (self.request % (path, host, self.key, subprotocol)).encode()
        self.transport = None
        self.buf = bytearray()
        self.upgraded = False
        self.fragments = None
        self.closed = False
        self.selected_subprotocol = None
        self.handshake = asyncio.get_running_loop().create_future()

    # -- asyncio callbacks --------------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc):
        was_open = self.upgraded and not self.closed
        self.closed = True
        if not self.handshake.done():
            self.handshake.set_exception(ConnectionError(f"closed during handshake: {exc}"))
        if was_open or self.upgraded:
            self.on_frame(None)

    def data_received(self, data):
        buf = self.buf
        buf += data
        if not self.upgraded and not self._parse_handshake():
            return
        while len(buf) >= 2:
            b0, n = buf[0], buf[1]
            if n & 0x80:
                self._fail("masked frame from server")
                return
            n &= 0x7F
            pos = 2
            if n == 126:
                if len(buf) < 4:
                    return
                n, pos = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n, pos = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < pos + n:
                return
            payload = bytes(buf[pos:pos + n])
            del buf[:pos + n]
            self._frame(b0 & 0x80, b0 & 0x0F, payload)
            if self.closed:
                return

    # -- frames -------------------------------------------------------------------------------
    def _parse_handshake(self):
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        del self.buf[:end + 4]
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        accept = base64.b64encode(hashlib.sha1(self.key.encode() + WS_GUID).digest()).decode()
        if head[0].split(" ")[1:2] != ["101"]:
            self._fail_handshake(f"status line {head[0]!r}")
        elif headers.get("sec-websocket-accept") != accept:
            self._fail_handshake("bad Sec-WebSocket-Accept")
        else:
            self.upgraded = True
            self.selected_subprotocol = headers.get("sec-websocket-protocol")
            self.handshake.set_result(True)
        return self.upgraded

    def _fail_handshake(self, why):
        self.handshake.set_exception(ConnectionError(why))
        self.closed = True
        self.transport.close()

    def _fail(self, why):
        print("loadgen: protocol error: " + why, file=sys.stderr, flush=True)
        self.close(1002)

    def _frame(self, fin, opcode, payload):
        if opcode == 0x1 or opcode == 0x0:            # text / continuation
            if self.fragments is not None:
                self.fragments.append(payload)
                if not fin:
                    return
                payload, self.fragments = b"".join(self.fragments), None
            elif not fin:
                self.fragments = [payload]
                return
            self.on_frame(payload.decode("utf-8", "replace"))
        elif opcode == 0x9:                            # ping
            self._send(0x8A, payload)
        elif opcode == 0x8:                            # close: echo the code, hang up
            if not self.closed:
                self._send(0x88, payload[:2])
                self.closed = True
                self.transport.close()
        elif opcode == 0xA:                            # pong
            pass
        else:                                          # binary or reserved
            self.on_frame(b"")

    def _send(self, first_byte, data):
        n = len(data)
        if n < 126:
            header = bytes((first_byte, 0x80 | n))
        elif n < 65536:
            header = bytes((first_byte, 0xFE)) + n.to_bytes(2, "big")
        else:
            header = bytes((first_byte, 0xFF)) + n.to_bytes(8, "big")
        mask = random.getrandbits(32).to_bytes(4, "big")
        if n:
            # XOR the payload with the repeated mask key as one big integer
            key = (mask * (n // 4 + 1))[:n]
            data = (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
        self.transport.write(header + mask + data)

    # -- the interface ChargePoint uses ----------------------------------------------------------
    def write_message(self, text):
        if self.closed:
            raise ClosedError()
        self._send(0x81, text.encode())

    def close(self, code=1000):
        if not self.closed:
            self.closed = True
            if self.upgraded:
                self._send(0x88, code.to_bytes(2, "big"))
            self.transport.close()


async def raw_connect(url, on_frame, timeout):
    parts = urlsplit(url)
    if parts.scheme != "ws":
        raise ValueError("--client raw speaks ws:// only")
    loop = asyncio.get_running_loop()
    host, port = parts.hostname, parts.port or 80
    transport, proto = await asyncio.wait_for(loop.create_connection(
        lambda: RawWebSocket(on_frame, f"{host}:{port}", parts.path, SUBPROTOCOL),
        host, port), timeout)
    try:
        await asyncio.wait_for(proto.handshake, timeout)
    except BaseException:
        transport.close()
        raise
    return proto


class Window:
    """The measurement window in perf_counter time, plus what was seen inside it."""

    def __init__(self):
        self.t0 = float("inf")
        self.t1 = float("inf")
        self.sent = 0            # CALLs sent inside the window
        self.answered = 0        # CALLRESULTs received inside the window
        self.errors = 0          # CALLERRORs received inside the window
        self.lat_us = []         # round trips of CALLs sent inside the window
        self.lag_us = []         # open loop: how late each send was against its schedule
        self.hb_answered = 0     # idle charge points' Heartbeats answered inside the window


class ChargePoint:
    __slots__ = ("lg", "cid", "conn", "seq", "pending", "sent_at", "action", "closed", "idle")

    def __init__(self, lg, cid):
        self.lg = lg
        self.cid = cid
        self.conn = None
        self.seq = 0
        self.pending = None      # UniqueId of the outstanding CALL, if any
        self.sent_at = 0.0
        self.action = None
        self.closed = False
        self.idle = False        # only heartbeats (idle mode, or beyond --active)

    async def connect(self, url, timeout):
        if self.lg.args.client == "raw":
            conn = await raw_connect(url + self.cid, self.on_frame, timeout)
        else:
            req = HTTPRequest(url + self.cid, connect_timeout=timeout, request_timeout=timeout)
            conn = await websocket_connect(req, subprotocols=[SUBPROTOCOL],
                                           on_message_callback=self.on_frame)
            conn.protocol.set_nodelay(True)    # Tornado leaves Nagle on by default
        if conn.selected_subprotocol != SUBPROTOCOL:
            conn.close()
            raise RuntimeError(f"server chose subprotocol {conn.selected_subprotocol!r}")
        self.conn = conn

    def send_call(self, action, payload):
        self.seq += 1
        uid = str(self.seq)
        self.pending = uid
        self.action = action
        frame = f'[2,"{uid}","{action}",{payload}]'
        self.sent_at = time.perf_counter()
        try:
            self.conn.write_message(frame)
        except (WebSocketClosedError, ClosedError):
            self.pending = None
            self.lg.counters["send_failed"] += 1
            return False
        self.lg.counters["sent"] += 1
        return True

    def on_frame(self, msg):
        now = time.perf_counter()
        lg = self.lg
        if msg is None:                               # connection closed
            if not self.closed:
                self.closed = True
                if not lg.stopping:
                    lg.counters["disconnects"] += 1
            self.pending = None
            return
        try:
            frame = json.loads(msg)
            kind, uid = frame[0], frame[1]
        except (ValueError, TypeError, IndexError, KeyError):
            lg.counters["bad_frames"] += 1
            return
        if kind == 2:                                 # downstream CALL: answer empty
            lg.counters["downstream_calls"] += 1
            try:
                self.conn.write_message(f"[3,{json.dumps(uid)},{{}}]")
            except (WebSocketClosedError, ClosedError):
                pass
            return
        if kind not in (3, 4) or uid != self.pending:
            lg.counters["unmatched"] += 1
            return
        sent_at = self.sent_at
        self.pending = None
        w = lg.window
        if self.idle:                                 # a heartbeat (or a boot) of an idle CP
            if kind == 3:
                lg.counters["hb_answered"] += 1
                if w.t0 <= now < w.t1:
                    w.hb_answered += 1
                if len(lg.hb_lat_us) < 100000:
                    lg.hb_lat_us.append(int((now - sent_at) * 1e6))
            else:
                lg.counters["hb_callerrors"] += 1
            return
        if kind == 3:
            lg.counters["answered"] += 1
            if len(frame) != 3 or not isinstance(frame[2], dict):
                lg.counters["bad_frames"] += 1          # counted, still an answer
            if w.t0 <= now < w.t1:
                w.answered += 1
        else:
            lg.counters["callerrors"] += 1
            code = str(frame[2]) if len(frame) > 2 else "?"
            lg.error_codes[code] = lg.error_codes.get(code, 0) + 1
            if len(lg.error_samples) < 3:
                lg.error_samples.append(msg[:300])
            if w.t0 <= now < w.t1:
                w.errors += 1
        if kind == 3 and w.t0 <= sent_at < w.t1:
            w.lat_us.append(int((now - sent_at) * 1e6))
        if lg.closed_loop_running:
            if now < w.t1:
                self.send_call(lg.action, lg.payload)
            else:
                lg.closed_loop_running = False


class LoadGen:
    def __init__(self, args):
        self.args = args
        self.action = args.action
        self.payload = PAYLOADS[args.action]
        self.window = Window()
        self.cps = [ChargePoint(self, f"CP{n:05d}")
                    for n in range(args.first, args.first + args.count)]
        self.counters = {k: 0 for k in (
            "sent", "answered", "callerrors", "timeouts", "unmatched", "bad_frames",
            "downstream_calls", "disconnects", "send_failed", "busy_skips",
            "hb_sent", "hb_answered", "hb_callerrors", "hb_skips")}
        self.hb_lat_us = []
        active = args.count if args.active is None else max(0, min(args.count, args.active))
        for cp in self.cps[active:] if args.mode != "idle" else self.cps:
            cp.idle = True
        self.error_codes = {}
        self.error_samples = []
        self.closed_loop_running = False
        self.stopping = False

    # -- set-up ------------------------------------------------------------------------------
    async def connect_all(self):
        sem = asyncio.Semaphore(self.args.connect_concurrency)
        failures = []

        async def one(cp):
            async with sem:
                for attempt in range(3):
                    try:
                        await cp.connect(self.args.url, self.args.timeout)
                        return
                    except Exception as exc:  # noqa: BLE001 -- counted and reported
                        err = exc
                        await asyncio.sleep(0.2 * (attempt + 1))
                failures.append(f"{cp.cid}: {err}")

        await asyncio.gather(*(one(cp) for cp in self.cps))
        self.cps = [cp for cp in self.cps if cp.conn is not None]
        return failures

    async def boot_all(self):
        """A BootNotification from every charge point; at most --boot-window outstanding
        (0: all at once).  Returns how many were not answered within --timeout."""
        step = self.args.boot_window or len(self.cps) or 1
        missing = 0
        for i in range(0, len(self.cps), step):
            chunk = self.cps[i:i + step]
            for cp in chunk:
                cp.send_call("BootNotification", BOOT)
            deadline = time.perf_counter() + self.args.timeout
            while time.perf_counter() < deadline and any(cp.pending for cp in chunk):
                await asyncio.sleep(0.01 if self.args.boot_window else 0.05)
            missing += sum(1 for cp in chunk if cp.pending)
            for cp in chunk:
                cp.pending = None
        return missing

    @property
    def active(self):
        return [cp for cp in self.cps if not cp.idle]

    async def heartbeats(self):
        """Idle charge points: one Heartbeat each per --idle-heartbeat s, spread evenly
        (round robin at len(idle) / interval Heartbeats/s); never a second outstanding."""
        cps = [cp for cp in self.cps if cp.idle]
        interval = self.args.idle_heartbeat
        if not cps or interval <= 0:
            return
        step = interval / len(cps)
        k = 0
        nxt = time.perf_counter()
        while not self.stopping:
            now = time.perf_counter()
            while nxt <= now:
                cp = cps[k % len(cps)]
                k += 1
                if cp.pending is not None or cp.closed:
                    self.counters["hb_skips"] += 1
                elif cp.send_call("Heartbeat", "{}"):
                    self.counters["hb_sent"] += 1
                nxt += step
            await asyncio.sleep(max(0.0, nxt - time.perf_counter()))

    # -- load --------------------------------------------------------------------------------
    async def watchdog(self):
        """Give up on CALLs unanswered for --call-timeout s (closed loop: send the next)."""
        while not self.stopping:
            await asyncio.sleep(0.25)
            limit = time.perf_counter() - self.args.call_timeout
            for cp in self.cps:
                if cp.pending is not None and cp.sent_at < limit:
                    self.counters["timeouts"] += 1
                    cp.pending = None
                    if self.closed_loop_running and not cp.closed and not cp.idle:
                        cp.send_call(self.action, self.payload)

    async def open_loop(self):
        w = self.window
        interval = 1.0 / self.args.rate
        cps = self.active
        n = len(cps)
        k = 0
        nxt = time.perf_counter()
        while True:
            now = time.perf_counter()
            if now >= w.t1:
                return
            while nxt <= now:
                cp = cps[k % n]
                k += 1
                in_window = w.t0 <= nxt < w.t1
                if cp.pending is not None or cp.closed:
                    self.counters["busy_skips"] += 1
                elif cp.send_call(self.action, self.payload) and in_window:
                    w.sent += 1
                    w.lag_us.append(int((cp.sent_at - nxt) * 1e6))
                nxt += interval
            await asyncio.sleep(max(0.0, nxt - time.perf_counter()))

    async def closed_loop(self):
        w = self.window
        self.closed_loop_running = True
        for cp in self.active:
            cp.send_call(self.action, self.payload)
        while time.perf_counter() < w.t1:
            await asyncio.sleep(min(0.1, max(0.0, w.t1 - time.perf_counter())))
        self.closed_loop_running = False

    async def drain(self):
        deadline = time.perf_counter() + self.args.drain
        while time.perf_counter() < deadline and any(cp.pending for cp in self.cps):
            await asyncio.sleep(0.02)
        return sum(1 for cp in self.cps if cp.pending)


async def read_go_line():
    """Wait for ``go T0 T1`` on stdin without a thread (stdin is a pipe from run.py)."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    buf = bytearray()

    def readable():
        chunk = os.read(0, 4096)
        if not chunk:
            loop.remove_reader(0)
            if not fut.done():
                fut.set_exception(EOFError("stdin closed before 'go'"))
            return
        buf.extend(chunk)
        if b"\n" in buf and not fut.done():
            loop.remove_reader(0)
            fut.set_result(bytes(buf).split(b"\n", 1)[0].decode())

    loop.add_reader(0, readable)
    return await fut


async def probe(args):
    """Send Heartbeats from one charge point until one is answered."""
    lg = LoadGen(args)
    cp = ChargePoint(lg, "CPPROBE")
    deadline = time.monotonic() + args.timeout
    last = "no attempt"
    if args.announce:
        print("ATTEMPTING", flush=True)
    while time.monotonic() < deadline:
        try:
            if cp.conn is None or cp.closed:
                cp.closed = False
                await cp.connect(args.url, min(2.0, args.timeout))
            cp.send_call("Heartbeat", "{}")
            t = time.perf_counter()
            while cp.pending and time.perf_counter() - t < 1.0 and not cp.closed:
                await asyncio.sleep(0.01)
            if lg.counters["answered"]:
                print("PROBE OK %.1f ms" % ((time.perf_counter() - t) * 1e3), flush=True)
                cp.conn.close()
                await asyncio.sleep(0.1)
                return 0
            last = "no answer within 1 s (%s)" % (lg.error_samples or "no CALLERROR")
        except Exception as exc:  # noqa: BLE001 -- keep trying until the deadline
            last = f"{type(exc).__name__}: {exc}"
            cp.conn = None
        await asyncio.sleep(args.retry_interval)
    print("PROBE FAILED: " + last, flush=True)
    return 1


async def idle(lg):
    """Idle mode after READY: heartbeats until ``stop`` (or EOF) on stdin."""
    hb = asyncio.ensure_future(lg.heartbeats())
    try:
        await read_go_line()
    except EOFError:
        pass
    lg.stopping = True
    hb.cancel()
    lat = sorted(lg.hb_lat_us)
    result = {"mode": "idle", "cps": len(lg.cps), "counters": lg.counters,
              "connected_at_end": sum(1 for cp in lg.cps if not cp.closed),
              "hb_lat_p50_ms": lat[len(lat) // 2] / 1e3 if lat else None,
              "hb_lat_p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1e3
              if lat else None,
              "hb_lat_max_ms": lat[-1] / 1e3 if lat else None}
    print("RESULT " + json.dumps(result), flush=True)
    for cp in lg.cps:
        if not cp.closed:
            cp.conn.close()
    await asyncio.sleep(0.3)
    return 0


async def run(args):
    if args.mode == "probe":
        return await probe(args)
    raise_nofile(args.count + 256)
    lg = LoadGen(args)
    t = time.perf_counter()
    failures = await lg.connect_all()
    connect_s = time.perf_counter() - t
    t = time.perf_counter()
    boot_missing = 0 if args.no_boot else await lg.boot_all()
    lg.counters["hb_answered"] = 0          # idle CPs' boots are not heartbeats
    lg.hb_lat_us = []
    print("READY " + json.dumps({"connected": len(lg.cps), "connect_failed": len(failures),
                                 "connect_errors": failures[:3], "connect_s": connect_s,
                                 "boot_s": time.perf_counter() - t,
                                 "idle_cps": sum(1 for cp in lg.cps if cp.idle),
                                 "boot_unanswered": boot_missing}), flush=True)
    if args.mode == "idle":
        return await idle(lg)
    hb = asyncio.ensure_future(lg.heartbeats())
    try:
        line = await asyncio.wait_for(read_go_line(), timeout=args.go_timeout)
    except (TimeoutError, EOFError):
        return 2
    _, t0, t1 = line.split()
    # Map the wall-clock window onto perf_counter.
    offset = time.perf_counter() - time.time()
    lg.window.t0 = float(t0) + offset
    lg.window.t1 = float(t1) + offset

    wd = asyncio.ensure_future(lg.watchdog())
    if args.mode == "closed":
        await lg.closed_loop()
    else:
        await lg.open_loop()
    unanswered = await lg.drain()
    lg.stopping = True
    wd.cancel()
    hb.cancel()

    w = lg.window
    result = {
        "mode": args.mode, "action": args.action, "cps": len(lg.cps),
        "window_s": w.t1 - w.t0, "sent_in_window": w.sent,
        "answered_in_window": w.answered, "errors_in_window": w.errors,
        "unanswered_at_end": unanswered, "counters": lg.counters,
        "error_codes": lg.error_codes, "error_samples": lg.error_samples,
        "lat_us": w.lat_us, "lag_us": w.lag_us,
        "idle_cps": sum(1 for cp in lg.cps if cp.idle),
        "hb_answered_in_window": w.hb_answered,
    }
    print("RESULT " + json.dumps(result), flush=True)
    for cp in lg.cps:
        if not cp.closed:
            cp.conn.close()
    await asyncio.sleep(0.3)       # let the close frames go out
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="ws://127.0.0.1:33033/ocpp/",
                    help="URL prefix; the charge point id is appended")
    ap.add_argument("--mode", choices=("closed", "open", "idle", "probe"), default="closed")
    ap.add_argument("--first", type=int, default=1, help="number of the first charge point")
    ap.add_argument("--count", type=int, default=100, help="charge points in this process")
    ap.add_argument("--action", choices=sorted(PAYLOADS), default="MeterValues")
    ap.add_argument("--rate", type=float, default=150.0, help="open loop: CALLs/s")
    ap.add_argument("--no-boot", action="store_true", help="skip BootNotification")
    ap.add_argument("--timeout", type=float, default=20.0,
                    help="connect/boot timeout (probe: overall deadline), s")
    ap.add_argument("--call-timeout", type=float, default=10.0,
                    help="a CALL unanswered this long counts as a timeout, s")
    ap.add_argument("--drain", type=float, default=3.0,
                    help="after the window, wait this long for outstanding answers, s")
    ap.add_argument("--go-timeout", type=float, default=120.0)
    ap.add_argument("--connect-concurrency", type=int, default=50)
    ap.add_argument("--active", type=int, default=None,
                    help="closed/open: only the first ACTIVE charge points are under load, "
                         "the others idle with heartbeats (default: all under load)")
    ap.add_argument("--idle-heartbeat", type=float, default=30.0,
                    help="idle charge points send a Heartbeat every this many s (0: never)")
    ap.add_argument("--boot-window", type=int, default=0,
                    help="at most this many BootNotifications outstanding (0: all at once)")
    ap.add_argument("--retry-interval", type=float, default=0.2,
                    help="probe: pause between failed attempts, s")
    ap.add_argument("--announce", action="store_true",
                    help="probe: print ATTEMPTING once running (before the first attempt)")
    ap.add_argument("--client", choices=("raw", "tornado"), default="raw",
                    help="WebSocket client: the built-in minimal one (cheapest) or Tornado's")
    args = ap.parse_args()
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
