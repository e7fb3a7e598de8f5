//! Happy Eyeballs with the real `tunnel` binary: a target name with an IPv6
//! and an IPv4 address, where the IPv6 one is silent or refuses.
//!
//! The tunnel runs inside a network namespace the test creates, where
//! `ip netns exec` puts the namespace's own hosts file over `/etc/hosts`
//! (from `/etc/netns/NAME/hosts`), so the system resolver gives the names
//! below both addresses, IPv6 first as RFC 6724 orders them:
//!
//! - `silent.test`: 2001:db8:ee::1, an address on a link of the namespace
//!   (a veth pair of its own) whose neighbour entry points at a MAC address
//!   nobody has: the SYN goes out and is dropped without a word, as by a
//!   firewall that drops. (A `blackhole` route would fail at once.)
//! - `refusing.test`: 2001:db8:ee::2, the namespace's own address on that
//!   link, where nothing listens: refused at once.
//!
//! and both the IPv4 address of the root namespace's end of the
//! namespace's veth link, where an echo server of the test listens. The
//! client connects from the root namespace to the tunnel's listener on the
//! namespace's end of the link. Documentation addresses only (2001:db8::/32,
//! 198.51.100.0/24, 00:00:5e:00:53:xx); nothing leaves the two namespaces.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tests::netns::Netns;
use tests::{binary, require, Running};

/// The silent IPv6 address, and the namespace's own one on the same link.
const SILENT_V6: &str = "2001:db8:ee::1";
const REFUSING_V6: &str = "2001:db8:ee::2";

/// The connect timeout the tunnel is given: the race must end long before.
const CONNECT_TIMEOUT: &str = "5s";

/// A namespace with the link above, its hosts file, and an echo server in
/// the root namespace that the namespace reaches over IPv4.
struct DualStack {
    // Dropped in this order: the hosts file, then the namespace.
    _hosts: HostsFile,
    ns: Netns,
    /// The echo server's address.
    echo: SocketAddr,
}

impl DualStack {
    fn new(tag: &str) -> DualStack {
        require("ip");
        let ns = Netns::create(tag);
        let n = ns.name.as_str();
        let steps: [&[&str]; 5] = [
            &[
                "-n", n, "link", "add", "hole0", "type", "veth", "peer", "name", "hole1",
            ],
            &["-n", n, "link", "set", "hole1", "up"],
            &["-n", n, "link", "set", "hole0", "up"],
            // No duplicate address detection: the address is usable at
            // once, and it is alone on its link.
            &[
                "-n",
                n,
                "addr",
                "add",
                &format!("{REFUSING_V6}/64"),
                "dev",
                "hole0",
                "nodad",
            ],
            // Frames for the silent address go to a MAC address nobody on
            // the link has; hole1 drops them.
            &[
                "-n",
                n,
                "-6",
                "neigh",
                "add",
                SILENT_V6,
                "lladdr",
                "00:00:5e:00:53:01",
                "dev",
                "hole0",
                "nud",
                "permanent",
            ],
        ];
        for step in steps {
            let out = Command::new("ip")
                .args(step)
                .stdin(Stdio::null())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "ip {}: {}",
                step.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let echo = echo_server_on(ns.host_addr);
        let v4 = ns.host_addr;
        let hosts = HostsFile::write(
            &ns,
            &format!(
                "127.0.0.1 localhost\n\
                 {SILENT_V6} silent.test\n{v4} silent.test\n\
                 {REFUSING_V6} refusing.test\n{v4} refusing.test\n"
            ),
        );
        DualStack {
            _hosts: hosts,
            ns,
            echo,
        }
    }

    /// A tunnel inside the namespace, listening on the namespace's end of
    /// the veth link, forwarding to `target`.
    fn tunnel(&self, target: &str) -> Running {
        let mut command = self.ns.exec(
            binary("tunnel"),
            [
                "--listen",
                &format!("{}:0", self.ns.ns_addr),
                "--target",
                target,
                "--connect-timeout",
                CONNECT_TIMEOUT,
            ],
        );
        command.env("RUST_LOG", "info");
        Running::start_reporting(command, "listen")
    }
}

/// `/etc/netns/NAME/hosts`, removed (with its directory) when dropped.
struct HostsFile(PathBuf);

impl HostsFile {
    fn write(ns: &Netns, text: &str) -> HostsFile {
        let dir = PathBuf::from("/etc/netns").join(&ns.name);
        std::fs::create_dir_all(&dir).unwrap();
        let file = HostsFile(dir);
        std::fs::write(file.0.join("hosts"), text).unwrap();
        file
    }
}

impl Drop for HostsFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An echo server on `ip` (port chosen by the kernel), on threads of the
/// test process.
fn echo_server_on(ip: Ipv4Addr) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).unwrap();
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

/// Connects to `tunnel`, sends a few bytes and waits for them to come back;
/// returns the time from before the connect to the echo.
fn echo_time(tunnel: &Running) -> Duration {
    let started = Instant::now();
    let mut client = TcpStream::connect(tunnel.addr).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    client.write_all(b"hello").unwrap();
    let mut got = [0u8; 5];
    if let Err(e) = client.read_exact(&mut got) {
        panic!(
            "no echo through the tunnel after {:?} ({e}); its log:\n{}",
            started.elapsed(),
            tunnel.stderr()
        );
    }
    let took = started.elapsed();
    assert_eq!(&got, b"hello");
    took
}

#[test]
fn a_silent_ipv6_address_gives_way_to_ipv4_after_250ms() {
    let dual = DualStack::new("eyes-silent");
    let mut tunnel = dual.tunnel(&format!("silent.test:{}", dual.echo.port()));

    let took = echo_time(&tunnel);
    // IPv6 went first and got no answer for the whole attempt delay; IPv4
    // started then and won, long before the 5 s connect timeout.
    assert!(
        took >= Duration::from_millis(245) && took < Duration::from_millis(1500),
        "the echo took {took:?}; log:\n{}",
        tunnel.stderr()
    );
    // The access log names the address that won.
    let line = tunnel.wait_line("target_addr=");
    assert!(
        line.contains(&format!("target_addr={}", dual.echo)),
        "{line}"
    );
    // Every connection races anew: the name may have moved.
    let again = echo_time(&tunnel);
    assert!(
        again >= Duration::from_millis(245) && again < Duration::from_millis(1500),
        "the second echo took {again:?}"
    );
    let (code, log) = tunnel.stop();
    assert_eq!(code, Some(0), "{log}");
}

#[test]
fn a_refusing_ipv6_address_gives_way_at_once_and_a_lost_race_names_each_address() {
    let dual = DualStack::new("eyes-refused");
    let mut tunnel = dual.tunnel(&format!("refusing.test:{}", dual.echo.port()));

    // Refused at once, so IPv4 starts at once: well within the 250 ms an
    // attempt that gets no answer would have been given.
    let took = echo_time(&tunnel);
    assert!(
        took < Duration::from_millis(200),
        "the echo took {took:?}; log:\n{}",
        tunnel.stderr()
    );
    let line = tunnel.wait_line("target_addr=");
    assert!(
        line.contains(&format!("target_addr={}", dual.echo)),
        "{line}"
    );
    drop(tunnel);

    // Where both refuse, the client is closed at once and the access log
    // says what each address did.
    let closed = TcpListener::bind((dual.ns.host_addr, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut tunnel = dual.tunnel(&format!("refusing.test:{closed}"));
    let started = Instant::now();
    let mut client = TcpStream::connect(tunnel.addr).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = client.write_all(b"hello");
    let mut buf = [0u8; 16];
    assert!(matches!(client.read(&mut buf), Ok(0) | Err(_)));
    assert!(started.elapsed() < Duration::from_millis(200));
    let line = tunnel.wait_line("target unreachable");
    for (addr, why) in [
        (format!("[{REFUSING_V6}]:{closed}"), "connection refused"),
        (
            format!("{}:{closed}", dual.ns.host_addr),
            "connection refused",
        ),
    ] {
        assert!(line.contains(&format!("{addr}: {why}")), "{line}");
    }
    assert!(
        line.contains("no address of refusing.test connected"),
        "{line}"
    );
}
