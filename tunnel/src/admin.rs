//! The admin endpoint: `GET /metrics` (Prometheus text exposition) and
//! `GET /healthz`, over plain HTTP/1.1 with one request per connection.
//!
//! It is off unless an `admin` address is configured; bind it to loopback
//! or an internal address, or limit it with `admin_allow`/`admin_deny`. It
//! runs on the shared accept loop (at most 64 connections, drained on
//! shutdown), and requests are bounded (8 KiB head, 5 s) so a slow or
//! hostile client costs nothing but its own connection.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use common::serve::{Conn, ConnectionCap, Handler, ServeOptions, Stream};
use common::settings::{AccessList, AccessRules};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::metrics::Metrics;
use crate::settings::Settings;

/// Most admin connections at once: scrapers and probes, not crowds.
const MAX_CONNECTIONS: usize = 64;
/// How long one request may take, head and answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The admin endpoint, served by the shared accept loop like every other
/// endpoint: with a cap, its own access list and a drain.
pub struct Admin {
    metrics: Arc<Metrics>,
    accepting: Box<dyn Fn() -> bool + Send + Sync>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").finish_non_exhaustive()
    }
}

impl Admin {
    /// Serves `metrics`; `/healthz` answers 503 when `accepting` says the
    /// tunnel stopped accepting connections on some route.
    pub fn new(
        metrics: Arc<Metrics>,
        accepting: impl Fn() -> bool + Send + Sync + 'static,
    ) -> Self {
        Admin {
            metrics,
            accepting: Box::new(accepting),
        }
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
        }
    }
}

impl<S: Stream> Handler<S> for Admin {
    async fn handle(self: Arc<Self>, stream: S, _conn: Conn) -> anyhow::Result<()> {
        tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &self))
            .await
            .with_context(|| format!("admin request not answered within {REQUEST_TIMEOUT:?}"))?
            .context("admin request")
    }
}

async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    admin: &Admin,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > 8192 {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "request too large\n",
                true,
            )
            .await;
        }
    }
    let head = String::from_utf8_lossy(&head);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let body_wanted = method != "HEAD";
    let path = path.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            respond(
                &mut stream,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                &admin.metrics.render(),
                body_wanted,
            )
            .await
        }
        ("GET" | "HEAD", "/healthz") if (admin.accepting)() => {
            respond(&mut stream, "200 OK", "text/plain", "ok\n", body_wanted).await
        }
        ("GET" | "HEAD", "/healthz") => {
            respond(
                &mut stream,
                "503 Service Unavailable",
                "text/plain",
                "not accepting connections on every route; see the log\n",
                body_wanted,
            )
            .await
        }
        ("GET" | "HEAD", _) => {
            respond(
                &mut stream,
                "404 Not Found",
                "text/plain",
                "not found; try /metrics or /healthz\n",
                body_wanted,
            )
            .await
        }
        _ => {
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
