//! Balancing over several real targets on loopback: the policies, retrying
//! a failed connect on the next target, ejection by health checks, and the
//! failover run (three targets, two killed mid-stream).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::settings::{ListenAddr, Period};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tunnel::access_log::AccessLog;
use tunnel::settings::{HealthCheck, Policy};
use tunnel::{Route, Tunnel};

const WAIT: Duration = Duration::from_secs(20);

/// An echo target that answers with its own name first, and can be killed
/// (listener closed, open connections reset) and started again on the same
/// address.
struct Target {
    addr: SocketAddr,
    name: &'static str,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Target {
    async fn start(name: &'static str) -> Target {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target = Target {
            addr,
            name,
            tasks: Arc::default(),
        };
        target.serve(listener);
        target
    }

    fn serve(&self, listener: TcpListener) {
        let name = self.name;
        let tasks = self.tasks.clone();
        let accept = tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let conn = tokio::spawn(async move {
                    if s.write_all(name.as_bytes()).await.is_err() {
                        return;
                    }
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
                tasks.lock().unwrap().push(conn);
            }
        });
        self.tasks.lock().unwrap().push(accept);
    }

    /// Kills it, and returns once its listener is closed: an abort only
    /// asks, and a connect made before the task is dropped would still be
    /// accepted by the kernel, then reset.
    async fn kill(&self) {
        let tasks: Vec<JoinHandle<()>> = self.tasks.lock().unwrap().drain(..).collect();
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
    }

    async fn restart(&self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }
}

async fn tunnel(
    targets: &[&Target],
    policy: Policy,
    checks: Option<HealthCheck>,
) -> (Arc<Tunnel>, SocketAddr) {
    let addrs: Vec<SocketAddr> = targets.iter().map(|t| t.addr).collect();
    tunnel_over(&addrs, policy, checks).await
}

/// A tunnel with one route over `targets`, live or not, and where it
/// listens.
async fn tunnel_over(
    targets: &[SocketAddr],
    policy: Policy,
    checks: Option<HealthCheck>,
) -> (Arc<Tunnel>, SocketAddr) {
    let tunnel = Arc::new(Tunnel::new(Duration::from_secs(1), AccessLog::to_log()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let route = Route {
        balance: policy,
        health: checks.unwrap_or_default(),
        checks: checks.is_some(),
        connect_timeout: Period::from_secs(2),
        idle_timeout: Period::from_secs(60),
        max_connections: 1000,
        ..Route::new(
            "pool",
            vec![ListenAddr(addr)],
            targets
                .iter()
                .map(|t| t.to_string().parse().unwrap())
                .collect(),
        )
    };
    tunnel
        .apply(vec![route], HashMap::from([(ListenAddr(addr), listener)]))
        .await
        .unwrap();
    (tunnel, addr)
}

/// Connects through the tunnel; returns the name of the target that
/// answered and the open stream, after checking an echo.
async fn who(addr: SocketAddr) -> (String, TcpStream) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut name = [0u8; 1];
    tokio::time::timeout(WAIT, s.read_exact(&mut name))
        .await
        .expect("an answer in time")
        .expect("a target answered");
    s.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    tokio::time::timeout(WAIT, s.read_exact(&mut echo))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echo, b"ping");
    (String::from_utf8_lossy(&name).into_owned(), s)
}

fn fast_checks() -> HealthCheck {
    HealthCheck {
        interval: Period::from_millis(50),
        timeout: Period::from_millis(500),
        rise: 2,
        fall: 2,
    }
}

#[tokio::test]
async fn round_robin_takes_each_target_in_turn() {
    let (a, b, c) = (
        Target::start("a").await,
        Target::start("b").await,
        Target::start("c").await,
    );
    let (tunnel, addr) = tunnel(&[&a, &b, &c], Policy::RoundRobin, None).await;
    let mut seen = HashMap::new();
    for _ in 0..30 {
        *seen.entry(who(addr).await.0).or_insert(0) += 1;
    }
    assert_eq!(
        seen,
        HashMap::from([("a".into(), 10), ("b".into(), 10), ("c".into(), 10)])
    );
    tunnel.shutdown().await;
}

#[tokio::test]
async fn least_connections_avoids_the_busy_target() {
    let (a, b) = (Target::start("a").await, Target::start("b").await);
    let (tunnel, addr) = tunnel(&[&a, &b], Policy::LeastConnections, None).await;
    let balancers = tunnel.balancers().await;
    let backends = balancers["pool"].backends();
    let active = || -> i64 {
        backends
            .iter()
            .map(|b| b.stats.active.load(Ordering::Relaxed))
            .sum()
    };
    // Hold three connections; they spread 2/1 or 1/2.
    let held = [who(addr).await, who(addr).await, who(addr).await];
    let busy_a = held.iter().filter(|(n, _)| n == "a").count();
    let expected = if busy_a >= 2 { "b" } else { "a" };
    for _ in 0..3 {
        let (name, s) = who(addr).await;
        assert_eq!(name, expected, "a new connection went to the busier target");
        drop(s);
        // The tunnel has seen the close before the next pick.
        wait_until(|| active() == 3, "the closed connection no longer counted").await;
    }
    drop(held);
    tunnel.shutdown().await;
}

#[tokio::test]
async fn first_available_fails_over_and_comes_back() {
    let (a, b) = (Target::start("a").await, Target::start("b").await);
    let (tunnel, addr) = tunnel(&[&a, &b], Policy::FirstAvailable, Some(fast_checks())).await;
    for _ in 0..5 {
        assert_eq!(who(addr).await.0, "a");
    }
    a.kill().await;
    // Served by the standby at once, before any check noticed.
    for _ in 0..5 {
        assert_eq!(who(addr).await.0, "b");
    }
    let balancers = tunnel.balancers().await;
    let backends = balancers["pool"].backends();
    wait_until(|| !backends[0].is_up(), "the dead target ejected").await;
    assert!(backends[0].stats.connect_failures.load(Ordering::Relaxed) >= 1);
    a.restart().await;
    wait_until(|| backends[0].is_up(), "the target back in rotation").await;
    assert_eq!(who(addr).await.0, "a");
    tunnel.shutdown().await;
}

async fn wait_until(check: impl Fn() -> bool, what: &str) {
    let end = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_targets_two_killed_mid_run_every_connection_served() {
    let targets = [
        Target::start("a").await,
        Target::start("b").await,
        Target::start("c").await,
    ];
    let refs: Vec<&Target> = targets.iter().collect();
    let (tunnel, addr) = tunnel(&refs, Policy::RoundRobin, Some(fast_checks())).await;
    let mut served = HashMap::new();
    for i in 0..600 {
        if i == 200 {
            targets[0].kill().await;
        }
        if i == 400 {
            targets[2].kill().await;
        }
        let (name, _) = who(addr).await;
        *served.entry(name).or_insert(0) += 1;
    }
    let total: i32 = served.values().sum();
    assert_eq!(total, 600, "every connection served: {served:?}");
    // All three served before the kills; only b after the second.
    assert!(served["a"] >= 60 && served["c"] >= 60, "{served:?}");
    assert!(served["b"] >= 260, "{served:?}");
    let balancers = tunnel.balancers().await;
    let backends = balancers["pool"].backends();
    wait_until(
        || !backends[0].is_up() && !backends[2].is_up() && backends[1].is_up(),
        "ejections",
    )
    .await;
    tunnel.shutdown().await;
}

/// An address nothing listens on: a port bound and closed again.
async fn dead_address() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The targets of `layout` in order: `a` and `b` for the live targets, `.`
/// for a dead address.
async fn layout(layout: &str, a: &Target, b: &Target) -> Vec<SocketAddr> {
    let mut addrs = Vec::new();
    for c in layout.chars() {
        addrs.push(match c {
            'a' => a.addr,
            'b' => b.addr,
            _ => dead_address().await,
        });
    }
    addrs
}

/// A tunnel over `targets` with fast checks, once the checks have ejected
/// every dead target.
async fn tunnel_with_dead_ejected(
    targets: &[SocketAddr],
    live: &[SocketAddr],
    policy: Policy,
) -> (Arc<Tunnel>, SocketAddr) {
    let (tunnel, addr) = tunnel_over(targets, policy, Some(fast_checks())).await;
    let balancers = tunnel.balancers().await;
    let backends = balancers["pool"].backends();
    wait_until(
        || {
            backends.iter().all(|b| {
                let is_live = live.iter().any(|l| b.target.to_string() == l.to_string());
                b.is_up() == is_live
            })
        },
        "the dead targets ejected",
    )
    .await;
    (tunnel, addr)
}

#[tokio::test]
async fn round_robin_is_even_over_the_live_targets_wherever_the_dead_ones_are() {
    let (a, b) = (Target::start("a").await, Target::start("b").await);
    for order in ["ab..", "..ab", ".a.b", "a..b", "a.b."] {
        let targets = layout(order, &a, &b).await;
        let (tunnel, addr) =
            tunnel_with_dead_ejected(&targets, &[a.addr, b.addr], Policy::RoundRobin).await;
        let mut seen = HashMap::new();
        for _ in 0..40 {
            *seen.entry(who(addr).await.0).or_insert(0) += 1;
        }
        assert_eq!(
            seen,
            HashMap::from([("a".to_string(), 20), ("b".to_string(), 20)]),
            "targets {order}"
        );
        tunnel.shutdown().await;
    }
}

#[tokio::test]
async fn least_connections_spreads_ties_evenly_over_the_live_targets() {
    let (a, b) = (Target::start("a").await, Target::start("b").await);
    for order in ["ab..", "..ab"] {
        let targets = layout(order, &a, &b).await;
        let (tunnel, addr) =
            tunnel_with_dead_ejected(&targets, &[a.addr, b.addr], Policy::LeastConnections).await;
        let balancers = tunnel.balancers().await;
        let backends = balancers["pool"].backends();
        let mut seen = HashMap::new();
        for _ in 0..20 {
            let (name, stream) = who(addr).await;
            *seen.entry(name).or_insert(0) += 1;
            drop(stream);
            // Every pick is a tie: wait until the tunnel has seen the close.
            wait_until(
                || {
                    backends
                        .iter()
                        .all(|b| b.stats.active.load(Ordering::Relaxed) == 0)
                },
                "the connection closed",
            )
            .await;
        }
        assert_eq!(
            seen,
            HashMap::from([("a".to_string(), 10), ("b".to_string(), 10)]),
            "targets {order}"
        );
        tunnel.shutdown().await;
    }
}

#[tokio::test]
async fn first_available_skips_dead_targets_in_front() {
    let (a, b) = (Target::start("a").await, Target::start("b").await);
    let targets = layout("..ab", &a, &b).await;
    let (tunnel, addr) =
        tunnel_with_dead_ejected(&targets, &[a.addr, b.addr], Policy::FirstAvailable).await;
    for _ in 0..10 {
        assert_eq!(who(addr).await.0, "a");
    }
    tunnel.shutdown().await;
}
