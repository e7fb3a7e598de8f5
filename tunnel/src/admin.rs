//! The admin endpoint: `GET /metrics` (Prometheus text exposition),
//! `GET /healthz` (liveness: the process serves, every accept loop runs)
//! and `GET /readyz` (readiness: every route can reach a live target, and
//! the tunnel is not shutting down; see [`crate::ready`]), over plain
//! HTTP/1.1 with one request per connection.
//!
//! It is off unless an `admin` address is configured; bind it to loopback
//! or an internal address, or limit it with `admin_allow`/`admin_deny`. It
//! runs on the shared accept loop (at most 64 connections, drained on
//! shutdown), and requests are bounded (8 KiB head, 5 s) so a slow or
//! hostile client costs nothing but its own connection.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use common::serve::{Accepted, ConnectionCap, Handler, ServeOptions, Stream};
use common::settings::{AccessList, AccessRules};
use common::signal::Shutdown;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::ready::ANSWER_WITHIN;
use crate::settings::Settings;
use crate::Tunnel;

/// Most admin connections at once: scrapers and probes, not crowds.
const MAX_CONNECTIONS: usize = 64;
/// How long one request may take, head and answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The admin endpoint, served by the shared accept loop like every other
/// endpoint: with a cap, its own access list and a drain.
pub struct Admin {
    tunnel: Arc<Tunnel>,
    shutdown: Shutdown,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").finish_non_exhaustive()
    }
}

impl Admin {
    /// Serves `tunnel`'s metrics, health and readiness; `/readyz` also
    /// answers 503 once `shutdown` has begun, so a draining instance
    /// leaves its Service.
    pub fn new(tunnel: Arc<Tunnel>, shutdown: Shutdown) -> Self {
        Admin { tunnel, shutdown }
    }

    /// How the admin endpoint's accept loop runs under `settings`.
    pub fn options(&self, settings: &Settings) -> ServeOptions {
        ServeOptions {
            cap: ConnectionCap::new(MAX_CONNECTIONS),
            access: AccessRules::from(AccessList {
                allow: settings.admin_allow.clone(),
                deny: settings.admin_deny.clone(),
            }),
            idle_timeout: REQUEST_TIMEOUT,
            grace: Duration::from_secs(1),
            accept_proxy: Default::default(),
            header_timeout: REQUEST_TIMEOUT,
            per_source: None,
            callers: None,
        }
    }
}

impl<S: Stream> Handler<S> for Admin {
    async fn handle(self: Arc<Self>, stream: S, _conn: Accepted) -> anyhow::Result<()> {
        tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &self))
            .await
            .with_context(|| format!("admin request not answered within {REQUEST_TIMEOUT:?}"))?
            .context("admin request")
    }
}

/// The most bytes a request head may have.
pub const MAX_HEAD: usize = 8192;

/// What the bytes read so far of a request head call for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// The head has not ended yet: read more.
    Incomplete,
    /// More than [`MAX_HEAD`] bytes: refuse with 431.
    TooLarge,
    /// A complete head, asking for this.
    Complete(Request),
}

/// What a complete request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// `GET /metrics`; `body` is false for `HEAD`.
    Metrics {
        /// Whether the body is wanted (not for `HEAD`).
        body: bool,
    },
    /// `GET /healthz`.
    Health {
        /// Whether the body is wanted (not for `HEAD`).
        body: bool,
    },
    /// `GET /readyz`.
    Ready {
        /// Whether the body is wanted (not for `HEAD`).
        body: bool,
    },
    /// `GET` of any other path: 404.
    NotFound {
        /// Whether the body is wanted (not for `HEAD`).
        body: bool,
    },
    /// Any method but `GET` and `HEAD`: 405.
    MethodNotAllowed,
}

/// Reads the bytes a client has sent so far (the whole buffer, from the
/// start of the connection) as a request head: only the request line
/// matters; the head ends at an empty line (CR LF or LF).
pub fn parse_head(head: &[u8]) -> Head {
    if head.len() > MAX_HEAD {
        return Head::TooLarge;
    }
    if !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        return Head::Incomplete;
    }
    let head = String::from_utf8_lossy(head);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let body = method != "HEAD";
    let path = path.split('?').next().unwrap_or("");
    Head::Complete(match (method, path) {
        ("GET" | "HEAD", "/metrics") => Request::Metrics { body },
        ("GET" | "HEAD", "/healthz") => Request::Health { body },
        ("GET" | "HEAD", "/readyz") => Request::Ready { body },
        ("GET" | "HEAD", _) => Request::NotFound { body },
        _ => Request::MethodNotAllowed,
    })
}

async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    admin: &Admin,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let request = loop {
        match parse_head(&head) {
            Head::Complete(request) => break request,
            Head::TooLarge => {
                return respond(
                    &mut stream,
                    "431 Request Header Fields Too Large",
                    "text/plain",
                    "request too large\n",
                    true,
                )
                .await;
            }
            Head::Incomplete => {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    return Ok(());
                }
                head.extend_from_slice(&buf[..n]);
            }
        }
    };
    match request {
        Request::Metrics { body } => {
            respond(
                &mut stream,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                &admin.tunnel.metrics().render(),
                body,
            )
            .await
        }
        Request::Health { body } if admin.tunnel.accepting() => {
            respond(&mut stream, "200 OK", "text/plain", "ok\n", body).await
        }
        Request::Health { body } => {
            respond(
                &mut stream,
                "503 Service Unavailable",
                "text/plain",
                "not accepting connections on every route; see the log\n",
                body,
            )
            .await
        }
        Request::Ready { body } => {
            let mut readiness = admin
                .tunnel
                .readiness(tokio::time::Instant::now() + ANSWER_WITHIN)
                .await;
            readiness.stopping |= admin.shutdown.begun().is_cancelled();
            let status = if readiness.is_ready() {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            respond(&mut stream, status, "text/plain", &readiness.body(), body).await
        }
        Request::NotFound { body } => {
            respond(
                &mut stream,
                "404 Not Found",
                "text/plain",
                "not found; try /metrics, /healthz or /readyz\n",
                body,
            )
            .await
        }
        Request::MethodNotAllowed => {
            respond(
                &mut stream,
                "405 Method Not Allowed",
                "text/plain",
                "only GET and HEAD\n",
                true,
            )
            .await
        }
    }
}

async fn respond<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: &str,
    kind: &str,
    body: &str,
    with_body: bool,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if with_body {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_read_by_their_request_line() {
        assert_eq!(parse_head(b""), Head::Incomplete);
        assert_eq!(parse_head(b"GET /metrics HTTP/1.1\r\n"), Head::Incomplete);
        assert_eq!(
            parse_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Head::Complete(Request::Metrics { body: true })
        );
        assert_eq!(
            parse_head(b"HEAD /healthz?probe=1 HTTP/1.0\n\n"),
            Head::Complete(Request::Health { body: false })
        );
        assert_eq!(
            parse_head(b"GET /readyz HTTP/1.1\r\n\r\n"),
            Head::Complete(Request::Ready { body: true })
        );
        assert_eq!(
            parse_head(b"HEAD /readyz HTTP/1.1\r\n\r\n"),
            Head::Complete(Request::Ready { body: false })
        );
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\n\r\n"),
            Head::Complete(Request::NotFound { body: true })
        );
        assert_eq!(
            parse_head(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Head::Complete(Request::MethodNotAllowed)
        );
        assert_eq!(
            parse_head(b"\xff\xfe /healthz\n\n"),
            Head::Complete(Request::MethodNotAllowed)
        );
        let mut big = b"GET /metrics HTTP/1.1\r\n".to_vec();
        big.resize(MAX_HEAD + 1, b'a');
        assert_eq!(parse_head(&big), Head::TooLarge);
        big.truncate(MAX_HEAD - 4);
        big.extend_from_slice(b"\r\n\r\n");
        assert_eq!(
            parse_head(&big),
            Head::Complete(Request::Metrics { body: true })
        );
    }
}
