"""The upstream buffer's benchmarks: storage choice, ingest with the broker down, backlog
drain beside a floor, disk bytes per message and fsyncs per second.

Benchmark code only, never imported by the product.  Figures go to bench/BUFFER_RESULTS.md.

Phases (``--phases``, default all):

  1 storage   in one process pinned to CPU 0: ocpp_edge.store.diskbuffer.DiskBuffer as
              shipped vs ``AppendLog`` in bench/buffer_children.py (a minimal hand-written
              append-only log: length-prefixed, CRC-checked records appended to one file,
              one os.fsync per group commit, an ack offset rewritten + fsynced per group
              commit, no compaction) -> ingest msgs/s (group commit every ``--group``
              messages), drain msgs/s (take + ack in windows of ``--take``, commit every
              ``--drain-commit``), disk bytes per message.  Median of ``--reps``.
  2 ingest    the gateway (CPU 0) with its broker address pointing at a port where nothing
              listens; ``--flood-cps`` charge points (CPU 1) send MeterValues CALLs as fast as
              the gateway reads them.  Rate = rows in buffer.sqlite3 (read by this process,
              read-only) over the window; gateway CPU µs per stored message.
  3 drain     a backlog of ``--backlog`` records written with DiskBuffer itself; then a fresh
              Mosquitto and the gateway (CPU 0, mqtt.max_inflight = each of ``--windows``):
              time until the table is empty (count(*) polled every 0.5 s).  Beside it, in
              the same run, the floor: the same number of in-memory messages of the same
              size published at QoS 1 with the same window, paho on the asyncio/Tornado loop
              the way MqttUplink (ocpp_edge/north/uplink.py) drives it.  For each
              interpreter of ``--pythons``.
  4 steady    broker up, bench/backend.py (paho) answering, bench/loadgen.py open loop
              (``--steady-cps`` CPs, ``--steady-rate`` CALLs/s); fsync/fdatasync calls of
              the gateway counted with ``strace -f -c`` for ``--steady-duration`` s.

Usage:  .venv/bin/python bench/buffer_bench.py [--json out.json]   (about 10 minutes)
        .venv/bin/python bench/buffer_bench.py --backlog 200000 --windows 200 --storage-n 50000
Internal sub-commands (run as children; bench/buffer_children.py): storage, prefill, floor,
uplinkmem, subscriber, flood.

This file says what is measured: the four phases (methods of Driver), the report and the
options; bench/harness.py starts, pins, samples and tears down the processes, and
bench/buffer_children.py holds the code that runs in them.  It is longer than most bench
files because each phase is a method with its own measurement window (the drain's is split
into prefill, floor_run and drain_run), and because of the analysis helpers that belong to
those phases (timer_lateness, socket_queues, summarize_profile).
"""

import argparse
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import time

import buffer_children
import harness as h
from harness import LOAD_CPU, ROOT, SUT_CPU


# ============================================================ the driver
class Driver(h.DriverBase):
    def __init__(self, args, tmp, kids):
        self.a = args
        self.tmp = tmp
        self.kids = kids
        self.report = {**h.report_head(" ".join(["python", "bench/buffer_bench.py",
                                                  *sys.argv[1:]]), args.mosquitto),
                       "interpreters": {}}

    # -- processes -------------------------------------------------------------------------
    def mosquitto(self, name):
        return h.start_mosquitto(self.kids, self.a.mosquitto, name, LOAD_CPU)

    def gateway(self, name, python, ws_port, mqtt_port, buffer_dir, extra=()):
        keys = [("ocpp.listener.ws", f"127.0.0.1:{ws_port}"),
                ("mqtt.server", f"mqtt://127.0.0.1:{mqtt_port}"),
                ("mqtt.client_id", "bench-gw-" + name),
                ("buffer.dir", buffer_dir),
                ("log.level", "warning"),
                ("buffer.max_messages", "2000000"),
                ("buffer.max_bytes", "2GB"),
                ("auth.allow_anonymous", "true"),
                ("auth.password_file", ""),
                ("ocpp.max_message_rate", "0"),  # the bench floods on purpose
                *extra, *h.admin_listen(ROOT)]
        conf = os.path.join(self.tmp, f"{name}.conf")
        text = h.gateway_config(conf, keys)
        proc = h.start_gateway(self.kids, name, python, conf, SUT_CPU)
        proc.config = text
        return proc

    def child(self, name, python, argv, cpu, **kw):
        return self.kids.start(name, [python, os.path.abspath(__file__), *argv], cpu, **kw)

    @staticmethod
    def count_rows(db):
        return db.execute("SELECT count(*) FROM msg").fetchone()[0]

    @staticmethod
    def ro(path):
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)

    # -- phase 1 ---------------------------------------------------------------------------
    def phase_storage(self):
        a = self.a
        self.log(f"phase 1: DiskBuffer vs AppendLog, n={a.storage_n}, reps={a.reps}")
        self.quiet()
        d = os.path.join(self.tmp, "storage")
        os.makedirs(d)
        p = self.child("storage", a.pythons[0],
                       ["storage", "--n", str(a.storage_n), "--reps", str(a.reps),
                        "--dir", d, "--group", str(a.group), "--take", str(a.take),
                        "--drain-commit", str(a.drain_commit)], SUT_CPU)
        rows = p.expect_json("RESULT ", 900)
        self.kids.stop(p)
        out = {"rows": rows, "median": {}}
        for kind in ("sqlite", "log"):
            mine = [r for r in rows if r["store"] == kind]
            out["median"][kind] = {k: statistics.median(r[k] for r in mine)
                                   for k in ("ingest_msgs_s", "ingest_cpu_us", "drain_msgs_s",
                                             "drain_cpu_us", "bytes_per_msg",
                                             "bytes_per_msg_closed", "reopen_s")}
        self.report["storage"] = out
        for kind, m in out["median"].items():
            self.log(f"  {kind}: ingest {m['ingest_msgs_s']:,.0f}/s, drain "
                     f"{m['drain_msgs_s']:,.0f}/s, {m['bytes_per_msg']:.0f} B/msg")

    # -- phase 2 ---------------------------------------------------------------------------
    def phase_ingest(self, python, tag):
        a = self.a
        self.log(f"phase 2 [{tag}]: ingest with the broker down, {a.flood_cps} CPs, "
                 f"{a.flood_duration:g} s")
        self.quiet()
        bdir = os.path.join(self.tmp, f"ingest-{tag}")
        ws_port, dead = h.free_port(), h.free_port()
        gw = self.gateway(f"gw-ingest-{tag}", python, ws_port, dead, bdir,
                          [("ocpp.upstream.awaiting_timeout", "1h")])
        try:
            if not h.wait_port(ws_port, 20):
                raise RuntimeError(f"gateway did not listen: {gw.stderr_tail()}")
            time.sleep(1.0)
            floods, first = [], 1
            for i, count in enumerate(h.split(a.flood_cps, a.flood_procs)):
                floods.append(self.child(f"flood-{tag}-{i}", python,
                                         ["flood", "--port", str(ws_port), "--first", str(first),
                                          "--count", str(count)], LOAD_CPU, stdin=True))
                first += count
            connected = sum(f.expect_json("READY ", 60)["connected"] for f in floods)
            db = self.ro(os.path.join(bdir, "buffer.sqlite3"))
            t_go, cpu_go = time.time(), h.proc_cpu_s(gw.pid)
            t0, t1 = h.go(floods, a.warmup, a.flood_duration)

            def sample():
                return (time.time(), self.count_rows(db), h.proc_cpu_s(gw.pid),
                        h.cpu_times(SUT_CPU))

            h.sleep_until(t0)
            w0, n0, c0, s0 = sample()
            # Poll every 0.1 s: the instants the count changes are the gateway's commits.
            commits = [(w0, n0, c0)]
            while time.time() < t1:
                time.sleep(0.1)
                t, n = time.time(), self.count_rows(db)
                if n != commits[-1][1]:
                    commits.append((t, n, h.proc_cpu_s(gw.pid)))
            w1, n1, c1, s1 = sample()
            rows = n1 - n0
            gaps = sorted(b[0] - a_[0] for a_, b in zip(commits[1:], commits[2:], strict=False))
            seen = commits[1:]
            if len(seen) >= 2:      # first to last commit seen inside the window
                rows_c = seen[-1][1] - seen[0][1]
                rate_c = rows_c / (seen[-1][0] - seen[0][0])
                cpu_c = (seen[-1][2] - seen[0][2]) * 1e6 / rows_c if rows_c else None
            else:
                rate_c = cpu_c = None
            res = [f.expect_json("RESULT ", 150) for f in floods]
            sent = sum(r["sent"] for r in res)
            # Let the gateway read what is still queued in its sockets, then compare.
            t_wait = time.time()
            last, stable_since = -1, t_wait
            while time.time() - t_wait < a.settle_max:
                n = self.count_rows(db)
                if n != last:
                    last, stable_since = n, time.time()
                q = socket_queues(ws_port)
                if (time.time() - stable_since > 2.0 and not q["gateway_recv_q_bytes"]
                        and not q["clients_send_q_bytes"]):
                    break
                time.sleep(0.25)
            cpu_done = h.proc_cpu_s(gw.pid)
            queued = socket_queues(ws_port)
            gw_cpu_settle = h.proc_cpu_s(gw.pid)
            time.sleep(1.0)
            gw_cpu_idle_pct = 100 * (h.proc_cpu_s(gw.pid) - gw_cpu_settle)
            out = {"python": python, "cps_connected": connected, "window_s": w1 - w0,
                   "rows_in_window": rows, "rows_per_s_edges": rows / (w1 - w0),
                   "rows_per_s": rate_c, "gw_cpu_us_per_msg": cpu_c,
                   "commits_seen_in_window": len(seen),
                   "commit_gap_s": {"median": statistics.median(gaps) if gaps else None,
                                    "max": gaps[-1] if gaps else None,
                                    "min": gaps[0] if gaps else None},
                   "gw_cpu_pct": 100 * (c1 - c0) / (w1 - w0),
                   "cpu0_foreign_pct": h.foreign_pct(s0, s1, c1 - c0, w1 - w0),
                   "frames_sent_total": sent, "rows_final": last,
                   # every frame sent, stored, over the time from 'go' to the last commit
                   "whole_rows_per_s": last / (stable_since - t_go),
                   "whole_s": stable_since - t_go,
                   "whole_gw_cpu_us_per_msg": (cpu_done - cpu_go) * 1e6 / last if last else None,
                   "timer_lateness_s": timer_lateness(gw.log_path),
                   "settle_s": round(time.time() - t_wait, 1),
                   "socket_queues_after_settle": queued,
                   "gw_cpu_pct_after_settle": gw_cpu_idle_pct,
                   "flood": res, "gw_alive": gw.alive(), "gw_stderr": gw.stderr_tail(5),
                   "config": gw.config}
            db.close()
            self.log(f"  whole run: {out['whole_rows_per_s']:,.0f} rows/s, "
                     f"{out['whole_gw_cpu_us_per_msg'] or 0:.0f} µs CPU/msg over "
                     f"{out['whole_s']:.1f} s; timer lateness {out['timer_lateness_s']}")
            self.log(f"  window: {out['rows_per_s'] or 0:,.0f} rows/s between commits "
                     f"({out['rows_per_s_edges']:,.0f} edge to edge), "
                     f"{out['gw_cpu_us_per_msg'] or 0:.0f} µs CPU/msg, {len(seen)} commits seen, "
                     f"gaps {out['commit_gap_s']}; sent {sent:,}, stored {last:,} "
                     f"(settled in {out['settle_s']} s)")
            return out
        finally:
            for p in list(self.kids.procs):
                if p.name.startswith(f"flood-{tag}") or p is gw:
                    self.kids.stop(p)

    # -- phase 3 ---------------------------------------------------------------------------
    def prefill(self, n, name):
        d = os.path.join(self.tmp, name)
        self.log(f"prefill {n:,} records with DiskBuffer into {d}")
        p = self.child("prefill-" + name, self.a.pythons[0],
                       ["prefill", "--dir", d, "--n", str(n)], LOAD_CPU)
        res = p.expect_json("RESULT ", 1200)
        self.kids.stop(p)
        res["dir"] = d
        self.log(f"  {res['wall_s']:.1f} s, {res['bytes_closed'] / n:.0f} B/msg on disk")
        return res

    def floor_run(self, python, window, n, kind="floor"):
        self.quiet()
        mosq, port = self.mosquitto(f"mosq-{kind}-{window}")
        try:
            p = self.child(f"{kind}-{window}", python,
                           [kind, "--mqtt", f"127.0.0.1:{port}", "--n", str(n),
                            "--window", str(window)], SUT_CPU)
            s0 = h.cpu_times(SUT_CPU)
            res = p.expect_json("RESULT ", 900)
            s1 = h.cpu_times(SUT_CPU)
            res["cpu0_foreign_pct"] = h.foreign_pct(s0, s1, res["cpu_s"], res["wall_s"])
            self.kids.stop(p)
            return res
        finally:
            self.kids.stop(mosq)

    def drain_run(self, python, window, pre, name, verify=False, profile=None):
        a = self.a
        n = pre["n"]
        bdir = os.path.join(self.tmp, "drain-" + name)
        shutil.rmtree(bdir, ignore_errors=True)
        shutil.copytree(pre["dir"], bdir)
        self.quiet()
        mosq, port = self.mosquitto("mosq-" + name)
        sub = None
        gw = None
        try:
            if verify:
                sub = self.child("sub-" + name, python,
                                 ["subscriber", "--mqtt", f"127.0.0.1:{port}", "--n", str(n)],
                                 LOAD_CPU)
                if sub.expect("READY", 10) is None:
                    raise RuntimeError(f"subscriber not ready: {sub.stderr_tail()}")
            db = self.ro(os.path.join(bdir, "buffer.sqlite3"))
            t_spawn = time.monotonic()
            gw = self.gateway("gw-" + name, python, h.free_port(), port, bdir,
                              [("mqtt.max_inflight", str(window))])
            cpu_prev = 0.0
            trace = []            # (t since spawn, rows, gateway cpu s)
            spy = None
            s0 = h.cpu_times(SUT_CPU)
            while True:
                t = time.monotonic() - t_spawn
                rows = self.count_rows(db)
                try:
                    cpu_prev = h.proc_cpu_s(gw.pid)
                except OSError:
                    pass
                trace.append((round(t, 3), rows, cpu_prev))
                if profile and spy is None and rows < n * 0.9:
                    spy = subprocess.Popen(
                        [profile, "record", "--pid", str(gw.pid), "--duration",
                         str(a.profile_s), "--rate", "200", "--format", "raw", "--output",
                         os.path.join(self.tmp, f"profile-{name}.txt"), "--nonblocking"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                if rows == 0 or not gw.alive() or t > a.drain_timeout:
                    break
                time.sleep(0.5)
            s1 = h.cpu_times(SUT_CPU)
            db.close()
            out = {"python": python, "window": window, "n": n, "trace": trace,
                   "gw_alive": gw.alive(), "gw_stderr": gw.stderr_tail(5)}
            first = next((i for i, x in enumerate(trace) if x[1] < n), None)
            if trace[-1][1] == 0 and first is not None:
                t_first, rows_first = trace[first][0], trace[first][1]
                t_end = trace[-1][0]
                out["time_to_empty_s"] = t_end              # from the gateway's spawn
                out["startup_s"] = t_first                  # until the first rows were gone
                out["drain_s"] = t_end - t_first
                out["msgs_s"] = rows_first / (t_end - t_first) if t_end > t_first else None
                hi = next(x for x in trace if x[1] <= 0.9 * n)
                lo = next(x for x in trace if x[1] <= 0.1 * n)
                out["steady_msgs_s"] = (hi[1] - lo[1]) / (lo[0] - hi[0]) \
                    if lo[0] > hi[0] else None
                out["gw_cpu_us_per_msg"] = (trace[-1][2] - trace[first][2]) * 1e6 / rows_first
                out["cpu0_foreign_pct"] = h.foreign_pct(s0, s1, trace[-1][2] - trace[0][2],
                                                        max(1e-9, t_end - trace[0][0]))
            else:
                out["error"] = f"not drained: {trace[-1][1]} rows left after {trace[-1][0]} s"
            if spy is not None:
                try:
                    spy.wait(a.profile_s + 30)
                except subprocess.TimeoutExpired:
                    spy.kill()
                out["profile"] = os.path.join(self.tmp, f"profile-{name}.txt")
            out["files_after"] = {f: os.path.getsize(os.path.join(bdir, f))
                                  for f in os.listdir(bdir)}
            if sub is not None:
                time.sleep(1.0)
                sub.stop(timeout=5)
                line = None
                while True:
                    try:
                        line = sub.lines.get(timeout=2)
                    except Exception:
                        break
                    if line is None or line.startswith("STATS "):
                        break
                out["verify"] = json.loads(line[6:]) if line and line.startswith("STATS ") \
                    else {"error": "no STATS", "stderr": sub.stderr_tail()}
            return out
        finally:
            if gw is not None:
                self.kids.stop(gw)
            if sub is not None:
                self.kids.stop(sub)
            self.kids.stop(mosq)
            shutil.rmtree(bdir, ignore_errors=True)

    def phase_drain(self):
        a = self.a
        pre = self.prefill(a.backlog, "backlog")
        self.report["prefill"] = {k: v for k, v in pre.items() if k != "dir"}
        pre_other = pre
        if len(a.windows) > 1 and a.backlog_other and a.backlog_other != a.backlog:
            pre_other = self.prefill(a.backlog_other, "backlog-other")
        results = []
        for python in a.pythons:
            paho = self.report["interpreters"][python]["paho-mqtt"]
            for k, window in enumerate(a.windows):
                p_ = pre if k == 0 else pre_other
                n = p_["n"]
                attempts = []
                for _ in range(1 + a.retries):
                    self.log(f"phase 3 [paho {paho}, window {window}, {n:,}]: floor ...")
                    fl = self.floor_run(python, window, n)
                    self.log(f"  floor {fl['msgs_s']:,.0f} msg/s ({fl['cpu_us_per_msg']:.1f} µs "
                             f"CPU/msg, CPU 0 foreign {fl['cpu0_foreign_pct']:.0f} %); "
                             "gateway drain ...")
                    gw = self.drain_run(python, window, p_, f"p{paho}-w{window}")
                    gw.pop("trace") if not a.keep_trace else None
                    worst = max(fl["cpu0_foreign_pct"], gw.get("cpu0_foreign_pct", 100))
                    attempts.append((worst, fl, gw))
                    if worst <= 10:
                        break
                    self.log(f"  disturbed: other processes took {worst:.0f} % of CPU 0")
                worst, fl, gw = min(attempts, key=lambda x: x[0])
                r = {"paho": paho, "python": python, "window": window, "backlog": n,
                     "floor": fl, "gateway": gw, "attempts_foreign_pct":
                     [round(x[0]) for x in attempts]}
                if a.uplink_mem:
                    um = self.floor_run(python, window, n, "uplinkmem")
                    r["uplink_mem"] = um
                    self.log(f"  MqttUplink + in-memory FIFO {um['msgs_s']:,.0f} msg/s "
                             f"({um['cpu_us_per_msg']:.1f} µs CPU/msg)")
                if gw.get("msgs_s"):
                    r["ratio"] = gw["msgs_s"] / fl["msgs_s"]
                    self.log(f"  gateway {gw['msgs_s']:,.0f} msg/s (steady "
                             f"{gw['steady_msgs_s']:,.0f}), {gw['gw_cpu_us_per_msg']:.1f} µs "
                             f"CPU/msg, empty after {gw['time_to_empty_s']:.1f} s "
                             f"(startup {gw['startup_s']:.1f} s); ratio {r['ratio']:.2f}")
                else:
                    self.log(f"  gateway FAILED: {gw.get('error')} {gw['gw_stderr']}")
                results.append(r)
        self.report["drain"] = results
        if a.verify:
            pre_v = self.prefill(a.verify, "verify")
            for python in a.pythons:
                paho = self.report["interpreters"][python]["paho-mqtt"]
                self.log(f"verify [paho {paho}]: {a.verify:,} records through a QoS 1 "
                         "subscriber")
                v = self.drain_run(python, a.windows[0], pre_v, f"verify-{paho}", verify=True)
                v.pop("trace", None)
                self.report.setdefault("verify", []).append({"paho": paho, **v})
                self.log(f"  {v.get('verify')}")
        if a.profile:
            for python in a.pythons:
                paho = self.report["interpreters"][python]["paho-mqtt"]
                self.log(f"profile [paho {paho}]: py-spy for {a.profile_s} s during a drain")
                v = self.drain_run(python, a.windows[0], pre_other, f"profile-{paho}",
                                   profile=a.profile)
                v.pop("trace", None)
                if v.get("profile") and os.path.exists(v["profile"]):
                    v["profile_summary"] = summarize_profile(v["profile"])
                    keep = os.path.join(a.profile_dir, f"buffer-drain-paho{paho}.collapsed")
                    if a.profile_dir:
                        shutil.copy(v["profile"], keep)
                        v["profile_copy"] = keep
                self.report.setdefault("profile", []).append({"paho": paho, **v})

    # -- phase 4 ---------------------------------------------------------------------------
    def phase_steady(self):
        a = self.a
        python = a.pythons[0]
        self.log(f"phase 4: steady load {a.steady_rate:g} CALLs/s over {a.steady_cps} CPs, "
                 f"strace fsync/fdatasync for {a.steady_duration:g} s")
        self.quiet()
        mosq, port = self.mosquitto("mosq-steady")
        procs = []
        try:
            procs.append(h.start_backend(self.kids, "backend", python, port, LOAD_CPU, "paho",
                                         timeout=10))
            ws_port = h.free_port()
            bdir = os.path.join(self.tmp, "steady")
            gw = self.gateway("gw-steady", python, ws_port, port, bdir)
            procs.append(gw)
            if not h.wait_port(ws_port, 20):
                raise RuntimeError(f"gateway did not listen: {gw.stderr_tail()}")
            pr = subprocess.run(["taskset", "-c", str(LOAD_CPU),
                                 *h.loadgen_argv(python, ws_port, "probe",
                                                 extra=["--timeout", "30"])],
                                capture_output=True, text=True)
            if pr.returncode != 0:
                raise RuntimeError(f"probe failed: {pr.stdout} {pr.stderr[-300:]}")
            lgs, first = [], 1
            counts = h.split(a.steady_cps, 2)
            for i, count in enumerate(counts):
                lg = self.kids.start(f"loadgen-steady-{i}", h.loadgen_argv(
                    python, ws_port, "open", first, count, "MeterValues",
                    rate=a.steady_rate * count / a.steady_cps), LOAD_CPU, stdin=True)
                procs.append(lg)
                lgs.append(lg)
                first += count
            for lg in lgs:
                lg.expect_json("READY ", 60)
            t0, t1 = h.go(lgs, a.warmup, a.steady_duration + 1.0)
            h.sleep_until(t0)
            c0 = h.proc_cpu_s(gw.pid)
            w0 = time.monotonic()
            st = subprocess.Popen(["strace", "-f", "-c", "-e", "trace=fsync,fdatasync",
                                   "-p", str(gw.pid)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
            time.sleep(a.steady_duration)
            st.send_signal(signal.SIGINT)
            _, err = st.communicate(timeout=20)
            w1 = time.monotonic()
            c1 = h.proc_cpu_s(gw.pid)
            calls = {}
            for line in err.splitlines():
                f = line.split()
                if f and f[-1] in ("fsync", "fdatasync") and len(f) >= 5:
                    calls[f[-1]] = int(f[3])
            res = [lg.expect_json("RESULT ", 60) for lg in lgs]
            answered = sum(r["answered_in_window"] for r in res)
            window = sum(r["window_s"] for r in res) / len(res)
            lat = sorted(x for r in res for x in r["lat_us"])
            out = {"python": python, "strace_s": w1 - w0, "fsync_calls": calls,
                   "fsyncs_per_s": sum(calls.values()) / a.steady_duration,
                   "strace_summary": err.strip().splitlines()[-8:],
                   "answered_per_s": answered / window,
                   "errors": sum(r["errors_in_window"] for r in res),
                   "lat_p50_ms": h.percentile(lat, 50) / 1e3 if lat else None,
                   "lat_p99_ms": h.percentile(lat, 99) / 1e3 if lat else None,
                   "gw_cpu_pct_under_strace": 100 * (c1 - c0) / (w1 - w0),
                   "buffer_files": {f: os.path.getsize(os.path.join(bdir, f))
                                    for f in os.listdir(bdir)},
                   "gw_stderr": gw.stderr_tail(5)}
            self.report["steady"] = out
            self.log(f"  {out['fsyncs_per_s']:.1f} fsync-family calls/s ({calls}); answered "
                     f"{out['answered_per_s']:.0f}/s, p99 {out['lat_p99_ms']} ms")
        finally:
            for p in reversed(procs):
                self.kids.stop(p)
            self.kids.stop(mosq)

    # -- all -------------------------------------------------------------------------------
    def run(self):
        a = self.a
        for python in dict.fromkeys(a.pythons + a.ingest_pythons):
            self.report["interpreters"][python] = h.py_info(python)
        self.log(f"machine: {self.report['machine']}")
        for python, info in self.report["interpreters"].items():
            self.log(f"{python}: python {info['python']}, paho {info['paho-mqtt']}, "
                     f"tornado {info['tornado']}")
        t = time.monotonic()
        if "1" in a.phases:
            self.phase_storage()
        if "2" in a.phases:
            self.report["ingest"] = [self.phase_ingest(p, self.report["interpreters"][p]
                                                       ["paho-mqtt"]) for p in a.ingest_pythons]
        if "3" in a.phases:
            self.phase_drain()
        if "4" in a.phases:
            self.phase_steady()
        self.report["elapsed_s"] = time.monotonic() - t
        print(render(self.report))


def timer_lateness(log_path):
    """How late the gateway's reconnect timer fired: for each 'retrying in X s' warning,
    (time of the next connect attempt's warning) - (time of this one + X).  A measure of
    how long the event loop went without running its timers."""
    import datetime
    import re
    pat = re.compile(r"^(\S+ \S+) WARNING ocpp_edge\.mqtt: MQTT: cannot reach .* retrying in "
                     r"([0-9.]+) s")
    marks = []
    try:
        with open(log_path, errors="replace") as f:
            for line in f:
                m = pat.match(line)
                if m:
                    t = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
                    marks.append((t.timestamp(), float(m.group(2))))
    except OSError:
        return None
    late = [b[0] - (a[0] + a[1]) for a, b in zip(marks, marks[1:], strict=False)]
    return {"attempts": len(marks), "max_late_s": round(max(late), 1) if late else None,
            "late_s": [round(x, 1) for x in late]}


def socket_queues(port):
    """Bytes queued in the TCP sockets of the gateway's WebSocket port, from ``ss -tn``:
    recv_q of the gateway's side (not yet read by it), send_q of the clients' side."""
    out = subprocess.run(["ss", "-tnH", "state", "established"], capture_output=True,
                         text=True).stdout
    recv_q = send_q = conns = nonzero = 0
    for line in out.splitlines():
        f = line.split()
        if len(f) < 4:
            continue
        rq, sq, local, peer = int(f[0]), int(f[1]), f[2], f[3]
        if local.endswith(f":{port}"):
            conns += 1
            recv_q += rq
            nonzero += rq > 0
        elif peer.endswith(f":{port}"):
            send_q += sq
    return {"gateway_conns": conns, "gateway_recv_q_bytes": recv_q,
            "gateway_conns_with_unread_bytes": nonzero, "clients_send_q_bytes": send_q}


def summarize_profile(path, top=20):
    """py-spy collapsed stacks → sample shares: self time by component and by function,
    inclusive time by function (line numbers dropped)."""
    import re
    strip = re.compile(r":\d+\)$")
    own, incl, comp, total = {}, {}, {}, 0

    def component(frame):
        for key, name in (("paho/", "paho-mqtt"), ("store/diskbuffer.py", "DiskBuffer (+sqlite3)"),
                          ("north/uplink.py", "MqttUplink"), ("tornado/", "tornado"),
                          ("asyncio/", "asyncio"), ("threading.py", "threading (paho)"),
                          ("ocpp_edge/", "ocpp_edge (other)"), ("json/", "json")):
            if key in frame:
                return name
        return "other"

    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            total += n
            frames = [strip.sub(")", fr) for fr in stack.split(";")]
            own[frames[-1]] = own.get(frames[-1], 0) + n
            c = component(frames[-1])
            comp[c] = comp.get(c, 0) + n
            for fr in set(frames):
                incl[fr] = incl.get(fr, 0) + n

    def pct(d, k=top):
        return [(key, round(100 * v / total, 1)) for key, v in
                sorted(d.items(), key=lambda kv: -kv[1])[:k]]
    return {"samples": total, "components": pct(comp, 20), "self": pct(own),
            "inclusive": pct(incl, 40)}


def render(r):
    out = [f"# buffer_bench ({r['started']}, {r.get('elapsed_s', 0):.0f} s)", ""]
    s = r.get("storage")
    if s:
        m = s["median"]
        out += [f"| storage (median of {len(s['rows']) // 2}) | DiskBuffer (SQLite WAL) | "
                "AppendLog | log / sqlite |", "|---|---:|---:|---:|"]
        for key, label, spec in (("ingest_msgs_s", "ingest msgs/s", "{:,.0f}"),
                                 ("ingest_cpu_us", "ingest CPU µs/msg", "{:.1f}"),
                                 ("drain_msgs_s", "drain msgs/s", "{:,.0f}"),
                                 ("drain_cpu_us", "drain CPU µs/msg", "{:.1f}"),
                                 ("bytes_per_msg", "disk bytes/msg (open)", "{:.0f}"),
                                 ("bytes_per_msg_closed", "disk bytes/msg (closed)", "{:.0f}")):
            a_, b_ = m["sqlite"][key], m["log"][key]
            out.append(f"| {label} | {spec.format(a_)} | {spec.format(b_)} | {b_ / a_:.2f} |")
        out.append("")
    for g in r.get("ingest", []):
        out.append(f"ingest, broker down ({g['python']}): {g['whole_rows_per_s']:,.0f} rows/s "
                   f"(go → last commit, {g['whole_s']:.1f} s), "
                   f"{g['whole_gw_cpu_us_per_msg'] or 0:.0f} µs gateway CPU/msg; "
                   f"{g['commits_seen_in_window']} commit(s) seen in the "
                   f"{g['window_s']:.0f} s window; CPU 0 foreign {g['cpu0_foreign_pct']:.0f} %; "
                   f"sent {g['frames_sent_total']:,}, stored {g['rows_final']:,}; "
                   f"timer lateness max {(g['timer_lateness_s'] or {}).get('max_late_s')} s")
    if r.get("drain"):
        out += ["", "| paho | window | backlog | floor msg/s | gateway msg/s (steady) | ratio | "
                "gw µs/msg | floor µs/msg | empty after s (startup) | uplink+memory msg/s "
                "(µs/msg) | CPU 0 foreign % floor / gw |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for d in r["drain"]:
            g, f = d["gateway"], d["floor"]
            um = d.get("uplink_mem")
            ums = f" {um['msgs_s']:,.0f} ({um['cpu_us_per_msg']:.1f}) |" if um else " – |"
            ums += (f" {f['cpu0_foreign_pct']:.0f} / {g.get('cpu0_foreign_pct', -1):.0f} |")
            if g.get("msgs_s"):
                out.append(f"| {d['paho']} | {d['window']} | {d['backlog']:,} | "
                           f"{f['msgs_s']:,.0f} | "
                           f"{g['msgs_s']:,.0f} ({g['steady_msgs_s']:,.0f}) | "
                           f"{d['ratio']:.2f} | {g['gw_cpu_us_per_msg']:.1f} | "
                           f"{f['cpu_us_per_msg']:.1f} | {g['time_to_empty_s']:.1f} "
                           f"({g['startup_s']:.1f}) |" + ums)
            else:
                out.append(f"| {d['paho']} | {d['window']} | {d['backlog']:,} | "
                           f"{f['msgs_s']:,.0f} | FAILED: {g.get('error')} | | | | |" + ums)
    for v in r.get("verify", []):
        out.append(f"verify paho {v['paho']}: {v.get('verify')}")
    if r.get("prefill"):
        p = r["prefill"]
        out.append(f"prefill: {p['n']:,} rows, {p['bytes_closed'] / p['n']:.0f} disk B/msg "
                   f"(closed), {p['bytes_open'] / p['n']:.0f} (open)")
    st = r.get("steady")
    if st:
        out.append(f"steady: {st['fsyncs_per_s']:.1f} fsync-family calls/s {st['fsync_calls']}"
                   f" at {st['answered_per_s']:.0f} answered CALLs/s")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    buffer_children.add_parsers(sub)

    venv = os.path.join(ROOT, ".venv", "bin", "python")
    bookworm = os.path.join(ROOT, ".venv-bookworm", "bin", "python")
    ap.add_argument("--phases", default="1234", help="subset of 1234")
    ap.add_argument("--pythons", default=f"{venv},{bookworm}",
                    help="interpreters for phase 3 (the first also runs phases 1, 4)")
    ap.add_argument("--ingest-pythons", default=None,
                    help="interpreters for phase 2 (default: --pythons)")
    ap.add_argument("--storage-n", type=int, default=200_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--group", type=int, default=500, help="phase 1 ingest group commit")
    ap.add_argument("--take", type=int, default=200, help="phase 1 drain window")
    ap.add_argument("--drain-commit", type=int, default=2000, help="phase 1 drain commit")
    ap.add_argument("--flood-cps", type=int, default=200)
    ap.add_argument("--flood-procs", type=int, default=2)
    ap.add_argument("--flood-duration", type=float, default=15.0)
    ap.add_argument("--settle-max", type=float, default=60.0,
                    help="phase 2: seconds to wait for the gateway to store what was sent")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--backlog", type=int, default=1_000_000)
    ap.add_argument("--windows", default="200,500", help="mqtt.max_inflight values, phase 3")
    ap.add_argument("--backlog-other", type=int, default=300_000,
                    help="backlog for the windows after the first (0: --backlog)")
    ap.add_argument("--uplink-mem", action="store_true",
                    help="phase 3: also run the product's MqttUplink over an in-memory FIFO")
    ap.add_argument("--drain-timeout", type=float, default=400.0)
    ap.add_argument("--verify", type=int, default=0,
                    help="phase 3: also drain this many records through a QoS 1 subscriber "
                         "that checks every UniqueId arrives once, in order (0: skip)")
    ap.add_argument("--profile", default=None, metavar="PY_SPY",
                    help="phase 3: path of py-spy; profile one extra drain per interpreter")
    ap.add_argument("--profile-s", type=int, default=20)
    ap.add_argument("--profile-dir", default=None, help="copy the collapsed stacks here")
    ap.add_argument("--keep-trace", action="store_true", help="keep drain poll traces in JSON")
    ap.add_argument("--steady-cps", type=int, default=200)
    ap.add_argument("--steady-rate", type=float, default=300.0)
    ap.add_argument("--steady-duration", type=float, default=10.0)
    ap.add_argument("--retries", type=int, default=1,
                    help="phase 3: measure a floor/gateway pair again when other processes "
                         "took more than 10%% of CPU 0 during it; the less disturbed is kept")
    ap.add_argument("--quiet-wait", type=float, default=20.0,
                    help="before each measurement wait up to this long for idle CPUs")
    ap.add_argument("--mosquitto", default="/usr/sbin/mosquitto")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--keep-tmp", action="store_true")
    args = ap.parse_args()

    if args.cmd:
        return args.run(args)

    args.pythons = [os.path.abspath(p) for p in args.pythons.split(",") if p]
    args.ingest_pythons = ([os.path.abspath(p) for p in args.ingest_pythons.split(",") if p]
                           if args.ingest_pythons else args.pythons)
    args.windows = [int(x) for x in args.windows.split(",") if x]

    with h.workspace("ocpp-edge-bufbench-", args.keep_tmp) as (tmp, kids):
        drv = Driver(args, tmp, kids)
        try:
            drv.run()
            return 0
        except KeyboardInterrupt:
            print("# interrupted; tearing down", file=sys.stderr)
            return 130
        finally:
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(drv.report, f, indent=1)

if __name__ == "__main__":
    sys.exit(main() or 0)
