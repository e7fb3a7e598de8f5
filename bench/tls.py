#!/usr/bin/env python3
"""TLS termination on loopback: stunnel4, HAProxy and the tunnel, side by side.

Each proxy terminates TLS on 127.0.0.1 and forwards plain TCP to one backend
on loopback (a Python process of this script). All three serve the same ECDSA
P-256 certificate (a CA and a server certificate for localhost and 127.0.0.1
are made here with `openssl` in a temporary directory) with the same suites:
TLS 1.3 TLS_AES_128_GCM_SHA256 and TLS 1.2 ECDHE-ECDSA-AES128-GCM-SHA256, key
exchange X25519 (P-256 also allowed). stunnel4 and HAProxy are configured to
offer exactly those; the tunnel takes no cipher settings (rustls's defaults),
so the clients offer only those, and a check with `openssl s_client` before
the first round requires every proxy to negotiate exactly them, with a
certificate that verifies against the CA for the name localhost.

  stunnel4  foreground, `debug = warning` (its default, notice, writes two
            lines per connection); a thread per connection, its only model on
            Linux, so it uses both cores.
  HAProxy   `mode tcp`, `nbthread 2`: the default of this build on this
            2-core machine, written out; no log target.
  tunnel    `tunnel --listen 127.0.0.1:P --target 127.0.0.1:B --tls-cert
            cert.pem --tls-key key.pem`, nothing else: its defaults (its log,
            a line per connection that carried data, goes to a file), plus
            --tunnel-args if given. A tunnel that refuses the flags or does
            not speak TLS is shown as "not available" with the reason.

Figures, each from every proxy in turn, in interleaved rounds (the order of
the proxies rotates each round; every workload runs on each proxy back to
back, so drift of the machine hits all three alike):

  idle      KiB per idle TLS connection: --idle connections (default 2,000)
            complete a TLS 1.3 handshake, send one byte (so each proxy has
            connected to the backend) and stay open; the growth of the
            proxy's RSS and PSS (/proc/PID/smaps_rollup) divided by their
            number, on a proxy started fresh for the round (after a warm-up
            of a few connections, so one-time setup is not counted).
  upload    Gbit/s of TLS 1.3 streams (--streams, default 2, each a process
            of its own) writing into the proxy, which decrypts and forwards them
            to a sink; and the proxy's CPU seconds per GiB.
  download  the same, the backend sending and the proxy encrypting.
  hs13      TLS 1.3 full handshakes per second from --clients concurrent
            clients (default 4 processes, each in a loop: connect, complete
            the handshake, send a byte and read the backend's one-byte answer,
            close; no session is ever resumed), and the proxy's CPU
            milliseconds per handshake. The byte makes every proxy do the
            same work per connection: a client that closed right after its
            handshake would let a proxy skip the backend connection or not,
            depending on timing.
  hs12      the same with TLS 1.2.

Why these clients. iperf3 speaks no TLS, `openssl s_time` only handshakes,
and `openssl s_client -quiet` fed from a pipe moves data in small reads and
cannot be started and stopped together with others. The clients here are
Python's ssl module, which is OpenSSL: a 256 KiB write is one call into
OpenSSL, so the interpreter's share is small beside the AES-GCM work that any
TLS client must do for the bytes the proxy decrypts (they spend about half
the proxy's CPU per GiB uploading, two thirds to nine tenths of it
downloading, where each call returns one 16 KiB record). For handshakes the Python loop costs its clients
less CPU per handshake than four `openssl s_time -new` processes did here
(0.7-0.8 ms against 0.9-1.1 ms, measured side by side), and it can run TLS
1.2 and 1.3 alike. The clients are separate processes (no shared
interpreter lock); they wait until all are connected, then run the same
seconds, and report their own CPU time.

On this 2-core machine the clients, the proxy and the backend share the
cores, so a Gbit/s or handshakes/s figure is the proxy's throughput when it
shares the machine with its load. The figure that holds however the cores are
shared is the proxy's own CPU per GiB or per handshake: utime+stime from
/proc/PID/stat of every process in the proxy's session, read just before the
clients start and just after they report. The per-round lines also show the
clients' CPU, the backend's share of a core and how busy the machine was, so
a generator or backend that saturates its core shows.

The table: the median of each figure over the rounds per proxy, and "tunnel /
best", the median over rounds of the tunnel's figure divided by the better of
stunnel4's and HAProxy's in the same round (above 1 is better for Gbit/s and
handshakes/s, below 1 is better for CPU and KiB). The last line printed is
JSON.

    python3 bench/tls.py                      # 3 rounds of 5 s: about 4 minutes
    python3 bench/tls.py --rounds 5 --seconds 10
    python3 bench/tls.py --tunnel path/to/tunnel
    python3 bench/tls.py --quick              # 1 round of 1 s, 200 idle connections: a smoke test

The tunnel defaults to target/release/tunnel (under $CARGO_TARGET_DIR if set),
built with `cargo build --release -p tunnel` only when it is missing: rebuild
it first when the source has changed. Needs openssl; stunnel4 and HAProxy are
skipped with a line saying so when missing (Debian: apt-get install -y
stunnel4 haproxy). Python 3 standard library only; Linux (reads /proc). Every
child process runs in a session of its own, dies with this script (even on
SIGKILL, by PR_SET_PDEATHSIG) and is stopped on exit or Ctrl-C; every wait has
a timeout; only 127.0.0.1 is used; the temporary directory is removed (kept
with --keep, or when a proxy failed, and its path printed).
"""
import argparse
import ctypes
import json
import os
import resource
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK = os.sysconf("SC_CLK_TCK")
TLS13_SUITE = "TLS_AES_128_GCM_SHA256"
TLS12_SUITE = "ECDHE-ECDSA-AES128-GCM-SHA256"
GROUPS = "X25519:P-256"
PROXIES = ["stunnel4", "haproxy", "tunnel"]
LABELS = {"stunnel4": "stunnel4", "haproxy": "HAProxy", "tunnel": "tunnel"}
INSTALL = "apt-get install -y stunnel4 haproxy"

# (key, row label, bigger is better, format)
FIGURES = [
    ("up_gbps", "upload (client to backend), Gbit/s", True, "{:.2f}"),
    ("up_cpu_s_per_gib", "upload, proxy CPU s per GiB", False, "{:.3f}"),
    ("down_gbps", "download (backend to client), Gbit/s", True, "{:.2f}"),
    ("down_cpu_s_per_gib", "download, proxy CPU s per GiB", False, "{:.3f}"),
    ("hs13_per_s", "TLS 1.3 full handshakes/s", True, "{:,.0f}"),
    ("hs13_cpu_ms", "TLS 1.3 handshake, proxy CPU ms", False, "{:.3f}"),
    ("hs12_per_s", "TLS 1.2 full handshakes/s", True, "{:,.0f}"),
    ("hs12_cpu_ms", "TLS 1.2 handshake, proxy CPU ms", False, "{:.3f}"),
    ("idle_rss_kib", "idle TLS connection, KiB RSS", False, "{:.1f}"),
    ("idle_pss_kib", "idle TLS connection, KiB PSS", False, "{:.1f}"),
]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class Failed(Exception):
    """A proxy or a workload did not work; the message says which and why."""


# ---------------------------------------------------------------- the backend

# One process, one port. A connection whose first byte is "D" gets an endless
# stream (the download source); one whose first byte is "P" gets "p" back (the
# handshake clients' proof that the connection reached the backend); all are
# read and thrown away until they close (the upload sink, where idle
# connections land too). It exits when its parent is gone.
BACKEND = r"""
import os, selectors, socket, sys
parent = os.getppid()
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(4096)
listener.setblocking(False)
print(listener.getsockname()[1], flush=True)
sel = selectors.DefaultSelector()
sel.register(listener, selectors.EVENT_READ, "listen")
buf = bytearray(1 << 20)
data = memoryview(os.urandom(1 << 20))

def close(conn):
    sel.unregister(conn)
    conn.close()

while os.getppid() == parent:
    for key, mask in sel.select(1.0):
        conn = key.fileobj
        if key.data == "listen":
            while True:
                try:
                    c, _ = listener.accept()
                except OSError:
                    break
                c.setblocking(False)
                sel.register(c, selectors.EVENT_READ, "new")
            continue
        if key.data == "source" and mask & selectors.EVENT_WRITE:
            try:
                conn.send(data)
            except BlockingIOError:
                pass
            except OSError:
                close(conn)
                continue
        if mask & selectors.EVENT_READ:
            try:
                n = conn.recv_into(buf)
            except BlockingIOError:
                continue
            except OSError:
                n = 0
            if n == 0:
                close(conn)
            elif key.data == "new":
                if buf[0] == ord("P"):
                    conn.send(b"p")  # one byte into an empty buffer: never blocks
                source = buf[0] == ord("D")
                sel.modify(conn, selectors.EVENT_READ | (selectors.EVENT_WRITE if source else 0),
                           "source" if source else "sink")
"""

# ---------------------------------------------------------------- the clients

# argv: MODE PORT CAFILE LIMIT_S [ARGS]. Every mode prints "ready", waits for
# "go" on its standard input, runs, prints one JSON line. The alarm ends it
# whatever happens.
CLIENT = r"""
import json, os, resource, signal, socket, ssl, sys, threading, time
mode, port, cafile, limit = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
args = sys.argv[5:]
signal.alarm(limit)

def context(version, verify):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if verify:
        ctx.load_verify_locations(cafile)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers(TLS12_SUITE)  # TLS 1.3 suites and groups: OPENSSL_CONF
    v = ssl.TLSVersion.TLSv1_2 if version == "1.2" else ssl.TLSVersion.TLSv1_3
    ctx.minimum_version = ctx.maximum_version = v
    return ctx

def connect(ctx):
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    return ctx.wrap_socket(s, server_hostname="localhost")

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

def go():
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        sys.exit(0)

if mode in ("upload", "download"):
    secs = float(args[0])
    t = connect(context("1.3", True))
    chunk = bytearray(os.urandom(256 << 10))
    chunk[0] = 0  # not "D"
    if mode == "download":
        t.sendall(b"D")
    go()
    c0, t0, n = cpu(), time.monotonic(), 0
    end = t0 + secs
    while time.monotonic() < end:
        if mode == "upload":
            t.sendall(chunk)
            n += len(chunk)
        else:
            k = t.recv_into(chunk)
            if not k:
                raise SystemExit("the proxy closed the download")
            n += k
    print(json.dumps({"bytes": n, "secs": time.monotonic() - t0, "cpu": cpu() - c0}), flush=True)
elif mode == "handshakes":
    version, secs = args[0], float(args[1])
    ctx = context(version, False)
    go()
    c0, t0, n, errors, last = cpu(), time.monotonic(), 0, 0, ""
    end = t0 + secs
    while time.monotonic() < end:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            t = ctx.wrap_socket(s)
            t.sendall(b"P")
            if t.recv(1) != b"p":
                raise OSError("no answer from the backend")
            t.close()
            n += 1
        except OSError as e:
            errors, last = errors + 1, str(e)
            time.sleep(0.01)
    print(json.dumps({"handshakes": n, "errors": errors, "last_error": last,
                      "secs": time.monotonic() - t0, "cpu": cpu() - c0}), flush=True)
elif mode == "idle":
    count = int(args[0])
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ctx = context("1.3", True)
    conns, lock = [], threading.Lock()

    def open_some(k):
        for _ in range(k):
            t = connect(ctx)
            t.sendall(b"x")
            with lock:
                conns.append(t)

    # Ready before connecting: this process's libraries are mapped when the
    # proxy's memory is first read, so the shares of pages it has in common
    # with the proxy (libssl, libcrypto) are the same at both reads.
    go()
    # A few at a time: the handshakes overlap, the connections stay the same.
    threads = [threading.Thread(target=open_some, args=(count // 4 + (i < count % 4),)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if len(conns) != count:
        sys.exit(f"opened {len(conns)} of {count} idle connections")
    print(json.dumps({"open": len(conns)}), flush=True)
    sys.stdin.readline()  # "close", or the end of the input
    for t in conns:
        t.close()
""".replace("TLS12_SUITE", repr(TLS12_SUITE))

# The clients' OpenSSL offers only the benchmark's TLS 1.3 suite and groups
# (Python 3.11's ssl module cannot set either).
CLIENT_OPENSSL_CONF = f"""openssl_conf = bench_conf
[bench_conf]
ssl_conf = bench_ssl
[bench_ssl]
system_default = bench_default
[bench_default]
Ciphersuites = {TLS13_SUITE}
Groups = {GROUPS}
"""

# ---------------------------------------------------------------- processes

LIBC = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1
CHILDREN = []


def die_with_parent():
    LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Child:
    """A process of this run, in a session of its own (so the CPU and memory
    of a proxy are those of its session), killed if this script dies."""

    def __init__(self, tmp, name, cmd, pipes=False, env=None):
        self.name = name
        self.log = os.path.join(tmp, f"{name}.log")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipes else out, stderr=out, env=env,
                start_new_session=True, preexec_fn=die_with_parent)
        self.pid = self.proc.pid
        self.pending = b""
        CHILDREN.append(self)

    def line(self, timeout):
        """The next line the child prints, waiting at most timeout seconds."""
        end = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.pending:
            left = end - time.monotonic()
            if left <= 0:
                raise Failed(f"{self.name} said nothing for {timeout:.0f} s{self.tail()}")
            if select.select([fd], [], [], left)[0]:
                data = os.read(fd, 65536)
                if not data:
                    self.proc.wait(5)
                    raise Failed(f"{self.name} exited with status {self.proc.returncode}{self.tail()}")
                self.pending += data
        text, _, self.pending = self.pending.partition(b"\n")
        return text.decode()

    def send(self, text):
        try:
            self.proc.stdin.write(text.encode())
            self.proc.stdin.flush()
        except OSError:
            pass  # it has exited: its line() says why

    def tail(self):
        try:
            with open(self.log, errors="replace") as f:
                lines = [x for x in f.read().splitlines() if x.strip()]
        except OSError:
            lines = []
        # Three lines at most, each cut short: enough to act on; the log has the rest.
        short = [x.strip()[:160] + ("..." if len(x.strip()) > 160 else "") for x in lines[-3:]]
        return (": " + " | ".join(short)) if short else ""

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe:
                try:
                    pipe.close()
                except OSError:
                    pass  # unread or unsent bytes of a process that is gone
        if self in CHILDREN:
            CHILDREN.remove(self)


def stop_all():
    for child in list(CHILDREN):
        try:
            child.stop()
        except Exception:  # noqa: BLE001 - cleaning up whatever is left
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except OSError:
                pass


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def listening(port):
    """Whether 127.0.0.1:port is in LISTEN, from /proc/net/tcp (a probe
    connection would count as a client of the proxy)."""
    want = {f"0100007F:{port:04X}", f"00000000:{port:04X}"}
    with open("/proc/net/tcp") as f:
        return any(fields[1] in want and fields[3] == "0A"
                   for fields in (line.split() for line in f.readlines()[1:]))


def session_pids(sid):
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[3]) == sid:  # field 6: session
                pids.append(int(entry))
    return pids


def cpu_seconds(sid):
    """utime+stime (and those of reaped children) of every process in a session."""
    ticks = 0
    for pid in session_pids(sid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        ticks += sum(int(x) for x in fields[11:15])  # fields 14-17
    return ticks / TICK


def memory_kib(sid):
    """(RSS, PSS) in KiB, summed over a session, from smaps_rollup."""
    rss = pss = 0
    for pid in session_pids(sid):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except OSError:
            continue
    return rss, pss


def descriptors(sid):
    n = 0
    for pid in session_pids(sid):
        try:
            n += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return n


def machine_ticks():
    """(busy, total) jiffies of all cores, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def wait_for(check, seconds):
    end = time.monotonic() + seconds
    while not check():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


# ---------------------------------------------------------------- certificate


def openssl(tmp, *args):
    run = subprocess.run(["openssl", *args], cwd=tmp, capture_output=True, text=True, timeout=60)
    if run.returncode != 0:
        raise Failed(f"openssl {args[0]} failed: {run.stderr.strip()[-500:]}")


def make_certificate(tmp):
    """A CA and an ECDSA P-256 server certificate for localhost and 127.0.0.1."""
    p256 = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl(tmp, "req", "-x509", "-new", *p256, "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=TLS benchmark CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl(tmp, "req", "-new", *p256, "-keyout", "key.pem", "-out", "server.csr",
            "-subj", "/CN=localhost")
    with open(os.path.join(tmp, "server.ext"), "w") as f:
        f.write("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl(tmp, "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "server.ext", "-out", "cert.pem")
    files = {k: os.path.join(tmp, v) for k, v in
             (("ca", "ca.pem"), ("cert", "cert.pem"), ("key", "key.pem"), ("both", "both.pem"))}
    with open(files["both"], "w") as out:  # HAProxy's crt: the certificate, then its key
        for part in ("cert", "key"):
            with open(files[part]) as f:
                out.write(f.read())
    return files


# ---------------------------------------------------------------- proxies


class Proxy:
    """One proxy terminating TLS on 127.0.0.1:port, forwarding to the backend."""

    def __init__(self, kind, tmp, files, backend, tunnel, maxconn, serial):
        tunnel_binary, tunnel_args = tunnel
        self.kind = kind
        self.port = free_port()
        name = f"{kind}-{serial}"
        if kind == "stunnel4":
            conf = os.path.join(tmp, f"{name}.conf")
            with open(conf, "w") as f:
                f.write(f"""foreground = yes
pid = {tmp}/{name}.pid
debug = warning
[tls]
accept = 127.0.0.1:{self.port}
connect = 127.0.0.1:{backend}
cert = {files['cert']}
key = {files['key']}
sslVersionMin = TLSv1.2
sslVersionMax = TLSv1.3
ciphers = {TLS12_SUITE}
ciphersuites = {TLS13_SUITE}
curves = {GROUPS}
""")
            cmd = ["stunnel4", conf]
        elif kind == "haproxy":
            conf = os.path.join(tmp, f"{name}.cfg")
            with open(conf, "w") as f:
                f.write(f"""global
  nbthread 2
  maxconn {maxconn}
  ssl-default-bind-ciphers {TLS12_SUITE}
  ssl-default-bind-ciphersuites {TLS13_SUITE}
  ssl-default-bind-options ssl-min-ver TLSv1.2 ssl-max-ver TLSv1.3
defaults
  mode tcp
  timeout connect 5s
  timeout client 5m
  timeout server 5m
frontend tls
  bind 127.0.0.1:{self.port} ssl crt {files['both']} curves {GROUPS}
  default_backend plain
backend plain
  server backend 127.0.0.1:{backend}
""")
            cmd = ["haproxy", "-f", conf, "-db"]
        else:
            cmd = [tunnel_binary, "--listen", f"127.0.0.1:{self.port}",
                   "--target", f"127.0.0.1:{backend}",
                   "--tls-cert", files["cert"], "--tls-key", files["key"], *tunnel_args]
        try:
            self.child = Child(tmp, name, cmd)
        except OSError as e:
            raise Failed(f"{LABELS[kind]} could not be started: {e}") from None
        ok = wait_for(lambda: listening(self.port) or not self.child.alive(), 15)
        if not self.child.alive() or not ok:
            why = self.child.tail() or ": no output"
            self.child.stop()
            raise Failed(f"{LABELS[kind]} did not listen on 127.0.0.1:{self.port}{why}")

    def cpu(self):
        return cpu_seconds(self.child.pid)

    def memory(self):
        return memory_kib(self.child.pid)

    def fds(self):
        return descriptors(self.child.pid)

    def stop(self):
        self.child.stop()


def handshake_check(port, files):
    """What a client offering only the benchmark's suites negotiates, as
    `openssl s_client -brief` reports it; raises Failed unless it is exactly
    those suites with a certificate that verifies for localhost."""
    found = []
    for version, flag, suite in (("TLSv1.3", "-tls1_3", TLS13_SUITE), ("TLSv1.2", "-tls1_2", TLS12_SUITE)):
        cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", flag, "-brief",
               "-ciphersuites", TLS13_SUITE, "-cipher", TLS12_SUITE, "-groups", GROUPS,
               "-CAfile", files["ca"], "-verify_return_error", "-verify_hostname", "localhost"]
        try:
            run = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=15)
        except subprocess.TimeoutExpired:
            raise Failed(f"no {version} handshake in 15 s") from None
        out = run.stdout + run.stderr
        info = {}
        for line in out.splitlines():
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
        if info.get("Protocol version") != version or info.get("Ciphersuite") != suite \
                or info.get("Verification") != "OK":
            last = " | ".join(x for x in out.splitlines() if x.strip())[-300:]
            raise Failed(f"no {version} handshake with {suite} and a verified certificate: {last}")
        found.append(f"{version} {suite} {info.get('Server Temp Key', '?').split(',')[0]}")
    return ", ".join(found)


# ---------------------------------------------------------------- workloads


class Bench:
    def __init__(self, a, tmp, files, backend, backend_pid):
        self.a, self.tmp, self.files, self.backend = a, tmp, files, backend
        self.backend_pid = backend_pid
        conf = os.path.join(tmp, "client-openssl.cnf")
        with open(conf, "w") as f:
            f.write(CLIENT_OPENSSL_CONF)
        self.env = dict(os.environ, OPENSSL_CONF=conf)
        self.serial = 0

    def clients(self, proxy, mode, count, limit, *args):
        """count client processes, all connected ("ready"), then started together."""
        kids = []
        for i in range(count):
            self.serial += 1
            cmd = [sys.executable, "-c", CLIENT, mode, str(proxy.port), self.files["ca"],
                   str(int(limit)), *map(str, args)]
            kids.append(Child(self.tmp, f"client-{mode}-{self.serial}", cmd, pipes=True, env=self.env))
        try:
            for k in kids:
                if k.line(limit) != "ready":
                    raise Failed(f"{k.name} did not get ready{k.tail()}")
        except Exception:
            for k in kids:
                k.stop()
            raise
        return kids

    def run(self, proxy, mode, count, *args):
        """Runs count clients together; returns their results, the proxy's
        CPU seconds meanwhile, and how busy the backend (share of a core)
        and the machine (share of all cores) were."""
        secs = self.a.seconds
        kids = self.clients(proxy, mode, count, secs + 60, *args)
        try:
            cpu0, back0, (busy0, total0), t0 = (proxy.cpu(), cpu_seconds(self.backend_pid),
                                                machine_ticks(), time.monotonic())
            for k in kids:
                k.send("go\n")
            results = [json.loads(k.line(secs + 30)) for k in kids]
            cpu1, back1, (busy1, total1), t1 = (proxy.cpu(), cpu_seconds(self.backend_pid),
                                                machine_ticks(), time.monotonic())
        finally:
            for k in kids:
                k.stop()
        machine = (busy1 - busy0) / max(total1 - total0, 1)
        busy = f"backend {(back1 - back0) / (t1 - t0):.0%} of a core, machine {machine:.0%} busy"
        return results, cpu1 - cpu0, busy

    def bulk(self, proxy, direction):
        results, cpu, busy = self.run(proxy, direction, self.a.streams, self.a.seconds)
        nbytes = sum(r["bytes"] for r in results)
        if not nbytes:
            raise Failed(f"no bytes moved through {LABELS[proxy.kind]} ({direction})")
        gbps = sum(r["bytes"] / r["secs"] for r in results) * 8 / 1e9
        gib = nbytes / 2**30
        client_cpu = sum(r["cpu"] for r in results)
        secs = max(r["secs"] for r in results)
        each = client_cpu / secs / len(results)
        note = (f"{direction} {gbps:.2f} Gbit/s, proxy {cpu / gib:.3f} CPU s/GiB ({cpu / secs:.0%} of a core), "
                f"clients {client_cpu / gib:.3f} CPU s/GiB ({each:.0%} of a core each), "
                f"{busy}")
        return {"gbps": gbps, "cpu_s_per_gib": cpu / gib}, note

    def handshakes(self, proxy, version):
        results, cpu, busy = self.run(proxy, "handshakes", self.a.clients, version, self.a.seconds)
        n = sum(r["handshakes"] for r in results)
        errors = sum(r["errors"] for r in results)
        if not n:
            raise Failed(f"no TLS {version} handshake with {LABELS[proxy.kind]}: "
                         f"{next((r['last_error'] for r in results if r['last_error']), '')}")
        rate = sum(r["handshakes"] / r["secs"] for r in results)
        client_cpu = sum(r["cpu"] for r in results)
        note = (f"TLS {version} {rate:,.0f} handshakes/s, proxy {cpu / n * 1e3:.3f} CPU ms each, "
                f"clients {client_cpu / n * 1e3:.3f} CPU ms each, {busy}")
        if errors:
            note += f", {errors} failed ({next(r['last_error'] for r in results if r['last_error'])})"
        if errors > n / 100:
            raise Failed(f"{errors} of {n + errors} TLS {version} handshakes with "
                         f"{LABELS[proxy.kind]} failed")
        return {"per_s": rate, "cpu_ms": cpu / n * 1e3}, note

    def idle(self, proxy):
        # A few connections first, so what a proxy sets up once (threads,
        # tables, pools) is in the baseline, not in the per-connection cost.
        base = proxy.fds()
        warm = self.clients(proxy, "idle", 1, 60, 8)[0]
        warm.send("go\n")
        warm.line(30)
        warm.stop()
        wait_for(lambda: proxy.fds() <= base, 5)
        n = self.a.idle
        kid = self.clients(proxy, "idle", 1, 120 + n // 20, n)[0]
        try:
            time.sleep(0.5)
            fds0 = proxy.fds()
            rss0, pss0 = proxy.memory()
            kid.send("go\n")
            kid.line(60 + n // 20)
            # Every connection relayed: a descriptor for the client and one
            # for the backend.
            relayed = wait_for(lambda: proxy.fds() >= fds0 + 2 * n, 30)
            time.sleep(1)
            rss1, pss1 = proxy.memory()
            fds1 = proxy.fds()
            if not relayed:
                raise Failed(f"{LABELS[proxy.kind]} holds {fds1 - fds0} more descriptors for "
                             f"{n} idle connections, not {2 * n}: not all reached the backend")
        finally:
            kid.send("close\n")
            kid.stop()
        # Let the proxy close them before the next workload.
        wait_for(lambda: proxy.fds() <= fds0 + 8, 30)
        rss, pss = (rss1 - rss0) / n, (pss1 - pss0) / n
        note = (f"idle {n:,} connections: RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB, "
                f"{rss:.1f} KiB each; PSS {pss:.1f} KiB each; descriptors {fds0} -> {fds1}")
        return {"rss_kib": rss, "pss_kib": pss}, note


# ---------------------------------------------------------------- the run


def tunnel_binary(a):
    if a.tunnel:
        if not os.access(a.tunnel, os.X_OK) or os.path.isdir(a.tunnel):
            return None, f"--tunnel {a.tunnel}: not an executable file"
        return a.tunnel, None
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
    binary = os.path.join(target, "release", "tunnel")
    if not os.access(binary, os.X_OK):
        if not shutil.which("cargo"):
            return None, f"no {binary}, and no cargo to build it"
        log(f"building the tunnel: cargo build --release -p tunnel (target dir {target})")
        try:
            run = subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "tunnel"], cwd=ROOT,
                                 stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=1800)
        except subprocess.TimeoutExpired:
            return None, "cargo build --release -p tunnel took more than 30 minutes"
        if run.returncode != 0 or not os.access(binary, os.X_OK):
            return None, f"cargo build --release -p tunnel failed: {run.stderr.strip()[-300:]}"
    newest = max((os.stat(os.path.join(d, f)).st_mtime
                  for src in ("tunnel", "common") for d, _, fs in os.walk(os.path.join(ROOT, src, "src"))
                  for f in fs if f.endswith(".rs")), default=0)
    if newest > os.stat(binary).st_mtime:
        log(f"note: {binary} is older than the source; measuring it as it is "
            "(cargo build --release -p tunnel to measure the source)")
    return binary, None


def available(a, tmp, files, backend, maxconn):
    """The proxies that pass the handshake check, and a reason for each other one."""
    binary, why = tunnel_binary(a)
    usable, missing = [], {}
    for kind in a.proxies:
        if kind == "tunnel" and binary is None:
            missing[kind] = why
            continue
        if kind != "tunnel" and not shutil.which(kind):
            missing[kind] = f"{kind} is not installed (Debian: {INSTALL})"
            continue
        try:
            p = Proxy(kind, tmp, files, backend, (binary, shlex.split(a.tunnel_args)), maxconn, "check")
            try:
                found = handshake_check(p.port, files)
            finally:
                p.stop()
        except Failed as e:
            missing[kind] = str(e)
            continue
        what = binary if kind == "tunnel" else shutil.which(kind)
        if kind == "tunnel":
            built = time.strftime("%Y-%m-%d %H:%M", time.localtime(os.stat(binary).st_mtime))
            what += f" (built {built})"
        log(f"{LABELS[kind]:9} {what}: {found}")
        usable.append(kind)
    for kind, why in missing.items():
        log(f"{LABELS[kind]:9} not available: {why}")
    return usable, missing, binary


def one_round(bench, kinds, serial, maxconn, binary):
    """Every workload on every proxy, each workload on the proxies back to
    back; proxies started fresh for the round."""
    a = bench.a
    res = {k: {} for k in kinds}
    errors = {}
    proxies = {}
    for k in kinds:
        try:
            proxies[k] = Proxy(k, bench.tmp, bench.files, bench.backend,
                               (binary, shlex.split(a.tunnel_args)), maxconn, serial)
        except Failed as e:
            errors[k] = str(e)
            log(f"  {LABELS[k]:9} FAILED: {e}")
    workloads = []
    if a.idle:
        workloads.append(("idle", bench.idle, {"rss_kib": "idle_rss_kib", "pss_kib": "idle_pss_kib"}))
    for direction in ("upload", "download"):
        short = direction[:2] if direction == "upload" else "down"
        workloads.append((direction, lambda p, d=direction: bench.bulk(p, d),
                          {"gbps": f"{short}_gbps", "cpu_s_per_gib": f"{short}_cpu_s_per_gib"}))
    for version in ("1.3", "1.2"):
        tag = "hs" + version.replace(".", "")
        workloads.append((f"TLS {version} handshakes", lambda p, v=version: bench.handshakes(p, v),
                          {"per_s": f"{tag}_per_s", "cpu_ms": f"{tag}_cpu_ms"}))
    try:
        for _, work, keys in workloads:
            for k in kinds:
                if k not in proxies or k in errors:
                    continue
                try:
                    got, note = work(proxies[k])
                except Failed as e:
                    errors[k] = str(e)
                    if not proxies[k].child.alive():
                        errors[k] += f" (the proxy has exited{proxies[k].child.tail()})"
                    log(f"  {LABELS[k]:9} FAILED: {errors[k]}")
                    continue
                for key, value in got.items():
                    res[k][keys[key]] = value
                log(f"  {LABELS[k]:9} {note}")
    finally:
        for p in proxies.values():
            p.stop()
    return res, errors


def median_ratios(runs, kinds):
    """Per figure: the median over rounds of tunnel / best of the others."""
    out = {}
    others = [k for k in kinds if k != "tunnel"]
    for key, _, bigger, _ in FIGURES:
        ratios = []
        for run in runs:
            t = run.get("tunnel", {}).get(key)
            vals = [run[k][key] for k in others if run.get(k, {}).get(key) is not None]
            if t is None or not vals:
                continue
            best = max(vals) if bigger else min(vals)
            if best > 0:
                ratios.append(t / best)
        if ratios:
            out[key] = statistics.median(ratios)
    return out


def table(runs, kinds, missing, ratios):
    head = "| figure | " + " | ".join(LABELS[k] for k in PROXIES) + " | tunnel / best |"
    lines = [head, "|---|" + "---:|" * (len(PROXIES) + 1)]
    medians = {}
    for key, label, bigger, form in FIGURES:
        cells = []
        for k in PROXIES:
            vals = [run[k][key] for run in runs if run.get(k, {}).get(key) is not None]
            if vals:
                medians.setdefault(k, {})[key] = statistics.median(vals)
                cells.append(form.format(statistics.median(vals)))
            elif k in missing:
                cells.append("not available")
            elif k not in kinds:
                cells.append("not run")
            else:
                cells.append("failed")
        r = ratios.get(key)
        cells.append("-" if r is None else f"{r:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines), medians


def load_average():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


TMP_PREFIX = "tls-bench-"


def remove_stale_directories():
    """Temporary directories of runs that were killed (SIGKILL leaves no
    chance to clean up; their children died with them)."""
    base = tempfile.gettempdir()
    for entry in os.listdir(base):
        pid = entry[len(TMP_PREFIX):].split("-")[0]
        if entry.startswith(TMP_PREFIX) and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(os.path.join(base, entry), ignore_errors=True)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="See the top of this file for what is measured and how.")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 3)")
    ap.add_argument("--seconds", type=float, help="seconds per workload and proxy (default 5)")
    ap.add_argument("--tunnel", help="the tunnel binary (default: target/release/tunnel, built if missing)")
    ap.add_argument("--tunnel-args", default="", help="extra tunnel flags, e.g. '--log-level warn'")
    ap.add_argument("--streams", type=int, default=2,
                    help="parallel TLS streams for upload and download (default 2)")
    ap.add_argument("--clients", type=int, default=4, help="concurrent handshake clients (default 4)")
    ap.add_argument("--idle", type=int,
                    help="idle TLS connections for the memory figure (default 2000; 0 skips it)")
    ap.add_argument("--proxies", default=",".join(PROXIES),
                    help="which to run (default stunnel4,haproxy,tunnel)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke test: the defaults become 1 round, 1 s per workload, 200 idle connections")
    ap.add_argument("--keep", action="store_true",
                    help="keep the temporary directory (configurations and logs)")
    ap.add_argument("--json", help="also write the JSON result to this file")
    a = ap.parse_args()
    for name, usual, quick in (("rounds", 3, 1), ("seconds", 5, 1), ("idle", 2000, 200)):
        if getattr(a, name) is None:
            setattr(a, name, quick if a.quick else usual)
    a.proxies = [p.strip() for p in a.proxies.split(",") if p.strip()]
    unknown = [p for p in a.proxies if p not in PROXIES]
    if unknown:
        ap.error(f"--proxies: unknown {', '.join(unknown)}; choose from {', '.join(PROXIES)}")
    for name in ("rounds", "streams", "clients"):
        if getattr(a, name) < 1:
            ap.error(f"--{name} must be at least 1")
    if a.seconds <= 0 or a.idle < 0:
        ap.error("--seconds must be above 0 and --idle at least 0")
    return a


def main():
    a = parse_args()
    if not shutil.which("openssl"):
        sys.exit("tls.py: openssl is needed to make the certificate and check the handshakes "
                 "(Debian: apt-get install -y openssl)")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the proxies and clients
    if 2 * a.idle + 200 > hard:
        sys.exit(f"tls.py: --idle {a.idle} needs {2 * a.idle + 200} descriptors in a proxy; "
                 f"the open-files limit is {hard}: use --idle {(hard - 200) // 2} or less")
    maxconn = max(1000, min(20000, (hard - 200) // 2))  # HAProxy wants 2 descriptors per connection
    load = load_average()
    with open("/proc/sys/net/ipv4/tcp_tw_reuse") as f:
        if f.read().strip() == "0":
            log("note: net.ipv4.tcp_tw_reuse is 0, so the handshake clients may run out of local ports "
                "(connections in TIME_WAIT); sysctl -w net.ipv4.tcp_tw_reuse=2 allows reuse on loopback")
    if load > 0.5:
        log(f"note: the machine is busy before the start (load average {load:.2f} on "
            f"{os.cpu_count()} cores): the figures will be noisier than usual")

    remove_stale_directories()
    tmp = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-")
    failed = interrupted = keep = False

    def stopped(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    try:
        # Also when started with SIGINT ignored (a background job of a script).
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, stopped)
        files = make_certificate(tmp)
        backend_child = Child(tmp, "backend", [sys.executable, "-c", BACKEND], pipes=True)
        backend = int(backend_child.line(15))
        usable, missing, binary = available(a, tmp, files, backend, maxconn)
        if not usable:
            raise Failed("no proxy to measure: see the lines above")
        bench = Bench(a, tmp, files, backend, backend_child.pid)
        log(f"{a.rounds} round(s); {a.seconds:g} s per workload; {a.streams} streams; "
            f"{a.clients} handshake clients; {a.idle:,} idle connections")
        runs, errors = [], {}
        started = time.monotonic()
        for i in range(a.rounds):
            order = usable[i % len(usable):] + usable[:i % len(usable)]
            log(f"round {i + 1} of {a.rounds}: {', '.join(LABELS[k] for k in order)}")
            res, errs = one_round(bench, order, i + 1, maxconn, binary)
            runs.append(res)
            for k, e in errs.items():
                errors.setdefault(k, []).append(f"round {i + 1}: {e}")
        ratios = median_ratios(runs, usable)
        text, medians = table(runs, usable, missing, ratios)
        print(f"\nMedians over {a.rounds} round(s) of {a.seconds:g} s per workload "
              f"({a.streams} TLS streams, {a.clients} handshake clients, {a.idle:,} idle connections; "
              f"{time.monotonic() - started:.0f} s; load average {load:.1f} at the start, "
              f"{load_average():.1f} at the end on {os.cpu_count()} cores). tunnel / best: the median "
              "over rounds of the tunnel's figure divided by the better of stunnel4's and HAProxy's "
              "in the same round; above 1 is better for Gbit/s and handshakes/s, below 1 for CPU "
              "and KiB.\n")
        print(text)
        for k, why in missing.items():
            print(f"\n{LABELS[k]}: not available: {why}")
        for k, errs in errors.items():
            failed = keep = True  # the logs of the proxy say more
            for e in errs:
                print(f"\n{LABELS[k]} FAILED, {e}")
        out = {"rounds": a.rounds, "seconds": a.seconds, "streams": a.streams, "clients": a.clients,
               "idle": a.idle, "load_average": [load, load_average()], "median": medians,
               "tunnel_vs_best": ratios, "not_available": missing, "errors": errors, "runs": runs}
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1)
        print(json.dumps(out), flush=True)
    except Failed as e:
        failed = True
        log(f"tls.py: {e}")
    except KeyboardInterrupt as e:
        interrupted = True
        log(f"tls.py: stopped by {e or 'SIGINT'}")
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        stop_all()
        if a.keep or keep:
            log(f"configurations and logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(130 if interrupted else 1 if failed else 0)


if __name__ == "__main__":
    main()
