//! Retry before the first byte (`retry_before_first_byte`): a target that
//! accepts a connection and then closes or resets it before sending a
//! single byte (an instance killed with connections in its accept queue,
//! one that crashed on accept) has answered nothing, so the connection can
//! go on to another target without the client noticing.
//!
//! Until the target's first byte, the tunnel copies what the client sends
//! into a buffer of at most [`HOLD_MAX`] bytes as it forwards it. When the
//! target closes or resets before its first byte, that target counts as
//! failed for the balancer (as a failed connect does), and a new attempt
//! begins: the balancer picks another target (never one this connection
//! has tried), whatever goes to a target first is written again, then the
//! held bytes. Once the target's first byte has reached the client nothing
//! is ever replayed: the buffer is dropped and the ordinary relay takes
//! over (splicing, between two plain TCP sockets).
//!
//! Holding stops, and the relay takes over as if the setting were off,
//! when the client has sent more than [`HOLD_MAX`] bytes without an
//! answer, or when the route's connect timeout (counted from the first
//! connect) has passed: retries are for targets that die at once, and a
//! client never waits longer than the connect timeout for them. At most
//! [`MAX_RETRIES`] retries are made per connection.
//!
//! A client that has finished sending (its end of stream, passed on to the
//! target) is replayed with its end of stream too. If the target then
//! closes in good order without a byte, that is its answer (a protocol
//! whose replies may be empty), passed on as such and never retried; a
//! reset is still retried.
//!
//! When every attempt fails, the client is closed as when no target is
//! reachable, and the access-log line names each attempt. A connection that
//! succeeded after a retry says `retried=N` and why in its access-log
//! detail; `tunnel_retries_total{route,target}` counts the retries by the
//! target that failed.
//!
//! With TLS to the targets, an attempt includes the handshake (a failed
//! handshake is retried like a failed connect), and the first byte is the
//! first byte of decrypted data: the held bytes are plain text, encrypted
//! anew for each target.
//!
//! The caveat: a target may have read and acted on the request before it
//! died without answering; a retry sends it again. Turn this on only for
//! protocols where a request not yet answered may safely be sent twice.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use common::serve::Accepted;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::access_log::{End, Entry};
use crate::balance::{Active, Backend};
use crate::relay::{self, OverTcp};
use crate::{ClientSide, RouteHandler, TargetSide};

/// Most bytes of the client's held until the target answers; beyond, the
/// connection is no longer retried.
pub const HOLD_MAX: usize = 16 * 1024;

/// Most retries of one connection.
pub const MAX_RETRIES: usize = 3;

/// Bytes read at once while holding.
const CHUNK: usize = 4096;

/// An attempt at a target that failed before the target could answer: the
/// reason, and the target when one was connected (a TLS handshake failed).
#[derive(Debug)]
pub(crate) struct Failed {
    pub why: String,
    pub backend: Option<Arc<Backend>>,
}

/// What moved before the relay took over, and the attempts that failed.
#[derive(Debug, Default)]
pub(crate) struct Early {
    /// Bytes from the client (each counted once, however often replayed).
    pub sent: u64,
    /// Bytes from the target to the client.
    pub received: u64,
    /// How many times the connection went on to another target.
    pub retries: usize,
    /// Why each earlier attempt failed.
    pub attempts: Vec<String>,
}

impl Early {
    /// The access log's detail: the retries, if any, then `error`.
    pub(crate) fn detail(&self, error: Option<String>) -> Option<String> {
        if self.attempts.is_empty() {
            return error;
        }
        let mut detail = format!("retried={}: {}", self.retries, self.attempts.join("; "));
        if let Some(error) = error {
            detail.push_str("; then ");
            detail.push_str(&error);
        }
        Some(detail)
    }
}

/// A connection whose target answered (or that is no longer held): the
/// target, and what moved so far.
pub(crate) struct Answered {
    pub target: (TargetSide, SocketAddr, Active),
    pub early: Early,
}

/// What the client has sent that the target has not answered yet.
#[derive(Debug, Default)]
struct Held {
    bytes: Vec<u8>,
    /// More than [`HOLD_MAX`] came: nothing is held, nothing replayed.
    overflowed: bool,
    /// The client sent its end of stream (passed on to the target).
    client_done: bool,
}

impl Held {
    fn keep(&mut self, more: &[u8]) {
        if self.overflowed {
            return;
        }
        if self.bytes.len() + more.len() > HOLD_MAX {
            self.overflowed = true;
            self.bytes = Vec::new();
        } else {
            self.bytes.extend_from_slice(more);
        }
    }
}

/// How waiting for the target's first byte ended.
enum Waited {
    /// Its first bytes reached the client.
    Answered,
    /// No more holding (too much held, or the retry window is over): the
    /// relay goes on as if retries were off.
    Released,
    /// The target closed (`reset: false`) or reset before its first byte.
    Failed { why: String, reset: bool },
    /// The client went away, or the tunnel is shutting down.
    Ended(relay::End, Option<io::ErrorKind>),
}

/// Holds the client's bytes until `first`'s target answers, retrying on
/// other targets as the module says. `since` is when the first connect
/// began. `None` when the connection ended here (it has been recorded).
pub(crate) async fn until_answered(
    handler: &RouteHandler,
    client: &mut ClientSide,
    first: (TargetSide, SocketAddr, Active),
    since: Instant,
    conn: &Accepted,
    started: std::time::Instant,
) -> Option<Answered> {
    let route = &handler.route;
    let timeout = route.connect_timeout.0;
    let window = since.checked_add(timeout).unwrap_or(since + FAR);
    let (mut target, mut addr, mut backend) = first;
    let mut held = Held::default();
    let mut early = Early::default();
    let mut tried: Vec<Arc<Backend>> = Vec::new();
    loop {
        let waited = wait(
            client,
            &mut target,
            &mut held,
            &mut early,
            window,
            &conn.closing,
        )
        .await;
        let (why, reset) = match waited {
            Waited::Answered | Waited::Released => {
                return Some(Answered {
                    target: (target, addr, backend),
                    early,
                })
            }
            Waited::Ended(end, error) => {
                if end != relay::End::Shutdown {
                    relay::abort(client.tcp());
                    relay::abort(target.tcp());
                }
                backend.stats.sent.fetch_add(early.sent, Ordering::Relaxed);
                backend
                    .stats
                    .received
                    .fetch_add(early.received, Ordering::Relaxed);
                handler.log.record(&Entry {
                    route: &route.name,
                    client: conn.peer,
                    via: conn.via,
                    target: addr.to_string(),
                    sent: early.sent,
                    received: early.received,
                    duration: started.elapsed(),
                    end: End::Relayed(end),
                    detail: early.detail(error.map(|e| e.to_string())),
                });
                return None;
            }
            Waited::Failed { why, reset } => (why, reset),
        };
        if held.client_done && !reset {
            // The client had finished, and the target closed in good
            // order: an empty answer, not a failure.
            return Some(Answered {
                target: (target, addr, backend),
                early,
            });
        }
        let why = format!("{addr} {why}");
        handler.balancer.failed_before_answer(&backend, &why);
        early.attempts.push(why);
        tried.push(backend.shared());
        let mut not_retried = if held.overflowed {
            Some(format!(
                "not retried: the client sent more than {HOLD_MAX} bytes before an answer"
            ))
        } else if early.retries >= MAX_RETRIES {
            Some(format!("not retried: {MAX_RETRIES} retries made"))
        } else if Instant::now() >= window {
            Some(format!(
                "not retried: the connect timeout ({timeout:?}) has passed"
            ))
        } else {
            None
        };
        let mut next = None;
        if not_retried.is_none() {
            backend.stats.retries.fetch_add(1, Ordering::Relaxed);
            early.retries += 1;
            tracing::debug!(route = %route.name, target = %addr, "the target failed before answering; retrying on another");
        }
        drop(target);
        drop(backend);
        while not_retried.is_none() && next.is_none() {
            let left = window.saturating_duration_since(Instant::now());
            if left.is_zero() {
                not_retried = Some(format!("the connect timeout ({timeout:?}) has passed"));
                break;
            }
            match handler.open_target(conn, left, &tried).await {
                Ok(opened) => next = Some(opened),
                Err(Failed {
                    why,
                    backend: Some(failed),
                }) => {
                    early.attempts.push(why);
                    tried.push(failed);
                }
                Err(Failed { why, backend: None }) => not_retried = Some(why),
            }
        }
        match next {
            Some(opened) => (target, addr, backend) = opened,
            None => {
                early.attempts.extend(not_retried);
                handler.stats.unavailable.fetch_add(1, Ordering::Relaxed);
                let why = early.attempts.join("; ");
                tracing::warn!(route = %route.name, error = %why, "no target answered");
                handler.log.record(&Entry {
                    route: &route.name,
                    client: conn.peer,
                    via: conn.via,
                    target: handler.targets(),
                    sent: early.sent,
                    received: 0,
                    duration: started.elapsed(),
                    end: End::Unreachable,
                    detail: Some(why),
                });
                return None;
            }
        }
    }
}

/// Beyond any connect timeout, for one written as "never".
const FAR: std::time::Duration = std::time::Duration::from_secs(86_400 * 365 * 30);

/// Replays what is held to `target`, then relays, holding what the client
/// sends, until the target's first byte (passed on to the client), its
/// close or reset, the client's end, or `window`.
async fn wait(
    client: &mut ClientSide,
    target: &mut TargetSide,
    held: &mut Held,
    early: &mut Early,
    window: Instant,
    closing: &CancellationToken,
) -> Waited {
    if !held.bytes.is_empty() {
        if let Err(failed) = send(target, &held.bytes, closing).await {
            return failed.at_target();
        }
    }
    if held.client_done {
        if let Err(e) = target.shutdown().await {
            return target_failed(&e);
        }
    }
    let mut up = [0u8; CHUNK];
    let mut down = [0u8; CHUNK];
    loop {
        tokio::select! {
            biased;
            () = closing.cancelled() => return Waited::Ended(relay::End::Shutdown, None),
            read = target.read(&mut down) => return match read {
                Ok(0) => Waited::Failed {
                    why: "closed the connection before answering".into(),
                    reset: false,
                },
                Ok(n) => {
                    early.received += n as u64;
                    match send(client, &down[..n], closing).await {
                        Ok(()) => Waited::Answered,
                        Err(failed) => failed.at_client(),
                    }
                }
                Err(e) => target_failed(&e),
            },
            read = client.read(&mut up), if !held.client_done => match read {
                Ok(0) => {
                    held.client_done = true;
                    if let Err(e) = target.shutdown().await {
                        return target_failed(&e);
                    }
                }
                Ok(n) => {
                    early.sent += n as u64;
                    held.keep(&up[..n]);
                    if let Err(failed) = send(target, &up[..n], closing).await {
                        return failed.at_target();
                    }
                    if held.overflowed {
                        return Waited::Released;
                    }
                }
                Err(e) => return client_failed(&e),
            },
            () = tokio::time::sleep_until(window) => return Waited::Released,
        }
    }
}

/// Why [`send`] stopped.
enum SendFailed {
    Io(io::Error),
    Shutdown,
}

impl SendFailed {
    fn at_target(self) -> Waited {
        match self {
            SendFailed::Io(e) => target_failed(&e),
            SendFailed::Shutdown => Waited::Ended(relay::End::Shutdown, None),
        }
    }

    fn at_client(self) -> Waited {
        match self {
            SendFailed::Io(e) => client_failed(&e),
            SendFailed::Shutdown => Waited::Ended(relay::End::Shutdown, None),
        }
    }
}

/// Writes all of `bytes` to `to` and flushes (a TLS stream holds them
/// otherwise), unless the tunnel shuts down first.
async fn send<S: AsyncWrite + Unpin>(
    to: &mut S,
    bytes: &[u8],
    closing: &CancellationToken,
) -> Result<(), SendFailed> {
    tokio::select! {
        biased;
        () = closing.cancelled() => Err(SendFailed::Shutdown),
        written = async {
            to.write_all(bytes).await?;
            to.flush().await
        } => written.map_err(SendFailed::Io),
    }
}

fn is_reset(e: &io::Error) -> bool {
    use io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, NotConnected};
    matches!(
        e.kind(),
        ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected
    )
}

fn target_failed(e: &io::Error) -> Waited {
    let why = if is_reset(e) {
        "reset the connection before answering".to_string()
    } else {
        format!("failed before answering: {e}")
    };
    Waited::Failed { why, reset: true }
}

fn client_failed(e: &io::Error) -> Waited {
    if is_reset(e) {
        Waited::Ended(relay::End::ResetByClient, None)
    } else {
        Waited::Ended(relay::End::Error, Some(e.kind()))
    }
}

impl ClientSide {
    fn tcp(&self) -> &TcpStream {
        match self {
            ClientSide::Plain(s) => s,
            ClientSide::Replay(s) => s.tcp(),
            ClientSide::Tls(s) => s.tcp(),
        }
    }
}

impl TargetSide {
    fn tcp(&self) -> &TcpStream {
        match self {
            TargetSide::Plain(s) => s,
            TargetSide::Tls(s) => s.tcp(),
        }
    }
}

/// Either side as one stream, for the few bytes before the target's
/// first: the relay proper takes each kind on its own path.
macro_rules! either_stream {
    ($side:ident { $($variant:ident),* }) => {
        impl AsyncRead for $side {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $($side::$variant(s) => Pin::new(s).poll_read(cx, buf),)*
                }
            }
        }

        impl AsyncWrite for $side {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $($side::$variant(s) => Pin::new(s).poll_write(cx, buf),)*
                }
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $($side::$variant(s) => Pin::new(s).poll_flush(cx),)*
                }
            }

            fn poll_shutdown(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $($side::$variant(s) => Pin::new(s).poll_shutdown(cx),)*
                }
            }
        }
    };
}

either_stream!(ClientSide { Plain, Replay, Tls });
either_stream!(TargetSide { Plain, Tls });
