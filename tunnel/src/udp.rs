//! UDP forwarding, for routes with `protocol: udp` (and rinetd's `/udp`
//! rules).
//!
//! Each client (a source address and port) is a session of its own: its
//! first datagram picks and resolves a target and opens a UDP socket
//! connected to it, so the target sees one peer per client and the kernel
//! lets only the target's replies in. Replies go back to the client from
//! the route's listening socket, the address the client wrote to. A
//! session ends after its route's `idle_timeout` without a datagram either
//! way, when the target refuses (an ICMP port unreachable), when a reload
//! gives up its listen address, and at shutdown (UDP has no end of its
//! own to wait for); every end is one access-log line with the datagrams
//! and bytes each way, the duration and why.
//!
//! Datagrams are forwarded one for one, never merged or split: each is
//! received into a buffer of 64 KiB, larger than any UDP payload (65,507
//! bytes over IPv4, 65,527 over IPv6), and one that fills it, which may
//! have been cut, is dropped rather than forwarded in part.
//!
//! The route's access lists are checked for every datagram; its
//! `max_connections` caps its sessions, checked when a datagram would
//! start one (see [`UdpRoute::admit`], where per-source limits belong
//! too). Counters go to the route's [`UdpStats`](crate::metrics::UdpStats)
//! as datagrams go, and to its targets' counters as sessions end.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::serve::{CapPermit, ConnectionCap};
use common::settings::{AccessRules, ListenAddr};
use socket2::{Domain, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::AccessLog;
use crate::metrics::{Dropped, Metrics, RouteStats, TargetStats};
use crate::settings::{Policy, Route, Target};

/// The receive buffer: one byte more than the largest UDP payload, so a
/// datagram that fills it is one that was cut.
pub const MAX_DATAGRAM: usize = 64 * 1024;

/// Datagrams a session holds while it resolves its target, and their
/// bytes (one datagram of any size is always held); more are dropped (and
/// counted), so memory stays bounded by the session cap.
const STARTING_BACKLOG: usize = 32;
const STARTING_BYTES: usize = 64 * 1024;

/// Datagrams from a target relayed per wake-up, so one busy session does
/// not hold its thread.
const REPLIES_PER_WAKE: usize = 64;

/// The receive buffer asked for a route's socket, which takes the
/// datagrams of every client: room for a burst while the tunnel is busy
/// elsewhere (the system caps it at `net.core.rmem_max`).
const SOCKET_RECEIVE_BUFFER: usize = 4 << 20;

/// How long a reload or shutdown waits for the sessions it ends to log.
const END_WAIT: Duration = Duration::from_secs(5);

/// Binds a route's UDP socket at `addr`; `[::]` takes IPv4 clients too.
/// No address reuse: two UDP sockets on one port would share its
/// datagrams. Under socket activation, a UDP socket the service manager
/// passed for `addr` (`ListenDatagram=`) is used instead.
pub fn bind(addr: ListenAddr) -> io::Result<UdpSocket> {
    if let Some(passed) = common::systemd::activation::udp_socket(addr.0) {
        return UdpSocket::from_std(passed?);
    }
    let addr = addr.0;
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    let _ = socket.set_recv_buffer_size(SOCKET_RECEIVE_BUFFER);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// A datagram as [`receive`] took it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// The datagram is the first `len` bytes of the buffer.
    Whole {
        /// Its length.
        len: usize,
        /// Its source.
        from: SocketAddr,
    },
    /// It filled the buffer, so it may have been longer: not to be
    /// forwarded.
    Truncated {
        /// Its source.
        from: SocketAddr,
    },
}

/// Receives one datagram into `buf`, telling a whole one from one that
/// filled the buffer (give a buffer one byte longer than the longest
/// datagram to take).
pub async fn receive(socket: &UdpSocket, buf: &mut [u8]) -> io::Result<Received> {
    let (len, from) = socket.recv_from(buf).await?;
    Ok(if len >= buf.len() {
        Received::Truncated { from }
    } else {
        Received::Whole { len, from }
    })
}

/// How a session ended, or why a datagram started none, in the access
/// log's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// No datagram either way for the route's idle timeout.
    IdleTimeout,
    /// The target answered with an ICMP port unreachable.
    TargetRefused,
    /// Receiving from the target failed otherwise.
    TargetError,
    /// No target could be resolved or reached.
    Unreachable,
    /// A reload gave up the session's listen address.
    Reload,
    /// The tunnel stopped.
    Shutdown,
    /// The source is refused by the route's access lists.
    Refused,
    /// The route has its most sessions.
    SessionLimit,
}

impl End {
    /// The words of the access log.
    pub fn as_str(self) -> &'static str {
        match self {
            End::IdleTimeout => "idle timeout",
            End::TargetRefused => "refused by target",
            End::TargetError => "target error",
            End::Unreachable => "target unreachable",
            End::Reload => "closed at reload",
            End::Shutdown => "closed at shutdown",
            End::Refused => "refused by access list",
            End::SessionLimit => "refused: session limit",
        }
    }
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One session (or one refusal), as the access log records it: the
/// fields of a TCP connection's line, then the protocol and the datagrams
/// each way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionLine<'a> {
    /// The route's name.
    pub route: &'a str,
    /// The client's address.
    pub client: SocketAddr,
    /// The target's address, or the targets as configured when none was
    /// reached.
    pub target: String,
    /// Bytes from the client to the target.
    pub sent: u64,
    /// Bytes from the target to the client.
    pub received: u64,
    /// Datagrams from the client to the target.
    pub datagrams_sent: u64,
    /// Datagrams from the target to the client.
    pub datagrams_received: u64,
    /// From the first datagram to the end.
    pub duration: Duration,
    /// How it ended.
    pub end: End,
    /// More about it.
    pub detail: Option<String>,
}

impl SessionLine<'_> {
    /// The line, without the time stamp.
    pub fn line(&self) -> String {
        let mut line = format!(
            "route={} client={} target={} sent={} received={} duration={:.3}s end=\"{}\" protocol=udp datagrams_sent={} datagrams_received={}",
            self.route,
            self.client,
            self.target,
            self.sent,
            self.received,
            self.duration.as_secs_f64(),
            self.end,
            self.datagrams_sent,
            self.datagrams_received,
        );
        if let Some(detail) = &self.detail {
            line.push_str(&format!(" detail=\"{}\"", detail.replace('"', "'")));
        }
        line
    }

    /// Writes the line to the log (target `access`) and to `log`'s file.
    fn record(&self, log: &AccessLog) {
        tracing::info!(
            target: "access",
            route = self.route,
            client = %self.client,
            target_addr = %self.target,
            sent = self.sent,
            received = self.received,
            duration_ms = self.duration.as_millis() as u64,
            end = self.end.as_str(),
            protocol = "udp",
            datagrams_sent = self.datagrams_sent,
            datagrams_received = self.datagrams_received,
            detail = self.detail.as_deref(),
            "session"
        );
        log.append(&self.line());
    }
}

/// At most one log line a second; what it held back is counted for the
/// next one. A flood of refused datagrams must not flood the log.
#[derive(Debug, Default)]
struct Throttle(Mutex<(Option<Instant>, u64)>);

impl Throttle {
    /// `Some(held back since the last line)` when a line may be written.
    fn pass(&self) -> Option<u64> {
        let mut state = self.0.lock().expect("throttle lock");
        let (last, held) = &mut *state;
        let now = Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < Duration::from_secs(1)) {
            *held += 1;
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(held))
    }
}

/// A UDP route as its sessions see it: its settings, access lists,
/// session cap (kept across reloads, like a TCP route's), counters and
/// how it picks targets.
pub struct UdpRoute {
    route: Route,
    access: AccessRules,
    cap: ConnectionCap,
    stats: Arc<RouteStats>,
    log: Arc<AccessLog>,
    /// The round-robin position.
    next: AtomicUsize,
    refusals: Throttle,
    full: Throttle,
}

/// What lets a new session in: its place under the route's cap (and,
/// with per-source limits, its source's place), given back when the
/// session ends.
pub struct Admission {
    _cap: CapPermit,
}

impl UdpRoute {
    fn targets(&self) -> String {
        let all: Vec<String> = self.route.targets.iter().map(ToString::to_string).collect();
        all.join(",")
    }

    /// Whether a datagram from `client` (canonical) may start a session:
    /// the route's session cap. Per-source limits (at most N sessions and
    /// R new ones a second from one address or prefix) take their place
    /// here too, refusing with their own [`End`], so that they apply per
    /// new session as they apply per new TCP connection.
    pub fn admit(&self, _client: SocketAddr) -> Result<Admission, End> {
        let cap = self.cap.try_acquire().ok_or(End::SessionLimit)?;
        Ok(Admission { _cap: cap })
    }

    /// Counts a datagram from `client` that no session takes, and writes
    /// a line for it at most once a second.
    fn refuse(&self, client: SocketAddr, end: End, len: usize) {
        let (why, throttle) = match end {
            End::Refused => (Dropped::Access, &self.refusals),
            _ => (Dropped::SessionLimit, &self.full),
        };
        self.stats.udp.dropped(why);
        let Some(held) = throttle.pass() else { return };
        if end == End::SessionLimit {
            tracing::warn!(route = %self.route.name, limit = self.route.max_connections, "UDP session limit reached; datagrams from new clients are dropped (max_connections)");
        }
        SessionLine {
            route: &self.route.name,
            client,
            target: self.targets(),
            sent: len as u64,
            received: 0,
            datagrams_sent: 0,
            datagrams_received: 0,
            duration: Duration::ZERO,
            end,
            detail: (held > 0)
                .then(|| format!("{held} more datagrams refused since the last line")),
        }
        .record(&self.log);
    }

    /// The targets in the order a new session tries them.
    fn order(&self) -> Vec<usize> {
        let n = self.route.targets.len();
        match self.route.balance {
            Policy::FirstAvailable => (0..n).collect(),
            Policy::RoundRobin => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..n).map(|i| (start + i) % n).collect()
            }
            Policy::LeastConnections => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                let mut order: Vec<usize> = (0..n).map(|i| (start + i) % n).collect();
                order.sort_by_key(|&i| {
                    self.stats
                        .target(&self.route.targets[i].to_string())
                        .active
                        .load(Ordering::Relaxed)
                });
                order
            }
        }
    }

    /// A socket connected to a target at once, when every target is an IP
    /// address (no name to resolve): a new session is ready with its
    /// first datagram, however many follow it at once. `None` when a
    /// name must be resolved (see [`Self::open`]).
    fn open_now(&self) -> Option<Result<Opened, String>> {
        let ips: Vec<IpAddr> = self
            .route
            .targets
            .iter()
            .map(|t| t.host.parse().ok())
            .collect::<Option<_>>()?;
        let mut failures = Vec::new();
        for i in self.order() {
            let target = &self.route.targets[i];
            let addr = SocketAddr::new(ips[i], target.port);
            let stats = self.stats.target(&target.to_string());
            match connect_now(addr) {
                Ok(socket) => return Some(Ok((socket, addr, stats))),
                Err(e) => {
                    stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                    failures.push(format!("{target}: {e}"));
                }
            }
        }
        Some(Err(failures.join("; ")))
    }

    /// A socket connected to a target: each in turn (see [`Self::order`]),
    /// resolved now, the first address of its name.
    async fn open(&self) -> Result<Opened, String> {
        let mut failures = Vec::new();
        for i in self.order() {
            let target = &self.route.targets[i];
            let stats = self.stats.target(&target.to_string());
            match connect(target).await {
                Ok((socket, addr)) => return Ok((socket, addr, stats)),
                Err(e) => {
                    stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                    failures.push(format!("{target}: {e}"));
                }
            }
        }
        Err(failures.join("; "))
    }
}

/// A new session's socket, connected to its target: the socket, the
/// target's address and its counters.
type Opened = (UdpSocket, SocketAddr, Arc<TargetStats>);

/// A UDP socket connected to `addr`, without waiting: binding and
/// connecting a UDP socket only set addresses in the kernel.
fn connect_now(addr: SocketAddr) -> io::Result<UdpSocket> {
    let local: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(local)?;
    socket.connect(addr)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

/// A UDP socket connected to `target`, resolved now.
async fn connect(target: &Target) -> io::Result<(UdpSocket, SocketAddr)> {
    let addr = match target.host.parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, target.port),
        Err(_) => tokio::net::lookup_host((target.host.as_str(), target.port))
            .await?
            .next()
            .ok_or_else(|| io::Error::other("the name has no address"))?,
    };
    Ok((connect_now(addr)?, addr))
}

/// Datagrams and their bytes.
#[derive(Debug, Default)]
struct Count {
    datagrams: AtomicU64,
    bytes: AtomicU64,
}

impl Count {
    fn add(&self, len: usize) {
        self.datagrams.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(len as u64, Ordering::Relaxed);
    }

    fn get(&self) -> (u64, u64) {
        (
            self.datagrams.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }
}

/// Where a session is.
enum State {
    /// Resolving its target: the datagrams that came meanwhile, and their
    /// bytes.
    Starting(VecDeque<Vec<u8>>, usize),
    /// Connected: datagrams go straight to the target.
    Ready,
    /// Over: a datagram from its client starts a new one.
    Ended,
}

/// One client's session.
struct Session {
    /// The client's address as the listening socket gives it (replies go
    /// there).
    client: SocketAddr,
    /// The same, canonical (an IPv4-mapped address as IPv4), for logs.
    peer: SocketAddr,
    route: Arc<UdpRoute>,
    state: Mutex<State>,
    socket: OnceLock<UdpSocket>,
    target: OnceLock<(SocketAddr, Arc<TargetStats>)>,
    /// Why no target could be opened at once (see [`UdpRoute::open_now`]).
    failed: OnceLock<String>,
    started: Instant,
    /// When the last datagram went either way, in milliseconds after
    /// `started`.
    last: AtomicU64,
    sent: Count,
    received: Count,
    _admission: Admission,
}

impl Session {
    /// Takes the socket to its target: from now on datagrams go straight
    /// there.
    fn connected(&self, (socket, addr, stats): Opened) -> &UdpSocket {
        stats.active.fetch_add(1, Ordering::Relaxed);
        stats.total.fetch_add(1, Ordering::Relaxed);
        let _ = self.target.set((addr, stats));
        self.socket.get_or_init(|| socket)
    }

    fn touch(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.last.store(now, Ordering::Relaxed);
    }

    fn ended(&self) -> bool {
        matches!(*self.state.lock().expect("session lock"), State::Ended)
    }

    /// Counts a datagram from the client forwarded to the target.
    fn count_sent(&self, len: usize) {
        self.sent.add(len);
        let udp = &self.route.stats.udp;
        udp.datagrams_sent.fetch_add(1, Ordering::Relaxed);
        udp.bytes_sent.fetch_add(len as u64, Ordering::Relaxed);
    }

    /// Counts a datagram from the target forwarded to the client.
    fn count_received(&self, len: usize) {
        self.received.add(len);
        let udp = &self.route.stats.udp;
        udp.datagrams_received.fetch_add(1, Ordering::Relaxed);
        udp.bytes_received.fetch_add(len as u64, Ordering::Relaxed);
    }

    /// Sends a datagram from the client to the target, or holds it while
    /// the session starts.
    async fn forward(&self, data: &[u8]) {
        {
            let mut state = self.state.lock().expect("session lock");
            match &mut *state {
                State::Ready => {}
                State::Starting(queue, bytes)
                    if queue.is_empty()
                        || (queue.len() < STARTING_BACKLOG
                            && *bytes + data.len() <= STARTING_BYTES) =>
                {
                    queue.push_back(data.to_vec());
                    *bytes += data.len();
                    return;
                }
                State::Starting(..) => {
                    self.route.stats.udp.dropped(Dropped::Backlog);
                    return;
                }
                State::Ended => {
                    self.route.stats.udp.dropped(Dropped::NoTarget);
                    return;
                }
            }
        }
        let Some(socket) = self.socket.get() else {
            return;
        };
        // Awaited in the receive loop: a UDP socket is writable unless the
        // system is out of buffers, when datagrams are being lost anyway.
        match socket.send(data).await {
            Ok(_) => self.count_sent(data.len()),
            Err(e) => {
                self.route.stats.udp.dropped(Dropped::SendFailed);
                tracing::debug!(route = %self.route.route.name, client = %self.peer, error = %e, "a datagram to the target was not sent");
            }
        }
    }

    /// Runs the session until it ends, and says how.
    async fn serve(&self, reply: &UdpSocket) -> (End, Option<String>) {
        if let Some(why) = self.failed.get() {
            return (End::Unreachable, Some(why.clone()));
        }
        let route = &self.route.route;
        let socket = match self.socket.get() {
            Some(socket) => socket,
            None => match self.start().await {
                Ok(socket) => socket,
                Err(why) => return (End::Unreachable, Some(why)),
            },
        };
        let idle = route.idle_timeout.0;
        loop {
            let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
            let deadline = tokio::time::Instant::from_std(self.started + last + idle);
            tokio::select! {
                // An ICMP error (the target's port unreachable) makes the
                // socket report an error, not readable.
                ready = socket.ready(Interest::READABLE | Interest::ERROR) => {
                    let ready = match ready {
                        Ok(ready) => ready,
                        Err(e) => return (End::TargetError, Some(e.to_string())),
                    };
                    if ready.is_error() {
                        match socket.take_error() {
                            Ok(Some(e)) | Err(e) => return (ended_by(&e), Some(e.to_string())),
                            // Gone already: forget the readiness, or it
                            // would wake this loop again at once.
                            Ok(None) => {
                                let _ = socket.try_io(Interest::ERROR, || {
                                    Err::<(), _>(io::ErrorKind::WouldBlock.into())
                                });
                            }
                        }
                    }
                    if ready.is_readable() {
                        if let Some(end) = self.relay_replies(socket, reply).await {
                            return end;
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
                    if self.started.elapsed() >= last + idle {
                        return (End::IdleTimeout, None);
                    }
                }
            }
        }
    }

    /// Resolves and opens the target (within the connect timeout), then
    /// sends the datagrams held meanwhile, in order; those that come while
    /// it does join the queue, and once it is empty the session is ready.
    async fn start(&self) -> Result<&UdpSocket, String> {
        let wait = self.route.route.connect_timeout.0;
        let socket = match tokio::time::timeout(wait, self.route.open()).await {
            Ok(Ok(opened)) => self.connected(opened),
            Ok(Err(why)) => return Err(why),
            Err(_) => return Err(format!("no target resolved within {wait:?}")),
        };
        loop {
            let next = {
                let mut state = self.state.lock().expect("session lock");
                match &mut *state {
                    State::Starting(queue, bytes) => {
                        let next = queue.pop_front();
                        match &next {
                            Some(datagram) => *bytes -= datagram.len(),
                            None => *state = State::Ready,
                        }
                        next
                    }
                    _ => None,
                }
            };
            let Some(datagram) = next else {
                return Ok(socket);
            };
            match socket.send(&datagram).await {
                Ok(_) => self.count_sent(datagram.len()),
                Err(_) => self.route.stats.udp.dropped(Dropped::SendFailed),
            }
        }
    }

    /// Relays the datagrams the target has sent to the client, through
    /// a buffer of the thread's own (a session holds none while it waits).
    async fn relay_replies(
        &self,
        socket: &UdpSocket,
        reply: &UdpSocket,
    ) -> Option<(End, Option<String>)> {
        for _ in 0..REPLIES_PER_WAKE {
            let step = BUFFER.with(|buf| {
                let mut buf = buf.borrow_mut();
                match socket.try_recv(&mut buf) {
                    Ok(len) if len >= buf.len() => Step::Truncated,
                    Ok(len) => match reply.try_send_to(&buf[..len], self.client) {
                        Ok(_) => Step::Sent(len),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            Step::Later(buf[..len].to_vec())
                        }
                        Err(e) => Step::NotSent(e),
                    },
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Step::Drained,
                    Err(e) => Step::Failed(ended_by(&e), e),
                }
            });
            match step {
                Step::Drained => return None,
                Step::Sent(len) => {
                    self.touch();
                    self.count_received(len);
                }
                Step::Later(datagram) => {
                    self.touch();
                    match reply.send_to(&datagram, self.client).await {
                        Ok(_) => self.count_received(datagram.len()),
                        Err(_) => self.route.stats.udp.dropped(Dropped::SendFailed),
                    }
                }
                Step::NotSent(e) => {
                    self.route.stats.udp.dropped(Dropped::SendFailed);
                    tracing::debug!(route = %self.route.route.name, client = %self.peer, error = %e, "a reply to the client was not sent");
                }
                Step::Truncated => {
                    self.route.stats.udp.dropped(Dropped::Truncated);
                    tracing::debug!(route = %self.route.route.name, client = %self.peer, "a datagram from the target filled the buffer and was dropped");
                }
                Step::Failed(end, e) => return Some((end, Some(e.to_string()))),
            }
        }
        None
    }

    /// Ends the session: out of its listener's table, counters to its
    /// target's, one access-log line.
    fn finish(self: &Arc<Self>, listener: &Listener, end: End, detail: Option<String>) {
        let held =
            match std::mem::replace(&mut *self.state.lock().expect("session lock"), State::Ended) {
                State::Starting(queue, _) => queue.len(),
                _ => 0,
            };
        for _ in 0..held {
            self.route.stats.udp.dropped(Dropped::NoTarget);
        }
        {
            let mut sessions = listener.sessions.lock().expect("sessions lock");
            if sessions
                .get(&self.client)
                .is_some_and(|s| Arc::ptr_eq(s, self))
            {
                sessions.remove(&self.client);
            }
        }
        self.route
            .stats
            .udp
            .sessions_active
            .fetch_sub(1, Ordering::Relaxed);
        let (datagrams_sent, sent) = self.sent.get();
        let (datagrams_received, received) = self.received.get();
        let target = match self.target.get() {
            Some((addr, stats)) => {
                stats.active.fetch_sub(1, Ordering::Relaxed);
                stats.sent.fetch_add(sent, Ordering::Relaxed);
                stats.received.fetch_add(received, Ordering::Relaxed);
                if end == End::TargetRefused {
                    stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                }
                addr.to_string()
            }
            None => self.route.targets(),
        };
        if end == End::Unreachable {
            self.route.stats.unavailable.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(route = %self.route.route.name, error = detail.as_deref().unwrap_or(""), "no UDP target reachable");
        }
        SessionLine {
            route: &self.route.route.name,
            client: self.peer,
            target,
            sent,
            received,
            datagrams_sent,
            datagrams_received,
            duration: self.started.elapsed(),
            end,
            detail,
        }
        .record(&self.route.log);
    }
}

/// How an error from the target's socket ends a session.
fn ended_by(e: &io::Error) -> End {
    if e.kind() == io::ErrorKind::ConnectionRefused {
        End::TargetRefused
    } else {
        End::TargetError
    }
}

/// What one attempt to take a datagram from a target came to.
enum Step {
    /// Nothing more to read now.
    Drained,
    /// Forwarded to the client, this long.
    Sent(usize),
    /// The client's socket is full: send this when it has room.
    Later(Vec<u8>),
    /// Sending it to the client failed.
    NotSent(io::Error),
    /// It filled the buffer: dropped.
    Truncated,
    /// Receiving failed: the session ends so.
    Failed(End, io::Error),
}

thread_local! {
    /// The receive buffer of the sessions running on this thread.
    static BUFFER: RefCell<Vec<u8>> = RefCell::new(vec![0; MAX_DATAGRAM]);
}

/// A route's socket on one listen address, with the sessions of its
/// clients: kept across a reload for as long as the address is configured,
/// sessions and all.
struct Listener {
    addr: ListenAddr,
    socket: UdpSocket,
    sessions: Mutex<HashMap<SocketAddr, Arc<Session>>>,
    tracker: TaskTracker,
    /// Cancelled when the address is given up (with `why`).
    ending: CancellationToken,
    why: OnceLock<End>,
}

impl Listener {
    fn new(addr: ListenAddr, socket: UdpSocket) -> Self {
        Listener {
            addr,
            socket,
            sessions: Mutex::new(HashMap::new()),
            tracker: TaskTracker::new(),
            ending: CancellationToken::new(),
            why: OnceLock::new(),
        }
    }

    /// The bound address, for logs (with port 0 the configured one says
    /// nothing).
    fn shown(&self) -> String {
        self.socket
            .local_addr()
            .map_or_else(|_| self.addr.to_string(), |a| a.to_string())
    }

    /// Takes one datagram from `from` for `route`: checks the access
    /// lists, finds or starts the client's session, forwards.
    async fn take(self: &Arc<Self>, route: &Arc<UdpRoute>, from: SocketAddr, data: &[u8]) {
        let peer = SocketAddr::new(from.ip().to_canonical(), from.port());
        if !route.access.permits(peer.ip()) {
            route.refuse(peer, End::Refused, data.len());
            return;
        }
        let session = {
            let mut sessions = self.sessions.lock().expect("sessions lock");
            match sessions.get(&from).filter(|s| !s.ended()) {
                Some(session) => Ok(session.clone()),
                None => route.admit(peer).map(|admission| {
                    let opened = route.open_now();
                    let session = Arc::new(Session {
                        client: from,
                        peer,
                        route: route.clone(),
                        state: Mutex::new(State::Starting(VecDeque::new(), 0)),
                        socket: OnceLock::new(),
                        target: OnceLock::new(),
                        failed: OnceLock::new(),
                        started: Instant::now(),
                        last: AtomicU64::new(0),
                        sent: Count::default(),
                        received: Count::default(),
                        _admission: admission,
                    });
                    match opened {
                        Some(Ok(opened)) => {
                            session.connected(opened);
                            *session.state.lock().expect("session lock") = State::Ready;
                        }
                        Some(Err(why)) => {
                            let _ = session.failed.set(why);
                        }
                        None => {}
                    }
                    sessions.insert(from, session.clone());
                    let udp = &route.stats.udp;
                    udp.sessions_active.fetch_add(1, Ordering::Relaxed);
                    udp.sessions_total.fetch_add(1, Ordering::Relaxed);
                    self.tracker.spawn(run(session.clone(), self.clone()));
                    session
                }),
            }
        };
        match session {
            Ok(session) => {
                session.touch();
                session.forward(data).await;
            }
            Err(end) => route.refuse(peer, end, data.len()),
        }
    }

    /// Ends every session (as `why`) and waits until they have logged.
    async fn end(&self, why: End) {
        let _ = self.why.set(why);
        self.ending.cancel();
        self.tracker.close();
        if tokio::time::timeout(END_WAIT, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(listen = %self.shown(), "UDP sessions still ending after {END_WAIT:?}");
        }
    }
}

/// One session's task.
async fn run(session: Arc<Session>, listener: Arc<Listener>) {
    let (end, detail) = tokio::select! {
        biased;
        _ = listener.ending.cancelled() => (listener.why.get().copied().unwrap_or(End::Shutdown), None),
        outcome = session.serve(&listener.socket) => outcome,
    };
    session.finish(&listener, end, detail);
}

/// Receives on `listener` for `route` until `stop`.
async fn receive_loop(listener: Arc<Listener>, route: Arc<UdpRoute>, stop: CancellationToken) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut backoff = Duration::from_millis(5);
    loop {
        let got = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            got = receive(&listener.socket, &mut buf) => got,
        };
        match got {
            Ok(Received::Whole { len, from }) => {
                backoff = Duration::from_millis(5);
                listener.take(&route, from, &buf[..len]).await;
            }
            Ok(Received::Truncated { from }) => {
                route.stats.udp.dropped(Dropped::Truncated);
                tracing::debug!(route = %route.route.name, client = %from, "a datagram filled the buffer and was dropped");
            }
            // An ICMP error for an earlier datagram, or a signal: nothing
            // wrong with the socket.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                tracing::error!(route = %route.route.name, listen = %listener.shown(), error = %e, retry_in = ?backoff, "UDP receive failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// A UDP route that is running: its listeners and their receive loops.
struct Running {
    route: Arc<UdpRoute>,
    listeners: Vec<Arc<Listener>>,
    stop: CancellationToken,
    loops: Vec<JoinHandle<()>>,
}

/// The UDP routes of a tunnel; see [`crate::Tunnel::apply`].
#[derive(Default)]
pub struct UdpRoutes {
    running: Vec<Running>,
}

/// UDP routes ready to replace the running ones: every socket bound.
pub struct Plan {
    routes: Vec<(Route, Vec<Arc<Listener>>)>,
}

impl Plan {
    /// The routes and their targets, for the metrics to keep.
    pub fn configured(&self) -> Vec<(String, Vec<String>)> {
        self.routes
            .iter()
            .map(|(r, _)| {
                (
                    r.name.clone(),
                    r.targets.iter().map(ToString::to_string).collect(),
                )
            })
            .collect()
    }
}

impl UdpRoutes {
    /// Sockets for `routes`: the running ones of the same address (with
    /// their sessions), those in `bound`, else bound now. Each problem is
    /// pushed to `errors`; then nothing may change.
    pub fn plan(
        &self,
        routes: Vec<Route>,
        bound: &mut HashMap<ListenAddr, UdpSocket>,
        errors: &mut Vec<String>,
    ) -> Plan {
        let held: HashMap<ListenAddr, Arc<Listener>> = self
            .running
            .iter()
            .flat_map(|r| r.listeners.iter().map(|l| (l.addr, l.clone())))
            .collect();
        let all_held: Vec<ListenAddr> = held.keys().copied().collect();
        let mut taken: HashMap<ListenAddr, String> = HashMap::new();
        let mut planned = Vec::new();
        for route in routes {
            let mut listeners = Vec::new();
            for addr in &route.listen {
                if let Some(other) = taken.get(addr) {
                    errors.push(format!(
                        "route {}: {addr} is the UDP listen address of route {other} too; give each UDP route addresses of its own",
                        route.name
                    ));
                    continue;
                }
                let listener = match held.get(addr) {
                    Some(listener) => listener.clone(),
                    None => {
                        let socket = match bound.remove(addr) {
                            Some(socket) => socket,
                            None => match bind(*addr) {
                                Ok(socket) => socket,
                                Err(e) => {
                                    errors.push(crate::explain_bind(
                                        &format!("{} (udp)", route.name),
                                        *addr,
                                        &e,
                                        &all_held,
                                    ));
                                    continue;
                                }
                            },
                        };
                        Arc::new(Listener::new(*addr, socket))
                    }
                };
                taken.insert(*addr, route.name.clone());
                listeners.push(listener);
            }
            planned.push((route, listeners));
        }
        Plan { routes: planned }
    }

    /// Makes `plan` the running set: the old receive loops stop, sessions
    /// on addresses the plan gives up end, and sessions on kept addresses
    /// go on (new ones take the new settings).
    pub async fn commit(&mut self, plan: Plan, metrics: &Metrics, log: &Arc<AccessLog>) {
        let mut caps: HashMap<String, ConnectionCap> = HashMap::new();
        for old in self.running.drain(..) {
            old.stop.cancel();
            for task in old.loops {
                let _ = task.await;
            }
            for listener in old.listeners {
                let kept = plan
                    .routes
                    .iter()
                    .any(|(_, ls)| ls.iter().any(|l| Arc::ptr_eq(l, &listener)));
                if !kept {
                    listener.end(End::Reload).await;
                }
            }
            let name = &old.route.route.name;
            if !plan.routes.iter().any(|(r, _)| &r.name == name) {
                // Gone, or now a TCP route.
                old.route.stats.udp.enabled.store(false, Ordering::Relaxed);
            }
            caps.insert(name.clone(), old.route.cap.clone());
        }
        for (route, listeners) in plan.routes {
            let cap = match caps.remove(&route.name) {
                Some(cap) => {
                    cap.resize(route.max_connections);
                    cap
                }
                None => ConnectionCap::new(route.max_connections),
            };
            let stats = metrics.route(&route.name);
            stats.udp.enabled.store(true, Ordering::Relaxed);
            for target in &route.targets {
                stats.target(&target.to_string());
            }
            let udp = Arc::new(UdpRoute {
                access: AccessRules(route.access.clone()),
                route,
                cap,
                stats,
                log: log.clone(),
                next: AtomicUsize::new(0),
                refusals: Throttle::default(),
                full: Throttle::default(),
            });
            let stop = CancellationToken::new();
            let loops = listeners
                .iter()
                .map(|listener| {
                    tracing::info!(route = %udp.route.name, listen = %listener.shown(), protocol = "udp", targets = %udp.targets(), balance = %udp.route.balance, idle_timeout = ?udp.route.idle_timeout.0, "route ready");
                    tokio::spawn(receive_loop(listener.clone(), udp.clone(), stop.clone()))
                })
                .collect();
            self.running.push(Running {
                route: udp,
                listeners,
                stop,
                loops,
            });
        }
    }

    /// Whether every receive loop runs (false only if one ended, which
    /// it is built never to do).
    pub fn receiving(&self) -> bool {
        self.running
            .iter()
            .all(|r| r.loops.iter().all(|l| !l.is_finished()))
    }

    /// Stops receiving and ends every session.
    pub async fn shutdown(&mut self) {
        for old in self.running.drain(..) {
            old.stop.cancel();
            for task in old.loops {
                let _ = task.await;
            }
            for listener in old.listeners {
                listener.end(End::Shutdown).await;
            }
        }
    }

    /// Sessions open now, on every route.
    pub fn sessions(&self) -> usize {
        self.running
            .iter()
            .flat_map(|r| &r.listeners)
            .map(|l| l.sessions.lock().expect("sessions lock").len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_line_names_the_datagrams_each_way() {
        let mut line = SessionLine {
            route: "dns",
            client: "10.1.2.3:40000".parse().unwrap(),
            target: "10.0.0.53:53".into(),
            sent: 40,
            received: 120,
            datagrams_sent: 1,
            datagrams_received: 2,
            duration: Duration::from_millis(60_012),
            end: End::IdleTimeout,
            detail: None,
        };
        assert_eq!(
            line.line(),
            "route=dns client=10.1.2.3:40000 target=10.0.0.53:53 sent=40 received=120 duration=60.012s end=\"idle timeout\" protocol=udp datagrams_sent=1 datagrams_received=2"
        );
        line.end = End::Refused;
        line.detail = Some("3 more \"datagrams\"".into());
        assert!(line
            .line()
            .ends_with("end=\"refused by access list\" protocol=udp datagrams_sent=1 datagrams_received=2 detail=\"3 more 'datagrams'\""));
    }

    #[tokio::test]
    async fn a_datagram_that_fills_the_buffer_is_told_apart() {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let sender = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = socket.local_addr().unwrap();
        let mut buf = [0u8; 16];
        sender.send_to(&[7; 40], to).await.unwrap();
        sender.send_to(&[8; 15], to).await.unwrap();
        let from = sender.local_addr().unwrap();
        assert_eq!(
            receive(&socket, &mut buf).await.unwrap(),
            Received::Truncated { from }
        );
        assert_eq!(
            receive(&socket, &mut buf).await.unwrap(),
            Received::Whole { len: 15, from }
        );
        assert_eq!(&buf[..15], &[8; 15]);
    }

    #[test]
    fn the_throttle_passes_one_line_a_second_and_counts_the_rest() {
        let throttle = Throttle::default();
        assert_eq!(throttle.pass(), Some(0));
        assert_eq!(throttle.pass(), None);
        assert_eq!(throttle.pass(), None);
        // A second later, as if.
        throttle.0.lock().unwrap().0 = Some(Instant::now() - Duration::from_secs(2));
        assert_eq!(throttle.pass(), Some(2));
    }
}
