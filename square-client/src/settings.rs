//! square-client's settings: which server to ask and how long to wait for
//! it, resolved like every program's (defaults < `--config` file <
//! `SQUARE_CLIENT_*` environment < flags).

use common::settings::{LogSettings, Seconds};
use serde::{Deserialize, Serialize};

/// The square server's address: `HOST:PORT`, resolved when connecting.
pub use common::settings::HostPort as ServerAddr;

/// Everything square-client can be configured with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// The square server, `HOST:PORT`.
    pub server: ServerAddr,
    /// How long to wait for the server to accept the connection.
    pub connect_timeout: Seconds,
    /// Log level and format.
    #[serde(flatten)]
    pub log: LogSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            server: "127.0.0.1:2345".parse().expect("a valid default"),
            connect_timeout: Seconds::from_secs(5),
            log: LogSettings::default(),
        }
    }
}
