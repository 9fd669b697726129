"""ocpp-edge benchmark driver: the floor, ocpp-edge and the reference bridge side by side.

For each system under test (SUT) -- ``floor`` (bench/floor.py, a bare WebSocket<->MQTT
forwarder), ``ocpp-edge`` (``python -m ocpp_edge --config <generated>``) and ``refbridge``
(bench/refbridge.py, an asyncio bridge on the PyPI ``ocpp`` library and paho) -- this script

  1. starts a fresh Mosquitto on a free 127.0.0.1 port (persistence off, no in-flight limit),
  2. starts bench/backend.py (answers every CALL at once over MQTT),
  3. starts the SUT pinned to CPU 0 (``taskset -c 0``); Mosquitto, the backend and the load
     generators run on CPU 1,
  4. waits until one probe Heartbeat makes the full round trip,
  5. closed loop: N charge points each keep one CALL outstanding -> answered CALLs/s,
  6. open loop: a fixed CALL rate over M charge points -> round-trip p50/p99,
  7. reads the SUT's CPU time (/proc/<pid>/stat utime+stime) at the window's edges and
     reports CPU microseconds per answered CALL,
  8. tears everything down (process groups; also on Ctrl-C, SIGTERM or an exception),
and prints one markdown table (``--json FILE`` also writes everything as JSON).

Phases (``--phases``, comma-separated; default ``closed,open`` -- steps 5 and 6 above;
``all`` is every one; ``make bench`` runs all of them for two interpreters):

  closed   the closed loop above (--closed-cps, --closed-duration).
  open     the open loop above (--open-cps, --open-rate, --open-duration).
  scale    for each N of --scale-cps (10,1000,5000): N charge points connected, of which
           min(N, --scale-open-cps) run an open loop at --scale-rate, then (reconnected)
           min(N, --scale-closed-cps) a closed loop; the others only send a Heartbeat every
           --idle-heartbeat s.  SUT CPU µs per answered CALL (those Heartbeats counted as
           CALLs too), p50/p99 round trip, CALLs/s: is the cost per message flat in N?
  idle     for each N of --idle-cps (1000,10000), on a fresh SUT: RSS (VmRSS) and PSS
           (smaps_rollup) once its start-up work is done, then N charge points each send a
           BootNotification and then a Heartbeat every --idle-heartbeat s; RSS/PSS once RSS
           has settled -> MB total and KB per connected CP.  The load generators run
           --cps-per-lg charge points each; how many connected is counted from their READY
           reports.  This script lifts its RLIMIT_NOFILE to the hard limit (the SUT inherits
           it); ocpp-edge gets ocpp.listener.ws.max_connections = 1000000.
  wakeups  context switches of all the SUT's threads (/proc/<pid>/task/*/status, voluntary +
           nonvoluntary) and its CPU % over --wakeup-window s: on the fresh SUT with no
           charge point (the idle gateway), and, with ``idle``, with the N idle ones
           connected (their Heartbeats alone are N / --idle-heartbeat messages/s).
  startup  --startup-reps fresh starts: from Popen until the port accepts TCP, until the
           system's own readiness signal (ocpp-edge: READY=1 on a NOTIFY_SOCKET read here;
           floor and reference bridge: the READY line they print once subscribed), until a
           probe Heartbeat (probe started beforehand) is answered.  Median and max.  With
           ``wakeups``, ocpp-edge's idle wake-ups are also measured with NOTIFY_SOCKET set.
  drain    bench/buffer_bench.py phase 3 for --python: a --drain-backlog (1,000,000) backlog
           drained by ocpp-edge beside that bench's in-memory floor (same messages, QoS 1,
           same window and paho).  The reference bridge has no buffer: n/a.

Each phase prints its own table (floor | ocpp-edge | reference bridge | ratios); ``*``
marks figures of windows that other processes disturbed.

If ``ocpp_edge`` cannot be imported by the chosen interpreter, only the floor is run.

This file says what is measured; bench/harness.py (processes, ports, the broker, the
gateway's config, /proc sampling, the run's description) does the starting, pinning,
sampling and tearing down, and bench/run_report.py turns the JSON report into the tables.
It is longer than most bench files because it holds seven phases, each a method of
SystemRun (the measured load window ``phase``, ``idle_phase``, ``wakeups``, ``startup_*``,
``run_drain``), and their options.
"""

import argparse
import json
import os
import queue
import shutil
import socket
import statistics
import sys
import threading
import time

import harness as h
from run_report import SYSTEMS, disturbed, show

PHASES = ("closed", "open", "scale", "idle", "wakeups", "startup", "drain")
DEFAULT_PHASES = ("closed", "open")


# ----------------------------------------------------------------------------- one system
class SystemRun:
    """Broker + backend + SUT, then the closed- and open-loop phases, then teardown."""

    def __init__(self, name, args, kids, tmp):
        self.name = name
        self.args = args
        self.kids = kids
        self.tmp = tmp
        self.result = {"system": name}
        self.sut_starts = 0
        self.sut_logs = []           # stderr files of every SUT instance this run started

    def start_sut(self, ws_port, mqtt_port, env=None):
        """A new SUT instance (each has its own stderr file: sut-<name>[-k].stderr)."""
        self.sut_starts += 1
        tag = "" if self.sut_starts == 1 else f"-{self.sut_starts}"
        proc = self._start_sut(ws_port, mqtt_port, f"sut-{self.name}{tag}", env)
        proc.ws_port = ws_port
        self.sut_logs.append(proc.log_path)
        return proc

    def _start_sut(self, ws_port, mqtt_port, pname, env):
        a = self.args
        if self.name == "floor":
            argv = [a.python, os.path.join(h.BENCH, "floor.py"), "--ws", f"127.0.0.1:{ws_port}",
                    "--mqtt", f"127.0.0.1:{mqtt_port}", "--paho-writes", a.floor_writes]
        elif self.name == "refbridge":            # bench/refbridge.py: the `ocpp` library
            argv = [a.python, os.path.join(h.BENCH, "refbridge.py"), "--ws",
                    f"127.0.0.1:{ws_port}", "--mqtt", f"127.0.0.1:{mqtt_port}"]
        else:
            keys = [("ocpp.listener.ws", f"127.0.0.1:{ws_port}"),
                    ("mqtt.server", f"mqtt://127.0.0.1:{mqtt_port}"),
                    ("mqtt.client_id", "bench-gw"),
                    ("log.level", "warning")]
            if h.spec_has_key(a.gw_src, "buffer.dir"):
                # keep the disk buffer inside this run's temporary directory, not in the
                # product's default /var/lib/ocpp-edge (same file system here: /tmp and
                # /var/lib are both on /)
                keys.append(("buffer.dir", os.path.join(self.tmp, "gw-buffer")))
            if h.spec_has_key(a.gw_src, "auth.allow_anonymous"):
                # the load generator's charge points carry no credentials and send as
                # fast as they can: measured is the gateway, not its limits
                keys += [("auth.allow_anonymous", "true"), ("auth.password_file", ""),
                         ("ocpp.max_message_rate", "0")]
            if h.spec_has_key(a.gw_src, "ocpp.listener.ws.max_conn_rate"):
                # all charge points connect at once: the connection rate limit is not measured
                keys.append(("ocpp.listener.ws.max_conn_rate", "1000000"))
            keys += h.admin_listen(a.gw_src)
            if h.spec_has_key(a.gw_src, "ocpp.listener.ws.max_connections"):
                # 10,000 idle charge points and more: the connection limit is not measured
                keys.append(("ocpp.listener.ws.max_connections", "1000000"))
            conf = os.path.join(self.tmp, "ocpp-edge.conf")
            self.result["gateway_config"] = h.gateway_config(conf, keys, a.gw_set)
            return h.start_gateway(self.kids, pname, a.python, conf, a.sut_cpu, src=a.gw_src,
                                 env=env, cprofile=a.cprofile)
        return self.kids.start(pname, argv, a.sut_cpu, env=env)

    def loadgen_argv(self, ws_port, mode, first, count, rate=None, extra=()):
        a = self.args
        return h.loadgen_argv(a.python, ws_port, mode, first, count, a.action, a.ws_client,
                            rate, extra)

    def idle_lg_args(self):
        """Load generator options for phases with many (mostly idle) charge points."""
        a = self.args
        return ["--idle-heartbeat", str(a.idle_heartbeat), "--boot-window", "100",
                "--connect-concurrency", str(a.connect_concurrency), "--timeout", "60"]

    def lg_procs_for(self, cps):
        return max(min(self.args.lg_procs, cps), -(-cps // self.args.cps_per_lg))

    def phase(self, sut, ws_port, others, mode, cps, duration, rate=None, active=None):
        """One measured load phase; returns a dict of merged figures.

        active: only that many of the cps charge points are under load; the others stay
        connected and send a Heartbeat every --idle-heartbeat s (counted apart)."""
        a = self.args
        nprocs = self.lg_procs_for(cps) if active is not None else min(a.lg_procs, cps)
        counts = h.split(cps, nprocs)
        actives = h.split(active, nprocs) if active is not None else counts
        load_cps = active if active is not None else cps
        lgs, first = [], 1
        for i, (count, act) in enumerate(zip(counts, actives, strict=True)):
            share = rate * act / load_cps if rate else None
            extra = ["--active", str(act), *self.idle_lg_args()] if active is not None else ()
            lgs.append(self.kids.start(f"loadgen-{self.name}-{mode}-{i}",
                                       self.loadgen_argv(ws_port, mode, first, count, share,
                                                         extra),
                                       a.load_cpu, stdin=True))
            first += count
        ready = []
        for lg in lgs:
            line = lg.expect("READY ", 90.0 if active is None else 600.0)
            if line is None:
                raise RuntimeError(f"{mode}: load generator not ready; {lg.stderr_tail(3)}")
            ready.append(json.loads(line[6:]))
        if not sut.alive():
            raise RuntimeError(f"{self.name} exited while charge points connected; "
                               f"{sut.stderr_tail(3)}")
        rss_connected = h.proc_rss_mb(sut.pid)

        # Both ends of the window are wall-clock times shared with the load generators.
        t0, t1 = h.go(lgs, a.warmup, duration)
        watched = others + lgs

        def sample():
            return (time.time(), h.proc_cpu_s(sut.pid), h.cpu_times(a.sut_cpu),
                    h.cpu_times(a.load_cpu), {p.name: h.proc_cpu_s(p.pid) for p in watched})

        h.sleep_until(t0)
        w0, c0, s0, l0, o0 = sample()
        h.sleep_until(t1)
        w1, c1, s1, l1, o1 = sample()
        rss_end = h.proc_rss_mb(sut.pid)

        results = []
        for lg in lgs:
            line = lg.expect("RESULT ", 60.0)
            if line is None:
                raise RuntimeError(f"{mode}: no result from {lg.name}; {lg.stderr_tail(3)}")
            results.append(json.loads(line[7:]))
        for lg in lgs:
            self.kids.stop(lg)

        def total(key):
            return sum(r[key] for r in results)

        def merged(key):
            out = {}
            for r in results:
                for k, v in r[key].items():
                    out[k] = out.get(k, 0) + v
            return out

        lat = sorted(x for r in results for x in r["lat_us"])
        lag = sorted(x for r in results for x in r["lag_us"])
        answered = total("answered_in_window")
        elapsed = w1 - w0
        cpu = c1 - c0
        hb = total("hb_answered_in_window") if all("hb_answered_in_window" in r
                                                   for r in results) else 0
        out = {
            "mode": mode, "cps": cps, "loadgen_procs": nprocs, "window_s": duration,
            "rate_target": rate, "active_cps": load_cps,
            "hb_answered_in_window": hb,
            # every answered CALL, the idle charge points' Heartbeats included
            "sut_cpu_us_per_msg": cpu * 1e6 / (answered + hb) if answered + hb else None,
            "connected": sum(r["connected"] for r in ready),
            "connect_failed": sum(r["connect_failed"] for r in ready),
            "connect_errors": [e for r in ready for e in r["connect_errors"]][:3],
            "boot_unanswered": sum(r["boot_unanswered"] for r in ready),
            "sent_in_window": total("sent_in_window"),
            "answered_in_window": answered,
            "errors_in_window": total("errors_in_window"),
            "answered_per_s": answered / duration,
            "unanswered_at_end": total("unanswered_at_end"),
            "counters": merged("counters"), "error_codes": merged("error_codes"),
            "error_samples": [s for r in results for s in r["error_samples"]][:3],
            "lat_samples": len(lat),
            "lat_p50_ms": h.percentile(lat, 50) / 1e3 if lat else None,
            "lat_p99_ms": h.percentile(lat, 99) / 1e3 if lat else None,
            "lat_max_ms": lat[-1] / 1e3 if lat else None,
            "send_lag_p99_ms": h.percentile(lag, 99) / 1e3 if lag else None,
            "sut_cpu_s": cpu,
            "sut_cpu_pct": 100.0 * cpu / elapsed,
            "sut_cpu_us_per_call": cpu * 1e6 / answered if answered else None,
            "sut_rss_mb_connected": rss_connected, "sut_rss_mb_end": rss_end,
            "sut_core_busy_pct": h.busy_pct(s0, s1),
            "load_core_busy_pct": h.busy_pct(l0, l1),
            "sut_core_steal_pct": h.steal_pct(s0, s1),
            "load_core_steal_pct": h.steal_pct(l0, l1),
        }
        # CPU time on each core that none of the benchmark's processes used: other work on
        # the machine, which is shared (see notes/performance.md).
        load_side_s = sum(o1[n] - o0[n] for n in o0)
        out["sut_core_foreign_pct"] = max(0.0, out["sut_core_busy_pct"] - out["sut_cpu_pct"])
        out["load_core_foreign_pct"] = max(
            0.0, out["load_core_busy_pct"] - 100.0 * load_side_s / elapsed)
        # CPU of the load side per answered CALL, by role (all load generators together)
        per_role = {}
        for n in o0:
            role = n.split("-")[0]
            per_role[role] = per_role.get(role, 0.0) + o1[n] - o0[n]
        out["load_side_cpu_us_per_call"] = {
            role: round(v * 1e6 / answered, 1) if answered else None
            for role, v in per_role.items()}
        return out

    def measured(self, *args, **kw):
        """phase(), repeated (--retries) while other processes disturbed it and --time-budget
        allows; keeps the least disturbed attempt -- chosen by the disturbance, never by the
        result -- and lists every attempt under "attempts"."""
        a = self.args
        attempts = []
        while True:
            t = time.monotonic()
            attempts.append(self.phase(*args, **kw))
            took = time.monotonic() - t
            if not disturbed(attempts[-1]) or len(attempts) > a.retries:
                break
            if time.monotonic() - a.started + took + 15 > a.time_budget:
                break
            h.wait_quiet((a.sut_cpu, a.load_cpu), 10.0)
        best = min(attempts, key=lambda p: p["sut_core_foreign_pct"] + p["load_core_foreign_pct"])
        best["attempts"] = [
            {k: round(p[k], 1) for k in ("answered_per_s", "sut_cpu_us_per_call",
                                         "sut_core_foreign_pct", "load_core_foreign_pct")
             if p[k] is not None} for p in attempts]
        return best

    # -- start-up ----------------------------------------------------------------------------
    def start_probed(self, mqtt_port):
        """A fresh SUT on a new port, returned once a probe Heartbeat made the round trip:
        (proc, ws_port, probe line, seconds from Popen)."""
        a = self.args
        ws_port = h.free_port()
        t_start = time.monotonic()
        sut = self.start_sut(ws_port, mqtt_port)
        probe = self.kids.start(
            f"probe-{self.name}",
            [*self.loadgen_argv(ws_port, "probe", 1, 1), "--timeout", str(a.start_timeout)],
            a.load_cpu)
        deadline = time.monotonic() + a.start_timeout + 10
        line = None
        while line is None and time.monotonic() < deadline:
            line = probe.expect("PROBE", 0.5)
            if line is None and (not sut.alive() or not probe.alive()):
                line = probe.expect("PROBE", 0.5)
                break                                   # the SUT died: no point waiting
        self.kids.stop(probe)
        if not line or not line.startswith("PROBE OK"):
            self.result["sut_stderr_tail"] = sut.stderr_tail(40)
            state = "still running" if sut.alive() else "exited"
            raise RuntimeError(f"{self.name} never answered a probe Heartbeat ({line}); "
                               f"{state}; last stderr lines: {sut.stderr_tail(3)}")
        return sut, ws_port, line, round(time.monotonic() - t_start, 2)

    def restart(self, sut, mqtt_port):
        """Stop sut, start a fresh one (nothing left over from earlier phases)."""
        self.kids.stop(sut, timeout=10.0)
        sut, ws_port, _, _ = self.start_probed(mqtt_port)
        return sut, ws_port

    def startup_once(self, mqtt_port, keep=False):
        """One timed start: Popen -> port accepts TCP / own readiness signal / probe answered.

        The probe load generator is started (and running) before the SUT, retrying every
        50 ms, so its own interpreter start is not in the figure.  ocpp-edge gets a
        NOTIFY_SOCKET (a unix datagram socket read here) and its signal is READY=1; the
        floor's and the reference bridge's is the READY line they print once subscribed."""
        a = self.args
        ws_port = h.free_port()
        probe = self.kids.start(
            f"probe-{self.name}",
            [*self.loadgen_argv(ws_port, "probe", 1, 1), "--timeout", str(a.start_timeout),
             "--retry-interval", "0.05", "--announce"], a.load_cpu)
        if probe.expect("ATTEMPTING", 15.0) is None:
            raise RuntimeError(f"startup probe did not start: {probe.stderr_tail(3)}")
        env = sock = None
        if self.name == "ocpp-edge":
            path = os.path.join(self.tmp, f"notify-{self.sut_starts}.sock")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(path)
            sock.setblocking(False)
            env = dict(os.environ, NOTIFY_SOCKET=path)
        t0 = time.monotonic()
        sut = self.start_sut(ws_port, mqtt_port, env=env)
        got = {}
        notes = []
        deadline = t0 + a.start_timeout + 5
        while time.monotonic() < deadline and sut.alive():
            now = time.monotonic()
            if "port_s" not in got:
                try:
                    with socket.create_connection(("127.0.0.1", ws_port), timeout=0.5):
                        got["port_s"] = time.monotonic() - t0
                except OSError:
                    pass
            if sock is not None:
                try:
                    while True:
                        msg = sock.recv(4096).decode(errors="replace")
                        notes.append(msg)
                        if "READY=1" in msg.split("\n") and "signal_s" not in got:
                            got["signal_s"] = now - t0
                except (BlockingIOError, InterruptedError):
                    pass
            else:
                try:
                    while True:
                        line = sut.lines.get_nowait()
                        if line is None:
                            sut.lines.put(None)
                            break
                        if line.startswith("READY") and "signal_s" not in got:
                            got["signal_s"] = now - t0
                except queue.Empty:
                    pass
            try:
                line = probe.lines.get_nowait()
                if line is not None and line.startswith("PROBE OK"):
                    got["probe_s"] = now - t0
                elif line is not None and line.startswith("PROBE FAILED"):
                    break
            except queue.Empty:
                pass
            if {"port_s", "signal_s", "probe_s"} <= got.keys():
                break
            time.sleep(0.002)
        self.kids.stop(probe)
        got = {k: round(v, 3) for k, v in got.items()}
        got["notify_messages"] = [m[:80] for m in notes[:3]]
        if keep:
            return got, sut, sock
        self.kids.stop(sut, timeout=10.0)
        if sock is not None:
            sock.close()
        return got, None, None

    def startup_phase(self, mqtt_port):
        a = self.args
        samples = []
        idle_notify = None
        for i in range(a.startup_reps):
            last = i == a.startup_reps - 1
            keep = last and "wakeups" in a.phases and self.name == "ocpp-edge"
            got, sut, sock = self.startup_once(mqtt_port, keep=keep)
            samples.append(got)
            if sut is not None:
                # the idle gateway as systemd runs it: with NOTIFY_SOCKET (its STATUS= tick)
                stop = threading.Event()

                def drain(sock=sock, stop=stop):
                    while not stop.is_set():
                        try:
                            sock.recv(4096)
                        except (BlockingIOError, InterruptedError):
                            time.sleep(0.05)
                        except OSError:
                            return

                t = threading.Thread(target=drain, daemon=True)
                t.start()
                waited = h.wait_cpu_idle(sut.pid)
                idle_notify = self.wakeups(sut)
                idle_notify["cpu_idle_after_s"] = waited
                stop.set()
                t.join(1.0)
                self.kids.stop(sut, timeout=10.0)
                sock.close()
        out = {"samples": samples}
        for k in ("port_s", "signal_s", "probe_s"):
            v = sorted(x[k] for x in samples if k in x)
            out[k + "_median"] = statistics.median(v) if v else None
            out[k + "_max"] = v[-1] if v else None
            out[k + "_n"] = len(v)
        if idle_notify is not None:
            out["idle_wakeups_with_notify"] = idle_notify
        return out

    # -- idle connections --------------------------------------------------------------------
    def wakeups(self, sut, window=None):
        """Context switches (all threads) and CPU of the SUT over window seconds."""
        window = window or self.args.wakeup_window
        v0, n0, _ = h.proc_ctx_switches(sut.pid)
        c0, t0 = h.proc_cpu_s(sut.pid), time.monotonic()
        time.sleep(window)
        v1, n1, threads = h.proc_ctx_switches(sut.pid)
        c1, t1 = h.proc_cpu_s(sut.pid), time.monotonic()
        dt = t1 - t0
        return {"window_s": round(dt, 2), "wakeups_per_s": (v1 - v0 + n1 - n0) / dt,
                "voluntary_per_s": (v1 - v0) / dt, "nonvoluntary_per_s": (n1 - n0) / dt,
                "cpu_pct": 100.0 * (c1 - c0) / dt, "threads": threads}

    def idle_phase(self, sut, n):
        """n idle charge points (BootNotification, then a Heartbeat each --idle-heartbeat s):
        SUT memory before and after, wake-ups per second with them connected."""
        a = self.args
        cpu_idle_s = h.wait_cpu_idle(sut.pid)
        _, before_samples = h.wait_rss_settled(sut.pid, min_s=2.0, max_s=10.0)
        rss0, pss0 = h.proc_mem_mb(sut.pid)
        nprocs = self.lg_procs_for(n)
        lgs, first = [], 1
        t = time.monotonic()
        for i, count in enumerate(h.split(n, nprocs)):
            lgs.append(self.kids.start(
                f"loadgen-{self.name}-idle{n}-{i}",
                self.loadgen_argv(sut.ws_port, "idle", first, count,
                                  extra=self.idle_lg_args()),
                a.load_cpu, stdin=True))
            first += count
        ready = []
        for lg in lgs:
            line = lg.expect("READY ", 900.0)
            if line is None:
                raise RuntimeError(f"idle {n}: load generator not ready; {lg.stderr_tail(3)}")
            ready.append(json.loads(line[6:]))
        connect_s = time.monotonic() - t
        if not sut.alive():
            raise RuntimeError(f"{self.name} exited while {n} idle charge points connected; "
                               f"{sut.stderr_tail(3)}")
        settle_s, samples = h.wait_rss_settled(sut.pid, min_s=3.0, max_s=a.settle_max)
        rss1, pss1 = h.proc_mem_mb(sut.pid)
        wake = self.wakeups(sut) if "wakeups" in a.phases else None
        rss2, pss2 = h.proc_mem_mb(sut.pid)
        results = []
        for lg in lgs:
            lg.send("stop\n")
        for lg in lgs:
            line = lg.expect("RESULT ", 60.0)
            results.append(json.loads(line[7:]) if line else None)
            self.kids.stop(lg)
        counters = {}
        for r in results:
            for k, v in (r or {}).get("counters", {}).items():
                counters[k] = counters.get(k, 0) + v
        connected = sum(r["connected"] for r in ready)
        out = {
            "cps": n, "loadgen_procs": nprocs, "connected": connected,
            "connect_failed": sum(r["connect_failed"] for r in ready),
            "connect_errors": [e for r in ready for e in r["connect_errors"]][:3],
            "boot_unanswered": sum(r["boot_unanswered"] for r in ready),
            "connected_at_end": sum((r or {}).get("connected_at_end", 0) for r in results),
            "connect_and_boot_s": round(connect_s, 1), "settle_s": round(settle_s, 1),
            "cpu_idle_after_s": cpu_idle_s,
            "rss_samples_before": before_samples, "rss_samples_after": samples,
            "rss_mb_before": rss0, "pss_mb_before": pss0,
            "rss_mb": rss1, "pss_mb": pss1, "rss_mb_after_wakeups": rss2,
            "pss_mb_after_wakeups": pss2,
            "rss_kb_per_cp": (rss1 - rss0) * 1024 / connected if connected else None,
            "pss_kb_per_cp": (pss1 - pss0) * 1024 / connected
            if connected and pss0 is not None and pss1 is not None else None,
            "heartbeats": {k: counters.get(k, 0) for k in ("hb_sent", "hb_answered",
                                                            "hb_callerrors", "hb_skips",
                                                            "disconnects")},
            "hb_lat_p99_ms": max((r or {}).get("hb_lat_p99_ms") or 0 for r in results),
            "wakeups": wake,
        }
        return out

    # -- the whole run -----------------------------------------------------------------------
    def run(self):
        a = self.args
        if a.quiet_wait > 0:
            t = time.monotonic()
            self.result["busy_before_start_pct"] = h.wait_quiet((a.sut_cpu, a.load_cpu),
                                                              a.quiet_wait)
            self.result["quiet_wait_s"] = round(time.monotonic() - t, 1)
        mosq, mqtt_port = h.start_mosquitto(self.kids, a.mosquitto, f"mosquitto-{self.name}",
                                            a.load_cpu, max_queued_messages=100000)
        backend = h.start_backend(self.kids, f"backend-{self.name}", a.python, mqtt_port,
                                a.load_cpu, a.backend_impl, a.backend_sub_qos, 15.0)

        sut, ws_port, line, ready_after = self.start_probed(mqtt_port)
        self.result["sut_pid"] = sut.pid
        self.result["probe"] = line
        self.result["ready_after_s"] = ready_after
        self.result["sut_rss_mb_idle"] = h.proc_rss_mb(sut.pid)     # no charge point connected
        if "wakeups" in a.phases:
            # fresh, 0 charge points, once its start-up work is done
            self.result["cpu_idle_after_s"] = h.wait_cpu_idle(sut.pid)
            self.result["wakeups_idle"] = self.wakeups(sut)

        others = [mosq, backend]
        if "closed" in a.phases and a.closed_duration > 0:
            self.result["closed"] = self.measured(sut, ws_port, others, "closed",
                                                  a.closed_cps, a.closed_duration)
            time.sleep(1.0)
        if "open" in a.phases and a.open_duration > 0:
            self.result["open"] = self.measured(sut, ws_port, others, "open",
                                                a.open_cps, a.open_duration, rate=a.open_rate)
        if "scale" in a.phases:
            self.result["scale"] = scale = {}
            for n in a.scale_cps:
                time.sleep(1.0)
                row = scale[str(n)] = {"cps": n}
                if a.scale_duration > 0:
                    row["open"] = self.measured(
                        sut, ws_port, others, "open", n, a.scale_duration,
                        rate=a.scale_rate, active=min(n, a.scale_open_cps))
                    time.sleep(1.0)
                    row["closed"] = self.measured(
                        sut, ws_port, others, "closed", n, a.scale_duration,
                        active=min(n, a.scale_closed_cps))
                row["sut_rss_mb_after"] = h.proc_rss_mb(sut.pid)
        if "idle" in a.phases:
            self.result["idle"] = idle = {}
            for n in a.idle_cps:
                sut, ws_port = self.restart(sut, mqtt_port)      # a fresh SUT for each n
                idle[str(n)] = self.idle_phase(sut, n)

        self.result["sut_alive_at_end"] = sut.alive()
        t = time.monotonic()
        self.kids.stop(sut, timeout=10.0)
        self.result["sut_stop_s"] = round(time.monotonic() - t, 2)
        self.result["sut_exit_code"] = sut.p.returncode
        if "startup" in a.phases and a.startup_reps > 0:
            self.result["startup"] = self.startup_phase(mqtt_port)
        self.kids.stop(backend)
        line = backend.expect("STATS ", 5.0)
        self.result["backend"] = json.loads(line[6:]) if line else None
        lines, tail = 0, []
        for path in self.sut_logs:
            with open(path, "rb") as f:
                text = f.read().decode(errors="replace").splitlines()
            lines += len(text)
            tail = text[-40:] if text else tail
        self.result["sut_instances"] = len(self.sut_logs)
        self.result["sut_stderr_lines"] = lines
        self.result["sut_stderr_tail"] = tail
        self.kids.stop(mosq)
        self.result["mosquitto_stderr_tail"] = mosq.stderr_tail(5)
        return self.result


def run_drain(args, kids, tmp):
    """bench/buffer_bench.py phase 3 for --python: a --drain-backlog backlog drained by the
    gateway beside its in-memory floor.  Returns buffer_bench's JSON report (or an error)."""
    out = os.path.join(tmp, "drain.json")
    argv = [args.python, os.path.join(h.BENCH, "buffer_bench.py"), "--phases", "3",
            "--pythons", args.python, "--windows", str(args.drain_window),
            "--backlog", str(args.drain_backlog), "--backlog-other", "0",
            "--retries", str(args.retries), "--quiet-wait", str(args.quiet_wait),
            "--mosquitto", args.mosquitto, "--json", out]
    p = kids.start("drain", argv, None)
    while True:                          # relay buffer_bench's progress lines
        try:
            line = p.lines.get(timeout=1.0)
        except queue.Empty:
            continue
        if line is None:
            break
        print("#   drain: " + line, flush=True)
    p.p.wait()
    rc = p.p.returncode
    kids.stop(p)
    try:
        with open(out) as f:
            rep = json.load(f)
    except (OSError, ValueError) as exc:
        return {"error": f"buffer_bench exit {rc}, no JSON ({exc}); {p.stderr_tail(5)}"}
    rep["command"] = " ".join(argv)
    if rc != 0:
        rep["error"] = f"buffer_bench exit {rc}; {p.stderr_tail(5)}"
    return rep


# ----------------------------------------------------------------------------- main
def default_python():
    venv = os.path.join(h.ROOT, ".venv", "bin", "python")
    return venv if os.path.exists(venv) else sys.executable


def parse_args():
    ap = argparse.ArgumentParser(
        description="Benchmark ocpp-edge against a bare WebSocket<->MQTT forwarder (the floor).",
        epilog="The default phases (closed,open) take about 2 minutes for the three systems; "
               "all phases about 15-18 minutes per interpreter.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--systems", default=",".join(SYSTEMS),
                    help="comma-separated subset of floor,ocpp-edge,refbridge")
    ap.add_argument("--phases", default=",".join(DEFAULT_PHASES),
                    help="comma-separated subset of " + ",".join(PHASES) + " or 'all' "
                         "(see the module docstring)")
    ap.add_argument("--idle-cps", default="1000,10000",
                    help="idle phase: numbers of idle charge points (a fresh SUT for each)")
    ap.add_argument("--idle-heartbeat", type=float, default=30.0,
                    help="idle charge points send a Heartbeat every this many s")
    ap.add_argument("--settle-max", type=float, default=20.0,
                    help="idle phase: wait at most this long for the SUT's RSS to settle, s")
    ap.add_argument("--wakeup-window", type=float, default=10.0,
                    help="wakeups phase: seconds over which context switches are counted")
    ap.add_argument("--cps-per-lg", type=int, default=2500,
                    help="idle and scale phases: charge points per load generator process")
    ap.add_argument("--connect-concurrency", type=int, default=25,
                    help="idle and scale phases: connects in flight per load generator")
    ap.add_argument("--scale-cps", default="10,1000,5000",
                    help="scale phase: numbers of connected charge points")
    ap.add_argument("--scale-rate", type=float, default=300.0,
                    help="scale phase, open loop: CALLs/s over min(N, --scale-open-cps) CPs")
    ap.add_argument("--scale-open-cps", type=int, default=200)
    ap.add_argument("--scale-closed-cps", type=int, default=500,
                    help="scale phase, closed loop: min(N, this) CPs under load")
    ap.add_argument("--scale-duration", type=float, default=10.0,
                    help="scale phase: seconds measured per window (0 skips the windows)")
    ap.add_argument("--startup-reps", type=int, default=5,
                    help="startup phase: timed starts per system")
    ap.add_argument("--drain-backlog", type=int, default=1_000_000,
                    help="drain phase: backlog drained by bench/buffer_bench.py phase 3")
    ap.add_argument("--drain-window", type=int, default=200,
                    help="drain phase: mqtt.max_inflight (the product's default is 200)")
    ap.add_argument("--python", default=default_python(),
                    help="interpreter for the SUT and the helpers "
                         "(default: ROOT/.venv/bin/python if it exists, else this one)")
    ap.add_argument("--action", default="MeterValues",
                    choices=("MeterValues", "Heartbeat", "StatusNotification"),
                    help="the CALL the charge points send")
    ap.add_argument("--closed-cps", type=int, default=500,
                    help="charge points in the closed loop (one CALL outstanding each)")
    ap.add_argument("--closed-duration", type=float, default=20.0,
                    help="seconds measured (0 skips the phase)")
    ap.add_argument("--open-cps", type=int, default=200, help="charge points in the open loop")
    ap.add_argument("--open-rate", type=float, default=300.0, help="CALLs/s, all CPs together")
    ap.add_argument("--open-duration", type=float, default=20.0,
                    help="seconds measured (0 skips the phase)")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of load before a window")
    ap.add_argument("--lg-procs", type=int, default=2, help="load generator processes")
    ap.add_argument("--quiet-wait", type=float, default=15.0,
                    help="before each system, wait up to this many seconds for both CPUs to "
                         "be idle (<10%% busy for 1 s); 0 disables")
    ap.add_argument("--retries", type=int, default=1,
                    help="measure a phase again (up to this many times) when other processes "
                         "took more than 5%% of CPU 0 or 15%% of CPU 1 during it")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="no retry is started that would end the run after this many seconds "
                         "(default: 175 for closed,open; 1200 with more phases)")
    ap.add_argument("--sut-cpu", type=int, default=h.SUT_CPU, help="CPU the SUT is pinned to")
    ap.add_argument("--load-cpu", type=int, default=h.LOAD_CPU,
                    help="CPU for mosquitto, the backend and the load generators")
    ap.add_argument("--mosquitto", default="/usr/sbin/mosquitto", help="broker binary")
    ap.add_argument("--start-timeout", type=float, default=20.0,
                    help="seconds for a SUT to answer its first Heartbeat")
    ap.add_argument("--floor-writes", choices=("register", "direct"), default="register",
                    help="how the floor drives paho's writes (see bench/mqttcompat.py)")
    ap.add_argument("--ws-client", choices=("raw", "tornado"), default="raw",
                    help="load generator's WebSocket client (see bench/loadgen.py)")
    ap.add_argument("--backend-impl", choices=("raw", "paho"), default="raw",
                    help="backend's MQTT client (see bench/backend.py)")
    ap.add_argument("--backend-sub-qos", type=int, choices=(0, 1), default=1,
                    help="QoS of the backend's subscription (its answers are QoS 1)")
    ap.add_argument("--gw-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra or overriding ocpp-edge config line (empty VALUE drops a key)")
    ap.add_argument("--gw-commit", metavar="REV",
                    help="run ocpp-edge as committed in REV (git archive into the temporary "
                         "directory) instead of the working tree")
    ap.add_argument("--cprofile", metavar="FILE",
                    help="run ocpp-edge under cProfile, statistics to FILE (slows it down: "
                         "for finding where time goes, never for the figures)")
    ap.add_argument("--json", metavar="FILE", help="also write all figures as JSON")
    ap.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    ap.add_argument("--smoke", action="store_true",
                    help="short smoke run: 5 s closed and open windows, no quiet wait, "
                         "no retries (overrides those options)")
    args = ap.parse_args()
    if args.smoke:
        args.closed_duration = args.open_duration = 5.0
        args.scale_duration = min(args.scale_duration, 5.0)
        args.wakeup_window = min(args.wakeup_window, 5.0)
        args.startup_reps = min(args.startup_reps, 3)
        args.quiet_wait, args.retries = 0.0, 0
    args.phases = PHASES if args.phases == "all" else [
        p.strip() for p in args.phases.split(",") if p.strip()]
    for p in args.phases:
        if p not in PHASES:
            ap.error(f"unknown phase {p!r} (known: {', '.join(PHASES)})")
    if args.time_budget is None:
        args.time_budget = 175.0 if set(args.phases) <= set(DEFAULT_PHASES) else 1200.0
    args.idle_cps = [int(x) for x in args.idle_cps.split(",") if x.strip()]
    args.scale_cps = [int(x) for x in args.scale_cps.split(",") if x.strip()]
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    for s in args.systems:
        if s not in SYSTEMS:
            ap.error(f"unknown system {s!r}")
    if not os.path.exists(args.mosquitto):
        ap.error(f"mosquitto not found at {args.mosquitto} (apt-get install mosquitto)")
    if shutil.which("taskset") is None or (os.cpu_count() or 1) < 2:
        ap.error("needs taskset and at least 2 CPUs (the SUT on --sut-cpu, the rest on "
                 "--load-cpu)")
    return args


def main():
    args = parse_args()
    # Ctrl-C and SIGTERM unwind through the workspace, which kills every child's process group.
    with h.workspace("ocpp-edge-bench-", args.keep_tmp) as (tmp, kids):
        report = {"args": {k: v for k, v in vars(args).items()},
                  **h.report_head(" ".join(["python", *sys.argv]), args.mosquitto),
                  "systems": [], "skipped": []}
        t_start = args.started = time.monotonic()
        report["nofile_limit"] = h.raise_nofile()
        try:
            report["interpreter"] = info = h.py_info(args.python)
            systems = list(args.systems)
            args.gw_src = h.ROOT
            if "ocpp-edge" in systems and args.gw_commit:
                args.gw_src = os.path.join(tmp, "src")
                report["source"] = {"commit": h.export_commit(args.gw_commit, args.gw_src),
                                    "ocpp_edge_changed_files": 0, "from": "git archive"}
            if "ocpp-edge" in systems:
                ok, why = h.gateway_importable(args.python, args.gw_src)
                if not ok:
                    systems.remove("ocpp-edge")
                    report["skipped"].append(f"ocpp-edge not run: `import ocpp_edge.gateway` "
                                             f"fails with {args.python} ({why})")
            m = report["machine"]
            print(f"# ocpp-edge bench: {m['cpu_model']}, {m['nproc']} CPUs, {m['mosquitto']}; "
                  f"Python {info['python']} ({info['executable']}), tornado {info['tornado']}, "
                  f"paho-mqtt {info['paho-mqtt']}; ocpp-edge at {report['source']['commit']}"
                  f" + {report['source']['ocpp_edge_changed_files']} changed file(s) in "
                  "ocpp_edge/", flush=True)
            if args.phases == ["drain"]:
                systems = []
            for name in systems:
                print(f"# running {name} ({', '.join(p for p in args.phases if p != 'drain')})"
                      " ...", flush=True)
                run = SystemRun(name, args, kids, tmp)
                try:
                    report["systems"].append(run.run())
                except RuntimeError as exc:
                    run.result["error"] = str(exc)
                    report["systems"].append(run.result)
                finally:
                    kids.stop_all()
            if "drain" in args.phases:
                print(f"# drain: bench/buffer_bench.py phase 3, {args.drain_backlog:,} messages "
                      "...", flush=True)
                report["drain"] = run_drain(args, kids, tmp)
            report["elapsed_s"] = time.monotonic() - t_start
            show(report)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(report, f, indent=1)
            return 0 if all("error" not in s for s in report["systems"]) else 1
        except KeyboardInterrupt:
            print("\n# interrupted; tearing down", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
