"""bench/run.py's report: its markdown tables and notes, from the JSON report it builds.

Benchmark code only.  One column per system under test (floor | ocpp-edge | reference
bridge) and two ratios (ocpp-edge / floor, ocpp-edge / reference bridge); ``*`` marks
figures of windows that other processes disturbed (``disturbed``, which is also run.py's
criterion for measuring a window again).

  render       the closed- and open-loop table (the default phases).
  render_more  one table each for the scale, idle, wakeups, startup and drain phases.
  show         prints them all, then the notes and the elapsed time.
"""

SYSTEMS = ("floor", "ocpp-edge", "refbridge")       # the columns, in this order


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
    phases = a.get("phases", ("closed", "open"))
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


def show(report):
    """Print every table of a finished report, then its notes and the elapsed time."""
    table, notes = render(report)
    more, more_notes = render_more(report)
    notes += more_notes
    if any("error" not in s for s in report["systems"]) and \
            set(report["args"]["phases"]) & {"closed", "open"}:
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
