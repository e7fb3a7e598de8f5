//! The real `tunnel` binary relays 9,500 connections at once: every one is
//! open at the same time, sends its own payload, gets exactly that payload
//! back and nothing more, and none is lost.
//!
//! The echo target is a small Python `selectors` server in a process of its
//! own, and this test process holds the 9,500 client sockets, so no process
//! holds more descriptors than the open-files limit allows.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use tests::{binary, require, Running};

/// Connections held open at once. Not 10,000: the tunnel holds two
/// descriptors per relayed connection (the client's and the target's), and
/// where this runs the open-files limit is 20,000 and cannot be raised, so
/// one tunnel process tops out near 9,990 connections (its listener, epoll,
/// eventfd, standard streams and the admin endpoint take the rest). 9,500
/// leaves headroom.
const CONNECTIONS: usize = 9_500;

/// Connections opened before waiting for the tunnel to accept them: well
/// under its listen backlog (4096), so a burst never overflows it and costs
/// a client a SYN retransmitted a second later.
const BATCH: usize = 500;

/// An echo server that can hold as many connections as the limit allows,
/// on a port the kernel chooses, which it reports as the programs do.
const ECHO: &str = r#"
import resource, selectors, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", 0)); l.listen(4096); l.setblocking(False)
print("echo ready listen=%s:%d" % l.getsockname(), file=sys.stderr, flush=True)
sel = selectors.DefaultSelector(); sel.register(l, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        if s is l:
            while True:
                try: c, _ = l.accept()
                except (BlockingIOError, InterruptedError): break
                except OSError as e: print("accept:", e, file=sys.stderr, flush=True); break
                c.setblocking(True); sel.register(c, selectors.EVENT_READ)
            continue
        try: data = s.recv(65536)
        except OSError: data = b""
        if data: s.sendall(data)
        else: sel.unregister(s); s.close()
"#;

/// Connection `i`'s payload: its number and 16 to 200 bytes that depend on
/// it, so a payload delivered to the wrong connection cannot pass.
fn payload(i: usize) -> Vec<u8> {
    let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut next = move || {
        x ^= x >> 29;
        x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 32;
        x
    };
    let mut bytes = format!("{i:05}:").into_bytes();
    let len = 16 + (next() % 185) as usize;
    bytes.extend((0..len).map(|_| (next() & 0xff) as u8));
    bytes
}

/// `tunnel_connections_active` summed over the tunnel's targets.
fn active(admin: SocketAddr) -> u64 {
    let mut s = TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: tunnel\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    response
        .lines()
        .filter(|l| l.starts_with("tunnel_connections_active{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Waits until the tunnel reports `n` active connections, up to `limit`.
fn wait_active(admin: SocketAddr, n: u64, limit: Duration) -> u64 {
    let end = Instant::now() + limit;
    loop {
        let now = active(admin);
        if now == n || Instant::now() > end {
            return now;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Opens a connection, retrying what a busy listener answers.
fn open(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let mut tries = 0;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => return Ok(s),
            Err(e)
                if tries < 5
                    && matches!(e.kind(), ErrorKind::ConnectionRefused | ErrorKind::TimedOut) =>
            {
                tries += 1;
                std::thread::sleep(Duration::from_millis(50 * tries));
            }
            Err(e) => return Err(e),
        }
    }
}

#[test]
fn relays_9500_connections_at_once() {
    // Our 9,500 sockets need the hard limit; the tunnel and the echo server
    // inherit it (the tunnel needs two descriptors per connection).
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    let needed = 2 * CONNECTIONS as u64 + 100;
    assert!(
        hard >= needed,
        "the open-files hard limit is {hard}; relaying {CONNECTIONS} connections needs {needed}"
    );

    let mut echo = Command::new(require("python3"));
    echo.args(["-c", ECHO]);
    let echo = Running::start_reporting(echo, "listen");
    let target = echo.addr;

    let mut command = Command::new(binary("tunnel"));
    command
        .args(["--listen", "127.0.0.1:0"])
        .args(["--target", &target.to_string()])
        .args(["--admin", "127.0.0.1:0"])
        // The start-up lines, without each connection's access-log line.
        .args(["--log-level", "info,access=warn"]);
    let mut tunnel = Running::start_reporting(command, "listen");
    let (listen, admin) = (tunnel.addr, tunnel.reported("", "admin"));

    // Open them all, in batches the tunnel accepts before the next.
    let started = Instant::now();
    let mut streams = Vec::with_capacity(CONNECTIONS);
    let mut refused = Vec::new();
    for i in 0..CONNECTIONS {
        match open(listen) {
            Ok(s) => streams.push((i, s)),
            Err(e) => refused.push(format!("connection {i}: {e}")),
        }
        if (i + 1) % BATCH == 0 {
            wait_active(admin, streams.len() as u64, Duration::from_secs(10));
        }
    }
    let opened = started.elapsed();
    assert!(
        refused.is_empty(),
        "{} of {CONNECTIONS} connections could not be opened: {:?}",
        refused.len(),
        &refused[..refused.len().min(10)]
    );
    // All relayed to the target at the same time.
    assert_eq!(
        wait_active(admin, CONNECTIONS as u64, Duration::from_secs(20)),
        CONNECTIONS as u64,
        "the tunnel does not hold all {CONNECTIONS} connections at once"
    );

    // Every connection sends its payload, then reads it back.
    let mut failures = Vec::new();
    for (i, s) in &mut streams {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        if let Err(e) = s.write_all(&payload(*i)) {
            failures.push(format!("connection {i}: write: {e}"));
        }
    }
    for (i, s) in &mut streams {
        if failures.len() > 20 {
            break;
        }
        let want = payload(*i);
        let mut got = vec![0u8; want.len()];
        match s.read_exact(&mut got) {
            Ok(()) if got == want => {}
            Ok(()) => failures.push(format!("connection {i}: got another payload")),
            Err(e) => failures.push(format!("connection {i}: read: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} connections failed: {failures:?}",
        failures.len()
    );
    let exchanged = started.elapsed();
    // Still all open, then closed from our side: each must end cleanly with
    // nothing after its own payload.
    assert_eq!(active(admin), CONNECTIONS as u64);
    for (_, s) in &streams {
        s.shutdown(Shutdown::Write).unwrap();
    }
    let mut served = 0;
    for (i, s) in &mut streams {
        let mut rest = Vec::new();
        match s.read_to_end(&mut rest) {
            Ok(0) => served += 1,
            Ok(n) => failures.push(format!("connection {i}: {n} bytes after the payload")),
            Err(e) => failures.push(format!("connection {i}: closing: {e}")),
        }
        if failures.len() > 20 {
            break;
        }
    }
    assert_eq!(
        served, CONNECTIONS,
        "not every connection was served: {failures:?}"
    );
    drop(streams);
    assert_eq!(
        wait_active(admin, 0, Duration::from_secs(20)),
        0,
        "the tunnel still holds connections after every client closed"
    );
    eprintln!(
        "{CONNECTIONS} connections: opened in {:.1?}, echoed by {:.1?}, closed by {:.1?}",
        opened,
        exchanged,
        started.elapsed()
    );

    let (code, stderr) = tunnel.stop();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains("ERROR"), "{stderr}");
    drop(echo);
}
