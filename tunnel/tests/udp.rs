//! UDP routes over real sockets on loopback: sockets bound to port 0 are
//! passed to [`Tunnel::apply_sockets`], targets are small UDP servers in
//! the test.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::settings::{AccessList, ListenAddr, Period};
use tokio::net::{TcpListener, UdpSocket};
use tunnel::access_log::AccessLog;
use tunnel::{Protocol, Route, Tunnel};

const WAIT: Duration = Duration::from_secs(10);

fn udp_route(name: &str, listen: SocketAddr, target: SocketAddr) -> Route {
    Route {
        protocol: Protocol::Udp,
        idle_timeout: Period::from_secs(60),
        ..Route::new(
            name,
            vec![ListenAddr(listen)],
            vec![target.to_string().parse().unwrap()],
        )
    }
}

/// The peers a target has seen, one per session.
type Peers = Arc<Mutex<HashSet<SocketAddr>>>;

/// A UDP target that sends every datagram back to where it came from.
async fn echo_target() -> (SocketAddr, Peers) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let peers: Peers = Arc::default();
    let seen = peers.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            let (n, from) = socket.recv_from(&mut buf).await.unwrap();
            seen.lock().unwrap().insert(from);
            socket.send_to(&buf[..n], from).await.unwrap();
        }
    });
    (addr, peers)
}

/// A tunnel with one UDP route to `target`, where it listens, and its
/// access-log file.
async fn tunnel_to(
    target: SocketAddr,
    adjust: impl FnOnce(&mut Route),
) -> (Arc<Tunnel>, SocketAddr, tempfile::NamedTempFile) {
    let log_file = tempfile::NamedTempFile::new().unwrap();
    let tunnel = Arc::new(Tunnel::new(
        Duration::from_secs(2),
        AccessLog::to_file(log_file.path()).unwrap(),
    ));
    let socket = tunnel::udp::bind(ListenAddr("127.0.0.1:0".parse().unwrap())).unwrap();
    let addr = socket.local_addr().unwrap();
    let mut r = udp_route("dns", addr, target);
    adjust(&mut r);
    tunnel
        .apply_sockets(
            vec![r],
            HashMap::new(),
            HashMap::from([(ListenAddr(addr), socket)]),
        )
        .await
        .unwrap();
    (tunnel, addr, log_file)
}

/// Access-log lines that contain `text`, waiting until there are `n`.
async fn lines_with(file: &tempfile::NamedTempFile, text: &str, n: usize) -> Vec<String> {
    let end = tokio::time::Instant::now() + WAIT;
    loop {
        let all = std::fs::read_to_string(file.path()).unwrap();
        let lines: Vec<String> = all
            .lines()
            .filter(|l| l.contains(text))
            .map(str::to_string)
            .collect();
        if lines.len() >= n || tokio::time::Instant::now() > end {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The metrics once they contain every one of `lines` (or after a while).
async fn metrics_with(tunnel: &Tunnel, lines: &[&str]) -> String {
    let end = tokio::time::Instant::now() + WAIT;
    loop {
        let metrics = tunnel.metrics().render();
        if lines.iter().all(|line| metrics.contains(line)) || tokio::time::Instant::now() > end {
            return metrics;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A client socket on `from` (a loopback address), connected to `to`.
async fn client(from: [u8; 4], to: SocketAddr) -> UdpSocket {
    let socket = UdpSocket::bind(SocketAddr::from((from, 0))).await.unwrap();
    socket.connect(to).await.unwrap();
    socket
}

/// Sends `msg` and returns the reply, or `None` within `wait`.
async fn ask(socket: &UdpSocket, msg: &[u8], wait: Duration) -> Option<Vec<u8>> {
    socket.send(msg).await.unwrap();
    let mut buf = vec![0u8; 65536];
    let n = tokio::time::timeout(wait, socket.recv(&mut buf))
        .await
        .ok()?
        .unwrap();
    Some(buf[..n].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_clients_at_once_each_get_their_own_replies_over_a_socket_each() {
    let (target, peers) = echo_target().await;
    let (tunnel, addr, log) = tunnel_to(target, |_| {}).await;
    let clients = 50;
    let rounds = 20;
    let mut tasks = Vec::new();
    for c in 0..clients {
        tasks.push(tokio::spawn(async move {
            let socket = client([127, 0, 0, 1], addr).await;
            for round in 0..rounds {
                let msg = format!("client {c} round {round}");
                let reply = ask(&socket, msg.as_bytes(), WAIT).await;
                assert_eq!(reply.as_deref(), Some(msg.as_bytes()), "client {c}");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    // One session, so one socket to the target, per client.
    assert_eq!(peers.lock().unwrap().len(), clients);
    assert_eq!(tunnel.udp_sessions().await, clients);
    // A datagram is counted just after it is sent: the last replies may
    // reach their clients first.
    let lines = [
        "tunnel_udp_sessions_active{route=\"dns\"} 50",
        "tunnel_udp_sessions_total{route=\"dns\"} 50",
        "tunnel_udp_sent_datagrams_total{route=\"dns\"} 1000",
        "tunnel_udp_received_datagrams_total{route=\"dns\"} 1000",
        "tunnel_udp_datagrams_dropped_total{route=\"dns\",reason=\"session_limit\"} 0",
    ];
    let metrics = metrics_with(&tunnel, &lines).await;
    for line in lines {
        assert!(metrics.contains(line), "no {line} in\n{metrics}");
    }
    assert!(
        metrics.contains(&format!(
            "tunnel_connections_active{{route=\"dns\",target=\"{target}\"}} 50"
        )),
        "{metrics}"
    );
    // Shutdown ends every session with a line of its own.
    tunnel.shutdown().await;
    let lines = lines_with(&log, "end=\"closed at shutdown\"", clients).await;
    assert_eq!(lines.len(), clients, "{lines:?}");
    let clients_seen: HashSet<&str> = lines
        .iter()
        .map(|l| {
            l.split(" client=")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
        })
        .collect();
    assert_eq!(clients_seen.len(), clients);
    assert!(
        lines[0].contains("protocol=udp datagrams_sent=20 datagrams_received=20"),
        "{}",
        lines[0]
    );
}

#[tokio::test]
async fn datagrams_are_never_merged_or_split() {
    let (target, _) = echo_target().await;
    let (tunnel, addr, log) = tunnel_to(target, |_| {}).await;
    let socket = client([127, 0, 0, 1], addr).await;
    // Sent back to back, before reading any reply: each must come back
    // whole and alone, the empty one too.
    let sizes = [0usize, 1, 512, 1472, 9000, 32_768, 65_507];
    for (i, size) in sizes.iter().enumerate() {
        let datagram = vec![i as u8 + 1; *size];
        socket.send(&datagram).await.unwrap();
    }
    let mut buf = vec![0u8; 65536];
    for (i, size) in sizes.iter().enumerate() {
        let n = tokio::time::timeout(WAIT, socket.recv(&mut buf))
            .await
            .expect("a reply")
            .unwrap();
        assert_eq!(n, *size, "datagram {i}");
        assert!(buf[..n].iter().all(|&b| b == i as u8 + 1));
    }
    tunnel.shutdown().await;
    let total: usize = sizes.iter().sum();
    let line = &lines_with(&log, "closed at shutdown", 1).await[0];
    assert!(
        line.contains(&format!(" sent={total} received={total} "))
            && line.contains("datagrams_sent=7 datagrams_received=7"),
        "{line}"
    );
}

#[tokio::test]
async fn an_idle_session_ends_and_the_next_datagram_starts_another() {
    let (target, peers) = echo_target().await;
    let (tunnel, addr, log) = tunnel_to(target, |r| {
        r.idle_timeout = Period::from_millis(300);
    })
    .await;
    let socket = client([127, 0, 0, 1], addr).await;
    assert_eq!(ask(&socket, b"first", WAIT).await.unwrap(), b"first");
    // Traffic keeps it open past the timeout.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(ask(&socket, b"again", WAIT).await.unwrap(), b"again");
    }
    assert!(lines_with(&log, "idle timeout", 0).await.is_empty());
    let lines = lines_with(&log, "end=\"idle timeout\"", 1).await;
    assert_eq!(lines.len(), 1, "no idle end logged");
    let me = socket.local_addr().unwrap();
    assert!(
        lines[0].contains(&format!(
            "route=dns client={me} target={target} sent=25 received=25"
        )) && lines[0].contains("datagrams_sent=5 datagrams_received=5"),
        "{}",
        lines[0]
    );
    let duration: f64 = lines[0]
        .split(" duration=")
        .nth(1)
        .unwrap()
        .split('s')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((0.85..3.0).contains(&duration), "{duration}");
    assert_eq!(tunnel.udp_sessions().await, 0);
    // A new session: a new socket to the target.
    assert_eq!(ask(&socket, b"later", WAIT).await.unwrap(), b"later");
    assert_eq!(peers.lock().unwrap().len(), 2);
    tunnel.shutdown().await;
}

#[tokio::test]
async fn the_session_cap_refuses_new_clients_until_a_place_frees() {
    let (target, _) = echo_target().await;
    let (tunnel, addr, log) = tunnel_to(target, |r| {
        r.max_connections = 2;
        r.idle_timeout = Period::from_millis(400);
    })
    .await;
    let (a, b, c) = (
        client([127, 0, 0, 1], addr).await,
        client([127, 0, 0, 1], addr).await,
        client([127, 0, 0, 1], addr).await,
    );
    assert!(ask(&a, b"a", WAIT).await.is_some());
    assert!(ask(&b, b"b", WAIT).await.is_some());
    for _ in 0..3 {
        assert_eq!(ask(&c, b"c", Duration::from_millis(100)).await, None);
    }
    let refused = lines_with(&log, "end=\"refused: session limit\"", 1).await;
    // Logged once a second at most: three refusals, one line.
    assert_eq!(refused.len(), 1, "{refused:?}");
    let me = c.local_addr().unwrap();
    assert!(refused[0].contains(&format!("client={me}")), "{refused:?}");
    let metrics = tunnel.metrics().render();
    assert!(
        metrics.contains(
            "tunnel_udp_datagrams_dropped_total{route=\"dns\",reason=\"session_limit\"} 3"
        ),
        "{metrics}"
    );
    // Once a and b go idle, c gets in.
    lines_with(&log, "end=\"idle timeout\"", 2).await;
    assert_eq!(ask(&c, b"c", WAIT).await.as_deref(), Some(&b"c"[..]));
    tunnel.shutdown().await;
}

#[tokio::test]
async fn access_lists_apply_to_every_datagram() {
    let (target, peers) = echo_target().await;
    let (tunnel, addr, log) = tunnel_to(target, |r| {
        r.access.push(AccessList {
            deny: "127.0.0.2".parse().unwrap(),
            ..AccessList::default()
        });
    })
    .await;
    let denied = client([127, 0, 0, 2], addr).await;
    for _ in 0..3 {
        assert_eq!(
            ask(&denied, b"let me in", Duration::from_millis(100)).await,
            None
        );
    }
    let allowed = client([127, 0, 0, 1], addr).await;
    assert_eq!(ask(&allowed, b"hello", WAIT).await.unwrap(), b"hello");
    // The refused datagrams never reached the target.
    assert_eq!(peers.lock().unwrap().len(), 1);
    let lines = lines_with(&log, "refused by access list", 1).await;
    assert!(
        lines[0].contains(&format!("client={}", denied.local_addr().unwrap())),
        "{lines:?}"
    );
    let metrics = tunnel.metrics().render();
    assert!(
        metrics.contains("tunnel_udp_datagrams_dropped_total{route=\"dns\",reason=\"access\"} 3"),
        "{metrics}"
    );
    tunnel.shutdown().await;
}

#[tokio::test]
async fn a_target_that_refuses_ends_the_session() {
    // A port nobody listens on: the kernel answers with an ICMP port
    // unreachable.
    let dead = UdpSocket::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let (tunnel, addr, log) = tunnel_to(dead, |_| {}).await;
    let socket = client([127, 0, 0, 1], addr).await;
    assert_eq!(
        ask(&socket, b"anyone?", Duration::from_millis(200)).await,
        None
    );
    let lines = lines_with(&log, "end=\"refused by target\"", 1).await;
    assert_eq!(lines.len(), 1);
    assert!(
        lines[0].contains("datagrams_sent=1 datagrams_received=0"),
        "{lines:?}"
    );
    let metrics = tunnel.metrics().render();
    assert!(
        metrics.contains(&format!(
            "tunnel_connect_failures_total{{route=\"dns\",target=\"{dead}\"}} 1"
        )),
        "{metrics}"
    );
    tunnel.shutdown().await;
}

#[tokio::test]
async fn a_reload_keeps_the_socket_and_its_sessions_and_frees_what_it_drops() {
    let (target, peers) = echo_target().await;
    let (other_target, other_peers) = echo_target().await;
    let (tunnel, addr, log) = tunnel_to(target, |_| {}).await;
    let socket = client([127, 0, 0, 1], addr).await;
    assert_eq!(ask(&socket, b"one", WAIT).await.unwrap(), b"one");

    // Same address, another target: the socket is kept (nothing to bind,
    // the port stays the same), the running session goes on to its
    // target, a new client goes to the new one.
    let changed = udp_route("dns", addr, other_target);
    tunnel
        .apply(vec![changed.clone()], HashMap::new())
        .await
        .unwrap();
    assert_eq!(ask(&socket, b"two", WAIT).await.unwrap(), b"two");
    assert_eq!(peers.lock().unwrap().len(), 1);
    let newcomer = client([127, 0, 0, 1], addr).await;
    assert_eq!(ask(&newcomer, b"new", WAIT).await.unwrap(), b"new");
    assert_eq!(other_peers.lock().unwrap().len(), 1);
    assert_eq!(tunnel.udp_sessions().await, 2);

    // The address dropped: its sessions end, and the port is free.
    let elsewhere = udp_route("dns", "127.0.0.1:0".parse().unwrap(), other_target);
    tunnel.apply(vec![elsewhere], HashMap::new()).await.unwrap();
    let lines = lines_with(&log, "end=\"closed at reload\"", 2).await;
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(tunnel.udp_sessions().await, 0);
    UdpSocket::bind(addr)
        .await
        .expect("the old address is free");
    tunnel.shutdown().await;
}

#[tokio::test]
async fn a_tcp_and_a_udp_route_share_an_address() {
    let (udp_target, _) = echo_target().await;
    let tcp_target = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    };
    let log_file = tempfile::NamedTempFile::new().unwrap();
    let tunnel = Tunnel::new(
        Duration::from_secs(1),
        AccessLog::to_file(log_file.path()).unwrap(),
    );
    // A port free over both: another process may hold the TCP port of a
    // free UDP one.
    let (socket, listener) = loop {
        let socket = tunnel::udp::bind(ListenAddr("127.0.0.1:0".parse().unwrap())).unwrap();
        if let Ok(listener) = TcpListener::bind(socket.local_addr().unwrap()).await {
            break (socket, listener);
        }
    };
    let addr = socket.local_addr().unwrap();
    let routes = vec![
        udp_route("dns", addr, udp_target),
        Route::new(
            "dns-tcp",
            vec![ListenAddr(addr)],
            vec![tcp_target.to_string().parse().unwrap()],
        ),
    ];
    tunnel
        .apply_sockets(
            routes.clone(),
            HashMap::from([(ListenAddr(addr), listener)]),
            HashMap::from([(ListenAddr(addr), socket)]),
        )
        .await
        .unwrap();
    let udp = client([127, 0, 0, 1], addr).await;
    assert_eq!(ask(&udp, b"datagram", WAIT).await.unwrap(), b"datagram");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(b"stream").await.unwrap();
    let mut got = [0u8; 6];
    tokio::time::timeout(WAIT, tcp.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"stream");
    // A reload of the same routes binds nothing new.
    tunnel.apply(routes, HashMap::new()).await.unwrap();
    assert_eq!(ask(&udp, b"still", WAIT).await.unwrap(), b"still");
    drop(tcp);
    tunnel.shutdown().await;
}

#[tokio::test]
async fn a_dual_stack_route_serves_ipv4_and_ipv6_clients_to_an_ipv6_target() {
    let target = UdpSocket::bind("[::1]:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            let (n, from) = target.recv_from(&mut buf).await.unwrap();
            target.send_to(&buf[..n], from).await.unwrap();
        }
    });
    let log_file = tempfile::NamedTempFile::new().unwrap();
    let tunnel = Tunnel::new(
        Duration::from_secs(1),
        AccessLog::to_file(log_file.path()).unwrap(),
    );
    let socket = tunnel::udp::bind(ListenAddr("[::]:0".parse().unwrap())).unwrap();
    let port = socket.local_addr().unwrap().port();
    let route = udp_route("v6", socket.local_addr().unwrap(), target_addr);
    tunnel
        .apply_sockets(
            vec![route.clone()],
            HashMap::new(),
            HashMap::from([(route.listen[0], socket)]),
        )
        .await
        .unwrap();
    let v4 = client([127, 0, 0, 1], SocketAddr::from(([127, 0, 0, 1], port))).await;
    assert_eq!(ask(&v4, b"four", WAIT).await.unwrap(), b"four");
    let v6 = UdpSocket::bind("[::1]:0").await.unwrap();
    v6.connect(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)))
        .await
        .unwrap();
    assert_eq!(ask(&v6, b"six", WAIT).await.unwrap(), b"six");
    tunnel.shutdown().await;
    let lines = lines_with(&log_file, "closed at shutdown", 2).await;
    // The IPv4 client as the IPv4 address it is, not IPv4-mapped.
    let v4_client = format!("client={} target={target_addr}", v4.local_addr().unwrap());
    let v6_client = format!("client={} target={target_addr}", v6.local_addr().unwrap());
    assert!(lines.iter().any(|l| l.contains(&v4_client)), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains(&v6_client)), "{lines:?}");
}
