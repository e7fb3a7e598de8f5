//! The real `tunnel` with TLS on either side, against real peers:
//! `openssl s_client` as the client, the date/time and square servers
//! serving TLS as targets. Terminating (TLS in, plain out), originating
//! (plain in, TLS out), both, mutual TLS whose refusals never reach the
//! target, and routes chosen by server name on one port (SNI), passed
//! through or terminated.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tests::pki::{s_client, Pki};
use tests::{binary, counting_echo_server, Running};

/// A tunnel started with `args`, reporting its first listen address.
fn tunnel(args: &[&str]) -> Running {
    let mut command = Command::new(binary("tunnel"));
    command.args(args);
    Running::start_reporting(command, "listen")
}

/// `program` serving TLS as `NAME.test` (`--tls-cert NAME.pem`).
fn tls_target(pki: &Pki, program: &str, field: &str, name: &str) -> Running {
    let mut command = Command::new(binary(program));
    command
        .args(["--listen", "127.0.0.1:0"])
        .args(["--tls-cert", &pki.arg(&format!("{name}.pem"))])
        .args(["--tls-key", &pki.arg(&format!("{name}.key"))]);
    Running::start_reporting(command, field)
}

/// Sends `line` over a plain connection to `addr` and reads until `until`.
fn plain_exchange(addr: SocketAddr, line: &str, until: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(line.as_bytes()).unwrap();
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    while !got.contains(until) {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
    got
}

#[test]
fn the_tunnel_terminates_tls_with_mutual_tls_and_refusals_never_reach_the_target() {
    let pki = Pki::new();
    let (backend, accepted) = counting_echo_server();
    let gateway = tunnel(&[
        "--listen",
        "127.0.0.1:0",
        "--target",
        &backend.to_string(),
        "--tls-cert",
        &pki.arg("server.pem"),
        "--tls-key",
        &pki.arg("server.key"),
        "--tls-client-ca",
        &pki.arg("ca.pem"),
        "--tls-client-names",
        "client.test",
    ]);
    let ca = pki.path("ca.pem");
    let me = pki.presenting("client");
    let me: Vec<&str> = me.iter().map(String::as_str).collect();
    let (ok, text) = s_client(
        gateway.addr,
        &ca,
        "server.test",
        &me,
        "hello through TLS\n",
        "hello through TLS",
    );
    assert!(ok, "{text}");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    for name in ["other", "stranger", "expired"] {
        let args = pki.presenting(name);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, text) = s_client(gateway.addr, &ca, "server.test", &args, "x\n", "x\n");
        assert!(!ok, "{name} got through: {text}");
    }
    let (ok, text) = s_client(gateway.addr, &ca, "server.test", &[], "x\n", "x\n");
    assert!(!ok, "a client without a certificate got through: {text}");
    // A plain client, too, is turned away before any target is dialled.
    let got = plain_exchange(gateway.addr, "plain\n", "plain");
    assert!(!got.contains("plain"), "{got}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "a refused client reached the target"
    );
    let (code, log) = gateway.stop();
    assert_eq!(code, Some(0), "{log}");
    for reason in [
        "client certificate names other.test are not in tls_client_names",
        "UnknownIssuer",
        "the client's certificate expired on 2020-01-02T00:00:00Z",
        "peer sent no certificates",
    ] {
        assert!(log.contains(reason), "{reason} not logged:\n{log}");
    }
    assert_eq!(
        log.matches("end=\"TLS handshake failed\"").count(),
        5,
        "one access-log line per refused handshake:\n{log}"
    );
}

#[test]
fn the_tunnel_originates_tls_and_re_encrypts() {
    let pki = Pki::new();
    let square = tls_target(&pki, "square-server", "addr", "server");
    // Plain in, TLS out: a plain client gets its squares from the TLS
    // server, whose certificate is checked against the CA and its name.
    let origin = tunnel(&[
        "--listen",
        "127.0.0.1:0",
        "--target",
        &square.addr.to_string(),
        "--target-tls",
        "--target-ca",
        &pki.arg("ca.pem"),
        "--target-server-name",
        "server.test",
    ]);
    let got = plain_exchange(origin.addr, "12\n", "144\n");
    assert!(got.contains("144\n"), "{got}");
    // TLS in with one certificate, TLS out to the target with its own CA.
    let both = tunnel(&[
        "--listen",
        "127.0.0.1:0",
        "--target",
        &square.addr.to_string(),
        "--tls-cert",
        &pki.arg("server2.pem"),
        "--tls-key",
        &pki.arg("server2.key"),
        "--target-ca",
        &pki.arg("ca.pem"),
        "--target-server-name",
        "server.test",
    ]);
    let (ok, text) = s_client(
        both.addr,
        &pki.path("ca.pem"),
        "server2.test",
        &[],
        "1.5\n",
        "2.25\n",
    );
    assert!(ok, "{text}");
    // The wrong name for the target: the TLS handshake towards it fails,
    // and the client is closed with a log line saying why.
    let wrong = tunnel(&[
        "--listen",
        "127.0.0.1:0",
        "--target",
        &square.addr.to_string(),
        "--target-ca",
        &pki.arg("ca.pem"),
        "--target-server-name",
        "elsewhere.test",
    ]);
    let got = plain_exchange(wrong.addr, "12\n", "144\n");
    assert!(!got.contains("144"), "{got}");
    for t in [origin, both] {
        let (code, log) = t.stop();
        assert_eq!(code, Some(0), "{log}");
    }
    let (_, log) = wrong.stop();
    assert!(log.contains("TLS to the target failed"), "{log}");
    assert!(log.contains("elsewhere.test"), "{log}");
}

#[test]
fn routes_share_a_port_by_server_name_passed_through_or_terminated() {
    let pki = Pki::new();
    pki.issue("a", "ca");
    pki.issue("b", "ca");
    // a.test: passed through to a TLS square-server holding a.test's
    // certificate; b.test: terminated by the tunnel, plain to an echo.
    let square = tls_target(&pki, "square-server", "addr", "a");
    let (echo, echoed) = counting_echo_server();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tunnel.yaml");
    std::fs::write(
        &config,
        format!(
            "routes:\n\
             - name: squares\n  listen: 127.0.0.1:0\n  sni: [a.test]\n  target: {square}\n\
             - name: echo\n  listen: 127.0.0.1:0\n  sni: ['*.b.test', b.test]\n  target: {echo}\n  tls: {{cert: {bc}, key: {bk}}}\n",
            square = square.addr,
            bc = pki.arg("b.pem"),
            bk = pki.arg("b.key"),
        ),
    )
    .unwrap();
    let mut command = Command::new(binary("tunnel"));
    command.arg("--config").arg(&config);
    let mut sni = Running::start_reporting(command, "listen");
    let ca = pki.path("ca.pem");
    let (ok, text) = s_client(sni.addr, &ca, "a.test", &[], "7\n", "49\n");
    assert!(ok, "passthrough: {text}");
    let (ok, text) = s_client(sni.addr, &ca, "b.test", &[], "ping\n", "ping\n");
    assert!(ok, "terminated: {text}");
    assert_eq!(echoed.load(Ordering::SeqCst), 1);
    let (ok, text) = s_client(sni.addr, &ca, "c.test", &[], "ping\n", "ping\n");
    assert!(!ok, "an unknown name got through: {text}");
    assert!(text.contains("unrecognized name"), "{text}");
    sni.wait_line("no route for server name c.test");
    let (code, log) = sni.stop();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("route=\"squares\""), "{log}");
    assert!(
        log.contains("end=\"no route for the server name\""),
        "{log}"
    );
}

/// GETs `path` from the admin endpoint; the body.
fn admin_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default()
}

#[test]
fn a_route_serves_its_renewed_certificate_and_counts_its_handshakes() {
    let pki = Pki::new();
    let (cert, key) = (pki.path("live.pem"), pki.path("live.key"));
    let install = |from: &str| {
        for (ext, to) in [("pem", &cert), ("key", &key)] {
            let next = pki.path(&format!("next.{ext}"));
            std::fs::copy(pki.path(&format!("{from}.{ext}")), &next).unwrap();
            std::fs::rename(&next, to).unwrap();
        }
    };
    install("server");
    let backend = tests::echo_server();
    let mut command = Command::new(binary("tunnel"));
    command
        .args(["--listen", "127.0.0.1:0", "--target", &backend.to_string()])
        .args(["--tls-cert", cert.to_str().unwrap()])
        .args(["--tls-key", key.to_str().unwrap()])
        .args(["--admin", "127.0.0.1:0"]);
    let mut t = Running::start_reporting(command, "listen");
    let admin = t.reported("", "admin");
    let ca = pki.path("ca.pem");
    assert!(tests::pki::served_subject(t.addr, &ca).contains("server.test"));
    install("server2");
    t.wait_line("TLS certificate re-read (the files changed)");
    assert!(tests::pki::served_subject(t.addr, &ca).contains("server2.test"));
    // A client that is not TLS at all: a protocol failure.
    let got = plain_exchange(t.addr, "GET / HTTP/1.1\r\n\r\n", "HTTP");
    assert!(!got.contains("HTTP/1.1 200"), "{got}");

    let body = admin_get(admin, "/metrics");
    let value = |series: &str| -> f64 {
        body.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no {series} in\n{body}"))
    };
    assert!(value("tunnel_tls_handshakes_total{route=\"default\"}") >= 2.0);
    assert_eq!(
        value("tunnel_tls_handshake_failures_total{route=\"default\",reason=\"protocol\"}"),
        1.0
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let expiry = value("tunnel_tls_certificate_expiry_seconds{route=\"default\"}");
    assert!(expiry > now + 20.0 * 86_400.0, "{expiry}");
    tests::promtool_check(&body);
    let (code, log) = t.stop();
    assert_eq!(code, Some(0), "{log}");
}
