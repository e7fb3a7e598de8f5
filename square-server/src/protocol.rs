//! One connection of the square protocol: lines in, answers out, pipelined.
//!
//! Everything the client has sent so far is answered in one go: the
//! connection reads what is available, answers every complete line into one
//! output buffer, and writes that buffer once the input is drained, so a
//! client that pipelines many requests costs one read and one write per
//! batch rather than per line. A line longer than the limit gets one `ERR`
//! and the rest of it is thrown away up to its newline, so neither a hostile
//! nor a confused client can make the server buffer without bound.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::number;

/// Bytes asked of the socket per read.
const READ_SIZE: usize = 64 * 1024;

/// What one request may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most digits in a number.
    pub max_digits: usize,
    /// Most bytes in a request line, not counting its line ending.
    pub max_line: usize,
}

/// Serves the square protocol on `stream` until the client closes its side,
/// stays silent for `idle_timeout` (in either direction), or `draining` is
/// cancelled (then the answers to everything already read are sent first).
pub async fn serve_connection<S>(
    mut stream: S,
    limits: Limits,
    idle_timeout: Duration,
    draining: CancellationToken,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut input: Vec<u8> = Vec::with_capacity(READ_SIZE);
    let mut out: Vec<u8> = Vec::with_capacity(READ_SIZE);
    // Bytes of `input` already searched for a newline.
    let mut searched = 0;
    // Inside a line already refused as too long: drop bytes up to a newline.
    let mut discarding = false;
    loop {
        let mut start = 0;
        while let Some(at) = memchr::memchr(b'\n', &input[searched..]) {
            let end = searched + at;
            if discarding {
                discarding = false;
            } else {
                answer_line(&input[start..end], limits, &mut out);
            }
            start = end + 1;
            searched = start;
        }
        if discarding {
            start = input.len();
        } else if input.len() - start > limits.max_line {
            refuse_too_long(&input[start..], limits.max_line, &mut out);
            discarding = true;
            start = input.len();
        }
        input.drain(..start);
        searched = input.len();

        if !out.is_empty() {
            write_with_timeout(&mut stream, &out, idle_timeout).await?;
            out.clear();
        }
        if draining.is_cancelled() {
            debug!("server draining; closing after the last answers");
            return Ok(());
        }

        input.reserve(READ_SIZE);
        let read = tokio::select! {
            biased;
            _ = draining.cancelled() => {
                debug!("server draining; closing between requests");
                return Ok(());
            }
            read = tokio::time::timeout(idle_timeout, stream.read_buf(&mut input)) => read,
        };
        match read {
            Err(_) => {
                debug!(timeout = ?idle_timeout, "idle; closing");
                return Ok(());
            }
            Ok(Err(e)) => return Err(e),
            Ok(Ok(0)) => {
                // A last line without a newline is still a request.
                if !discarding && !input.is_empty() {
                    answer_line(&input, limits, &mut out);
                    write_with_timeout(&mut stream, &out, idle_timeout).await?;
                }
                let _ = stream.shutdown().await;
                return Ok(());
            }
            Ok(Ok(_)) => {}
        }
    }
}

/// Appends the answer to one complete line (without its `\n`).
pub fn answer_line(line: &[u8], limits: Limits, out: &mut Vec<u8>) {
    if line.len() > limits.max_line {
        refuse_too_long(line, limits.max_line, out);
    } else {
        number::answer(line, limits.max_digits, out);
    }
}

fn refuse_too_long(line: &[u8], max_line: usize, out: &mut Vec<u8>) {
    out.extend_from_slice(b"ERR ");
    number::describe_too_long(line.trim_ascii_start(), max_line, out);
    out.push(b'\n');
}

async fn write_with_timeout<S: AsyncWrite + Unpin>(
    stream: &mut S,
    bytes: &[u8],
    timeout: Duration,
) -> io::Result<()> {
    match tokio::time::timeout(timeout, stream.write_all(bytes)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the client read no answers for {timeout:?}"),
        )),
    }
}
