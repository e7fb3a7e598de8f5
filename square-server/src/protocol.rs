//! One connection of the square protocol: lines in, answers out, pipelined.
//!
//! A connection answers the complete lines it has read, in order, into one
//! output buffer, and writes that buffer when it holds [`MAX_UNSENT`] bytes
//! or no complete line is left; it reads again only once every answer is
//! written. A client that pipelines many requests so costs one read and one
//! write per batch, and a client that never reads its answers stops being
//! read as soon as [`MAX_UNSENT`] bytes wait for it. What a connection holds
//! is bounded by design, not by the client's manners: one read of
//! [`READ_SIZE`] bytes, the start of a line of at most `max_line` bytes, and
//! the unsent answers (under [`MAX_UNSENT`] plus one answer). The buffers
//! are pages of their own ([`crate::buffer`]), mapped when there is
//! something to hold; a connection quiet for [`QUIET`] gives them back to
//! the system and waits for its next bytes without them, and so does one
//! that ends.
//!
//! A line longer than the limit gets one `ERR` and the rest of it is thrown
//! away up to its newline.
//!
//! Squaring a number of thousands of digits takes milliseconds. Those
//! squares are worked out by [`Compute`], off the threads that serve
//! sockets, so a client pipelining thousands of them never holds up another
//! client's `12`; smaller work done in place gives its thread up after every
//! [`SLICE`] of it.

use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::buffer::PageBuf;
use crate::number::{self, Output};

/// Bytes asked of the socket per read.
pub const READ_SIZE: usize = 16 * 1024;
/// Bytes of answers a connection holds before it stops answering (and so
/// reading) until they are written.
pub const MAX_UNSENT: usize = 32 * 1024;
/// How long a connection waits for input with its buffers before it gives
/// them back.
pub const QUIET: Duration = Duration::from_millis(250);
/// Bytes asked of the socket by a quiet connection: enough to wake it.
const WAKE_SIZE: usize = 64;
/// Work done in place on a socket thread before it is given up to the other
/// connections.
pub const SLICE: Duration = Duration::from_millis(1);
/// Bytes of requests answered in place between two looks at the clock.
const CHECK_BYTES: usize = 4096;
/// Numbers with more significant digits than this are squared by
/// [`Compute`]; smaller ones cost well under a millisecond and are squared
/// in place.
pub const OFFLOAD_DIGITS: usize = 1_000;

/// What one request may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most digits in a number.
    pub max_digits: usize,
    /// Most bytes in a request line, not counting its line ending.
    pub max_line: usize,
}

/// Where the squares of big numbers are worked out: on the runtime's
/// blocking threads, a bounded number at once (first come, first served),
/// so that the threads serving sockets stay free for everyone and a
/// processor is left to them.
#[derive(Debug, Clone)]
pub struct Compute {
    places: Arc<Semaphore>,
}

impl Compute {
    /// Squares at most `at_once` big numbers at the same time (at least 1).
    pub fn new(at_once: usize) -> Self {
        Compute {
            places: Arc::new(Semaphore::new(at_once.max(1))),
        }
    }

    /// One big square at a time per processor but one, which is left to
    /// the threads serving sockets (one at least).
    pub fn per_processor() -> Self {
        let processors = std::thread::available_parallelism().map_or(1, |n| n.get());
        Compute::new(processors - 1)
    }

    /// Appends the square of the number on `line` of `input` (already
    /// parsed and found valid within `max_digits`) and a newline to `out`.
    /// Both buffers are handed to the computing thread and back, so nothing
    /// is copied or allocated on the connection's side.
    async fn square(
        &self,
        input: PageBuf,
        line: Range<usize>,
        max_digits: usize,
        mut out: PageBuf,
    ) -> io::Result<(PageBuf, PageBuf)> {
        let place = self
            .places
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        tokio::task::spawn_blocking(move || {
            let _place = place;
            let number = number::parse(&input[line], max_digits)
                .expect("only numbers that parsed are handed over");
            number::write_square(number, &mut out);
            out.push(b'\n');
            (input, out)
        })
        .await
        .map_err(|e| io::Error::other(format!("squaring failed: {e}")))
    }
}

/// The longest answer to one request within `limits`, newline included: a
/// square of `max_digits` digits (twice as many, and `0.` before a
/// fraction), or an `ERR` line, which quotes at most
/// [`number::QUOTE_BYTES`] bytes of the request.
fn longest_answer(limits: Limits) -> usize {
    limits
        .max_digits
        .saturating_mul(2)
        .saturating_add(3)
        .max(1024)
}

/// Answers request lines into a connection's output buffer (mapped when
/// first needed): in place, giving the thread up after every [`SLICE`] of
/// work, or through [`Compute`] for big numbers.
struct Answerer<'a> {
    limits: Limits,
    compute: &'a Compute,
    /// What the output buffer must hold: [`MAX_UNSENT`] and one answer.
    out_capacity: usize,
    /// When the work done in place since the thread was last given up
    /// began.
    slice: Instant,
    /// Bytes answered in place since the clock was last read: it is read
    /// every [`CHECK_BYTES`], not for every small request.
    unchecked: usize,
}

impl Answerer<'_> {
    /// The output buffer, mapped if there is none.
    fn out<'o>(&self, out: &'o mut Option<PageBuf>) -> io::Result<&'o mut PageBuf> {
        match out {
            Some(buf) => Ok(buf),
            None => Ok(out.insert(PageBuf::with_capacity(self.out_capacity)?)),
        }
    }

    /// Appends the answer to `line` (a complete line without its `\n`, or
    /// the last one) to `out`, unless it is a number for [`Compute`]: then
    /// returns false and appends nothing. Synchronous, so that the many
    /// small requests of a pipelined batch cost no future each.
    fn answer_in_place(&mut self, line: &[u8], out: &mut PageBuf) -> bool {
        if line.len() > self.limits.max_line {
            refuse_too_long(line, self.limits.max_line, out);
        } else {
            match number::parse(line, self.limits.max_digits) {
                Ok(n) if n.significant_digits() > OFFLOAD_DIGITS => return false,
                Ok(n) => {
                    number::write_square(n, out);
                    out.push(b'\n');
                }
                Err(rejection) => {
                    out.extend_from_slice(b"ERR ");
                    number::explain(rejection, line.trim_ascii(), out);
                    out.push(b'\n');
                }
            }
        }
        // A request costs at least as much as a few bytes.
        self.unchecked += line.len() + 16;
        true
    }

    /// Whether the work done in place since the thread was last given up
    /// has used up a [`SLICE`]: the clock is read every [`CHECK_BYTES`].
    fn slice_used(&mut self) -> bool {
        if self.unchecked < CHECK_BYTES {
            return false;
        }
        self.unchecked = 0;
        if self.slice.elapsed() < SLICE {
            return false;
        }
        self.slice = Instant::now();
        true
    }

    /// Appends the answer to `line` of `input`, worked out by [`Compute`]
    /// with both buffers handed over and back.
    async fn answer_big(
        &mut self,
        input: &mut Option<PageBuf>,
        line: Range<usize>,
        out: &mut Option<PageBuf>,
    ) -> io::Result<()> {
        let (taken_input, taken_out) = (input.take(), out.take());
        let (back_input, back_out) = self
            .compute
            .square(
                taken_input.expect("the line is in the input"),
                line,
                self.limits.max_digits,
                taken_out.expect("mapped before the line was looked at"),
            )
            .await?;
        *input = Some(back_input);
        *out = Some(back_out);
        // Waiting for it gave the thread up.
        self.slice = Instant::now();
        self.unchecked = 0;
        Ok(())
    }

    /// Appends the answer to `line` of `input`, however it is worked out,
    /// giving the thread up when a slice is used.
    async fn answer(
        &mut self,
        input: &mut Option<PageBuf>,
        line: Range<usize>,
        out: &mut Option<PageBuf>,
    ) -> io::Result<()> {
        let text = &input.as_ref().expect("a line to answer")[line.clone()];
        if !self.answer_in_place(text, self.out(out)?) {
            return self.answer_big(input, line, out).await;
        }
        if self.slice_used() {
            tokio::task::yield_now().await;
        }
        Ok(())
    }

    /// Appends the refusal of a line that has grown past `max_line`.
    fn refuse_too_long(&self, start: &[u8], out: &mut Option<PageBuf>) -> io::Result<()> {
        refuse_too_long(start, self.limits.max_line, self.out(out)?);
        Ok(())
    }
}

/// Serves the square protocol on `stream` until the client closes its side,
/// stays silent for `idle_timeout` (in either direction), or `draining` is
/// cancelled (then the answers to everything already read are sent first).
pub async fn serve_connection<S>(
    mut stream: S,
    limits: Limits,
    compute: &Compute,
    idle_timeout: Duration,
    draining: CancellationToken,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut answerer = Answerer {
        limits,
        compute,
        out_capacity: MAX_UNSENT.saturating_add(longest_answer(limits)),
        slice: Instant::now(),
        unchecked: 0,
    };
    // Room for the start of a line of `max_line` bytes and one read.
    let input_capacity = limits.max_line.saturating_add(READ_SIZE);
    // Mapped when there is something to hold, dropped when quiet.
    let mut input: Option<PageBuf> = None;
    let mut out: Option<PageBuf> = None;
    // `input[..start]` is answered; `input[start..searched]` has no newline.
    let mut start = 0;
    let mut searched = 0;
    // Inside a line already refused as too long: drop bytes up to a newline.
    let mut discarding = false;
    loop {
        while unsent(&out) < MAX_UNSENT {
            let Some(buf) = &input else { break };
            let Some(at) = memchr::memchr(b'\n', &buf[searched..]) else {
                searched = buf.len();
                break;
            };
            let end = searched + at;
            if discarding {
                discarding = false;
            } else if !answerer.answer_in_place(&buf[start..end], answerer.out(&mut out)?) {
                answerer
                    .answer_big(&mut input, start..end, &mut out)
                    .await?;
            } else if answerer.slice_used() {
                tokio::task::yield_now().await;
            }
            start = end + 1;
            searched = start;
        }
        if unsent(&out) >= MAX_UNSENT {
            // Nothing more is answered, or read, until these are sent.
            send(&mut stream, &mut out, idle_timeout).await?;
            continue;
        }

        // Every complete line is answered; the rest is the start of a line.
        if let Some(buf) = &mut input {
            if discarding {
                start = buf.len();
            } else if buf.len() - start > limits.max_line {
                answerer.refuse_too_long(&buf[start..], &mut out)?;
                discarding = true;
                start = buf.len();
            }
            buf.consume(start);
            start = 0;
            searched = buf.len();
        }
        send(&mut stream, &mut out, idle_timeout).await?;
        if draining.is_cancelled() {
            debug!("server draining; closing after the last answers");
            return Ok(());
        }

        let first_wait = QUIET.min(idle_timeout);
        let mut wait = read_more(
            &mut stream,
            &mut input,
            input_capacity,
            first_wait,
            &draining,
        )
        .await?;
        if matches!(wait, Wait::TimedOut) && idle_timeout > first_wait {
            // Quiet: give the buffers back (all but the start of a line)
            // and wait for the next bytes without them.
            out = None;
            if input.as_ref().is_some_and(|buf| buf.is_empty()) {
                input = None;
            }
            wait = read_more(
                &mut stream,
                &mut input,
                input_capacity,
                idle_timeout - first_wait,
                &draining,
            )
            .await?;
        }
        match wait {
            Wait::Draining => {
                debug!("server draining; closing between requests");
                return Ok(());
            }
            Wait::TimedOut => {
                debug!(timeout = ?idle_timeout, "idle; closing");
                return Ok(());
            }
            Wait::Read(0) => {
                // A last line without a newline is still a request.
                let last = input.as_ref().map_or(0, |buf| buf.len());
                if !discarding && last > 0 {
                    answerer.answer(&mut input, 0..last, &mut out).await?;
                    send(&mut stream, &mut out, idle_timeout).await?;
                }
                let _ = tokio::time::timeout(idle_timeout, stream.shutdown()).await;
                return Ok(());
            }
            Wait::Read(_) => {}
        }
    }
}

/// Bytes of answers waiting to be written.
fn unsent(out: &Option<PageBuf>) -> usize {
    out.as_ref().map_or(0, |buf| buf.len())
}

/// How a wait for input ended.
enum Wait {
    /// Bytes were read (0 at the end of the input).
    Read(usize),
    /// Nothing came in time.
    TimedOut,
    /// The server began shutting down.
    Draining,
}

/// Reads into `input` for at most `timeout`: at most [`READ_SIZE`] bytes
/// into the buffer, or, when there is none, a few bytes into a new one of
/// `capacity` bytes.
async fn read_more<S: AsyncRead + Unpin>(
    stream: &mut S,
    input: &mut Option<PageBuf>,
    capacity: usize,
    timeout: Duration,
    draining: &CancellationToken,
) -> io::Result<Wait> {
    if let Some(buf) = input {
        let room = buf.spare();
        // Never empty: the buffer has room for a read beyond a line.
        debug_assert!(!room.is_empty());
        let room_len = room.len().min(READ_SIZE);
        let wait = read_within(stream, &mut room[..room_len], timeout, draining).await?;
        if let Wait::Read(count) = wait {
            buf.filled(count);
        }
        return Ok(wait);
    }
    let mut wake = [0u8; WAKE_SIZE];
    let wait = read_within(stream, &mut wake, timeout, draining).await?;
    if let Wait::Read(count @ 1..) = wait {
        let mut buf = PageBuf::with_capacity(capacity)?;
        buf.extend_from_slice(&wake[..count]);
        *input = Some(buf);
    }
    Ok(wait)
}

async fn read_within<S: AsyncRead + Unpin>(
    stream: &mut S,
    room: &mut [u8],
    timeout: Duration,
    draining: &CancellationToken,
) -> io::Result<Wait> {
    tokio::select! {
        biased;
        _ = draining.cancelled() => Ok(Wait::Draining),
        read = tokio::time::timeout(timeout, stream.read(room)) => match read {
            Ok(Ok(count)) => Ok(Wait::Read(count)),
            Ok(Err(e)) => Err(e),
            Err(_) => Ok(Wait::TimedOut),
        },
    }
}

fn refuse_too_long(line: &[u8], max_line: usize, out: &mut impl Output) {
    out.extend_from_slice(b"ERR ");
    number::explain_too_long(line.trim_ascii_start(), max_line, out);
    out.push(b'\n');
}

/// Writes the answers held, if any, within `timeout`.
async fn send<S: AsyncWrite + Unpin>(
    stream: &mut S,
    out: &mut Option<PageBuf>,
    timeout: Duration,
) -> io::Result<()> {
    let Some(buf) = out.as_mut().filter(|buf| !buf.is_empty()) else {
        return Ok(());
    };
    match tokio::time::timeout(timeout, stream.write_all(buf)).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read no answers for {timeout:?}"),
            ))
        }
    }
    buf.clear();
    Ok(())
}
