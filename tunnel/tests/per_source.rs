//! A route's per-source limits over real TCP on loopback, across reloads:
//! unchanged or raised limits keep counting the connections already open
//! (a reload is no way round them), a new grouping starts afresh, and the
//! counters go on either way.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::limits::PerSourceSettings;
use common::settings::ListenAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tunnel::access_log::AccessLog;
use tunnel::{Route, Tunnel};

/// An echo target.
async fn echo_target() -> SocketAddr {
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
}

/// A connection through the tunnel if it is served (what it sends comes
/// back), none if it is refused (closed without a byte).
async fn served(listen: SocketAddr) -> Option<TcpStream> {
    let mut s = TcpStream::connect(listen).await.unwrap();
    let _ = s.write_all(b"x").await;
    let mut got = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(10), s.read(&mut got)).await {
        Ok(Ok(1)) => Some(s),
        Ok(_) => None,
        Err(_) => panic!("neither served nor refused within 10 s"),
    }
}

fn route(addr: SocketAddr, target: SocketAddr, per_source: &str) -> Route {
    Route {
        per_source: common::yaml::from_str::<PerSourceSettings>(per_source).unwrap(),
        ..Route::new(
            "test",
            vec![ListenAddr(addr)],
            vec![target.to_string().parse().unwrap()],
        )
    }
}

fn refusals(tunnel: &Tunnel) -> String {
    tunnel
        .metrics()
        .render()
        .lines()
        .find(|l| {
            l.starts_with("tunnel_per_source_refused_total{route=\"test\",limit=\"connections\"}")
        })
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn a_reload_is_no_way_round_the_limit() {
    let target = echo_target().await;
    let tunnel = Arc::new(Tunnel::new(Duration::from_secs(1), AccessLog::to_log()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tunnel
        .apply(
            vec![route(addr, target, "{max_connections: 2}")],
            HashMap::from([(ListenAddr(addr), listener)]),
        )
        .await
        .unwrap();
    let mut held = vec![served(addr).await.unwrap(), served(addr).await.unwrap()];
    assert!(served(addr).await.is_none());

    // The same limits: the same limiter, the two still count.
    tunnel
        .apply(
            vec![route(addr, target, "{max_connections: 2}")],
            HashMap::new(),
        )
        .await
        .unwrap();
    assert!(served(addr).await.is_none());
    // A higher one: one more.
    tunnel
        .apply(
            vec![route(addr, target, "{max_connections: 3}")],
            HashMap::new(),
        )
        .await
        .unwrap();
    held.push(served(addr).await.unwrap());
    assert!(served(addr).await.is_none());
    assert!(refusals(&tunnel).ends_with(" 3"), "{}", refusals(&tunnel));

    // Another grouping is another table: it starts empty.
    tunnel
        .apply(
            vec![route(addr, target, "{max_connections: 3, prefix_v4: 8}")],
            HashMap::new(),
        )
        .await
        .unwrap();
    for _ in 0..3 {
        held.push(served(addr).await.unwrap());
    }
    assert!(served(addr).await.is_none());
    assert!(refusals(&tunnel).ends_with(" 4"), "{}", refusals(&tunnel));
    // Off: everyone in.
    tunnel
        .apply(vec![route(addr, target, "{}")], HashMap::new())
        .await
        .unwrap();
    for _ in 0..5 {
        held.push(served(addr).await.unwrap());
    }
    drop(held);
    tunnel.shutdown().await;
}
