//! The square service (the original "math service"): one number per line
//! in, its exact square per line out, in order and pipelined.
//!
//! [`run`] serves a bound listener with the shared accept loop of
//! [`common::serve`]; [`protocol`] is one connection, [`number`] the
//! arithmetic. The binary only parses arguments and configuration, binds
//! [`Settings::listen`] and calls [`run`].

pub mod number;
pub mod protocol;

use std::future::Future;
use std::sync::Arc;

use common::serve::{serve, Conn, Handler, ServeOptions, Stream};
use common::settings::{ListenAddr, LogSettings, ServeSettings};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tracing::{info, warn};

pub use protocol::Limits;

/// The program's name: configuration prefix `SQUARE_SERVER_`.
pub const PROGRAM: &str = "square-server";
/// The name of the endpoint clients reach.
pub const ENDPOINT: &str = "SquareEndpoint";

/// Everything square-server can be configured with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Where `SquareEndpoint` listens.
    pub listen: ListenAddr,
    /// Most digits in a number (before and after the point together).
    pub max_digits: usize,
    /// Most bytes in a request line; longer lines are refused. Keep it above
    /// `max_digits` plus room for a sign, a point and whitespace.
    pub max_line: usize,
    /// This instance's name in logs (set per instance by the deployment).
    pub instance: String,
    /// Connection cap, access lists, timeouts.
    #[serde(flatten)]
    pub serve: ServeSettings,
    /// Log level and format.
    #[serde(flatten)]
    pub log: LogSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: ListenAddr(([0, 0, 0, 0], 2345).into()),
            max_digits: 10_000,
            max_line: 16 * 1024,
            instance: "square-server_IN_0".to_string(),
            serve: ServeSettings::default(),
            log: LogSettings::default(),
        }
    }
}

impl Settings {
    /// The request limits these settings give.
    pub fn limits(&self) -> Limits {
        Limits {
            max_digits: self.max_digits,
            max_line: self.max_line,
        }
    }
}

/// The square service as a handler of the shared accept loop.
#[derive(Debug, Clone)]
pub struct SquareService {
    limits: Limits,
}

impl SquareService {
    /// A service answering within `limits`.
    pub fn new(limits: Limits) -> Self {
        SquareService { limits }
    }
}

impl<S: Stream> Handler<S> for SquareService {
    async fn handle(self: Arc<Self>, stream: S, conn: Conn) -> anyhow::Result<()> {
        protocol::serve_connection(stream, self.limits, conn.idle_timeout, conn.draining).await?;
        Ok(())
    }
}

/// Serves the square protocol on `listener` until `shutdown` completes, then
/// lets live connections finish within the grace period.
pub async fn run(listener: TcpListener, settings: Settings, shutdown: impl Future<Output = ()>) {
    if let Ok(addr) = listener.local_addr() {
        info!(
            endpoint = ENDPOINT,
            %addr,
            instance = %settings.instance,
            max_digits = settings.max_digits,
            "listening"
        );
    }
    if settings.max_line < settings.max_digits + 2 {
        // A sign and a point must fit too, or the longest numbers allowed
        // would be refused as too long.
        warn!(
            max_line = settings.max_line,
            max_digits = settings.max_digits,
            "max_line leaves no room for numbers of max_digits digits; raise max_line"
        );
    }
    let service = Arc::new(SquareService::new(settings.limits()));
    serve(
        listener,
        ServeOptions::from(&settings.serve),
        service,
        shutdown,
    )
    .await;
}
