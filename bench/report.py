"""Turns a run's rows into README.md, summary.md and configs/ in the run folder.

Every figure in summary.md is the median over repetitions with (min–max) beside it when
there was more than one; raw.jsonl holds every measurement.
"""

import os
import platform
import re
import resource
import shutil
import statistics
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

US = "portrelay-uring"
EP = "portrelay-epoll"
HA = "haproxy-splice"
NG = "nginx"
FLOOR = "floor"
DIRECT = "direct"
BEST_PEER_CONNRATE = ["nginx", "haproxy-splice", "haproxy-nosplice"]
LATENCY_PEERS = ["haproxy-splice", "haproxy-nosplice", "nginx", "socat", "rinetd", "redir"]


def sh(argv, cwd=ROOT):
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=20, cwd=cwd)
        return (r.stdout + r.stderr).strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def first_line(s):
    return s.splitlines()[0] if s else "not installed"


# ------------------------------------------------------------------------------ stats


def values(rows, test, contestant, key, **match):
    out = []
    for r in rows:
        if r.get("test") != test or r.get("contestant") != contestant or "error" in r:
            continue
        if any(r.get(k) != v for k, v in match.items()):
            continue
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(float(v))
    return out


def med(vs):
    return statistics.median(vs) if vs else None


def fmt(vs, digits=2):
    if not vs:
        return "–"
    m = statistics.median(vs)
    if len(vs) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ({min(vs):.{digits}f}–{max(vs):.{digits}f})"


def num(v, digits=2):
    return "–" if v is None else f"{v:.{digits}f}"


def took_part(rows, test, contestant):
    return any(r.get("test") == test and r.get("contestant") == contestant for r in rows)


def errors(rows, test, contestant):
    return [r["error"] for r in rows if r.get("test") == test and r.get("contestant") == contestant and "error" in r]


# ------------------------------------------------------------------------------ tables


def table(header, lines):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(x) for x in line) + " |" for line in lines]
    return "\n".join(out)


def bulk_table(b, rows, names):
    lines = []
    for n in names:
        if not took_part(rows, "bulk", n):
            continue
        err = errors(rows, "bulk", n)
        lines.append([
            n,
            fmt(values(rows, "bulk", n, "gbit_s", streams=1)),
            fmt(values(rows, "bulk", n, "cpu_s_per_gb", streams=1), 3),
            fmt(values(rows, "bulk", n, "gbit_s", streams=4)),
            fmt(values(rows, "bulk", n, "cpu_s_per_gb", streams=4), 3),
            num(med(values(rows, "bulk", n, "host_busy")), 2),
            f"{len(err)}: {err[0][:80]}" if err else "0",
        ])
    return table(["contestant", "1 stream Gbit/s", "1 stream relay CPU-s/GB", "4 streams Gbit/s",
                  "4 streams relay CPU-s/GB", "host busy (of 2 cores)", "errors"], lines)


def latency_table(b, rows, names, test="latency"):
    d50 = med(values(rows, test, DIRECT, "p50_us"))
    d99 = med(values(rows, test, DIRECT, "p99_us"))
    lines = []
    for n in names:
        if not took_part(rows, test, n):
            continue  # a contestant that does not take part in this test
        p50 = med(values(rows, test, n, "p50_us"))
        p99 = med(values(rows, test, n, "p99_us"))
        err = errors(rows, test, n)
        lines.append([
            n,
            fmt(values(rows, test, n, "p50_us"), 1),
            fmt(values(rows, test, n, "p99_us"), 1),
            fmt(values(rows, test, n, "p999_us"), 1),
            num(p50 - d50 if p50 is not None and d50 is not None else None, 1),
            num(p99 - d99 if p99 is not None and d99 is not None else None, 1),
            fmt(values(rows, test, n, "relay_cpu_us_per_rt"), 1),
            f"{len(err)}: {err[0][:80]}" if err else "0",
        ])
    return table(["contestant", "p50 µs", "p99 µs", "p99.9 µs", "added p50 µs", "added p99 µs",
                  "relay CPU µs per round trip", "errors"], lines)


def connrate_table(b, rows, names):
    lines = []
    for n in names:
        if not took_part(rows, "connrate", n):
            continue
        fails = sum(values(rows, "connrate", n, "failed"))
        kinds = {}
        for r in rows:
            if r.get("test") == "connrate" and r.get("contestant") == n:
                for k, v in r.items():
                    if k.startswith("fail_") and v:
                        kinds[k[5:]] = kinds.get(k[5:], 0) + v
        err = errors(rows, "connrate", n)
        lines.append([
            n,
            fmt(values(rows, "connrate", n, "conns_per_s"), 0),
            f"{int(fails)}" + (f" ({', '.join(f'{k} {v}' for k, v in kinds.items())})" if kinds else ""),
            fmt(values(rows, "connrate", n, "relay_cpu_us_per_conn"), 1),
            f"{len(err)}: {err[0][:80]}" if err else "0",
        ])
    return table(["contestant", "conns/s", "failed connections (all runs)", "relay CPU µs per connection",
                  "errors"], lines)


IDLE_KEYS = ["verified_before", "verified_after", "conns", "rss_kib_per_conn", "pss_kib_per_conn",
             "kernel_kib_per_conn", "pipes_before", "pipes_during", "iou_wrk_during", "threads_during",
             "processes_during"]


def idle_row(rows, n):
    """One row per contestant: the worst verified counts, the worst pipe and io-wq counts, and
    the median of the rest over the repetitions; or the first error when none succeeded."""
    runs = [r for r in rows if r.get("test") == "idle" and r.get("contestant") == n]
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0] if runs else None
    out = {"runs": len(ok), "errors": len(runs) - len(ok)}
    for k in IDLE_KEYS:
        vs = [r[k] for r in ok if isinstance(r.get(k), (int, float))]
        if not vs:
            continue
        if k in ("rss_kib_per_conn", "pss_kib_per_conn"):
            # the first hold only: later ones reuse memory the allocator kept from the first
            first = min(ok, key=lambda r: r.get("rep", 0))
            if isinstance(first.get(k), (int, float)):
                out[k] = first[k]
                out[k + "_all"] = [first[k]]
        elif k in ("verified_before", "verified_after", "conns"):
            out[k] = min(vs)
        elif k in ("pipes_during", "iou_wrk_during", "threads_during", "processes_during", "pipes_before"):
            out[k] = max(vs)
        else:
            out[k] = statistics.median(vs)
            out[k + "_all"] = vs
    return out


def idle_table(b, rows, names):
    d = idle_row(rows, DIRECT)
    dk = d.get("kernel_kib_per_conn") if d and "error" not in d else None
    lines = []
    for n in names:
        r = idle_row(rows, n)
        if r is None:
            continue
        if "error" in r:
            lines.append([n, "error: " + r["error"][:100]] + ["–"] * 7)
            continue
        k = r.get("kernel_kib_per_conn")
        lines.append([
            n,
            f"{r.get('verified_before')} / {r.get('verified_after')} of {r.get('conns')}"
            + (f" ({r['errors']} run(s) failed)" if r["errors"] else ""),
            fmt(r.get("rss_kib_per_conn_all", []), 2),
            fmt(r.get("pss_kib_per_conn_all", []), 2),
            fmt(r.get("kernel_kib_per_conn_all", []), 2),
            num(k - dk if (k is not None and dk is not None and n != DIRECT) else None, 2),
            f"{r['pipes_before']} → {r['pipes_during']}" if "pipes_during" in r else "–",
            str(r.get("iou_wrk_during", "–")),
            f"{r.get('threads_during', '–')} / {r.get('processes_during', '–')}",
        ])
    return table(["contestant", "verified before / after hold (worst run)", "relay RSS KiB/conn", "relay PSS KiB/conn",
                  "kernel KiB/conn (whole host)", "kernel KiB/conn added over direct", "pipes (before → during)",
                  "io-wq threads", "threads / processes"], lines)


def scp_table(b, rows, names):
    lines = []
    for n in names:
        if not took_part(rows, "scp", n):
            continue
        cells = [n]
        for direction in ("up", "down"):
            r = [x for x in rows if x.get("test") == "scp" and x.get("contestant") == n and x.get("direction") == direction]
            if not r:
                cells += ["–", "–", "–"]
                continue
            r = r[0]
            if "error" in r:
                cells += ["error: " + r["error"][:80], "–", "–"]
                continue
            cells += [f"{r['seconds']:.2f} s ({r['mb_s']:.0f} MB/s)", "ok" if r.get("sha256_ok") else "MISMATCH",
                      num(r.get("cpu_s_per_gb"), 3)]
        lines.append(cells)
    return table(["contestant", "up: time", "up: sha256", "up: relay CPU-s/GB", "down: time", "down: sha256",
                  "down: relay CPU-s/GB"], lines)


# ------------------------------------------------------------------------------ targets


def verdict(ok):
    if ok is None:
        return "not measured"
    return "**met**" if ok else "**not met**"


def targets(b, rows, names):
    out = []

    def line(name, ok, detail):
        out.append(f"| {name} | {verdict(ok)} | {detail} |")

    u_cpu = med(values(rows, "bulk", US, "cpu_s_per_gb", streams=1))
    h_cpu = med(values(rows, "bulk", HA, "cpu_s_per_gb", streams=1))
    e_cpu = med(values(rows, "bulk", EP, "cpu_s_per_gb", streams=1))
    u_cpu4 = med(values(rows, "bulk", US, "cpu_s_per_gb", streams=4))
    h_cpu4 = med(values(rows, "bulk", HA, "cpu_s_per_gb", streams=4))
    e_cpu4 = med(values(rows, "bulk", EP, "cpu_s_per_gb", streams=4))
    if u_cpu is not None and h_cpu:
        extra = f"; 4 streams {u_cpu4:.3f} vs {h_cpu4:.3f} ({u_cpu4 / h_cpu4:.2f}×)" if u_cpu4 and h_cpu4 else ""
        line("relay CPU-s/GB ≤ 0.8 × HAProxy-splice (1 stream)", u_cpu <= 0.8 * h_cpu,
             f"{u_cpu:.3f} vs {h_cpu:.3f}: {u_cpu / h_cpu:.2f}×{extra}")
    else:
        line("relay CPU-s/GB ≤ 0.8 × HAProxy-splice", None, "")

    u_g = med(values(rows, "bulk", US, "gbit_s", streams=1))
    h_g = med(values(rows, "bulk", HA, "gbit_s", streams=1))
    d_g = med(values(rows, "bulk", DIRECT, "gbit_s", streams=1))
    if u_g is not None and h_g:
        line("1-stream Gbit/s ≥ 1.1 × HAProxy-splice", u_g >= 1.1 * h_g, f"{u_g:.2f} vs {h_g:.2f}: {u_g / h_g:.2f}×")
    else:
        line("1-stream Gbit/s ≥ 1.1 × HAProxy-splice", None, "")
    if u_g is not None and d_g:
        line("1-stream Gbit/s ≥ 0.8 × direct", u_g >= 0.8 * d_g, f"{u_g:.2f} vs {d_g:.2f}: {u_g / d_g:.2f}×")
    else:
        line("1-stream Gbit/s ≥ 0.8 × direct", None, "")

    for test, how in (("latency", ""), ("pinned", ", all on one CPU")):
        u = med(values(rows, test, US, "relay_cpu_us_per_rt"))
        f = med(values(rows, test, FLOOR, "relay_cpu_us_per_rt"))
        for other, ratio in ((EP, 0.7), (NG, 0.8)):
            o = med(values(rows, test, other, "relay_cpu_us_per_rt"))
            name = f"relay CPU per round trip ≤ {ratio} × {other}'s{how}"
            if u is None or not o:
                line(name, None, "")
                continue
            fl = f"; floor {f:.1f} µs: {f / o:.2f}× {other}'s" if f else ""
            line(name, u <= ratio * o, f"{u:.1f} vs {o:.1f} µs: {u / o:.2f}×{fl}")

    for test, how in (("latency", ""), ("pinned", ", all on one CPU")):
        d50 = med(values(rows, test, DIRECT, "p50_us"))
        u50 = med(values(rows, test, US, "p50_us"))
        e50 = med(values(rows, test, EP, "p50_us"))
        f50 = med(values(rows, test, FLOOR, "p50_us"))
        fl = f"; floor +{f50 - d50:.1f}" if f50 is not None and d50 is not None else ""
        if d50 is not None and u50 is not None and e50 is not None:
            line(f"added p50 ≤ epoll's{how}", u50 <= e50, f"+{u50 - d50:.1f} vs +{e50 - d50:.1f} µs{fl}")
        else:
            line(f"added p50 ≤ epoll's{how}", None, "")
        peers = [(n, med(values(rows, test, n, "p50_us")), med(values(rows, test, n, "p99_us")))
                 for n in names if n in LATENCY_PEERS]
        peers = [p for p in peers if p[1] is not None]
        if d50 is not None and u50 is not None and peers:
            best = min(peers, key=lambda p: p[1])
            ua, ba = u50 - d50, best[1] - d50
            line(f"added p50 ≤ 0.8 × best peer's ({best[0]}){how}", ua <= 0.8 * ba,
                 f"+{ua:.1f} µs vs +{ba:.1f} µs: {ua / ba if ba > 0 else float('inf'):.2f}× "
                 f"(p50 {u50:.1f} vs {best[1]:.1f}, direct {d50:.1f}{fl})")
            if test == "latency":
                u99 = med(values(rows, test, US, "p99_us"))
                low = min(peers, key=lambda p: p[2])
                line(f"p99 ≤ best peer's ({low[0]})", u99 <= low[2], f"{u99:.1f} µs vs {low[2]:.1f} µs")
        else:
            line(f"added p50 ≤ 0.8 × best peer's{how}", None, "")

    ur = med(values(rows, "connrate", US, "conns_per_s"))
    pr = [(n, med(values(rows, "connrate", n, "conns_per_s"))) for n in BEST_PEER_CONNRATE if n in names]
    pr = [p for p in pr if p[1] is not None]
    if ur is not None and pr:
        best = max(pr, key=lambda p: p[1])
        fails = sum(values(rows, "connrate", US, "failed"))
        line(f"conns/s ≥ 1.2 × best of nginx/HAProxy ({best[0]})", ur >= 1.2 * best[1],
             f"{ur:.0f} vs {best[1]:.0f}: {ur / best[1]:.2f}×; portrelay failures {int(fails)}")
    else:
        line("conns/s ≥ 1.2 × best of nginx/HAProxy", None, "")
    uc = med(values(rows, "connrate", US, "relay_cpu_us_per_conn"))
    nc = med(values(rows, "connrate", NG, "relay_cpu_us_per_conn"))
    if uc is not None and nc:
        line("relay CPU per connection ≤ 0.8 × nginx's", uc <= 0.8 * nc, f"{uc:.1f} vs {nc:.1f} µs: {uc / nc:.2f}×")
    else:
        line("relay CPU per connection ≤ 0.8 × nginx's", None, "")

    r = idle_row(rows, US)
    h = idle_row(rows, HA)
    d = idle_row(rows, DIRECT)
    if r and "error" not in r:
        n = r["conns"]
        held = r.get("verified_before") == n and r.get("verified_after") == n
        line(f"{n} idle connections held and verified", held,
             f"{r.get('verified_before')} before, {r.get('verified_after')} after the hold"
             + ("" if n >= 9000 else f" (this run used {n}, not 9,000)"))
        line("relay RSS ≤ 2 KiB per connection", r["rss_kib_per_conn"] <= 2.0, f"{r['rss_kib_per_conn']:.2f} KiB")
        if h and "error" not in h and d and "error" not in d:
            uk = r["kernel_kib_per_conn"] - d["kernel_kib_per_conn"]
            hk = h["kernel_kib_per_conn"] - d["kernel_kib_per_conn"]
            line("kernel memory per connection ≤ HAProxy's", uk <= hk,
                 f"{uk:.2f} vs {hk:.2f} KiB added over direct (whole-host slab + kernel stacks + page tables)")
        else:
            line("kernel memory per connection ≤ HAProxy's", None, "HAProxy or direct idle row missing")
        grown = r["pipes_during"] - r["pipes_before"]
        line("no pipe held by an idle connection", grown < 0.01 * n and r["pipes_during"] < 0.01 * n,
             f"{r['pipes_during']} pipes held during the hold ({r['pipes_before']} before) for {n} connections")
        line("no io-wq worker thread", r["iou_wrk_during"] == 0, f"{r['iou_wrk_during']} iou-wrk threads")
    else:
        line("idle scale", None, r["error"] if r else "")

    if u_cpu and e_cpu:
        rel = e_cpu / u_cpu - 1
        extra = f"; 4 streams {e_cpu4:.3f} vs {u_cpu4:.3f} ({e_cpu4 / u_cpu4 - 1:+.0%})" if e_cpu4 and u_cpu4 else ""
        line("epoll within 15% of uring on CPU-s/GB (1 stream)", abs(rel) <= 0.15,
             f"{e_cpu:.3f} vs {u_cpu:.3f}: {rel:+.0%}{extra}")
    else:
        line("epoll within 15% of uring on CPU-s/GB", None, "")
    return "| target (portrelay uring backend) | verdict | figures (medians) |\n|---|---|---|\n" + "\n".join(out)


# ------------------------------------------------------------------------------ files


def sanitize(text, b):
    text = text.replace(b.tmp, "$TMP").replace(ROOT, "$REPO")
    return text


def write(b, tests):
    out = b.a.out
    rows = b.rows
    names = [c.name for c in b.contestants if not c.skipped]
    skipped = [(c.name, c.skipped) for c in b.contestants if c.skipped]
    died = [(c.name, c.died) for c in b.contestants if c.died]

    os.makedirs(os.path.join(out, "configs"), exist_ok=True)
    for c in b.contestants:
        for f in c.config_files:
            if os.path.exists(f):
                with open(f) as src, open(os.path.join(out, "configs", os.path.basename(f)), "w") as dst:
                    dst.write(sanitize(src.read(), b))
    sshd_cfg = os.path.join(b.sshdir, "sshd_config.lo")
    if os.path.exists(sshd_cfg):
        with open(sshd_cfg) as src, open(os.path.join(out, "configs", "sshd_config"), "w") as dst:
            dst.write(sanitize(src.read(), b))

    s = [f"# Benchmark summary: {os.path.basename(out)}", ""]
    s.append(f"Command: `{b.a.command}`. Machine, versions and method: README.md beside this file; "
             "every measurement: raw.jsonl.")
    s.append("")
    s.append(f"Figures are medians over {b.reps} run(s) ({b.idle_reps} for idle scale) with (min–max) "
             "when there was more than one. Relay CPU is the CPU time of all the relay's processes "
             "and threads, read before and after each test from its own cpuacct cgroup (or, where "
             "cgroups cannot be written, utime+stime+cutime+cstime from /proc). Every contestant "
             "ran at once, each on its own loopback "
             "ports in front of the same upstreams (nft-dnat: its own copies inside a namespace).")
    s.append("")
    if skipped:
        s.append("Skipped: " + "; ".join(f"{n}: {r}" for n, r in skipped) + ".")
        s.append("")
    if died:
        s.append("**Died during the run:** " + "; ".join(f"{n}: {r}" for n, r in died) + ".")
        s.append("")
    if b.a.quick:
        s.append(f"**Quick run** (`--quick`): 1 repetition, iperf3 {b.iperf_t} s, {b.lat_count} round trips, "
                 f"{b.rate_s:g} s connection rate, {b.idle_n} idle connections, scp of {b.scp_mib} MiB; "
                 f"contestants limited to {', '.join(n for n in names)}. Not for quoting.")
        s.append("")

    s.append("## Targets")
    s.append("")
    s.append(targets(b, rows, names))
    s.append("")
    if "bulk" in tests:
        s.append(f"## 1. Bulk throughput (iperf3, {b.iperf_t} s per run)")
        s.append("")
        s.append(bulk_table(b, rows, names))
        s.append("")
        s.append("CPU-s/GB: relay CPU seconds per 10^9 bytes received by the iperf3 server. "
                 "'host busy' is the share of both cores in use during the run (client, server "
                 "and relay compete for the same 2 cores).")
        s.append("")
    if "latency" in tests:
        s.append(f"## 2. Latency (64-byte request/response, {b.lat_count} round trips on one connection)")
        s.append("")
        s.append(latency_table(b, rows, names))
        s.append("")
        s.append("Added = median p50 (p99) of the contestant minus direct's. floor: the least a "
                 "relay can be (two blocking threads per connection, recv then send): what any "
                 "relay on kernel sockets pays to move a message one hop.")
        s.append("")
    if "pinned" in tests:
        s.append(f"## 3. Latency with everything on one CPU ({b.lat_count} round trips)")
        s.append("")
        s.append(latency_table(b, rows, names, "pinned"))
        s.append("")
        s.append("The same test with the client, the echo upstream and every thread of the "
                 "contestant pinned to one CPU (sched_setaffinity for the test's duration): no "
                 "wake-up crosses CPUs, which on this VM is the largest and noisiest cost.")
        s.append("")
    if "connrate" in tests:
        s.append(f"## 4. Connection rate (connect, 64-byte echo, close; 32 in flight for {b.rate_s:g} s)")
        s.append("")
        s.append(connrate_table(b, rows, names))
        s.append("")
    if "idle" in tests:
        s.append(f"## 5. Idle scale ({b.idle_n} idle connections, {b.idle_hold:g} s hold, {b.idle_reps} run(s))")
        s.append("")
        s.append(idle_table(b, rows, names))
        s.append("")
        s.append(
            "Each connection is verified by a 64-byte echo before and after the hold. RSS/PSS: "
            "growth of VmRSS (Pss from smaps_rollup) summed over the relay's processes, from "
            "before the connections opened to during the hold, per connection; PSS is the fair "
            "figure for fork-per-connection relays, whose children share pages. RSS and PSS are "
            "from the first hold only: a relay keeps the memory its allocator got for the first "
            "9,000 connections, so later holds show almost no growth. Kernel memory: "
            "growth over the whole host of the bytes in active slab objects (/proc/slabinfo "
            "active_objs × objsize, every cache but proc_inode_cache, which grows with whoever lists /proc/PID/fd) plus KernelStack and PageTables (/proc/meminfo), "
            "per connection; it includes the client's and the echo server's sockets, so 'added "
            "over direct' is the relay's share. The host is shared: other work moves these "
            "figures, by a few hundred bytes per connection at 9,000 connections. Pipes: pipe "
            "fds / 2 in /proc/PID/fd; pipes counts and io-wq threads are the largest seen. io-wq: "
            "threads whose comm starts with iou-wrk. The open-file limit is 20,000 per process "
            "here (hard limit; it cannot be raised without CAP_SYS_RESOURCE), which caps a relay "
            "at about 9,900 relayed connections; 100,000 cannot be shown on this machine.")
        s.append("")
        tops = []
        for n in names:
            r = next((x for x in rows if x.get("test") == "idle" and x.get("contestant") == n
                      and "slab_top_bytes_per_conn" in x), None)
            if r:
                items = [(k, v) for k, v in r["slab_top_bytes_per_conn"].items() if k != "proc_inode_cache"]
                top = ", ".join(f"{k} {v:.0f}" for k, v in items[:5])
                tops.append(f"- {n}: {top}")
        if tops:
            s.append("Largest growth of slab caches, bytes per connection (first run; whole host):")
            s.append("")
            s += tops
            s.append("")
    if "scp" in tests:
        s.append(f"## 6. Real client: scp of {b.scp_mib} MiB up and down to a real sshd")
        s.append("")
        s.append(scp_table(b, rows, names))
        s.append("")
        s.append("OpenSSH's default cipher; scp's time is wall time of the scp command, including "
                 "the SSH handshake; sha256 of the received file checked against the source.")
        s.append("")
    logs = [r for r in rows if r.get("test") == "log"]
    if logs:
        s.append("## portrelay's own log")
        s.append("")
        for r in logs:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(r["close_reasons"].items(), key=lambda kv: -kv[1]))
            warn = ", ".join(f"{k}: {v}" for k, v in r["warn_error"].items()) or "none"
            s.append(f"- {r['contestant']}: close reasons {reasons or 'none'}; warnings/errors: {warn}")
        s.append("")
    all_errors = [r for r in rows if "error" in r]
    if all_errors:
        s.append("## Errors")
        s.append("")
        for r in all_errors:
            s.append(f"- {r['test']} {r['contestant']} {r.get('streams', '') or r.get('direction', '')}"
                     f" rep {r.get('rep', '-')}: {r['error'][:300]}")
        s.append("")
    summary = "\n".join(s)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(sanitize(summary, b))

    # README: what ran, where, how
    dirty, commit = b.git_dirty, b.git_commit  # read right after the build
    cpu_model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with open("/proc/meminfo") as f:
        memtotal = int(f.readline().split()[1]) // 1024
    import hashlib

    h = hashlib.sha256()
    with open(b.portrelay, "rb") as f:
        h.update(f.read())
    r = []
    r.append(f"# Benchmark run {os.path.basename(out)}")
    r.append("")
    r.append(f"- command: `{b.a.command}`")
    r.append(f"- date: {b.start_iso} (local), took {b.elapsed:.0f} s")
    r.append(f"- host: {platform.node()}, kernel {platform.release()}, {os.cpu_count()} CPUs ({cpu_model}), "
             f"{memtotal} MiB memory")
    r.append(f"- commit: {commit}" + (f" plus uncommitted changes in {len(dirty)} paths (shared working tree)"
                                       if dirty else " (clean working tree)") + ", read right after the build")
    r.append(f"- portrelay binary: `cargo build --release`, sha256 {h.hexdigest()[:16]}…")
    r.append(f"- open files: soft {soft}, hard {hard}; the hard limit cannot be raised here (no "
             "CAP_SYS_RESOURCE), so no process can hold more than 20,000 fds: about 9,900 relayed "
             "connections per relay process")
    r.append(f"- load average at start {b.load_start[0]:.2f} {b.load_start[1]:.2f} {b.load_start[2]:.2f}, "
             f"at end {b.load_end[0]:.2f} {b.load_end[1]:.2f} {b.load_end[2]:.2f} (the machine is shared; other "
             "work runs beside the benchmark)")
    r.append("")
    r.append("## Versions")
    r.append("")
    for name, argv in [("HAProxy", ["haproxy", "-v"]), ("nginx", ["nginx", "-v"]), ("socat", ["socat", "-V"]),
                       ("rinetd", ["rinetd", "-v"]), ("redir", ["redir", "-v"]), ("iperf3", ["iperf3", "-v"]),
                       ("OpenSSH", ["ssh", "-V"]), ("nft", ["nft", "--version"])]:
        out_s = sh(argv)
        if name == "socat":
            out_s = next((l for l in out_s.splitlines() if "version" in l), out_s)
        r.append(f"- {name}: {first_line(out_s) if shutil.which(argv[0]) else 'not installed'}")
    r.append("")
    r.append("## Parameters")
    r.append("")
    r.append(f"- repetitions of the short tests: {b.reps}")
    r.append(f"- bulk: iperf3 -t {b.iperf_t}, -P 1 and -P 4")
    r.append(f"- latency: {b.lat_count} round trips of 64 bytes after {b.lat_warmup} warm-up ones")
    r.append(f"- connection rate: 32 in flight for {b.rate_s:g} s, 5 s timeout per connection")
    r.append(f"- idle: {b.idle_n} connections opened 256 at a time, held {b.idle_hold:g} s, {b.idle_reps} run(s)")
    r.append(f"- scp: {b.scp_mib} MiB of random data, up then down")
    r.append("")
    r.append("## Contestants")
    r.append("")
    for c in b.contestants:
        st = f"skipped: {c.skipped}" if c.skipped else c.desc
        r.append(f"- {c.name}: {st}")
    r.append("")
    r.append("Their configuration files are in configs/ ($TMP is the run's temporary directory).")
    r.append("")
    r.append("## Notes")
    r.append("")
    r.append(
        "- Everything runs on loopback, except nft-dnat: the client runs in one network namespace "
        f"({b.ns_cli_addr_note}), the upstreams in another, joined by a veth pair; nft DNATs the "
        "contestant's ports to the upstream ports in the server namespace's prerouting hook. That "
        "path crosses a veth pair, so it is not the same path as direct (loopback).")
    r.append("- HAProxy: `maxconn 9500` and `maxpipes 400`: its default maxpipes (maxconn/4) makes it "
             "ask for 23,767 fds, more than the 20,000 hard limit, and it refuses to start.")
    r.append("- haproxy-splice: `option splice-auto` alone made HAProxy 2.6.12 call splice(2) not once "
             "during a 3 s iperf3 run on this machine (perf stat on syscalls:sys_enter_splice: 0; "
             "138k recvfrom and 138k sendto), so this contestant also sets `option splice-request` "
             "and `option splice-response`, which splice every transfer, small ones included.")
    r.append("- nginx: 2 workers, `worker_connections 19500`, `worker_rlimit_nofile 20000`.")
    r.append("- portrelay logs one JSON line per closed connection at the default level (info), to a "
             "file; the others log nothing per connection.")
    r.append("- Kernel memory is whole-host (/proc/meminfo), so other work on the machine shows up in it.")
    r.append("")
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(sanitize("\n".join(r), b))
    print(sanitize(summary, b))
