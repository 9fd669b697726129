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
"""

import argparse
import json
import os
import platform
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
CLK_TCK = os.sysconf("SC_CLK_TCK")
SYSTEMS = ("floor", "ocpp-edge", "refbridge")
PHASES = ("closed", "open", "scale", "idle", "wakeups", "startup", "drain")
DEFAULT_PHASES = ("closed", "open")


# ----------------------------------------------------------------------------- processes
class Proc:
    """A child in its own process group, with its stdout read line by line by a thread."""

    def __init__(self, name, argv, cpu, log_dir, stdin=False, cwd=ROOT, env=None):
        self.name = name
        if cpu is not None:
            argv = ["taskset", "-c", str(cpu), *argv]      # taskset execs: same pid
        self.log_path = os.path.join(log_dir, name + ".stderr")
        self._log = open(self.log_path, "wb")      # closed in stop()
        self.p = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=self._log,
                                  stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                  start_new_session=True, env=env)
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


def proc_mem_mb(pid):
    """(VmRSS, Pss) of a process in MB; Pss from smaps_rollup, None where unavailable."""
    rss = pss = None
    try:
        rss = proc_rss_mb(pid)
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) / 1024.0
                    break
    except OSError:
        pass
    return rss, pss


def proc_ctx_switches(pid):
    """(voluntary, nonvoluntary, threads): context switches summed over every thread.

    A voluntary switch is the task blocking (epoll_wait, a lock, a sleep) and later being
    woken: one wake-up.  Nonvoluntary ones are preemptions.
    """
    vol = nonvol = threads = 0
    base = f"/proc/{pid}/task"
    for tid in os.listdir(base):
        try:
            with open(f"{base}/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        vol += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        nonvol += int(line.split()[1])
            threads += 1
        except OSError:                  # the thread ended meanwhile
            pass
    return vol, nonvol, threads


def wait_rss_settled(pid, min_s=3.0, max_s=20.0, tol=0.005):
    """Poll VmRSS once a second until three samples in a row are within tol of each other
    (after at least min_s), at most max_s.  Returns (seconds waited, RSS samples)."""
    t0 = time.monotonic()
    seen = []
    while True:
        time.sleep(1.0)
        seen.append(proc_rss_mb(pid))
        waited = time.monotonic() - t0
        last = seen[-3:]
        if waited >= min_s and len(last) == 3 and max(last) - min(last) <= tol * max(last):
            return waited, seen
        if waited >= max_s:
            return waited, seen


def wait_cpu_idle(pid, max_s=30.0, threshold=1.0):
    """Wait until the process used < threshold % of a CPU over one second (after start-up
    work such as ocpp-edge's schema warm-up), at most max_s.  Returns the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < max_s:
        c0 = proc_cpu_s(pid)
        time.sleep(1.0)
        if 100.0 * (proc_cpu_s(pid) - c0) < threshold:
            break
    return round(time.monotonic() - t0, 1)


def raise_nofile():
    """Lift this process's soft RLIMIT_NOFILE to the hard limit; children inherit it (the
    SUT needs one descriptor per charge point, 10,000 and more here)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


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
        with open(os.path.join(src, "ocpp_edge", "config", "configspec.ini")) as f:
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
        self.sut_starts = 0
        self.sut_logs = []           # stderr files of every SUT instance this run started

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
            if spec_has_key(a.gw_src, "admin.listen"):
                # the admin endpoint stays on (as shipped), on a free port: its default
                # 127.0.0.1:33080 may be taken by another gateway on the machine
                keys.append(("admin.listen", f"127.0.0.1:{free_port()}"))
            if spec_has_key(a.gw_src, "ocpp.listener.ws.max_connections"):
                # 10,000 idle charge points and more: the connection limit is not measured
                keys.append(("ocpp.listener.ws.max_connections", "1000000"))
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
            return self.kids.start(pname, argv, a.sut_cpu, cwd=a.gw_src, env=env)
        return self.kids.start(pname, argv, a.sut_cpu, env=env)

    def loadgen_argv(self, ws_port, mode, first, count, rate=None, extra=()):
        a = self.args
        argv = [a.python, os.path.join(BENCH, "loadgen.py"),
                "--url", f"ws://127.0.0.1:{ws_port}/ocpp/", "--mode", mode,
                "--first", str(first), "--count", str(count), "--action", a.action,
                "--client", a.ws_client]
        if rate is not None:
            argv += ["--rate", f"{rate:.3f}"]
        return argv + list(extra)

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
        counts = split(cps, nprocs)
        actives = split(active, nprocs) if active is not None else counts
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

    # -- start-up ----------------------------------------------------------------------------
    def start_probed(self, mqtt_port):
        """A fresh SUT on a new port, returned once a probe Heartbeat made the round trip:
        (proc, ws_port, probe line, seconds from Popen)."""
        a = self.args
        ws_port = free_port()
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
        ws_port = free_port()
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
                waited = wait_cpu_idle(sut.pid)
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
        v0, n0, _ = proc_ctx_switches(sut.pid)
        c0, t0 = proc_cpu_s(sut.pid), time.monotonic()
        time.sleep(window)
        v1, n1, threads = proc_ctx_switches(sut.pid)
        c1, t1 = proc_cpu_s(sut.pid), time.monotonic()
        dt = t1 - t0
        return {"window_s": round(dt, 2), "wakeups_per_s": (v1 - v0 + n1 - n0) / dt,
                "voluntary_per_s": (v1 - v0) / dt, "nonvoluntary_per_s": (n1 - n0) / dt,
                "cpu_pct": 100.0 * (c1 - c0) / dt, "threads": threads}

    def idle_phase(self, sut, n):
        """n idle charge points (BootNotification, then a Heartbeat each --idle-heartbeat s):
        SUT memory before and after, wake-ups per second with them connected."""
        a = self.args
        cpu_idle_s = wait_cpu_idle(sut.pid)
        _, before_samples = wait_rss_settled(sut.pid, min_s=2.0, max_s=10.0)
        rss0, pss0 = proc_mem_mb(sut.pid)
        nprocs = self.lg_procs_for(n)
        lgs, first = [], 1
        t = time.monotonic()
        for i, count in enumerate(split(n, nprocs)):
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
        settle_s, samples = wait_rss_settled(sut.pid, min_s=3.0, max_s=a.settle_max)
        rss1, pss1 = proc_mem_mb(sut.pid)
        wake = self.wakeups(sut) if "wakeups" in a.phases else None
        rss2, pss2 = proc_mem_mb(sut.pid)
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

        sut, ws_port, line, ready_after = self.start_probed(mqtt_port)
        self.result["sut_pid"] = sut.pid
        self.result["probe"] = line
        self.result["ready_after_s"] = ready_after
        self.result["sut_rss_mb_idle"] = proc_rss_mb(sut.pid)     # no charge point connected
        if "wakeups" in a.phases:
            # fresh, 0 charge points, once its start-up work is done
            self.result["cpu_idle_after_s"] = wait_cpu_idle(sut.pid)
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
                row["sut_rss_mb_after"] = proc_rss_mb(sut.pid)
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
    phases = a.get("phases", DEFAULT_PHASES)
    if a["closed_duration"] > 0 and "closed" in phases:
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
    if a["open_duration"] > 0 and "open" in phases:
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


HEAD = ("| {} | floor | ocpp-edge | reference bridge | ocpp-edge / floor | "
        "ocpp-edge / ref. bridge |\n|---|---:|---:|---:|---:|---:|")


def render_more(report):
    """The tables of the scale, idle, wakeups, startup and drain phases: [(title, table)],
    notes.  Same columns as the main table; a ratio is ocpp-edge's figure over the other's."""
    runs = {r["system"]: r for r in report["systems"] if "error" not in r}
    trio = [runs.get(s) for s in SYSTEMS]
    a = report["args"]
    tables, notes = [], []

    def line(label, vals, spec="{:,.0f}", with_ratio=True, marks=("", "", "")):
        fv, gv, bv = vals
        fm, gm, bm = marks
        r = ratio(gv, fv) + (fm or gm) if with_ratio else ""
        rb = ratio(gv, bv) + (bm or gm) if with_ratio else ""
        return (f"| {label} | {fmt(fv, spec)}{fm} | {fmt(gv, spec)}{gm} | {fmt(bv, spec)}{bm}"
                f" | {r} | {rb} |")

    def pick(*path):
        out = []
        for run in trio:
            v = run
            for k in path:
                v = v.get(k) if isinstance(v, dict) else None
            out.append(v)
        return out

    def marks(*path):
        return tuple("*" if isinstance(p, dict) and "sut_core_foreign_pct" in p
                     and disturbed(p) else "" for p in pick(*path))

    # -- scaling
    if any(r and r.get("scale") for r in trio):
        rows = []
        for n in a["scale_cps"]:
            k = str(n)
            o_act, c_act = min(n, a["scale_open_cps"]), min(n, a["scale_closed_cps"])
            om, cm = marks("scale", k, "open"), marks("scale", k, "closed")
            rows += [
                line(f"{n:,} CPs, open loop {a['scale_rate']:g}/s over {o_act}: SUT CPU µs per "
                     "answered CALL (idle CPs' Heartbeats included)",
                     pick("scale", k, "open", "sut_cpu_us_per_msg"), marks=om),
                line(f"{n:,} CPs, open loop: round trip p50 ms",
                     pick("scale", k, "open", "lat_p50_ms"), "{:.2f}", marks=om),
                line(f"{n:,} CPs, open loop: round trip p99 ms",
                     pick("scale", k, "open", "lat_p99_ms"), "{:.2f}", marks=om),
                line(f"{n:,} CPs, closed loop over {c_act}: answered CALLs/s",
                     pick("scale", k, "closed", "answered_per_s"), marks=cm),
                line(f"{n:,} CPs, closed loop: SUT CPU µs per answered CALL (Heartbeats "
                     "included)", pick("scale", k, "closed", "sut_cpu_us_per_msg"), marks=cm),
                line(f"{n:,} CPs: SUT RSS MB after both windows",
                     pick("scale", k, "sut_rss_mb_after"), "{:.1f}"),
            ]
        # flatness: the cost at the largest N over the cost at the smallest
        lo, hi = str(a["scale_cps"][0]), str(a["scale_cps"][-1])
        for mode in ("open", "closed"):
            vals = []
            for run in trio:
                try:
                    vals.append(run["scale"][hi][mode]["sut_cpu_us_per_msg"]
                                / run["scale"][lo][mode]["sut_cpu_us_per_msg"])
                except (TypeError, KeyError, ZeroDivisionError):
                    vals.append(None)
            rows.append(line(f"{mode} loop: CPU µs per CALL at {int(hi):,} CPs / at "
                             f"{int(lo):,} CPs (1.00 = flat)", vals, "{:.2f}", False))
        tables.append((f"scaling: per-message cost at {', '.join(f'{n:,}' for n in a['scale_cps'])}"
                       f" connected CPs (idle ones heartbeat every {a['idle_heartbeat']:g} s)",
                       HEAD.format("metric (CALL: " + a["action"] + ")") + "\n" + "\n".join(rows)))
        for run in trio:
            for k, row in ((run or {}).get("scale") or {}).items():
                for mode in ("open", "closed"):
                    p = row.get(mode)
                    if p is None:
                        continue
                    bad = problems(p)
                    if bad:
                        notes.append(f"{run['system']} scale {k} {mode}: {bad}")
                    if p["connected"] != p["cps"]:
                        notes.append(f"{run['system']} scale {k} {mode}: only {p['connected']} "
                                     f"of {p['cps']} CPs connected")
                    if disturbed(p):
                        notes.append(f"{run['system']} scale {k} {mode}: disturbed (foreign "
                                     f"{p['sut_core_foreign_pct']:.0f}% CPU {a['sut_cpu']}, "
                                     f"{p['load_core_foreign_pct']:.0f}% CPU {a['load_cpu']})")

    # -- idle memory and wake-ups
    if any(r and r.get("idle") for r in trio):
        rows = []
        for n in a["idle_cps"]:
            k = str(n)
            rows += [
                line(f"{n:,} idle CPs: connected and booted (READY reports)",
                     pick("idle", k, "connected"), with_ratio=False),
                line(f"{n:,} idle CPs: SUT RSS MB before connecting",
                     pick("idle", k, "rss_mb_before"), "{:.1f}"),
                line(f"{n:,} idle CPs: SUT RSS MB connected (settled)",
                     pick("idle", k, "rss_mb"), "{:.1f}"),
                line(f"{n:,} idle CPs: SUT RSS growth KB per connected CP",
                     pick("idle", k, "rss_kb_per_cp"), "{:.1f}"),
                line(f"{n:,} idle CPs: SUT PSS MB connected", pick("idle", k, "pss_mb"),
                     "{:.1f}"),
                line(f"{n:,} idle CPs: SUT PSS growth KB per connected CP",
                     pick("idle", k, "pss_kb_per_cp"), "{:.1f}"),
            ]
        tables.append((f"idle memory: fresh SUT, then N charge points (BootNotification, then "
                       f"a Heartbeat every {a['idle_heartbeat']:g} s)",
                       HEAD.format("metric") + "\n" + "\n".join(rows)))
        for run in trio:
            for k, p in ((run or {}).get("idle") or {}).items():
                if p["connected"] != p["cps"] or p["boot_unanswered"] or \
                        p["connected_at_end"] != p["connected"]:
                    notes.append(f"{run['system']} idle {k}: connected {p['connected']} of "
                                 f"{p['cps']}, boot unanswered {p['boot_unanswered']}, still "
                                 f"connected at the end {p['connected_at_end']}; "
                                 f"{p['connect_errors']}")
                hb = p["heartbeats"]
                if hb["hb_sent"] - hb["hb_answered"] > 0.01 * max(1, hb["hb_sent"]) + 5 or \
                        hb["hb_callerrors"] or hb["disconnects"]:
                    notes.append(f"{run['system']} idle {k}: heartbeats {hb}")
        big = str(max(a["idle_cps"]))
        for run in trio:
            p = ((run or {}).get("idle") or {}).get(big)
            if p and int(big) >= 10000:
                notes.append(f"{run['system']}: {int(big):,} idle CPs -> {p['rss_mb']:.0f} MB "
                             f"RSS total (target for ocpp-edge: < 200 MB at 10,000)")

    if any(r and (r.get("wakeups_idle") or r.get("idle")) for r in trio) and \
            "wakeups" in a["phases"]:
        rows = [line("0 CPs (fresh SUT, the idle gateway): wake-ups/s",
                     pick("wakeups_idle", "wakeups_per_s"), "{:.1f}"),
                line("0 CPs: of which voluntary (blocked, then woken)/s",
                     pick("wakeups_idle", "voluntary_per_s"), "{:.1f}", False),
                line("0 CPs: SUT CPU %", pick("wakeups_idle", "cpu_pct"), "{:.2f}"),
                line("0 CPs: SUT threads", pick("wakeups_idle", "threads"), with_ratio=False)]
        wn = pick("startup", "idle_wakeups_with_notify")
        if wn[1]:
            rows += [line("0 CPs, ocpp-edge with NOTIFY_SOCKET (as under systemd): wake-ups/s",
                          [None, wn[1]["wakeups_per_s"], None], "{:.1f}", False),
                     line("0 CPs, ocpp-edge with NOTIFY_SOCKET: SUT CPU %",
                          [None, wn[1]["cpu_pct"], None], "{:.2f}", False)]
        for n in a["idle_cps"] if "idle" in a["phases"] else ():
            k = str(n)
            rows += [line(f"{n:,} idle CPs ({n / a['idle_heartbeat']:,.0f} Heartbeats/s): "
                          "wake-ups/s", pick("idle", k, "wakeups", "wakeups_per_s"), "{:.1f}"),
                     line(f"{n:,} idle CPs: SUT CPU %", pick("idle", k, "wakeups", "cpu_pct"),
                          "{:.2f}")]
        waits = pick("cpu_idle_after_s")
        rows.append(line("0 CPs: s after the probe answer until the SUT's CPU fell below 1 % "
                         "(start-up work; the window starts then)", waits, "{:.1f}", False))
        tables.append((f"idle wake-ups: context switches of all SUT threads (voluntary + "
                       f"nonvoluntary) per second over {a['wakeup_window']:g} s",
                       HEAD.format("metric") + "\n" + "\n".join(rows)))

    # -- start-up
    if any(r and r.get("startup") for r in trio):
        def mm(key):
            out = []
            for run in trio:
                s_ = (run or {}).get("startup")
                out.append(None if not s_ or s_.get(key + "_median") is None else
                           (s_[key + "_median"], s_[key + "_max"]))
            return out

        def mm_line(label, key, with_ratio=True):
            v = mm(key)
            cells = ["–" if x is None else f"{x[0]:.2f} / {x[1]:.2f}" for x in v]
            med = [x and x[0] for x in v]
            r = ratio(med[1], med[0]) if with_ratio else ""
            rb = ratio(med[1], med[2]) if with_ratio else ""
            return f"| {label} | {cells[0]} | {cells[1]} | {cells[2]} | {r} | {rb} |"

        reps = a["startup_reps"]
        rows = [mm_line("Popen → the WebSocket port accepts a TCP connection", "port_s"),
                mm_line("Popen → own readiness signal: ocpp-edge READY=1 (sd_notify); floor "
                        "and ref. bridge: READY on stdout (MQTT subscribed)", "signal_s"),
                mm_line("Popen → first probe Heartbeat answered (probe running beforehand, "
                        "retrying every 50 ms)", "probe_s")]
        tables.append((f"start-up: seconds, median / max of {reps} fresh starts (the "
                       "interpreter's start and imports included; ratios of medians)",
                       HEAD.format("metric") + "\n" + "\n".join(rows)))
        for run in trio:
            s_ = (run or {}).get("startup")
            if s_:
                for key in ("port_s", "signal_s", "probe_s"):
                    if s_[key + "_n"] != reps:
                        notes.append(f"{run['system']} start-up: {key} seen in only "
                                     f"{s_[key + '_n']} of {reps} starts")

    # -- drain
    d = report.get("drain")
    if d:
        rows = []
        if "error" in d:
            notes.append(f"drain FAILED: {d['error']}")
        for r in d.get("drain", []):
            fl, gw = r["floor"], r["gateway"]
            g_rate = gw.get("msgs_s")
            rows += [
                f"| {r['backlog']:,}-message backlog after an outage (paho {r['paho']}, window "
                f"{r['window']}): msg/s | {fmt(fl['msgs_s'])} | {fmt(g_rate)} | n/a, no buffer"
                f" | {ratio(g_rate, fl['msgs_s'])} | – |",
                f"| same, steady part (90 % → 10 % left): msg/s | {fmt(fl['msgs_s'])} | "
                f"{fmt(gw.get('steady_msgs_s'))} | n/a, no buffer | "
                f"{ratio(gw.get('steady_msgs_s'), fl['msgs_s'])} | – |",
                f"| same: CPU µs per message | {fmt(fl.get('cpu_us_per_msg'), '{:.1f}')} | "
                f"{fmt(gw.get('gw_cpu_us_per_msg'), '{:.1f}')} | n/a, no buffer | "
                f"{ratio(gw.get('gw_cpu_us_per_msg'), fl.get('cpu_us_per_msg'))} | – |",
                f"| same: empty after s from the gateway's start (its start-up) | – | "
                f"{fmt(gw.get('time_to_empty_s'), '{:.1f}')} "
                f"({fmt(gw.get('startup_s'), '{:.1f}')}) | n/a, no buffer | | |",
            ]
            if gw.get("error"):
                notes.append(f"drain: ocpp-edge {gw['error']} {gw.get('gw_stderr')}")
            worst = max(fl.get("cpu0_foreign_pct", 0), gw.get("cpu0_foreign_pct", 0))
            if worst > 10:
                notes.append(f"drain: other processes took {worst:.0f} % of CPU 0 -- disturbed")
        tables.append(("backlog drain (bench/buffer_bench.py phase 3; floor = the same "
                       "messages published from memory at QoS 1 with the same window and "
                       "paho; target ocpp-edge / floor >= 0.8)",
                       HEAD.format("metric") + "\n" + "\n".join(rows)))
    return tables, notes


def run_drain(args, kids, tmp):
    """bench/buffer_bench.py phase 3 for --python: a --drain-backlog backlog drained by the
    gateway beside its in-memory floor.  Returns buffer_bench's JSON report (or an error)."""
    out = os.path.join(tmp, "drain.json")
    argv = [args.python, os.path.join(BENCH, "buffer_bench.py"), "--phases", "3",
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
    venv = os.path.join(ROOT, ".venv", "bin", "python")
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
    report["nofile_limit"] = raise_nofile()
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
        table, notes = render(report)
        more, more_notes = render_more(report)
        notes += more_notes
        if any("error" not in s for s in report["systems"]) and \
                set(args.phases) & {"closed", "open"}:
            print()
            print(table)
        for title, t in more:
            print(f"\n### {title}\n")
            print(t)
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
