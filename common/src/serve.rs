//! The accept loop every service shares.
//!
//! The connection cap belongs to its owner and may be shared by several
//! listeners (a tunnel route's addresses). A loop that finds the cap full
//! holds the one connection it just accepted and accepts no more until a
//! place frees, so a full server leaves new clients in the kernel's
//! backlog instead of accepting and dropping them. Accept errors (out of descriptors, say) back off and
//! retry instead of ending the server. Each connection runs in its own task
//! inside a span with its id and peer (debug level; info events carry both
//! as fields); the access list is checked right after
//! accept, then the per-source limits ([`crate::limits`]).
//!
//! A listener with `accept_proxy` sources reads the PROXY protocol header
//! those connections start with in the connection's own task (a slow
//! sender never holds up the accept loop), within the header timeout, and
//! checks the access list and the per-source limits against the client
//! the header names; what is not a header closes the connection with a
//! log line before the service sees a byte. A connection from any other
//! source that starts with a header is refused too (see
//! [`crate::proxy::sends_header`]). On shutdown the listener closes at
//! once, handlers are told to finish (`Accepted::draining`), and whatever
//! is still running when the grace
//! period ends is closed.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn, Instrument};

use crate::limits::{PerSource, Refusal, SourcePermit};
use crate::proxy::{Carried, HeaderError};
use crate::settings::{AccessRules, CidrList, ServeSettings};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A new connection id, unique in the process.
pub fn next_connection_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// What a handler knows about its connection.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// Process-wide connection id, also in the log span.
    pub id: u64,
    /// The client's address: the one its PROXY header named, when it came
    /// through a balancer in `accept_proxy`.
    pub peer: SocketAddr,
    /// The local address the client reached (the one the header named,
    /// when it came through a balancer).
    pub local: SocketAddr,
    /// The balancer a PROXY header came from (the connection's own peer),
    /// when the client came through one.
    pub via: Option<SocketAddr>,
    /// Cancelled when the server begins shutting down: finish soon.
    pub draining: CancellationToken,
    /// Cancelled when the grace period is over: the connection is dropped
    /// right after, so a handler that wants a last word says it now.
    pub closing: CancellationToken,
    /// The configured idle timeout.
    pub idle_timeout: Duration,
}

/// What a handler can serve: any byte stream (a TCP socket today; the same
/// handler serves a TLS stream once the accept loop wraps one).
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for S {}

/// A service behind the accept loop, for streams of type `S`. Services that
/// only speak their protocol implement it for every [`Stream`]; one that
/// needs the socket itself (the tunnel's zero-copy relay) for `TcpStream`.
pub trait Handler<S = TcpStream>: Send + Sync + 'static {
    /// Serves one connection; an error is logged in the connection's span
    /// (at debug level when it only says the client went away).
    fn handle(
        self: Arc<Self>,
        stream: S,
        conn: Accepted,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// Called for a client the access list refused, after the connection is
    /// dropped; `via` is the balancer whose PROXY header named the client,
    /// when it came through one. The default logs it.
    fn refused(&self, id: u64, peer: SocketAddr, via: Option<SocketAddr>) {
        info!(conn = id, %peer, via = via.map(tracing::field::display), "refused by access list");
    }

    /// Called for a connection closed for its PROXY header (malformed,
    /// incomplete, missing within the timeout, or sent by a source not in
    /// `accept_proxy`), after it is dropped; `peer` is the connection's
    /// own. The default logs it (at debug level when the client sent
    /// nothing and went, as probes do).
    fn header_refused(&self, id: u64, peer: SocketAddr, why: &HeaderError) {
        if why.is_silent() {
            debug!(conn = id, %peer, reason = %why, "closed before its PROXY header");
        } else {
            info!(conn = id, %peer, reason = %why, "refused: PROXY header");
        }
    }

    /// Called for a client over its source's per-source limits, after the
    /// connection is dropped. The default logs the refusals the limiter
    /// picks to log (`refused: per-source limit`, sparingly: see
    /// [`crate::limits`]).
    fn refused_per_source(
        &self,
        id: u64,
        peer: SocketAddr,
        via: Option<SocketAddr>,
        refusal: &Refusal,
    ) {
        refusal.log_line(id, peer, via);
    }
}

/// How the accept loop runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The connection cap; its owner (a service, or a tunnel route) keeps
    /// it, so several listeners and successive accept loops share one.
    pub cap: ConnectionCap,
    /// Who may connect.
    pub access: AccessRules,
    /// Handed to handlers in [`Accepted::idle_timeout`].
    pub idle_timeout: Duration,
    /// How long live connections may take to finish after shutdown begins.
    pub grace: Duration,
    /// Sources whose connections start with a PROXY protocol header (none:
    /// no header is read, or looked for).
    pub accept_proxy: CidrList,
    /// How long such a connection may take to send its header.
    pub header_timeout: Duration,
    /// Limits on each client address or prefix, when there are any; its
    /// owner keeps it, like the cap.
    pub per_source: Option<Arc<PerSource>>,
    /// Only these processes may connect (`allow_roles`, in a fabric).
    pub callers: Option<crate::fabric::Callers>,
}

impl From<&ServeSettings> for ServeOptions {
    fn from(s: &ServeSettings) -> Self {
        ServeOptions {
            cap: ConnectionCap::new(s.max_connections),
            access: s.access().into(),
            idle_timeout: s.idle_timeout.0,
            grace: s.shutdown_grace.0,
            accept_proxy: s.accept_proxy.clone(),
            header_timeout: crate::tls::HANDSHAKE_TIMEOUT,
            per_source: s.per_source.as_ref().and_then(|p| p.limiter()),
            callers: crate::fabric::Callers::beside(&s.allow_roles.0, s.topology.as_deref()),
        }
    }
}

/// Serves `listener` with `handler` until `shutdown` completes, then drains:
/// returns once every connection has finished or been closed at the end of
/// the grace period.
pub async fn serve<H: Handler<TcpStream>>(
    listener: TcpListener,
    options: ServeOptions,
    handler: Arc<H>,
    shutdown: impl Future<Output = ()>,
) {
    let connections = LiveConnections::new(options.grace);
    accept_until(&listener, &options, &handler, &connections, shutdown).await;
    drop(listener);
    connections.drain().await;
}

/// The live connections of one or more accept loops, so that they can be
/// drained together.
#[derive(Debug, Clone)]
pub struct LiveConnections {
    tracker: TaskTracker,
    draining: CancellationToken,
    closing: CancellationToken,
    grace: Duration,
    workers: Arc<Workers>,
}

/// Runtimes that connections are spread over, one thread each; none means
/// the runtime of the accept loop.
#[derive(Debug, Default)]
struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    next: std::sync::atomic::AtomicUsize,
}

impl LiveConnections {
    /// An empty set whose drain waits at most `grace`.
    pub fn new(grace: Duration) -> Self {
        LiveConnections {
            tracker: TaskTracker::new(),
            draining: CancellationToken::new(),
            closing: CancellationToken::new(),
            grace,
            workers: Arc::default(),
        }
    }

    /// Like [`LiveConnections::new`], with connections spread round-robin over
    /// `workers` (each a single-threaded runtime on its own thread). Every
    /// connection then lives on one thread for its whole life: no task
    /// moves between threads, and each thread waits on its own sockets.
    pub fn with_workers(grace: Duration, workers: Vec<tokio::runtime::Handle>) -> Self {
        let mut connections = LiveConnections::new(grace);
        connections.workers = Arc::new(Workers {
            handles: workers,
            next: Default::default(),
        });
        connections
    }

    /// The runtimes connections are spread over (none: the accept loop's).
    pub fn worker_handles(&self) -> &[tokio::runtime::Handle] {
        &self.workers.handles
    }

    /// The same set, with each connection served on the runtime of the
    /// loop that accepted it: for accept loops that run on the workers
    /// themselves.
    pub fn local(&self) -> LiveConnections {
        LiveConnections {
            workers: Arc::default(),
            ..self.clone()
        }
    }

    /// How many connections are live.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    /// Whether no connection is live.
    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }

    /// Tells every connection to finish, waits up to the grace period (or
    /// until a second stop signal, [`crate::signal::hurry`]), then closes
    /// the rest.
    pub async fn drain(&self) {
        self.tracker.close();
        self.draining.cancel();
        let live = self.tracker.len();
        if live > 0 {
            info!(connections = live, grace = ?self.grace, "draining connections");
        }
        let finished = tokio::select! {
            done = tokio::time::timeout(self.grace, self.tracker.wait()) => done.is_ok(),
            _ = crate::signal::hurry().cancelled() => false,
        };
        if !finished {
            warn!(
                connections = self.tracker.len(),
                grace = ?self.grace,
                "grace period over; closing the connections still open"
            );
            self.closing.cancel();
            self.tracker.wait().await;
        }
    }
}

/// Accepts on `listener` until `stop` completes, running each connection in
/// `connections`. The listener stays open for the caller (a reload can hand
/// it to a new loop).
pub async fn accept_until<H: Handler<TcpStream>>(
    listener: &TcpListener,
    options: &ServeOptions,
    handler: &Arc<H>,
    connections: &LiveConnections,
    stop: impl Future<Output = ()>,
) {
    let mut backoff = Duration::from_millis(5);
    let gate = ProxyGate::new(options);
    let nodelay_inherited = nodelay_inherited(listener);
    // A listener on one address gives every connection that address: no
    // system call per connection to ask (on a wildcard one, the kernel
    // knows which of the machine's addresses the client reached).
    let fixed_local = listener
        .local_addr()
        .ok()
        .filter(|a| !a.ip().is_unspecified());
    tokio::pin!(stop);
    loop {
        let (stream, accepted_from) = tokio::select! {
            biased;
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => {
                    backoff = Duration::from_millis(5);
                    pair
                }
                Err(e) if is_per_connection(&e) => {
                    debug!(error = %e, "accept failed for one connection");
                    continue;
                }
                Err(e) => {
                    error!(error = %e, retry_in = ?backoff, "accept failed; retrying");
                    tokio::select! {
                        _ = &mut stop => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        let id = next_connection_id();
        // An IPv4 client of a dual-stack listener arrives as `::ffff:a.b.c.d`;
        // everything after this point (access lists, logs, handlers) sees
        // the IPv4 address it is.
        let peer = SocketAddr::new(accepted_from.ip().to_canonical(), accepted_from.port());
        // A balancer's clients are checked once its header names them.
        let trusted = gate.as_ref().is_some_and(|g| g.from.contains(peer.ip()));
        if !trusted && !options.access.permits(peer.ip()) {
            drop(stream);
            handler.refused(id, peer, None);
            continue;
        }
        // A balancer's clients are counted once its header names them.
        let per_source = options.per_source.as_ref().filter(|_| !trusted);
        let source = match per_source.map(|l| l.admit(peer.ip())) {
            None => None,
            Some(Ok(permit)) => Some(permit),
            Some(Err(refusal)) => {
                drop(stream);
                handler.refused_per_source(id, peer, None, &refusal);
                continue;
            }
        };
        // A full cap holds this connection (and, since this loop accepts no
        // more meanwhile, everyone behind it waits in the kernel's backlog)
        // until a place frees. Taking the place after accept rather than
        // before keeps listeners that share a cap from parking places on
        // idle listeners while a busy one waits.
        let permit = match options.cap.try_acquire() {
            Some(permit) => permit,
            None => tokio::select! {
                biased;
                _ = &mut stop => return,
                permit = options.cap.acquire() => permit,
            },
        };
        let local = match fixed_local {
            Some(local) => local,
            None => stream.local_addr().unwrap_or(peer),
        };
        if !nodelay_inherited {
            let _ = stream.set_nodelay(true);
        }
        let conn = Accepted {
            id,
            peer,
            local,
            via: None,
            draining: connections.draining.clone(),
            closing: connections.closing.clone(),
            idle_timeout: options.idle_timeout,
        };
        // A debug-level span: at the default level an idle connection then
        // costs no span memory; events a handler logs at info name the
        // connection's id and peer themselves.
        let span = if trusted {
            // The client is known once the header is read.
            tracing::debug_span!("conn", id, peer = tracing::field::Empty, via = %peer)
        } else {
            tracing::debug_span!("conn", id, %peer)
        };
        span.in_scope(|| debug!("accepted"));
        let handler = handler.clone();
        let task = Task {
            permit,
            source,
            id,
            peer,
            span,
        };
        match &gate {
            None => launch(connections, stream, task, move |s| handler.handle(s, conn)),
            Some(gate) => {
                let gate = gate.clone();
                launch(connections, stream, task, move |s| {
                    gated(handler, s, conn, gate, trusted)
                })
            }
        }
    }
}

/// What the accept loop hands a connection's task besides its stream.
struct Task {
    permit: CapPermit,
    source: Option<SourcePermit>,
    id: u64,
    peer: SocketAddr,
    span: tracing::Span,
}

/// Runs the future `serve` makes of `stream` as a connection of
/// `connections`: on the accept loop's runtime, or moved to the next
/// worker's.
fn launch<F, Fut>(connections: &LiveConnections, stream: TcpStream, task: Task, serve: F)
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let Task {
        permit,
        source,
        id,
        peer,
        span,
    } = task;
    let closing = connections.closing.clone().cancelled_owned();
    let workers = &connections.workers.handles;
    if workers.is_empty() {
        let task = Connection {
            handler: serve(stream),
            closing,
            _permit: permit,
            _source: source,
            id,
            peer,
        };
        connections.tracker.spawn(task.instrument(span));
        return;
    }
    let worker = &workers[connections.workers.next.fetch_add(1, Ordering::Relaxed) % workers.len()];
    // The socket moves to the worker's own event loop.
    let Ok(stream) = stream.into_std() else {
        return;
    };
    let task = async move {
        let Ok(stream) = TcpStream::from_std(stream) else {
            return;
        };
        Connection {
            handler: serve(stream),
            closing,
            _permit: permit,
            _source: source,
            id,
            peer,
        }
        .await
    };
    connections.tracker.spawn_on(task.instrument(span), worker);
}

/// What a listener with `accept_proxy` sources needs in each connection's
/// task, shared by all of them.
#[derive(Debug)]
struct ProxyGate {
    callers: Option<crate::fabric::Callers>,
    from: CidrList,
    access: AccessRules,
    per_source: Option<Arc<PerSource>>,
    timeout: Duration,
}

impl ProxyGate {
    fn new(options: &ServeOptions) -> Option<Arc<ProxyGate>> {
        (!options.accept_proxy.0.is_empty() || options.callers.is_some()).then(|| {
            Arc::new(ProxyGate {
                callers: options.callers.clone(),
                from: options.accept_proxy.clone(),
                access: options.access.clone(),
                per_source: options.per_source.clone(),
                timeout: options.header_timeout,
            })
        })
    }
}

/// Serves a connection of a listener with `accept_proxy` sources: from a
/// `trusted` one, reads its header and checks the client it names; from
/// any other, refuses a header. Then the handler has it, or nothing does.
async fn gated<H: Handler<TcpStream>>(
    handler: Arc<H>,
    stream: TcpStream,
    mut conn: Accepted,
    gate: Arc<ProxyGate>,
    trusted: bool,
) -> anyhow::Result<()> {
    let hop = conn.peer;
    if let Some(callers) = gate.callers.clone() {
        // Before any header: the connection's own ends.
        let local = conn.local;
        let verdict = tokio::task::spawn_blocking(move || callers.admit(hop, local))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        if let Err(why) = verdict {
            info!(conn = conn.id, peer = %hop, reason = %why, "refused: not a role allowed to call");
            return Ok(());
        }
    }
    if trusted {
        let read = tokio::select! {
            biased;
            read = crate::proxy::read_header(&stream, gate.timeout) => read,
            _ = conn.draining.cancelled() => return Ok(()),
        };
        let client = match read {
            Ok(Carried::Tcp {
                source,
                destination,
            }) => {
                conn.peer = source;
                conn.local = destination;
                conn.via = Some(hop);
                source
            }
            // The balancer's own connection (a health check).
            Ok(Carried::Local) => hop,
            Err(why) => {
                drop(stream);
                handler.header_refused(conn.id, hop, &why);
                return Ok(());
            }
        };
        tracing::Span::current().record("peer", tracing::field::display(client));
        if !gate.access.permits(client.ip()) {
            drop(stream);
            handler.refused(conn.id, client, conn.via);
            return Ok(());
        }
        // Held until the connection ends.
        let _source = match gate.per_source.as_ref().map(|l| l.admit(client.ip())) {
            None => None,
            Some(Ok(permit)) => Some(permit),
            Some(Err(refusal)) => {
                drop(stream);
                handler.refused_per_source(conn.id, client, conn.via, &refusal);
                return Ok(());
            }
        };
        debug!(peer = %conn.peer, via = ?conn.via, "PROXY header read");
        return handler.handle(stream, conn).await;
    } else if !gate.from.0.is_empty() {
        let watched = tokio::select! {
            biased;
            seen = crate::proxy::sends_header(&stream, crate::proxy::UNTRUSTED_WATCH) => seen,
            _ = conn.draining.cancelled() => return Ok(()),
        };
        match watched {
            Ok(false) => {}
            Ok(true) => {
                drop(stream);
                handler.header_refused(conn.id, hop, &HeaderError::Untrusted);
                return Ok(());
            }
            // The client reset the connection before its first byte.
            Err(_) => return Ok(()),
        }
    }
    handler.handle(stream, conn).await
}

pin_project_lite::pin_project! {
    /// One connection's task: its handler, dropped (closing the socket) at
    /// the end of the grace period, and its places under the connection cap
    /// and its source's limits.
    /// A plain struct rather than an async block, so the handler's future
    /// is stored once: this is most of an idle connection's memory.
    struct Connection<F> {
        #[pin]
        handler: F,
        #[pin]
        closing: WaitForCancellationFutureOwned,
        _permit: CapPermit,
        _source: Option<SourcePermit>,
        id: u64,
        peer: SocketAddr,
    }
}

impl<F: Future<Output = anyhow::Result<()>>> Future for Connection<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        // The handler first: woken by `closing`, it may finish (and log).
        if let Poll::Ready(result) = this.handler.poll(cx) {
            match result {
                Ok(()) => debug!("closed"),
                Err(e) if client_went_away(&e) => {
                    debug!(error = %format!("{e:#}"), "the client went away")
                }
                Err(e) => {
                    info!(conn = *this.id, peer = %this.peer, error = %format!("{e:#}"), "connection ended with an error")
                }
            }
            return Poll::Ready(());
        }
        if this.closing.poll(cx).is_ready() {
            debug!("closed at the end of the grace period");
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// Whether a handler's error only says that the client left (a reset, a
/// closed socket, a port probe or health check that connected and went):
/// normal life for a server, not worth an info line.
pub fn client_went_away(e: &anyhow::Error) -> bool {
    use std::io::ErrorKind::*;
    e.chain()
        .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
        .any(|io| {
            matches!(
                io.kind(),
                ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof | NotConnected
            )
        })
}

/// A connection cap that its owner keeps across accept loops: every
/// listener of a tunnel route, and the loops that replace them on a reload,
/// draw from the same one, so a reload never hands out a fresh quota while
/// the old connections still run. [`ConnectionCap::resize`] changes the
/// limit in place; connections over a lowered limit finish undisturbed and
/// no new one is accepted until the count is under it.
#[derive(Debug, Clone)]
pub struct ConnectionCap(Arc<CapState>);

#[derive(Debug)]
struct CapState {
    limit: AtomicUsize,
    active: AtomicUsize,
    freed: Notify,
}

/// One connection's place under a [`ConnectionCap`], given back on drop.
#[derive(Debug)]
pub struct CapPermit(Arc<CapState>);

impl ConnectionCap {
    /// A cap of `limit` connections at once.
    pub fn new(limit: usize) -> Self {
        ConnectionCap(Arc::new(CapState {
            limit: AtomicUsize::new(limit),
            active: AtomicUsize::new(0),
            freed: Notify::new(),
        }))
    }

    /// Connections holding a place now.
    pub fn active(&self) -> usize {
        self.0.active.load(Ordering::Relaxed)
    }

    /// Sets a new limit; the connections already in keep their places.
    pub fn resize(&self, limit: usize) {
        self.0.limit.store(limit, Ordering::Relaxed);
        self.0.freed.notify_waiters();
    }

    /// A place, if one is free now.
    pub fn try_acquire(&self) -> Option<CapPermit> {
        let state = &self.0;
        let mut active = state.active.load(Ordering::Relaxed);
        loop {
            if active >= state.limit.load(Ordering::Relaxed) {
                return None;
            }
            match state.active.compare_exchange_weak(
                active,
                active + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(CapPermit(self.0.clone())),
                Err(now) => active = now,
            }
        }
    }

    /// Waits for a place.
    pub async fn acquire(&self) -> CapPermit {
        loop {
            // Registered before the check, so a place freed in between
            // still wakes this waiter.
            let freed = self.0.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(permit) = self.try_acquire() {
                return permit;
            }
            freed.await;
        }
    }
}

impl Drop for CapPermit {
    fn drop(&mut self) {
        let before = self.0.active.fetch_sub(1, Ordering::AcqRel);
        if before >= self.0.limit.load(Ordering::Relaxed) {
            // Only a full cap has waiters.
            self.0.freed.notify_waiters();
        }
    }
}

/// Whether the sockets `listener` accepts have `TCP_NODELAY` already: on
/// Linux they inherit it from the listener, which
/// [`crate::endpoint::bind_listener`] gives it before it listens (so every
/// connection has it, even one that came before the accept loop). That
/// saves a system call per connection.
fn nodelay_inherited(listener: &TcpListener) -> bool {
    cfg!(target_os = "linux")
        && socket2::SockRef::from(listener)
            .tcp_nodelay()
            .unwrap_or(false)
}

/// Errors that concern only the connection being accepted, not the listener.
fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tells each client whether its socket has TCP_NODELAY.
    struct Nodelay;

    impl Handler for Nodelay {
        async fn handle(self: Arc<Self>, stream: TcpStream, _: Accepted) -> anyhow::Result<()> {
            use tokio::io::AsyncWriteExt;
            let mut stream = stream;
            let on = stream.nodelay()?;
            stream.write_all(if on { b"on" } else { b"off" }).await?;
            Ok(())
        }
    }

    /// Set on the listener (inherited) or on each socket: every accepted
    /// connection has it.
    #[tokio::test]
    async fn accepted_connections_have_nodelay() {
        // Given TCP_NODELAY before it listens, or not.
        let tuned = crate::endpoint::bind_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
        assert!(nodelay_inherited(&tuned) || !cfg!(target_os = "linux"));
        assert!(!nodelay_inherited(&plain));
        for listener in [tuned, plain] {
            each_connection_has_nodelay(listener).await;
        }
    }

    async fn each_connection_has_nodelay(listener: TcpListener) {
        use tokio::io::AsyncReadExt;
        let addr = listener.local_addr().unwrap();
        // One waits in the backlog before the accept loop starts.
        let mut early = TcpStream::connect(addr).await.unwrap();
        let options = ServeOptions {
            cap: ConnectionCap::new(10),
            access: AccessRules(Vec::new()),
            idle_timeout: Duration::from_secs(10),
            grace: Duration::from_secs(1),
            per_source: None,
            callers: None,
            accept_proxy: Default::default(),
            header_timeout: Duration::from_secs(1),
        };
        let stop = CancellationToken::new();
        let serving = tokio::spawn(serve(listener, options, Arc::new(Nodelay), {
            let stop = stop.clone();
            async move { stop.cancelled().await }
        }));
        let mut answer = String::new();
        early.read_to_string(&mut answer).await.unwrap();
        assert_eq!(answer, "on");
        for _ in 0..2 {
            let mut client = TcpStream::connect(addr).await.unwrap();
            let mut answer = String::new();
            client.read_to_string(&mut answer).await.unwrap();
            assert_eq!(answer, "on");
        }
        stop.cancel();
        serving.await.unwrap();
    }

    #[tokio::test]
    async fn a_freed_place_wakes_a_waiter_of_a_shared_cap() {
        let cap = ConnectionCap::new(1);
        let first = cap.acquire().await;
        let (a, b) = (cap.clone(), cap.clone());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (ta, tb) = (tx.clone(), tx);
        tokio::spawn(async move { ta.send(a.acquire().await) });
        tokio::spawn(async move { tb.send(b.acquire().await) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(first);
        let winner = rx.recv().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(rx.try_recv().is_err(), "two places under a cap of one");
        drop(winner);
        let last = tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .expect("the second waiter was never woken")
            .unwrap();
        assert_eq!(cap.active(), 1);
        drop(last);
        assert_eq!(cap.active(), 0);
    }
}
