//! Readiness: whether every route can reach a live target, for the admin
//! endpoint's `GET /readyz`.
//!
//! A route with active health checks is live while its balancer has a
//! target in rotation ([`Backend::is_up`]): the checks already watch it.
//! A route without them is probed: a [`Probe`] connects to each target the
//! way a relayed connection does (the host name resolved again, within the
//! route's connect timeout), hangs up politely, and calls the route live if
//! any target accepted. Probes are made only when readiness is asked for,
//! and never more often than the asking allows the target to bear:
//!
//! - at most one round of probes per route is in flight, however many
//!   requests arrive (single flight): the others wait for its result;
//! - a round's result is reused for [`FRESH`] after it finished, so a flood
//!   of requests makes at most one connection per target per
//!   `FRESH` + the round's duration.
//!
//! An answer waits at most [`ANSWER_WITHIN`] for a round (the kubelet
//! gives a probe 1 s by default): a round still running then, because a
//! target is slow to accept or to resolve, is answered from the previous
//! round's result, and from "not known yet" (not ready) when there is none.
//! The round itself goes on to the full connect timeout, so a slow target
//! that relayed connections would still reach is judged by what they would
//! see; the next request finds its result.
//!
//! [`Backend::is_up`]: crate::balance::Backend::is_up

use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use common::settings::ListenAddr;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::balance::Balancer;
use crate::connect::{close_politely, connect, Unreachable};
use crate::settings::Target;

/// How long a round's result is reused before a request starts another.
pub const FRESH: Duration = Duration::from_secs(1);

/// The longest a readiness answer waits for probes; the rest of the
/// kubelet's default 1 s probe timeout is left for the network and the
/// request itself.
pub const ANSWER_WITHIN: Duration = Duration::from_millis(800);

/// How long a probe that connected waits for the target to close after
/// sending its end of stream (see [`close_politely`]); it is not part of
/// the answer's wait.
const CLOSE_WITHIN: Duration = Duration::from_secs(1);

/// What one round of probes found.
#[derive(Debug, Clone)]
pub struct Round {
    /// When the round ended.
    pub finished: Instant,
    /// Targets that accepted.
    pub live: usize,
    /// Why each of the others could not be reached.
    pub down: Vec<String>,
}

#[derive(Debug, Default)]
struct ProbeState {
    /// A round is in flight.
    running: bool,
    /// The latest round's result.
    last: Option<Round>,
}

/// The readiness probes of one route's targets, single-flight and cached.
/// It outlives a reload that keeps the route's targets and connect
/// timeout, so does its last result.
#[derive(Debug)]
pub struct Probe {
    targets: Vec<Target>,
    timeout: Duration,
    state: watch::Sender<ProbeState>,
}

impl Probe {
    /// Probes of `targets`, each connect within `timeout`.
    pub fn new(targets: &[Target], timeout: Duration) -> Arc<Probe> {
        Arc::new(Probe {
            targets: targets.to_vec(),
            timeout,
            state: watch::Sender::new(ProbeState::default()),
        })
    }

    /// Whether this probe serves a route with `targets` and `timeout`.
    pub fn probes(&self, targets: &[Target], timeout: Duration) -> bool {
        self.targets == targets && self.timeout == timeout
    }

    /// The targets' state: the last result while it is fresh; otherwise
    /// the result of a round (started now unless one is in flight), or,
    /// if that round is still running at `deadline`, the last result,
    /// whatever its age. `None` when no round has finished yet.
    pub async fn result(self: &Arc<Self>, deadline: Instant) -> Option<Round> {
        let (mut fresh, mut start) = (None, false);
        self.state.send_if_modified(|state| {
            match &state.last {
                Some(round) if round.finished.elapsed() < FRESH => fresh = Some(round.clone()),
                _ if !state.running => {
                    state.running = true;
                    start = true;
                }
                _ => {}
            }
            // Nobody waits for a round to start, only for one to end.
            false
        });
        if fresh.is_some() {
            return fresh;
        }
        if start {
            // A task of its own: the request that started the round may
            // stop waiting (or go away) before the round ends.
            tokio::spawn(self.clone().round());
        }
        let mut seen = self.state.subscribe();
        let _ = tokio::time::timeout_at(deadline, seen.wait_for(|s| !s.running)).await;
        let last = seen.borrow().last.clone();
        last
    }

    /// One round: every target at once, then the result for all to see.
    async fn round(self: Arc<Self>) {
        // Clears `running` even if this task is dropped half-way, so a
        // lost round never stops readiness from being asked again.
        struct Running<'a>(&'a watch::Sender<ProbeState>, Option<Round>);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                let round = self.1.take();
                self.0.send_modify(|state| {
                    state.running = false;
                    if round.is_some() {
                        state.last = round;
                    }
                });
            }
        }
        let mut running = Running(&self.state, None);
        let mut probes = JoinSet::new();
        for target in &self.targets {
            let (target, timeout) = (target.clone(), self.timeout);
            probes.spawn(async move {
                match connect(&target, timeout).await {
                    Ok((stream, _)) => {
                        // The answer does not wait for the goodbye.
                        tokio::spawn(close_politely(stream, CLOSE_WITHIN));
                        Ok(())
                    }
                    Err(Unreachable(why)) => Err(why),
                }
            });
        }
        let (mut live, mut down) = (0, Vec::new());
        while let Some(probed) = probes.join_next().await {
            match probed {
                Ok(Ok(())) => live += 1,
                Ok(Err(why)) => down.push(why),
                Err(e) => down.push(format!("probe failed: {e}")),
            }
        }
        running.1 = Some(Round {
            finished: Instant::now(),
            live,
            down,
        });
    }
}

/// How a route's liveness is known.
#[derive(Debug, Clone)]
pub enum Source {
    /// The active health checks of its balancer.
    Checks(Arc<Balancer>),
    /// Probes made for readiness.
    Probe(Arc<Probe>),
}

/// A running route, as readiness sees it.
#[derive(Debug, Clone)]
pub struct Watched {
    /// The route's name.
    pub name: String,
    /// Its listen addresses.
    pub listen: Vec<ListenAddr>,
    /// Where its liveness comes from.
    pub source: Source,
}

impl Watched {
    /// The route's state, waiting for probes at most until `deadline`.
    pub async fn state(&self, deadline: Instant) -> State {
        match &self.source {
            Source::Checks(balancer) => {
                let down: Vec<String> = balancer
                    .backends()
                    .iter()
                    .filter(|b| !b.is_up())
                    .map(|b| format!("{}: ejected by health checks", b.target))
                    .collect();
                if down.len() < balancer.backends().len() {
                    State::Live
                } else {
                    State::Down(down)
                }
            }
            Source::Probe(probe) => match probe.result(deadline).await {
                Some(round) if round.live > 0 => State::Live,
                Some(round) => State::Down(round.down),
                None => State::Unknown,
            },
        }
    }
}

/// Whether a route can reach a live target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// At least one target is live.
    Live,
    /// None is; why, per target.
    Down(Vec<String>),
    /// No probe has finished yet (the first is still running).
    Unknown,
}

/// One route's part of a readiness answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteState {
    /// The route's name.
    pub name: String,
    /// Its listen addresses.
    pub listen: Vec<ListenAddr>,
    /// Whether it can reach a live target.
    pub state: State,
}

/// Everything `/readyz` answers from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// Shutdown has begun: the instance is draining.
    pub stopping: bool,
    /// Every accept loop is running.
    pub accepting: bool,
    /// Each route's state.
    pub routes: Vec<RouteState>,
}

impl Readiness {
    /// Whether the instance should receive traffic: not stopping, every
    /// accept loop running, and every route with a live target.
    pub fn is_ready(&self) -> bool {
        !self.stopping && self.accepting && self.routes.iter().all(|r| r.state == State::Live)
    }

    /// The answer's body: `ready`, or `not ready` and one line per reason,
    /// naming each route that has no live target.
    pub fn body(&self) -> String {
        if self.is_ready() {
            return "ready\n".into();
        }
        let mut out = String::from("not ready\n");
        if self.stopping {
            out.push_str("shutting down: draining connections\n");
        }
        if !self.accepting {
            out.push_str("not accepting connections on every route; see the log\n");
        }
        for route in &self.routes {
            let why = match &route.state {
                State::Live => continue,
                State::Down(reasons) => format!("no live target: {}", reasons.join("; ")),
                State::Unknown => {
                    "no live target known yet: the first probe is still running".into()
                }
            };
            let listen: Vec<String> = route.listen.iter().map(ToString::to_string).collect();
            let _ = writeln!(
                out,
                "route {} (listen {}): {}",
                route.name,
                listen.join(", "),
                why.replace(['\r', '\n'], " ")
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn route(name: &str, state: State) -> RouteState {
        RouteState {
            name: name.into(),
            listen: vec!["127.0.0.1:5432".parse().unwrap()],
            state,
        }
    }

    #[test]
    fn ready_only_when_every_route_is_live_and_nothing_stops() {
        let mut r = Readiness {
            stopping: false,
            accepting: true,
            routes: vec![route("a", State::Live), route("b", State::Live)],
        };
        assert!(r.is_ready());
        assert_eq!(r.body(), "ready\n");
        r.routes[1].state = State::Down(vec!["db:5432 does not resolve".into()]);
        assert!(!r.is_ready());
        assert_eq!(
            r.body(),
            "not ready\nroute b (listen 127.0.0.1:5432): no live target: db:5432 does not resolve\n"
        );
        r.routes[1].state = State::Unknown;
        assert!(!r.is_ready());
        assert!(r.body().contains("route b (listen 127.0.0.1:5432)"));
        assert!(!r.body().contains("route a"));
        r.routes[1].state = State::Live;
        r.stopping = true;
        assert!(!r.is_ready());
        assert!(r.body().contains("shutting down"));
        r.stopping = false;
        r.accepting = false;
        assert!(!r.is_ready());
        assert!(r.body().contains("not accepting"));
    }

    #[test]
    fn no_routes_is_ready_unless_stopping() {
        let r = Readiness {
            stopping: false,
            accepting: true,
            routes: Vec::new(),
        };
        assert!(r.is_ready());
        assert!(!Readiness {
            stopping: true,
            ..r
        }
        .is_ready());
    }

    /// A listener that counts the connections it accepts and closes them.
    async fn counting_target() -> (Target, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target: Target = listener.local_addr().unwrap().to_string().parse().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        (target, accepted, task)
    }

    #[tokio::test]
    async fn concurrent_requests_share_one_round_and_its_result_is_reused() {
        let (target, accepted, _task) = counting_target().await;
        let probe = Probe::new(&[target], Duration::from_secs(1));
        let mut asks = JoinSet::new();
        for _ in 0..50 {
            let probe = probe.clone();
            asks.spawn(async move {
                probe
                    .result(Instant::now() + Duration::from_secs(2))
                    .await
                    .map(|r| r.live)
            });
        }
        while let Some(live) = asks.join_next().await {
            assert_eq!(live.unwrap(), Some(1));
        }
        // Within FRESH, the result is reused without a connection.
        for _ in 0..20 {
            let round = probe.result(Instant::now() + Duration::from_secs(2)).await;
            assert_eq!(round.map(|r| r.live), Some(1));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_stale_result_starts_a_new_round() {
        let (target, accepted, task) = counting_target().await;
        let probe = Probe::new(std::slice::from_ref(&target), Duration::from_secs(1));
        let soon = || Instant::now() + Duration::from_secs(2);
        assert_eq!(probe.result(soon()).await.map(|r| r.live), Some(1));
        task.abort();
        let _ = task.await;
        tokio::time::sleep(FRESH + Duration::from_millis(50)).await;
        let round = probe.result(soon()).await.unwrap();
        assert_eq!(round.live, 0);
        assert_eq!(round.down.len(), 1);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_round_in_flight_is_joined_and_waited_for_only_until_the_deadline() {
        let (target, accepted, _task) = counting_target().await;
        let probe = Probe::new(&[target], Duration::from_secs(1));
        // A round in flight, as a target slow to accept makes it, after an
        // old result.
        let old = Round {
            finished: Instant::now()
                .checked_sub(Duration::from_secs(60))
                .unwrap_or_else(Instant::now),
            live: 0,
            down: vec!["old".into()],
        };
        probe.state.send_modify(|s| {
            s.running = true;
            s.last = Some(old.clone());
        });
        let started = Instant::now();
        let round = probe
            .result(Instant::now() + Duration::from_millis(200))
            .await
            .unwrap();
        assert_eq!(round.down, ["old"]);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_millis(700),
            "{waited:?}"
        );
        // When the round ends, those waiting get its result at once.
        let ends = probe.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            ends.state.send_modify(|s| {
                s.running = false;
                s.last = Some(Round {
                    finished: Instant::now(),
                    live: 1,
                    down: Vec::new(),
                });
            });
        });
        let started = Instant::now();
        let round = probe
            .result(Instant::now() + Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(round.live, 1);
        assert!(started.elapsed() < Duration::from_secs(2));
        // Nobody connected: the rounds here were made by hand.
        assert_eq!(accepted.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_name_that_does_not_resolve_is_down() {
        let probe = Probe::new(
            &["no-such-host.invalid:5432".parse().unwrap()],
            Duration::from_secs(3),
        );
        let round = probe
            .result(Instant::now() + Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(round.live, 0);
        assert!(round.down[0].contains("no-such-host.invalid"), "{round:?}");
    }
}
