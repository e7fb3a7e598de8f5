#!/usr/bin/env python3
"""The fabric under fire: 4 echo-server instances behind the fabric's
balancer; every second (--kill-every) two instances are killed (SIGKILL)
for 30 s (--seconds), while a client opens 20 new connections a second
(--rate). Not run in CI.

Which two (--victims):
  pair     echo_IN_1 and echo_IN_2, each killed every second whenever it
           is running (the default: two of four instances keep dying, two
           keep serving);
  any      two of the running instances chosen at random each second, but
           never the last one running (with the fabric's growing restart
           backoff, killing any two would soon leave none, and a fabric
           with no instance has nothing to serve with).

Each connection is an echo-server session through the balancer: read the
greeting (up to the prompt), send `9`, read `Goodbye.`. A connection is
  lost     when it gets no greeting: refused, reset or closed before it,
           or nothing within 10 s. The figure: 0 lost;
  cut      when the greeting came and the goodbye did not: its instance
           was killed while it ran, after it had answered (an open
           connection dies with its instance; nothing may replay it);
  served   otherwise.
Each kill is followed until the fabric has started the instance again (a
new process with its id): the time it took is compared with the fabric's
restart backoff for that instance (250 ms, doubling with each death up to
10 s, back to 250 ms after 10 s of life); "late" is the most it took beyond
that. At the end, every instance must accept connections again.

Builds the release binaries (cargo build --release --workspace --bins, into
$CARGO_TARGET_DIR or target/) unless --bindir names a directory holding
deploy and echo-server. Everything listens on 127.0.0.1 only.

    python3 bench/fabric_kill.py                  # 30 s, about 40 s in all
    python3 bench/fabric_kill.py --seconds 10     # a quick look

Prints a summary; the last line is JSON. Exit status 1 if any connection
was lost or an instance did not come back. Python 3 standard library only;
Linux (reads /proc).
"""
import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GREETING_TIMEOUT = 10
PROMPT = b"Your choice: "
BACKOFF = (0.25, 10.0)  # deploy/src/fabric.rs Options: first restart delay, most


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def build():
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
    log(f"building the release binaries (target dir {target})")
    subprocess.run(["cargo", "build", "--release", "--quiet", "--workspace", "--bins"], cwd=ROOT, check=True)
    return os.path.join(target, "release")


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


def state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def instances(deploy_pid):
    """{instance id: (pid, listen port)} of the fabric's live instances."""
    found = {}
    for pid in children(deploy_pid):
        if state(pid) in (None, "Z"):
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(e.partition(b"=")[::2] for e in f.read().split(b"\0") if e)
        except OSError:
            continue
        if b"ECHO_SERVER_INSTANCE" in env and b"ECHO_SERVER_LISTEN" in env:
            port = int(env[b"ECHO_SERVER_LISTEN"].rsplit(b":", 1)[1])
            found[env[b"ECHO_SERVER_INSTANCE"].decode()] = (pid, port)
    return found


def accepts(port):
    """Whether the instance on `port` greets. Instances trust loopback to
    name the client in a PROXY header first, as the fabric's balancer does,
    so one is sent."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.settimeout(1)
            me = s.getsockname()
            s.sendall(b"PROXY TCP4 127.0.0.1 127.0.0.1 %d %d\r\n" % (me[1], port))
            return s.recv(1) != b""
    except OSError:
        return False


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {"served": 0, "cut": 0, "lost": 0}
        self.lost = []  # (time, why)

    def add(self, outcome, why=None, at=None):
        with self.lock:
            self.counts[outcome] += 1
            if outcome == "lost":
                self.lost.append((at, why))


def session(port, tally, t0):
    at = time.monotonic() - t0
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=GREETING_TIMEOUT)
    except OSError as e:
        tally.add("lost", f"connect: {e}", at)
        return
    with s:
        s.settimeout(GREETING_TIMEOUT)
        got = b""
        try:
            while PROMPT not in got:
                d = s.recv(4096)
                if not d:
                    tally.add("lost", f"closed before the greeting ({len(got)} bytes)", at)
                    return
                got += d
        except OSError as e:
            what = "before the greeting" if not got else f"after {len(got)} bytes of the greeting"
            tally.add("lost", f"{e} {what}", at)
            return
        try:
            s.sendall(b"9\r\n")
            bye = b""
            while True:
                d = s.recv(4096)
                if not d:
                    break
                bye += d
            tally.add("served" if b"Goodbye." in bye else "cut")
        except OSError:
            tally.add("cut")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--rate", type=float, default=20, help="new connections a second")
    ap.add_argument("--kill-every", type=float, default=1.0)
    ap.add_argument("--kills", type=int, default=2, help="instances killed each time")
    ap.add_argument("--victims", choices=("pair", "any"), default="pair")
    ap.add_argument("--bindir", help="use the binaries here instead of building")
    ap.add_argument("--seed", type=int, default=14)
    args = ap.parse_args()
    bindir = args.bindir or build()
    rng = random.Random(args.seed)
    tmp = tempfile.mkdtemp(prefix="fabric-kill-")
    port = free_port()
    definition = os.path.join(tmp, "service.yaml")
    with open(definition, "w") as f:
        f.write(
            "# Written by bench/fabric_kill.py, on loopback only.\n"
            "name: fabric-kill\nroles:\n  - name: echo\n    program: echo-server\n    instances: 4\n"
            f"    endpoints:\n      - name: EchoEndpoint\n        visibility: internal\n        port: {port}\n"
        )
    out = open(os.path.join(tmp, "deploy.log"), "w")
    deploy = subprocess.Popen([os.path.join(bindir, "deploy"), "run", definition, "--programs", bindir],
                              stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                              start_new_session=True)
    ok = False
    try:
        end = time.monotonic() + 30
        while not (len(instances(deploy.pid)) == 4 and accepts(port)):
            if time.monotonic() > end or deploy.poll() is not None:
                sys.exit(f"fabric_kill.py: the fabric did not start; see {out.name}")
            time.sleep(0.1)
        time.sleep(1.5)  # every instance checked healthy by the balancer
        tally = Tally()
        kills = []  # (time, id, old pid)
        t0 = time.monotonic()
        stop = threading.Event()

        pair = [f"echo_IN_{i + 1}" for i in range(args.kills)]
        seen = {}  # pid -> (id, first seen)
        for iid, (pid, _) in instances(deploy.pid).items():
            seen[pid] = (iid, -1e9)

        def watcher():
            # When each new instance process appears.
            while not stop.is_set():
                for iid, (pid, _) in instances(deploy.pid).items():
                    seen.setdefault(pid, (iid, time.monotonic() - t0))
                time.sleep(0.01)

        def killer():
            n = 0
            while not stop.wait(max(0.0, t0 + n * args.kill_every - time.monotonic())):
                n += 1
                if time.monotonic() - t0 >= args.seconds:
                    return
                live = instances(deploy.pid)
                if args.victims == "pair":
                    victims = [i for i in pair if i in live]
                else:
                    victims = rng.sample(sorted(live), max(0, min(args.kills, len(live) - 1)))
                for iid in victims:
                    pid = live[iid][0]
                    try:
                        os.kill(pid, signal.SIGKILL)
                        kills.append((time.monotonic() - t0, iid, pid))
                    except ProcessLookupError:
                        pass

        k = threading.Thread(target=killer)
        k.start()
        w = threading.Thread(target=watcher)
        w.start()
        clients = []
        n = 0
        while True:
            due = t0 + n / args.rate
            if due - t0 >= args.seconds:
                break
            time.sleep(max(0.0, due - time.monotonic()))
            c = threading.Thread(target=session, args=(port, tally, t0), daemon=True)
            c.start()
            clients.append(c)
            n += 1
        stop.set()
        k.join()
        for c in clients:
            c.join(GREETING_TIMEOUT + 5)
        # Every instance is back and accepts; then each kill is matched
        # with the next process of its id.
        stop.clear()
        end = time.monotonic() + BACKOFF[1] + 15
        while time.monotonic() < end:
            live = instances(deploy.pid)
            for iid, (pid, _) in live.items():
                seen.setdefault(pid, (iid, time.monotonic() - t0))
            if len(live) == 4 and all(accepts(p) for _, p in live.values()):
                break
            time.sleep(0.05)
        stop.set()
        w.join()
        all_back = len(live) == 4 and all(accepts(p) for _, p in live.values())
        starts = sorted((at, iid) for iid, at in seen.values())
        backoff = {}  # id -> the fabric's next restart delay
        born = {}  # id -> when its current process appeared
        late = 0.0
        for at, iid, pid in kills:
            delay = backoff.get(iid, BACKOFF[0])
            if at - born.get(iid, -1e9) > 10:
                delay = BACKOFF[0]
            again = next((t for t, i in starts if i == iid and t > at), None)
            if again is None:
                late = float("inf")
                continue
            late = max(late, again - at - delay)
            born[iid] = again
            backoff[iid] = min(delay * 2, BACKOFF[1])
        total = sum(tally.counts.values())
        result = {
            "seconds": args.seconds,
            "victims": args.victims,
            "connections": total,
            **tally.counts,
            "kills": len(kills),
            "all_back": all_back,
            "most_late_s": round(late, 3),
        }
        print(f"connections opened  {total} ({args.rate:g}/s for {args.seconds:g} s)")
        print(f"kills               {len(kills)} ({args.kills} every {args.kill_every:g} s)")
        print(f"served              {tally.counts['served']}")
        print(f"cut (after the greeting; the instance died mid-session)  {tally.counts['cut']}")
        print(f"lost (no greeting)  {tally.counts['lost']}")
        for at, why in tally.lost[:20]:
            print(f"    at {at:6.2f} s: {why}")
        print(f"restarts            each at most {late:.3f} s after its backoff "
              f"({BACKOFF[0]} s doubling to {BACKOFF[1]:g} s); all back and accepting: {all_back}")
        print(json.dumps(result))
        ok = tally.counts["lost"] == 0 and all_back
    finally:
        try:
            os.killpg(deploy.pid, signal.SIGINT)
            deploy.wait(20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(deploy.pid, signal.SIGKILL)
            deploy.wait()
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log(f"logs kept in {tmp}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
