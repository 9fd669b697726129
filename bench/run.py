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

If ``ocpp_edge`` cannot be imported by the chosen interpreter, only the floor is run.
"""

import argparse
import json
import os
import platform
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
CLK_TCK = os.sysconf("SC_CLK_TCK")
SYSTEMS = ("floor", "ocpp-edge", "refbridge")


# ----------------------------------------------------------------------------- processes
class Proc:
    """A child in its own process group, with its stdout read line by line by a thread."""

    def __init__(self, name, argv, cpu, log_dir, stdin=False, cwd=ROOT):
        self.name = name
        if cpu is not None:
            argv = ["taskset", "-c", str(cpu), *argv]      # taskset execs: same pid
        self.log_path = os.path.join(log_dir, name + ".stderr")
        self._log = open(self.log_path, "wb")      # closed in stop()
        self.p = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=self._log,
                                  stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                  start_new_session=True)
        self.pid = self.p.pid
        self.lines = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for raw in self.p.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))
        self.lines.put(None)

    def expect(self, prefix, timeout):
        """The first stdout line starting with prefix; None on EOF or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                return None
            if line is None:
                self.lines.put(None)      # keep EOF visible to later calls
                return None
            if line.startswith(prefix):
                return line

    def send(self, text):
        self.p.stdin.write(text.encode())
        self.p.stdin.flush()

    def alive(self):
        return self.p.poll() is None

    def stop(self, timeout=5.0):
        """SIGTERM the process group, SIGKILL it if it lingers."""
        if self.p.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)     # stragglers in the group, if any
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.p.wait(2)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()

    def stderr_tail(self, n=15):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace").splitlines()[-n:]
        except OSError:
            return []


class Children:
    """Every process this run started, so that all of them can be torn down."""

    def __init__(self, log_dir):
        self.log_dir = log_dir
        self.procs = []

    def start(self, name, argv, cpu, **kw):
        proc = Proc(name, argv, cpu, self.log_dir, **kw)
        self.procs.append(proc)
        return proc

    def stop(self, proc, timeout=5.0):
        proc.stop(timeout)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self):
        for proc in reversed(self.procs):
            proc.stop(timeout=3.0)
        self.procs = []


# ----------------------------------------------------------------------------- helpers
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def proc_cpu_s(pid):
    """utime + stime of one process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return None


def cpu_times(cpu):
    """(busy, steal, total) jiffies of one CPU from /proc/stat.

    busy = user + nice + system + irq + softirq (guest time is inside user); steal is time
    the hypervisor gave this virtual CPU to someone else.
    """
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:9]]
                user, nice, system, idle, iowait, irq, softirq, steal = v
                return user + nice + system + irq + softirq, steal, sum(v)
    return 0, 0, 0


def busy_pct(before, after):
    return 100.0 * (after[0] - before[0]) / max(1, after[2] - before[2])


def steal_pct(before, after):
    return 100.0 * (after[1] - before[1]) / max(1, after[2] - before[2])


def wait_quiet(cpus, max_wait, threshold=10.0):
    """Wait (at most max_wait s) for 1 s in which every CPU in cpus is < threshold % busy.

    The machine is shared; starting a system while something else is compiling or testing
    just measures that.  Returns the busy % of the last 1 s sample, per CPU.
    """
    deadline = time.monotonic() + max_wait
    while True:
        before = {c: cpu_times(c) for c in cpus}
        time.sleep(1.0)
        busy = {c: round(busy_pct(before[c], cpu_times(c))) for c in cpus}
        if max(busy.values()) < threshold or time.monotonic() >= deadline:
            return busy


def percentile(sorted_values, q):
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, round(q / 100.0 * len(sorted_values)) - 1))
    return sorted_values[k]


def split(total, parts):
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def sleep_until(t):
    while True:
        left = t - time.time()
        if left <= 0:
            return
        time.sleep(min(left, 0.5))


def py_info(python):
    """Version of the interpreter and of the libraries that matter, as that interpreter sees."""
    code = ("import sys, json, platform, importlib.metadata as m\n"
            "def v(n):\n"
            "    try: return m.version(n)\n"
            "    except Exception: return None\n"
            "print(json.dumps({'python': platform.python_version(), 'executable': sys.executable,"
            " 'base_prefix': sys.base_prefix,"
            " 'tornado': v('tornado'), 'paho-mqtt': v('paho-mqtt'),"
            " 'jsonschema': v('jsonschema'), 'ocpp-edge': v('ocpp-edge')}))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         check=True)
    return json.loads(out.stdout)


def machine_info(mosquitto):
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        out = subprocess.run([mosquitto, "-h"], capture_output=True, text=True).stdout
        mosq = out.splitlines()[0].strip() if out else "?"
    except OSError:
        mosq = "?"
    return {"nproc": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "mosquitto": mosq}


def source_info():
    """The commit the gateway was run from, and whether ocpp_edge/ had local changes."""
    def git(*cmd):
        r = subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=ROOT)
        return r.stdout.strip() if r.returncode == 0 else None

    changed = git("status", "--porcelain", "--", "ocpp_edge")
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "ocpp_edge_changed_files": len(changed.splitlines()) if changed else 0}


def gateway_importable(python, src):
    """(ok, reason): can ``python -m ocpp_edge`` run from src, importing src's package?"""
    code = ("import os, importlib.util, ocpp_edge.gateway\n"
            "assert importlib.util.find_spec('ocpp_edge.__main__'), 'no ocpp_edge/__main__.py'\n"
            "print(os.path.dirname(os.path.dirname(os.path.abspath(ocpp_edge.__file__))))")
    r = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=src)
    if r.returncode != 0:
        lines = (r.stderr or r.stdout).strip().splitlines()
        return False, lines[-1] if lines else f"exit {r.returncode}"
    where = r.stdout.strip()
    if os.path.realpath(where) != os.path.realpath(src):
        return False, f"ocpp_edge is imported from {where}, not from {src}"
    return True, ""


def spec_has_key(src, key):
    """Does the gateway's configspec in src know ``key``?  (Unknown keys are an error.)"""
    try:
        with open(os.path.join(src, "ocpp_edge", "configspec.ini")) as f:
            return any(line.split("=", 1)[0].strip() == key for line in f)
    except OSError:
        return False


def export_commit(rev, dest):
    """Extract ocpp_edge/ and schemas/ of a commit into dest (read-only use of the repo)."""
    os.makedirs(dest)
    archive = subprocess.run(["git", "archive", rev, "ocpp_edge", "schemas"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    return subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()


# ----------------------------------------------------------------------------- one system
class SystemRun:
    """Broker + backend + SUT, then the closed- and open-loop phases, then teardown."""

    def __init__(self, name, args, kids, tmp):
        self.name = name
        self.args = args
        self.kids = kids
        self.tmp = tmp
        self.result = {"system": name}

    def start_mosquitto(self):
        port = free_port()
        conf = os.path.join(self.tmp, f"mosquitto-{self.name}.conf")
        with open(conf, "w") as f:
            f.write("\n".join([
                f"listener {port} 127.0.0.1",
                "allow_anonymous true",
                "persistence false",
                "max_inflight_messages 0",        # no per-client in-flight window
                "max_queued_messages 100000",
                "max_queued_bytes 0",
                "set_tcp_nodelay true",            # Nagle off towards the clients
                "log_dest stderr",
                "log_type error",
                "log_type warning",
                ""]))
        mosq = self.kids.start(f"mosquitto-{self.name}", [self.args.mosquitto, "-c", conf],
                               self.args.load_cpu)
        if not wait_port(port, 5.0):
            raise RuntimeError(f"mosquitto did not listen: {mosq.stderr_tail()}")
        return mosq, port

    def start_sut(self, ws_port, mqtt_port):
        a = self.args
        if self.name == "floor":
            argv = [a.python, os.path.join(BENCH, "floor.py"), "--ws", f"127.0.0.1:{ws_port}",
                    "--mqtt", f"127.0.0.1:{mqtt_port}", "--paho-writes", a.floor_writes]
        elif self.name == "refbridge":            # bench/refbridge.py: the `ocpp` library
            argv = [a.python, os.path.join(BENCH, "refbridge.py"), "--ws",
                    f"127.0.0.1:{ws_port}", "--mqtt", f"127.0.0.1:{mqtt_port}"]
        else:
            keys = [("ocpp.listener.ws", f"127.0.0.1:{ws_port}"),
                    ("mqtt.server", f"mqtt://127.0.0.1:{mqtt_port}"),
                    ("mqtt.client_id", "bench-gw"),
                    ("log.level", "warning")]
            if spec_has_key(a.gw_src, "buffer.dir"):
                # keep the disk buffer inside this run's temporary directory, not in the
                # product's default /var/lib/ocpp-edge (same file system here: /tmp and
                # /var/lib are both on /)
                keys.append(("buffer.dir", os.path.join(self.tmp, "gw-buffer")))
            if spec_has_key(a.gw_src, "auth.allow_anonymous"):
                # the load generator's charge points carry no credentials and send as
                # fast as they can: measured is the gateway, not its limits
                keys += [("auth.allow_anonymous", "true"), ("auth.password_file", ""),
                         ("ocpp.max_message_rate", "0")]
            if spec_has_key(a.gw_src, "ocpp.listener.ws.max_conn_rate"):
                # all charge points connect at once: the connection rate limit is not measured
                keys.append(("ocpp.listener.ws.max_conn_rate", "1000000"))
            for item in a.gw_set:
                key, _, value = (x.strip() for x in item.partition("="))
                keys = [(k, v) for k, v in keys if k != key]
                if value:
                    keys.append((key, value))
            text = "".join(f"{k} = {v}\n" for k, v in keys)
            conf = os.path.join(self.tmp, "ocpp-edge.conf")
            with open(conf, "w") as f:
                f.write(text)
            self.result["gateway_config"] = text
            argv = [a.python, "-m", "ocpp_edge", "--config", conf]
            if a.cprofile:
                argv[1:1] = ["-m", "cProfile", "-o", os.path.abspath(a.cprofile)]
            return self.kids.start(f"sut-{self.name}", argv, a.sut_cpu, cwd=a.gw_src)
        return self.kids.start(f"sut-{self.name}", argv, a.sut_cpu)

    def loadgen_argv(self, ws_port, mode, first, count, rate=None):
        a = self.args
        argv = [a.python, os.path.join(BENCH, "loadgen.py"),
                "--url", f"ws://127.0.0.1:{ws_port}/ocpp/", "--mode", mode,
                "--first", str(first), "--count", str(count), "--action", a.action,
                "--client", a.ws_client]
        if rate is not None:
            argv += ["--rate", f"{rate:.3f}"]
        return argv

    def phase(self, sut, ws_port, others, mode, cps, duration, rate=None):
        """One measured load phase; returns a dict of merged figures."""
        a = self.args
        nprocs = min(a.lg_procs, cps)
        counts = split(cps, nprocs)
        lgs, first = [], 1
        for i, count in enumerate(counts):
            share = rate * count / cps if rate else None
            lgs.append(self.kids.start(f"loadgen-{self.name}-{mode}-{i}",
                                       self.loadgen_argv(ws_port, mode, first, count, share),
                                       a.load_cpu, stdin=True))
            first += count
        ready = []
        for lg in lgs:
            line = lg.expect("READY ", 90.0)
            if line is None:
                raise RuntimeError(f"{mode}: load generator not ready; {lg.stderr_tail(3)}")
            ready.append(json.loads(line[6:]))
        if not sut.alive():
            raise RuntimeError(f"{self.name} exited while charge points connected; "
                               f"{sut.stderr_tail(3)}")
        rss_connected = proc_rss_mb(sut.pid)

        # Both ends of the window are wall-clock times shared with the load generators.
        t0 = time.time() + a.warmup
        t1 = t0 + duration
        for lg in lgs:
            lg.send(f"go {t0:.6f} {t1:.6f}\n")
        watched = others + lgs

        def sample():
            return (time.time(), proc_cpu_s(sut.pid), cpu_times(a.sut_cpu),
                    cpu_times(a.load_cpu), {p.name: proc_cpu_s(p.pid) for p in watched})

        sleep_until(t0)
        w0, c0, s0, l0, o0 = sample()
        sleep_until(t1)
        w1, c1, s1, l1, o1 = sample()
        rss_end = proc_rss_mb(sut.pid)

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
        out = {
            "mode": mode, "cps": cps, "loadgen_procs": nprocs, "window_s": duration,
            "rate_target": rate,
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
            "lat_p50_ms": percentile(lat, 50) / 1e3 if lat else None,
            "lat_p99_ms": percentile(lat, 99) / 1e3 if lat else None,
            "lat_max_ms": lat[-1] / 1e3 if lat else None,
            "send_lag_p99_ms": percentile(lag, 99) / 1e3 if lag else None,
            "sut_cpu_s": cpu,
            "sut_cpu_pct": 100.0 * cpu / elapsed,
            "sut_cpu_us_per_call": cpu * 1e6 / answered if answered else None,
            "sut_rss_mb_connected": rss_connected, "sut_rss_mb_end": rss_end,
            "sut_core_busy_pct": busy_pct(s0, s1),
            "load_core_busy_pct": busy_pct(l0, l1),
            "sut_core_steal_pct": steal_pct(s0, s1),
            "load_core_steal_pct": steal_pct(l0, l1),
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
            wait_quiet((a.sut_cpu, a.load_cpu), 10.0)
        best = min(attempts, key=lambda p: p["sut_core_foreign_pct"] + p["load_core_foreign_pct"])
        best["attempts"] = [
            {k: round(p[k], 1) for k in ("answered_per_s", "sut_cpu_us_per_call",
                                         "sut_core_foreign_pct", "load_core_foreign_pct")
             if p[k] is not None} for p in attempts]
        return best

    def run(self):
        a = self.args
        if a.quiet_wait > 0:
            t = time.monotonic()
            self.result["busy_before_start_pct"] = wait_quiet((a.sut_cpu, a.load_cpu),
                                                              a.quiet_wait)
            self.result["quiet_wait_s"] = round(time.monotonic() - t, 1)
        mosq, mqtt_port = self.start_mosquitto()
        backend = self.kids.start(
            f"backend-{self.name}",
            [a.python, os.path.join(BENCH, "backend.py"), "--mqtt", f"127.0.0.1:{mqtt_port}",
             "--impl", a.backend_impl, "--sub-qos", str(a.backend_sub_qos)],
            a.load_cpu)
        if backend.expect("READY", 15.0) is None:
            raise RuntimeError(f"backend not ready: {backend.stderr_tail(3)}")

        ws_port = free_port()
        t_start = time.monotonic()
        sut = self.start_sut(ws_port, mqtt_port)
        self.result["sut_pid"] = sut.pid
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
        self.result["probe"] = line
        self.result["ready_after_s"] = round(time.monotonic() - t_start, 2)
        self.result["sut_rss_mb_idle"] = proc_rss_mb(sut.pid)     # no charge point connected

        others = [mosq, backend]
        if a.closed_duration > 0:
            self.result["closed"] = self.measured(sut, ws_port, others, "closed",
                                                  a.closed_cps, a.closed_duration)
            time.sleep(1.0)
        if a.open_duration > 0:
            self.result["open"] = self.measured(sut, ws_port, others, "open",
                                                a.open_cps, a.open_duration, rate=a.open_rate)

        self.result["sut_alive_at_end"] = sut.alive()
        self.kids.stop(backend)
        line = backend.expect("STATS ", 5.0)
        self.result["backend"] = json.loads(line[6:]) if line else None
        t = time.monotonic()
        self.kids.stop(sut, timeout=10.0)
        self.result["sut_stop_s"] = round(time.monotonic() - t, 2)
        self.result["sut_exit_code"] = sut.p.returncode
        with open(sut.log_path, "rb") as f:
            self.result["sut_stderr_lines"] = sum(1 for _ in f)
        self.result["sut_stderr_tail"] = sut.stderr_tail(40)
        self.kids.stop(mosq)
        self.result["mosquitto_stderr_tail"] = mosq.stderr_tail(5)
        return self.result


# ----------------------------------------------------------------------------- report
def fmt(v, spec="{:,.0f}"):
    return "–" if v is None else spec.format(v)


def ratio(a, b, spec="{:.2f}"):
    if a is None or b is None or b == 0:
        return "–"
    return spec.format(a / b)


def disturbed(p):
    """Did processes outside the benchmark take a noticeable share of either core?"""
    return p["sut_core_foreign_pct"] > 5 or p["load_core_foreign_pct"] > 15


def problems(p):
    """What should be zero in a phase: lost, errored, unmatched CALLs and the like."""
    k = p["counters"]
    bad = {x: k[x] for x in ("callerrors", "timeouts", "unmatched", "disconnects",
                             "bad_frames", "send_failed", "busy_skips") if k.get(x)}
    for x in ("connect_failed", "boot_unanswered", "unanswered_at_end"):
        if p[x]:
            bad[x] = p[x]
    return bad


def render(report):
    """(markdown table, list of notes) for a finished report."""
    runs = {r["system"]: r for r in report["systems"] if "error" not in r}
    f, g, b = runs.get("floor"), runs.get("ocpp-edge"), runs.get("refbridge")
    a = report["args"]
    sut_cpu, load_cpu = a["sut_cpu"], a["load_cpu"]

    def get(run, phase, key):
        if run is None or phase not in run:
            return None
        return run[phase].get(key)

    rows = []

    def mark(run, phase):
        """'*' after figures of a phase that other processes disturbed."""
        return "*" if run and phase in run and disturbed(run[phase]) else ""

    def row(label, phase, key, spec="{:,.0f}", with_ratio=True):
        fv, gv, bv = get(f, phase, key), get(g, phase, key), get(b, phase, key)
        fm, gm, bm = mark(f, phase), mark(g, phase), mark(b, phase)
        r = ratio(gv, fv) + (fm or gm) if with_ratio else ""
        rb = ratio(gv, bv) + (bm or gm) if with_ratio else ""
        rows.append(f"| {label} | {fmt(fv, spec)}{fm} | {fmt(gv, spec)}{gm} | "
                    f"{fmt(bv, spec)}{bm} | {r} | {rb} |")

    def load_side(run, phase):
        per_call = get(run, phase, "load_side_cpu_us_per_call")
        if not per_call or None in per_call.values():
            return None
        return sum(per_call.values())

    c, o = a["closed_cps"], a["open_cps"]
    if a["closed_duration"] > 0:
        row(f"closed loop, {c} CPs: answered CALLs/s", "closed", "answered_per_s")
        row("closed loop: SUT CPU µs per answered CALL", "closed", "sut_cpu_us_per_call")
        row(f"closed loop: SUT CPU % of one core (CPU {sut_cpu})", "closed", "sut_cpu_pct",
            "{:.0f}", False)
        row(f"closed loop: CPU {sut_cpu} used by other processes %", "closed",
            "sut_core_foreign_pct", "{:.0f}", False)
        row(f"closed loop: CPU {load_cpu} (load side) busy %", "closed",
            "load_core_busy_pct", "{:.0f}", False)
        rows.append("| closed loop: load side CPU µs per CALL (broker+backend+loadgen) | "
                    f"{fmt(load_side(f, 'closed'))} | {fmt(load_side(g, 'closed'))} | "
                    f"{fmt(load_side(b, 'closed'))} | | |")
        row("closed loop: round trip p50 ms", "closed", "lat_p50_ms", "{:.1f}")
        row("closed loop: round trip p99 ms", "closed", "lat_p99_ms", "{:.1f}")
        row(f"SUT RSS MB with {c} CPs connected", "closed", "sut_rss_mb_end", "{:.1f}")

        def per_cp_kb(run):
            if run is None or "closed" not in run or run.get("sut_rss_mb_idle") is None:
                return None
            return (run["closed"]["sut_rss_mb_end"] - run["sut_rss_mb_idle"]) * 1024 / c

        fk, gk, bk = per_cp_kb(f), per_cp_kb(g), per_cp_kb(b)
        rows.append(f"| SUT RSS growth per connected CP, KB (idle → {c} CPs) | "
                    f"{fmt(fk, '{:.1f}')} | {fmt(gk, '{:.1f}')} | {fmt(bk, '{:.1f}')} | "
                    f"{ratio(gk, fk)} | {ratio(gk, bk)} |")
    if a["open_duration"] > 0:
        row(f"open loop, {a['open_rate']:g} CALLs/s over {o} CPs: answered CALLs/s",
            "open", "answered_per_s", "{:,.1f}", False)
        row("open loop: round trip p50 ms", "open", "lat_p50_ms", "{:.2f}")
        row("open loop: round trip p99 ms", "open", "lat_p99_ms", "{:.2f}")
        row("open loop: round trip max ms", "open", "lat_max_ms", "{:.2f}")
        row("open loop: SUT CPU µs per answered CALL", "open", "sut_cpu_us_per_call")
        row(f"open loop: CPU {sut_cpu} used by other processes %", "open",
            "sut_core_foreign_pct", "{:.0f}", False)

    rows.append("| start-up: first Heartbeat answered after s | " + " | ".join(
        fmt(r and r.get("ready_after_s"), "{:.1f}") for r in (f, g, b)) + " | | |")

    def n_problems(run):
        if run is None:
            return None
        return sum(sum(problems(run[ph]).values()) for ph in ("closed", "open") if ph in run)

    rows.append("| CALLs lost / errored / unmatched (all phases) | " + " | ".join(
        fmt(n_problems(r)) for r in (f, g, b)) + " | | |")
    if any(mark(run, ph) for run in (f, g, b) for ph in ("closed", "open")):
        rows.append("| \\* other processes used >5 % of CPU 0 or >15 % of CPU 1 during "
                    "that phase: not a clean figure | | | | | |")
    head = [f"| metric (CALL: {a['action']}) | floor | ocpp-edge | reference bridge | "
            "ocpp-edge / floor | ocpp-edge / ref. bridge |",
            "|---|---:|---:|---:|---:|---:|"]

    notes = []
    for run in (f, g, b):
        if run is None:
            continue
        name = run["system"]
        for phase in ("closed", "open"):
            if phase not in run:
                continue
            p = run[phase]
            bad = problems(p)
            if bad:
                notes.append(f"{name} {phase} loop: {bad} {p['error_codes'] or ''} "
                             f"{p['error_samples'] or ''}")
            if len(p.get("attempts", ())) > 1:
                notes.append(f"{name} {phase} loop: measured {len(p['attempts'])} times "
                             f"because other processes were busy; kept the least disturbed "
                             f"(all: {p['attempts']})")
            if disturbed(p):
                notes.append(f"{name} {phase} loop: other processes used "
                             f"{p['sut_core_foreign_pct']:.0f}% of CPU {sut_cpu} and "
                             f"{p['load_core_foreign_pct']:.0f}% of CPU {load_cpu} -- "
                             "figures disturbed; run again on a quiet machine")
            if max(p["sut_core_steal_pct"], p["load_core_steal_pct"]) > 5:
                notes.append(f"{name} {phase} loop: the hypervisor stole "
                             f"{p['sut_core_steal_pct']:.0f}% of CPU {sut_cpu} and "
                             f"{p['load_core_steal_pct']:.0f}% of CPU {load_cpu}")
        busy = run.get("busy_before_start_pct")
        if busy and max(busy.values()) >= 10:
            notes.append(f"{name}: the machine was still busy when it started (CPU busy % "
                         f"over the last second: {busy})")
        cl = run.get("closed")
        if cl and cl["sut_cpu_pct"] < 90:
            notes.append(f"{name} closed loop: the SUT used only {cl['sut_cpu_pct']:.0f}% of "
                         f"its core (CPU {load_cpu} busy {cl['load_core_busy_pct']:.0f}%) -- "
                         "the load side or other processes, not the SUT, may be the limit")
        op = run.get("open")
        if op and op["send_lag_p99_ms"] and op["send_lag_p99_ms"] > 2:
            notes.append(f"{name} open loop: the load generator sent late (p99 "
                         f"{op['send_lag_p99_ms']:.1f} ms behind schedule)")
        if run.get("sut_stderr_lines"):
            notes.append(f"{name} wrote {run['sut_stderr_lines']} stderr line(s); last: "
                         f"{run['sut_stderr_tail'][-3:]}")
        if not run.get("sut_alive_at_end", True):
            notes.append(f"{name} had exited before the end of the run")
        if run.get("sut_stop_s", 0) > 3:
            notes.append(f"{name} took {run['sut_stop_s']} s to stop after SIGTERM "
                         f"(exit code {run.get('sut_exit_code')})")
    for s in report["systems"]:
        if "error" in s:
            notes.append(f"{s['system']} FAILED: {s['error']}")
    notes.extend(report.get("skipped", []))
    return "\n".join(head + rows), notes


# ----------------------------------------------------------------------------- main
def default_python():
    venv = os.path.join(ROOT, ".venv", "bin", "python")
    return venv if os.path.exists(venv) else sys.executable


def parse_args():
    ap = argparse.ArgumentParser(
        description="Benchmark ocpp-edge against a bare WebSocket<->MQTT forwarder (the floor).",
        epilog="The default run (make bench) takes about 2 minutes for both systems.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--systems", default=",".join(SYSTEMS),
                    help="comma-separated subset of floor,ocpp-edge,refbridge")
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
    ap.add_argument("--time-budget", type=float, default=175.0,
                    help="no retry is started that would end the run after this many seconds")
    ap.add_argument("--sut-cpu", type=int, default=0, help="CPU the SUT is pinned to")
    ap.add_argument("--load-cpu", type=int, default=1,
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
        args.quiet_wait, args.retries = 0.0, 0
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

    # Ctrl-C and SIGTERM unwind through the finally below, which kills every child's process
    # group.  SIGINT is set explicitly: a shell starting us in the background ignores it.
    def interrupt(signum, frame):
        raise KeyboardInterrupt()

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)

    tmp = tempfile.mkdtemp(prefix="ocpp-edge-bench-")
    kids = Children(tmp)
    report = {"args": {k: v for k, v in vars(args).items()},
              "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(["python", *sys.argv]),
              "machine": machine_info(args.mosquitto), "source": source_info(),
              "systems": [], "skipped": []}
    t_start = args.started = time.monotonic()
    try:
        report["interpreter"] = info = py_info(args.python)
        systems = list(args.systems)
        args.gw_src = ROOT
        if "ocpp-edge" in systems and args.gw_commit:
            args.gw_src = os.path.join(tmp, "src")
            report["source"] = {"commit": export_commit(args.gw_commit, args.gw_src),
                                "ocpp_edge_changed_files": 0, "from": "git archive"}
        if "ocpp-edge" in systems:
            ok, why = gateway_importable(args.python, args.gw_src)
            if not ok:
                systems.remove("ocpp-edge")
                report["skipped"].append(f"ocpp-edge not run: `import ocpp_edge.gateway` "
                                         f"fails with {args.python} ({why})")
        m = report["machine"]
        print(f"# ocpp-edge bench: {m['cpu_model']}, {m['nproc']} CPUs, {m['mosquitto']}; "
              f"Python {info['python']} ({info['executable']}), tornado {info['tornado']}, "
              f"paho-mqtt {info['paho-mqtt']}; ocpp-edge at {report['source']['commit']}"
              f" + {report['source']['ocpp_edge_changed_files']} changed file(s) in ocpp_edge/",
              flush=True)
        for name in systems:
            print(f"# running {name} ...", flush=True)
            run = SystemRun(name, args, kids, tmp)
            try:
                report["systems"].append(run.run())
            except RuntimeError as exc:
                run.result["error"] = str(exc)
                report["systems"].append(run.result)
            finally:
                kids.stop_all()
        report["elapsed_s"] = time.monotonic() - t_start
        table, notes = render(report)
        if any("error" not in s for s in report["systems"]):
            print()
            print(table)
        if notes:
            print()
            for n in notes:
                print("- " + n)
        print(f"\n(elapsed {report['elapsed_s']:.0f} s)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
        return 0 if all("error" not in s for s in report["systems"]) else 1
    except KeyboardInterrupt:
        print("\n# interrupted; tearing down", file=sys.stderr)
        return 130
    finally:
        kids.stop_all()
        if args.keep_tmp:
            print("# logs and configs kept in " + tmp, file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
