//! The real `tunnel` binary forwarding UDP to real peers on loopback: a
//! DNS server (Debian's `dnsmasq`) asked with `dig`, many `dig`s at once,
//! an `iperf3 -u` run, and a rinetd.conf with `/udp` rules.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tests::{binary, local, require, Running};

/// A loopback port free over both TCP and UDP a moment ago (see
/// [`tests::free_port`] for the race this accepts): for peers that cannot
/// report a port they chose, and for a TCP and a UDP route on one port.
fn free_port_both() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A program the test started, killed when the test ends.
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A program of Debian's that lives in /usr/sbin, which a user's PATH
/// may lack.
fn require_daemon(program: &str) -> PathBuf {
    let sbin = Path::new("/usr/sbin").join(program);
    if sbin.is_file() {
        return sbin;
    }
    require(program)
}

/// `dig` asking `server` for the A record of `name`, over UDP unless
/// `tcp`; its short answer.
fn dig(server: SocketAddr, name: &str, tcp: bool) -> Command {
    let mut command = Command::new(require("dig"));
    command
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string()])
        .args([name, "A", "+short", "+time=3", "+tries=1"])
        .arg(if tcp { "+tcp" } else { "+notcp" });
    command
}

fn answer(output: Output) -> String {
    assert!(
        output.status.success(),
        "dig failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// dnsmasq on 127.0.0.1 at a port of its own, in the foreground, reading
/// no configuration of the system's, answering `example.test` (and every
/// name under it) with 192.0.2.7, and `nN.example.test` with 192.0.2.N for
/// N from 1 to 50.
struct Dns {
    addr: SocketAddr,
    _peer: Peer,
}

impl Dns {
    fn start() -> Dns {
        let port = free_port_both();
        let mut command = Command::new(require_daemon("dnsmasq"));
        command
            .args(["--no-daemon", "--conf-file=/dev/null", "--pid-file="])
            .args(["--no-resolv", "--no-hosts", "--bind-interfaces"])
            .args(["--listen-address", "127.0.0.1", "--port", &port.to_string()])
            .arg("--address=/example.test/192.0.2.7")
            .args((1..=50).map(|n| format!("--host-record=n{n}.example.test,192.0.2.{n}")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let peer = Peer(command.spawn().expect("start dnsmasq"));
        let dns = Dns {
            addr: local(port),
            _peer: peer,
        };
        // Ready once it answers.
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let out = dig(dns.addr, "example.test", false).output().unwrap();
            if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "192.0.2.7" {
                return dns;
            }
            assert!(
                Instant::now() < end,
                "dnsmasq does not answer on {}",
                dns.addr
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The admin endpoint's `/metrics`, by a plain HTTP/1.1 request.
fn metrics(admin: SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: tunnel\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// A directory of the test's own.
fn temp_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("tunnel-udp-{tag}-"))
        .tempdir()
        .unwrap()
}

/// The tunnel with the YAML configuration `yaml`, reporting the first
/// route's address.
fn tunnel_with(dir: &Path, yaml: &str) -> Running {
    let config = dir.join("tunnel.yaml");
    std::fs::write(&config, yaml).unwrap();
    let mut command = Command::new(binary("tunnel"));
    command.arg("--config").arg(&config);
    Running::start_reporting(command, "listen")
}

/// Lines of `file` that contain every one of `parts`.
fn lines_with(file: &Path, parts: &[&str]) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .map(str::to_string)
        .collect()
}

#[test]
fn dig_asks_a_real_dns_server_through_a_udp_route() {
    let dns = Dns::start();
    let dir = temp_dir("dig");
    let log = dir.path().join("access.log");
    let tunnel = tunnel_with(
        dir.path(),
        &format!(
            "access_log: {}\nadmin: 127.0.0.1:0\nroutes:\n  - name: dns\n    protocol: udp\n    listen: 127.0.0.1:0\n    target: 127.0.0.1:{}\n",
            log.display(),
            dns.addr.port()
        ),
    );
    let mut tunnel = tunnel;
    let admin = tunnel.reported("", "admin");
    let through = tunnel.addr;
    assert_ne!(through, dns.addr);
    assert_eq!(
        answer(dig(through, "example.test", false).output().unwrap()),
        "192.0.2.7"
    );
    assert_eq!(
        answer(dig(through, "n42.example.test", false).output().unwrap()),
        "192.0.2.42"
    );
    // Only UDP is forwarded on that address.
    assert!(!dig(through, "example.test", true)
        .output()
        .unwrap()
        .status
        .success());

    // The UDP families, as Prometheus reads them.
    let metrics = metrics(admin);
    tests::promtool_check(&metrics);
    for series in [
        "tunnel_udp_sessions_total{route=\"dns\"} 2",
        "tunnel_udp_sessions_active{route=\"dns\"} 2",
        "tunnel_udp_sent_datagrams_total{route=\"dns\"} 2",
        "tunnel_udp_received_datagrams_total{route=\"dns\"} 2",
        "tunnel_udp_datagrams_dropped_total{route=\"dns\",reason=\"access\"} 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == series),
            "no {series} in\n{metrics}"
        );
    }

    let (code, stderr) = tunnel.stop();
    assert_eq!(code, Some(0), "{stderr}");
    // Each dig asked from a port of its own: a session each, ended at the
    // stop, one query and one answer each.
    let sessions = lines_with(
        &log,
        &["route=dns", "protocol=udp", "end=\"closed at shutdown\""],
    );
    assert_eq!(sessions.len(), 2, "{sessions:?}");
    for line in &sessions {
        assert!(
            line.contains(&format!("target={}", dns.addr))
                && line.contains("datagrams_sent=1 datagrams_received=1"),
            "{line}"
        );
    }
}

#[test]
fn fifty_digs_at_once_each_get_their_own_answer() {
    let dns = Dns::start();
    let dir = temp_dir("many");
    let log = dir.path().join("access.log");
    let tunnel = tunnel_with(
        dir.path(),
        &format!(
            "access_log: {}\nroutes:\n  - name: dns\n    protocol: udp\n    listen: 127.0.0.1:0\n    target: 127.0.0.1:{}\n    idle_timeout: 1s\n",
            log.display(),
            dns.addr.port()
        ),
    );
    // All started before any is read: 50 clients from 50 source ports at
    // once. dig drops an answer that is not to its own question, so a
    // crossed reply shows as a wrong or missing answer.
    let digs: Vec<(u32, Child)> = (1..=50)
        .map(|n| {
            let child = dig(tunnel.addr, &format!("n{n}.example.test"), false)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            (n, child)
        })
        .collect();
    for (n, child) in digs {
        assert_eq!(
            answer(child.wait_with_output().unwrap()),
            format!("192.0.2.{n}")
        );
    }
    // Every session goes idle and ends with its line.
    let end = Instant::now() + Duration::from_secs(20);
    while lines_with(&log, &["end=\"idle timeout\""]).len() < 50 {
        assert!(
            Instant::now() < end,
            "{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let clients: std::collections::HashSet<String> = lines_with(&log, &["end=\"idle timeout\""])
        .iter()
        .map(|l| {
            l.split(" client=")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(clients.len(), 50);
    let (code, stderr) = tunnel.stop();
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn iperf3_over_udp_through_the_tunnel_loses_nothing() {
    require("iperf3");
    let server_port = free_port_both();
    let mut server = Command::new(require("iperf3"));
    server
        .args(["--server", "--one-off", "--bind", "127.0.0.1"])
        .args(["--port", &server_port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut server = Peer(server.spawn().expect("start iperf3"));
    // Listening, seen in the kernel's tables: a probe connection would be
    // taken for the one test of --one-off.
    tests::listening(&mut server.0, 1);

    // iperf3 runs its test over a TCP control connection beside the UDP
    // data: a TCP and a UDP route on one port.
    let port = free_port_both();
    let dir = temp_dir("iperf3");
    let log = dir.path().join("access.log");
    let tunnel = tunnel_with(
        dir.path(),
        &format!(
            "access_log: {log}\nroutes:\n  - {{name: iperf-data, protocol: udp, listen: '127.0.0.1:{port}', target: '127.0.0.1:{server_port}'}}\n  - {{name: iperf-control, listen: '127.0.0.1:{port}', target: '127.0.0.1:{server_port}'}}\n",
            log = log.display(),
        ),
    );
    let run = Command::new(require("iperf3"))
        .args(["--client", "127.0.0.1", "--port", &port.to_string()])
        .args([
            "--udp",
            "--bitrate",
            "50M",
            "--length",
            "1400",
            "--time",
            "3",
            "--json",
        ])
        // The server's socket as large as the tunnel's, so that a busy
        // machine does not make iperf3 itself drop what the tunnel passed.
        .args(["--window", "4M"])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap_or_else(|e| {
        panic!(
            "iperf3's report ({e}): {}{}",
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        )
    });
    assert!(run.status.success(), "{report}");
    let (sent, received) = (&report["end"]["sum_sent"], &report["end"]["sum_received"]);
    let packets = sent["packets"].as_u64().unwrap();
    // 50 Mbit/s of 1400-byte datagrams for 3 s: some 13,000.
    assert!(packets > 10_000, "{sent}");
    assert_eq!(received["lost_packets"].as_u64(), Some(0), "{received}");
    assert_eq!(received["packets"].as_u64(), Some(packets), "{received}");
    assert_eq!(received["bytes"], sent["bytes"], "{received}");

    let (code, stderr) = tunnel.stop();
    assert_eq!(code, Some(0), "{stderr}");
    // The data session's line counts every datagram (and iperf3's own
    // handshake datagram each way).
    let data = lines_with(&log, &["route=iperf-data", "protocol=udp"]);
    assert_eq!(data.len(), 1, "{data:?}");
    let sent_datagrams: u64 = data[0]
        .split(" datagrams_sent=")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(sent_datagrams > packets, "{} for {packets}", data[0]);
    assert!(!lines_with(&log, &["route=iperf-control"]).is_empty());
}

#[test]
fn a_rinetd_conf_with_udp_rules_runs_as_it_is() {
    let dns = Dns::start();
    let dir = temp_dir("rinetd");
    let conf = dir.path().join("rinetd.conf");
    let log = dir.path().join("rinetd.log");
    let port = free_port_both();
    std::fs::write(
        &conf,
        format!(
            "# DNS for the lab, both ways, as a rinetd user has it\n\
             127.0.0.1 {port}/udp 127.0.0.1 {dns}/udp [timeout=1]\n\
             allow 127.0.0.*\n\
             127.0.0.1 {port} 127.0.0.1 {dns}\n\
             logfile {log}\n",
            dns = dns.addr.port(),
            log = log.display()
        ),
    )
    .unwrap();
    let mut command = Command::new(binary("tunnel"));
    command.arg("--rinetd-conf").arg(&conf);
    let tunnel = Running::start(command, local(port));
    assert_eq!(
        answer(dig(local(port), "example.test", false).output().unwrap()),
        "192.0.2.7"
    );
    assert_eq!(
        answer(dig(local(port), "example.test", true).output().unwrap()),
        "192.0.2.7"
    );
    // timeout=1: the session ends after a second without a datagram.
    let route = format!("route=127.0.0.1:{port}/udp");
    let end = Instant::now() + Duration::from_secs(10);
    let idle = loop {
        let found = lines_with(&log, &[&route, "end=\"idle timeout\""]);
        if let Some(line) = found.first() {
            break line.clone();
        }
        assert!(
            Instant::now() < end,
            "{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let duration: f64 = idle
        .split(" duration=")
        .nth(1)
        .unwrap()
        .split('s')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1.0..3.0).contains(&duration), "{idle}");
    assert!(
        idle.contains("datagrams_sent=1 datagrams_received=1"),
        "{idle}"
    );
    let (code, stderr) = tunnel.stop();
    assert_eq!(code, Some(0), "{stderr}");
    let tcp = lines_with(&log, &[&format!("route=127.0.0.1:{port} ")]);
    assert!(!tcp.is_empty(), "the TCP rule's line");
}

#[test]
fn systemd_socket_activate_passes_the_udp_socket() {
    let dns = Dns::start();
    let dir = temp_dir("activate");
    let port = free_port_both();
    let config = dir.path().join("tunnel.yaml");
    std::fs::write(
        &config,
        format!(
            "routes:\n  - {{name: dns, protocol: udp, listen: '127.0.0.1:{port}', target: '{}'}}\n",
            dns.addr
        ),
    )
    .unwrap();
    let stderr = dir.path().join("stderr");
    // systemd-socket-activate binds the datagram socket and starts the
    // tunnel at the first datagram, which waits in the socket for it.
    let mut command = Command::new(require("systemd-socket-activate"));
    command
        .args(["--datagram", "-l", &format!("127.0.0.1:{port}")])
        .arg(binary("tunnel"))
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap());
    let _tunnel = Peer(command.spawn().unwrap());
    // Until systemd-socket-activate listens, the query is refused: ask
    // again.
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let out = dig(local(port), "example.test", false).output().unwrap();
        if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "192.0.2.7" {
            break;
        }
        assert!(
            Instant::now() < end,
            "no answer through the activated tunnel: {}",
            std::fs::read_to_string(&stderr).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = std::fs::read_to_string(&stderr).unwrap();
    let used = log
        .lines()
        .find(|l| l.contains("using the socket the service manager passed"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        used.contains(&format!("inherited=127.0.0.1:{port}")) && used.contains("UDP"),
        "{used}"
    );
    assert!(!log.contains("already in use"), "{log}");
}
