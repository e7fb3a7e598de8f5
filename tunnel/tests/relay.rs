//! The tunnel over real TCP on loopback: listeners bound to port 0 are passed
//! to [`Tunnel::apply`], targets are small servers in the test.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::settings::{AccessList, ListenAddr, Period};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tunnel::access_log::AccessLog;
use tunnel::{Route, Tunnel};

const WAIT: Duration = Duration::from_secs(20);

fn route(name: &str, listen: SocketAddr, target: SocketAddr) -> Route {
    Route {
        connect_timeout: Period::from_secs(2),
        idle_timeout: Period::from_secs(60),
        max_connections: 1000,
        ..Route::new(
            name,
            vec![ListenAddr(listen)],
            vec![target.to_string().parse().unwrap()],
        )
    }
}

/// A tunnel with one route to `target`, and where it listens.
async fn tunnel_to(
    target: SocketAddr,
    adjust: impl FnOnce(&mut Route),
) -> (Arc<Tunnel>, SocketAddr, tempfile::NamedTempFile) {
    let log_file = tempfile::NamedTempFile::new().unwrap();
    let tunnel = Arc::new(Tunnel::new(
        Duration::from_secs(2),
        AccessLog::to_file(log_file.path()).unwrap(),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut r = route("test", addr, target);
    adjust(&mut r);
    tunnel
        .apply(vec![r], HashMap::from([(ListenAddr(addr), listener)]))
        .await
        .unwrap();
    (tunnel, addr, log_file)
}

/// Access-log lines written so far, waiting for at least `n`.
async fn log_lines(file: &tempfile::NamedTempFile, n: usize) -> Vec<String> {
    let end = tokio::time::Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(file.path()).unwrap();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.len() >= n || tokio::time::Instant::now() > end {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A target that reads until EOF, then answers with `reply_len` bytes and
/// closes: only a correct half-close gets the reply through.
async fn answer_after_eof(reply_len: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut request = Vec::new();
                s.read_to_end(&mut request).await.unwrap();
                let reply: Vec<u8> = (0..reply_len).map(|i| (i % 251) as u8).collect();
                s.write_all(&reply).await.unwrap();
                s.shutdown().await.unwrap();
            });
        }
    });
    addr
}

/// A target that echoes everything back, counting the connections it got.
async fn echo_target() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, accepted)
}

async fn roundtrip(addr: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    got
}

#[tokio::test]
async fn a_client_that_half_closes_still_gets_the_whole_reply() {
    let target = answer_after_eof(3_000_000).await;
    let (tunnel, addr, log) = tunnel_to(target, |_| {}).await;
    let mut client = TcpStream::connect(addr).await.unwrap();
    client.write_all(b"SELECT everything").await.unwrap();
    client.shutdown().await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(WAIT, client.read_to_end(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.len(), 3_000_000);
    assert!(reply.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
    let lines = log_lines(&log, 1).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert!(line.contains("route=test"), "{line}");
    assert!(line.contains(&format!("target={target}")), "{line}");
    assert!(line.contains("sent=17 received=3000000"), "{line}");
    assert!(line.contains("end=\"closed by client\""), "{line}");
    tunnel.shutdown().await;
}

/// FNV-1a, enough to tell a reordered or lost byte.
fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_transfer_arrives_intact_both_ways() {
    let (target, _) = echo_target().await;
    let (tunnel, addr, log) = tunnel_to(target, |_| {}).await;
    let data: Vec<u8> = (0..32u32 * 1024 * 1024)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let sum = checksum(&data);
    let client = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = client.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), 32 * 1024 * 1024);
    assert_eq!(checksum(&back), sum);
    let line = &log_lines(&log, 1).await[0];
    assert!(line.contains("sent=33554432 received=33554432"), "{line}");
    tunnel.shutdown().await;
}

#[tokio::test]
async fn idle_connections_are_closed_and_logged() {
    let (target, _) = echo_target().await;
    let (tunnel, addr, log) =
        tunnel_to(target, |r| r.idle_timeout = Period::from_millis(300)).await;
    let mut client = TcpStream::connect(addr).await.unwrap();
    client.write_all(b"hi").await.unwrap();
    let mut buf = [0u8; 2];
    client.read_exact(&mut buf).await.unwrap();
    let started = tokio::time::Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, client.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(250));
    let line = &log_lines(&log, 1).await[0];
    assert!(line.contains("end=\"idle timeout\""), "{line}");
    assert_eq!(tunnel.connections(), 0);
    tunnel.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_target_closes_the_client_promptly() {
    // A port nothing listens on.
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let (tunnel, addr, log) = tunnel_to(dead, |_| {}).await;
    let mut client = TcpStream::connect(addr).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3), client.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the client was left hanging");
    let line = &log_lines(&log, 1).await[0];
    assert!(line.contains("end=\"target unreachable\""), "{line}");
    assert!(line.contains("connection refused"), "{line}");
    tunnel.shutdown().await;
}

#[tokio::test]
async fn a_target_that_does_not_resolve_is_logged_per_connection() {
    let (tunnel, addr, log) = tunnel_to("127.0.0.1:9".parse().unwrap(), |r| {
        r.targets = vec!["no-such-host.invalid:5432".parse().unwrap()];
    })
    .await;
    for _ in 0..2 {
        let mut client = TcpStream::connect(addr).await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(WAIT, client.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
    }
    let lines = log_lines(&log, 2).await;
    assert_eq!(lines.len(), 2);
    assert!(
        lines
            .iter()
            .all(|l| l.contains("no-such-host.invalid does not resolve")),
        "{lines:?}"
    );
    tunnel.shutdown().await;
}

#[tokio::test]
async fn a_refused_clients_bytes_never_reach_the_target() {
    let (target, accepted) = echo_target().await;
    let (tunnel, addr, log) = tunnel_to(target, |r| {
        r.access.push(AccessList {
            allow: "192.0.2.0/24".parse().unwrap(),
            deny: Default::default(),
        })
    })
    .await;
    let mut client = TcpStream::connect(addr).await.unwrap();
    let _ = client.write_all(b"DROP TABLE users;").await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, client.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(rest.is_empty());
    let line = &log_lines(&log, 1).await[0];
    assert!(line.contains("end=\"refused by access list\""), "{line}");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "the target saw a refused client"
    );

    // Denied by a global rule while the route's own would allow.
    tunnel
        .apply(
            vec![Route {
                access: vec![
                    AccessList {
                        allow: Default::default(),
                        deny: "127.0.0.1".parse().unwrap(),
                    },
                    AccessList::default(),
                ],
                ..route("test", addr, target)
            }],
            HashMap::new(),
        )
        .await
        .unwrap();
    let mut client = TcpStream::connect(addr).await.unwrap();
    let _ = client.write_all(b"hello").await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, client.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(rest.is_empty());
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
    tunnel.shutdown().await;
}

#[tokio::test]
async fn reload_changes_routes_while_connections_keep_running() {
    let (first_target, first_count) = echo_target().await;
    let (second_target, second_count) = echo_target().await;
    let (tunnel, addr, _log) = tunnel_to(first_target, |_| {}).await;

    // A live connection through the first configuration.
    let mut live = TcpStream::connect(addr).await.unwrap();
    live.write_all(b"one").await.unwrap();
    let mut buf = [0u8; 3];
    live.read_exact(&mut buf).await.unwrap();

    // New config: the route now goes elsewhere, and a second route appears.
    let extra = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let extra_addr = extra.local_addr().unwrap();
    tunnel
        .apply(
            vec![
                route("test", addr, second_target),
                route("extra", extra_addr, first_target),
            ],
            HashMap::from([(ListenAddr(extra_addr), extra)]),
        )
        .await
        .unwrap();

    // The live connection still talks to the first target.
    live.write_all(b"two").await.unwrap();
    live.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"two");
    // New connections follow the new configuration.
    assert_eq!(roundtrip(addr, b"new").await, b"new");
    assert_eq!(second_count.load(Ordering::SeqCst), 1);
    assert_eq!(roundtrip(extra_addr, b"extra").await, b"extra");
    assert_eq!(first_count.load(Ordering::SeqCst), 2);

    // A reload that cannot bind changes nothing.
    let squatter = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let taken = squatter.local_addr().unwrap();
    let err = tunnel
        .apply(
            vec![
                route("test", addr, first_target),
                route("clash", taken, first_target),
            ],
            HashMap::new(),
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("route clash: {taken} is already in use")),
        "{err}"
    );
    assert_eq!(roundtrip(addr, b"still").await, b"still");
    assert_eq!(
        second_count.load(Ordering::SeqCst),
        2,
        "the failed reload must keep the running routes"
    );
    assert_eq!(roundtrip(extra_addr, b"x").await, b"x");

    // Removing a route closes its listener; live connections go on.
    tunnel
        .apply(vec![route("test", addr, second_target)], HashMap::new())
        .await
        .unwrap();
    assert!(
        TcpStream::connect(extra_addr).await.is_err(),
        "the removed route still listens"
    );
    live.write_all(b"end").await.unwrap();
    live.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"end");
    tunnel.shutdown().await;
}

#[tokio::test]
async fn shutdown_lets_connections_finish_then_closes_them() {
    let (target, _) = echo_target().await;
    let (tunnel, addr, log) = tunnel_to(target, |_| {}).await;
    let mut live = TcpStream::connect(addr).await.unwrap();
    live.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    live.read_exact(&mut one).await.unwrap();
    let draining = {
        let tunnel = tunnel.clone();
        tokio::spawn(async move { tunnel.shutdown().await })
    };
    // No new connections...
    let refused = tokio::time::timeout(WAIT, async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        refused.is_ok(),
        "the tunnel still accepts while shutting down"
    );
    // ...but the live one still works within the grace period.
    live.write_all(b"y").await.unwrap();
    live.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"y");
    tokio::time::timeout(WAIT, draining).await.unwrap().unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, live.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    let line = &log_lines(&log, 1).await[0];
    assert!(line.contains("end=\"closed at shutdown\""), "{line}");
}

#[tokio::test]
async fn connections_without_a_byte_are_logged_only_when_asked() {
    let (target, _) = echo_target().await;
    for (log_empty, lines) in [(false, 1), (true, 2)] {
        let log_file = tempfile::NamedTempFile::new().unwrap();
        let tunnel = Tunnel::new(
            Duration::from_secs(2),
            AccessLog::to_file(log_file.path())
                .unwrap()
                .log_empty(log_empty),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tunnel
            .apply(
                vec![route("test", addr, target)],
                HashMap::from([(ListenAddr(addr), listener)]),
            )
            .await
            .unwrap();
        // A health-check-like probe, then a real exchange (accepted after
        // the probe: the listener's queue is in order).
        drop(TcpStream::connect(addr).await.unwrap());
        assert_eq!(roundtrip(addr, b"data").await, b"data");
        tunnel.shutdown().await;
        let logged = log_lines(&log_file, lines).await;
        assert_eq!(logged.len(), lines, "log_empty={log_empty}: {logged:?}");
        assert!(
            logged.iter().any(|l| l.contains("sent=4 received=4")),
            "{logged:?}"
        );
    }
}

#[tokio::test]
async fn timeouts_beyond_the_clocks_range_mean_never_not_a_panic() {
    let (target, _) = echo_target().await;
    let (tunnel, addr, _log) = tunnel_to(target, |r| {
        r.connect_timeout = Period(Duration::MAX);
        r.idle_timeout = Period(Duration::MAX);
    })
    .await;
    assert_eq!(roundtrip(addr, b"still works").await, b"still works");
    tunnel.shutdown().await;
}

/// The keepalive timers `ss` shows for the established sockets with local
/// port `port` (`timer:(keepalive,29sec,0)`); empty when none has one.
fn keepalive_timers(port: u16) -> Vec<String> {
    let out = std::process::Command::new("ss")
        .args([
            "-tnoH",
            "state",
            "established",
            "sport",
            "=",
            &format!(":{port}"),
        ])
        .output()
        .expect("ss (iproute2) runs");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split("timer:(").nth(1))
        .filter(|t| t.starts_with("keepalive"))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn relayed_sockets_probe_their_peers_as_the_route_says() {
    use tunnel::settings::Keepalive;
    let (target, _) = echo_target().await;
    for (keepalive, wanted) in [
        (Keepalive::After(Period::from_secs(45)), true),
        (Keepalive::Off, false),
    ] {
        let (tunnel, addr, _log) = tunnel_to(target, |r| r.keepalive = keepalive).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        client.read_exact(&mut buf).await.unwrap();
        // The client's socket in the tunnel (inherited from the listener).
        let timers = keepalive_timers(addr.port());
        if wanted {
            assert_eq!(timers.len(), 1, "{timers:?}");
            // Under 45 s to the first probe: the route's time, not the
            // system's two hours.
            let secs: u64 = timers[0]
                .split(',')
                .nth(1)
                .and_then(|t| t.trim_end_matches("sec").parse().ok())
                .or_else(|| timers[0].contains("min").then_some(3600))
                .unwrap_or(0);
            assert!(secs <= 45, "{timers:?}");
        } else {
            assert!(timers.is_empty(), "{timers:?}");
        }
        drop(client);
        tunnel.shutdown().await;
    }
}
