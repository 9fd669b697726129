"""The benchmarks' shared harness: what bench/run.py, bench/buffer_bench.py and their
children need to start, pin, feed, watch and tear down the processes they measure.
Benchmark code only, standard library only (children import it too).

Processes
  SUT_CPU, LOAD_CPU     the CPUs the system under test and everything else are pinned to.
  Proc, Children        a child in its own process group (``taskset -c CPU`` pinned when
                        asked), stdout read line by line by a thread (``expect``,
                        ``expect_json``), stderr to LOG_DIR/NAME.stderr; Children tears every
                        one of them down (SIGTERM, then SIGKILL of the group).
  workspace()           a temporary directory + Children, SIGINT/SIGTERM turned into
                        KeyboardInterrupt, everything stopped and removed (--keep-tmp: kept)
                        at the end.
  raise_nofile()        lift RLIMIT_NOFILE (children inherit it).
Ports and brokers
  free_port, wait_port  a free 127.0.0.1 port; wait until one accepts TCP.
  start_mosquitto()     a private Mosquitto on a free port, from a generated config
                        (persistence off, no in-flight limit, TCP_NODELAY).
The gateway and the helper processes
  spec_has_key, gateway_importable, export_commit, admin_listen, gateway_config,
  start_gateway         configure and start ``python -m ocpp_edge --config <generated>``
                        from the working tree or an exported commit.
  loadgen_argv, start_backend, go
                        bench/loadgen.py command lines, bench/backend.py started until READY,
                        the shared ``go T0 T1`` measurement window.
CPU and memory sampling (/proc)
  proc_cpu_s, self_cpu_s, proc_rss_mb, proc_mem_mb, proc_ctx_switches, wait_rss_settled,
  wait_cpu_idle         one process: CPU seconds, VmRSS/PSS, context switches.
  cpu_times, busy_pct, steal_pct, foreign_pct, wait_quiet
                        one CPU: busy, stolen and other processes' share; wait for a quiet
                        machine.
Figures and the report's description of the run
  percentile, split, sleep_until
  py_info, machine_info, source_info, report_head

Over 500 lines because it is the one copy of all of the above for every bench file.
"""

import contextlib
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
SUT_CPU, LOAD_CPU = 0, 1        # default pinning: the system under test; everything else


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

    def expect_json(self, prefix, timeout):
        """The JSON after prefix on the first line that starts with it; RuntimeError if none."""
        line = self.expect(prefix, timeout)
        if line is None:
            raise RuntimeError(f"{self.name}: no {prefix.strip()} line; "
                               f"{self.stderr_tail(5)}")
        return json.loads(line[len(prefix):])

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


@contextlib.contextmanager
def workspace(prefix, keep=False):
    """(temporary directory, Children) for one run.  Ctrl-C and SIGTERM raise
    KeyboardInterrupt (SIGINT set explicitly: a shell starting us in the background ignores
    it), so the caller's code unwinds; at the end every child's process group is killed and
    the directory removed (or, with keep, named on stderr)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt()

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    tmp = tempfile.mkdtemp(prefix=prefix)
    kids = Children(tmp)
    try:
        yield tmp, kids
    finally:
        kids.stop_all()
        if keep:
            print("# logs and configs kept in " + tmp, file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def raise_nofile(need=None):
    """Lift the soft RLIMIT_NOFILE: to the hard limit, or (need) towards it until need
    descriptors fit.  Children inherit it.  Returns the limits now in force."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if need is None:
            if soft != hard:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        else:
            want = need if hard == resource.RLIM_INFINITY else min(need, hard)
            if soft != resource.RLIM_INFINITY and soft < want:
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError):
        pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# ----------------------------------------------------------------------------- drivers
class DriverBase:
    """What every benchmark driver does alike; ``self.a`` holds its parsed arguments."""

    def log(self, text):
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    def quiet(self):
        """Wait (at most --quiet-wait s) for 1 s in which both CPUs are < 10 % busy."""
        if self.a.quiet_wait > 0:
            return wait_quiet([SUT_CPU, LOAD_CPU], self.a.quiet_wait)
        return None


# ----------------------------------------------------------------------------- ports, brokers
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


def start_mosquitto(kids, binary, name, cpu, max_queued_messages=0):
    """A fresh Mosquitto on a free 127.0.0.1 port, config in kids.log_dir/NAME.conf:
    persistence off, no per-client in-flight window, Nagle off.  Returns (proc, port)."""
    port = free_port()
    conf = os.path.join(kids.log_dir, f"{name}.conf")
    with open(conf, "w") as f:
        f.write("\n".join([
            f"listener {port} 127.0.0.1",
            "allow_anonymous true",
            "persistence false",
            "max_inflight_messages 0",        # no per-client in-flight window
            f"max_queued_messages {max_queued_messages}",
            "max_queued_bytes 0",
            "set_tcp_nodelay true",            # Nagle off towards the clients
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            ""]))
    proc = kids.start(name, [binary, "-c", conf], cpu)
    if not wait_port(port, 5.0):
        raise RuntimeError(f"mosquitto did not listen: {proc.stderr_tail()}")
    return proc, port


# ----------------------------------------------------------------------------- the gateway
def spec_has_key(src, key):
    """Does the gateway's configspec in src know ``key``?  (Unknown keys are an error.)"""
    try:
        with open(os.path.join(src, "ocpp_edge", "config", "configspec.ini")) as f:
            return any(line.split("=", 1)[0].strip() == key for line in f)
    except OSError:
        return False


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


def export_commit(rev, dest):
    """Extract ocpp_edge/ and schemas/ of a commit into dest (read-only use of the repo)."""
    os.makedirs(dest)
    archive = subprocess.run(["git", "archive", rev, "ocpp_edge", "schemas"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    return subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()


def admin_listen(src):
    """The admin endpoint stays on (as shipped), on a free port: its default
    127.0.0.1:33080 may be taken by another gateway on the machine.  [] if src's gateway
    has no admin endpoint."""
    if spec_has_key(src, "admin.listen"):
        return [("admin.listen", f"127.0.0.1:{free_port()}")]
    return []


def gateway_config(path, keys, sets=()):
    """Write ``key = value`` lines to path; sets: ``KEY=VALUE`` strings that replace or add
    a key (an empty VALUE drops it).  Returns the text written."""
    keys = list(keys)
    for item in sets:
        key, _, value = (x.strip() for x in item.partition("="))
        keys = [(k, v) for k, v in keys if k != key]
        if value:
            keys.append((key, value))
    text = "".join(f"{k} = {v}\n" for k, v in keys)
    with open(path, "w") as f:
        f.write(text)
    return text


def start_gateway(kids, name, python, conf, cpu, src=ROOT, env=None, cprofile=None):
    """``python -m ocpp_edge --config conf`` run from src (under cProfile, statistics to
    the file cprofile, if given)."""
    argv = [python, "-m", "ocpp_edge", "--config", conf]
    if cprofile:
        argv[1:1] = ["-m", "cProfile", "-o", os.path.abspath(cprofile)]
    return kids.start(name, argv, cpu, cwd=src, env=env)


# ----------------------------------------------------------------------------- helper processes
def loadgen_argv(python, ws_port, mode, first=None, count=None, action=None, client=None,
                 rate=None, extra=()):
    """A bench/loadgen.py command line (options left out when None)."""
    argv = [python, os.path.join(BENCH, "loadgen.py"),
            "--url", f"ws://127.0.0.1:{ws_port}/ocpp/", "--mode", mode]
    for opt, v in (("--first", first), ("--count", count), ("--action", action),
                   ("--client", client)):
        if v is not None:
            argv += [opt, str(v)]
    if rate is not None:
        argv += ["--rate", f"{rate:.3f}"]
    return argv + list(extra)


def start_backend(kids, name, python, mqtt_port, cpu, impl, sub_qos=None, timeout=15.0):
    """bench/backend.py (answers every CALL at once over MQTT), returned once READY."""
    argv = [python, os.path.join(BENCH, "backend.py"), "--mqtt", f"127.0.0.1:{mqtt_port}",
            "--impl", impl]
    if sub_qos is not None:
        argv += ["--sub-qos", str(sub_qos)]
    proc = kids.start(name, argv, cpu)
    if proc.expect("READY", timeout) is None:
        raise RuntimeError(f"backend not ready: {proc.stderr_tail(3)}")
    return proc


def go(procs, warmup, duration):
    """Send ``go T0 T1`` (wall-clock times shared with the children: the measured window
    starts warmup s from now and lasts duration s) to every proc.  Returns (t0, t1)."""
    t0 = time.time() + warmup
    t1 = t0 + duration
    for p in procs:
        p.send(f"go {t0:.6f} {t1:.6f}\n")
    return t0, t1


# ----------------------------------------------------------------------------- /proc sampling
def proc_cpu_s(pid):
    """utime + stime of one process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def self_cpu_s():
    """User + system CPU seconds of this process."""
    t = os.times()
    return t.user + t.system


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


def foreign_pct(before, after, cpu_s, wall_s):
    """The % of one CPU (cpu_times before/after) that other processes used: its busy %
    less the cpu_s CPU seconds the measured process used on it over wall_s seconds."""
    return max(0.0, busy_pct(before, after) - 100.0 * cpu_s / wall_s)


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


# ----------------------------------------------------------------------------- figures
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


# ----------------------------------------------------------------------- the run's description
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


def report_head(command, mosquitto):
    """The start of every JSON report: when, the command line, the machine, the source."""
    return {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command,
            "machine": machine_info(mosquitto), "source": source_info()}
