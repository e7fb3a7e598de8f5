//! The tunnel under systemd, with systemd's own tools: socket activation by
//! `systemd-socket-activate`, the unit files checked by `systemd-analyze
//! verify`, and the readiness notifications a service manager hears on its
//! `NOTIFY_SOCKET`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tests::{binary, echo_server, free_port, local, require, Running};

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn echo(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).unwrap();
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).unwrap();
    got
}

/// Two loopback addresses with ports free a moment ago, not the same one
/// (see `free_port` for the race this accepts: `systemd-socket-activate`
/// binds them itself).
fn two_free() -> (SocketAddr, SocketAddr) {
    let first = local(free_port());
    loop {
        let second = local(free_port());
        if second != first {
            return (first, second);
        }
    }
}

/// `systemd-socket-activate` listening on `listen` (addresses, or bare
/// ports), then running `program` with `args` on those sockets (at the
/// first connection, as it does).
fn socket_activate(listen: &[&dyn std::fmt::Display], program: &str, args: &[&str]) -> Command {
    let mut command = Command::new(require("systemd-socket-activate"));
    for addr in listen {
        command.arg("-l").arg(addr.to_string());
    }
    command.arg(binary(program)).args(args);
    command
}

#[test]
fn systemd_socket_activate_starts_the_tunnel_on_the_inherited_socket() {
    let target = echo_server();
    // The second socket is one no route names: it is reported.
    let (used, unused) = two_free();
    let command = socket_activate(
        &[&used, &unused],
        "tunnel",
        &[
            "--listen",
            &used.to_string(),
            "--target",
            &target.to_string(),
        ],
    );
    // The probe that finds it listening is the connection that makes
    // systemd-socket-activate start the tunnel.
    let mut tunnel = Running::start(command, used);
    assert_eq!(echo(&mut connect(used), b"activated"), b"activated");
    let line = tunnel.wait_line("using the socket the service manager passed");
    assert!(line.contains(&format!("inherited={used}")), "{line}");
    let line = tunnel.wait_line("nothing is configured to listen on");
    assert!(line.contains(&format!("inherited={unused}")), "{line}");
    tunnel.wait_line("route ready");
    let (code, stderr) = tunnel.stop();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains("already in use"), "{stderr}");
    assert!(!stderr.contains("ERROR"), "{stderr}");
}

#[test]
fn a_reload_takes_an_inherited_socket_a_new_route_names() {
    let (a, b) = (echo_server(), echo_server());
    let (first, second) = two_free();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tunnel.yaml");
    let route = |name: &str, listen: SocketAddr, target: SocketAddr| {
        format!("  - name: {name}\n    listen: {listen}\n    target: {target}\n")
    };
    std::fs::write(&config, format!("routes:\n{}", route("first", first, a))).unwrap();
    let command = socket_activate(
        &[&first, &second],
        "tunnel",
        &["--config", config.to_str().unwrap()],
    );
    let mut tunnel = Running::start(command, first);
    tunnel.wait_line("route ready");
    std::fs::write(
        &config,
        format!(
            "routes:\n{}{}",
            route("first", first, a),
            route("second", second, b)
        ),
    )
    .unwrap();
    tunnel.signal("HUP");
    tunnel.wait_line("reloaded");
    // Bound by anyone else, the address would be taken: the tunnel holds
    // the passed socket, so only that socket can serve it.
    assert_eq!(echo(&mut connect(second), b"second"), b"second");
    assert_eq!(echo(&mut connect(first), b"first"), b"first");
    let (code, stderr) = tunnel.stop();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("using the socket") && l.contains(&format!("inherited={second}"))),
        "{stderr}"
    );
    assert!(!stderr.contains("reload failed"), "{stderr}");
}

#[test]
fn echo_server_takes_its_endpoint_from_socket_activation_too() {
    let addr = local(free_port());
    let command = socket_activate(&[&addr], "echo-server", &["--listen", &addr.to_string()]);
    let mut server = Running::start(command, addr);
    let mut s = connect(addr);
    let mut menu = [0u8; 64];
    let n = s.read(&mut menu).unwrap();
    assert!(n > 0, "no greeting through the inherited socket");
    let line = server.wait_line("using the socket the service manager passed");
    assert!(line.contains(&format!("inherited={addr}")), "{line}");
    let (code, stderr) = server.stop();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains("already in use"), "{stderr}");
}

/// The unit files with ExecStart= naming the binary just built (systemd
/// checks that the command exists), written into `dir`.
fn units_in(dir: &Path) -> (String, String) {
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd");
    let service = std::fs::read_to_string(units.join("tunnel.service")).unwrap();
    let socket = std::fs::read_to_string(units.join("tunnel.socket")).unwrap();
    let built = binary("tunnel");
    let service = service.replace(
        "ExecStart=/usr/local/bin/tunnel",
        &format!("ExecStart={}", built.display()),
    );
    assert!(service.contains(&format!("ExecStart={}", built.display())));
    std::fs::write(dir.join("tunnel.socket"), &socket).unwrap();
    (service, socket)
}

/// `systemd-analyze verify` on the units in `dir`: its success and what it
/// said (it says about a key it cannot use, and succeeds all the same).
fn verify(dir: &Path) -> (bool, String) {
    let out = Command::new(require("systemd-analyze"))
        .arg("verify")
        // No manual pages in a container: Documentation= is not looked up.
        .arg("--man=no")
        .arg(dir.join("tunnel.service"))
        .arg(dir.join("tunnel.socket"))
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[test]
fn systemd_analyze_verify_accepts_the_unit_files() {
    let dir = tempfile::tempdir().unwrap();
    let (service, socket) = units_in(dir.path());
    std::fs::write(dir.path().join("tunnel.service"), &service).unwrap();
    let (ok, said) = verify(dir.path());
    assert!(
        ok && said.trim().is_empty(),
        "systemd-analyze verify:\n{said}"
    );

    // What the issue asks of them.
    for line in [
        "Type=notify",
        "ExecReload=kill -HUP $MAINPID",
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "NoNewPrivileges=yes",
        "SystemCallFilter=@system-service",
        "Environment=TUNNEL_CONFIG=/etc/tunnel/tunnel.yaml",
    ] {
        assert!(
            service.lines().any(|l| l == line),
            "no {line} in tunnel.service"
        );
    }
    assert!(socket.lines().any(|l| l.starts_with("ListenStream=")));

    // The check sees a mistake: a misspelt value is said, if not failed.
    let broken = service.replace("ProtectHome=yes", "ProtectHome=yess");
    std::fs::write(dir.path().join("tunnel.service"), broken).unwrap();
    let (_, said) = verify(dir.path());
    assert!(said.contains("yess"), "systemd-analyze verify:\n{said}");
}

/// The next notification, as lines.
fn notification(socket: &UnixDatagram) -> Vec<String> {
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("a notification within 20 s");
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .map(str::to_string)
        .collect()
}

fn has(message: &[String], field: &str) -> bool {
    message.iter().any(|l| l == field)
}

fn monotonic_usec() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    now.tv_sec() as u64 * 1_000_000 + now.tv_nsec() as u64 / 1_000
}

#[test]
fn the_notify_socket_hears_ready_reloading_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let manager = UnixDatagram::bind(&path).unwrap();
    manager
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let target = echo_server();
    let mut command = Command::new(binary("tunnel"));
    command
        .args(["--listen", "127.0.0.1:0", "--target", &target.to_string()])
        .env("NOTIFY_SOCKET", &path);
    let tunnel = Running::start_reporting(command, "listen");

    let ready = notification(&manager);
    assert!(has(&ready, "READY=1"), "{ready:?}");
    assert!(has(&ready, "STATUS=serving 1 route"), "{ready:?}");
    assert_eq!(echo(&mut connect(tunnel.addr), b"ready"), b"ready");

    let before = monotonic_usec();
    tunnel.signal("HUP");
    let reloading = notification(&manager);
    let after = monotonic_usec();
    assert!(has(&reloading, "RELOADING=1"), "{reloading:?}");
    let usec: u64 = reloading
        .iter()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading:?}"))
        .parse()
        .unwrap();
    assert!(
        before <= usec && usec <= after,
        "{before} <= {usec} <= {after}"
    );
    let reloaded = notification(&manager);
    assert!(has(&reloaded, "READY=1"), "{reloaded:?}");
    assert!(has(&reloaded, "STATUS=serving 1 route"), "{reloaded:?}");

    let (code, stderr) = tunnel.stop();
    assert_eq!(code, Some(0), "{stderr}");
    let stopping = notification(&manager);
    assert!(has(&stopping, "STOPPING=1"), "{stopping:?}");
    // Nothing more, and nothing about a notification that failed.
    manager.set_nonblocking(true).unwrap();
    assert!(manager.recv(&mut [0u8; 64]).is_err(), "an extra message");
    assert!(!stderr.contains("NOTIFY_SOCKET"), "{stderr}");
}

#[test]
fn an_abstract_notify_socket_hears_echo_server_ready_and_stopping() {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("tests-notify-{}-{}", std::process::id(), free_port());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let manager = UnixDatagram::bind_addr(&addr).unwrap();
    manager
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut command = Command::new(binary("echo-server"));
    command
        .args(["--listen", "127.0.0.1:0"])
        .env("NOTIFY_SOCKET", format!("@{name}"));
    let server = Running::start_reporting(command, "listen");
    let ready = notification(&manager);
    assert!(has(&ready, "READY=1"), "{ready:?}");
    assert!(
        ready
            .iter()
            .any(|l| l.starts_with("STATUS=") && l.contains(&server.addr.to_string())),
        "{ready:?}"
    );
    let (code, stderr) = server.stop();
    assert_eq!(code, Some(0), "{stderr}");
    let stopping = notification(&manager);
    assert!(has(&stopping, "STOPPING=1"), "{stopping:?}");
}

#[test]
fn a_notify_socket_nobody_listens_on_is_said_once_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let target = echo_server();
    let mut command = Command::new(binary("tunnel"));
    command
        .args(["--listen", "127.0.0.1:0", "--target", &target.to_string()])
        .env("NOTIFY_SOCKET", dir.path().join("nobody"));
    let mut tunnel = Running::start_reporting(command, "listen");
    assert_eq!(echo(&mut connect(tunnel.addr), b"1"), b"1");
    tunnel.signal("HUP");
    tunnel.wait_line("reloaded");
    assert_eq!(echo(&mut connect(tunnel.addr), b"2"), b"2");
    let (code, stderr) = tunnel.stop();
    assert_eq!(code, Some(0), "{stderr}");
    let said = stderr
        .lines()
        .filter(|l| l.contains("NOTIFY_SOCKET"))
        .count();
    assert_eq!(said, 1, "{stderr}");
}

#[test]
fn a_passed_socket_written_differently_is_named_in_the_bind_error() {
    // A bare port is `[::]:PORT` to systemd, which takes IPv4 too: the
    // route's 0.0.0.0:PORT cannot be bound beside it.
    let port = free_port();
    let command = socket_activate(
        &[&port],
        "tunnel",
        &[
            "--listen",
            &format!("0.0.0.0:{port}"),
            "--target",
            "127.0.0.1:9",
        ],
    );
    let mut tunnel = Running::start(command, local(port));
    let line = tunnel.wait_line("already in use");
    assert!(
        line.contains(&format!(
            "0.0.0.0:{port} is already in use, by the socket the service manager passed for [::]:{port}"
        )),
        "{line}"
    );
    assert!(line.contains("ListenStream="), "{line}");
    let status = tunnel.child.wait().unwrap();
    assert_eq!(status.code(), Some(64), "{}", tunnel.stderr());
}
