//! square-client's settings: which server to ask and how long to wait for
//! it, resolved like every program's (defaults < `--config` file <
//! `SQUARE_CLIENT_*` environment < flags).

use common::settings::{LogSettings, Period};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};

/// The square server's address: `HOST:PORT`, resolved when connecting.
pub use common::settings::HostPort as ServerAddr;

/// Everything square-client can be configured with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// The square server, `HOST:PORT`.
    pub server: ServerAddr,
    /// How long to wait for the server to accept the connection (more
    /// than 0).
    #[serde(deserialize_with = "some_time")]
    pub connect_timeout: Period,
    /// How long to wait for the server's next answer while requests are
    /// unanswered (more than 0).
    #[serde(deserialize_with = "some_time")]
    pub reply_timeout: Period,
    /// Log level and format.
    #[serde(flatten)]
    pub log: LogSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            server: "127.0.0.1:2345".parse().expect("a valid default"),
            connect_timeout: Period::from_secs(5),
            reply_timeout: Period::from_secs(30),
            log: LogSettings::default(),
        }
    }
}

/// Reads a timeout, which must leave some time: with 0 every wait would
/// fail at once.
fn some_time<'de, D: Deserializer<'de>>(d: D) -> Result<Period, D::Error> {
    let timeout = Period::deserialize(d)?;
    if timeout.0.is_zero() {
        return Err(D::Error::custom(
            "must be more than 0, or nothing could ever arrive in time; write it like 5s or 500ms",
        ));
    }
    Ok(timeout)
}

impl common::config::ProgramSettings for Settings {}
