//! The real `tunnel` binary tried as an attacker and a careless operator
//! would: a dead log pipe, access lists written in IPv4-mapped form, a cap
//! shared by a route's addresses and across reloads, settings that cannot
//! work, a second stop signal, rinetd.conf beside the environment and
//! flags, overlapping listeners, a planted pid-file symlink.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tests::{
    binary, connect_from, counting_echo_server, free_port, listening, local, spawn_reporting,
    wait_for, Running,
};

fn echoes(s: &mut TcpStream, msg: &[u8]) -> bool {
    if s.write_all(msg).is_err() {
        return false;
    }
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).is_ok() && got == msg
}

/// Whether `s` gets no byte within `wait` (it is not being served).
fn silent_for(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 16];
    let silent = matches!(s.read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    silent
}

/// Whether the connection was closed or reset without a byte.
fn refused(s: &mut TcpStream) -> bool {
    let _ = s.write_all(b"knock");
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(0) | Err(_))
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// The tunnel with stdout and stderr pipes whose reading ends are already
/// closed: every log write fails (EPIPE), the start-up lines' included.
/// Where it listens comes from the kernel: `count` addresses.
fn start_deaf(mut command: Command, count: usize) -> (Child, Vec<SocketAddr>) {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    drop(child.stderr.take());
    let addrs = listening(&mut child, count);
    (child, addrs)
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn a_dead_log_pipe_never_stops_the_tunnel() {
    let (target, _) = counting_echo_server();
    let dir = tempfile::tempdir().unwrap();
    let access = dir.path().join("access.log");
    let mut command = Command::new(binary("tunnel"));
    // The admin endpoint on an address of its own, to tell the two apart.
    command
        .env("TUNNEL_LISTEN", "127.0.0.1:0")
        .env("TUNNEL_TARGET", target.to_string())
        .env("TUNNEL_DENY", "127.0.0.2")
        .env("TUNNEL_ADMIN", "127.0.0.3:0")
        .env("TUNNEL_ACCESS_LOG", &access);
    let (child, addrs) = start_deaf(command, 2);
    let mut tunnel = Killed(child);
    let on = |ip: [u8; 4]| {
        *addrs
            .iter()
            .find(|a| a.ip() == std::net::IpAddr::from(ip))
            .unwrap()
    };
    let (listen, admin) = (on([127, 0, 0, 1]), on([127, 0, 0, 3]));
    for _ in 0..3 {
        assert!(refused(&mut connect_from([127, 0, 0, 2], listen)));
        let mut client = connect_from([127, 0, 0, 1], listen);
        assert!(
            echoes(&mut client, b"still here"),
            "the tunnel stopped serving"
        );
    }
    assert!(
        tunnel.0.try_wait().unwrap().is_none(),
        "the tunnel exited when its log pipe closed"
    );
    assert!(http_get(admin, "/healthz").starts_with("HTTP/1.1 200"));
    wait_for(
        || {
            let log = read(&access);
            log.matches("end=\"refused by access list\"").count() == 3
                && log.matches("end=\"closed by client\"").count() == 3
        },
        "every connection in the access log",
    );
}

#[test]
fn a_log_reader_that_never_reads_never_stalls_the_tunnel() {
    let (target, _) = counting_echo_server();
    let mut command = Command::new(binary("tunnel"));
    command
        .args(["--listen", "127.0.0.1:0", "--target", &target.to_string()])
        .env("TUNNEL_DENY", "127.0.0.2")
        .stdout(Stdio::null());
    // Stderr is a pipe nobody reads after the line that says where the
    // tunnel listens: after 64 KiB of log lines a blocking write would
    // wait forever.
    let (child, addrs, _unread) = spawn_reporting(command, &["listen"]);
    let _tunnel = Killed(child);
    let listen = addrs[0];
    for i in 0..1500 {
        if i % 3 == 0 {
            assert!(refused(&mut connect_from([127, 0, 0, 2], listen)));
        } else {
            let mut client = connect_from([127, 0, 0, 1], listen);
            assert!(
                echoes(&mut client, b"through"),
                "connection {i} was not served: the tunnel waits on its log"
            );
        }
    }
}

#[test]
fn mapped_access_entries_match_and_clients_are_logged_as_ipv4() {
    let (target, _) = counting_echo_server();
    let dir = tempfile::tempdir().unwrap();
    let access = dir.path().join("access.log");
    let mut command = Command::new(binary("tunnel"));
    command
        .env("TUNNEL_LISTEN", "[::]:0")
        .env("TUNNEL_TARGET", target.to_string())
        .env("TUNNEL_DENY", "::ffff:127.0.0.2, ::ffff:127.0.3.0/120")
        .env("TUNNEL_ACCESS_LOG", &access);
    let tunnel = Running::start_reporting(command, "listen");
    let port = tunnel.addr.port();
    assert!(refused(&mut connect_from([127, 0, 0, 2], local(port))));
    assert!(refused(&mut connect_from([127, 0, 3, 9], local(port))));
    assert!(echoes(
        &mut connect_from([127, 0, 0, 1], local(port)),
        b"in"
    ));
    wait_for(
        || read(&access).lines().count() == 3,
        "three access-log lines",
    );
    let log = read(&access);
    assert!(!log.contains("::ffff:"), "{log}");
    assert!(
        log.contains("client=127.0.0.2:") && log.contains("client=127.0.0.1:"),
        "{log}"
    );
    let (_, stderr) = tunnel.stop();
    assert!(!stderr.contains("::ffff:"), "{stderr}");
}

fn write_config(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[test]
fn a_routes_cap_is_shared_by_its_addresses_and_kept_across_reloads() {
    let (target, _) = counting_echo_server();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tunnel.yaml");
    // Ports the tunnel chooses, on two addresses (one route cannot name
    // 127.0.0.1:0 twice).
    write_config(
        &config,
        &format!(
            "routes:\n  - name: capped\n    listen: [127.0.0.1:0, 127.0.0.2:0]\n    target: {target}\n    max_connections: 1\n"
        ),
    );
    let mut command = Command::new(binary("tunnel"));
    command.arg("--config").arg(&config);
    let mut tunnel = Running::start_reporting(command, "listen");
    let (a, b) = (
        tunnel.reported("listen=127.0.0.1:", "listen"),
        tunnel.reported("listen=127.0.0.2:", "listen"),
    );

    let mut first = connect_from([127, 0, 0, 1], a);
    assert!(echoes(&mut first, b"first"));
    let mut other_address = connect_from([127, 0, 0, 1], b);
    other_address.write_all(b"second").unwrap();
    assert!(
        silent_for(&mut other_address, Duration::from_millis(700)),
        "the route's second address served a second connection over max_connections: 1"
    );
    drop(other_address);

    tunnel.signal("HUP");
    wait_for(|| tunnel.stderr().contains("reloaded"), "the reload");
    let mut after_reload = connect_from([127, 0, 0, 1], a);
    after_reload.write_all(b"third").unwrap();
    assert!(
        silent_for(&mut after_reload, Duration::from_millis(700)),
        "a reload handed out a fresh quota while the first connection runs"
    );
    drop(first);
    let mut got = [0u8; 5];
    after_reload.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"third");
}

#[test]
fn a_replaced_balancers_health_checks_stop_at_the_reload() {
    let (old_target, old_accepts) = counting_echo_server();
    let (new_target, _) = counting_echo_server();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tunnel.yaml");
    // The same listen address in both: the reload keeps the listener.
    let route = |target: SocketAddr| {
        format!(
            "routes:\n  - name: checked\n    listen: 127.0.0.1:0\n    target: {target}\n    health_check:\n      interval: 100ms\n      timeout: 1s\n"
        )
    };
    write_config(&config, &route(old_target));
    let mut command = Command::new(binary("tunnel"));
    command.arg("--config").arg(&config);
    let tunnel = Running::start_reporting(command, "listen");
    let listen = tunnel.addr;
    // A connection that outlives the reload holds the old balancer.
    let mut held = connect_from([127, 0, 0, 1], listen);
    assert!(echoes(&mut held, b"held"));
    wait_for(
        || old_accepts.load(Ordering::SeqCst) >= 4,
        "health checks of the old target",
    );

    write_config(&config, &route(new_target));
    tunnel.signal("HUP");
    wait_for(|| tunnel.stderr().contains("reloaded"), "the reload");
    // Durations, not events: a check already under way at the reload may
    // still land (a loopback connect, far quicker than 300 ms); then no
    // check may come for fifteen check intervals.
    std::thread::sleep(Duration::from_millis(300));
    let at_reload = old_accepts.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(1500));
    let later = old_accepts.load(Ordering::SeqCst);
    assert_eq!(
        later, at_reload,
        "the replaced balancer kept checking its old target after the reload"
    );
    assert!(echoes(&mut held, b"still relayed"));
}

/// Runs the tunnel with `configure`d arguments; it must exit by itself
/// within 10 s. Returns the status code and stderr.
fn exits(configure: impl FnOnce(&mut Command)) -> (Option<i32>, String) {
    let mut command = Command::new(binary("tunnel"));
    configure(&mut command);
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            return (status.code(), stderr);
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the tunnel accepted the configuration and kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn settings_that_cannot_work_are_refused_at_start() {
    let listen = "127.0.0.1:0";
    let (code, stderr) = exits(|c| {
        c.args(["--listen", listen, "--target", "127.0.0.1:9"])
            .args(["--idle-timeout", "0", "--max-connections", "0"])
            .env("TUNNEL_CONNECT_TIMEOUT", "18446744073709551615")
            .env("TUNNEL_WORKERS", "100000");
    });
    assert_eq!(code, Some(64), "{stderr}");
    for key in [
        "idle_timeout",
        "max_connections",
        "connect_timeout",
        "workers",
    ] {
        assert!(stderr.contains(key), "{key} not reported: {stderr}");
    }

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tunnel.yaml");
    write_config(
        &config,
        &format!("routes:\n  - listen: {listen}\n    target: 127.0.0.1:9\n    max_connections: 0\n    health_check:\n      interval: 0s\n      fall: 0\n"),
    );
    let (code, stderr) = exits(|c| {
        c.arg("--config").arg(&config);
    });
    assert_eq!(code, Some(64), "{stderr}");
    for key in [
        "routes.0.max_connections",
        "routes.0.health_check.interval",
        "routes.0.health_check.fall",
    ] {
        assert!(stderr.contains(key), "{key} not reported: {stderr}");
    }
}

#[test]
fn a_second_stop_signal_skips_the_grace_period() {
    let (target, _) = counting_echo_server();
    let mut command = Command::new(binary("tunnel"));
    command
        .args(["--listen", "127.0.0.1:0", "--target", &target.to_string()])
        .args(["--shutdown-grace", "60s"]);
    let mut tunnel = Running::start_reporting(command, "listen");
    let listen = tunnel.addr;
    let mut held = connect_from([127, 0, 0, 1], listen);
    assert!(echoes(&mut held, b"busy"));
    tunnel.signal("TERM");
    wait_for(
        || tunnel.stderr().contains("draining"),
        "the drain to begin",
    );
    assert!(tunnel.child.try_wait().unwrap().is_none());
    tunnel.signal("INT");
    let end = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = tunnel.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < end,
            "a second signal did not cut the 60 s grace period short"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
}

#[test]
fn rinetd_conf_is_a_layer_the_environment_and_flags_apply_over() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("rinetd.conf");
    std::fs::write(
        &conf,
        "127.0.0.1 7001 db.internal 5432\nlogfile /tmp/x.log\n",
    )
    .unwrap();
    let output = Command::new(binary("tunnel"))
        .arg("--rinetd-conf")
        .arg(&conf)
        .args(["--balance", "least-connections", "--print-config"])
        .env("TUNNEL_IDLE_TIMEOUT", "42s")
        .env("TUNNEL_WORKERS", "3")
        .output()
        .unwrap();
    let yaml = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{yaml}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for expected in [
        "idle_timeout: 42s",
        "workers: 3",
        "balance: least-connections",
        "access_log: /tmp/x.log",
        "db.internal:5432",
    ] {
        assert!(yaml.contains(expected), "{expected} missing:\n{yaml}");
    }

    let (code, stderr) = exits(|c| {
        c.arg("--rinetd-conf")
            .arg(&conf)
            .args(["--listen", "127.0.0.1:7002"]);
    });
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("listen") && stderr.contains("routes"),
        "{stderr}"
    );
}

#[test]
fn a_reload_onto_an_overlapping_address_names_the_tunnels_own_listener() {
    let (target, _) = counting_echo_server();
    // Written down: the reload must name the same port on another address,
    // and the tunnel tells an overlap by the addresses its configuration
    // names (with port 0 on both, no overlap would be seen).
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tunnel.yaml");
    let route = |listen: &str| {
        format!("routes:\n  - name: moving\n    listen: {listen}\n    target: {target}\n")
    };
    write_config(&config, &route(&format!("0.0.0.0:{port}")));
    let mut command = Command::new(binary("tunnel"));
    command.arg("--config").arg(&config);
    let tunnel = Running::start(command, local(port));
    write_config(&config, &route(&format!("127.0.0.1:{port}")));
    tunnel.signal("HUP");
    wait_for(
        || tunnel.stderr().contains("reload failed"),
        "the reload to fail",
    );
    let stderr = tunnel.stderr();
    assert!(
        stderr.contains("overlaps the tunnel's own listener"),
        "{stderr}"
    );
    assert!(echoes(
        &mut connect_from([127, 0, 0, 1], local(port)),
        b"old"
    ));
}

#[test]
fn a_reload_says_which_changed_settings_wait_for_a_restart() {
    let (target, _) = counting_echo_server();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tunnel.yaml");
    let text = |admin: &str| {
        format!("listen: 127.0.0.1:0\ntarget: {target}\nadmin: {admin}\nworkers: 1\n")
    };
    write_config(&config, &text("127.0.0.1:0"));
    let mut command = Command::new(binary("tunnel"));
    command.arg("--config").arg(&config);
    let tunnel = Running::start_reporting(command, "listen");
    // Another admin address (never bound: it applies only at start).
    write_config(
        &config,
        &text("127.0.0.2:0").replace("workers: 1", "workers: 2"),
    );
    tunnel.signal("HUP");
    wait_for(|| tunnel.stderr().contains("reloaded"), "the reload");
    let stderr = tunnel.stderr();
    assert!(
        stderr.contains("apply only at start") && stderr.contains("admin, workers"),
        "{stderr}"
    );
}

#[test]
fn the_admin_endpoint_has_its_own_access_list() {
    let (target, _) = counting_echo_server();
    let mut command = Command::new(binary("tunnel"));
    command
        .args(["--listen", "127.0.0.1:0", "--target", &target.to_string()])
        .args(["--admin", "127.0.0.1:0"])
        .env("TUNNEL_ADMIN_DENY", "127.0.0.2");
    let mut tunnel = Running::start_reporting(command, "listen");
    let admin = tunnel.reported("", "admin");
    assert!(http_get(admin, "/healthz").starts_with("HTTP/1.1 200"));
    let mut denied = connect_from([127, 0, 0, 2], admin);
    denied.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = denied.read_to_string(&mut answer);
    assert!(answer.is_empty(), "{answer}");
}

#[test]
fn the_pid_file_replaces_a_planted_symlink_instead_of_following_it() {
    let (target, _) = counting_echo_server();
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("precious");
    std::fs::write(&victim, "precious data\n").unwrap();
    let pid_file = dir.path().join("tunnel.pid");
    std::os::unix::fs::symlink(&victim, &pid_file).unwrap();
    let mut command = Command::new(binary("tunnel"));
    command
        .args(["--listen", "127.0.0.1:0", "--target", &target.to_string()])
        .env("TUNNEL_PID_FILE", &pid_file);
    let tunnel = Running::start_reporting(command, "listen");
    let pid = tunnel.child.id().to_string();
    wait_for(|| read(&pid_file).trim() == pid, "the pid file");
    assert!(!std::fs::symlink_metadata(&pid_file)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(read(&victim), "precious data\n");
    let (code, _) = tunnel.stop();
    assert_eq!(code, Some(0));
    assert!(!pid_file.exists(), "the pid file was left behind");
    assert_eq!(read(&victim), "precious data\n");
}
