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

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

/// Size of the per-thread scratch buffer each read goes through.
const SCRATCH: usize = 64 * 1024;

thread_local! {
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH].into_boxed_slice());
}

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

/// Which end of one direction's copy failed: the stream read from, or the
/// stream written to. The relay turns it into the side that failed.
#[derive(Debug)]
pub(crate) enum Failed {
    /// Reading from the source failed.
    Reading(io::Error),
    /// Writing to (or shutting down) the destination failed.
    Writing(io::Error),
}

/// One direction of a buffered relay.
#[derive(Debug, Default)]
pub(crate) struct Direction {
    /// Bytes read but not yet written; empty (and unallocated) when idle.
    pending: Vec<u8>,
    sent: usize,
    pub(crate) read_done: bool,
    pub(crate) shut_down: bool,
    needs_flush: bool,
    /// Set when a read filled the whole scratch buffer: a bulk transfer.
    pub(crate) bulk: bool,
    pub(crate) bytes: u64,
}

impl Direction {
    pub(crate) fn done(&self) -> bool {
        self.shut_down
    }

    /// Moves bytes from `reader` to `writer` until either would block.
    /// Returns Ready once `writer` has been shut down after EOF, or, with
    /// `stop_on_bulk`, as soon as a bulk transfer is seen and nothing is
    /// pending (so the caller can switch to zero-copy).
    pub(crate) fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
        active: &mut bool,
        stop_on_bulk: bool,
    ) -> Poll<Result<(), Failed>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if stop_on_bulk && self.bulk && self.pending.is_empty() && !self.read_done {
                return Poll::Ready(Ok(()));
            }
            if self.sent < self.pending.len() {
                let n = ready!(writer.as_mut().poll_write(cx, &self.pending[self.sent..]))
                    .map_err(Failed::Writing)?;
                if n == 0 {
                    return Poll::Ready(Err(Failed::Writing(io::ErrorKind::WriteZero.into())));
                }
                self.sent += n;
                self.bytes += n as u64;
                self.needs_flush = true;
                *active = true;
                if self.sent == self.pending.len() {
                    // Give the memory back: an idle connection keeps none.
                    self.pending = Vec::new();
                    self.sent = 0;
                }
                continue;
            }
            if !self.read_done {
                let read = SCRATCH_BUF.with(|scratch| {
                    let mut scratch = scratch.borrow_mut();
                    let mut buf = ReadBuf::new(&mut scratch[..]);
                    match reader.as_mut().poll_read(cx, &mut buf) {
                        Poll::Pending => Poll::Pending,
                        Poll::Ready(Err(e)) => Poll::Ready(Err(Failed::Reading(e))),
                        Poll::Ready(Ok(())) => {
                            let data = buf.filled();
                            if data.is_empty() {
                                return Poll::Ready(Ok(None));
                            }
                            self.bulk |= data.len() == SCRATCH;
                            // Write straight on; keep only what does not fit.
                            let written = match writer.as_mut().poll_write(cx, data) {
                                Poll::Ready(Ok(n)) => n,
                                Poll::Ready(Err(e)) => return Poll::Ready(Err(Failed::Writing(e))),
                                Poll::Pending => 0,
                            };
                            if written < data.len() {
                                self.pending = data[written..].to_vec();
                                self.sent = 0;
                            }
                            Poll::Ready(Ok(Some(written)))
                        }
                    }
                });
                match read {
                    Poll::Pending => {
                        if self.needs_flush {
                            ready!(writer.as_mut().poll_flush(cx)).map_err(Failed::Writing)?;
                            self.needs_flush = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(None)) => self.read_done = true,
                    Poll::Ready(Ok(Some(written))) => {
                        self.bytes += written as u64;
                        self.needs_flush |= written > 0;
                        *active = true;
                    }
                }
                continue;
            }
            if !self.shut_down {
                ready!(writer.as_mut().poll_shutdown(cx)).map_err(Failed::Writing)?;
                self.shut_down = true;
            }
            return Poll::Ready(Ok(()));
        }
    }
}

/// The two directions of a relay, each moved forward by a poll.
pub(crate) trait Pump {
    /// Client to target; Ready once it has ended.
    fn poll_up(&mut self, cx: &mut Context<'_>, active: &mut bool) -> Poll<Result<(), Failed>>;
    /// Target to client; Ready once it has ended.
    fn poll_down(&mut self, cx: &mut Context<'_>, active: &mut bool) -> Poll<Result<(), Failed>>;
    /// Whether each direction has ended: (up, down).
    fn done(&self) -> (bool, bool);
    /// Bytes moved: (up, down).
    fn bytes(&self) -> (u64, u64);
    /// Makes both sockets close with a reset rather than a FIN when they
    /// are dropped, where the streams allow it.
    fn abort(&mut self);
}

/// Copies through user space; works for any stream (TLS included).
struct Buffered<'a, C: ?Sized, T: ?Sized> {
    client: &'a mut C,
    target: &'a mut T,
    up: Direction,
    down: Direction,
}

impl<C, T> Pump for Buffered<'_, C, T>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    T: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    fn poll_up(&mut self, cx: &mut Context<'_>, active: &mut bool) -> Poll<Result<(), Failed>> {
        self.up.poll_copy(
            cx,
            Pin::new(&mut *self.client),
            Pin::new(&mut *self.target),
            active,
            false,
        )
    }
    fn poll_down(&mut self, cx: &mut Context<'_>, active: &mut bool) -> Poll<Result<(), Failed>> {
        self.down.poll_copy(
            cx,
            Pin::new(&mut *self.target),
            Pin::new(&mut *self.client),
            active,
            false,
        )
    }
    fn done(&self) -> (bool, bool) {
        (self.up.done(), self.down.done())
    }
    fn bytes(&self) -> (u64, u64) {
        (self.up.bytes, self.down.bytes)
    }
    fn abort(&mut self) {
        // Any stream: there is no socket option to reach. The caller sees
        // the reset in the outcome and can pass it on (see `relay`).
    }
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
    let pump = Buffered {
        client,
        target,
        up: Direction::default(),
        down: Direction::default(),
    };
    run(pump, idle, closing)
}

/// Like [`relay`] for two TCP sockets: on Linux the bytes never leave the
/// kernel (`splice(2)`). When the relay ends in a reset or an error, both
/// sockets are set to close with a reset ([`abort`]) when dropped.
pub fn relay_tcp<'a>(
    client: &'a mut tokio::net::TcpStream,
    target: &'a mut tokio::net::TcpStream,
    idle: Duration,
    closing: &'a CancellationToken,
) -> impl Future<Output = Outcome> + 'a {
    let pump = crate::splice::Spliced::new(client, target);
    run(pump, idle, closing)
}

/// Makes `stream` close with a reset (RST) instead of a FIN when it is
/// dropped (`SO_LINGER` 0): its peer reads an error, not an end of stream,
/// and unsent bytes are discarded.
pub fn abort(stream: &tokio::net::TcpStream) {
    // The socket may already be gone (reset by its peer); nothing to do then.
    let _ = stream.set_zero_linger();
}

pub(crate) fn run<'t, P: Pump + Unpin>(
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
        if !this.pump.done().0 {
            match this.pump.poll_up(cx, &mut active) {
                Poll::Ready(Ok(())) => {
                    this.first_done.get_or_insert(End::ClosedByClient);
                }
                Poll::Ready(Err(Failed::Reading(e))) => {
                    return Poll::Ready(failed(this.pump, Side::Client, &e))
                }
                Poll::Ready(Err(Failed::Writing(e))) => {
                    return Poll::Ready(failed(this.pump, Side::Target, &e))
                }
                Poll::Pending => {}
            }
        }
        if !this.pump.done().1 {
            match this.pump.poll_down(cx, &mut active) {
                Poll::Ready(Ok(())) => {
                    this.first_done.get_or_insert(End::ClosedByTarget);
                }
                Poll::Ready(Err(Failed::Reading(e))) => {
                    return Poll::Ready(failed(this.pump, Side::Target, &e))
                }
                Poll::Ready(Err(Failed::Writing(e))) => {
                    return Poll::Ready(failed(this.pump, Side::Client, &e))
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
                Poll::Ready(()) => {
                    let due = this
                        .last_active
                        .checked_add(*this.idle)
                        .unwrap_or_else(|| crate::connect::deadline_after(*this.idle));
                    if due <= Instant::now() {
                        return Poll::Ready(outcome(this.pump, End::IdleTimeout, None));
                    }
                    this.deadline.as_mut().reset(due);
                }
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

    /// A receiver that never reads: the direction keeps at most one scratch
    /// read and stops reading from the sender (whose bytes stay in its own
    /// socket buffer), and gives the memory back once the receiver reads.
    #[tokio::test]
    async fn a_receiver_that_never_reads_holds_at_most_one_scratch_read() {
        let (mut sender, mut source) = duplex(4 * SCRATCH);
        let (mut sink, mut receiver) = duplex(1024);
        sender.write_all(&vec![1u8; 4 * SCRATCH]).await.unwrap();
        let mut direction = Direction::default();
        let mut active = false;
        for _ in 0..10 {
            std::future::poll_fn(|cx| {
                let copy = direction.poll_copy(
                    cx,
                    Pin::new(&mut source),
                    Pin::new(&mut sink),
                    &mut active,
                    false,
                );
                assert!(copy.is_pending(), "the copy cannot finish");
                Poll::Ready(())
            })
            .await;
        }
        assert!(direction.pending.capacity() <= SCRATCH);
        assert_eq!(direction.bytes, 1024, "only what the receiver took");
        // The sender finishes and the receiver reads everything: the
        // pending bytes follow, and the buffer is freed.
        drop(sender);
        let mut got = Vec::new();
        let (copied, read) = tokio::time::timeout(Duration::from_secs(20), async {
            tokio::join!(
                std::future::poll_fn(|cx| direction.poll_copy(
                    cx,
                    Pin::new(&mut source),
                    Pin::new(&mut sink),
                    &mut active,
                    false,
                )),
                receiver.read_to_end(&mut got)
            )
        })
        .await
        .expect("the copy finishes");
        assert!(copied.is_ok() && read.is_ok());
        assert_eq!(got.len(), 4 * SCRATCH);
        assert_eq!(direction.bytes, 4 * SCRATCH as u64);
        assert_eq!(direction.pending.capacity(), 0);
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
}
