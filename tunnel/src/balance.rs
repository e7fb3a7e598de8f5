//! Spreading a route's connections over several targets.
//!
//! A [`Balancer`] picks targets by policy (round-robin, least connections,
//! or first available) among the live ones, and when a connect fails it
//! tries the next one within the same client connection. A target is ejected
//! after `fall` consecutive failures, seen either by a client's connect or by
//! the active TCP health check, and comes back after `rise` consecutive
//! successful checks. When every target is down, all are tried anyway: a
//! check may lag behind a recovery, and refusing outright helps no one.
//!
//! A check is a polite client: it connects, sends its end of stream, reads
//! and discards whatever the target says until the target closes (within
//! the check timeout), and only then closes, so a server that greets its
//! clients sees an ordinary disconnect, not a reset. A balancer that a
//! reload replaces is retired: its checks stop at once, although its last
//! connections may run for hours.
//!
//! This is a library API: the development fabric balances its instances
//! with it too.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::connect::{close_politely, connect, Unreachable};
use crate::metrics::{RouteStats, TargetStats};
use crate::settings::{HealthCheck, Policy, Target};

/// One target of a balancer, with its state.
#[derive(Debug)]
pub struct Backend {
    /// Where it is.
    pub target: Target,
    /// Its counters; `up` is its health.
    pub stats: Arc<TargetStats>,
    failures: AtomicU32,
    successes: AtomicU32,
}

impl Backend {
    /// Whether new connections may go to it.
    pub fn is_up(&self) -> bool {
        self.stats.up.load(Ordering::Relaxed)
    }

    fn failed(&self, fall: u32, route: &str, why: &str) {
        self.successes.store(0, Ordering::Relaxed);
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= fall.max(1) && self.stats.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(route, target = %self.target, failures, error = why, "target down: ejected");
        }
    }

    fn succeeded(&self, rise: u32, route: &str) {
        self.failures.store(0, Ordering::Relaxed);
        let successes = self.successes.fetch_add(1, Ordering::Relaxed) + 1;
        if successes >= rise.max(1) && !self.stats.up.swap(true, Ordering::Relaxed) {
            tracing::info!(route, target = %self.target, "target up: back in rotation");
        }
    }
}

/// The connection a balancer made, and to which backend.
#[derive(Debug)]
pub struct TargetConnection {
    /// The socket to the target.
    pub stream: TcpStream,
    /// The address connected to.
    pub addr: SocketAddr,
    /// The backend it belongs to; its `active` count includes this
    /// connection until [`Active`] is dropped.
    pub backend: Active,
}

/// A backend with one more connection open, until dropped.
#[derive(Debug)]
pub struct Active(Arc<Backend>);

impl Active {
    /// The backend, to name it among those already tried.
    pub fn shared(&self) -> Arc<Backend> {
        self.0.clone()
    }
}

impl std::ops::Deref for Active {
    type Target = Backend;
    fn deref(&self) -> &Backend {
        &self.0
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.stats.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Picks targets for a route and watches their health.
#[derive(Debug)]
pub struct Balancer {
    route: String,
    backends: Vec<Arc<Backend>>,
    policy: Policy,
    health: HealthCheck,
    next: AtomicUsize,
    stop: CancellationToken,
}

impl Balancer {
    /// A balancer over `targets`; with `checks`, a task checks each target
    /// every interval until the balancer is retired or dropped. Counters
    /// live in `stats`, so they outlast the balancer across reloads.
    pub fn new(
        route: &str,
        targets: &[Target],
        policy: Policy,
        health: HealthCheck,
        checks: bool,
        stats: &RouteStats,
    ) -> Arc<Balancer> {
        let backends = targets
            .iter()
            .map(|t| {
                let stats = stats.target(&t.to_string());
                // A reload starts with every target in rotation until the
                // checks say otherwise.
                stats.up.store(true, Ordering::Relaxed);
                Arc::new(Backend {
                    target: t.clone(),
                    stats,
                    failures: AtomicU32::new(0),
                    successes: AtomicU32::new(0),
                })
            })
            .collect();
        let balancer = Arc::new(Balancer {
            route: route.to_string(),
            backends,
            policy,
            health,
            next: AtomicUsize::new(0),
            stop: CancellationToken::new(),
        });
        if checks {
            for backend in &balancer.backends {
                tokio::spawn(check_forever(
                    balancer.route.clone(),
                    backend.clone(),
                    health,
                    balancer.stop.clone(),
                ));
            }
        }
        balancer
    }

    /// Stops the health checks now, a check in progress included. A reload
    /// calls it on the balancer it replaces: the connections still running
    /// hold that balancer, and its checks must not go on (and keep setting
    /// the targets' shared `up`) until the last of them ends.
    pub fn retire(&self) {
        self.stop.cancel();
    }

    /// The backends, in configured order.
    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    /// The order to try backends in for one new connection: live ones by
    /// policy, or every one when none is live; none of `tried`.
    fn order(&self, tried: &[Arc<Backend>]) -> Vec<Arc<Backend>> {
        let untried = |b: &&Arc<Backend>| !tried.iter().any(|t| Arc::ptr_eq(t, b));
        let mut live: Vec<Arc<Backend>> = self
            .backends
            .iter()
            .filter(untried)
            .filter(|b| b.is_up())
            .cloned()
            .collect();
        if live.is_empty() {
            live = self.backends.iter().filter(untried).cloned().collect();
        }
        if self.policy != Policy::FirstAvailable {
            // The turn runs over the live targets only: rotating over all of
            // them and then skipping the dead would hand each dead target's
            // turns to the live one after it ([A, B, dead, dead] gave A
            // three connections in four).
            let start = self.next.fetch_add(1, Ordering::Relaxed) % live.len().max(1);
            live.rotate_left(start);
        }
        if self.policy == Policy::LeastConnections {
            // Stable: ties keep the rotation, so they are spread too.
            live.sort_by_key(|b| b.stats.active.load(Ordering::Relaxed));
        }
        live
    }

    /// Connects to a target, trying the next one when a connect fails, each
    /// within `timeout`. The error lists every failure.
    pub async fn connect(&self, timeout: Duration) -> Result<TargetConnection, Unreachable> {
        self.connect_except(timeout, &[]).await
    }

    /// Like [`Balancer::connect`], never to one of `tried` (the targets a
    /// connection being retried has already failed on).
    pub async fn connect_except(
        &self,
        timeout: Duration,
        tried: &[Arc<Backend>],
    ) -> Result<TargetConnection, Unreachable> {
        let mut failures = Vec::new();
        for backend in self.order(tried) {
            match connect(&backend.target, timeout).await {
                Ok((stream, addr)) => {
                    // A real connection is the best health check there is.
                    backend.succeeded(1, &self.route);
                    backend.stats.total.fetch_add(1, Ordering::Relaxed);
                    backend.stats.active.fetch_add(1, Ordering::Relaxed);
                    if !failures.is_empty() {
                        tracing::info!(route = %self.route, target = %backend.target, tried = failures.len() + 1, "connected after retrying");
                    }
                    return Ok(TargetConnection {
                        stream,
                        addr,
                        backend: Active(backend),
                    });
                }
                Err(Unreachable(why)) => {
                    backend
                        .stats
                        .connect_failures
                        .fetch_add(1, Ordering::Relaxed);
                    backend.failed(self.health.fall, &self.route, &why);
                    tracing::debug!(route = %self.route, target = %backend.target, error = %why, "connect failed; trying the next target");
                    failures.push(why);
                }
            }
        }
        if failures.is_empty() {
            return Err(Unreachable("no other target to try".into()));
        }
        Err(Unreachable(failures.join("; ")))
    }

    /// Records that `backend` accepted a connection and then closed or
    /// reset it before its first byte: it counts towards ejecting the
    /// target, as a failed connect does.
    pub fn failed_before_answer(&self, backend: &Backend, why: &str) {
        backend.failed(self.health.fall, &self.route, why);
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn check_forever(
    route: String,
    backend: Arc<Backend>,
    health: HealthCheck,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(health.interval.0.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let check = async {
        loop {
            tick.tick().await;
            match connect(&backend.target, health.timeout.0).await {
                Ok((stream, _)) => {
                    backend.succeeded(health.rise, &route);
                    close_politely(stream, health.timeout.0).await;
                }
                Err(Unreachable(why)) => backend.failed(health.fall, &route, &why),
            }
        }
    };
    tokio::select! {
        biased;
        _ = stop.cancelled() => {}
        _ = check => {}
    }
}
