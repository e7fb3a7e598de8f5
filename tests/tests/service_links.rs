//! The programs in a Kubernetes pod's environment: the kubelet gives every
//! pod Service-link variables for each Service in its namespace
//! (`TUNNEL_SERVICE_HOST`, `TUNNEL_PORT=tcp://...`, `ECHO_SERVER_PORT_1234_TCP`,
//! ...), many under the programs' own prefixes. Each program starts and
//! serves among them; a typo of a real key is still refused; and
//! `TUNNEL_PORT` as a port number still names the tunnel's target.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use tests::kubelet::{env_name, service_links};
use tests::{binary, echo_server, Running};

/// A Service as the kubelet sees it: its name, cluster IP and ports
/// (number, protocol, name; a lone port may be unnamed).
struct Service {
    name: &'static str,
    ip: &'static str,
    ports: &'static [(u16, &'static str, &'static str)],
}

/// The Services of the namespace: the programs' own, a balancer in front
/// of the echo servers, one named like the square client (IPv6, with SCTP),
/// and the API server's, which every namespace has.
const NAMESPACE: &[Service] = &[
    Service {
        name: "tunnel",
        ip: "10.96.0.12",
        ports: &[(1001, "TCP", "incoming")],
    },
    Service {
        name: "echo-server",
        ip: "10.96.0.13",
        ports: &[(1234, "TCP", "echoendpoint")],
    },
    Service {
        name: "square-server",
        ip: "10.96.0.14",
        ports: &[(2345, "TCP", "squareendpoint")],
    },
    Service {
        name: "echo-server-balancer",
        ip: "10.96.0.15",
        ports: &[(1234, "TCP", "telnet"), (1234, "UDP", "telnet-udp")],
    },
    Service {
        name: "square-client",
        ip: "fd00:10:96::16",
        ports: &[(80, "TCP", "http-alt"), (9, "SCTP", "discard")],
    },
    Service {
        name: "kubernetes",
        ip: "10.96.0.1",
        ports: &[(443, "TCP", "https")],
    },
];

/// The variables the kubelet sets for `NAMESPACE`, as it makes them.
fn kubelet_env() -> Vec<(String, String)> {
    NAMESPACE
        .iter()
        .flat_map(|service| service_links(service.name, service.ip.parse().unwrap(), service.ports))
        .collect()
}

/// `program` in the pod's environment: every Service link set, and no
/// setting of its own from the test's environment.
fn in_pod(program: &str) -> Command {
    let prefix = format!("{}_", env_name(program));
    let mut command = Command::new(binary(program));
    for (name, _) in std::env::vars() {
        if name.starts_with(&prefix) || name == "RUST_LOG" {
            command.env_remove(name);
        }
    }
    command.envs(kubelet_env());
    command
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Reads from `s` until what came ends with `end`.
fn read_until(s: &mut TcpStream, end: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).ends_with(end) {
        let n = s.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "closed before {end:?}: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

fn round_trip(addr: SocketAddr, msg: &[u8]) {
    let mut s = connect(addr);
    s.write_all(msg).unwrap();
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).unwrap();
    assert_eq!(got, msg);
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn the_environment_is_the_kubelets() {
    let vars = kubelet_env();
    let value = |name: &str| {
        vars.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no {name}"))
    };
    let tunnel: Vec<String> = vars
        .iter()
        .filter(|(n, _)| n.starts_with("TUNNEL_"))
        .map(|(n, v)| format!("{n}={v}"))
        .collect();
    assert_eq!(
        tunnel,
        [
            "TUNNEL_SERVICE_HOST=10.96.0.12",
            "TUNNEL_SERVICE_PORT=1001",
            "TUNNEL_SERVICE_PORT_INCOMING=1001",
            "TUNNEL_PORT=tcp://10.96.0.12:1001",
            "TUNNEL_PORT_1001_TCP=tcp://10.96.0.12:1001",
            "TUNNEL_PORT_1001_TCP_PROTO=tcp",
            "TUNNEL_PORT_1001_TCP_PORT=1001",
            "TUNNEL_PORT_1001_TCP_ADDR=10.96.0.12",
        ]
    );
    assert_eq!(value("ECHO_SERVER_PORT"), "tcp://10.96.0.13:1234");
    assert_eq!(value("ECHO_SERVER_BALANCER_SERVICE_HOST"), "10.96.0.15");
    assert_eq!(
        value("ECHO_SERVER_BALANCER_PORT_1234_UDP"),
        "udp://10.96.0.15:1234"
    );
    assert_eq!(value("SQUARE_SERVER_PORT_2345_TCP_ADDR"), "10.96.0.14");
    assert_eq!(value("SQUARE_CLIENT_PORT"), "tcp://[fd00:10:96::16]:80");
    assert_eq!(value("SQUARE_CLIENT_SERVICE_PORT_HTTP_ALT"), "80");
    assert_eq!(value("SQUARE_CLIENT_PORT_9_SCTP_PROTO"), "sctp");
    assert_eq!(value("SQUARE_CLIENT_PORT_9_SCTP_ADDR"), "fd00:10:96::16");
}

#[test]
fn echo_server_starts_and_serves() {
    let mut command = in_pod("echo-server");
    // Settings from the environment still apply beside the links.
    command
        .env("ECHO_SERVER_LISTEN", "127.0.0.1:0")
        .env("ECHO_SERVER_UTC", "true")
        .env("ECHO_SERVER_INSTANCE", "echo-server_IN_7");
    let server = Running::start_reporting(command, "listen");
    let mut s = connect(server.addr);
    let greeting = read_until(&mut s, "Your choice: ");
    assert!(greeting.contains("echo-server_IN_7"), "{greeting}");
    s.write_all(b"1\n").unwrap();
    let date = read_until(&mut s, "Your choice: ");
    assert!(date.contains("Current date: "), "{date}");
    s.write_all(b"9\n").unwrap();
    assert!(read_until(&mut s, "\r\n").contains("Goodbye."));
    let (code, stderr) = server.stop();
    assert_eq!(code, Some(0), "{stderr}");
    // Nothing about the links at the default log level.
    assert!(!stderr.contains("SERVICE"), "{stderr}");
    assert!(!stderr.contains("10.96."), "{stderr}");
}

#[test]
fn square_server_and_square_client_run() {
    let mut command = in_pod("square-server");
    command.env("SQUARE_SERVER_LISTEN", "127.0.0.1:0");
    let server = Running::start_reporting(command, "addr");
    let out = in_pod("square-client")
        .env("SQUARE_CLIENT_SERVER", server.addr.to_string())
        .args(["-4", "12"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "16\n144\n");
    let (code, stderr) = server.stop();
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn tunnel_relays_with_its_own_service_link_in_tunnel_port() {
    let target = echo_server();
    let mut command = in_pod("tunnel");
    command.args(["--listen", "127.0.0.1:0", "--target", &target.to_string()]);
    let tunnel = Running::start_reporting(command, "listen");
    round_trip(tunnel.addr, b"through the tunnel");
    round_trip(tunnel.addr, &[0, 255, 1, 254, b'\r', b'\n']);
    let (code, stderr) = tunnel.stop();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!("target_addr={target}")),
        "{stderr}"
    );
}

#[test]
fn tunnel_port_as_a_number_still_names_the_target() {
    let target = echo_server();
    // The container's own TUNNEL_PORT wins over the Service link, as a
    // pod's `env` does over the kubelet's.
    let mut command = in_pod("tunnel");
    command
        .env("TUNNEL_HOST", "127.0.0.1")
        .env("TUNNEL_PORT", target.port().to_string())
        .env("TUNNEL_LISTEN", "127.0.0.1:0");
    let tunnel = Running::start_reporting(command, "listen");
    round_trip(tunnel.addr, b"to the port that was set");
    let (code, stderr) = tunnel.stop();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!("target_addr={target}")),
        "{stderr}"
    );

    let out = in_pod("tunnel")
        .env("TUNNEL_HOST", "127.0.0.1")
        .env("TUNNEL_PORT", target.port().to_string())
        .arg("--print-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let printed = text(&out.stdout);
    let port = printed
        .lines()
        .find(|l| l.starts_with("port = "))
        .unwrap_or_else(|| panic!("no port in\n{printed}"));
    assert!(
        port.starts_with(&format!("port = {} ", target.port())),
        "{printed}"
    );
    assert!(
        port.ends_with("# environment variable TUNNEL_PORT"),
        "{printed}"
    );
}

#[test]
fn a_service_link_in_tunnel_port_is_never_the_target_port() {
    // TUNNEL_HOST alone, with the kubelet's TUNNEL_PORT=tcp://...: no port.
    let out = in_pod("tunnel")
        .env("TUNNEL_HOST", "127.0.0.1")
        .env("TUNNEL_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("TUNNEL_HOST is set but TUNNEL_PORT is not"),
        "{err}"
    );
    assert!(
        err.contains("TUNNEL_PORT=tcp://10.96.0.12:1001 is the Service link Kubernetes sets"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn print_config_lists_settings_not_service_links() {
    for program in ["echo-server", "square-server", "square-client", "tunnel"] {
        let mut command = in_pod(program);
        command.arg("--print-config");
        if program == "tunnel" {
            command.args(["--target", "127.0.0.1:9"]);
        }
        let out = command.output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{program}: {}",
            text(&out.stderr)
        );
        let printed = text(&out.stdout);
        assert!(
            printed.contains("listen") || printed.contains("server"),
            "{printed}"
        );
        for hint in ["SERVICE", "service_", "10.96.", "tcp://", "fd00:"] {
            assert!(!printed.contains(hint), "{program}: {hint} in\n{printed}");
        }
        assert!(out.stderr.is_empty(), "{program}: {}", text(&out.stderr));
    }
}

fn refused(output: Output) -> String {
    let err = text(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{err}");
    assert!(output.stdout.is_empty(), "{}", text(&output.stdout));
    err
}

#[test]
fn a_typo_of_a_real_key_is_still_refused() {
    let err = refused(
        in_pod("echo-server")
            .env("ECHO_SERVER_LISTEN", "127.0.0.1:0")
            .env("ECHO_SERVER_IDLE_TIMEOT", "5m")
            .output()
            .unwrap(),
    );
    assert!(
        err.contains(
            "idle_timeot = \"5m\" (from environment variable ECHO_SERVER_IDLE_TIMEOT): unknown setting"
        ),
        "{err}"
    );
    // Only the typo: none of the links is reported.
    assert_eq!(err.lines().count(), 1, "{err}");

    // echo-server has no `port` setting: a port number there is a mistake.
    let err = refused(
        in_pod("echo-server")
            .env("ECHO_SERVER_PORT", "1234")
            .output()
            .unwrap(),
    );
    assert!(
        err.contains("port = 1234 (from environment variable ECHO_SERVER_PORT): unknown setting"),
        "{err}"
    );

    let err = refused(
        in_pod("tunnel")
            .args(["--target", "127.0.0.1:9"])
            .env("TUNNEL_PORT_X", "1")
            .output()
            .unwrap(),
    );
    assert!(
        err.contains("port_x = 1 (from environment variable TUNNEL_PORT_X): unknown setting"),
        "{err}"
    );

    let err = refused(
        in_pod("square-client")
            .env("SQUARE_CLIENT_SERVICE_HOSTS", "10.96.0.16")
            .arg("2")
            .output()
            .unwrap(),
    );
    assert!(
        err.contains("(from environment variable SQUARE_CLIENT_SERVICE_HOSTS): unknown setting"),
        "{err}"
    );
}
