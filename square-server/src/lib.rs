//! The square service (the original "math service"): one number per line
//! in, its exact square per line out, in order and pipelined.
//!
//! [`run`] serves a bound listener with the shared accept loop of
//! [`common::serve`]; [`protocol`] is one connection, [`number`] the
//! arithmetic. The binary only parses arguments and configuration, binds
//! [`Settings::listen`] and calls [`run`].

pub mod buffer;
pub mod number;
pub mod protocol;

use std::future::Future;
use std::sync::Arc;

use common::config::ConfigError;
use common::serve::{Accepted, Handler, ServeOptions, Stream};
use common::settings::{ListenAddr, LogSettings, ServeSettings};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};
use tokio::net::TcpListener;
use tracing::info;

pub use protocol::{Compute, Limits};

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
    /// Most digits in a number (before and after the point together), from
    /// 1 to [`MAX_DIGITS`].
    #[serde(deserialize_with = "max_digits")]
    pub max_digits: usize,
    /// Most bytes in a request line, from 1 to [`MAX_LINE`]; longer lines
    /// are refused. It must leave room for `max_digits` digits, a sign and a
    /// point.
    #[serde(deserialize_with = "max_line")]
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

/// The largest `max_digits` accepted: a square of a million digits already
/// takes seconds and its answer is two megabytes.
pub const MAX_DIGITS: usize = 1_000_000;
/// The largest `max_line` accepted: a connection may hold a line this long,
/// so it bounds a connection's memory.
pub const MAX_LINE: usize = 1024 * 1024;

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

    /// Problems between settings that are each fine on their own (each is
    /// checked as it is read), with the key to change; the origin is left
    /// for the caller, which knows where values came from.
    pub fn problems(&self) -> Vec<ConfigError> {
        let mut problems = Vec::new();
        // A sign and a point must fit beside the digits, or the longest
        // numbers allowed would be refused as too long.
        let needed = self.max_digits.saturating_add(2);
        if self.max_line < needed {
            problems.push(ConfigError {
                key: "max_line".to_string(),
                value: Some(self.max_line.to_string()),
                origin: None,
                message: format!(
                    "a line of {} bytes cannot hold a number of max_digits = {} digits with its sign and point; \
                     set max_line to at least {needed}, or lower max_digits",
                    self.max_line, self.max_digits
                ),
            });
        }
        problems
    }
}

/// Reads a limit that must lie in `1..=most`; the reasons say why not 0
/// and why not more.
fn limit<'de, D: Deserializer<'de>>(
    d: D,
    most: usize,
    why_not_zero: &str,
    why_not_more: &str,
) -> Result<usize, D::Error> {
    let value = usize::deserialize(d)?;
    if value == 0 {
        return Err(D::Error::custom(format!(
            "must be at least 1: {why_not_zero}"
        )));
    }
    if value > most {
        return Err(D::Error::custom(format!(
            "must be at most {most}: {why_not_more}"
        )));
    }
    Ok(value)
}

fn max_digits<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    limit(
        d,
        MAX_DIGITS,
        "with 0 every number would be refused",
        "squaring a million digits already takes seconds and answers two megabytes",
    )
}

fn max_line<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    limit(
        d,
        MAX_LINE,
        "with 0 every request would be refused",
        "each connection may hold a line this long",
    )
}

/// The square service as a handler of the shared accept loop.
#[derive(Debug, Clone)]
pub struct SquareService {
    limits: Limits,
    compute: Compute,
}

impl SquareService {
    /// A service answering within `limits`, squaring big numbers one per
    /// processor at a time.
    pub fn new(limits: Limits) -> Self {
        SquareService {
            limits,
            compute: Compute::per_processor(),
        }
    }
}

impl<S: Stream> Handler<S> for SquareService {
    async fn handle(self: Arc<Self>, stream: S, conn: Accepted) -> anyhow::Result<()> {
        protocol::serve_connection(
            stream,
            self.limits,
            &self.compute,
            conn.idle_timeout,
            conn.draining,
        )
        .await?;
        Ok(())
    }
}

/// Serves the square protocol on `listener` until `shutdown` completes, then
/// lets live connections finish within the grace period. The binary refuses
/// settings with [`Settings::problems`] before it gets here.
pub async fn run(listener: TcpListener, settings: Settings, shutdown: impl Future<Output = ()>) {
    if let Ok(addr) = listener.local_addr() {
        info!(
            endpoint = ENDPOINT,
            %addr,
            instance = %settings.instance,
            max_digits = settings.max_digits,
            max_line = settings.max_line,
            "listening"
        );
    }
    let service = Arc::new(SquareService::new(settings.limits()));
    // Checked at start (a bad file is a configuration error there).
    let tls = match settings.serve.tls() {
        Ok(tls) => tls,
        Err(e) => {
            tracing::error!("cannot serve TLS: {e}");
            return;
        }
    };
    common::tls::serve(
        listener,
        ServeOptions::from(&settings.serve),
        tls,
        service,
        shutdown,
    )
    .await;
}

impl common::config::ProgramSettings for Settings {
    fn problems(
        &self,
        _origin: &dyn Fn(&str) -> Option<common::config::Origin>,
    ) -> Vec<ConfigError> {
        let mut problems = Settings::problems(self);
        problems.extend(self.serve.tls().err().map(|e| *e));
        problems
    }
}
