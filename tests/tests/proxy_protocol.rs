//! The PROXY protocol against a real peer: HAProxy reads the headers the
//! tunnel writes (`accept-proxy`) and writes the ones our servers read
//! (`send-proxy-v2`). Clients connect from their own loopback addresses
//! (127.0.0.5, 127.0.0.6), so the address a log shows can only have come
//! from a header. Then every kind of bad header, each refused before the
//! service or the target sees a byte.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tests::{binary, connect_from, counting_echo_server, free_port, local, require, Running};

const CLIENT: [u8; 4] = [127, 0, 0, 5];
const DENIED: [u8; 4] = [127, 0, 0, 6];
const STRANGER: [u8; 4] = [127, 0, 0, 9];

/// HAProxy in TCP mode on a free port, with `frontend` and `backend` lines
/// (after `bind`, and the server line). It logs each connection to
/// stderr as `haproxy client=IP:PORT`.
fn haproxy(dir: &Path, bind_options: &str, server: &str) -> Running {
    let listen = local(free_port());
    let config = format!(
        "global
    log stderr format raw local0
defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend fe
    bind {listen} {bind_options}
    log-format \"haproxy client=%ci:%cp\"
    default_backend be
backend be
    server s1 {server}
"
    );
    let file = dir.join(format!("haproxy-{}.cfg", listen.port()));
    std::fs::write(&file, config).unwrap();
    let mut command = Command::new(require("haproxy"));
    command.arg("-db").arg("-f").arg(&file);
    Running::start(command, listen)
}

/// The first line of what `s` gets within a few seconds ("" when it is
/// closed first).
fn first_line(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while let Ok(1) = s.read(&mut byte) {
        if byte[0] == b'\n' {
            break;
        }
        got.push(byte[0]);
    }
    String::from_utf8_lossy(&got).trim_end().to_string()
}

/// Whether `s` is closed (or reset) without a byte within a few seconds.
fn closed_silently(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut byte = [0u8; 1];
    match s.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

/// A tunnel with the routes of `yaml` (after `routes:`), its access log
/// in its stderr.
fn tunnel(dir: &Path, yaml: &str) -> Running {
    let file = dir.join("tunnel.yaml");
    std::fs::write(&file, format!("admin: 127.0.0.1:0\nroutes:\n{yaml}")).unwrap();
    let mut command = Command::new(binary("tunnel"));
    command.arg("--config").arg(&file);
    Running::start_reporting(command, "listen")
}

#[test]
fn haproxy_reads_the_client_the_tunnel_names_in_v1_and_v2() {
    let dir = tempfile::tempdir().unwrap();
    let backend = counting_echo_server().0;
    let mut front = haproxy(dir.path(), "accept-proxy", &backend.to_string());
    for version in ["v1", "v2"] {
        let mut tunnel = tunnel(
            dir.path(),
            &format!(
                "  - name: to-haproxy\n    listen: 127.0.0.1:0\n    target: {}\n    send_proxy: {version}\n",
                front.addr
            ),
        );
        let mut s = connect_from(CLIENT, tunnel.addr);
        let me = s.local_addr().unwrap();
        s.write_all(b"through two proxies").unwrap();
        let mut got = [0u8; 19];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"through two proxies", "{version}");
        drop(s);
        // HAProxy logs a TCP connection when it ends.
        let line = front.wait_line(&format!("haproxy client={me}"));
        assert!(line.contains(&me.to_string()), "{version}: {line}");
        let line = tunnel.wait_line(&format!("client={me}"));
        assert!(
            line.contains(&format!("target_addr={}", front.addr)),
            "{line}"
        );
    }
}

#[test]
fn echo_server_behind_haproxy_sees_and_judges_the_real_client() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(binary("echo-server"));
    command
        .args(["--listen", "127.0.0.1:0", "--accept-proxy", "127.0.0.1/32"])
        .args(["--idle-timeout", "1s"])
        .env("ECHO_SERVER_DENY", "127.0.0.6/32");
    let mut echo = Running::start_reporting(command, "listen");
    let front = haproxy(dir.path(), "", &format!("{} send-proxy-v2", echo.addr));

    // The client's own address passes the access list and is logged.
    let mut s = connect_from(CLIENT, front.addr);
    let me = s.local_addr().unwrap();
    assert!(
        first_line(&mut s).starts_with("Welcome to the date/time service"),
        "no greeting through HAProxy"
    );
    let line = echo.wait_line("idle timeout");
    assert!(line.contains(&format!("peer={me}")), "{line}");
    assert!(line.contains("via=127.0.0.1:"), "{line}");

    // HAProxy's own address (127.0.0.1) is allowed; the client it names
    // is not.
    let mut s = connect_from(DENIED, front.addr);
    let denied = s.local_addr().unwrap();
    assert!(closed_silently(&mut s), "a denied client was served");
    let line = echo.wait_line("refused by access list");
    assert!(
        line.contains(&format!("peer={denied} via=127.0.0.1:")),
        "{line}"
    );
}

#[test]
fn the_tunnel_behind_haproxy_logs_the_hop_and_limits_each_real_client() {
    let dir = tempfile::tempdir().unwrap();
    let (target, _) = counting_echo_server();
    let mut tunnel = tunnel(
        dir.path(),
        &format!(
            "  - name: behind
    listen: 127.0.0.1:0
    target: {target}
    accept_proxy: [127.0.0.1/32]
    per_source: {{max_connections: 1}}
"
        ),
    );
    let front = haproxy(dir.path(), "", &format!("{} send-proxy-v2", tunnel.addr));
    let mut first = connect_from(CLIENT, front.addr);
    let me = first.local_addr().unwrap();
    first.write_all(b"ping").unwrap();
    let mut got = [0u8; 4];
    first.read_exact(&mut got).unwrap();
    // Every connection comes from HAProxy's one address, but the limit
    // counts the client it names: a second one from 127.0.0.5 is refused,
    // one from 127.0.0.6 is not.
    let mut second = connect_from(CLIENT, front.addr);
    let _ = second.write_all(b"ping");
    assert!(closed_silently(&mut second), "over the per-source limit");
    let mut other = connect_from(DENIED, front.addr);
    other.write_all(b"pong").unwrap();
    other.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"pong");
    let line = tunnel.wait_line("refused: per-source limit");
    assert!(line.contains("client=127.0.0.5:"), "{line}");
    assert!(line.contains(" via=127.0.0.1:"), "{line}");
    drop(first);
    let line = tunnel.wait_line(&format!("client={me} via=127.0.0.1:"));
    assert!(line.contains(&format!("target_addr={target}")), "{line}");
}

/// A header sent a byte at a time, each after `pause`.
fn dribble(s: &mut TcpStream, bytes: &[u8], pause: Duration) {
    for b in bytes {
        // A refused one finds the connection closed part way.
        if s.write_all(&[*b]).is_err() {
            return;
        }
        std::thread::sleep(pause);
    }
}

#[test]
fn bad_headers_never_reach_the_echo_server() {
    let mut command = Command::new(binary("echo-server"));
    command.args(["--listen", "127.0.0.1:0", "--accept-proxy", "127.0.0.1/32"]);
    let mut echo = Running::start_reporting(command, "listen");
    let port = echo.addr.port();
    let header = |client: &str| format!("PROXY TCP4 {client} 127.0.0.1 5000 {port}\r\n");

    let addr = echo.addr;
    let mut refused = |bytes: &[u8], close: bool, logged: &str| {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(bytes).unwrap();
        if close {
            s.shutdown(std::net::Shutdown::Write).unwrap();
        }
        assert!(closed_silently(&mut s), "served after {bytes:?}");
        echo.wait_line(logged);
    };
    refused(
        b"PROXY TCP4 192.0.2.1 10.0.0.1 1\r\n",
        false,
        "malformed PROXY v1 header",
    );
    refused(b"GET / HTTP/1.1\r\n\r\n", false, "no PROXY protocol header");
    refused(
        b"PROXY TCP4 192.0.2.1 ",
        true,
        "closed after 21 bytes of an incomplete PROXY header",
    );
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff".to_vec();
    v2.extend_from_slice(&[0; 64]);
    refused(&v2, false, "more than the 4112 taken");

    // A stranger may not name a client: refused, and logged as such.
    let mut s = connect_from(STRANGER, echo.addr);
    s.write_all(header("192.0.2.1").as_bytes()).unwrap();
    assert!(closed_silently(&mut s), "an untrusted header was honoured");
    let line = echo.wait_line("source not in accept_proxy");
    assert!(line.contains("peer=127.0.0.9:"), "{line}");
    // Without a header, the stranger is an ordinary client.
    let mut s = connect_from(STRANGER, echo.addr);
    assert!(first_line(&mut s).starts_with("Welcome"));

    // A slow balancer is waited for.
    let mut s = TcpStream::connect(echo.addr).unwrap();
    dribble(
        &mut s,
        header("192.0.2.1").as_bytes(),
        Duration::from_millis(10),
    );
    assert!(first_line(&mut s).starts_with("Welcome"));
}

#[test]
fn bad_headers_never_reach_a_tunnel_target() {
    let dir = tempfile::tempdir().unwrap();
    let (target, accepted) = counting_echo_server();
    let mut tunnel = tunnel(
        dir.path(),
        &format!(
            "  - name: gated
    listen: 127.0.0.1:0
    target: {target}
    accept_proxy: [127.0.0.1/32]
    connect_timeout: 1s
"
        ),
    );
    let addr = tunnel.addr;
    let mut refused = |from: [u8; 4], bytes: &[u8], pause: Option<Duration>, detail: &str| {
        let mut s = connect_from(from, addr);
        match pause {
            Some(pause) => dribble(&mut s, bytes, pause),
            None => s.write_all(bytes).unwrap(),
        }
        assert!(closed_silently(&mut s), "served after {bytes:?}");
        let line = tunnel.wait_line(detail);
        assert!(line.contains("end=\"PROXY header refused\""), "{line}");
    };
    let me = [127, 0, 0, 1];
    refused(
        me,
        b"PROXY TCP4 192.0.2.1\r\n",
        None,
        "malformed PROXY v1 header",
    );
    refused(
        me,
        b"SSH-2.0-OpenSSH_9.2\r\n",
        None,
        "no PROXY protocol header",
    );
    // Stalled after a few bytes: closed at the connect timeout.
    refused(
        me,
        b"PROXY TCP4 192.0",
        None,
        "an incomplete PROXY header (16 bytes) after 1s",
    );
    // Too slow: a byte every 100 ms does not make the 1 s.
    refused(
        me,
        b"PROXY TCP4 192.0.2.1 10.0.0.1 1 2\r\n",
        Some(Duration::from_millis(100)),
        "after 1s",
    );
    refused(
        STRANGER,
        b"PROXY TCP4 192.0.2.1 10.0.0.1 1 2\r\n",
        None,
        "source not in accept_proxy",
    );
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);

    // A good header, and the stranger without one, reach the target.
    let mut s = connect_from(me, addr);
    s.write_all(b"PROXY TCP4 192.0.2.1 10.0.0.1 4000 2\r\nhi")
        .unwrap();
    let mut got = [0u8; 2];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hi");
    drop(s);
    let mut s = connect_from(STRANGER, addr);
    s.write_all(b"yo").unwrap();
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"yo");
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    drop(s);
    tunnel.wait_line("client=192.0.2.1:4000 via=127.0.0.1:");

    let admin = tunnel.reported("", "admin");
    let mut m = TcpStream::connect(admin).unwrap();
    m.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    m.read_to_string(&mut body).unwrap();
    assert!(
        body.contains("tunnel_proxy_headers_refused_total{route=\"gated\"} 5"),
        "{body}"
    );
}

/// The tunnel's exit status and log for the routes of `yaml`.
fn refused_config(yaml: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tunnel.yaml");
    std::fs::write(&file, format!("routes:\n{yaml}")).unwrap();
    let out = Command::new(binary("tunnel"))
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(64), "{err}");
    err
}

#[test]
fn a_mismatched_setting_is_refused_with_its_key() {
    let err = refused_config(
        "  - name: dns\n    protocol: udp\n    listen: 127.0.0.1:0\n    target: 127.0.0.1:53\n    send_proxy: v2\n    accept_proxy: [10.0.0.0/8]\n",
    );
    assert!(err.contains("routes.0.send_proxy"), "{err}");
    assert!(err.contains("routes.0.accept_proxy"), "{err}");
    assert!(err.contains("is for TCP routes only"), "{err}");
    let err = refused_config(
        "  - name: web\n    listen: 127.0.0.1:0\n    target: 127.0.0.1:80\n    send_proxy: v3\n",
    );
    assert!(err.contains("routes.0.send_proxy"), "{err}");
    assert!(err.contains("v1 (text) or v2 (binary)"), "{err}");
    let err = refused_config(
        "  - name: web\n    listen: 127.0.0.1:0\n    target: 127.0.0.1:80\n    accept_proxy: [10.0.0.0/33]\n",
    );
    assert!(err.contains("routes.0.accept_proxy"), "{err}");
}
