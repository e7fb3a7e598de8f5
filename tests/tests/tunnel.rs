//! The real `tunnel` binary: the quick form, the original TUNNEL_HOST and
//! TUNNEL_PORT settings, routes from a file, SIGHUP reload with live
//! connections, a reload that fails, and configuration errors.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use tests::{binary, connect_from, echo_server, free_port, local, Running};

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
    let target = echo_server();
    let mut command = Command::new(binary("tunnel"));
    command.args(["--listen", "127.0.0.1:0", "--target", &target.to_string()]);
    let tunnel = Running::start_reporting(command, "listen");
    let listen = tunnel.addr;
    assert_eq!(echo(&mut connect(listen), b"hello"), b"hello");
    let (code, stderr) = tunnel.stop();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("end=\"closed by client\""), "{stderr}");
}

#[test]
fn the_original_host_and_port_settings_name_the_target() {
    let target = echo_server();
    let mut command = Command::new(binary("tunnel"));
    command
        .env("TUNNEL_HOST", "localhost")
        .env("TUNNEL_PORT", target.port().to_string())
        .env("TUNNEL_LISTEN", "127.0.0.1:0");
    let tunnel = Running::start_reporting(command, "listen");
    let listen = tunnel.addr;
    assert_eq!(echo(&mut connect(listen), b"from env"), b"from env");
}

#[test]
fn sighup_reloads_routes_and_a_bad_file_keeps_the_old_ones() {
    let dir = tempfile_dir("reload");
    let config = dir.join("tunnel.yaml");
    let log = dir.join("access.log");
    let (a, b) = (echo_server(), echo_server());
    // The tunnel chooses the ports; two routes cannot both name
    // 127.0.0.1:0, so the second has an address of its own.
    let (first_listen, second_listen) = ("127.0.0.1:0", "127.0.0.2:0");
    std::fs::write(
        &config,
        format!(
            "access_log: {}\nroutes:\n  - name: first\n    listen: {first_listen}\n    target: {a}\n",
            log.display()
        ),
    )
    .unwrap();
    let mut command = Command::new(binary("tunnel"));
    command.arg("--config").arg(&config);
    let mut tunnel = Running::start_reporting(command, "listen");
    let first = tunnel.addr;
    let mut live = connect(first);
    assert_eq!(echo(&mut live, b"1"), b"1");

    // Add a second route and point the first elsewhere.
    std::fs::write(
        &config,
        format!(
            "access_log: {}\nroutes:\n  - name: first\n    listen: {first_listen}\n    target: {b}\n  - name: second\n    listen: {second_listen}\n    target: {a}\n",
            log.display()
        ),
    )
    .unwrap();
    tunnel.signal("HUP");
    let second = tunnel.reported("route=second", "listen");
    assert_eq!(echo(&mut connect(second), b"2"), b"2");
    // The connection made before the reload carries on.
    assert_eq!(echo(&mut live, b"still"), b"still");

    // A broken file is reported and changes nothing.
    std::fs::write(&config, "routes:\n  - name: first\n    listen: [oops\n").unwrap();
    tunnel.signal("HUP");
    tunnel.wait_line("reload failed");
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
            "routes.0.target = \"db.internal\" (from {shown}:4:5)"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "routes.0.idle_timeout = \"long\" (from {shown}:5:5)"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "routes.0.conect_timeout = \"3s\" (from {shown}:6:5): unknown setting"
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
    let target = echo_server();
    // rinetd.conf takes ports 1 to 65535 only: free ones, written down.
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

/// Whether the tunnel closed `s` without a byte (refused by its access
/// lists).
fn refused(s: &mut TcpStream) -> bool {
    let _ = s.write_all(b"let me in");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    rest.is_empty()
}

#[test]
fn rinetd_patterns_no_network_can_express_are_matched_at_accept() {
    let dir = tempfile_dir("rinetd-patterns");
    let conf = dir.join("rinetd.conf");
    let log = dir.join("rinetd.log");
    let target = echo_server();
    let (ones, most) = (local(free_port()), local(free_port()));
    std::fs::write(
        &conf,
        format!(
            "# only addresses ending in .1, the way rinetd matches them\n\
             allow *.*.*.1\n\
             127.0.0.1 {} 127.0.0.1 {}\n\
             127.0.0.1 {} 127.0.0.1 {}\n\
             deny 127.0.0.?\n\
             logfile {}\n",
            ones.port(),
            target.port(),
            most.port(),
            target.port(),
            log.display()
        ),
    )
    .unwrap();

    // Printed as written, not as networks.
    let printed = Command::new(binary("tunnel"))
        .arg("--rinetd-conf")
        .arg(&conf)
        .arg("--print-config")
        .output()
        .unwrap();
    let yaml = String::from_utf8_lossy(&printed.stdout);
    assert!(
        printed.status.success(),
        "{yaml}{}",
        String::from_utf8_lossy(&printed.stderr)
    );
    assert!(
        yaml.contains("*.*.*.1") && yaml.contains("127.0.0.?"),
        "{yaml}"
    );

    let mut command = Command::new(binary("tunnel"));
    command.arg("--rinetd-conf").arg(&conf);
    let mut tunnel = Running::start(command, ones);
    tunnel.wait_also(most);
    // The global allow: 127.0.0.1 ends in .1, 127.0.0.2 and 127.0.0.11 do not.
    assert_eq!(
        echo(&mut connect_from([127, 0, 0, 1], ones), b"one"),
        b"one"
    );
    assert!(refused(&mut connect_from([127, 0, 0, 2], ones)));
    assert!(refused(&mut connect_from([127, 0, 0, 11], ones)));
    // The second rule's own deny: 127.0.0.? is one digit after the last
    // dot, so 127.0.0.1 is refused there and 127.0.1.1 is not.
    assert!(refused(&mut connect_from([127, 0, 0, 1], most)));
    assert_eq!(
        echo(&mut connect_from([127, 0, 1, 1], most), b"other"),
        b"other"
    );
    let (code, stderr) = tunnel.stop();
    assert_eq!(code, Some(0), "{stderr}");
    let lines = std::fs::read_to_string(&log).unwrap();
    let ends = |client: &str| -> Vec<&str> {
        lines
            .lines()
            .filter(|l| l.contains(&format!(" client={client}:")))
            .map(|l| l.rsplit_once(" end=").map_or("", |(_, end)| end))
            .collect()
    };
    let refusal = "\"refused by access list\"";
    assert_eq!(ends("127.0.0.2"), [refusal], "{lines}");
    assert_eq!(ends("127.0.0.11"), [refusal], "{lines}");
    assert_eq!(ends("127.0.1.1"), ["\"closed by client\""], "{lines}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn yaml_and_environment_lists_take_patterns_too() {
    let target = echo_server();
    let mut command = Command::new(binary("tunnel"));
    command
        .args(["--listen", "127.0.0.1:0"])
        .args(["--target", &target.to_string()])
        .env("TUNNEL_ALLOW", "127.0.0.0/30, *.*.*.1?")
        .env("TUNNEL_DENY", "127.0.0.2");
    let tunnel = Running::start_reporting(command, "listen");
    let listen = tunnel.addr;
    assert_eq!(echo(&mut connect_from([127, 0, 0, 1], listen), b"a"), b"a");
    assert!(refused(&mut connect_from([127, 0, 0, 2], listen)));
    assert_eq!(echo(&mut connect_from([127, 0, 0, 17], listen), b"b"), b"b");
    assert!(refused(&mut connect_from([127, 0, 0, 27], listen)));
    let (code, stderr) = tunnel.stop();
    assert_eq!(code, Some(0), "{stderr}");

    let out = Command::new(binary("tunnel"))
        .args(["--listen", "127.0.0.1:0"])
        .args(["--target", &target.to_string()])
        .env("TUNNEL_ALLOW", "10.*, 300.*")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("allow") && err.contains("\"300.*\" matches no IPv4 address"),
        "{err}"
    );
}

/// GET a path from the admin endpoint with a plain HTTP/1.1 request.
fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = connect(addr);
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: tunnel\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    (head.to_string(), body.to_string())
}

#[test]
fn metrics_pass_promtool_and_count_what_happened() {
    let live = echo_server();
    // A target that refuses: bound and dropped.
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut command = Command::new(binary("tunnel"));
    command
        .args(["--listen", "127.0.0.1:0"])
        .args(["--target", &format!("{dead},{live}")])
        .args(["--admin", "127.0.0.1:0"])
        .env("TUNNEL_DENY", "127.0.0.2");
    let mut tunnel = Running::start_reporting(command, "listen");
    let (listen, admin) = (tunnel.addr, tunnel.reported("", "admin"));
    for i in 0..6 {
        assert_eq!(
            echo(&mut connect(listen), format!("hello {i}").as_bytes()),
            format!("hello {i}").as_bytes()
        );
    }
    // A refused client: from 127.0.0.2, which is denied.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 2], 0)).into())
        .unwrap();
    socket.connect(&listen.into()).unwrap();
    let mut refused: TcpStream = socket.into();
    refused
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut rest = Vec::new();
    let _ = refused.read_to_end(&mut rest);
    assert!(rest.is_empty());

    let (head, health) = http_get(admin, "/healthz");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(health, "ok\n");
    // Bytes are counted as connections end, which the tunnel sees a moment
    // after the clients close: scrape until no connection is open.
    let live_active = format!("tunnel_connections_active{{route=\"default\",target=\"{live}\"}} 0");
    let mut scrape = http_get(admin, "/metrics");
    for _ in 0..100 {
        if scrape.1.lines().any(|l| l == live_active) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        scrape = http_get(admin, "/metrics");
    }
    let (head, body) = scrape;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");

    tests::promtool_check(&body);
    let value = |series: &str| -> f64 {
        body.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no {series} in\n{body}"))
    };
    let live_t = format!("{{route=\"default\",target=\"{live}\"}}");
    let dead_t = format!("{{route=\"default\",target=\"{dead}\"}}");
    // Six echoes.
    assert_eq!(value(&format!("tunnel_connections_total{live_t}")), 6.0);
    assert_eq!(value(&format!("tunnel_connections_total{dead_t}")), 0.0);
    assert!(value(&format!("tunnel_connect_failures_total{dead_t}")) >= 1.0);
    assert_eq!(value(&format!("tunnel_target_up{live_t}")), 1.0);
    assert_eq!(value(&format!("tunnel_target_up{dead_t}")), 0.0);
    assert_eq!(value(&format!("tunnel_sent_bytes_total{live_t}")), 42.0);
    assert_eq!(value(&format!("tunnel_connections_active{live_t}")), 0.0);
    assert_eq!(
        value("tunnel_connections_refused_total{route=\"default\"}"),
        1.0
    );
    drop(tunnel);
}

#[test]
fn relay_threads_serve_and_drain_like_the_main_thread() {
    let target = echo_server();
    let mut command = Command::new(binary("tunnel"));
    command
        .args(["--listen", "127.0.0.1:0", "--target", &target.to_string()])
        .env("TUNNEL_WORKERS", "3");
    let mut tunnel = Running::start_reporting(command, "listen");
    let listen = tunnel.addr;
    // One listening socket per relay thread, sharing the address: each
    // thread accepts its own connections.
    assert_eq!(listening_sockets(listen.port()), 3);
    let mut held: Vec<TcpStream> = (0..9).map(|_| connect(listen)).collect();
    for (i, s) in held.iter_mut().enumerate() {
        let msg = format!("conn {i}");
        assert_eq!(echo(s, msg.as_bytes()), msg.as_bytes());
    }
    // A reload keeps them, and the connections open through it.
    tunnel.signal("HUP");
    tunnel.wait_line("reloaded");
    assert_eq!(listening_sockets(listen.port()), 3);
    for (i, s) in held.iter_mut().enumerate() {
        let msg = format!("again {i}");
        assert_eq!(echo(s, msg.as_bytes()), msg.as_bytes());
    }
    for i in 0..9 {
        let mut s = connect(listen);
        let msg = format!("after {i}");
        assert_eq!(echo(&mut s, msg.as_bytes()), msg.as_bytes());
    }
    // The address is still this tunnel's alone: a second one is refused.
    let out = Command::new(binary("tunnel"))
        .args([
            "--listen",
            &listen.to_string(),
            "--target",
            &target.to_string(),
        ])
        .env("TUNNEL_WORKERS", "3")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is already in use"),
        "{out:?}"
    );
    drop(held);
    let (code, stderr) = tunnel.stop();
    assert_eq!(code, Some(0), "{stderr}");
    // A line per connection.
    assert_eq!(
        stderr.matches("end=\"closed by client\"").count(),
        18,
        "{stderr}"
    );
}

/// How many sockets listen on `port` (`ss`).
fn listening_sockets(port: u16) -> usize {
    let out = Command::new("ss")
        .args(["-ltnH", "sport", "=", &format!(":{port}")])
        .output()
        .expect("ss (iproute2) runs");
    String::from_utf8_lossy(&out.stdout).lines().count()
}
