#!/usr/bin/env python3
"""The tunnel beside a direct connection, on loopback, in one run.

Builds the release `tunnel` (cargo build --release -p tunnel, into
$CARGO_TARGET_DIR or target/) and measures, each figure direct and through
`tunnel --listen 127.0.0.1:P --target 127.0.0.1:BACKEND`:

  1. bulk throughput: `iperf3 -c -t SECS -J` against an iperf3 server of our own;
  2. PostgreSQL select-only transactions per second over kept connections
     (`pgbench -S -n -c 8 -j 2 -T SECS bench`, user postgres), and with a new
     connection per transaction (`-C`);
  3. memory per idle connection: IDLE connections (default 3000), each having
     sent one byte, through the tunnel to a backend that holds them; the
     tunnel's resident set grows by this much per connection (tunnel only;
     below about 1,000 the allocator's first, already resident pages hide it);
  4. concurrency: CONNS connections (default 9,500) to an echo backend in a
     process of its own, all open at the same time: open them all, then each
     sends a unique payload and must get exactly it back, then all close.
     Reports how many succeeded and how long each phase took. The tunnel holds
     two descriptors per connection and the open-files limit here is 20,000,
     so one process cannot relay 10,000; 9,500 is tested.

Prints a table of figures with tunnel/direct ratios; the last line is JSON.

    python3 bench/tunnel.py                       # --secs 5 --idle 3000 --conns 9500
    python3 bench/tunnel.py --secs 2 --idle 1000 --conns 2000   # quicker
    python3 bench/tunnel.py --tunnel-args '--log-level warn'    # extra tunnel flags

Needs iperf3 and PostgreSQL with a 'bench' database on 127.0.0.1:5432 that
trusts user postgres. When it is missing and this runs as root, it is
prepared here (Debian: apt-get install iperf3 postgresql; trust for
127.0.0.1; createdb bench; pgbench -i -s 10 bench). Python 3 standard library
only; Linux (reads /proc).
"""
import argparse
import json
import os
import random
import resource
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP = tempfile.mkdtemp(prefix="tunnel-bench-")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def listening(port):
    """Whether something listens on 127.0.0.1:port, read from /proc/net/tcp:
    a probe connection would reach the backend through the tunnel (and an
    iperf3 server takes any connection for a test client)."""
    want = {f"0100007F:{port:04X}", f"00000000:{port:04X}"}
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] in want and fields[3] == "0A":
                return True
    return False


def spawn(name, cmd, port):
    """Starts cmd (output to a file under TMP) and waits until it listens."""
    out = os.path.join(TMP, f"{name}.log")
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=open(out, "w"),
                         stderr=subprocess.STDOUT, start_new_session=True)
    end = time.time() + 20
    while not listening(port):
        if p.poll() is not None or time.time() > end:
            stop(p)
            raise RuntimeError(f"{name} did not listen on 127.0.0.1:{port}; see {out}")
        time.sleep(0.02)
    return p


def stop(p):
    if p is None or p.poll() is not None:
        return
    try:
        os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


class Tunnel:
    """`tunnel --listen 127.0.0.1:<free> --target 127.0.0.1:<target>`."""

    count = 0

    def __init__(self, binary, target, extra):
        Tunnel.count += 1
        self.port = free_port()
        cmd = [binary, "--listen", f"127.0.0.1:{self.port}",
               "--target", f"127.0.0.1:{target}"] + extra
        self.proc = spawn(f"tunnel-{Tunnel.count}", cmd, self.port)

    def rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def fds(self):
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        stop(self.proc)


# Backends in a process of their own, each able to hold 20,000 descriptors.
BACKEND = """
import resource, selectors, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
echo = sys.argv[2] == "echo"
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", int(sys.argv[1]))); l.listen(4096); l.setblocking(False)
sel = selectors.DefaultSelector(); sel.register(l, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        if s is l:
            while True:
                try: c, _ = l.accept()
                except (BlockingIOError, InterruptedError): break
                except OSError: break  # out of descriptors: the client sees it
                c.setblocking(True); sel.register(c, selectors.EVENT_READ)
            continue
        try: data = s.recv(65536)
        except OSError: data = b""
        if not data:
            sel.unregister(s); s.close()
        elif echo:
            s.sendall(data)
"""


def backend(kind):
    port = free_port()
    return port, spawn(f"{kind}-backend", [sys.executable, "-c", BACKEND, str(port), kind], port)


# ---------------------------------------------------------------- setup


def pg_ready(port):
    probe = ["psql", "-X", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "bench",
             "-tAc", "select 1 from pgbench_accounts limit 1"]
    try:
        return subprocess.run(probe, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def prepare(pgport):
    """iperf3 and pgbench on the PATH, the 'bench' database reachable."""
    missing = [pkg for cmd, pkg in (("iperf3", "iperf3"), ("pgbench", "postgresql"), ("psql", "postgresql"))
               if not shutil.which(cmd)]
    if not missing and pg_ready(pgport):
        return
    advice = ("this benchmark needs iperf3 and a PostgreSQL database 'bench' on "
              f"127.0.0.1:{pgport} trusting user postgres; run this script as root once "
              "to prepare them (Debian packages iperf3 and postgresql, database 'bench')")
    if os.geteuid() != 0 or pgport != 5432:
        sys.exit(f"tunnel.py: {advice}")
    log(f"preparing iperf3 and the 'bench' database ({advice})")
    if missing:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *sorted(set(missing))], check=True, env=env,
                       stdout=subprocess.DEVNULL)
    versions = sorted(os.listdir("/etc/postgresql"), key=lambda v: [int(x) for x in v.split(".") if x.isdigit()])
    ver = versions[-1]
    hba = f"/etc/postgresql/{ver}/main/pg_hba.conf"
    line = "host all postgres 127.0.0.1/32 trust  # tunnel benchmark\n"
    text = open(hba).read()
    if line not in text:
        open(hba, "w").write(line + text)  # the first matching line wins
    subprocess.run(["pg_ctlcluster", ver, "main", "start"], capture_output=True)
    subprocess.run(["pg_ctlcluster", ver, "main", "reload"], capture_output=True)
    for _ in range(100):
        if subprocess.run(["psql", "-X", "-h", "127.0.0.1", "-U", "postgres", "-c", "select 1"],
                          capture_output=True).returncode == 0:
            break
        time.sleep(0.2)
    if not pg_ready(pgport):
        subprocess.run(["createdb", "-h", "127.0.0.1", "-U", "postgres", "bench"], capture_output=True)
        subprocess.run(["pgbench", "-h", "127.0.0.1", "-U", "postgres", "-i", "-s", "10", "bench"],
                       capture_output=True, check=True)
    if not pg_ready(pgport):
        sys.exit(f"tunnel.py: the 'bench' database is still unreachable; {advice}")


def build():
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
    log(f"building the release tunnel (target dir {target})")
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "tunnel"], cwd=ROOT, check=True)
    binary = os.path.join(target, "release", "tunnel")
    if not os.access(binary, os.X_OK):
        sys.exit(f"tunnel.py: no binary at {binary}")
    return binary


# ---------------------------------------------------------------- measures


def iperf(port, secs):
    """Gbit/s received by the server."""
    out = ""
    for _ in range(3):  # an iperf3 server can be briefly busy after a test
        time.sleep(0.3)
        out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(secs), "-J"],
                             capture_output=True, text=True, timeout=secs + 30).stdout
        try:
            end = json.loads(out).get("end", {})
        except ValueError:
            continue
        if "sum_received" in end:
            return end["sum_received"]["bits_per_second"] / 1e9
    raise RuntimeError(f"iperf3 gave no result: {out[-500:]}")


def pgbench(port, secs, connect_each):
    """Transactions per second; fails if any transaction failed."""
    args = ["pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
            "-S", "-n", "-c", "8", "-j", "2", "-T", str(secs)]
    if connect_each:
        args.append("-C")
    run = subprocess.run(args + ["bench"], capture_output=True, text=True, timeout=secs + 60)
    tps = failed = None
    for line in run.stdout.splitlines():
        if line.startswith("tps ="):
            tps = float(line.split()[2])
        elif line.startswith("number of failed transactions:"):
            failed = int(line.split(":")[1].split()[0])
    if run.returncode != 0 or tps is None or failed:
        raise RuntimeError(f"pgbench failed ({run.returncode}): {run.stdout[-800:]}{run.stderr[-800:]}")
    return tps


def listen_overflows():
    """The kernel's count of connections a full accept queue turned away
    (TcpExt ListenOverflows, machine-wide): each costs its client a SYN
    retransmitted a second later."""
    with open("/proc/net/netstat") as f:
        lines = [line.split() for line in f if line.startswith("TcpExt:")]
    return int(dict(zip(lines[0], lines[1]))["ListenOverflows"])


def wait_for(check, seconds):
    end = time.time() + seconds
    while not check():
        if time.time() > end:
            return False
        time.sleep(0.05)
    return True


def idle_memory(binary, extra, n):
    """KiB of tunnel RSS per idle connection that has sent one byte."""
    hold_port, hold = backend("hold")
    try:
        with Tunnel(binary, hold_port, extra) as t:
            time.sleep(0.5)
            base_fds, before = t.fds(), t.rss_kib()
            socks = []
            for _ in range(n):
                s = socket.create_connection(("127.0.0.1", t.port), timeout=10)
                s.sendall(b"x")
                socks.append(s)
            # Every connection accepted and relayed to the backend.
            relayed = wait_for(lambda: t.fds() >= base_fds + 2 * n, 20)
            time.sleep(1)
            after = t.rss_kib()
            for s in socks:
                s.close()
            if not relayed:
                raise RuntimeError(f"the tunnel holds {t.fds() - base_fds} descriptors, not {2 * n}")
            return (after - before) / n
    finally:
        stop(hold)


def concurrency(port, n, tunnel=None):
    """n connections to 127.0.0.1:port held open at once; each sends its own
    payload and must get exactly it back. Returns a dict of results."""
    rng = random.Random(n)
    payloads = [(f"{i:06d}:".encode() + rng.randbytes(rng.randrange(16, 120)).hex().encode())
                for i in range(n)]
    r = {"conns": n, "opened": 0, "echoed": 0, "wrong": 0, "failed": 0}
    socks = [None] * n
    base_fds = tunnel.fds() if tunnel else 0

    overflows = listen_overflows()
    slow = 0
    t0 = time.monotonic()
    for i in range(n):
        for attempt in range(5):
            try:
                started = time.monotonic()
                socks[i] = socket.create_connection(("127.0.0.1", port), timeout=10)
                slow += time.monotonic() - started > 0.5
                break
            except (ConnectionRefusedError, TimeoutError, socket.timeout):
                time.sleep(0.05 * (attempt + 1))
            except OSError as e:
                log(f"connection {i}: {e}")
                break
    opened = [i for i in range(n) if socks[i] is not None]
    r["opened"] = len(opened)
    r["open_s"] = round(time.monotonic() - t0, 3)
    # Connects as fast as the kernel completes them: a server that accepts
    # more slowly lets its listen backlog (4096 for the tunnel, capped by net.core.somaxconn) overflow.
    r["slow_connects"] = slow
    r["listen_overflows"] = listen_overflows() - overflows
    if tunnel:
        # All relayed to the backend at the same time: two descriptors each.
        wait_for(lambda: tunnel.fds() >= base_fds + 2 * len(opened), 20)
        r["tunnel_fds_while_open"] = tunnel.fds()

    t1 = time.monotonic()
    sel = selectors.DefaultSelector()
    got = {}
    for i in opened:
        s = socks[i]
        try:
            s.sendall(payloads[i])
        except OSError:
            r["failed"] += 1
            continue
        s.setblocking(False)
        got[i] = bytearray()
        sel.register(s, selectors.EVENT_READ, i)
    pending = len(got)
    end = time.monotonic() + 60
    while pending and time.monotonic() < end:
        for key, _ in sel.select(1):
            i = key.data
            try:
                data = key.fileobj.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                got[i] += data
            if not data or len(got[i]) >= len(payloads[i]):
                sel.unregister(key.fileobj)
                pending -= 1
                if got[i] == payloads[i]:
                    r["echoed"] += 1
                elif len(got[i]) >= len(payloads[i]):
                    r["wrong"] += 1
                else:
                    r["failed"] += 1
    r["failed"] += pending
    r["exchange_s"] = round(time.monotonic() - t1, 3)
    sel.close()

    t2 = time.monotonic()
    for i in opened:
        socks[i].close()
    if tunnel:
        wait_for(lambda: tunnel.fds() <= base_fds + 16, 30)  # a few pooled pipes may stay
    r["close_s"] = round(time.monotonic() - t2, 3)
    r["total_s"] = round(time.monotonic() - t0, 3)
    return r


# ---------------------------------------------------------------- report


def ratio(t, d):
    return round(t / d, 3) if t is not None and d else None


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
    return f"{v:,}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--secs", type=int, default=5, help="seconds per iperf3 and pgbench run (default 5)")
    ap.add_argument("--idle", type=int, default=3000, help="idle connections for the memory figure (0: skip)")
    ap.add_argument("--conns", type=int, default=9500, help="concurrent connections (0: skip)")
    ap.add_argument("--pgport", type=int, default=5432, help="PostgreSQL port with the 'bench' database")
    ap.add_argument("--tunnel-args", default="", help="extra tunnel flags, e.g. '--log-level warn'")
    a = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the tunnel too
    for n, what in ((a.conns, "--conns"), (a.idle, "--idle")):
        if 2 * n + 100 > hard:
            sys.exit(f"tunnel.py: {what} {n} needs {2 * n + 100} descriptors in the tunnel; "
                     f"the open-files limit is {hard}")
    extra = shlex.split(a.tunnel_args)
    if max(a.conns, a.idle) > 10_000:
        extra += ["--max-connections", str(max(a.conns, a.idle))]

    prepare(a.pgport)
    binary = build()
    res = {"direct": {}, "tunnel": {}}
    d, t = res["direct"], res["tunnel"]

    log("1/4 bulk throughput (iperf3)")
    ip = free_port()
    srv = spawn("iperf3-server", ["iperf3", "-s", "-p", str(ip), "-B", "127.0.0.1"], ip)
    try:
        d["iperf_gbps"] = round(iperf(ip, a.secs), 2)
        with Tunnel(binary, ip, extra) as tun:
            t["iperf_gbps"] = round(iperf(tun.port, a.secs), 2)
    finally:
        stop(srv)

    log("2/4 PostgreSQL select-only (pgbench -S, kept connections and -C)")
    d["pg_tps"] = round(pgbench(a.pgport, a.secs, False))
    d["pg_connect_tps"] = round(pgbench(a.pgport, a.secs, True))
    with Tunnel(binary, a.pgport, extra) as tun:
        t["pg_tps"] = round(pgbench(tun.port, a.secs, False))
        t["pg_connect_tps"] = round(pgbench(tun.port, a.secs, True))

    if a.idle:
        log(f"3/4 memory per idle connection ({a.idle:,} connections)")
        t["idle_kib_per_conn"] = round(idle_memory(binary, extra, a.idle), 2)

    if a.conns:
        log(f"4/4 {a.conns:,} concurrent connections to an echo backend")
        ep, echo = backend("echo")
        try:
            d["concurrency"] = concurrency(ep, a.conns)
            time.sleep(1)
            with Tunnel(binary, ep, extra) as tun:
                t["concurrency"] = concurrency(tun.port, a.conns, tun)
        finally:
            stop(echo)

    rows = [
        ("bulk throughput, Gbit/s (iperf3)", d.get("iperf_gbps"), t.get("iperf_gbps")),
        ("pgbench -S TPS, kept connections", d.get("pg_tps"), t.get("pg_tps")),
        ("pgbench -S -C TPS, connection per txn", d.get("pg_connect_tps"), t.get("pg_connect_tps")),
        ("idle connection, KiB of tunnel RSS", None, t.get("idle_kib_per_conn")),
    ]
    if a.conns:
        dc, tc = d["concurrency"], t["concurrency"]
        rows += [
            (f"concurrent conns echoed exactly (of {a.conns:,})", dc["echoed"], tc["echoed"]),
            ("  open all (one burst), s", dc["open_s"], tc["open_s"]),
            ("  connects that waited >0.5 s", dc["slow_connects"], tc["slow_connects"]),
            ("  exchange payloads, s", dc["exchange_s"], tc["exchange_s"]),
            ("  close all, s", dc["close_s"], tc["close_s"]),
            ("  total, s", dc["total_s"], tc["total_s"]),
        ]
    if a.conns and 2 * 10_000 + 100 > hard:
        print(f"\nnote: 10,000 concurrent connections are beyond what one process may hold here: "
              f"the open-files limit is {hard:,} descriptors and the tunnel holds two per relayed "
              f"connection, so {a.conns:,} were tested")
    print(f"\n{'':44} {'direct':>12} {'tunnel':>12} {'tunnel/direct':>14}")
    for name, dv, tv in rows:
        r = ratio(tv, dv)
        print(f"{name:44} {fmt(dv):>12} {fmt(tv):>12} {'-' if r is None else f'{r:.3f}':>14}")
    if a.conns:
        tc = t["concurrency"]
        print(f"\ntunnel descriptors with all {a.conns:,} open: {tc.get('tunnel_fds_while_open', '-'):,}; "
              f"wrong payloads: direct {dc['wrong']}, tunnel {tc['wrong']}; "
              f"failed: direct {dc['failed'] + dc['conns'] - dc['opened']}, "
              f"tunnel {tc['failed'] + tc['conns'] - tc['opened']}; accept-queue overflows during "
              f"the opening: direct {dc['listen_overflows']}, tunnel {tc['listen_overflows']} "
              f"(each delays one connect by a 1 s SYN retransmission)")
    res["ratios"] = {k: ratio(t.get(k), d.get(k)) for k in ("iperf_gbps", "pg_tps", "pg_connect_tps")}
    res["open_files_limit"] = hard
    print(json.dumps(res), flush=True)
    ok = all(c["echoed"] == c["conns"] for c in (d.get("concurrency"), t.get("concurrency")) if c)
    shutil.rmtree(TMP, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
