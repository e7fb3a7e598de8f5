#!/usr/bin/env python3
"""Instructions (and system calls) the tunnel spends per connection and per request.

Wall-clock figures swing by tens of percent on a shared machine; the number
of instructions a fixed piece of work executes does not. This runs the
release tunnel under valgrind's callgrind, which counts every instruction
of every thread (the relay, the accept loop, the log writer), with default
settings as users run it (an access-log line per connection on stderr,
here a file), and drives it with a
fixed, sequential workload from this script:

  conn  a new connection per request: connect, send a 100-byte request,
        read the 100-byte response until the backend closes, close. The
        tunnel accepts, connects to the backend, relays both ways, logs
        one access line.
  rr    requests on kept connections: one connection, a 100-byte request
        and a 100-byte response at a time.

Each workload runs twice, with N and 3N units, in a fresh tunnel each time;
the difference divided by 2N is the cost per unit, with start-up, shutdown
and first-use costs cancelled out. The steps of a new connection are paced
(2 ms apart) so that the tunnel meets each event on its own wake-up: how
events coalesce otherwise depends on timing. Pairs of runs then agree to
about 0.3 %; three pairs run and the median is reported, with the spread,
so a change of 1 % in the hot paths shows, where wall-clock figures here
move by 20 %.

With --syscalls the same workloads run under `strace -f -c` instead, and the
figure is system calls per unit, by name.

    python3 bench/instructions.py                  # both workloads, about a minute
    python3 bench/instructions.py --top 15         # and where the instructions go
    python3 bench/instructions.py --syscalls       # system calls per unit, by name
    python3 bench/instructions.py --save base.json
    python3 bench/instructions.py --against base.json   # exit 1 if a figure grew over 3 %
    python3 bench/instructions.py --tunnel PATH --tunnel-args '--workers 2'

Needs valgrind (callgrind, callgrind_annotate) and, for --syscalls, strace:
Debian `apt-get install valgrind strace`. Builds the release tunnel (cargo
build --release -p tunnel, into $CARGO_TARGET_DIR or target/) unless
--tunnel names one; the release profile keeps line tables, so --top names
functions. Python 3 standard library only; Linux (reads /proc). The last
line printed is JSON.
"""
import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP = tempfile.mkdtemp(prefix="tunnel-instructions-")
REQUEST = b"q" * 99 + b"\n"
RESPONSE = b"r" * 99 + b"\n"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def listening(port):
    """Whether something listens on 127.0.0.1:port, from /proc/net/tcp (a
    probe connection would be counted as work)."""
    want = {f"0100007F:{port:04X}", f"00000000:{port:04X}"}
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] in want and fields[3] == "0A":
                return True
    return False


def wait_listening(proc, port, what, seconds=120):
    end = time.time() + seconds
    while not listening(port):
        if proc.poll() is not None or time.time() > end:
            raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port}; see {TMP}")
        time.sleep(0.05)


# The backend: answers each 100-byte request with a 100-byte response; with
# "close", closes the connection GAP seconds after the first response.
BACKEND = """
import selectors, socket, sys, time
close = sys.argv[2] == "close"
GAP = float(sys.argv[3])
response = b"r" * 99 + b"\\n"
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", int(sys.argv[1]))); l.listen(1024); l.setblocking(False)
sel = selectors.DefaultSelector(); sel.register(l, selectors.EVENT_READ)
got = {}
while True:
    for key, _ in sel.select():
        s = key.fileobj
        if s is l:
            try: c, _ = l.accept()
            except BlockingIOError: continue
            sel.register(c, selectors.EVENT_READ); got[c] = 0
            continue
        try: data = s.recv(65536)
        except OSError: data = b""
        if not data:
            sel.unregister(s); del got[s]; s.close(); continue
        got[s] += len(data)
        while got[s] >= 100:
            got[s] -= 100
            s.sendall(response)
            if close:
                time.sleep(GAP)
                sel.unregister(s); del got[s]; s.close(); break
"""


def recv_exactly(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise RuntimeError(f"the connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


# Pauses between the steps of a new connection, so that the tunnel sees each
# event (connect, request, response, the backend's close, the client's
# close) on its own: how events coalesce otherwise depends on timing, and
# moves the count per connection by several percent from run to run.
GAP = 0.002


def conn_workload(port, n):
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
        time.sleep(GAP)
        s.sendall(REQUEST)
        if recv_exactly(s, len(RESPONSE)) != RESPONSE:
            raise RuntimeError("wrong response")
        if s.recv(1) != b"":
            raise RuntimeError("the tunnel did not pass the backend's close on")
        s.close()
        time.sleep(GAP)


def rr_workload(port, n):
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    for _ in range(n):
        s.sendall(REQUEST)
        if recv_exactly(s, len(RESPONSE)) != RESPONSE:
            raise RuntimeError("wrong response")
    s.close()


WORKLOADS = {
    "conn": ("close", conn_workload, "per connection"),
    "rr": ("keep", rr_workload, "per request"),
}


def build():
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
    log(f"building the release tunnel (target dir {target})")
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "tunnel"], cwd=ROOT, check=True)
    binary = os.path.join(target, "release", "tunnel")
    if not os.access(binary, os.X_OK):
        sys.exit(f"instructions.py: no binary at {binary}")
    return binary


def stop(p):
    if p.poll() is not None:
        return
    try:
        os.killpg(p.pid, signal.SIGINT)
    except ProcessLookupError:
        return
    try:
        p.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def run_once(a, binary, kind, n, tool):
    """Runs workload `kind` with n units through a fresh tunnel under
    `tool` ("callgrind" or "strace"); returns the tool's output file."""
    mode, work, _ = WORKLOADS[kind]
    bport = free_port()
    backend = subprocess.Popen([sys.executable, "-c", BACKEND, str(bport), mode, str(GAP)],
                               start_new_session=True)
    try:
        wait_listening(backend, bport, "the backend")
        port = free_port()
        out = os.path.join(TMP, f"{tool}-{kind}-{n}.out")
        tunnel = [binary, "--listen", f"127.0.0.1:{port}", "--target", f"127.0.0.1:{bport}"] + shlex.split(a.tunnel_args)
        if tool == "callgrind":
            cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"] + tunnel
        else:
            cmd = ["strace", "-f", "-c", "-o", out] + tunnel
        with open(os.path.join(TMP, f"{tool}-{kind}-{n}.stderr"), "w") as err:
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                 start_new_session=True)
        try:
            wait_listening(p, port, "the tunnel")
            time.sleep(0.5)  # whatever the tunnel does after listening
            work(port, n)
            time.sleep(0.5)  # the last connection's close and log line
        finally:
            stop(p)
        if p.returncode not in (0, -signal.SIGINT):
            raise RuntimeError(f"the tunnel under {tool} exited with {p.returncode}; see {TMP}")
        return out
    finally:
        os.killpg(backend.pid, signal.SIGKILL)
        backend.wait()


def total_instructions(path):
    with open(path) as f:
        for line in f:
            if line.startswith("summary:") or line.startswith("totals:"):
                return int(line.split()[1])
    raise RuntimeError(f"no total in {path}")


def self_costs(path):
    """Instructions by function (self cost), from callgrind_annotate."""
    out = subprocess.run(["callgrind_annotate", "--inclusive=no", "--auto=no", "--threshold=100", path],
                         capture_output=True, text=True, check=True).stdout
    costs = {}
    for line in out.splitlines():
        m = re.match(r"^\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(\S.*)$", line)
        if not m or "PROGRAM TOTALS" in line or m.group(2).startswith("=>"):
            continue
        name = re.sub(r"\s*\[[^\]]*\]\s*$", "", m.group(2))  # drop "[object file]"
        costs[name] = costs.get(name, 0) + int(m.group(1).replace(",", ""))
    return costs


def syscall_counts(path):
    """Calls by system call name, from `strace -c` output."""
    counts = {}
    with open(path) as f:
        for line in f:
            fields = line.split()
            # % time, seconds, usecs/call, calls, [errors], syscall
            if len(fields) >= 5 and fields[0][0].isdigit() and fields[-1] != "total":
                counts[fields[-1]] = int(fields[3])
    return counts


def measure(a, binary, kind, tool):
    """The figure per unit of `kind`: the median over --repeat pairs of runs,
    its spread, and the details (top functions or system calls)."""
    n = a.conns if kind == "conn" else a.requests
    pers, details = [], []
    for _ in range(a.repeat):
        small, big = run_once(a, binary, kind, n, tool), run_once(a, binary, kind, 3 * n, tool)
        if tool == "callgrind":
            pers.append((total_instructions(big) - total_instructions(small)) / (2 * n))
            if a.top:
                s, b = self_costs(small), self_costs(big)
                details.append({k: (b.get(k, 0) - s.get(k, 0)) / (2 * n) for k in set(s) | set(b)})
        else:
            s, b = syscall_counts(small), syscall_counts(big)
            diff = {k: (b.get(k, 0) - s.get(k, 0)) / (2 * n) for k in set(s) | set(b)}
            pers.append(sum(diff.values()))
            details.append(diff)
    mid = sorted(range(len(pers)), key=lambda i: pers[i])[len(pers) // 2]
    shown = details[mid] if details else {}
    if tool == "callgrind":
        top = sorted(shown.items(), key=lambda kv: -kv[1])[:a.top]
    else:
        top = sorted(((k, v) for k, v in shown.items() if abs(v) >= 0.01), key=lambda kv: -kv[1])
    return pers[mid], (min(pers), max(pers)), top


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tunnel", help="the tunnel binary (default: build the release one)")
    ap.add_argument("--tunnel-args", default="", help="extra tunnel flags, e.g. '--workers 2'")
    ap.add_argument("--tests", default="conn,rr", help="workloads: conn,rr")
    ap.add_argument("--conns", type=int, default=300, help="connections in the smaller conn run (default 300)")
    ap.add_argument("--requests", type=int, default=1000, help="requests in the smaller rr run (default 1000)")
    ap.add_argument("--repeat", type=int, default=3, help="pairs of runs per workload; the median is reported (default 3)")
    ap.add_argument("--top", type=int, default=0, help="also show the N functions that cost the most per unit")
    ap.add_argument("--syscalls", action="store_true", help="count system calls (strace) instead of instructions")
    ap.add_argument("--keep", action="store_true", help="keep the tools' output files (their directory is printed)")
    ap.add_argument("--save", help="write the figures to this JSON file")
    ap.add_argument("--against", help="compare with figures saved by --save; exit 1 if one grew over 3 %%")
    a = ap.parse_args()

    tool = "strace" if a.syscalls else "callgrind"
    needed = ["strace"] if a.syscalls else ["valgrind", "callgrind_annotate"]
    missing = [t for t in needed if not shutil.which(t)]
    if missing:
        sys.exit(f"instructions.py: {', '.join(missing)} not found; install it (Debian: apt-get install "
                 f"{'strace' if a.syscalls else 'valgrind'})")
    binary = a.tunnel or build()
    unit = "system calls" if a.syscalls else "instructions"
    figures, spreads, details = {}, {}, {}
    for kind in a.tests.split(","):
        if kind not in WORKLOADS:
            sys.exit(f"instructions.py: unknown workload {kind!r}; use conn and/or rr")
        log(f"{kind}: {WORKLOADS[kind][2]}, under {tool}")
        per, spread, top = measure(a, binary, kind, tool)
        figures[kind] = round(per, 1)
        spreads[kind] = [round(x, 1) for x in spread]
        details[kind] = [(name, round(v, 2)) for name, v in top]
    print()
    for kind, per in figures.items():
        lo, hi = spreads[kind]
        print(f"{unit} {WORKLOADS[kind][2]:16} {per:>12,.1f}   (median of {a.repeat}; {lo:,.1f} to {hi:,.1f})")
        for name, v in details[kind]:
            print(f"    {v:>12,.2f}  {name}")
    code = 0
    if a.against:
        with open(a.against) as f:
            old = json.load(f)
        if old.get("unit") != unit:
            sys.exit(f"instructions.py: {a.against} holds {old.get('unit')}, not {unit}")
        print()
        for kind, per in figures.items():
            before = old["figures"].get(kind)
            if not before:
                continue
            change = per / before - 1
            flag = "  <- grew over 3 %" if change > 0.03 else ""
            print(f"{kind}: {before:,.1f} -> {per:,.1f} ({change:+.1%}){flag}")
            code |= change > 0.03
    result = {"unit": unit, "figures": figures, "spread": spreads, "top": details}
    if a.save:
        with open(a.save, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result), flush=True)
    if a.keep:
        log(f"the tools' output files are in {TMP}")
    else:
        shutil.rmtree(TMP, ignore_errors=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
