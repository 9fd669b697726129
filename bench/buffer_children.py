"""The child processes of bench/buffer_bench.py, one sub-command each (``python
bench/buffer_bench.py SUB-COMMAND ...``; ``add_parsers`` declares them there), each
printing its figures as ``RESULT {json}`` (the subscriber: ``STATS {json}``) on stdout.

Benchmark code only, never imported by the product.

  storage     phase 1: DiskBuffer as shipped vs ``AppendLog`` below, in one process.
  prefill     phase 3: a backlog written with DiskBuffer, as the gateway writes it.
  floor       phase 3: the drain's floor, in-memory messages published at QoS 1.
  uplinkmem   phase 3 (--uplink-mem): the product's MqttUplink over an in-memory FIFO.
  subscriber  phase 3 (--verify): checks every UniqueId arrives once, in order.
  flood       phase 2: charge points sending MeterValues CALLs as fast as the peer reads.

Over 500 lines because it is six programs (each with its own event loop or store, and
AppendLog, a complete durable FIFO) that share the message they send (``upstream``).
"""

import asyncio
import json
import os
import shutil
import signal
import struct
import sys
import time
import zlib

import harness as h
from harness import ROOT, SUT_CPU

STAMP = "2026-05-09T05:00:00Z"
# A schema-valid OCPP 1.6 MeterValues request, as a metering charge point sends it.
METER_PAYLOAD = json.dumps({
    "connectorId": 1, "transactionId": 4711,
    "meterValue": [{"timestamp": STAMP, "sampledValue": [
        {"value": "12345.6", "measurand": "Energy.Active.Import.Register", "unit": "Wh"},
        {"value": "7360", "measurand": "Power.Active.Import", "unit": "W"}]}]},
    separators=(",", ":"))
N_CIDS = 200


def cid(i):
    return f"CP{i % N_CIDS + 1:05d}"


def upstream(uid):
    """The EMQX-format object the gateway publishes for that CALL (same bytes)."""
    return (f'{{"MessageTypeId":2,"UniqueId":"{uid}","Action":"MeterValues",'
            f'"Payload":{METER_PAYLOAD}}}').encode()


def file_bytes(directory):
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))


# ============================================================ phase 1: the two storages
class AppendLog:
    """A minimal hand-written durable FIFO with DiskBuffer's interface (bench code only).

    data file: records ``<u32 payload length><u32 crc32><u16 topic length> topic payload``
    appended with one os.write per group commit, then os.fsync.  ack file: 8 bytes, the
    offset of the first unacknowledged record, rewritten in place and fsynced per commit.
    No compaction, no segment rotation: the file only grows (a real one would need both).
    """

    HDR = struct.Struct("<IIH")

    def __init__(self, directory):
        from ocpp_edge.store.record import Record
        self.Record = Record
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "log.dat")
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.ack_fd = os.open(os.path.join(directory, "ack"), os.O_RDWR | os.O_CREAT, 0o644)
        raw = os.pread(self.ack_fd, 8, 0)
        self.acked_off = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
        self.synced_ack = self.acked_off
        self.reader = open(self.path, "rb", buffering=1 << 20)
        self.count = self._scan()  # recovery: count (and CRC-check) what is still unacked
        self.reader.seek(self.acked_off)
        self.pending = bytearray()
        from collections import deque
        self.in_flight = deque()
        self.commits = 0

    def _scan(self):
        """Records after the ack offset; a torn tail would be truncated here."""
        self.reader.seek(self.acked_off)
        n, read, hdr = 0, self.reader.read, self.HDR
        while True:
            head = read(10)
            if len(head) < 10:
                return n
            plen, crc, tlen = hdr.unpack(head)
            body = read(tlen + plen)
            if len(body) < tlen + plen or zlib.crc32(body) != crc:
                return n
            n += 1

    def __len__(self):
        return self.count

    def append(self, topic, payload, important=False):
        t = topic.encode()
        self.pending += self.HDR.pack(len(payload), zlib.crc32(payload, zlib.crc32(t)), len(t))
        self.pending += t
        self.pending += payload
        self.count += 1

    def take(self, n):
        out = []
        read, hdr = self.reader.read, self.HDR
        for _ in range(n):
            head = read(10)
            if len(head) < 10:
                self.reader.seek(-len(head), 1)
                break
            plen, crc, tlen = hdr.unpack(head)
            t = read(tlen)
            p = read(plen)
            if len(p) < plen or zlib.crc32(p, zlib.crc32(t)) != crc:
                raise RuntimeError("torn or corrupt record")  # recovery: truncate here
            rec = self.Record(self.reader.tell(), t.decode(), p, True)
            out.append(rec)
        self.in_flight.extend(out)
        return out

    def ack(self, rec):
        rec.acked = True
        flight = self.in_flight
        while flight and flight[0].acked:
            self.acked_off = flight.popleft().seq
            self.count -= 1

    def commit(self):
        if self.pending:
            os.write(self.fd, self.pending)
            self.pending.clear()
            os.fsync(self.fd)
            self.reader.seek(self.reader.tell())  # drop the reader's stale read-ahead
        if self.acked_off != self.synced_ack:
            os.pwrite(self.ack_fd, struct.pack("<Q", self.acked_off), 0)
            os.fsync(self.ack_fd)
            self.synced_ack = self.acked_off
        self.commits += 1
        return True

    def close(self):
        self.commit()
        self.reader.close()
        os.close(self.fd)
        os.close(self.ack_fd)


def storage_worker(args):
    """Child (pinned to CPU 0): DiskBuffer vs AppendLog, --reps times, JSON on stdout."""
    sys.path.insert(0, ROOT)
    from ocpp_edge.store.diskbuffer import DiskBuffer

    n = args.n
    topic = "ocpp/cp/CP00001"
    msgs = [upstream(str(i)) for i in range(1, n + 1)]

    def open_store(kind, d):
        if kind == "sqlite":
            return DiskBuffer(d, 2_000_000, 2 << 30)
        return AppendLog(d)

    def timed(fn, store):
        """(wall s, own CPU s, other processes' % of CPU 0, fn's result) of fn(store)."""
        b0, c0, w0 = h.cpu_times(SUT_CPU), h.self_cpu_s(), time.perf_counter()
        out = fn(store)
        w1, c1, b1 = time.perf_counter(), h.self_cpu_s(), h.cpu_times(SUT_CPU)
        return w1 - w0, c1 - c0, h.foreign_pct(b0, b1, c1 - c0, w1 - w0), out

    def ingest(store):
        app, group = store.append, args.group
        for i, p in enumerate(msgs, 1):
            app(topic, p, True)
            if i % group == 0:
                store.commit()
        store.commit()

    def drain(store):
        take, ack, commit_every = store.take, store.ack, args.drain_commit
        got = since = 0
        while True:
            recs = take(args.take)
            if not recs:
                break
            for r in recs:
                ack(r)
            got += len(recs)
            since += len(recs)
            if since >= commit_every:
                store.commit()
                since = 0
        store.commit()
        return got

    results = []
    for rep in range(args.reps):
        order = ("sqlite", "log") if rep % 2 == 0 else ("log", "sqlite")
        for kind in order:
            d = os.path.join(args.dir, f"{kind}-{rep}")
            store = open_store(kind, d)
            wall_i, cpu_i, foreign_i, _ = timed(ingest, store)
            size = file_bytes(d)            # as on disk while running (SQLite: db + -wal)
            store.close()
            size_closed = file_bytes(d)
            t = time.perf_counter()
            store = open_store(kind, d)     # drain as after a restart: all from disk
            reopen = time.perf_counter() - t
            wall_d, cpu_d, foreign_d, got = timed(drain, store)
            left = len(store)
            store.close()
            results.append({
                "rep": rep, "store": kind, "n": n,
                "ingest_msgs_s": n / wall_i, "ingest_cpu_us": cpu_i * 1e6 / n,
                "ingest_wall_s": wall_i, "ingest_foreign_cpu0_pct": foreign_i,
                "drain_msgs_s": got / wall_d, "drain_cpu_us": cpu_d * 1e6 / max(1, got),
                "drain_wall_s": wall_d, "drain_foreign_cpu0_pct": foreign_d,
                "drained": got, "left_after_drain": left, "reopen_s": reopen,
                "bytes_per_msg": size / n, "bytes_per_msg_closed": size_closed / n,
                "payload_bytes": len(msgs[0]), "topic_bytes": len(topic)})
            shutil.rmtree(d, ignore_errors=True)
            print("STEP " + json.dumps(results[-1]), file=sys.stderr, flush=True)
    print("RESULT " + json.dumps(results), flush=True)


# ============================================================ phase 3 children
def prefill_worker(args):
    """Child: --n records into a DiskBuffer in --dir, as the gateway writes them."""
    sys.path.insert(0, ROOT)
    from ocpp_edge.store.diskbuffer import FILENAME, DiskBuffer
    buf = DiskBuffer(args.dir, 2_000_000, 2 << 30)
    t = time.perf_counter()
    for i in range(1, args.n + 1):
        buf.append("ocpp/cp/" + cid(i), upstream(str(i)), True)
        if i % 10_000 == 0:
            buf.commit()
    buf.commit()
    wall = time.perf_counter() - t
    open_bytes = file_bytes(args.dir)
    buf.close()
    out = {"n": args.n, "wall_s": wall, "bytes_open": open_bytes,
           "bytes_closed": file_bytes(args.dir),
           "db_bytes": os.path.getsize(os.path.join(args.dir, FILENAME)),
           "payload_bytes_last": len(upstream(str(args.n)))}
    print("RESULT " + json.dumps(out), flush=True)


def floor_worker(args):
    """Child (pinned to CPU 0): publish --n in-memory messages at QoS 1, window --window.

    paho on the asyncio/Tornado loop exactly as MqttUplink drives it: add_reader →
    loop_read, on_socket_register_write → add_writer(loop_write), loop_misc every second,
    max_inflight_messages_set(0), TCP_NODELAY; every PUBACK frees a slot and schedules one
    pump per loop turn (IOLoop.add_callback), which publishes up to the window."""
    import mqttcompat
    from tornado.ioloop import IOLoop

    async def main():
        host, port = args.mqtt.rsplit(":", 1)
        pool = [("ocpp/cp/" + cid(k), upstream(str(900000 + k))) for k in range(1024)]
        client = mqttcompat.new_client("bench-floor-drain")
        done = asyncio.get_running_loop().create_future()
        st = {"sent": 0, "acked": 0, "scheduled": False, "t0": None, "c0": None}
        inflight = {}
        window, n = args.window, args.n

        def pump():
            st["scheduled"] = False
            room = min(window - len(inflight), n - st["sent"])
            i = st["sent"]
            for _ in range(room):
                topic, payload = pool[i & 1023]
                info = client.publish(topic, payload, 1)
                inflight[info.mid] = i
                i += 1
            st["sent"] = i

        def kick():
            if not st["scheduled"]:
                st["scheduled"] = True
                IOLoop.current().add_callback(pump)

        def on_connect(c, userdata, flags, rc, properties=None):
            st["t0"], st["c0"] = time.perf_counter(), h.self_cpu_s()
            kick()

        def on_publish(c, userdata, mid, *rest):
            if inflight.pop(mid, None) is not None:
                st["acked"] += 1
                if st["acked"] == n:
                    if not done.done():
                        done.set_result(None)
                else:
                    kick()

        client.on_connect = on_connect
        client.on_publish = on_publish
        mqttcompat.LoopDriver(client, "register")
        client.connect(host, int(port), keepalive=60)
        await asyncio.wait_for(done, args.timeout)
        wall, cpu = time.perf_counter() - st["t0"], h.self_cpu_s() - st["c0"]
        print("RESULT " + json.dumps({"n": n, "window": window, "wall_s": wall,
                                      "msgs_s": n / wall, "cpu_s": cpu,
                                      "cpu_us_per_msg": cpu * 1e6 / n}), flush=True)
        client.disconnect()

    asyncio.run(main())


def uplinkmem_worker(args):
    """Child (pinned to CPU 0): the product's MqttUplink publishing --n records from an
    in-memory FIFO (no SQLite) -- separates the uplink's own cost from DiskBuffer's."""
    sys.path.insert(0, ROOT)
    from collections import deque

    from ocpp_edge.north.uplink import MqttUplink
    from ocpp_edge.store.record import Record

    class MemBuffer:
        def __init__(self, n):
            self.q = deque(Record(i, "ocpp/cp/" + cid(i), upstream(str(i)), True)
                           for i in range(1, n + 1))
            self.flight = deque()
            self.count = n

        def __len__(self):
            return self.count

        def take(self, k):
            q, out = self.q, []
            while q and len(out) < k:
                out.append(q.popleft())
            self.flight.extend(out)
            return out

        def ack(self, rec):
            rec.acked = True
            f = self.flight
            while f and f[0].acked:
                f.popleft()
                self.count -= 1

        def rewind(self):
            n = len(self.flight)
            self.q.extendleft(reversed(self.flight))
            self.flight.clear()
            return n

    async def main():
        host, port = args.mqtt.rsplit(":", 1)
        buf = MemBuffer(args.n)
        st = {}

        def on_state(up):
            if up and "t0" not in st:
                st["t0"], st["c0"] = time.perf_counter(), h.self_cpu_s()

        up = MqttUplink(host=host, port=int(port), client_id="bench-uplink-mem", username=None,
                        password=None, qos=1, clean_session=True, keepalive=60,
                        reconnect_delay_min=0.1, reconnect_delay_max=1.0,
                        max_inflight=args.window, buffer=buf, subscriptions=[],
                        on_message=lambda t, p: None, on_state=on_state)
        up.start()
        deadline = time.monotonic() + args.timeout
        while len(buf) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        wall, cpu = time.perf_counter() - st["t0"], h.self_cpu_s() - st["c0"]
        print("RESULT " + json.dumps({"n": args.n, "window": args.window, "wall_s": wall,
                                      "msgs_s": args.n / wall, "cpu_s": cpu,
                                      "cpu_us_per_msg": cpu * 1e6 / args.n,
                                      "left": len(buf)}), flush=True)
        await up.stop(0.1)

    asyncio.run(main())


class Tally:
    """Subscriber side of the loss/duplication check: UniqueIds seen, in arrival order."""

    def __init__(self, n):
        self.seen = bytearray(n + 2)
        self.received = self.dups = self.out_of_order = self.foreign = 0
        self.last = 0

    def handle(self, topic, payload):
        self.received += 1
        start = payload.find(b'"UniqueId":"') + 12
        try:
            uid = int(payload[start:payload.index(b'"', start)])
        except ValueError:
            self.foreign += 1
            return None
        if uid < len(self.seen) and self.seen[uid]:
            self.dups += 1
        elif uid < len(self.seen):
            self.seen[uid] = 1
        if uid < self.last:
            self.out_of_order += 1
        self.last = uid
        return None


def subscriber_worker(args):
    """Child: subscribe ocpp/cp/# at QoS 1 and check every UniqueId 1..n arrives once."""
    import backend

    async def main():
        tally = Tally(args.n)
        host, port = args.mqtt.rsplit(":", 1)
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(
            lambda: backend.RawMqtt(tally, 0, 1), host, int(port))
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        missing = sum(1 for i in range(1, args.n + 1) if not tally.seen[i])
        print("STATS " + json.dumps({"received": tally.received, "distinct": args.n - missing,
                                     "missing": missing, "duplicates": tally.dups,
                                     "out_of_order": tally.out_of_order,
                                     "unparsed": tally.foreign}), flush=True)
        proto.disconnect()

    asyncio.run(main())


# ============================================================ phase 2 child: the flood
def flood_worker(args):
    """Child: --count charge points sending MeterValues CALLs as fast as the peer reads.

    Each socket keeps writing while asyncio's transport is not paused (high-water mark
    --high bytes) and its kernel send buffer is --sndbuf bytes: no answer is awaited."""
    import socket as socketlib

    from loadgen import RawWebSocket, read_go_line

    class FloodWS(RawWebSocket):
        paused = False
        resumed = None
        received = 0

        def connection_made(self, transport):
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socketlib.SOL_SOCKET, socketlib.SO_SNDBUF, args.sndbuf)
            transport.set_write_buffer_limits(high=args.high)
            super().connection_made(transport)

        def pause_writing(self):
            self.paused = True
            self.resumed = asyncio.get_running_loop().create_future()

        def resume_writing(self):
            self.paused = False
            if self.resumed is not None and not self.resumed.done():
                self.resumed.set_result(None)

    async def main():
        loop = asyncio.get_running_loop()
        host, port = args.host, args.port
        cps = []
        sem = asyncio.Semaphore(50)

        async def connect(i):
            name = f"CP{i:05d}"
            box = {}

            def on_frame(msg):
                box["ws"].received += 1

            async with sem:
                _, ws = await loop.create_connection(
                    lambda: FloodWS(on_frame, f"{host}:{port}", f"/ocpp/{name}", "ocpp1.6"),
                    host, port)
                box["ws"] = ws
                await asyncio.wait_for(ws.handshake, 20)
            return ws

        cps = await asyncio.gather(*(connect(i) for i in range(args.first,
                                                               args.first + args.count)))
        print("READY " + json.dumps({"connected": len(cps)}), flush=True)
        line = await read_go_line()
        _, t0, t1 = line.split()
        t1 = float(t1)
        sent = [0]
        head = '[2,"'
        tail = '","MeterValues",' + METER_PAYLOAD + "]"

        async def blast(ws, k):
            seq = 0
            while time.time() < t1 and not ws.closed:
                if ws.paused:
                    await ws.resumed
                    continue
                for _ in range(8):
                    seq += 1
                    ws.write_message(f"{head}{k}-{seq}{tail}")
                sent[0] += 8
                await asyncio.sleep(0)

        await asyncio.gather(*(blast(ws, k) for k, ws in enumerate(cps)))
        # everything written must leave this process before it is counted as sent
        deadline = time.time() + 120
        while time.time() < deadline and any(
                not ws.closed and ws.transport.get_write_buffer_size() for ws in cps):
            await asyncio.sleep(0.05)
        print("RESULT " + json.dumps({
            "sent": sent[0], "closed": sum(ws.closed for ws in cps),
            "frames_received": sum(ws.received for ws in cps),
            "unflushed_bytes": sum(ws.transport.get_write_buffer_size() for ws in cps
                                   if not ws.closed)}), flush=True)
        await asyncio.sleep(3600)       # keep the connections until killed

    asyncio.run(main())


def add_parsers(sub):
    """The sub-commands above, on buffer_bench.py's argparse sub-parsers (``args.run``
    is the worker)."""
    w = sub.add_parser("storage")
    w.set_defaults(run=storage_worker)
    w.add_argument("--n", type=int, required=True)
    w.add_argument("--reps", type=int, default=3)
    w.add_argument("--dir", required=True)
    w.add_argument("--group", type=int, default=500)
    w.add_argument("--take", type=int, default=200)
    w.add_argument("--drain-commit", type=int, default=2000)
    w = sub.add_parser("prefill")
    w.set_defaults(run=prefill_worker)
    w.add_argument("--dir", required=True)
    w.add_argument("--n", type=int, required=True)
    for name, worker in (("floor", floor_worker), ("uplinkmem", uplinkmem_worker)):
        w = sub.add_parser(name)
        w.set_defaults(run=worker)
        w.add_argument("--mqtt", required=True)
        w.add_argument("--n", type=int, required=True)
        w.add_argument("--window", type=int, default=200)
        w.add_argument("--timeout", type=float, default=900)
    w = sub.add_parser("subscriber")
    w.set_defaults(run=subscriber_worker)
    w.add_argument("--mqtt", required=True)
    w.add_argument("--n", type=int, required=True)
    w = sub.add_parser("flood")
    w.set_defaults(run=flood_worker)
    w.add_argument("--host", default="127.0.0.1")
    w.add_argument("--port", type=int, required=True)
    w.add_argument("--first", type=int, default=1)
    w.add_argument("--count", type=int, default=100)
    w.add_argument("--sndbuf", type=int, default=16384)
    w.add_argument("--high", type=int, default=8192)
