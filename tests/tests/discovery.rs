//! Discovery on one machine, on the real tunnel: a target named
//! `role/Endpoint` is looked up in a topology file and followed as the
//! file changes (as the development fabric rewrites it); a bad change
//! keeps the routes running; a peer with no topology is refused at start.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::discovery::{EndpointEntry, Instance, Topology};
use tests::{binary, counting_echo_server, Running};

fn topology(instances: &[SocketAddr]) -> Topology {
    let mut t = Topology::default();
    t.roles.entry("echo".into()).or_default().insert(
        "EchoEndpoint".into(),
        EndpointEntry {
            address: "127.0.0.1:1".into(),
            instances: Some(
                instances
                    .iter()
                    .enumerate()
                    .map(|(n, addr)| Instance {
                        id: format!("echo_IN_{n}"),
                        addr: *addr,
                    })
                    .collect(),
            ),
            proxy: None,
        },
    );
    t
}

/// Sends a byte through `tunnel` and reads it back.
fn through(tunnel: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(tunnel) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = [0u8; 1];
    s.write_all(b"x").is_ok() && s.read_exact(&mut got).is_ok()
}

/// Connects until `count` grows, for at most 15 s.
fn reaches(tunnel: SocketAddr, count: &Arc<AtomicUsize>, what: &str) {
    let before = count.load(Ordering::SeqCst);
    let end = Instant::now() + Duration::from_secs(15);
    while count.load(Ordering::SeqCst) == before {
        assert!(Instant::now() < end, "{what}: not within 15 s");
        through(tunnel);
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_tunnel_follows_the_instances_of_a_named_peer() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("topology.json");
    let (a, a_count) = counting_echo_server();
    let (b, b_count) = counting_echo_server();
    topology(&[a]).write(&file).unwrap();
    let mut command = Command::new(binary("tunnel"));
    command
        .args(["--listen", "127.0.0.1:0", "--target", "echo/EchoEndpoint"])
        .arg("--topology")
        .arg(&file);
    let mut tunnel = Running::start_reporting(command, "listen");
    assert!(through(tunnel.addr));
    assert_eq!(a_count.load(Ordering::SeqCst), 1);
    assert_eq!(b_count.load(Ordering::SeqCst), 0);

    // The role moves to another instance: new connections follow.
    topology(&[b]).write(&file).unwrap();
    reaches(tunnel.addr, &b_count, "the new instance");
    tunnel.wait_line("the topology changed: reloading the configuration");
    let a_then = a_count.load(Ordering::SeqCst);
    for _ in 0..5 {
        assert!(through(tunnel.addr));
    }
    assert_eq!(a_count.load(Ordering::SeqCst), a_then, "the old instance");

    // A topology without the role is reported, and changes nothing.
    let mut other = Topology::default();
    other.roles.entry("square".into()).or_default();
    other.write(&file).unwrap();
    let line = tunnel.wait_line("reload failed");
    assert!(
        line.contains("no role echo in the topology (it has square)"),
        "{line}"
    );
    reaches(tunnel.addr, &b_count, "the running route");
}

#[test]
fn a_peer_without_a_topology_is_refused_at_start() {
    let out = Command::new(binary("tunnel"))
        .args(["--listen", "127.0.0.1:0", "--target", "echo/EchoEndpoint"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("echo/EchoEndpoint names a peer"), "{err}");
    assert!(err.contains("TUNNEL_TOPOLOGY"), "{err}");
}
