//! What the relay asks of a pump, and what both pumps are built from: the
//! copy of one direction through a per-thread scratch buffer, and closing
//! a socket with a reset.
//!
//! Idle connections hold no buffer: bytes are read into the scratch buffer
//! and written straight on; only what the receiver cannot take at once is
//! kept, and freed as soon as it is sent.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Size of the per-thread scratch buffer each read goes through.
const SCRATCH: usize = 64 * 1024;

thread_local! {
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH].into_boxed_slice());
}

/// The two directions of a relay, each moved forward by a poll.
pub(super) trait Pump {
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

/// Which end of one direction's copy failed: the stream read from, or the
/// stream written to. The relay turns it into the side that failed.
#[derive(Debug)]
pub(super) enum Failed {
    /// Reading from the source failed.
    Reading(io::Error),
    /// Writing to (or shutting down) the destination failed.
    Writing(io::Error),
}

/// One direction of a buffered relay.
#[derive(Debug, Default)]
pub(super) struct Direction {
    /// Bytes read but not yet written; empty (and unallocated) when idle.
    pending: Vec<u8>,
    sent: usize,
    pub(super) read_done: bool,
    pub(super) shut_down: bool,
    needs_flush: bool,
    /// Set when a read filled the whole scratch buffer: a bulk transfer.
    pub(super) bulk: bool,
    pub(super) bytes: u64,
}

impl Direction {
    pub(super) fn done(&self) -> bool {
        self.shut_down
    }

    /// Moves bytes from `reader` to `writer` until either would block.
    /// Returns Ready once `writer` has been shut down after EOF, or, with
    /// `stop_on_bulk`, as soon as a bulk transfer is seen and nothing is
    /// pending (so the caller can switch to zero-copy).
    pub(super) fn poll_copy<R, W>(
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
                        // A TLS peer that closes its socket without a
                        // close_notify: its end of stream, passed on as
                        // such (the bytes it sent were all delivered).
                        Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                            Poll::Ready(Ok(None))
                        }
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

/// Makes `stream` close with a reset (RST) instead of a FIN when it is
/// dropped (`SO_LINGER` 0): its peer reads an error, not an end of stream,
/// and unsent bytes are discarded.
pub fn abort(stream: &tokio::net::TcpStream) {
    // The socket may already be gone (reset by its peer); nothing to do then.
    let _ = stream.set_zero_linger();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

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
}
