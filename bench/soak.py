#!/usr/bin/env python3
"""Soak: minutes of mixed traffic through the development fabric and the
tunnel; every process's memory and descriptors must stay flat and no
transfer may be lost or corrupted. Not run in CI.

Builds the release binaries (cargo build --release --workspace --bins, into
$CARGO_TARGET_DIR or target/) and starts, all on loopback:

  - the fabric: `deploy run DEFINITION --programs <target>/release` on a
    definition of its own: echo-server x3, square-server x2 and a tunnel
    role x2 (settings host/port) whose target is an echo backend of this
    script; internal endpoints on free ports, so nothing listens beyond
    127.0.0.1;
  - a standalone `tunnel --config FILE --admin ADDR` with two routes, to an
    echo backend and to a bulk backend (sends, takes in or resets a known
    pattern on request); 127.0.0.2 is denied everywhere, 127.0.0.3 on the
    echo route only;
  - the backends, in a Python process of their own.

Then, for a warm-up (default 20 s, no kills) and for the run itself (default
10 minutes), about twenty client threads at once:

  bulk     4 MiB (--bulk-mib) downloads, uploads and echoes through the
           tunnel and through the fabric's tunnel role, each checked end to
           end with SHA-256 (echoes end with a half-close both ways);
  churn    short connections: an echo-server session (greeting and menu,
           `1` answers `Current date: YYYY-MM-DD`, `9` says goodbye),
           square-server batches checked for exact squares (some of 1,000
           digits), a line echoed through each tunnel;
  resets   clients that reset (SO_LINGER 0) mid-transfer, to every service,
           and a backend that resets mid-download; expected failures,
           counted on their own;
  refused  clients from denied addresses (the client socket bound to
           127.0.0.2 or .3): closed without one byte; 127.0.0.3 must still
           get through the route that does not deny it;
  reloads  SIGHUP to the tunnel every 3 s (--reload-every), alternating two
           equivalent configurations (route order, an extra route); each
           must take effect (the extra route's listener comes and goes);
  kills    every 20 s (--kill-every), SIGKILL to one fabric instance in
           turn, never the first of a role (those live the whole run, so
           their memory shows a leak); the fabric must start it again.

A failure of a fabric connection that was open while an instance of its role
was being killed is "interrupted by kill"; any other failure is "lost" (a
truncated reply, 30 s without progress, a refused or reset new connection);
a wrong byte is "corrupted". Warm-up transfers count too.

RSS (VmRSS) and open descriptors (/proc/PID/fd) of every process (deploy,
each instance, the tunnel) are sampled every 30 s, and with no traffic at
the start (after the warm-up) and at the end (after the run, once the
descriptor counts have stopped moving): there the least of five reads, so a
passing health-check socket does not count. Pipes whose two ends the
process holds are the relay's splice pool (up to 64 empty pipes per thread,
kept for reuse; its size follows past concurrency), so they are counted
apart from the other descriptors.

The verdict (exit status 1 unless all hold):
  flat     every process ends with RSS <= start + max(10 %, 2 MiB),
           descriptors (but the pool) <= start + 4, and a pool no larger
           than at the start or 64 pipes per thread (a restarted instance
           is compared with its slot's start: it can only be smaller);
  no loss  zero lost and zero corrupted transfers; resets passed on as
           resets both ways (a reply cut by a reset must not arrive as a
           clean close); no panic in any log;
  control  every reload took effect, every killed instance came back, and
           nothing was left running after SIGTERM to deploy and the tunnel.

Prints tables (processes, samples, transfers, events); the last line is JSON.

    python3 bench/soak.py                 # 10 minutes (about 11 in all, plus the build)
    python3 bench/soak.py --seconds 60    # a quick look
    python3 bench/soak.py --minutes 30 --keep   # keep the logs (path printed)

Logs are kept (and their directory printed) when the verdict fails.
Python 3 standard library only; Linux (reads /proc).
"""
import argparse
import collections
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP = tempfile.mkdtemp(prefix="soak-bench-")
# Every process this run starts carries this in its environment, so anything
# left behind can be found (and is killed) whatever happened.
TOKEN_VAR = "SOAK_BENCH_RUN"
TOKEN = uuid.uuid4().hex
IO_TIMEOUT = 30  # seconds a socket operation may take before the transfer counts as lost
RSS_SLACK = (0.10, 2048)  # (fraction, KiB): allowed RSS growth is the larger
FD_SLACK = 4
POOL_PER_THREAD = 64  # tunnel/src/relay/splice.rs POOL_MAX
SEED = 0x50AC
BLOCK_SIZE = 1 << 20


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the known pattern

BLOCK = random.Random(SEED).randbytes(BLOCK_SIZE)


def pattern(offset, n):
    """n bytes of the repeating random block, from offset (both sides know it)."""
    out = bytearray()
    pos = offset % BLOCK_SIZE
    while len(out) < n:
        take = min(n - len(out), BLOCK_SIZE - pos)
        out += BLOCK[pos:pos + take]
        pos = 0
    return bytes(out)


# ---------------------------------------------------------------- backends (a process of their own)

BACKEND = r"""
import hashlib, json, random, socket, socketserver, struct, sys, threading
BLOCK = random.Random(int(sys.argv[3])).randbytes(1 << 20)

def pattern(offset, n):
    out = bytearray(); pos = offset % len(BLOCK)
    while len(out) < n:
        take = min(n - len(out), len(BLOCK) - pos); out += BLOCK[pos:pos + take]; pos = 0
    return bytes(out)

lock = threading.Lock()
stats = {"sink_ok": 0, "sink_cut_by_reset": 0, "sink_cut_by_close": 0, "resets_sent": 0}
def count(key):
    with lock: stats[key] += 1

class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        s = self.request; s.settimeout(120)
        try:
            while True:
                d = s.recv(262144)
                if not d: break
                s.sendall(d)
        except OSError: pass

class Bulk(socketserver.BaseRequestHandler):
    # One command line: SOURCE OFF N (send N pattern bytes, close), SINK N
    # (take N bytes, answer their SHA-256), RESET OFF N (send half of N,
    # then reset), STATS (what SINK saw when cut short).
    def handle(self):
        s = self.request; s.settimeout(120)
        try:
            line = b""
            while not line.endswith(b"\n") and len(line) < 200:
                d = s.recv(1)
                if not d: return
                line += d
            cmd, *args = line.decode().split()
            if cmd == "SOURCE":
                s.sendall(pattern(int(args[0]), int(args[1])))
            elif cmd == "RESET":
                s.sendall(pattern(int(args[0]), int(args[1]) // 2))
                # Closed here: the server's own close would send a FIN first.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
                count("resets_sent")
            elif cmd == "SINK":
                n = int(args[0]); h = hashlib.sha256(); got = 0
                try:
                    while got < n:
                        d = s.recv(min(262144, n - got))
                        if not d:
                            count("sink_cut_by_close"); return
                        h.update(d); got += len(d)
                except ConnectionResetError:
                    count("sink_cut_by_reset"); return
                count("sink_ok")
                s.sendall(h.hexdigest().encode() + b"\n")
            elif cmd == "STATS":
                with lock: s.sendall(json.dumps(stats).encode() + b"\n")
        except OSError: pass

class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

for port, handler in ((int(sys.argv[1]), Echo), (int(sys.argv[2]), Bulk)):
    threading.Thread(target=Server(("127.0.0.1", port), handler).serve_forever, daemon=True).start()
threading.Event().wait()
"""


# ---------------------------------------------------------------- processes


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def listening(port):
    """Whether something listens on 127.0.0.1:port (from /proc/net/tcp, so
    asking does not make a connection)."""
    want = {f"0100007F:{port:04X}", f"00000000:{port:04X}"}
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] in want and fields[3] == "0A":
                return True
    return False


def wait_for(check, seconds, step=0.05):
    end = time.monotonic() + seconds
    while not check():
        if time.monotonic() > end:
            return False
        time.sleep(step)
    return True


def spawn(name, cmd, env):
    out = open(os.path.join(TMP, f"{name}.log"), "w")
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)


class Reading(collections.namedtuple("Reading", "pid rss fds pool threads")):
    """One process at one time: VmRSS in KiB; open descriptors apart from
    the splice pool; the pool, in pipes whose two ends the process holds
    (the relay keeps up to 64 empty ones per thread for reuse); threads."""


def read_status(pid):
    """A Reading of pid, or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        pipes = collections.Counter()
        total = 0
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except FileNotFoundError:
                continue  # closed meanwhile
            total += 1
            if link.startswith("pipe:"):
                pipes[link] += 1
    except (FileNotFoundError, ProcessLookupError):
        return None
    if "VmRSS" not in status:
        return None  # a zombie
    pool = sum(1 for n in pipes.values() if n == 2)
    return Reading(pid, int(status["VmRSS"].split()[0]), total - 2 * pool, pool, int(status["Threads"]))


def proc_state(pid):
    """The process's state letter (R, S, Z, ...), or None once reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def children(pid):
    kids = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return kids
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids.update(int(x) for x in f.read().split())
        except OSError:
            pass
    return kids


def environ(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return dict(e.partition(b"=")[::2] for e in f.read().split(b"\0") if e)
    except OSError:
        return {}


INSTANCE_KEYS = (b"ECHO_SERVER_INSTANCE", b"SQUARE_SERVER_INSTANCE", b"TUNNEL_INSTANCE")


def instances(deploy_pid):
    """{instance id: pid} of the fabric's live instances (children of deploy
    that have exec'd, i.e. carry their <PREFIX>_INSTANCE)."""
    found = {}
    for pid in children(deploy_pid):
        if proc_state(pid) in (None, "Z"):
            continue
        env = environ(pid)
        for key in INSTANCE_KEYS:
            if key in env:
                found[env[key].decode()] = pid
    return found


def ours():
    """Pids of every process that carries this run's token."""
    found = []
    needle = f"{TOKEN_VAR}={TOKEN}".encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                pass
    return found


def comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def terminate(p, grace):
    """SIGTERM, then SIGKILL to the process group after grace seconds;
    returns (exit status, seconds it took, whether it had to be killed)."""
    if p is None:
        return None, 0.0, False
    t0 = time.monotonic()
    if p.poll() is None:
        try:
            p.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        p.wait(grace)
        return p.returncode, time.monotonic() - t0, False
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
        return p.returncode, time.monotonic() - t0, True


def kill_leftovers():
    """SIGKILL to everything still carrying the token; returns what it found."""
    found = [(pid, comm(pid)) for pid in ours()]
    for pid, _ in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return found


# ---------------------------------------------------------------- setup


def build():
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
    log(f"building the release binaries (target dir {target})")
    subprocess.run(["cargo", "build", "--release", "--quiet", "--workspace", "--bins"], cwd=ROOT, check=True)
    bindir = os.path.join(target, "release")
    for name in ("deploy", "tunnel", "echo-server", "square-server"):
        if not os.access(os.path.join(bindir, name), os.X_OK):
            sys.exit(f"soak.py: no {name} binary in {bindir}; the build did not make it")
    return bindir


DEFINITION = """\
# Written by bench/soak.py: the fabric under soak, on loopback only.
name: soak
roles:
  - name: echo-server
    program: echo-server
    instances: 3
    endpoints:
      - name: EchoEndpoint
        visibility: internal
        port: {echo}
  - name: square-server
    program: square-server
    instances: 2
    endpoints:
      - name: SquareEndpoint
        visibility: internal
        port: {square}
  - name: tunnel
    program: tunnel
    instances: 2
    endpoints:
      - name: Incoming
        visibility: internal
        port: {tunnel}
    settings:
      host: 127.0.0.1
      port: {backend}
"""


def tunnel_config(ports, extra):
    """The standalone tunnel's configuration. With extra, the routes come in
    another order and a third route listens: equivalent for the traffic,
    and the third route's listener shows that a reload took effect."""
    echo = (f"  - name: echo\n    listen: 127.0.0.1:{ports['t_echo']}\n"
            f"    target: 127.0.0.1:{ports['b_echo']}\n    deny: [127.0.0.3/32]\n")
    bulk = f"  - name: bulk\n    listen: 127.0.0.1:{ports['t_bulk']}\n    target: 127.0.0.1:{ports['b_bulk']}\n"
    more = f"  - name: extra\n    listen: 127.0.0.1:{ports['t_extra']}\n    target: 127.0.0.1:{ports['b_echo']}\n"
    routes = bulk + echo + more if extra else echo + bulk
    return (f"# Written by bench/soak.py ({'with' if extra else 'without'} the extra route).\n"
            f"deny: [127.0.0.2/32]\nidle_timeout: 5m\nshutdown_grace: 10s\n"
            f"access_log: {os.path.join(TMP, 'access.log')}\nroutes:\n{routes}")


def write_atomically(path, text):
    with open(path + ".new", "w") as f:
        f.write(text)
    os.replace(path + ".new", path)


# ---------------------------------------------------------------- counting


class Corrupt(Exception):
    """A wrong byte: the transfer arrived, but not as sent."""


class Short(Exception):
    """The peer closed early, or a reply was not what the protocol says
    comes next (a truncated or missing answer, not a wrong one)."""


OUTCOMES = ("ok", "expected", "reset_as_close", "interrupted", "corrupted", "lost")


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {}
        self.examples = {}

    def record(self, kind, outcome, detail=None):
        with self.lock:
            c = self.counts.setdefault(kind, dict.fromkeys(OUTCOMES, 0))
            c[outcome] += 1
            if detail and outcome not in ("ok", "expected", "interrupted"):
                ex = self.examples.setdefault((kind, outcome), [])
                if len(ex) < 3:
                    ex.append(f"{time.strftime('%H:%M:%S')} {detail}")

    def total(self, outcome):
        with self.lock:
            return sum(c[outcome] for c in self.counts.values())


class Kills:
    """When each kill happened: (role, from the signal, to the process being
    dead). A failure that overlaps a kill of its role is not held against
    the fabric."""

    def __init__(self):
        self.lock = threading.Lock()
        self.windows = []

    def begin(self, role):
        """Opens a window before the signal (a client may see the kill
        before the killer thread runs again); returns its index."""
        with self.lock:
            self.windows.append((role, time.monotonic(), float("inf")))
            return len(self.windows) - 1

    def end(self, index):
        with self.lock:
            role, start, _ = self.windows[index]
            self.windows[index] = (role, start, time.monotonic())

    def overlaps(self, role, start, end):
        with self.lock:
            return any(r == role and s <= end and start <= e for r, s, e in self.windows)


# ---------------------------------------------------------------- clients


def connect(port, source=None):
    s = socket.socket()
    s.settimeout(IO_TIMEOUT)
    if source:
        s.bind((source, 0))
    try:
        s.connect(("127.0.0.1", port))
    except BaseException:
        s.close()
        raise
    return s


def reset(s):
    """Close with SO_LINGER 0: the peer gets a reset, not a FIN."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def recv_until(s, marker, limit=8192):
    buf = b""
    while marker not in buf:
        d = s.recv(4096)
        if not d:
            raise Short(f"closed after {len(buf)} bytes, before {marker!r}: {buf[-80:]!r}")
        buf += d
        if len(buf) > limit:
            raise Corrupt(f"no {marker!r} in {len(buf)} bytes: {buf[:80]!r}")
    return buf


def recv_all(s, limit):
    """Everything until the peer closes (at most limit + 1 bytes)."""
    buf = bytearray()
    while len(buf) <= limit:
        d = s.recv(min(262144, limit + 1 - len(buf)))
        if not d:
            break
        buf += d
    return bytes(buf)


def expect_close(s):
    d = s.recv(4096)
    if d:
        raise Corrupt(f"{len(d)} unexpected bytes before the close: {d[:60]!r}")


ECHO_GREETING = b"Welcome to the date/time service on "
ECHO_MENU = b"  1  current date\r\n  2  current time\r\n  9  quit\r\n"
ECHO_PROMPT = b"Your choice: "
DATE_LINE = re.compile(rb"^Current date: \d{4}-\d{2}-\d{2}\r\nYour choice: $")


def echo_session(port):
    with connect(port) as s:
        hello = recv_until(s, ECHO_PROMPT)
        if not hello.startswith(ECHO_GREETING) or ECHO_MENU not in hello:
            raise Corrupt(f"greeting {hello[:100]!r}")
        s.sendall(b"1\r\n")
        answer = recv_until(s, ECHO_PROMPT)
        if not DATE_LINE.match(answer):
            raise Corrupt(f"answer to 1: {answer!r}")
        s.sendall(b"9\r\n")
        bye = recv_all(s, 4096)
        if bye != b"Goodbye.\r\n":
            raise (Short if b"Goodbye.\r\n".startswith(bye) else Corrupt)(f"answer to 9: {bye!r}")


def square_numbers(rng):
    numbers = [rng.randrange(-10**12, 10**12) for _ in range(rng.randrange(1, 200))]
    if rng.random() < 0.3:
        for _ in range(rng.randrange(1, 4)):
            numbers.insert(rng.randrange(len(numbers) + 1), rng.randrange(10**999, 10**1000))
    return numbers


def square_batch(port, rng):
    numbers = square_numbers(rng)
    want = b"".join(str(n * n).encode() + b"\n" for n in numbers)
    with connect(port) as s:
        s.sendall(b"".join(str(n).encode() + b"\n" for n in numbers))
        s.shutdown(socket.SHUT_WR)
        got = recv_all(s, len(want))
    if got != want:
        if len(got) < len(want) and want.startswith(got):
            raise Short(f"{len(got)} of {len(want)} bytes of squares, then the close")
        lines, wanted = got.split(b"\n"), want.split(b"\n")
        first = next((i for i, (x, y) in enumerate(zip(lines, wanted)) if x != y), min(len(lines), len(wanted)) - 1)
        raise Corrupt(f"square {first + 1} of {len(numbers)}: got {lines[first][:60]!r}, {len(got)} bytes in all")


def line_echo(port, rng):
    line = rng.randbytes(rng.randrange(1, 200)).hex().encode() + b"\n"
    with connect(port) as s:
        s.sendall(line)
        got = b""
        while len(got) < len(line):
            d = s.recv(4096)
            if not d:
                raise Short(f"closed after {len(got)} of {len(line)} bytes")
            got += d
        if got != line:
            raise Corrupt(f"sent {line[:40]!r}..., got {got[:40]!r}...")
        s.shutdown(socket.SHUT_WR)
        expect_close(s)


def bulk_source(port, rng, n):
    off = rng.randrange(BLOCK_SIZE)
    want = hashlib.sha256(pattern(off, n)).digest()
    with connect(port) as s:
        s.sendall(f"SOURCE {off} {n}\n".encode())
        h, got = hashlib.sha256(), 0
        while True:
            d = s.recv(262144)
            if not d:
                break
            h.update(d)
            got += len(d)
    if got < n:
        raise Short(f"{got} of {n} bytes, then a clean close")
    if got > n or h.digest() != want:
        raise Corrupt(f"{got} bytes of {n}, SHA-256 differs")


def bulk_sink(port, rng, n):
    data = pattern(rng.randrange(BLOCK_SIZE), n)
    with connect(port) as s:
        s.sendall(f"SINK {n}\n".encode())
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        answer = recv_all(s, 200)
    if not answer.endswith(b"\n"):
        raise Short(f"no digest, got {answer!r}")
    if answer.strip().decode(errors="replace") != hashlib.sha256(data).hexdigest():
        raise Corrupt("the backend's SHA-256 of the upload differs")


def bulk_echo(port, rng, n):
    """Sends n bytes while reading them back, then half-closes; the echo
    backend half-closes in turn, through the relay."""
    data = pattern(rng.randrange(BLOCK_SIZE), n)
    failure = []
    with connect(port) as s:
        def send():
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
            except OSError as e:
                failure.append(e)
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        h, got = hashlib.sha256(), 0
        try:
            while got <= n:
                d = s.recv(262144)
                if not d:
                    break
                h.update(d)
                got += len(d)
        finally:
            sender.join(IO_TIMEOUT)
    if failure:
        raise failure[0]
    if got < n:
        raise Short(f"{got} of {n} bytes echoed, then a clean close")
    if got > n or h.digest() != hashlib.sha256(data).digest():
        raise Corrupt(f"{got} bytes echoed of {n}, SHA-256 differs")


def refused(port, source, request):
    """A denied client: the connection is accepted and closed without a byte."""
    with connect(port, source) as s:
        try:
            s.sendall(request)
            d = s.recv(4096)
        except (ConnectionResetError, BrokenPipeError):
            return
        if d:
            raise Corrupt(f"denied client {source} got {len(d)} bytes: {d[:40]!r}")


def backend_reset(port, rng, n):
    """The backend sends half of n and resets: the client must see a reset,
    and the bytes before it must be right."""
    off = rng.randrange(BLOCK_SIZE)
    with connect(port) as s:
        s.sendall(f"RESET {off} {n}\n".encode())
        got = bytearray()
        try:
            while len(got) <= n:
                d = s.recv(262144)
                if not d:
                    break
                got += d
        except ConnectionResetError:
            outcome = "expected"
        else:
            outcome = "reset_as_close"
    if bytes(got) != pattern(off, len(got)):
        raise Corrupt(f"the {len(got)} bytes before the reset differ from what was sent")
    if len(got) > n // 2:
        raise Corrupt(f"{len(got)} bytes, the backend sent {n // 2}")
    return outcome


def reset_sink(port, rng, n):
    s = connect(port)
    try:
        s.sendall(f"SINK {n}\n".encode() + pattern(rng.randrange(BLOCK_SIZE), n // 4))
    finally:
        reset(s)
    return "expected"


def reset_echo_stream(port, rng):
    s = connect(port)
    try:
        s.sendall(pattern(rng.randrange(BLOCK_SIZE), 256 * 1024))
        if not s.recv(65536):
            raise Short("closed before echoing a byte")
    finally:
        reset(s)
    return "expected"


def reset_square(port, rng):
    s = connect(port)
    try:
        s.sendall(b"".join(str(rng.randrange(10**9)).encode() + b"\n" for _ in range(2000)))
        if not s.recv(4096):
            raise Short("closed before answering")
    finally:
        reset(s)
    return "expected"


def reset_echo_session(port):
    s = connect(port)
    try:
        recv_until(s, ECHO_PROMPT)
        s.sendall(b"1\r\n")
    finally:
        reset(s)
    return "expected"


# ---------------------------------------------------------------- the run


class Soak:
    def __init__(self, args, bindir):
        self.args = args
        self.bindir = bindir
        self.env = dict(os.environ, **{TOKEN_VAR: TOKEN})
        self.ports = {k: free_port() for k in ("b_echo", "b_bulk", "f_echo", "f_square", "f_tunnel",
                                               "t_echo", "t_bulk", "t_extra", "t_admin")}
        self.stats = Stats()
        self.kills = Kills()
        self.backend = self.deploy = self.tunnel = None
        self.config = os.path.join(TMP, "tunnel.yaml")
        self.extra_route = False
        self.events = {"reloads_sent": 0, "reloads_applied": 0, "reloads_not_applied": [],
                       "kills_sent": 0, "kills_restarted": 0, "kills_not_restarted": [],
                       "killed": {}, "kill_log": [], "stuck_threads": [], "script_errors": 0}
        self.events_lock = threading.Lock()
        self.samples = []  # (seconds since start, {process: Reading})
        self.t0 = time.monotonic()

    # -- processes

    def start(self):
        p = self.ports
        self.backend = spawn("backends", [sys.executable, "-c", BACKEND, str(p["b_echo"]), str(p["b_bulk"]),
                                          str(SEED)], self.env)
        if not wait_for(lambda: listening(p["b_echo"]) and listening(p["b_bulk"]), 20):
            raise RuntimeError(f"the backends did not listen; see {TMP}/backends.log")

        definition = os.path.join(TMP, "soak.yaml")
        with open(definition, "w") as f:
            f.write(DEFINITION.format(echo=p["f_echo"], square=p["f_square"], tunnel=p["f_tunnel"],
                                      backend=p["b_echo"]))
        log(f"starting the fabric: deploy run {definition}")
        self.deploy = spawn("deploy", [os.path.join(self.bindir, "deploy"), "run", definition,
                                       "--programs", self.bindir], self.env)

        write_atomically(self.config, tunnel_config(p, False))
        log(f"starting the tunnel: tunnel --config {self.config} --admin 127.0.0.1:{p['t_admin']}")
        self.tunnel = spawn("tunnel", [os.path.join(self.bindir, "tunnel"), "--config", self.config,
                                       "--admin", f"127.0.0.1:{p['t_admin']}"], self.env)

        def up():
            for proc, name in ((self.deploy, "deploy"), (self.tunnel, "tunnel")):
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}; see {TMP}/{name}.log")
            return (len(instances(self.deploy.pid)) == 7
                    and all(listening(p[k]) for k in ("f_echo", "f_square", "f_tunnel", "t_echo",
                                                      "t_bulk", "t_admin")))
        if not wait_for(up, 60, 0.1):
            raise RuntimeError(f"the fabric or the tunnel did not come up in 60 s; see {TMP}")
        # The balancers open once every instance listens; until then
        # clients wait in the backlog. One of each exchange, with patience.
        rng = random.Random(1)
        for what, probe in (("echo-server", lambda: echo_session(p["f_echo"])),
                            ("square-server", lambda: square_batch(p["f_square"], rng)),
                            ("fabric tunnel", lambda: line_echo(p["f_tunnel"], rng)),
                            ("tunnel", lambda: line_echo(p["t_echo"], rng))):
            end = time.monotonic() + 60
            while True:
                try:
                    probe()
                    break
                except (OSError, Short, Corrupt) as e:
                    if time.monotonic() > end:
                        raise RuntimeError(f"{what} does not answer: {e}; see {TMP}")
                    time.sleep(0.5)

    def processes(self):
        """{name: pid} of every process under test."""
        procs = {"deploy run": self.deploy.pid}
        procs.update(sorted(instances(self.deploy.pid).items()))
        procs["tunnel (standalone)"] = self.tunnel.pid
        return procs

    def sample(self, reads=1):
        """{name: Reading}; with reads > 1 the least of each figure over
        that many reads 0.2 s apart (a passing socket or page is not a leak)."""
        best = {}
        for i in range(reads):
            if i:
                time.sleep(0.2)
            for name, pid in self.processes().items():
                r = read_status(pid)
                if r is None:
                    continue
                old = best.get(name)
                best[name] = r if old is None or old.pid != pid else Reading(*map(min, zip(old, r)))
        return best

    def settle(self, seconds=30):
        """Waits until no process's descriptor count has moved for 3 s (the
        connections have closed), at most `seconds`."""
        end = time.monotonic() + seconds
        last, since = None, time.monotonic()
        while time.monotonic() < end:
            now = {k: (v.fds, v.pool) for k, v in self.sample(3).items()}
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= 3:
                return True
            time.sleep(0.5)
        return False

    # -- traffic

    def attempt(self, kind, role, fn):
        start = time.monotonic()
        try:
            outcome, detail = fn() or "ok", None
        except Corrupt as e:
            outcome, detail = "corrupted", str(e)
        except (OSError, Short) as e:
            interrupted = role and self.kills.overlaps(role, start, time.monotonic())
            outcome, detail = ("interrupted" if interrupted else "lost"), f"{type(e).__name__}: {e}"
        self.stats.record(kind, outcome, detail)

    def jobs(self):
        """(name, function called in a loop until stop) for every client thread."""
        p, mib = self.ports, self.args.bulk_mib << 20

        def rotate(*steps):
            state = {"i": 0}

            def step(rng):
                steps[state["i"] % len(steps)](rng)
                state["i"] += 1
            return step

        a = self.attempt
        jobs = [
            ("bulk tunnel", rotate(
                lambda r: a("bulk: download via tunnel", None, lambda: bulk_source(p["t_bulk"], r, mib)),
                lambda r: a("bulk: upload via tunnel", None, lambda: bulk_sink(p["t_bulk"], r, mib)))),
            ("bulk tunnel echo", lambda r: a("bulk: echo via tunnel", None,
                                             lambda: bulk_echo(p["t_echo"], r, mib))),
            ("bulk fabric echo", lambda r: a("bulk: echo via fabric tunnel", "tunnel",
                                             lambda: bulk_echo(p["f_tunnel"], r, mib))),
            ("resets", rotate(
                lambda r: a("reset: client, upload via tunnel", None, lambda: reset_sink(p["t_bulk"], r, mib)),
                lambda r: a("reset: backend, download via tunnel", None,
                            lambda: backend_reset(p["t_bulk"], r, mib)),
                lambda r: a("reset: client, echo via fabric tunnel", "tunnel",
                            lambda: reset_echo_stream(p["f_tunnel"], r)),
                lambda r: a("reset: client, square-server", "square-server",
                            lambda: reset_square(p["f_square"], r)),
                lambda r: a("reset: client, echo-server", "echo-server",
                            lambda: reset_echo_session(p["f_echo"])),
                lambda r: a("reset: client, echo via tunnel", None, lambda: reset_echo_stream(p["t_echo"], r)))),
            ("refused", rotate(
                lambda r: a("refused: 127.0.0.2, tunnel echo", None,
                            lambda: refused(p["t_echo"], "127.0.0.2", b"hello\n")),
                lambda r: a("refused: 127.0.0.2, tunnel bulk", None,
                            lambda: refused(p["t_bulk"], "127.0.0.2", b"SOURCE 0 1000\n")),
                lambda r: a("refused: 127.0.0.3, tunnel echo", None,
                            lambda: refused(p["t_echo"], "127.0.0.3", b"hello\n")),
                lambda r: a("allowed: 127.0.0.3, tunnel bulk", None,
                            lambda: bulk_source_from(p["t_bulk"], "127.0.0.3", r)))),
        ]
        for i in range(3):
            jobs.append((f"churn echo-server {i}", lambda r: a("churn: echo-server session", "echo-server",
                                                               lambda: echo_session(p["f_echo"]))))
        for i in range(2):
            jobs.append((f"churn square-server {i}", lambda r: a("churn: square-server batch", "square-server",
                                                                 lambda: square_batch(p["f_square"], r))))
        jobs.append(("churn tunnel", lambda r: a("churn: line via tunnel", None, lambda: line_echo(p["t_echo"], r))))
        jobs.append(("churn fabric tunnel", lambda r: a("churn: line via fabric tunnel", "tunnel",
                                                        lambda: line_echo(p["f_tunnel"], r))))
        return jobs

    def reloader(self, stop):
        port = self.ports["t_extra"]
        while not stop.wait(self.args.reload_every):
            self.extra_route = not self.extra_route
            write_atomically(self.config, tunnel_config(self.ports, self.extra_route))
            os.kill(self.tunnel.pid, signal.SIGHUP)
            applied = wait_for(lambda: listening(port) == self.extra_route, 10)
            with self.events_lock:
                self.events["reloads_sent"] += 1
                if applied:
                    self.events["reloads_applied"] += 1
                else:
                    self.events["reloads_not_applied"].append(
                        f"{time.strftime('%H:%M:%S')}: the extra route's listener did not "
                        f"{'open' if self.extra_route else 'close'} within 10 s")

    def killer(self, stop):
        """SIGKILLs one instance in turn (never the first of a role) and
        waits for the fabric to start it again."""
        turn = 0
        while not stop.wait(self.args.kill_every):
            live = instances(self.deploy.pid)
            victims = sorted(i for i in live if not i.endswith("_IN_0"))
            if not victims:
                continue
            victim = victims[turn % len(victims)]
            turn += 1
            pid, role = live[victim], victim.rsplit("_IN_", 1)[0]
            sent, window = time.time(), self.kills.begin(role)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                self.kills.end(window)
                continue
            wait_for(lambda: proc_state(pid) in (None, "Z"), 10, 0.002)
            self.kills.end(window)
            back = wait_for(lambda: instances(self.deploy.pid).get(victim, pid) != pid, 30, 0.05)
            with self.events_lock:
                self.events["kills_sent"] += 1
                self.events["killed"][victim] = self.events["killed"].get(victim, 0) + 1
                self.events["kill_log"].append(f"{time.strftime('%H:%M:%S', time.localtime(sent))} {victim} "
                                               f"(pid {pid}){'' if back else ', not started again'}")
                if back:
                    self.events["kills_restarted"] += 1
                else:
                    self.events["kills_not_restarted"].append(f"{time.strftime('%H:%M:%S')}: {victim} (pid {pid})")

    def sampler(self, stop):
        while not stop.wait(self.args.sample_every):
            self.samples.append((time.monotonic() - self.t0, self.sample()))

    def traffic(self, seconds, measured, phase):
        """Runs every client, the reloads and (when measured) the kills and
        samples for `seconds`, then stops them and waits for them."""
        stop = threading.Event()
        threads = []

        def loop(name, job, seed):
            rng = random.Random(seed)
            while not stop.is_set():
                try:
                    job(rng)
                except Exception:  # a bug of this script, not of the services
                    log(f"soak.py: client thread {name} failed:\n{traceback.format_exc()}")
                    with self.events_lock:
                        self.events["script_errors"] += 1
                    stop.wait(1)
                stop.wait(self.args.pause / 1000)

        for n, (name, job) in enumerate(self.jobs()):
            threads.append(threading.Thread(target=loop, args=(name, job, f"{phase}/{n}"),
                                            name=name, daemon=True))
        threads.append(threading.Thread(target=self.reloader, args=(stop,), name="reloads", daemon=True))
        if measured:
            threads.append(threading.Thread(target=self.sampler, args=(stop,), name="samples", daemon=True))
            threads.append(threading.Thread(target=self.killer, args=(stop,), name="kills", daemon=True))
        for t in threads:
            t.start()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(min(1.0, max(0.0, end - time.monotonic())))
            for proc, name in ((self.deploy, "deploy"), (self.tunnel, "tunnel")):
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} during the {phase}; see {TMP}/{name}.log")
        stop.set()
        # Every wait in a client is bounded by IO_TIMEOUT; a thread still
        # running well after that is stuck.
        deadline = time.monotonic() + 2 * IO_TIMEOUT + 15
        for t in threads:
            t.join(max(0.1, deadline - time.monotonic()))
            if t.is_alive():
                self.events["stuck_threads"].append(f"{phase}: {t.name}")


def bulk_source_from(port, source, rng):
    off = rng.randrange(BLOCK_SIZE)
    n = 64 * 1024
    with connect(port, source) as s:
        s.sendall(f"SOURCE {off} {n}\n".encode())
        got = recv_all(s, n)
    if len(got) < n:
        raise Short(f"{len(got)} of {n} bytes, then a clean close")
    if got != pattern(off, n):
        raise Corrupt(f"{len(got)} bytes, not the pattern")


# ---------------------------------------------------------------- report


def mib(kib):
    return "-" if kib is None else f"{kib / 1024:.1f}"


def allowed_growth(start_kib):
    return max(RSS_SLACK[0] * start_kib, RSS_SLACK[1])


def short_name(name):
    return (name.replace("echo-server_IN_", "echo/").replace("square-server_IN_", "square/")
            .replace("tunnel_IN_", "tun/").replace("tunnel (standalone)", "tunnel").replace("deploy run", "deploy"))


def http_get(port, path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("GET", path)
        return c.getresponse().read().decode(errors="replace")
    finally:
        c.close()


def log_findings(path):
    """(panics, ERROR lines, WARN lines) in one log."""
    panics = errors = warns = 0
    try:
        with open(path, errors="replace") as f:
            for line in f:
                panics += "panicked at" in line
                errors += " ERROR " in line
                warns += " WARN " in line
    except OSError:
        pass
    return panics, errors, warns


def killed_note(n):
    return f" (killed {n}x)" if n else ""


def num(v):
    return "-" if v is None else str(v)


def process_rows(start, end, samples, killed):
    """Per process: the start, largest and end figures and whether it
    stayed flat; and the names of those that did not."""
    rows, not_flat = {}, []
    order = (lambda n: (n != "deploy run", n.startswith("tunnel ("), n))
    for name in sorted(set(start) | set(end), key=order):
        s, e = start.get(name), end.get(name)
        seen = [snap[name] for _, snap in samples if name in snap]
        flat = bool(s and e and e.rss <= s.rss + allowed_growth(s.rss) and e.fds <= s.fds + FD_SLACK
                    and e.pool <= max(s.pool, POOL_PER_THREAD * e.threads))
        if not flat:
            not_flat.append(name)
        row = {"measured": bool(s and e), "killed": killed.get(name, 0), "flat": flat}
        for field, key in (("pid", "pid"), ("rss", "rss_kib"), ("fds", "fds"), ("pool", "pool"),
                           ("threads", "threads")):
            row[f"{key}_start"] = getattr(s, field) if s else None
            row[f"{key}_end"] = getattr(e, field) if e else None
            if field != "pid":
                row[f"{key}_max"] = max((getattr(v, field) for v in seen), default=None)
        rows[name] = row
    return rows, not_flat


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10, help="length of the run (default 10)")
    ap.add_argument("--seconds", type=float, help="length of the run in seconds (overrides --minutes)")
    ap.add_argument("--warmup", type=float, default=20, help="seconds of traffic before the start sample (default 20)")
    ap.add_argument("--bulk-mib", type=int, default=4, help="MiB per bulk transfer (default 4)")
    ap.add_argument("--reload-every", type=float, default=3, help="seconds between SIGHUPs to the tunnel (default 3)")
    ap.add_argument("--kill-every", type=float, default=20, help="seconds between instance kills (default 20)")
    ap.add_argument("--sample-every", type=float, help="seconds between samples (default 30, less for short runs)")
    ap.add_argument("--pause", type=float, default=5, help="ms each client thread waits between transfers (default 5)")
    ap.add_argument("--keep", action="store_true", help="keep the logs and configurations (kept anyway on failure)")
    a = ap.parse_args()
    seconds = a.seconds if a.seconds is not None else a.minutes * 60
    if a.sample_every is None:
        a.sample_every = min(30.0, max(2.0, seconds / 10))
    if seconds <= 0 or a.warmup < 0 or a.bulk_mib < 1 or min(a.reload_every, a.kill_every, a.sample_every) <= 0:
        sys.exit("soak.py: durations must be positive and --bulk-mib at least 1")

    try:
        bindir = build()
    except (subprocess.CalledProcessError, OSError) as e:
        shutil.rmtree(TMP, ignore_errors=True)
        sys.exit(f"soak.py: the build failed ({e}); fix it and run again")
    soak = Soak(a, bindir)
    ok = False

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background
    try:
        soak.start()
        log(f"warm-up: {a.warmup:.0f} s of traffic, no kills")
        soak.traffic(a.warmup, False, "warm-up")
        settled_start = soak.settle()
        start = soak.sample(5)
        soak.samples.append((time.monotonic() - soak.t0, start))
        log(f"run: {seconds:.0f} s of traffic, kills every {a.kill_every:.0f} s, "
            f"reloads every {a.reload_every:.0f} s; logs in {TMP}")
        run_t0 = time.monotonic()
        soak.traffic(seconds, True, "run")
        run_s = time.monotonic() - run_t0
        settled_end = soak.settle()
        end = soak.sample(5)
        soak.samples.append((time.monotonic() - soak.t0, end))

        backend_stats = {}
        try:
            with connect(soak.ports["b_bulk"]) as s:
                s.sendall(b"STATS\n")
                backend_stats = json.loads(recv_all(s, 4096))
        except (OSError, ValueError) as e:
            log(f"could not read the backend's counts: {e}")
        metrics = {}
        try:
            for line in http_get(soak.ports["t_admin"], "/metrics").splitlines():
                m = re.match(r'tunnel_connections_refused_total\{route="(\w+)"\} (\d+)', line)
                if m:
                    metrics[m.group(1)] = int(m.group(2))
        except (OSError, http.client.HTTPException) as e:
            log(f"could not read the tunnel's metrics: {e}")

        # Stop everything; whatever is still running after is a finding.
        log("stopping: SIGTERM to deploy and the tunnel")
        deploy_exit = terminate(soak.deploy, 40)
        tunnel_exit = terminate(soak.tunnel, 30)
        terminate(soak.backend, 5)
        time.sleep(0.5)
        leftovers = kill_leftovers()

        # ---- processes
        rows, not_flat = process_rows(start, end, soak.samples, soak.events["killed"])
        print(f"\nsoak: {run_s:.0f} s of mixed traffic after {a.warmup:.0f} s of warm-up. RSS in MiB; fds: open "
              f"descriptors but the splice pool; pool: its pipes (both ends held, at most {POOL_PER_THREAD} per "
              f"thread by design)\nflat: RSS end <= start + max({RSS_SLACK[0]:.0%}, {RSS_SLACK[1] // 1024} MiB), "
              f"fds end <= start + {FD_SLACK}, pool end <= max(start, {POOL_PER_THREAD} x threads)")
        print(f"\n{'process':21} {'pid start -> end':>17} {'RSS start':>9} {'max':>5} {'end':>5} {'growth':>6} "
              f"{'fds start':>9} {'max':>4} {'end':>4} {'pool start':>10} {'max':>4} {'end':>4} {'threads':>7}  flat")
        for name, r in rows.items():
            pids = f"{r['pid_start'] or '-'} -> {r['pid_end'] or '-'}"
            growth = f"{(r['rss_kib_end'] - r['rss_kib_start']) / 1024:+.1f}" if r["measured"] else "-"
            print(f"{name:21} {pids:>17} {mib(r['rss_kib_start']):>9} {mib(r['rss_kib_max']):>5} "
                  f"{mib(r['rss_kib_end']):>5} {growth:>6} {num(r['fds_start']):>9} {num(r['fds_max']):>4} "
                  f"{num(r['fds_end']):>4} {num(r['pool_start']):>10} {num(r['pool_max']):>4} "
                  f"{num(r['pool_end']):>4} {num(r['threads_end']):>7}  {'yes' if r['flat'] else 'NO'}"
                  f"{killed_note(r['killed'])}")

        # ---- samples
        names = list(rows)
        print("\nsamples over time (RSS MiB/fds+pool; the first and last rows are the start and end, "
              "with no traffic)")
        print(f"{'t (s)':>5} " + " ".join(f"{short_name(n):>11}" for n in names))
        for t, snap in soak.samples:
            cells = [f"{mib(snap[n].rss)}/{snap[n].fds}+{snap[n].pool}" if n in snap else "-" for n in names]
            print(f"{t:5.0f} " + " ".join(f"{c:>11}" for c in cells))

        # ---- transfers
        counts = soak.stats.counts
        print(f"\n{'transfers':42} {'tried':>7} {'ok':>7} {'expected':>8} {'reset->close':>12} "
              f"{'by kill':>7} {'corrupt':>7} {'lost':>5}")
        for kind in sorted(counts):
            c = counts[kind]
            print(f"{kind:42} {sum(c.values()):>7,} {c['ok']:>7,} {c['expected']:>8,} {c['reset_as_close']:>12,} "
                  f"{c['interrupted']:>7,} {c['corrupted']:>7,} {c['lost']:>5,}")
        totals = {o: soak.stats.total(o) for o in OUTCOMES}
        print(f"{'all':42} {sum(totals.values()):>7,} {totals['ok']:>7,} {totals['expected']:>8,} "
              f"{totals['reset_as_close']:>12,} {totals['interrupted']:>7,} {totals['corrupted']:>7,} "
              f"{totals['lost']:>5,}")
        print("(expected: a reset the client made or asked for, seen as a reset; reset->close: a reset that "
              "arrived as a clean close; by kill: open while an instance of its role was killed)")
        for (kind, outcome), examples in sorted(soak.stats.examples.items()):
            for ex in examples:
                print(f"  {outcome} in {kind}: {ex}")

        # ---- events
        ev = soak.events
        cut_close = backend_stats.get("sink_cut_by_close", 0)
        findings = {name: log_findings(os.path.join(TMP, f"{name}.log")) for name in ("deploy", "tunnel")}
        panics = sum(f[0] for f in findings.values())
        print(f"\nreloads (SIGHUP to the tunnel): {ev['reloads_sent']} sent, {ev['reloads_applied']} took effect")
        print(f"kills (SIGKILL to an instance): {ev['kills_sent']} sent, {ev['kills_restarted']} started again")
        print(f"client resets of uploads, as the backend saw them through the tunnel: "
              f"{backend_stats.get('sink_cut_by_reset', '-')} as a reset, "
              f"{backend_stats.get('sink_cut_by_close', '-')} as a clean close")
        refused_sent = {"echo": sum(counts.get(k, {}).get("ok", 0) for k in
                                    ("refused: 127.0.0.2, tunnel echo", "refused: 127.0.0.3, tunnel echo")),
                        "bulk": counts.get("refused: 127.0.0.2, tunnel bulk", {}).get("ok", 0)}
        print(f"refused by the tunnel's metrics: {metrics or '-'}; refused clients seen closed: {refused_sent}")
        for name, (p_, e_, w_) in findings.items():
            print(f"{name} log: {p_} panics, {e_} ERROR lines, {w_} WARN lines")
        print(f"stop: deploy exit {deploy_exit[0]} in {deploy_exit[1]:.1f} s{' (killed)' if deploy_exit[2] else ''}, "
              f"tunnel exit {tunnel_exit[0]} in {tunnel_exit[1]:.1f} s{' (killed)' if tunnel_exit[2] else ''}; "
              f"left running: {', '.join(f'{c} ({p})' for p, c in leftovers) or 'nothing'}")
        if not (settled_start and settled_end):
            print("note: descriptor counts were still moving when a start or end sample was taken")
        for item in ev["reloads_not_applied"] + ev["kills_not_restarted"] + ev["stuck_threads"]:
            print(f"  problem: {item}")

        problems = []
        if not_flat:
            problems.append(f"not flat: {', '.join(not_flat)}")
        if totals["lost"] or totals["corrupted"]:
            problems.append(f"{totals['lost']} lost, {totals['corrupted']} corrupted transfers")
        if totals["reset_as_close"] or cut_close:
            problems.append(f"resets not passed on: {totals['reset_as_close']} to clients, {cut_close} to the backend")
        if panics:
            problems.append(f"{panics} panics in the logs")
        if ev["reloads_not_applied"] or ev["kills_not_restarted"] or ev["stuck_threads"]:
            problems.append(f"{len(ev['reloads_not_applied'])} reloads not applied, "
                            f"{len(ev['kills_not_restarted'])} instances not restarted, "
                            f"{len(ev['stuck_threads'])} client threads stuck")
        if ev["script_errors"]:
            problems.append(f"{ev['script_errors']} errors in this script's clients (see the log above)")
        if leftovers or deploy_exit[2] or tunnel_exit[2]:
            problems.append("not stopped cleanly by SIGTERM")
        ok = not problems
        print(f"\nverdict: {'PASS' if ok else 'FAIL: ' + '; '.join(problems)}")
        res = {"seconds": round(run_s), "warmup_seconds": a.warmup, "bulk_mib": a.bulk_mib,
               "tolerance": {"rss_fraction": RSS_SLACK[0], "rss_kib": RSS_SLACK[1], "fds": FD_SLACK,
                             "pool_per_thread": POOL_PER_THREAD},
               "samples": [[round(t), {n: [r.rss, r.fds, r.pool] for n, r in snap.items()}]
                           for t, snap in soak.samples],
               "processes": rows, "transfers": counts, "totals": totals, "events": ev,
               "backend": backend_stats, "tunnel_refused_metrics": metrics,
               "logs": {k: dict(zip(("panics", "errors", "warns"), v)) for k, v in findings.items()},
               "stop": {"deploy": deploy_exit[0], "tunnel": tunnel_exit[0],
                        "left_running": [c for _, c in leftovers]},
               "problems": problems, "ok": ok}
        print(json.dumps(res), flush=True)
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
    except RuntimeError as e:
        log(f"soak.py: {e}")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # cleaning up is bounded; let it finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for p in (soak.deploy, soak.tunnel, soak.backend):
            if p is not None and p.poll() is None:
                terminate(p, 15)
        for pid, name in kill_leftovers():
            log(f"killed a leftover {name} (pid {pid})")
        if ok and not a.keep:
            shutil.rmtree(TMP, ignore_errors=True)
        else:
            log(f"logs and configurations kept in {TMP}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
