//! Connecting to a target: the host name is resolved at every connect (the
//! target may move), each address is tried in turn within one connect
//! timeout, and the socket gets `TCP_NODELAY` and keepalive. A probe that
//! only wanted to know the target accepts hangs up politely.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use common::settings::HostPort;
use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Why a target could not be reached, in words for the access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreachable(pub String);

/// Connects to `target` within `timeout`.
pub async fn connect(
    target: &HostPort,
    timeout: Duration,
) -> Result<(TcpStream, SocketAddr), Unreachable> {
    let deadline = deadline_after(timeout);
    let addrs: Vec<SocketAddr> = match tokio::time::timeout_at(
        deadline,
        tokio::net::lookup_host((target.host.as_str(), target.port)),
    )
    .await
    {
        Err(_) => {
            return Err(Unreachable(format!(
                "{} did not resolve within {timeout:?}",
                target.host
            )))
        }
        Ok(Err(e)) => {
            return Err(Unreachable(format!(
                "{} does not resolve: {e}",
                target.host
            )))
        }
        Ok(Ok(addrs)) => addrs.collect(),
    };
    if addrs.is_empty() {
        return Err(Unreachable(format!(
            "{} resolves to no address",
            target.host
        )));
    }
    let mut last = None;
    for addr in &addrs {
        match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => return Ok((stream, *addr)),
            Ok(Err(e)) => last = Some(format!("{addr}: {}", describe(&e))),
            Err(_) => {
                last = Some(format!("{addr}: no answer within {timeout:?}"));
                break;
            }
        }
    }
    Err(Unreachable(
        last.unwrap_or_else(|| format!("{target}: no address tried")),
    ))
}

/// The instant `after` from now; a duration beyond the clock's range (a
/// timeout written as "never") gives a far future instead of a panic.
fn deadline_after(after: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(after).unwrap_or_else(|| now + FAR_FUTURE)
}

/// Later than any wait needs: about 30 years, as tokio's own timers use.
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

fn describe(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::TimedOut => "timed out".into(),
        _ => e.to_string(),
    }
}

/// Sets what every relayed socket needs: no Nagle delay (interactive
/// protocols such as PostgreSQL's would wait for delayed ACKs) and, when
/// configured, keepalive probes so dead peers are found.
pub fn tune(stream: &TcpStream, keepalive: Option<Duration>) {
    let _ = stream.set_nodelay(true);
    if let Some(time) = keepalive {
        let probes = TcpKeepalive::new()
            .with_time(time)
            .with_interval(Duration::from_secs(10).min(time));
        let _ = SockRef::from(stream).set_tcp_keepalive(&probes);
    }
}

/// Most bytes [`close_politely`] reads before it stops listening.
const CLOSE_READ_MAX: usize = 64 * 1024;

/// Ends a probe's connection (a health check, a readiness wait) the way an
/// ordinary client does: send our end of stream, read and discard until the
/// server closes (at most `within` and 64 KiB), then close. Dropping the
/// socket at once would make a server that greets its clients write into a
/// closed connection and get a reset, which it would log as an error.
pub async fn close_politely(mut stream: TcpStream, within: Duration) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let mut buf = [0u8; 1024];
    let mut left = CLOSE_READ_MAX;
    let _ = tokio::time::timeout(within, async {
        while left > 0 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}
