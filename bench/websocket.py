#!/usr/bin/env python3
"""SSH over WebSocket through portrelay: idle memory per connection and 1-stream throughput.

    bench/websocket.py [--conns 2000] [--mib 1024] [--scp-mib 256] [--no-build]

Run as root on Debian (an sshd is started for the scp figures), from the repository. Builds
portrelay (cargo build --release) unless --no-build, compiles bench/tools.c (its echo
server is the idle test's upstream), starts one relay (2 loops, the uring backend, metrics
off) and measures, all on 127.0.0.1:

1. idle: COUNT connections (3 runs, each on a fresh relay), each opened and checked with one echoed message, held 3 s, then
   checked again; relay RSS/PSS and kernel memory (active slab objects, as harness.py reads
   them) before the first opens and during the hold, per connection. Three ways: WebSocket
   (ws://, upgrade then frames), raw TCP through the relay's mapped port, and straight to
   the echo server (no relay: the client's and the echo server's own share).
2. stream: 1 stream of MIB MiB down (upstream -> client) and up, with a small source/sink
   upstream: straight, raw TCP through the relay, ws:// through the relay. Gbit/s and relay
   CPU seconds per GB. The ws client is this script (masking key 0 on the way up, so that
   the client costs nothing for masking; the relay unmasks all the same).
3. scp: SCP_MIB MiB up and down with scp -O, through the relay's mapped port and with
   websocat as the ProxyCommand over ws://. Seconds and MB/s.

Writes bench/runs/<date>-<host>-ws/{README.md,summary.md,raw.jsonl}. Every process it
starts is stopped at exit; every wait is bounded. Standard library only, and the harness's
own /proc readers.
"""

import argparse
import base64
import datetime
import hashlib
import json
import os
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import harness  # noqa: E402  (slabinfo, meminfo, process_snapshot, proc_cpu_seconds)

TIMEOUT = 30.0
PROCS = []


def log(msg):
    print(f"[ws-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def start(argv, name, tmp, **kw):
    out = open(os.path.join(tmp, f"{name}.log"), "ab")
    p = subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True, **kw)
    PROCS.append(p)
    return p


def stop_all():
    for p in PROCS:
        if p.poll() is None:
            p.terminate()
    deadline = time.time() + 5
    for p in PROCS:
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_port(port, proc, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process for port {port} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port} after {timeout} s")


# ----------------------------------------------------------------------------- WebSocket


def ws_frame(payload, opcode=2, key=None):
    key = os.urandom(4) if key is None else key
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    if key == b"\0\0\0\0":
        return head + key + payload
    k = int.from_bytes((key * (n // 4 + 1))[:n], "big")
    masked = (int.from_bytes(payload, "big") ^ k).to_bytes(n, "big")
    return head + key + masked


def recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"end of stream after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def ws_open(port, path, extra=b""):
    s = socket.create_connection(("127.0.0.1", port), TIMEOUT)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = base64.b64encode(os.urandom(16))
    s.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
              b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n"
              + extra + b"\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        c = s.recv(1)
        if not c:
            raise ConnectionError(f"no 101: {head!r}")
        head += c
    if not head.startswith(b"HTTP/1.1 101 "):
        raise ConnectionError(f"no 101: {head!r}")
    want = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    if want not in head:
        raise ConnectionError("wrong Sec-WebSocket-Accept")
    return s


def ws_read_frame(s):
    b0, b1 = recv_exact(s, 2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", recv_exact(s, 2))[0]
    elif n == 127:
        n = struct.unpack("!Q", recv_exact(s, 8))[0]
    return b0 & 0x0F, recv_exact(s, n)


# ----------------------------------------------------------------------------- upstreams


def serve_bulk(port):
    """The source/sink upstream (a process of its own): 'D' + u64 sends that many bytes,
    'U' + u64 reads that many and answers b'ok'; one connection at a time."""
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(16)
    block = bytes(1 << 20)
    buf = bytearray(1 << 20)
    while True:
        c, _ = ls.accept()
        try:
            cmd = recv_exact(c, 9)
            n = struct.unpack("!Q", cmd[1:])[0]
            if cmd[:1] == b"D":
                mv = memoryview(block)
                while n > 0:
                    k = min(n, len(block))
                    c.sendall(mv[:k])
                    n -= k
                c.shutdown(socket.SHUT_WR)
                while c.recv(65536):
                    pass
            else:
                while n > 0:
                    k = c.recv_into(buf, min(n, len(buf)))
                    if k == 0:
                        break
                    n -= k
                c.sendall(b"ok")
                c.shutdown(socket.SHUT_WR)
                while c.recv(65536):
                    pass
        except OSError:
            pass
        finally:
            c.close()


# ----------------------------------------------------------------------------- tests


def relay_pids(relay):
    return [relay.pid]


def idle(args, relay, ports, how):
    """COUNT connections `how` = ws | raw | norelay; memory before and during the hold."""
    n = args.conns
    target = {"ws": ports["ws"], "raw": ports["echo_map"], "norelay": ports["echo"]}[how]
    time.sleep(1.0)
    k0, r0 = harness.kernel_snapshot(), harness.process_snapshot(relay_pids(relay))
    conns = []
    t0 = time.time()
    msg = b"idle-check-16byt"
    for i in range(n):
        if how == "ws":
            s = ws_open(target, "/ssh/echo")
            s.sendall(ws_frame(msg))
            op, got = ws_read_frame(s)
            assert (op, got) == (2, msg), (op, got)
        else:
            s = socket.create_connection(("127.0.0.1", target), TIMEOUT)
            s.sendall(msg)
            assert recv_exact(s, len(msg)) == msg
        conns.append(s)
    opened = time.time() - t0
    time.sleep(3.0)
    k1, r1 = harness.kernel_snapshot(), harness.process_snapshot(relay_pids(relay))
    for s in conns:
        if how == "ws":
            s.sendall(ws_frame(msg))
            assert ws_read_frame(s) == (2, msg)
        else:
            s.sendall(msg)
            assert recv_exact(s, len(msg)) == msg
    for s in conns:
        s.close()
    slab = sum(k1["slabs"].get(c, 0) - k0["slabs"].get(c, 0) for c in k1["slabs"] if c != "proc_inode_cache")
    kern = slab + 1024 * ((k1["kernel_stack_kib"] - k0["kernel_stack_kib"]) + (k1["page_tables_kib"] - k0["page_tables_kib"]))
    row = {
        "test": "idle", "how": how, "conns": n, "open_s": round(opened, 2),
        "relay_rss_per_conn_b": round((r1["rss_kib"] - r0["rss_kib"]) * 1024 / n),
        "relay_pss_per_conn_b": round((r1["pss_kib"] - r0["pss_kib"]) * 1024 / n),
        "relay_rss_kib_before": r0["rss_kib"], "relay_rss_kib_during": r1["rss_kib"],
        "relay_pipe_fds_during": r1["pipe_fds"],
        "kernel_per_conn_b": round(kern / n),
        "load1": os.getloadavg()[0],
    }
    log(f"idle {how}: {row}")
    # Let the closes settle before the next measurement.
    time.sleep(1.0)
    return row


def stream(args, relay, ports, how, direction):
    size = args.mib << 20
    cpu0 = harness.proc_cpu_seconds(relay_pids(relay))
    t0 = time.time()
    cmd = (b"D" if direction == "down" else b"U") + struct.pack("!Q", size)
    buf = bytearray(1 << 20)
    if how == "ws":
        s = ws_open(ports["ws"], "/ssh/bulk")
        s.sendall(ws_frame(cmd))
    else:
        port = ports["bulk"] if how == "norelay" else ports["bulk_map"]
        s = socket.create_connection(("127.0.0.1", port), TIMEOUT)
        s.sendall(cmd)
    got = 0
    if direction == "down":
        if how == "ws":
            while got < size:
                op, payload_len = None, None
                b0, b1 = recv_exact(s, 2)
                op, n = b0 & 0x0F, b1 & 0x7F
                if n == 126:
                    n = struct.unpack("!H", recv_exact(s, 2))[0]
                elif n == 127:
                    n = struct.unpack("!Q", recv_exact(s, 8))[0]
                if op != 2 or n == 0:
                    raise SystemExit(f"frame opcode {op} length {n} after {got} bytes")
                left = n
                while left > 0:
                    k = s.recv_into(buf, min(left, len(buf)))
                    if k == 0:
                        raise SystemExit("end of stream inside a frame")
                    left -= k
                got += n
        else:
            while got < size:
                k = s.recv_into(buf)
                if k == 0:
                    break
                got += k
    else:
        block = bytes(1 << 20)
        framed = ws_frame(block, key=b"\0\0\0\0") if how == "ws" else block
        left = size
        while left > 0:
            s.sendall(framed)
            left -= len(block)
        got = size
        if how == "ws":
            op, reply = ws_read_frame(s)
        else:
            reply = recv_exact(s, 2)
        assert reply == b"ok", reply
    took = time.time() - t0
    s.close()
    cpu = harness.proc_cpu_seconds(relay_pids(relay)) - cpu0
    if got != size:
        raise SystemExit(f"{how} {direction}: {got} of {size} bytes")
    row = {
        "test": "stream", "how": how, "direction": direction, "bytes": size,
        "seconds": round(took, 3), "gbit_s": round(size * 8 / took / 1e9, 2),
        "relay_cpu_s_per_gb": None if how == "norelay" else round(cpu / (size / 1e9), 3),
        "load1": os.getloadavg()[0],
    }
    log(f"stream {how} {direction}: {row['gbit_s']} Gbit/s, relay CPU {row['relay_cpu_s_per_gb']} s/GB")
    return row


def scp(args, tmp, ports, how):
    size = args.scp_mib << 20
    src = os.path.join(tmp, "scp-src.bin")
    if not os.path.exists(src):
        with open(src, "wb") as f:
            for _ in range(args.scp_mib):
                f.write(os.urandom(1 << 20))
    remote = os.path.join(tmp, f"scp-remote-{how}.bin")
    back = os.path.join(tmp, f"scp-back-{how}.bin")
    base = ["scp", "-q", "-O", "-F", "/dev/null", "-i", f"{tmp}/client_ed25519",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-P", str(ports["ssh_map"])]
    if how == "ws":
        base += ["-o", f"ProxyCommand=websocat --binary asyncstdio: ws://127.0.0.1:{ports['ws']}/ssh/ssh"]
    row = {"test": "scp", "how": how, "bytes": size, "load1": os.getloadavg()[0]}
    for direction, a, b in [("up", src, f"root@127.0.0.1:{remote}"), ("down", f"root@127.0.0.1:{remote}", back)]:
        t0 = time.time()
        subprocess.run(base + [a, b], check=True, timeout=600)
        took = time.time() - t0
        row[f"{direction}_s"] = round(took, 2)
        row[f"{direction}_mb_s"] = round(size / took / 1e6, 1)
    digest = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()  # noqa: E731
    if digest(back) != digest(src):
        raise SystemExit(f"scp {how}: the copy differs")
    os.unlink(remote)
    os.unlink(back)
    log(f"scp {how}: {row}")
    return row


# ----------------------------------------------------------------------------- main


def summary(rows):
    lines = ["## Idle connections (median of the runs, min-max)", "",
             "| how | conns | relay RSS / conn | relay PSS / conn | kernel / conn (whole host) |",
             "|---|---|---|---|---|"]

    def med(rs, key):
        v = sorted(r[key] for r in rs)
        return f"{v[len(v) // 2]} B ({v[0]}–{v[-1]})"

    for how in ["ws", "raw", "norelay"]:
        rs = [r for r in rows if r["test"] == "idle" and r["how"] == how]
        if rs:
            lines.append(f"| {how} | {rs[0]['conns']} | {med(rs, 'relay_rss_per_conn_b')} | "
                         f"{med(rs, 'relay_pss_per_conn_b')} | {med(rs, 'kernel_per_conn_b')} |")
    lines += ["", "## One stream", "", "| how | direction | Gbit/s | relay CPU s / GB |", "|---|---|---|---|"]
    for r in rows:
        if r["test"] == "stream":
            lines.append(f"| {r['how']} | {r['direction']} | {r['gbit_s']} | {r['relay_cpu_s_per_gb']} |")
    lines += ["", "## scp -O", "", "| how | MiB | up s (MB/s) | down s (MB/s) |", "|---|---|---|---|"]
    for r in rows:
        if r["test"] == "scp":
            lines.append(f"| {r['how']} | {r['bytes'] >> 20} | {r['up_s']} ({r['up_mb_s']}) | "
                         f"{r['down_s']} ({r['down_mb_s']}) |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conns", type=int, default=2000)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--scp-mib", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--idle-reps", type=int, default=3)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--serve-bulk", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_bulk:
        serve_bulk(args.serve_bulk)
        return
    if os.geteuid() != 0:
        raise SystemExit("bench/websocket.py: run as root (sshd)")
    os.chdir(ROOT)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.conns * 2 + 100 > hard:
        raise SystemExit(f"--conns {args.conns} needs more than the open-file limit {hard}")
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--quiet"], check=True)
    binary = os.path.join(ROOT, "target/release/portrelay")
    started = time.time()
    tmp = tempfile.mkdtemp(prefix="portrelay-ws-bench.")
    try:
        rows = run(args, tmp, binary)
    finally:
        stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    host = socket.gethostname().split(".")[0]
    out = os.path.join(HERE, "runs", datetime.datetime.now().strftime("%Y-%m-%d-%H%M") + f"-{host}-ws")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "raw.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary(rows))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout
    websocat = subprocess.run(["websocat", "--version"], capture_output=True, text=True).stdout.strip()
    sha = hashlib.sha256(open(binary, "rb").read()).hexdigest()[:16]
    readme = f"""# WebSocket benchmark run {os.path.basename(out)}

- command: `bench/websocket.py {' '.join(sys.argv[1:])}`
- date: {datetime.datetime.now().isoformat(timespec='seconds')} (local), took {round(time.time() - started)} s
- host: {host}, kernel {os.uname().release}, {os.cpu_count()} CPUs
- commit: {commit}{' plus uncommitted changes' if dirty else ''}
- portrelay binary: `cargo build --release`, sha256 {sha}…, `--threads {args.threads} --io-backend uring`
- {websocat}; OpenSSH {subprocess.run(['ssh', '-V'], capture_output=True, text=True).stderr.strip()}
- load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (the machine is shared)
- parameters: {args.conns} idle connections held 3 s, {args.idle_reps} runs (a fresh relay each); {args.mib} MiB per stream; scp -O of {args.scp_mib} MiB

Kernel memory is the growth of the whole host's active slab objects, kernel stacks and
page tables: it includes the client's and the echo server's sockets (see `norelay`).

{summary(rows)}"""
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(readme)
    print(readme)


def run(args, tmp, binary):
    names = ["echo", "bulk", "ssh", "echo_map", "bulk_map", "ssh_map", "ws"]
    ports = dict(zip(names, free_ports(len(names))))
    tools = os.path.join(tmp, "tools")
    subprocess.run(["gcc", "-O2", "-Wall", "-pthread", "-o", tools, os.path.join(HERE, "tools.c")], check=True)
    echo = start([tools, "echo", "127.0.0.1", str(ports["echo"]), "1"], "echo", tmp)
    bulk = start([sys.executable, os.path.abspath(__file__), "--serve-bulk", str(ports["bulk"])], "bulk", tmp)
    for key in ["host_ed25519", "client_ed25519"]:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{tmp}/{key}"], check=True)
    shutil.copy(f"{tmp}/client_ed25519.pub", f"{tmp}/authorized_keys")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    with open(f"{tmp}/sshd_config", "w") as f:
        f.write(f"Port {ports['ssh']}\nListenAddress 127.0.0.1\nHostKey {tmp}/host_ed25519\n"
                f"AuthorizedKeysFile {tmp}/authorized_keys\nPidFile none\nPermitRootLogin prohibit-password\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                "LogLevel ERROR\nSubsystem sftp internal-sftp\n")
    sshd = start(["/usr/sbin/sshd", "-D", "-e", "-f", f"{tmp}/sshd_config"], "sshd", tmp)
    with open(f"{tmp}/portrelay.toml", "w") as f:
        f.write(f"""[relay]
bind = ["127.0.0.1"]
metrics = ""
max_connections = 9000
max_pending_admissions = 4096

[[map]]
port = {ports['echo_map']}
to = "127.0.0.1:{ports['echo']}"
name = "echo"

[[map]]
port = {ports['bulk_map']}
to = "127.0.0.1:{ports['bulk']}"
name = "bulk"

[[map]]
port = {ports['ssh_map']}
to = "127.0.0.1:{ports['ssh']}"
name = "ssh"

[[ws]]
listen = "127.0.0.1:{ports['ws']}"
path = "/ssh/{{name}}"
ping_interval = "0s"
""")
    def start_relay():
        relay = start([binary, "run", "--config", f"{tmp}/portrelay.toml", "--io-backend", "uring",
                       "--threads", str(args.threads), "--log-format", "json"], "portrelay", tmp,
                      env=dict(os.environ, RUST_LOG="warn"))
        wait_port(ports["ws"], relay)
        wait_port(ports["echo_map"], relay)
        return relay

    for name, proc in [("echo", echo), ("bulk", bulk), ("ssh", sshd)]:
        wait_port(ports[name], proc)
    rows = []
    # Each idle measurement on a relay of its own, started for it: the growth of its heap
    # and slabs for the connections is part of their cost.
    for rep in range(args.idle_reps):
        for how in ["norelay", "ws", "raw"]:
            relay = start_relay()
            row = idle(args, relay, ports, how)
            row["rep"] = rep + 1
            rows.append(row)
            relay.terminate()
            relay.wait(10)
    relay = start_relay()
    for direction in ["down", "up"]:
        for how in ["norelay", "raw", "ws"]:
            rows.append(stream(args, relay, ports, how, direction))
    for how in ["raw", "ws"]:
        rows.append(scp(args, tmp, ports, how))
    if relay.poll() is not None:
        raise SystemExit(f"the relay exited with {relay.returncode}")
    return rows


if __name__ == "__main__":
    main()
