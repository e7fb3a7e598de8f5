//! A balancer's active health checks against real targets on loopback: a
//! check closes like a polite client (the target sees an end of stream and
//! its writes succeed, never a reset), a check against a target that never
//! closes is bounded, and a retired balancer stops checking at once even
//! while connections still hold it.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::settings::Period;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tunnel::balance::Balancer;
use tunnel::metrics::RouteStats;
use tunnel::settings::{HealthCheck, Policy};
use tunnel::Target;

const WAIT: Duration = Duration::from_secs(20);

fn checks(interval_ms: u64, timeout_ms: u64) -> HealthCheck {
    HealthCheck {
        interval: Period::from_millis(interval_ms),
        timeout: Period::from_millis(timeout_ms),
        rise: 1,
        fall: 1,
    }
}

fn checked(addr: SocketAddr, health: HealthCheck, stats: &RouteStats) -> Arc<Balancer> {
    let target: Target = addr.to_string().parse().unwrap();
    Balancer::new(
        "checked",
        &[target],
        Policy::RoundRobin,
        health,
        true,
        stats,
    )
}

/// A target that counts the connections it accepts and holds each one
/// until its peer closes; with `ignore_eof`, for ever.
async fn counting_target(ignore_eof: bool) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest).await;
                if ignore_eof {
                    std::future::pending::<()>().await;
                }
            });
        }
    });
    (addr, accepted)
}

async fn wait_for(count: &AtomicUsize, at_least: usize, what: &str) {
    tokio::time::timeout(WAIT, async {
        while count.load(Ordering::SeqCst) < at_least {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

/// What a greeting server saw of one connection: its two writes and the
/// read that follows them.
type Seen = (
    Result<(), ErrorKind>,
    Result<(), ErrorKind>,
    Option<Result<usize, ErrorKind>>,
);

#[tokio::test]
async fn a_check_closes_like_a_polite_client() {
    // Like the date/time service: a greeting, then (a moment later) the
    // menu, then it reads what the client says until the client leaves.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut seen) = mpsc::unbounded_channel::<Seen>();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let tx = tx.clone();
            tokio::spawn(async move {
                let greeting = s
                    .write_all(b"Welcome to the date and time service\r\n")
                    .await
                    .map_err(|e| e.kind());
                tokio::time::sleep(Duration::from_millis(50)).await;
                let menu = s
                    .write_all(b"1 date\r\n2 time\r\n9 quit\r\n> ")
                    .await
                    .map_err(|e| e.kind());
                let mut buf = [0u8; 64];
                let read = tokio::time::timeout(WAIT, s.read(&mut buf))
                    .await
                    .ok()
                    .map(|r| r.map_err(|e| e.kind()));
                let _ = tx.send((greeting, menu, read));
            });
        }
    });
    let stats = RouteStats::default();
    let balancer = checked(addr, checks(200, 5_000), &stats);
    for _ in 0..3 {
        let got = tokio::time::timeout(WAIT, seen.recv())
            .await
            .expect("a check in time")
            .unwrap();
        assert_eq!(
            got,
            (Ok(()), Ok(()), Some(Ok(0))),
            "the target must see its writes succeed and then an end of stream"
        );
    }
    assert!(balancer.backends()[0].is_up());
    balancer.retire();
}

#[tokio::test]
async fn a_check_on_a_target_that_never_closes_is_bounded() {
    let (addr, accepted) = counting_target(true).await;
    let stats = RouteStats::default();
    let balancer = checked(addr, checks(50, 200), &stats);
    // Each check gives up waiting for the close after its timeout, so the
    // checks go on.
    wait_for(&accepted, 4, "four checks").await;
    assert!(balancer.backends()[0].is_up());
    balancer.retire();
}

#[tokio::test]
async fn a_retired_balancer_stops_checking_while_connections_hold_it() {
    let (addr, accepted) = counting_target(false).await;
    let stats = RouteStats::default();
    let balancer = checked(addr, checks(50, 2_000), &stats);
    // What a connection that is still running holds.
    let held_by_a_connection = balancer.clone();
    wait_for(&accepted, 3, "three checks").await;
    balancer.retire();
    drop(balancer);
    // A check that was connecting at that moment may still land.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = accepted.load(Ordering::SeqCst);
    // Twenty check intervals.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        after,
        "a retired balancer went on checking"
    );
    drop(held_by_a_connection);
}
