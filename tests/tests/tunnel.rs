//! The real `tunnel` binary: the quick form, the original TUNNEL_HOST and
//! TUNNEL_PORT settings, routes from a file, SIGHUP reload with live
//! connections, a reload that fails, and configuration errors.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use tests::{binary, free_port, Running};

/// An echo server on a thread; returns its address.
fn echo_target() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

fn local(port: u16) -> SocketAddr {
    format!("127.0.0.1:{port}").parse().unwrap()
}

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

#[test]
fn the_quick_form_forwards() {
    let target = echo_target();
    let listen = local(free_port());
    let mut command = Command::new(binary("tunnel"));
    command.args([
        "--listen",
        &listen.to_string(),
        "--target",
        &target.to_string(),
    ]);
    let tunnel = Running::start(command, listen);
    assert_eq!(echo(&mut connect(listen), b"hello"), b"hello");
    let (code, stderr) = tunnel.stop();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("end=\"closed by client\""), "{stderr}");
}

#[test]
fn the_original_host_and_port_settings_name_the_target() {
    let target = echo_target();
    let listen = local(free_port());
    let mut command = Command::new(binary("tunnel"));
    command
        .env("TUNNEL_HOST", "localhost")
        .env("TUNNEL_PORT", target.port().to_string())
        .env("TUNNEL_LISTEN", listen.to_string());
    let _tunnel = Running::start(command, listen);
    assert_eq!(echo(&mut connect(listen), b"from env"), b"from env");
}

fn wait_for(mut check: impl FnMut() -> bool, what: &str) {
    for _ in 0..200 {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn sighup_reloads_routes_and_a_bad_file_keeps_the_old_ones() {
    let dir = tempfile_dir("reload");
    let config = dir.join("tunnel.yaml");
    let log = dir.join("access.log");
    let (a, b) = (echo_target(), echo_target());
    let (first, second) = (local(free_port()), local(free_port()));
    std::fs::write(
        &config,
        format!(
            "access_log: {}\nroutes:\n  - name: first\n    listen: {first}\n    target: {a}\n",
            log.display()
        ),
    )
    .unwrap();
    let mut command = Command::new(binary("tunnel"));
    command.arg("--config").arg(&config);
    let tunnel = Running::start(command, first);
    let mut live = connect(first);
    assert_eq!(echo(&mut live, b"1"), b"1");

    // Add a second route and point the first elsewhere.
    std::fs::write(
        &config,
        format!(
            "access_log: {}\nroutes:\n  - name: first\n    listen: {first}\n    target: {b}\n  - name: second\n    listen: {second}\n    target: {a}\n",
            log.display()
        ),
    )
    .unwrap();
    tunnel.signal("HUP");
    wait_for(|| TcpStream::connect(second).is_ok(), "the second route");
    assert_eq!(echo(&mut connect(second), b"2"), b"2");
    // The connection made before the reload carries on.
    assert_eq!(echo(&mut live, b"still"), b"still");

    // A broken file is reported and changes nothing.
    std::fs::write(&config, "routes:\n  - name: first\n    listen: [oops\n").unwrap();
    tunnel.signal("HUP");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(echo(&mut connect(first), b"3"), b"3");
    assert_eq!(echo(&mut connect(second), b"4"), b"4");
    assert_eq!(echo(&mut live, b"5"), b"5");
    drop(live);

    let (code, stderr) = tunnel.stop();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("reloaded"), "{stderr}");
    assert!(
        stderr.contains("reload failed, the running configuration stays"),
        "{stderr}"
    );
    assert!(stderr.contains("not valid YAML"), "{stderr}");
    // The access-log file has a line per connection, with the route name.
    let lines = std::fs::read_to_string(&log).unwrap();
    assert!(
        lines.lines().filter(|l| l.contains("route=second")).count() >= 2,
        "{lines}"
    );
    assert!(
        lines
            .lines()
            .any(|l| l.contains("route=first") && l.contains(&format!("target={b}"))),
        "{lines}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

fn tempfile_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tunnel-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn configuration_errors_name_file_line_and_key() {
    let dir = tempfile_dir("errors");
    let config = dir.join("tunnel.yaml");
    std::fs::write(
        &config,
        "routes:\n  - name: db\n    listen: 0.0.0.0:5432\n    target: db.internal\n    idle_timeout: long\n    conect_timeout: 3s\n",
    )
    .unwrap();
    let out = Command::new(binary("tunnel"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    let shown = config.display().to_string();
    assert!(
        err.contains(&format!(
            "routes.0.target = \"db.internal\" (from {shown} line 4)"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "routes.0.idle_timeout = \"long\" (from {shown} line 5)"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "routes.0.conect_timeout = \"3s\" (from {shown} line 6): unknown setting"
        )),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_listen_address_in_use_is_named() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let out = Command::new(binary("tunnel"))
        .args(["--listen", &addr.to_string(), "--target", "127.0.0.1:9"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("route default: {addr} is already in use")),
        "{err}"
    );
}

#[test]
fn a_rinetd_conf_runs_as_it_is() {
    let dir = tempfile_dir("rinetd");
    let conf = dir.join("rinetd.conf");
    let log = dir.join("rinetd.log");
    let target = echo_target();
    let (open, closed) = (local(free_port()), local(free_port()));
    std::fs::write(
        &conf,
        format!(
            "# as a rinetd user has it\nallow 127.0.0.*\n\n127.0.0.1 {} 127.0.0.1 {}\n127.0.0.1 {} localhost {}\ndeny 127.*\nlogfile {}\n",
            open.port(),
            target.port(),
            closed.port(),
            target.port(),
            log.display()
        ),
    )
    .unwrap();
    let mut command = Command::new(binary("tunnel"));
    command.arg("--rinetd-conf").arg(&conf);
    let tunnel = Running::start(command, open);
    assert_eq!(echo(&mut connect(open), b"allowed"), b"allowed");
    // The second rule denies loopback clients: closed without a byte.
    let mut refused = connect(closed);
    let _ = refused.write_all(b"nope");
    let mut rest = Vec::new();
    let _ = refused.read_to_end(&mut rest);
    assert!(rest.is_empty());
    let (code, stderr) = tunnel.stop();
    assert_eq!(code, Some(0), "{stderr}");
    let lines = std::fs::read_to_string(&log).unwrap();
    let name = format!("route=127.0.0.1:{}", closed.port());
    assert!(
        lines
            .lines()
            .any(|l| l.contains(&name) && l.contains("end=\"refused by access list\"")),
        "{lines}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
