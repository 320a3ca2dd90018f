#!/usr/bin/env python3
"""Side-by-side relay benchmark; started by bench/run, which installs, builds and compiles.

Starts the upstreams (echo server, iperf3 server, sshd) once, every contestant on its own
loopback ports in front of them, runs each test against each contestant, and writes
bench/runs/<date>-<host>/{README.md,raw.jsonl,summary.md,configs/}. Standard library only.

Relay CPU is read from /proc/PID/stat (utime+stime of the whole process, plus cutime+cstime
for reaped children) summed over the relay's process tree, before and after each test.
"""

import argparse
import datetime
import hashlib
import json
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

ALL = [
    "direct",
    "nft-dnat",
    "haproxy-splice",
    "haproxy-nosplice",
    "nginx",
    "socat",
    "rinetd",
    "redir",
    "portrelay-uring",
    "portrelay-epoll",
    "floor",
]
QUICK = ["direct", "haproxy-splice", "nginx", "portrelay-uring", "portrelay-epoll", "floor"]
PEERS = ["haproxy-splice", "haproxy-nosplice", "nginx", "socat", "rinetd", "redir"]
TESTS = ["bulk", "latency", "pinned", "connrate", "idle", "scp"]
# Contestants that take part in some tests only. The floor relay is a measure of the kernel's
# share of relaying one message at a time, and no more: with a thread pair per connection and
# plain copies it is neither a floor for connection rate nor for bulk (splice beats it).
ONLY_TESTS = {"floor": {"latency", "pinned"}}

# Addresses inside the two network namespaces this script creates for nft-dnat.
NS_SRV_ADDR = "10.231.0.1"
NS_CLI_ADDR = "10.231.0.2"


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ processes


class Procs:
    """Every long-lived process this run starts, each in its own process group, so that
    stopping one stops its children; the group ids go to a file the bash trap reads."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.live = []
        self.pgid_file = os.path.join(tmp, "pgids")

    def start(self, name, argv, netns=None, stdin=subprocess.DEVNULL, stdout=None, env=None, cgroup=None):
        if cgroup:
            # join the cgroup before exec, so every child and thread is counted in it
            argv = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', cgroup] + argv
        if netns:
            argv = ["ip", "netns", "exec", netns] + argv
        out = open(os.path.join(self.tmp, f"{name}.log"), "ab")
        p = subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=stdout if stdout is not None else out,
            stderr=out,
            start_new_session=True,
            env=env,
        )
        p.bench_name = name
        p.bench_log = out.name
        self.live.append(p)
        with open(self.pgid_file, "a") as f:
            f.write(f"{p.pid}\n")
        return p

    def stop(self, p, grace=5.0):
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(5)
        # children left in the group (fork-per-connection relays)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if p in self.live:
            self.live.remove(p)

    def stop_all(self):
        for p in list(reversed(self.live)):
            self.stop(p, grace=3.0)


def run(argv, timeout, netns=None, check=False, **kw):
    if netns:
        argv = ["ip", "netns", "exec", netns] + argv
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=check, **kw)


# ------------------------------------------------------------------------------ /proc


def proc_table():
    """pid -> (ppid, session id, comm) for every process."""
    table = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        r = s.rfind(")")
        comm = s[s.find("(") + 1 : r]
        fields = s[r + 2 :].split()
        table[int(d)] = (int(fields[1]), int(fields[3]), comm)
    return table


def tree(roots):
    """The root pids, their descendants, and every process of their sessions (each relay is
    started as a session leader; redir double-forks, so its children are re-parented to init
    but stay in the session). Alive ones only."""
    roots = [r for r in roots if r]
    if not roots:
        return []
    table = proc_table()
    children = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = set(), [r for r in roots if r in table]
    while todo:
        p = todo.pop()
        out.add(p)
        todo.extend(children.get(p, []))
    sids = set(roots)
    out |= {pid for pid, (_, sid, _) in table.items() if sid in sids}
    return sorted(out)


def set_affinity(pids, cpus):
    """Every thread of every process in pids onto cpus (threads made later inherit it)."""
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(int(tid), cpus)
            except OSError:
                pass  # a thread that has just exited


def members(c):
    """The processes of a contestant: its cgroup's when it has one, else tree()."""
    if c.cgroup:
        try:
            with open(os.path.join(c.cgroup, "cgroup.procs")) as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            pass
    return tree(c.roots())


def proc_cpu_seconds(pids):
    """utime+stime+cutime+cstime summed over the processes: exited children that were reaped
    are in their parent's cutime/cstime, live ones are counted themselves. Misses children
    reaped automatically (SIGCHLD ignored), hence the cgroup figure when there is one."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                s = f.read()
        except OSError:
            continue
        fields = s[s.rfind(")") + 2 :].split()
        total += sum(int(x) for x in fields[11:15])
    return total / TICK


def host_cpu():
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    vals = [int(x) for x in parts]
    idle = vals[3] + vals[4]
    return sum(vals[:8]), idle


def meminfo():
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":")
            out[k] = int(v.split()[0])  # KiB
    return out


def slabinfo():
    out = {}
    try:
        with open("/proc/slabinfo") as f:
            for line in f.readlines()[2:]:
                p = line.split()
                out[p[0]] = int(p[1]) * int(p[3])  # active_objs * objsize, bytes
    except OSError:
        pass
    return out


def sockstat_tcp_mem_kib():
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                p = line.split()
                return int(p[p.index("mem") + 1]) * PAGE // 1024
    return 0


def process_snapshot(pids):
    """RSS and PSS (KiB), threads, pipe fds, io-wq workers over the processes."""
    snap = {"processes": 0, "threads": 0, "rss_kib": 0, "pss_kib": 0, "pipe_fds": 0,
            "fds": 0, "iou_wrk": 0, "iou_sqp": 0}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        snap["rss_kib"] += int(line.split()[1])
                    elif line.startswith("Threads:"):
                        snap["threads"] += int(line.split()[1])
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        snap["pss_kib"] += int(line.split()[1])
            for fd in os.listdir(f"/proc/{pid}/fd"):
                snap["fds"] += 1
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:"):
                        snap["pipe_fds"] += 1
                except OSError:
                    pass
            for tid in os.listdir(f"/proc/{pid}/task"):
                try:
                    with open(f"/proc/{pid}/task/{tid}/comm") as f:
                        comm = f.read().strip()
                except OSError:
                    continue
                if comm.startswith("iou-wrk"):
                    snap["iou_wrk"] += 1
                elif comm.startswith("iou-sqp"):
                    snap["iou_sqp"] += 1
            snap["processes"] += 1
        except OSError:
            continue
    return snap


def kernel_snapshot():
    m = meminfo()
    return {
        "slab_kib": m.get("Slab", 0),
        "kernel_stack_kib": m.get("KernelStack", 0),
        "page_tables_kib": m.get("PageTables", 0),
        "tcp_mem_kib": sockstat_tcp_mem_kib(),
        "slabs": slabinfo(),
    }


def listening_ports(addr="127.0.0.1", netns=None):
    """Ports with a listening TCP socket on addr (or any address) in this or netns's namespace.
    From `ss -ltn` (netlink, filtered by state): /proc/net/tcp also lists every TIME_WAIT
    socket, and a connection-rate test leaves a hundred thousand of them."""
    r = run(["ss", "-Hltn4"], 10, netns=netns)
    out = set()
    for line in r.stdout.splitlines():
        p = line.split()
        if len(p) >= 4 and ":" in p[3]:
            a, port = p[3].rsplit(":", 1)
            if a in (addr, "0.0.0.0", "*") and port.isdigit():
                out.add(int(port))
    return out


def port_free(port, busy):
    if port in busy:
        return False
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        return False
    finally:
        s.close()
    return True


# ------------------------------------------------------------------------------ contestants


class Contestant:
    def __init__(self, name, desc):
        self.name = name
        self.desc = desc
        self.host = "127.0.0.1"
        self.netns = None  # client commands run in this namespace
        self.ports = {}  # iperf, echo, ssh
        self.procs = []
        self.skipped = None
        self.config_files = []
        self.log_files = []
        self.died = None
        self.cgroup = None

    def roots(self):
        return [p.pid for p in self.procs]

    def has_process(self):
        return bool(self.procs)

    def alive(self):
        for p in self.procs:
            if p.poll() is not None:
                return False
        return True

    def cmd(self, argv):
        if self.netns:
            return ["ip", "netns", "exec", self.netns] + argv
        return argv


class Bench:
    def __init__(self, args):
        self.a = args
        self.tmp = args.tmp
        self.procs = Procs(self.tmp)
        self.rows = []
        self.notes = []
        self.netns = []
        self.cgroups = []
        self.contestants = []
        self.upstreams = {}
        self.raw = None
        self.start_time = time.time()
        self.start_iso = datetime.datetime.now().isoformat(timespec="seconds")
        self.load_start = os.getloadavg()
        # the source the binary was built from: read now, the tree may move during the run
        self.git_commit = self.git(["rev-parse", "HEAD"]) or "unknown"
        self.git_dirty = [l for l in self.git(["status", "--porcelain"]).splitlines() if l.strip()]
        self.ns_cli_addr_note = f"{NS_CLI_ADDR} to {NS_SRV_ADDR}"
        self.portrelay = os.path.join(self.tmp, "portrelay")
        shutil.copy2(args.portrelay, self.portrelay)
        self.tools = args.tools
        self.sshdir = os.path.join(self.tmp, "ssh")
        self.datadir = self.tmp
        q = args.quick
        self.reps = args.reps or (1 if q else 3)
        self.iperf_t = args.iperf_seconds or (2 if q else 8)
        self.lat_count = args.lat_count or (5000 if q else 20000)
        self.lat_warmup = 200 if q else 1000
        self.rate_s = args.rate_seconds or (2 if q else 5)
        self.idle_n = args.idle_conns or (2000 if q else 9000)
        self.idle_hold = args.idle_hold or (2 if q else 5)
        self.idle_reps = args.idle_reps or (1 if q else 3)
        self.scp_mib = args.scp_mib or (64 if q else 1024)

    def git(self, argv):
        try:
            r = subprocess.run(["git"] + argv, capture_output=True, text=True, timeout=20, cwd=ROOT)
            return r.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    # ---------------------------------------------------------------- setup

    def make_cgroup(self, name):
        """A cpuacct cgroup (v1 here) for one contestant: exact CPU time of all its processes,
        children that exit included. None when cgroups cannot be written."""
        for base in ("/sys/fs/cgroup/cpuacct", "/sys/fs/cgroup/cpu,cpuacct"):
            if os.path.exists(os.path.join(base, "cpuacct.usage")):
                path = os.path.join(base, f"portrelay-bench-{os.getpid()}-{name}")
                try:
                    os.mkdir(path)
                except OSError:
                    return None
                with open(os.path.join(self.tmp, "cgroups"), "a") as f:
                    f.write(path + "\n")
                self.cgroups.append(path)
                return path
        return None

    def cpu(self, c):
        """(CPU seconds used so far by the contestant, source), or (None, None)."""
        if not c.has_process():
            return None, None
        if c.cgroup:
            with open(os.path.join(c.cgroup, "cpuacct.usage")) as f:
                return int(f.read()) / 1e9, "cgroup"
        return proc_cpu_seconds(members(c)), "proc"

    def pick_ports(self, count):
        busy = listening_ports()
        for base in range(26100, 31000, 200):
            if all(port_free(p, busy) for p in range(base, base + count)):
                return base
        raise SystemExit("bench: no free block of loopback ports between 26100 and 31000")

    def record(self, row):
        row.setdefault("time", datetime.datetime.now().isoformat(timespec="seconds"))
        row["load1"] = os.getloadavg()[0]
        self.rows.append(row)
        self.raw.write(json.dumps(row) + "\n")
        self.raw.flush()

    def write_file(self, path, text):
        with open(path, "w") as f:
            f.write(text)
        return path

    def setup_ssh(self):
        os.makedirs(self.sshdir, exist_ok=True)
        d = self.sshdir
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{d}/host_ed25519"], 30, check=True)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{d}/client_ed25519"], 30, check=True)
        shutil.copy(f"{d}/client_ed25519.pub", f"{d}/authorized_keys")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation dir

    def sshd_config(self, addr, port, tag):
        d = self.sshdir
        return self.write_file(
            f"{d}/sshd_config.{tag}",
            f"""# written by bench/harness.py
Port {port}
ListenAddress {addr}
HostKey {d}/host_ed25519
AuthorizedKeysFile {d}/authorized_keys
PidFile none
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
LogLevel ERROR
MaxStartups 64:30:128
Subsystem sftp internal-sftp
""",
        )

    def start_upstreams(self, tag, addr, netns=None):
        """echo, iperf3 and sshd on addr (loopback, or inside the server namespace)."""
        up = self.upstreams
        procs = []
        procs.append(self.procs.start(f"echo-{tag}", [self.tools, "echo", addr, str(up["echo"]), "2"], netns=netns))
        procs.append(self.procs.start(f"iperf3-{tag}", ["iperf3", "-s", "-B", addr, "-p", str(up["iperf"])], netns=netns))
        cfg = self.sshd_config(addr, up["ssh"], tag)
        procs.append(self.procs.start(f"sshd-{tag}", ["/usr/sbin/sshd", "-D", "-e", "-f", cfg], netns=netns))
        return procs

    def wait_listening(self, ports, addr="127.0.0.1", netns=None, timeout=15.0, procs=()):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if set(ports) <= listening_ports(addr, netns):
                return True
            for p in procs:
                if p.poll() is not None:
                    return False
            time.sleep(0.1)
        return False

    def setup_netns(self):
        """Two namespaces joined by a veth pair; the server side runs its own upstreams and
        DNATs the contestant's ports to them in prerouting. Returns a reason when not possible."""
        if not shutil.which("nft"):
            return "nft not installed"
        tag = f"prb{os.getpid() % 100000}"
        cli, srv = f"{tag}c", f"{tag}s"
        va, vb = f"{tag}a", f"{tag}b"
        steps = [
            ["ip", "netns", "add", srv],
            ["ip", "netns", "add", cli],
            ["ip", "link", "add", va, "netns", srv, "type", "veth", "peer", "name", vb, "netns", cli],
            ["ip", "-n", srv, "addr", "add", f"{NS_SRV_ADDR}/30", "dev", va],
            ["ip", "-n", cli, "addr", "add", f"{NS_CLI_ADDR}/30", "dev", vb],
            ["ip", "-n", srv, "link", "set", "lo", "up"],
            ["ip", "-n", cli, "link", "set", "lo", "up"],
            ["ip", "-n", srv, "link", "set", va, "up"],
            ["ip", "-n", cli, "link", "set", vb, "up"],
        ]
        for i, s in enumerate(steps):
            if i == 1:
                self.netns.append(srv)
            if i == 2:
                self.netns.append(cli)
            r = run(s, 20)
            if r.returncode != 0:
                return f"`{' '.join(s)}` failed: {r.stderr.strip()}"
        with open(os.path.join(self.tmp, "netns"), "w") as f:
            f.write(f"{srv}\n{cli}\n")
        self.ns_srv, self.ns_cli = srv, cli
        return None

    def add_nft(self, c, ports):
        up = self.upstreams
        rules = "\n".join(
            f"        tcp dport {ports[k]} dnat to {NS_SRV_ADDR}:{up[k]}" for k in ("iperf", "echo", "ssh")
        )
        cfg = self.write_file(
            os.path.join(self.tmp, "nft-dnat.nft"),
            f"""table ip portrelay_bench {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
{rules}
    }}
}}
""",
        )
        c.config_files.append(cfg)
        r = run(["nft", "-f", cfg], 20, netns=self.ns_srv)
        if r.returncode != 0:
            return f"nft -f failed: {r.stderr.strip()}"
        return None

    def contestant_configs(self, c, ports):
        up = self.upstreams
        t = self.tmp
        maps = [(ports[k], up[k], k) for k in ("iperf", "echo", "ssh")]
        if c.name.startswith("haproxy"):
            # HAProxy 2.6.12 with `option splice-auto` alone made no splice(2) call at all
            # during a 3 s iperf3 run here (perf stat on syscalls:sys_enter_splice: 0, and
            # 138k recvfrom/sendto), so the splicing contestant forces it both ways too.
            splice = (
                "    option splice-auto\n    option splice-request\n    option splice-response\n"
                if c.name == "haproxy-splice"
                else "    no option splice-auto\n"
            )
            listens = "".join(
                f"listen {k}\n    bind 127.0.0.1:{p}\n    server up 127.0.0.1:{u}\n" for p, u, k in maps
            )
            cfg = self.write_file(
                f"{t}/{c.name}.cfg",
                f"""# HAProxy needs 2 fds per connection plus 2 per pipe; with the 20000-fd hard limit,
# maxconn 9500 fits only with maxpipes set (its default, maxconn/4, asks for 23767 fds).
global
    maxconn 9500
    maxpipes 400
    nbthread 2
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
{splice}{listens}""",
            )
            c.config_files.append(cfg)
            return [["haproxy", "-db", "-f", cfg]]
        if c.name == "nginx":
            os.makedirs(f"{t}/nginx", exist_ok=True)
            mod = "/usr/lib/nginx/modules/ngx_stream_module.so"
            load = f"load_module {mod};\n" if os.path.exists(mod) else ""
            servers = "".join(
                f"    server {{ listen 127.0.0.1:{p}; proxy_pass 127.0.0.1:{u}; }}\n" for p, u, _ in maps
            )
            cfg = self.write_file(
                f"{t}/nginx/nginx.conf",
                f"""{load}worker_processes 2;
worker_rlimit_nofile 20000;
pid nginx.pid;
error_log stderr warn;
events {{ worker_connections 19500; }}
stream {{
{servers}}}
""",
            )
            c.config_files.append(cfg)
            return [["nginx", "-p", f"{t}/nginx", "-c", cfg, "-e", "stderr", "-g", "daemon off;"]]
        if c.name == "socat":
            return [
                ["socat", f"TCP-LISTEN:{p},bind=127.0.0.1,reuseaddr,fork,backlog=4096,nodelay",
                 f"TCP:127.0.0.1:{u},nodelay"]
                for p, u, _ in maps
            ]
        if c.name == "rinetd":
            cfg = self.write_file(
                f"{t}/rinetd.conf", "".join(f"127.0.0.1 {p} 127.0.0.1 {u}\n" for p, u, _ in maps)
            )
            c.config_files.append(cfg)
            return [["rinetd", "-f", "-c", cfg]]
        if c.name == "redir":
            return [["redir", "-n", "-l", "err", f"127.0.0.1:{p}", f"127.0.0.1:{u}"] for p, u, _ in maps]
        if c.name == "floor":
            return [[self.tools, "floor", "127.0.0.1"] + [str(x) for p, u, _ in maps for x in (p, u)]]
        if c.name.startswith("portrelay"):
            backend = c.name.split("-")[1]
            m = "".join(f'[[map]]\nport = {p}\nto = "127.0.0.1:{u}"\nname = "{k}"\n' for p, u, k in maps)
            # A directory of its own: the relay watches the control file's directory, and
            # the logs written into {t} would wake its watcher at every line.
            os.makedirs(f"{t}/{c.name}-conf", exist_ok=True)
            cfg = self.write_file(
                f"{t}/{c.name}-conf/{c.name}.toml",
                f"""[relay]
bind = ["127.0.0.1"]
metrics = ""
shutdown_grace = "2s"
{m}""",
            )
            c.config_files.append(cfg)
            argv = [self.portrelay, "run", "--config", cfg, "--io-backend", backend, "--log-format", "json"]
            if self.a.portrelay_threads:
                argv += ["--threads", str(self.a.portrelay_threads)]
            return [argv]
        raise ValueError(c.name)

    def verify_echo(self, c):
        r = run(c.cmd([self.tools, "lat", c.host, str(c.ports["echo"]), "10", "0", "64"]), 20)
        if r.returncode != 0:
            return f"echo through it failed: {(r.stderr or r.stdout).strip()[-300:]}"
        return None

    def start_contestant(self, c, ports):
        c.ports = ports
        if c.name == "direct":
            c.ports = dict(self.upstreams)
            return self.verify_echo(c)
        if c.name == "nft-dnat":
            if not self.ns_ok:
                return self.ns_reason
            c.host, c.netns = NS_SRV_ADDR, self.ns_cli
            err = self.add_nft(c, ports)
            return err or self.verify_echo(c)
        binary = {"haproxy-splice": "haproxy", "haproxy-nosplice": "haproxy", "nginx": "nginx",
                  "socat": "socat", "rinetd": "rinetd", "redir": "redir"}.get(c.name)
        if binary and not shutil.which(binary):
            return f"{binary} not installed"
        if c.name == "nginx":
            mod = "/usr/lib/nginx/modules/ngx_stream_module.so"
            r = run(["nginx", "-V"], 10)
            if not os.path.exists(mod) and "--with-stream " not in r.stderr + " ":
                return "nginx has no stream module (install libnginx-mod-stream)"
        c.cgroup = self.make_cgroup(c.name)
        for i, argv in enumerate(self.contestant_configs(c, ports)):
            p = self.procs.start(f"{c.name}-{i}", argv, cgroup=c.cgroup)
            c.procs.append(p)
            c.log_files.append(p.bench_log)
        if not self.wait_listening([ports[k] for k in ports], procs=c.procs):
            tail = ""
            for lf in c.log_files:
                with open(lf, errors="replace") as f:
                    tail += f.read()[-600:]
            return f"did not listen on its ports within 15 s: {tail.strip()}"
        if c.name.startswith("portrelay"):
            err = self.portrelay_ready(c)
            if err:
                return err
        return self.verify_echo(c)

    def portrelay_ready(self, c):
        deadline = time.time() + 10
        while time.time() < deadline:
            with open(c.log_files[0], errors="replace") as f:
                for line in f:
                    try:
                        j = json.loads(line)
                    except ValueError:
                        continue
                    if j.get("message") == "ready":
                        if j.get("listeners", 3) < 3:
                            return f"ready with {j.get('listeners')} of 3 listeners"
                        return None
            time.sleep(0.1)
        return "no 'ready' log line within 10 s"

    def setup(self):
        names = self.selected()
        self.upstream_base = self.pick_ports(10 + 3 * len(ALL))
        b = self.upstream_base
        self.upstreams = {"iperf": b, "echo": b + 1, "ssh": b + 2}
        self.setup_ssh()
        ups = self.start_upstreams("lo", "127.0.0.1")
        if not self.wait_listening(list(self.upstreams.values()), procs=ups):
            raise SystemExit("bench: upstreams (echo, iperf3, sshd) did not start; see logs in " + self.tmp)
        self.ns_ok, self.ns_reason = False, None
        if "nft-dnat" in names:
            self.ns_reason = self.setup_netns()
            if not self.ns_reason:
                ups = self.start_upstreams("ns", NS_SRV_ADDR, netns=self.ns_srv)
                if self.wait_listening(list(self.upstreams.values()), addr=NS_SRV_ADDR, netns=self.ns_srv, procs=ups):
                    self.ns_ok = True
                else:
                    self.ns_reason = "upstreams did not start inside the namespace"
        for i, name in enumerate(ALL):
            if name not in names:
                continue
            c = Contestant(name, DESCRIPTIONS[name])
            base = b + 10 + 3 * i
            ports = {"iperf": base, "echo": base + 1, "ssh": base + 2}
            try:
                err = self.start_contestant(c, ports)
            except Exception as e:  # a contestant that cannot start is skipped, not fatal
                err = f"{type(e).__name__}: {e}"
            if err:
                c.skipped = err
                log(f"{name}: skipped: {err}")
                for p in c.procs:
                    self.procs.stop(p)
                c.procs = []
            else:
                log(f"{name}: ready on {c.host}:{c.ports['iperf']},{c.ports['echo']},{c.ports['ssh']}")
            self.contestants.append(c)
            self.record({"test": "setup", "contestant": name, "skipped": c.skipped, "ports": c.ports})

    def selected(self):
        names = list(QUICK if self.a.quick else ALL)
        if self.a.only:
            only = [x.strip() for x in self.a.only.split(",") if x.strip()]
            bad = [x for x in only if x not in ALL]
            if bad:
                raise SystemExit(f"bench: unknown contestant(s) {bad}; known: {', '.join(ALL)}")
            names = [n for n in ALL if n in only or n == "direct"]
        if self.a.skip:
            skip = [x.strip() for x in self.a.skip.split(",")]
            names = [n for n in names if n not in skip or n == "direct"]
        return names

    def active(self, test=None):
        out = []
        for c in self.contestants:
            if c.skipped:
                continue
            if test and test not in ONLY_TESTS.get(c.name, {test}):
                continue
            if c.has_process() and not c.alive():
                if not c.died:
                    codes = [p.returncode for p in c.procs]
                    c.died = f"process exited (codes {codes})"
                    log(f"{c.name}: {c.died}")
                    self.record({"test": "died", "contestant": c.name, "error": c.died})
                continue
            out.append(c)
        return out

    # ---------------------------------------------------------------- tests

    def measure(self, c, fn):
        """Run fn() and return (result, relay CPU seconds, host busy fraction, wall seconds)."""
        cpu0, _ = self.cpu(c)
        h0 = host_cpu()
        t0 = time.time()
        result = fn()
        wall = time.time() - t0
        time.sleep(0.3)  # let fork-per-connection children exit and be reaped
        cpu1, _ = self.cpu(c)
        h1 = host_cpu()
        busy = 1 - (h1[1] - h0[1]) / max(1, h1[0] - h0[0])
        return result, (cpu1 - cpu0 if cpu0 is not None else None), busy, wall

    def test_bulk(self, c, rep, streams):
        def go():
            argv = ["iperf3", "-c", c.host, "-p", str(c.ports["iperf"]), "-t", str(self.iperf_t),
                    "-P", str(streams), "-J"]
            return run(c.cmd(argv), self.iperf_t + 40)

        row = {"test": "bulk", "contestant": c.name, "rep": rep, "streams": streams, "seconds": self.iperf_t}
        try:
            r, cpu, busy, wall = self.measure(c, go)
            j = json.loads(r.stdout) if r.stdout.strip() else {}
            if r.returncode != 0 or "error" in j:
                row["error"] = j.get("error") or r.stderr.strip()[-300:]
                self.restart_iperf_if_needed(c)
            else:
                rec = j["end"]["sum_received"]
                row.update(gbit_s=rec["bits_per_second"] / 1e9, bytes=rec["bytes"],
                           retransmits=j["end"]["sum_sent"].get("retransmits"), host_busy=busy)
                if cpu is not None:
                    row["relay_cpu_s"] = cpu
                    row["cpu_s_per_gb"] = cpu / (rec["bytes"] / 1e9)
        except subprocess.TimeoutExpired:
            row["error"] = "iperf3 timed out"
            self.restart_iperf_if_needed(c)
        except (ValueError, KeyError) as e:
            row["error"] = f"bad iperf3 output: {e}"
        self.record(row)
        self.say(row, "gbit_s", "cpu_s_per_gb")

    def restart_iperf_if_needed(self, c):
        """An iperf3 server left mid-test refuses the next client: restart it."""
        tag = "ns" if c.netns else "lo"
        for p in list(self.procs.live):
            if p.bench_name == f"iperf3-{tag}":
                self.procs.stop(p)
                addr = NS_SRV_ADDR if c.netns else "127.0.0.1"
                netns = self.ns_srv if c.netns else None
                np = self.procs.start(f"iperf3-{tag}", ["iperf3", "-s", "-B", addr, "-p", str(self.upstreams["iperf"])], netns=netns)
                self.wait_listening([self.upstreams["iperf"]], addr=addr, netns=netns, procs=[np])
                return

    def test_latency(self, c, rep, pin=None):
        """64-byte round trips on one connection. `pin`: a CPU for the client, the echo
        upstream and every thread of the contestant, for the test's duration (the `pinned`
        test): no wake-up crosses CPUs, so what is left is each relay's own path (its
        syscalls, its switches) with much less of this VM's cross-CPU noise."""
        test = "latency" if pin is None else "pinned"
        row = {"test": test, "contestant": c.name, "rep": rep, "size": 64}
        taskset = []
        pids = []
        if pin is not None:
            row["cpu"] = pin
            taskset = ["taskset", "-c", str(pin)]
            echo = "echo-ns" if c.netns else "echo-lo"
            pids = [p.pid for p in self.procs.live if p.bench_name == echo]
            pids += members(c) if c.has_process() else []
        every = os.sched_getaffinity(0)

        def go():
            argv = taskset + [self.tools, "lat", c.host, str(c.ports["echo"]), str(self.lat_count),
                              str(self.lat_warmup), "64"]
            return run(c.cmd(argv), 120)

        if pin is not None:
            set_affinity(pids, {pin})
        try:
            r, cpu, busy, wall = self.measure(c, go)
            if r.returncode != 0:
                row["error"] = (r.stderr or r.stdout).strip()[-300:]
            else:
                row.update(json.loads(r.stdout))
                row["host_busy"] = busy
                if cpu is not None:
                    row["relay_cpu_us_per_rt"] = cpu * 1e6 / (self.lat_count + self.lat_warmup)
        except subprocess.TimeoutExpired:
            row["error"] = "latency client timed out"
        finally:
            if pin is not None:
                set_affinity(pids, every)
        self.record(row)
        self.say(row, "p50_us", "p99_us")

    def test_connrate(self, c, rep):
        row = {"test": "connrate", "contestant": c.name, "rep": rep, "inflight": 32, "seconds": self.rate_s}
        procs_before = len(members(c)) if c.has_process() else 0

        def go():
            argv = [self.tools, "rate", c.host, str(c.ports["echo"]), "32", str(self.rate_s), "64",
                    str(int(self.rate_s * 200000))]
            return run(c.cmd(argv), self.rate_s + 60)

        try:
            r, cpu, busy, wall = self.measure(c, go)
            if r.returncode != 0:
                row["error"] = (r.stderr or r.stdout).strip()[-300:]
            else:
                row.update(json.loads(r.stdout))
                row["host_busy"] = busy
                if cpu is not None and row["ok"]:
                    row["relay_cpu_us_per_conn"] = cpu * 1e6 / row["ok"]
        except subprocess.TimeoutExpired:
            row["error"] = "rate client timed out"
        self.record(row)
        self.say(row, "conns_per_s", "failed")
        time.sleep(1)  # let TIME_WAIT churn settle before the next contestant
        if c.has_process():
            self.settle(c, {"processes": procs_before})

    def test_idle(self, c, rep):
        n = self.idle_n
        row = {"test": "idle", "contestant": c.name, "rep": rep, "conns": n, "hold_s": self.idle_hold}
        has = c.has_process()
        time.sleep(1.0)
        # kernel first: reading /proc/PID/fd makes proc inodes and dentries for every fd
        k0 = kernel_snapshot()
        p0 = process_snapshot(members(c)) if has else None
        argv = c.cmd([self.tools, "idle", c.host, str(c.ports["echo"]), str(n), "256", "64"])
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
        try:
            opened = self.readline(p, 180)
            row["open"] = opened
            time.sleep(min(1.0, self.idle_hold / 2))
            k1 = kernel_snapshot()
            p1 = process_snapshot(members(c)) if has else None
            time.sleep(max(0.0, self.idle_hold - 1.0))
            p.stdin.write("go\n")
            p.stdin.flush()
            after = self.readline(p, 120)
            row["after"] = after
            p.wait(60)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(10)
            self.record(row)
            log(f"idle {c.name}: {row['error']}")
            return
        held = opened.get("ok", 0)
        row["verified_before"] = held
        row["verified_after"] = after.get("ok", 0)
        deltas = {k: k1["slabs"].get(k, 0) - k0["slabs"].get(k, 0) for k in set(k1["slabs"]) | set(k0["slabs"])}
        # proc_inode_cache grows with whoever lists /proc/PID/fd (this harness after the
        # snapshot, or a monitor on the host): not the relay's connections
        slab_objs_kib = sum(v for k, v in deltas.items() if k != "proc_inode_cache") / 1024
        row["kernel_kib_per_conn"] = (
            slab_objs_kib + (k1["kernel_stack_kib"] - k0["kernel_stack_kib"])
            + (k1["page_tables_kib"] - k0["page_tables_kib"])
        ) / max(1, held)
        row["slab_objects_kib_per_conn"] = slab_objs_kib / max(1, held)
        row["meminfo_slab_kib_per_conn"] = (k1["slab_kib"] - k0["slab_kib"]) / max(1, held)
        row["kernel_stack_kib_per_conn"] = (k1["kernel_stack_kib"] - k0["kernel_stack_kib"]) / max(1, held)
        row["tcp_mem_kib"] = k1["tcp_mem_kib"] - k0["tcp_mem_kib"]
        top = sorted(deltas.items(), key=lambda kv: -abs(kv[1]))[:8]
        row["slab_top_bytes_per_conn"] = {k: round(v / max(1, held), 1) for k, v in top}
        if p0:
            row["before"] = p0
            row["during"] = p1
            row["rss_kib_per_conn"] = (p1["rss_kib"] - p0["rss_kib"]) / max(1, held)
            row["pss_kib_per_conn"] = (p1["pss_kib"] - p0["pss_kib"]) / max(1, held)
            row["pipes_before"] = p0["pipe_fds"] // 2
            row["pipes_during"] = p1["pipe_fds"] // 2
            row["iou_wrk_during"] = p1["iou_wrk"]
            row["threads_during"] = p1["threads"]
            row["processes_during"] = p1["processes"]
            row["fds_during"] = p1["fds"]
        self.record(row)
        self.settle(c, p0)
        log(f"idle {c.name} rep {rep}: held {held}/{n}, after {row['verified_after']}, "
            f"rss/conn {row.get('rss_kib_per_conn', float('nan')):.2f} KiB, "
            f"kernel/conn {row['kernel_kib_per_conn']:.2f} KiB, pipes {row.get('pipes_during')}, "
            f"iou-wrk {row.get('iou_wrk_during')}")
        time.sleep(1)

    def settle(self, c, before, limit=120.0):
        """Wait until a fork-per-connection relay's children have exited (its process count
        is back to what it was before the test), so that thousands of exiting processes do
        not free kernel memory during the next contestant's measurement. Bounded."""
        if not before:
            return
        deadline = time.time() + limit
        while time.time() < deadline and len(members(c)) > before["processes"]:
            time.sleep(0.2)

    def readline(self, p, timeout):
        r, _, _ = select.select([p.stdout], [], [], timeout)
        if not r:
            raise TimeoutError(f"no answer within {timeout} s")
        line = p.stdout.readline()
        if not line:
            raise RuntimeError("client exited: " + p.stderr.read()[-300:])
        return json.loads(line)

    def make_scp_source(self):
        shm = "/dev/shm"
        need = self.scp_mib * 3 * 1024 * 1024
        try:
            st = os.statvfs(shm)
            use_shm = st.f_bavail * st.f_frsize > need + (2 << 30)
        except OSError:
            use_shm = False
        self.scp_dir = os.path.join(shm if use_shm else self.tmp, f"portrelay-bench-{os.getpid()}")
        os.makedirs(self.scp_dir, exist_ok=True)
        with open(os.path.join(self.tmp, "scpdir"), "w") as f:
            f.write(self.scp_dir + "\n")
        src = os.path.join(self.scp_dir, "src.bin")
        h = hashlib.sha256()
        with open(src, "wb") as f:
            for _ in range(self.scp_mib):
                b = os.urandom(1 << 20)
                h.update(b)
                f.write(b)
        self.scp_src, self.scp_sha = src, h.hexdigest()

    def sha256(self, path):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while True:
                b = f.read(1 << 22)
                if not b:
                    break
                h.update(b)
        return h.hexdigest()

    def test_scp(self, c):
        d = self.sshdir
        opts = ["-F", "/dev/null", "-i", f"{d}/client_ed25519", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
                "-P", str(c.ports["ssh"])]
        gb = self.scp_mib * (1 << 20) / 1e9
        for direction in ("up", "down"):
            dst = os.path.join(self.scp_dir, f"{direction}.bin")
            if direction == "up":
                argv = ["scp", *opts, self.scp_src, f"root@{c.host}:{dst}"]
            else:
                argv = ["scp", *opts, f"root@{c.host}:{self.scp_src}", dst]
            row = {"test": "scp", "contestant": c.name, "direction": direction, "mib": self.scp_mib}
            try:
                r, cpu, busy, wall = self.measure(c, lambda: run(c.cmd(argv), 900))
                if r.returncode != 0:
                    row["error"] = r.stderr.strip()[-300:]
                else:
                    ok = os.path.exists(dst) and self.sha256(dst) == self.scp_sha
                    row.update(seconds=wall, mb_s=self.scp_mib * (1 << 20) / 1e6 / wall, sha256_ok=ok,
                               host_busy=busy)
                    if cpu is not None:
                        row["relay_cpu_s"] = cpu
                        row["cpu_s_per_gb"] = cpu / gb
            except subprocess.TimeoutExpired:
                row["error"] = "scp timed out"
            if os.path.exists(dst):
                os.unlink(dst)
            self.record(row)
            self.say(row, "seconds", "cpu_s_per_gb")

    def say(self, row, *keys):
        if "error" in row:
            log(f"{row['test']} {row['contestant']}: ERROR {row['error']}")
            return
        bits = [f"{k}={row[k]:.3f}" if isinstance(row.get(k), float) else f"{k}={row.get(k)}" for k in keys]
        extra = f" streams={row['streams']}" if "streams" in row else ""
        extra += f" {row['direction']}" if "direction" in row else ""
        log(f"{row['test']}{extra} {row['contestant']} rep {row.get('rep', 0)}: {' '.join(bits)}")

    # ---------------------------------------------------------------- run

    def tests(self):
        if not self.a.tests:
            return TESTS
        t = [x.strip() for x in self.a.tests.split(",")]
        bad = [x for x in t if x not in TESTS]
        if bad:
            raise SystemExit(f"bench: unknown test(s) {bad}; known: {', '.join(TESTS)}")
        return t

    def main(self):
        tests = self.tests()
        os.makedirs(self.a.out, exist_ok=True)
        self.raw = open(os.path.join(self.a.out, "raw.jsonl"), "w")
        log(f"results in {os.path.relpath(self.a.out, ROOT)}")
        try:
            self.setup()
            if "scp" in tests:
                self.make_scp_source()
            # short tests: repetitions interleaved over contestants, so slow drift in the
            # machine's load spreads over all of them instead of landing on one
            for rep in range(1, self.reps + 1):
                if "bulk" in tests:
                    for c in self.active("bulk"):
                        self.test_bulk(c, rep, 1)
                        self.test_bulk(c, rep, 4)
                if "latency" in tests:
                    for c in self.active("latency"):
                        self.test_latency(c, rep)
                if "pinned" in tests:
                    for c in self.active("pinned"):
                        self.test_latency(c, rep, pin=max(os.sched_getaffinity(0)))
                if "connrate" in tests:
                    for c in self.active("connrate"):
                        self.test_connrate(c, rep)
            if "idle" in tests:
                for rep in range(1, self.idle_reps + 1):
                    for c in self.active("idle"):
                        self.test_idle(c, rep)
            if "scp" in tests:
                for c in self.active("scp"):
                    self.test_scp(c)
            self.active()  # records relays that died during the last test
            self.collect_logs()
        finally:
            self.procs.stop_all()
            self.teardown()
            self.raw.close()
        self.elapsed = time.time() - self.start_time
        self.load_end = os.getloadavg()
        import report  # noqa: E402  (bench/report.py, next to this file)

        report.write(self, tests)
        log(f"done in {time.time() - self.start_time:.0f} s: {os.path.relpath(self.a.out, ROOT)}/summary.md")

    def collect_logs(self):
        """Tally portrelay's log: close reasons, warnings and errors (messages, not lines)."""
        for c in self.contestants:
            if not c.name.startswith("portrelay") or not c.log_files:
                continue
            reasons, levels, other = {}, {}, 0
            kept = []  # every line but the ordinary closes, for the run folder
            with open(c.log_files[0], errors="replace") as f:
                for line in f:
                    try:
                        j = json.loads(line)
                    except ValueError:
                        other += 1
                        kept.append(line)
                        continue
                    lvl = j.get("level", "?")
                    msg = j.get("message") or j.get("fields", {}).get("message", "")
                    if "reason" in j:
                        key = str(j["reason"])
                        key = re.sub(r"\d+\.\d+\.\d+\.\d+:\d+", "ADDR", key)
                        key = f"{j.get('map', '?')}: {key}"
                        reasons[key] = reasons.get(key, 0) + 1
                        if j["reason"] in ("client_eof", "upstream_eof") and lvl == "INFO":
                            continue
                    if lvl in ("WARN", "ERROR"):
                        k = f"{lvl} {msg}"
                        levels[k] = levels.get(k, 0) + 1
                    if len(kept) < 2000:
                        kept.append(line)
            with open(os.path.join(self.a.out, f"{c.name}.log"), "w") as f:
                f.write("".join(kept).replace(self.tmp, "$TMP"))
            row = {"test": "log", "contestant": c.name, "close_reasons": reasons, "warn_error": levels,
                   "non_json_lines": other}
            self.record(row)

    def teardown(self):
        for ns in self.netns:
            run(["ip", "netns", "del", ns], 20)
        self.netns = []
        for cg in self.cgroups:
            for _ in range(50):
                try:
                    os.rmdir(cg)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
        self.cgroups = []
        if getattr(self, "scp_dir", None) and os.path.isdir(self.scp_dir):
            shutil.rmtree(self.scp_dir, ignore_errors=True)


DESCRIPTIONS = {
    "direct": "no relay: the client talks to the upstream on loopback",
    "nft-dnat": "kernel DNAT (nftables prerouting) between two network namespaces over a veth pair",
    "haproxy-splice": "HAProxy tcp mode, option splice-auto + splice-request + splice-response (splice-auto alone never spliced here), nbthread 2",
    "haproxy-nosplice": "HAProxy tcp mode, no splice, nbthread 2",
    "nginx": "nginx stream module, 2 workers",
    "socat": "socat TCP-LISTEN fork (a process per connection), nodelay",
    "rinetd": "rinetd, one process",
    "redir": "redir (a process per connection)",
    "portrelay-uring": "portrelay --io-backend uring (threads: one per core)",
    "portrelay-epoll": "portrelay --io-backend epoll (threads: one per core)",
    "floor": "the least a relay can be (tools.c `floor`): two threads per connection, each a "
             "blocking recv then send; latency tests only: the kernel's share of relaying a message",
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 repetition, short tests, 5 contestants")
    ap.add_argument("--only", help="comma-separated contestants (direct is always run as the reference)")
    ap.add_argument("--skip", help="comma-separated contestants to leave out")
    ap.add_argument("--tests", help=f"comma-separated subset of {','.join(TESTS)}")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--iperf-seconds", type=int)
    ap.add_argument("--lat-count", type=int)
    ap.add_argument("--rate-seconds", type=float)
    ap.add_argument("--idle-conns", type=int)
    ap.add_argument("--idle-hold", type=float)
    ap.add_argument("--idle-reps", type=int)
    ap.add_argument("--scp-mib", type=int)
    ap.add_argument("--portrelay-threads", type=int)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tmp", required=True)
    ap.add_argument("--tools", required=True)
    ap.add_argument("--portrelay", required=True)
    ap.add_argument("--command", default="bench/run")
    args = ap.parse_args()
    if args.idle_conns and args.idle_conns > 9400:
        raise SystemExit("bench: --idle-conns above 9400 cannot fit the 20000 open-file limit of a relay")
    sys.path.insert(0, HERE)
    b = Bench(args)

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    b.main()


if __name__ == "__main__":
    main()
