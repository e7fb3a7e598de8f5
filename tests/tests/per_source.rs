//! Per-source limits on the real binaries: one loopback address (127.0.0.2)
//! floods a tunnel route or the echo-server while another (127.0.0.3) is
//! served as usual; the limit holds, the rate holds within 10 %, the
//! refusals are counted in the metrics and logged sparingly.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use tests::{binary, connect_from, counting_echo_server, wait_for, Running};

const FLOODER: [u8; 4] = [127, 0, 0, 2];
const NEIGHBOUR: [u8; 4] = [127, 0, 0, 3];

/// Whether a connection from `from` through the tunnel at `listen` is
/// served: what it sends comes back. A refused one is closed (or reset)
/// without a byte. The served connection is returned, open.
fn served(from: [u8; 4], listen: SocketAddr) -> Option<TcpStream> {
    let mut s = connect_from(from, listen);
    let _ = s.write_all(b"x");
    let mut got = [0u8; 1];
    match s.read(&mut got) {
        Ok(1) if got == *b"x" => Some(s),
        _ => None,
    }
}

/// GET `path` from the admin endpoint: the body.
fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default()
}

/// The value of `series` (name and labels) in a scrape.
fn value(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {series} in\n{body}"))
}

fn refusal_lines(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("refused: per-source limit"))
        .count()
}

#[test]
fn one_address_gets_no_more_than_its_limit_while_another_is_served() {
    let (target, _) = counting_echo_server();
    let mut command = Command::new(binary("tunnel"));
    command
        .args(["--listen", "127.0.0.1:0", "--target", &target.to_string()])
        .args(["--admin", "127.0.0.1:0"])
        // Nested settings from the environment, as a deployment sets them.
        .env("TUNNEL_PER_SOURCE__MAX_CONNECTIONS", "20");
    let mut tunnel = Running::start_reporting(command, "listen");
    let (listen, admin) = (tunnel.addr, tunnel.reported("", "admin"));

    let mut held = Vec::new();
    let mut refused = 0;
    for i in 0..500 {
        match served(FLOODER, listen) {
            Some(s) => held.push(s),
            None => refused += 1,
        }
        // The neighbour, in the middle of the flood, is served.
        if i % 100 == 50 {
            let mut s = served(NEIGHBOUR, listen).expect("127.0.0.3 was not served");
            s.write_all(b"more").unwrap();
            let mut got = [0u8; 4];
            s.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"more");
        }
    }
    assert_eq!(held.len(), 20, "{refused} refused");
    assert_eq!(refused, 480);
    // The twenty still work; closing them gives their places back.
    for s in &mut held {
        s.write_all(b"y").unwrap();
        let mut got = [0u8; 1];
        s.read_exact(&mut got).unwrap();
    }
    drop(held);
    // (Tries made before the tunnel has seen them close are refused.)
    let (mut again, mut tries) = (None, 0);
    wait_for(
        || {
            tries += 1;
            again = served(FLOODER, listen);
            again.is_some()
        },
        "127.0.0.2 to be served again after closing its connections",
    );

    let body = http_get(admin, "/metrics");
    tests::promtool_check(&body);
    assert_eq!(
        value(
            &body,
            "tunnel_per_source_refused_total{route=\"default\",limit=\"connections\"}"
        ),
        f64::from(480 + tries - 1)
    );
    assert_eq!(
        value(
            &body,
            "tunnel_per_source_refused_total{route=\"default\",limit=\"rate\"}"
        ),
        0.0
    );
    // The flooder, with a connection open (the neighbour, with none and
    // nothing else to remember, may be forgotten already).
    let sources = value(&body, "tunnel_per_source_sources{route=\"default\"}");
    assert!((1.0..=2.0).contains(&sources), "{sources}");
    drop(again);

    // A line a second at most for the flooding source, not 480.
    tunnel.wait_line("refused: per-source limit");
    let (code, log) = tunnel.stop();
    assert_eq!(code, Some(0), "{log}");
    let lines = refusal_lines(&log);
    assert!((1..=10).contains(&lines), "{lines} refusal lines:\n{log}");
    assert!(
        log.contains("client=127.0.0.2:")
            && log.contains("127.0.0.2 has 20 connections open, the most allowed per source"),
        "{log}"
    );
}

#[test]
fn a_routes_rate_holds_within_ten_percent() {
    let (target, _) = counting_echo_server();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tunnel.yaml");
    std::fs::write(
        &config,
        format!(
            "admin: 127.0.0.1:0
routes:
  - name: edge
    listen: 127.0.0.1:0
    target: {target}
    per_source: {{rate: 50/s, burst: 10}}
"
        ),
    )
    .unwrap();
    let mut command = Command::new(binary("tunnel"));
    command.arg("--config").arg(&config);
    let mut tunnel = Running::start_reporting(command, "listen");
    let (listen, admin) = (tunnel.addr, tunnel.reported("", "admin"));

    // Three seconds of new connections from one address, 200 a second
    // tried (four times the rate): the burst, then 50 a second.
    let (mut accepted, mut refused) = (0u32, 0u32);
    let start = Instant::now();
    let mut next = start;
    let mut neighbour_checks = 0;
    while start.elapsed() < Duration::from_secs(3) {
        match served(FLOODER, listen) {
            Some(_) => accepted += 1,
            None => refused += 1,
        }
        if accepted + refused == 100 * (neighbour_checks + 1) {
            neighbour_checks += 1;
            assert!(
                served(NEIGHBOUR, listen).is_some(),
                "127.0.0.3 was refused during the flood"
            );
        }
        next += Duration::from_millis(5);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let expected = 10.0 + 50.0 * 3.0;
    assert!(
        (f64::from(accepted) - expected).abs() <= expected * 0.1,
        "{accepted} accepted, {refused} refused; expected {expected} within 10 %"
    );
    assert!(refused > 200, "{refused} refused");
    assert!(neighbour_checks >= 3);

    let body = http_get(admin, "/metrics");
    tests::promtool_check(&body);
    assert_eq!(
        value(
            &body,
            "tunnel_per_source_refused_total{route=\"edge\",limit=\"rate\"}"
        ),
        f64::from(refused)
    );
    let (code, log) = tunnel.stop();
    assert_eq!(code, Some(0), "{log}");
    // About one line a second for one source: far fewer than refusals.
    let lines = refusal_lines(&log);
    assert!(
        (2..=6).contains(&lines),
        "{lines} refusal lines for {refused} refusals:\n{log}"
    );
    assert!(
        log.contains("opens connections faster than 50/s (burst 10)")
            && log.contains("more refusals since the last line"),
        "{log}"
    );
}

#[test]
fn the_echo_server_limits_each_source_from_its_environment() {
    let mut command = Command::new(binary("echo-server"));
    command
        .args(["--listen", "127.0.0.1:0"])
        .env("ECHO_SERVER_PER_SOURCE__MAX_CONNECTIONS", "2");
    let mut server = Running::start_reporting(command, "listen");
    let listen = server.addr;
    // A served session starts with the menu; a refused one is closed.
    let greeted = |s: &mut TcpStream| {
        let mut buf = [0u8; 64];
        matches!(s.read(&mut buf), Ok(n) if n > 0)
    };
    let mut first = connect_from(FLOODER, listen);
    let mut second = connect_from(FLOODER, listen);
    assert!(greeted(&mut first) && greeted(&mut second));
    let mut third = connect_from(FLOODER, listen);
    assert!(!greeted(&mut third), "a third session from 127.0.0.2");
    assert!(greeted(&mut connect_from(NEIGHBOUR, listen)));
    let line = server.wait_line("refused: per-source limit");
    assert!(
        line.contains("peer=127.0.0.2:") && line.contains("2 connections open"),
        "{line}"
    );
    drop(first);
    wait_for(
        || greeted(&mut connect_from(FLOODER, listen)),
        "a place for 127.0.0.2 after closing a session",
    );
    drop(second);

    // Settings that cannot work are refused with the reason.
    let out = Command::new(binary("echo-server"))
        .arg("--print-config")
        .env("ECHO_SERVER_PER_SOURCE__RATE", "0/s")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("per_source") && err.contains("a rate of 0 would refuse every connection"),
        "{err}"
    );
    // The square server reads the same settings.
    let out = Command::new(binary("square-server"))
        .arg("--print-config")
        .env("SQUARE_SERVER_PER_SOURCE__RATE", "600/min")
        .env("SQUARE_SERVER_PER_SOURCE__BURST", "20")
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{shown}");
    assert!(
        shown.contains("per_source.rate = \"600/min\"") && shown.contains("per_source.burst = 20"),
        "{shown}"
    );
}
