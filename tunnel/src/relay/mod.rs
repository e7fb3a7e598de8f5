//! Copying bytes both ways between a client and its target.
//!
//! The relay propagates a half-close: when one side finishes sending, the
//! other side's write half is shut down and the opposite direction keeps
//! flowing, so a client that shuts down its write side still receives the
//! whole reply. Idle connections hold no buffer: bytes are read into a
//! per-thread scratch buffer and written straight on; only what the
//! receiver cannot take at once is kept, and freed as soon as it is sent.
//! A connection with no traffic either way for the idle timeout is closed.
//!
//! A reset is passed on: when either side resets (or a read or write fails
//! otherwise), [`relay_tcp`] closes both sockets with a reset of its own
//! (`SO_LINGER` 0), so a truncated reply never reaches a client as a clean
//! end of stream, and a target sees a client's reset as a reset.
//!
//! This module is the one bidirectional copy: how a relay ends (half-close,
//! failure, idle timeout, shutdown) is decided here, for every pump. A pump
//! moves the bytes of both directions: `buffered` through user space for
//! any stream, `splice` inside the kernel between two TCP sockets on Linux.
//! Both are built from `pump` alone, never from this module.

mod buffered;
mod pump;
#[cfg(target_os = "linux")]
mod splice;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

pub use self::pump::abort;
use self::pump::{Failed, Pump};

/// How a relayed connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client finished first (and then the target).
    ClosedByClient,
    /// The target finished first (and then the client).
    ClosedByTarget,
    /// The client reset the connection (a read from it or a write to it
    /// failed with a reset or a broken pipe).
    ResetByClient,
    /// The target reset the connection (a read from it or a write to it
    /// failed with a reset or a broken pipe).
    ResetByTarget,
    /// No traffic either way for the idle timeout.
    IdleTimeout,
    /// A read or write failed otherwise (a keepalive timeout, say).
    Error,
    /// Still open when the shutdown grace period ended.
    Shutdown,
}

impl End {
    /// The words of the access log.
    pub fn as_str(self) -> &'static str {
        match self {
            End::ClosedByClient => "closed by client",
            End::ClosedByTarget => "closed by target",
            End::ResetByClient => "reset by client",
            End::ResetByTarget => "reset by target",
            End::IdleTimeout => "idle timeout",
            End::Error => "connection error",
            End::Shutdown => "closed at shutdown",
        }
    }
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What went through a relayed connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Bytes from the client to the target.
    pub sent: u64,
    /// Bytes from the target to the client.
    pub received: u64,
    /// How it ended.
    pub end: End,
    /// The error, when `end` is [`End::Error`].
    pub error: Option<io::ErrorKind>,
}

/// Relays between `client` and `target` until both directions have ended,
/// either side fails, nothing moves for `idle`, or `closing` is cancelled
/// (seen when the future is next polled: whoever cancels it must wake the
/// task, as the shared accept loop does).
/// Any stream type: bytes pass through user space. The streams are left
/// as they are; when the outcome is a reset or an error, the caller should
/// close the other side with a reset too ([`abort`] on its socket), as
/// [`relay_tcp`] does, so a truncated stream does not look complete.
pub fn relay<'a, C, T>(
    client: &'a mut C,
    target: &'a mut T,
    idle: Duration,
    closing: &'a CancellationToken,
) -> impl Future<Output = Outcome> + 'a
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    T: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    run(buffered::Buffered::new(client, target), idle, closing)
}

/// Like [`relay`] for two TCP sockets: on Linux the bytes never leave the
/// kernel (`splice(2)`); elsewhere they are copied through user space. When
/// the relay ends in a reset or an error, both sockets are set to close with
/// a reset ([`abort`]) when dropped.
pub fn relay_tcp<'a>(
    client: &'a mut tokio::net::TcpStream,
    target: &'a mut tokio::net::TcpStream,
    idle: Duration,
    closing: &'a CancellationToken,
) -> impl Future<Output = Outcome> + 'a {
    #[cfg(target_os = "linux")]
    let pump = splice::Spliced::new(client, target);
    #[cfg(not(target_os = "linux"))]
    let pump = buffered::BufferedTcp::new(client, target);
    run(pump, idle, closing)
}

/// A stream with a TCP socket underneath: the socket itself, or a TLS
/// stream over one. A relay that was cut short closes that socket with a
/// reset ([`abort`]).
pub trait OverTcp {
    /// The socket underneath.
    fn tcp(&self) -> &tokio::net::TcpStream;
}

impl OverTcp for tokio::net::TcpStream {
    fn tcp(&self) -> &tokio::net::TcpStream {
        self
    }
}

impl<S: OverTcp> OverTcp for tokio_rustls::server::TlsStream<S> {
    fn tcp(&self) -> &tokio::net::TcpStream {
        self.get_ref().0.tcp()
    }
}

impl<S: OverTcp> OverTcp for tokio_rustls::client::TlsStream<S> {
    fn tcp(&self) -> &tokio::net::TcpStream {
        self.get_ref().0.tcp()
    }
}

/// Relays between two streams over TCP of which at least one is TLS:
/// through user space (the bytes must be decrypted or encrypted), and
/// when the relay ends in a reset or an error, both sockets close with a
/// reset, as [`relay_tcp`] does.
pub async fn relay_over_tcp<C, T>(
    client: &mut C,
    target: &mut T,
    idle: Duration,
    closing: &CancellationToken,
) -> Outcome
where
    C: AsyncRead + AsyncWrite + Unpin + OverTcp,
    T: AsyncRead + AsyncWrite + Unpin + OverTcp,
{
    let outcome = relay(client, target, idle, closing).await;
    if matches!(
        outcome.end,
        End::ResetByClient | End::ResetByTarget | End::Error
    ) {
        abort(client.tcp());
        abort(target.tcp());
    }
    outcome
}

fn run<'t, P: Pump + Unpin>(
    pump: P,
    idle: Duration,
    closing: &'t CancellationToken,
) -> Relay<'t, P> {
    Relay {
        pump,
        first_done: None,
        idle,
        deadline: tokio::time::sleep(idle),
        last_active: Instant::now(),
        closing,
    }
}

pin_project_lite::pin_project! {
    /// The relay as a future. Kept small and with its timer inline: it is
    /// most of what an idle connection holds.
    pub struct Relay<'t, P> {
        pump: P,
        first_done: Option<End>,
        idle: Duration,
        #[pin]
        deadline: Sleep,
        last_active: Instant,
        // Checked at every poll rather than awaited: the accept loop that
        // runs every connection already wakes its task when `closing` is
        // cancelled, and one waiter per connection is enough memory.
        closing: &'t CancellationToken,
    }
}

/// The side of the connection a failed copy points at.
#[derive(Debug, Clone, Copy)]
enum Side {
    Client,
    Target,
}

/// How a failure on `side` ends the relay: a reset when the peer reset the
/// connection (or vanished so that a write or shutdown failed), an error
/// otherwise.
fn failure(side: Side, e: &io::Error) -> (End, Option<io::ErrorKind>) {
    use io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, NotConnected};
    match (e.kind(), side) {
        (ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected, Side::Client) => {
            (End::ResetByClient, None)
        }
        (ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected, Side::Target) => {
            (End::ResetByTarget, None)
        }
        (kind, _) => (End::Error, Some(kind)),
    }
}

fn failed<P: Pump>(pump: &mut P, side: Side, e: &io::Error) -> Outcome {
    // Whatever failed, the stream is cut short: the other side must see a
    // reset, never an orderly end that would make it look complete.
    pump.abort();
    let (end, error) = failure(side, e);
    outcome(pump, end, error)
}

fn outcome<P: Pump>(pump: &P, end: End, error: Option<io::ErrorKind>) -> Outcome {
    let (sent, received) = pump.bytes();
    Outcome {
        sent,
        received,
        end,
        error,
    }
}

impl<P: Pump + Unpin> Future for Relay<'_, P> {
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let mut this = self.project();
        if this.closing.is_cancelled() {
            return Poll::Ready(outcome(this.pump, End::Shutdown, None));
        }
        let mut active = false;
        // Client to target, then target to client: each direction ends on
        // its own; a failure ends the relay, blamed on the side at fault.
        for (from, to, closed) in [
            (Side::Client, Side::Target, End::ClosedByClient),
            (Side::Target, Side::Client, End::ClosedByTarget),
        ] {
            let done = this.pump.done();
            let polled = match from {
                Side::Client if !done.0 => this.pump.poll_up(cx, &mut active),
                Side::Target if !done.1 => this.pump.poll_down(cx, &mut active),
                _ => continue,
            };
            match polled {
                Poll::Ready(Ok(())) => {
                    this.first_done.get_or_insert(closed);
                }
                Poll::Ready(Err(Failed::Reading(e))) => {
                    return Poll::Ready(failed(this.pump, from, &e))
                }
                Poll::Ready(Err(Failed::Writing(e))) => {
                    return Poll::Ready(failed(this.pump, to, &e))
                }
                Poll::Pending => {}
            }
        }
        if this.pump.done() == (true, true) {
            let end = this.first_done.unwrap_or(End::ClosedByClient);
            return Poll::Ready(outcome(this.pump, end, None));
        }
        if active {
            // Moving the timer on every read costs more than checking it
            // when it fires; it is only re-armed then.
            *this.last_active = Instant::now();
        }
        loop {
            match this.deadline.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) => match this.last_active.checked_add(*this.idle) {
                    Some(due) if due <= Instant::now() => {
                        return Poll::Ready(outcome(this.pump, End::IdleTimeout, None));
                    }
                    Some(due) => this.deadline.as_mut().reset(due),
                    // An idle timeout beyond the clock's range ("never"):
                    // a new sleep of it waits as far as tokio's timers go.
                    None => this.deadline.set(tokio::time::sleep(*this.idle)),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    /// The buffered relay over in-memory pipes (the path TLS streams take):
    /// a half-close passes through and the reply still arrives, with small
    /// pipes so the pending buffer is used.
    #[tokio::test]
    async fn buffered_relay_passes_half_close_and_keeps_unsent_bytes() {
        let (mut client_app, mut client_side) = duplex(1024);
        let (mut target_side, mut target_app) = duplex(1024);
        let closing = CancellationToken::new();
        let relaying = tokio::spawn(async move {
            relay(
                &mut client_side,
                &mut target_side,
                Duration::from_secs(10),
                &closing,
            )
            .await
        });
        let target = tokio::spawn(async move {
            let mut request = Vec::new();
            target_app.read_to_end(&mut request).await.unwrap();
            let reply = vec![7u8; 200_000];
            target_app.write_all(&reply).await.unwrap();
            target_app.shutdown().await.unwrap();
            request.len()
        });
        client_app.write_all(&[1u8; 50_000]).await.unwrap();
        client_app.shutdown().await.unwrap();
        let mut reply = Vec::new();
        client_app.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply.len(), 200_000);
        assert_eq!(target.await.unwrap(), 50_000);
        let outcome = relaying.await.unwrap();
        assert_eq!((outcome.sent, outcome.received), (50_000, 200_000));
        assert_eq!(outcome.end, End::ClosedByClient);
    }

    #[tokio::test]
    async fn buffered_relay_ends_when_idle_and_on_closing() {
        let (_client_app, mut client_side) = duplex(64);
        let (mut target_side, _target_app) = duplex(64);
        let closing = CancellationToken::new();
        let outcome = relay(
            &mut client_side,
            &mut target_side,
            Duration::from_millis(100),
            &closing,
        )
        .await;
        assert_eq!(outcome.end, End::IdleTimeout);

        let closing = CancellationToken::new();
        closing.cancel();
        let outcome = relay(
            &mut client_side,
            &mut target_side,
            Duration::from_secs(60),
            &closing,
        )
        .await;
        assert_eq!(outcome.end, End::Shutdown);
    }

    async fn tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let near = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (far, _) = listener.accept().await.unwrap();
        (near, far)
    }

    /// The buffered pump between TCP sockets (the path where splice(2) is
    /// not available) passes a target's reset on to the client as a reset.
    #[tokio::test]
    async fn buffered_tcp_relay_passes_a_reset_on() {
        let (mut client_app, mut client_side) = tcp_pair().await;
        let (mut target_side, mut target_app) = tcp_pair().await;
        let relaying = tokio::spawn(async move {
            let closing = CancellationToken::new();
            let pump = buffered::BufferedTcp::new(&mut client_side, &mut target_side);
            run(pump, Duration::from_secs(10), &closing).await
        });
        target_app.write_all(b"partial reply").await.unwrap();
        target_app.set_zero_linger().unwrap();
        drop(target_app);
        let outcome = relaying.await.unwrap();
        assert_eq!(outcome.end, End::ResetByTarget);
        let mut buf = [0u8; 64];
        let last = loop {
            match client_app.read(&mut buf).await {
                Ok(0) => break Ok(()),
                Ok(_) => continue,
                Err(e) => break Err(e.kind()),
            }
        };
        assert_eq!(last, Err(io::ErrorKind::ConnectionReset));
    }
}
