//! The TCP tunnel: forwards connections from listening endpoints to targets,
//! in the spirit of rinetd, on the shared role runtime in `common`.
//!
//! A [`Tunnel`] runs a set of [`Route`]s. [`Tunnel::apply`] replaces the set
//! while connections keep running: listeners whose address is unchanged are
//! handed to the new accept loops, new addresses are bound first, and if any
//! bind fails nothing changes. [`Tunnel::shutdown`] stops accepting and
//! drains within the grace period. [`Tunnel::readiness`] tells whether
//! every route can reach a live target (see [`ready`]). Routes with
//! `protocol: udp` forward datagrams instead, a session per client (see
//! [`udp`]); they have no readiness probe, since UDP has no connect.
//!
//! [`program`] is the program around it: the relay threads, the admin
//! endpoint, the pid file, reload on SIGHUP and the drain on stop.

pub mod access_log;
pub mod admin;
pub mod balance;
pub mod connect;
pub mod metrics;
pub mod program;
pub mod ready;
pub mod relay;
pub mod retry;
pub mod rinetd;
pub mod settings;
pub mod tls;
pub mod udp;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::endpoint::{bind_error, bind_listener};
use common::serve::{
    accept_until, Accepted, ConnectionCap, Handler, LiveConnections, ServeOptions,
};
use common::settings::{AccessRules, ListenAddr};
use common::tls::hello::Prefixed;
use common::tls::ServerTls;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use std::sync::atomic::{AtomicBool, Ordering};

use crate::access_log::{AccessLog, End, Entry};
use crate::balance::Balancer;
use crate::metrics::{Metrics, RouteStats};
use crate::ready::{Probe, Readiness, RouteState, Source, Watched};
pub use crate::settings::{overlaps, Protocol, Route, Settings, Target};

/// Serves one route's connections: terminate TLS if the route does,
/// connect to a target (over TLS if the route originates it), relay, log.
pub struct RouteHandler {
    route: Route,
    balancer: Arc<Balancer>,
    stats: Arc<RouteStats>,
    log: Arc<AccessLog>,
    tls: tls::RouteTls,
    /// Whether the route's listeners give their sockets its keepalive
    /// (see [`connect::keepalive_on_listener`]).
    keepalive_inherited: bool,
}

/// A client's connection as it reaches a route.
pub enum Client {
    /// The socket, nothing read yet.
    Plain(TcpStream),
    /// The socket and the TLS hello read from it to choose the route,
    /// to replay first.
    Replay(Prefixed<TcpStream>),
}

/// The client's side once its TLS (if any) is settled.
enum ClientSide {
    Plain(TcpStream),
    Replay(Prefixed<TcpStream>),
    Tls(Box<tokio_rustls::server::TlsStream<Prefixed<TcpStream>>>),
}

/// The target's side.
enum TargetSide {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl RouteHandler {
    fn targets(&self) -> String {
        let all: Vec<String> = self.route.targets.iter().map(ToString::to_string).collect();
        all.join(",")
    }

    fn unreachable(&self, conn: &Accepted, started: Instant, end: End, why: String) {
        self.log.record(&Entry {
            route: &self.route.name,
            client: conn.peer,
            via: conn.via,
            target: self.targets(),
            sent: 0,
            received: 0,
            duration: started.elapsed(),
            end,
            detail: Some(why),
        });
    }

    /// Records a client refused before it reached a target.
    fn refusal(
        &self,
        client: std::net::SocketAddr,
        via: Option<std::net::SocketAddr>,
        end: End,
        detail: Option<String>,
    ) {
        self.log.record(&Entry {
            route: &self.route.name,
            client,
            via,
            target: self.targets(),
            sent: 0,
            received: 0,
            duration: Duration::ZERO,
            end,
            detail,
        });
    }

    /// Serves `client` (accepted at `started`).
    pub async fn serve(
        self: Arc<Self>,
        client: Client,
        conn: Accepted,
        started: Instant,
    ) -> anyhow::Result<()> {
        let route = &self.route;
        let keepalive = route.keepalive.time();
        let mut client = match client {
            Client::Plain(s) => {
                if !self.keepalive_inherited {
                    connect::tune_accepted(&s, keepalive);
                }
                match &self.tls.server {
                    None => ClientSide::Plain(s),
                    Some(tls) => match Box::pin(self.terminate(
                        tls,
                        Prefixed::new(Vec::new(), s),
                        &conn,
                        started,
                    ))
                    .await
                    {
                        Some(c) => c,
                        None => return Ok(()),
                    },
                }
            }
            Client::Replay(s) => {
                connect::tune_accepted(s.get_ref(), keepalive);
                match &self.tls.server {
                    None => ClientSide::Replay(s),
                    Some(tls) => match Box::pin(self.terminate(tls, s, &conn, started)).await {
                        Some(c) => c,
                        None => return Ok(()),
                    },
                }
            }
        };
        // Boxed: the connect phase is large and short; an idle connection
        // should not carry its space.
        let since = tokio::time::Instant::now();
        let opened = Box::pin(self.open_target(&conn, route.connect_timeout.0, &[])).await;
        let (mut target, mut addr, mut backend) = match opened {
            Ok(opened) => opened,
            Err(failed) => {
                self.stats.unavailable.fetch_add(1, Ordering::Relaxed);
                if failed.backend.is_none() {
                    tracing::warn!(route = %route.name, error = %failed.why, "no target reachable");
                }
                self.unreachable(&conn, started, End::Unreachable, failed.why);
                return Ok(());
            }
        };
        // What moved before the relay took over, and the attempts that
        // failed before the target's first byte (boxed: a connection
        // carries it for its whole life).
        let mut early = None;
        if route.retry_before_first_byte {
            let answered = Box::pin(retry::until_answered(
                &self,
                &mut client,
                (target, addr, backend),
                since,
                &conn,
                started,
            ))
            .await;
            let Some(answered) = answered else {
                return Ok(());
            };
            (target, addr, backend) = answered.target;
            early = Some(Box::new(answered.early));
        }
        self.relay(client, target, addr, backend, early, &conn, started)
            .await
    }

    /// Relays between the client and its target until the connection
    /// ends, and records it; `early` is what moved before.
    #[allow(clippy::too_many_arguments)]
    async fn relay(
        &self,
        client: ClientSide,
        target: TargetSide,
        addr: std::net::SocketAddr,
        backend: balance::Active,
        early: Option<Box<retry::Early>>,
        conn: &Accepted,
        started: Instant,
    ) -> anyhow::Result<()> {
        let route = &self.route;
        let (idle, closing) = (route.idle_timeout.0, &conn.closing);
        let outcome = match (client, target) {
            (ClientSide::Plain(mut c), TargetSide::Plain(mut t)) => {
                relay::relay_tcp(&mut c, &mut t, idle, closing).await
            }
            (ClientSide::Replay(c), TargetSide::Plain(mut t)) => {
                // Passthrough: the hello goes first, then the kernel moves
                // the rest.
                let (hello, mut c) = c.into_parts();
                if let Err(e) = t.write_all(&hello).await {
                    relay::abort(&c);
                    self.unreachable(conn, started, End::Unreachable, format!("{addr}: {e}"));
                    return Ok(());
                }
                let mut outcome = relay::relay_tcp(&mut c, &mut t, idle, closing).await;
                outcome.sent += hello.len() as u64;
                outcome
            }
            (ClientSide::Plain(mut c), TargetSide::Tls(mut t)) => {
                relay::relay_over_tcp(&mut c, &mut *t, idle, closing).await
            }
            (ClientSide::Replay(mut c), TargetSide::Tls(mut t)) => {
                relay::relay_over_tcp(&mut c, &mut *t, idle, closing).await
            }
            (ClientSide::Tls(mut c), TargetSide::Plain(mut t)) => {
                relay::relay_over_tcp(&mut *c, &mut t, idle, closing).await
            }
            (ClientSide::Tls(mut c), TargetSide::Tls(mut t)) => {
                relay::relay_over_tcp(&mut *c, &mut *t, idle, closing).await
            }
        };
        let mut outcome = outcome;
        if let Some(early) = &early {
            outcome.sent += early.sent;
            outcome.received += early.received;
        }
        let stats = &backend.stats;
        stats.sent.fetch_add(outcome.sent, Ordering::Relaxed);
        stats
            .received
            .fetch_add(outcome.received, Ordering::Relaxed);
        self.log.record(&Entry {
            route: &route.name,
            client: conn.peer,
            via: conn.via,
            target: addr.to_string(),
            sent: outcome.sent,
            received: outcome.received,
            duration: started.elapsed(),
            end: End::Relayed(outcome.end),
            detail: match early {
                Some(early) => early.detail(outcome.error.map(|e| e.to_string())),
                None => outcome.error.map(|e| e.to_string()),
            },
        });
        Ok(())
    }

    /// One attempt at a target: connect to one the balancer picks (none
    /// of `tried`, each connect within `timeout`), then write what must
    /// reach the target before any byte of the client, then TLS when the
    /// route speaks it to its targets. A retry makes a new attempt, so
    /// whatever goes first goes again. Errors are counted and logged as
    /// warnings, not recorded in the access log.
    async fn open_target(
        &self,
        conn: &Accepted,
        timeout: Duration,
        tried: &[Arc<balance::Backend>],
    ) -> Result<(TargetSide, std::net::SocketAddr, balance::Active), retry::Failed> {
        let route = &self.route;
        let connected = tokio::select! {
            biased;
            c = self.balancer.connect_except(timeout, tried) => c,
            _ = conn.closing.cancelled() => Err(connect::Unreachable("shutdown while connecting".into())),
        };
        let balance::TargetConnection {
            stream,
            addr,
            backend,
        } = connected.map_err(|connect::Unreachable(why)| retry::Failed { why, backend: None })?;
        connect::tune(&stream, route.keepalive.time());
        let mut stream = stream;
        if let Some(version) = route.send_proxy {
            // Before any other byte, TLS included: the client as this
            // route saw it, and the address it reached.
            let header = common::proxy::header(version, conn.peer, conn.local);
            let written = tokio::select! {
                biased;
                w = tokio::time::timeout(timeout, stream.write_all(&header)) => match w {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("not taken within {timeout:?}")),
                },
                _ = conn.closing.cancelled() => Err("shutdown while connecting".into()),
            };
            if let Err(why) = written {
                backend
                    .stats
                    .connect_failures
                    .fetch_add(1, Ordering::Relaxed);
                let why = format!("{addr}: writing the PROXY header: {why}");
                tracing::warn!(route = %route.name, target = %addr, error = %why, "the target did not take the PROXY header");
                return Err(retry::Failed {
                    why,
                    backend: Some(backend.shared()),
                });
            }
        }
        let Some(client) = &self.tls.client else {
            return Ok((TargetSide::Plain(stream), addr, backend));
        };
        let connector = client.connector();
        let host = backend.target.host.clone();
        let handshake = tokio::select! {
            biased;
            t = tokio::time::timeout(timeout, connector.connect(stream, &host)) => match t {
                Ok(Ok(t)) => Ok(t),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no TLS handshake with {host} within {timeout:?}")),
            },
            _ = conn.closing.cancelled() => Err("shutdown while connecting".into()),
        };
        match handshake {
            Ok(t) => Ok((TargetSide::Tls(Box::new(t)), addr, backend)),
            Err(why) => {
                backend
                    .stats
                    .connect_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(route = %route.name, target = %addr, error = %why, "TLS to the target failed");
                Err(retry::Failed {
                    why,
                    backend: Some(backend.shared()),
                })
            }
        }
    }

    /// The server side of the client's handshake; a failure is logged
    /// (by [`common::tls::accept`], with the reason) and recorded, and the
    /// target never sees the client.
    async fn terminate(
        &self,
        tls: &ServerTls,
        stream: Prefixed<TcpStream>,
        conn: &Accepted,
        started: Instant,
    ) -> Option<ClientSide> {
        match common::tls::accept(tls, stream, conn.peer).await {
            Ok(s) => Some(ClientSide::Tls(Box::new(s))),
            // A probe that connected and went carried no byte: like any
            // empty connection, no access-log line.
            Err(common::tls::Failure::Closed) => None,
            Err(why) => {
                self.unreachable(conn, started, End::Handshake, why.as_str().to_string());
                None
            }
        }
    }
}

impl std::fmt::Debug for RouteHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteHandler")
            .field("route", &self.route.name)
            .finish_non_exhaustive()
    }
}

impl Handler for RouteHandler {
    async fn handle(self: Arc<Self>, client: TcpStream, conn: Accepted) -> anyhow::Result<()> {
        self.serve(Client::Plain(client), conn, Instant::now())
            .await
    }

    fn refused_per_source(
        &self,
        _id: u64,
        peer: std::net::SocketAddr,
        via: Option<std::net::SocketAddr>,
        refusal: &common::limits::Refusal,
    ) {
        // Counted by the limiter; logged as sparingly as it says.
        if refusal.log.is_some() {
            self.log.record(&Entry {
                route: &self.route.name,
                client: peer,
                via,
                target: self.targets(),
                sent: 0,
                received: 0,
                duration: Duration::ZERO,
                end: End::PerSource,
                detail: Some(refusal.to_string()),
            });
        }
    }

    fn refused(&self, _id: u64, peer: std::net::SocketAddr, via: Option<std::net::SocketAddr>) {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        self.refusal(peer, via, End::Refused, None);
    }

    fn header_refused(
        &self,
        _id: u64,
        peer: std::net::SocketAddr,
        why: &common::proxy::HeaderError,
    ) {
        if why.is_silent() {
            // A probe or health check that connected and went.
            tracing::debug!(target: "access", route = %self.route.name, client = %peer, "connection closed before its PROXY header");
            return;
        }
        self.stats.proxy_refused.fetch_add(1, Ordering::Relaxed);
        self.refusal(peer, None, End::ProxyHeader, Some(why.to_string()));
    }
}

/// A route that is running: its listeners and accept loops, and what
/// outlives a reload: its connection cap (one for all its listen
/// addresses, kept while old connections run), its balancer, kept when
/// its targets are unchanged so their health is not forgotten, and its
/// readiness probe, kept with its last result when the targets and the
/// connect timeout are unchanged.
struct Running {
    route: Route,
    balancer: Arc<Balancer>,
    probe: Arc<Probe>,
    cap: ConnectionCap,
    listeners: Vec<(ListenAddr, Arc<TcpListener>)>,
    stop: CancellationToken,
    loops: Vec<JoinHandle<()>>,
    handler: Arc<RouteHandler>,
    options: ServeOptions,
}

impl Running {
    /// Whether `route` can keep this route's balancer.
    fn same_targets(&self, route: &Route) -> bool {
        self.route.targets == route.targets
            && self.route.balance == route.balance
            && self.route.health == route.health
            && self.route.checks == route.checks
    }

    /// The route as readiness sees it: by its balancer's health when
    /// active checks run, else by probes.
    fn watched(&self) -> Watched {
        Watched {
            name: self.route.name.clone(),
            listen: self.route.listen.clone(),
            source: if self.route.checks {
                Source::Checks(self.balancer.clone())
            } else {
                Source::Probe(self.probe.clone())
            },
        }
    }
}

/// A set of routes being served, replaceable while connections run.
pub struct Tunnel {
    running: Mutex<Vec<Running>>,
    /// The running routes for readiness, replaced whole by each apply: a
    /// readiness answer never waits for a reload.
    watched: std::sync::Mutex<Arc<[Watched]>>,
    /// Set when shutdown begins.
    stopping: AtomicBool,
    connections: LiveConnections,
    log: Arc<AccessLog>,
    metrics: Arc<Metrics>,
    /// The routes with `protocol: udp`; locked after `running`.
    udp: Mutex<udp::UdpRoutes>,
    /// For each listen address, with several relay threads: the sockets
    /// that share its connections, one for each relay thread after the
    /// first (see [`Tunnel::loops`]). Kept across reloads like the
    /// listeners, so no connection waiting in one is lost.
    siblings: std::sync::Mutex<HashMap<ListenAddr, Vec<Arc<std::net::TcpListener>>>>,
}

/// Why a new set of routes could not be applied; the old set still runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyError(pub Vec<String>);

impl std::fmt::Display for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("; "))
    }
}

impl std::error::Error for ApplyError {}

impl Tunnel {
    /// A tunnel with no routes yet; `grace` bounds the drain on shutdown.
    pub fn new(grace: Duration, log: AccessLog) -> Self {
        Tunnel::with_connections(LiveConnections::new(grace), log)
    }

    /// A tunnel whose connections run on `workers` (see
    /// [`LiveConnections::with_workers`]).
    pub fn with_workers(
        grace: Duration,
        log: AccessLog,
        workers: Vec<tokio::runtime::Handle>,
    ) -> Self {
        Tunnel::with_connections(LiveConnections::with_workers(grace, workers), log)
    }

    fn with_connections(connections: LiveConnections, log: AccessLog) -> Self {
        Tunnel {
            running: Mutex::new(Vec::new()),
            watched: std::sync::Mutex::new(Arc::new([])),
            stopping: AtomicBool::new(false),
            connections,
            log: Arc::new(log),
            metrics: Arc::new(Metrics::default()),
            udp: Mutex::new(udp::UdpRoutes::default()),
            siblings: std::sync::Mutex::default(),
        }
    }

    /// The tunnel's counters, for the admin endpoint.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The balancer of each running route, by name.
    pub async fn balancers(&self) -> HashMap<String, Arc<Balancer>> {
        let running = self.running.lock().await;
        running
            .iter()
            .map(|r| (r.route.name.clone(), r.balancer.clone()))
            .collect()
    }

    /// How many relayed connections are open.
    pub fn connections(&self) -> usize {
        self.connections.len()
    }

    /// Makes `routes` the running set. Listeners in `bound` (by the address
    /// a route names) are used as they are, so tests can pass listeners bound
    /// to port 0; listeners of the running set are kept for the same
    /// address; anything else is bound now. On any bind failure the running
    /// set is left as it was.
    pub async fn apply(
        &self,
        routes: Vec<Route>,
        bound: HashMap<ListenAddr, TcpListener>,
    ) -> Result<(), ApplyError> {
        self.apply_sockets(routes, bound, HashMap::new()).await
    }

    /// [`Tunnel::apply`], with UDP sockets bound already too (`udp`, by
    /// the address a UDP route names). UDP routes keep the sockets of
    /// their addresses, and the sessions on them, across the change.
    pub async fn apply_sockets(
        &self,
        routes: Vec<Route>,
        mut bound: HashMap<ListenAddr, TcpListener>,
        mut bound_udp: HashMap<ListenAddr, tokio::net::UdpSocket>,
    ) -> Result<(), ApplyError> {
        let (udp_routes, routes): (Vec<Route>, Vec<Route>) = routes
            .into_iter()
            .partition(|r| r.protocol == Protocol::Udp);
        let mut running = self.running.lock().await;
        let mut held: HashMap<ListenAddr, Arc<TcpListener>> = running
            .iter()
            .flat_map(|r| r.listeners.iter().cloned())
            .collect();
        let all_held: Vec<ListenAddr> = held.keys().copied().collect();
        let mut planned = Vec::new();
        let mut errors = Vec::new();
        // Routes chosen by server name share their listeners.
        let mut taken: HashMap<ListenAddr, Arc<TcpListener>> = HashMap::new();
        for route in routes {
            // Read now, so a file that cannot be used leaves everything
            // as it was; a SIGHUP is how the files are re-read.
            let stats = self.metrics.route(&route.name);
            let tls = match tls::RouteTls::load(&route, &stats.handshakes) {
                Ok(tls) => tls,
                Err(e) => {
                    errors.push(format!("route {}: {e}", route.name));
                    tls::RouteTls::default()
                }
            };
            let mut listeners = Vec::new();
            for addr in &route.listen {
                let listener = if let Some(l) = taken.get(addr) {
                    l.clone()
                } else if let Some(l) = held.remove(addr) {
                    l
                } else if let Some(l) = bound.remove(addr) {
                    Arc::new(l)
                } else {
                    match bind_listener(*addr) {
                        Ok(l) => Arc::new(l),
                        Err(e) => {
                            errors.push(explain_bind(&route.name, *addr, &e, &all_held));
                            continue;
                        }
                    }
                };
                taken.insert(*addr, listener.clone());
                listeners.push((*addr, listener));
            }
            planned.push((route, listeners, tls));
        }
        let mut udp = self.udp.lock().await;
        let udp_plan = udp.plan(udp_routes, &mut bound_udp, &mut errors);
        if !errors.is_empty() {
            return Err(ApplyError(errors));
        }
        // Addresses no route listens on any more close their siblings too.
        self.siblings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|addr, _| taken.contains_key(addr));
        // Stop the old accept loops (their connections go on), keeping the
        // caps, balancers and readiness probes that carry over, then start
        // the new ones on the planned listeners.
        let mut carried: HashMap<String, Carried> = HashMap::new();
        let old_routes: Vec<Running> = running.drain(..).collect();
        for mut old in old_routes {
            old.stop.cancel();
            for task in old.loops.iter_mut() {
                let _ = task.await;
            }
            let successor = planned
                .iter()
                .find(|(r, _, _)| r.name == old.route.name)
                .map(|(r, _, _)| r);
            let keep = successor.map(|r| old.same_targets(r));
            let probe = successor
                .filter(|r| old.probe.probes(&r.targets, r.connect_timeout.0))
                .map(|_| old.probe.clone());
            let balancer = match keep {
                Some(true) => Some(old.balancer.clone()),
                // Gone or changed: its health checks stop now, not when its
                // last connection ends.
                _ => {
                    old.balancer.retire();
                    None
                }
            };
            if keep.is_some() {
                carried.insert(
                    old.route.name.clone(),
                    Carried {
                        cap: old.cap.clone(),
                        balancer,
                        probe,
                        per_source: old.options.per_source.clone(),
                    },
                );
            }
        }
        let mut configured: Vec<(String, Vec<String>)> = planned
            .iter()
            .map(|(r, _, _)| {
                (
                    r.name.clone(),
                    r.targets.iter().map(ToString::to_string).collect(),
                )
            })
            .collect();
        configured.extend(udp_plan.configured());
        self.metrics.retain(&configured);
        for (route, listeners, tls) in planned {
            let carried = match carried.remove(&route.name) {
                Some(carried) => {
                    carried.cap.resize(route.max_connections);
                    carried
                }
                None => Carried {
                    cap: ConnectionCap::new(route.max_connections),
                    balancer: None,
                    probe: None,
                    per_source: None,
                },
            };
            running.push(self.start(route, listeners, carried, tls));
        }
        self.start_shared(&mut running);
        udp.commit(udp_plan, &self.metrics, &self.log).await;
        *self.watched.lock().expect("readiness lock") =
            running.iter().map(Running::watched).collect();
        Ok(())
    }

    fn start(
        &self,
        route: Route,
        listeners: Vec<(ListenAddr, Arc<TcpListener>)>,
        carried: Carried,
        tls: tls::RouteTls,
    ) -> Running {
        let Carried {
            cap,
            balancer,
            probe,
            per_source,
        } = carried;
        let probe = probe.unwrap_or_else(|| Probe::new(&route.targets, route.connect_timeout.0));
        let stop = CancellationToken::new();
        let options = ServeOptions {
            cap: cap.clone(),
            access: AccessRules(route.access.clone()),
            idle_timeout: route.idle_timeout.0,
            grace: Duration::ZERO,
            accept_proxy: route.accept_proxy.clone(),
            header_timeout: route.connect_timeout.0,
            per_source: common::limits::PerSource::carry(
                per_source,
                &route.per_source,
                &self.metrics.route(&route.name).per_source,
            ),
            callers: route.callers.clone(),
        };
        let stats = self.metrics.route(&route.name);
        let balancer = balancer.unwrap_or_else(|| {
            Balancer::new(
                &route.name,
                &route.targets,
                route.balance,
                route.health,
                route.checks,
                &stats,
            )
        });
        if let Some(server) = &tls.server {
            tokio::spawn(
                server
                    .clone()
                    .watch(route.name.clone(), stop.clone().cancelled_owned()),
            );
        }
        if let Some(client) = &tls.client {
            tokio::spawn(
                client
                    .clone()
                    .watch(route.name.clone(), stop.clone().cancelled_owned()),
            );
        }
        // A route chosen by server name is served by its address's shared
        // loop (see `start_shared`).
        let own = if route.sni.is_empty() {
            &listeners[..]
        } else {
            &[]
        };
        let keepalive_inherited = !own.is_empty()
            && own.iter().all(|(_, listener)| {
                connect::keepalive_on_listener(listener, route.keepalive.time())
            });
        let handler = Arc::new(RouteHandler {
            route: route.clone(),
            balancer: balancer.clone(),
            stats,
            log: self.log.clone(),
            tls,
            keepalive_inherited,
        });
        let loops = own
            .iter()
            .flat_map(|(addr, listener)| {
                tracing::info!(route = %route.name, listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| addr.to_string()), targets = %handler.targets(), balance = %route.balance, "route ready");
                self.loops(*addr, listener, &options, &handler, &stop)
            })
            .collect();
        Running {
            route,
            balancer,
            probe,
            cap,
            listeners,
            stop,
            loops,
            handler,
            options,
        }
    }

    /// The accept loops of one listener. With one relay thread, or a
    /// listener that cannot share its address (one the service manager
    /// passed): one loop here, handing connections to the relay threads in
    /// turn. With several: one loop per relay thread, each on a socket of
    /// its own bound to the address, serving what it accepts on its own
    /// thread; the kernel spreads new connections over the sockets, and
    /// no connection crosses threads.
    fn loops(
        &self,
        addr: ListenAddr,
        listener: &Arc<TcpListener>,
        options: &ServeOptions,
        handler: &Arc<RouteHandler>,
        stop: &CancellationToken,
    ) -> Vec<JoinHandle<()>> {
        let workers = self.connections.worker_handles();
        let siblings = if workers.len() > 1 {
            let mut all = self
                .siblings
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match all.get(&addr) {
                Some(found) => Some(found.clone()),
                None => {
                    let made: std::io::Result<Vec<_>> = (1..workers.len())
                        .map(|_| common::endpoint::sibling(listener).map(Arc::new))
                        .collect();
                    match made {
                        Ok(made) => {
                            all.insert(addr, made.clone());
                            Some(made)
                        }
                        Err(e) => {
                            tracing::debug!(listen = %addr, error = %e, "one accept loop hands connections to the relay threads");
                            None
                        }
                    }
                }
            }
        } else {
            None
        };
        let connections = match siblings {
            Some(_) => self.connections.local(),
            None => self.connections.clone(),
        };
        let mut loops = Vec::new();
        {
            let (listener, options, handler, connections, stop) = (
                listener.clone(),
                options.clone(),
                handler.clone(),
                connections.clone(),
                stop.clone(),
            );
            loops.push(tokio::spawn(async move {
                accept_until(
                    &listener,
                    &options,
                    &handler,
                    &connections,
                    stop.cancelled(),
                )
                .await;
            }));
        }
        for (sibling, worker) in siblings
            .unwrap_or_default()
            .iter()
            .zip(workers.iter().skip(1))
        {
            // As on the first socket (see `start`): what its connections
            // inherit.
            connect::keepalive_on_listener(&**sibling, handler.route.keepalive.time());
            let Ok(socket) = sibling.try_clone() else {
                continue;
            };
            let (options, handler, connections, stop) = (
                options.clone(),
                handler.clone(),
                connections.clone(),
                stop.clone(),
            );
            loops.push(worker.spawn(async move {
                // Registered with this thread's own event loop.
                match TcpListener::from_std(socket) {
                    Ok(listener) => {
                        accept_until(
                            &listener,
                            &options,
                            &handler,
                            &connections,
                            stop.cancelled(),
                        )
                        .await
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "a relay thread cannot accept on its socket")
                    }
                }
            }));
        }
        loops
    }

    /// Starts one accept loop per address shared by server name, which
    /// hands each client to the route its hello names. The loop belongs to
    /// the first route on the address: it stops with it, and every route
    /// stops together on a reload.
    fn start_shared(&self, running: &mut [Running]) {
        let mut shared: Vec<(ListenAddr, Arc<TcpListener>, usize, Vec<tls::Named>)> = Vec::new();
        for (i, r) in running.iter().enumerate() {
            if r.route.sni.is_empty() {
                continue;
            }
            for (addr, listener) in &r.listeners {
                let named = tls::Named {
                    names: r.route.sni.clone(),
                    handler: r.handler.clone(),
                    options: r.options.clone(),
                };
                match shared.iter_mut().find(|(a, ..)| a == addr) {
                    Some((.., routes)) => routes.push(named),
                    None => shared.push((*addr, listener.clone(), i, vec![named])),
                }
            }
        }
        for (addr, listener, owner, routes) in shared {
            let listen = listener
                .local_addr()
                .map_or_else(|_| addr.to_string(), |a| a.to_string());
            let names: Vec<String> = routes
                .iter()
                .map(|r| format!("{}={}", r.handler.route.name, r.names.join("|")))
                .collect();
            tracing::info!(listen = %listen, routes = %names.join(" "), "routes chosen by TLS server name ready");
            let options = ServeOptions {
                // Each route's own cap applies once its name is known.
                cap: ConnectionCap::new(
                    routes
                        .iter()
                        .map(|r| r.handler.route.max_connections)
                        .fold(0usize, usize::saturating_add),
                ),
                access: AccessRules(Vec::new()),
                idle_timeout: tls::HELLO_TIMEOUT,
                grace: Duration::ZERO,
                // The header comes before the hello that picks the route:
                // every route's balancers are trusted on the address, and
                // each route's access list is checked against the client
                // the header named.
                accept_proxy: common::settings::List(
                    routes
                        .iter()
                        .flat_map(|r| r.handler.route.accept_proxy.0.iter().copied())
                        .collect(),
                ),
                header_timeout: routes
                    .iter()
                    .map(|r| r.handler.route.connect_timeout.0)
                    .max()
                    .unwrap_or(tls::HELLO_TIMEOUT),
                // Each route's own limits apply once its name is known.
                per_source: None,
                // Every route of a fabric's tunnel has the same callers.
                callers: routes.first().and_then(|r| r.handler.route.callers.clone()),
            };
            let router = Arc::new(tls::SniRouter {
                listen,
                routes,
                metrics: self.metrics.clone(),
                log: self.log.clone(),
            });
            let (connections, stop) = (self.connections.clone(), running[owner].stop.clone());
            running[owner].loops.push(tokio::spawn(async move {
                accept_until(&listener, &options, &router, &connections, stop.cancelled()).await;
            }));
        }
    }

    /// Whether every route's accept loops are running (false only if one
    /// ended, which the accept loop is built never to do). A reload in
    /// progress counts as accepting.
    pub fn accepting(&self) -> bool {
        self.running.try_lock().map_or(true, |running| {
            running
                .iter()
                .all(|r| r.loops.iter().all(|l| !l.is_finished()))
        }) && self.udp.try_lock().map_or(true, |udp| udp.receiving())
    }

    /// How many UDP sessions are open.
    pub async fn udp_sessions(&self) -> usize {
        self.udp.lock().await.sessions()
    }

    /// Whether every route can reach a live target, and the tunnel is
    /// accepting and not shutting down (see [`ready`] for how targets are
    /// known to be live). Probes are waited for at most until `deadline`.
    pub async fn readiness(&self, deadline: tokio::time::Instant) -> Readiness {
        let watched = self.watched.lock().expect("readiness lock").clone();
        // Every route at once: one slow target must not hold up the others'
        // probes.
        let mut states = tokio::task::JoinSet::new();
        for (i, route) in watched.iter().enumerate() {
            let route = route.clone();
            states.spawn(async move { (i, route.state(deadline).await) });
        }
        let mut found = vec![None; watched.len()];
        while let Some(done) = states.join_next().await {
            if let Ok((i, state)) = done {
                found[i] = Some(state);
            }
        }
        Readiness {
            stopping: self.stopping.load(Ordering::Relaxed),
            accepting: self.accepting(),
            routes: watched
                .iter()
                .zip(found)
                .map(|(route, state)| RouteState {
                    name: route.name.clone(),
                    listen: route.listen.clone(),
                    state: state.unwrap_or(ready::State::Unknown),
                })
                .collect(),
        }
    }

    /// Stops accepting on every route, lets connections finish within the
    /// grace period, then closes the rest. Readiness says "not ready" from
    /// the start.
    pub async fn shutdown(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        let mut running = self.running.lock().await;
        for old in running.drain(..) {
            old.stop.cancel();
            old.balancer.retire();
            for task in old.loops {
                let _ = task.await;
            }
        }
        drop(running);
        self.siblings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
        self.udp.lock().await.shutdown().await;
        self.connections.drain().await;
    }
}

/// What a route keeps across a reload; `None` makes a new one.
struct Carried {
    cap: ConnectionCap,
    balancer: Option<Arc<Balancer>>,
    probe: Option<Arc<Probe>>,
    /// Its per-source limiter, kept (with the counts of open connections)
    /// unless the limits now group sources differently.
    per_source: Option<Arc<common::limits::PerSource>>,
}

/// A route's listen address that cannot be bound, in words: an overlap
/// with one of the tunnel's own listeners in `held` is named as such.
pub(crate) fn explain_bind(
    route: &str,
    addr: ListenAddr,
    e: &std::io::Error,
    held: &[ListenAddr],
) -> String {
    if e.kind() == std::io::ErrorKind::AddrInUse {
        if let Some(own) = held.iter().find(|h| overlaps(**h, addr)) {
            return format!(
                "route {route}: {addr} overlaps the tunnel's own listener {own}, which is still open (a wildcard address takes the port on every address); a reload cannot move between them: restart the tunnel, or use another port"
            );
        }
    }
    bind_error(
        &format!("route {route}"),
        addr,
        e,
        "pick another listen address",
    )
}
