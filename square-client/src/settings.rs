//! square-client's settings: which server to ask, how long to wait for
//! it and whether to talk TLS to it, resolved like every program's
//! (defaults < `--config` file < `SQUARE_CLIENT_*` environment < flags).

use std::path::PathBuf;

use common::config::{ConfigError, Origin};
use common::settings::{LogSettings, Period};
use common::tls::client::Connector;
use common::tls::ClientFiles;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};

/// The square server's address: `HOST:PORT`, resolved when connecting.
pub use common::discovery::Destination as ServerAddr;
use common::settings::HostPort;

/// Everything square-client can be configured with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// The square server, `HOST:PORT`, or `role/Endpoint` looked up in
    /// `topology`.
    pub server: ServerAddr,
    /// The topology file in which a server named `role/Endpoint` is looked
    /// up (the development fabric gives its path to its instances).
    pub topology: Option<PathBuf>,
    /// How long to wait for the server to accept the connection, and for
    /// the TLS handshake with TLS (more than 0).
    #[serde(deserialize_with = "some_time")]
    pub connect_timeout: Period,
    /// How long to wait for the server's next answer while requests are
    /// unanswered (more than 0).
    #[serde(deserialize_with = "some_time")]
    pub reply_timeout: Period,
    /// Talk TLS (1.2 or 1.3) to the server. Also on when any of `ca`,
    /// `cert`, `key` or `server_name` is set, which are only for TLS.
    pub tls: bool,
    /// The CAs that may sign the server's certificate (PEM bundle); the
    /// system's trusted CAs when unset.
    pub ca: Option<PathBuf>,
    /// A client certificate chain for servers that ask for one (mutual
    /// TLS; PEM, with `key`).
    pub cert: Option<PathBuf>,
    /// The private key of `cert` (PEM).
    pub key: Option<PathBuf>,
    /// The name the server's certificate must carry (and the SNI sent);
    /// the host of `server` when unset.
    pub server_name: Option<String>,
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
            tls: false,
            ca: None,
            cert: None,
            key: None,
            server_name: None,
            topology: None,
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

/// The settings that are only for TLS, by name.
const TLS_ONLY: [&str; 4] = ["ca", "cert", "key", "server_name"];

impl Settings {
    /// The TLS-only settings that are set.
    fn tls_settings(&self) -> Vec<&'static str> {
        let set = [
            self.ca.is_some(),
            self.cert.is_some(),
            self.key.is_some(),
            self.server_name.is_some(),
        ];
        TLS_ONLY
            .into_iter()
            .zip(set)
            .filter_map(|(name, set)| set.then_some(name))
            .collect()
    }

    /// Whether to talk TLS: `tls`, or any TLS-only setting given.
    pub fn uses_tls(&self) -> bool {
        self.tls || !self.tls_settings().is_empty()
    }

    /// The address to connect to: `server` as written, or the balanced
    /// address of the peer it names, from the topology.
    pub fn server_address(&self) -> Result<HostPort, String> {
        match &self.server {
            ServerAddr::Address(a) => Ok(a.clone()),
            ServerAddr::Peer(peer) => {
                let Some(file) = &self.topology else {
                    return Err(format!(
                        "--server {peer} names a peer, and no topology is given to look it up in; pass --topology FILE (or SQUARE_CLIENT_TOPOLOGY; deploy run prints the path of its topology), or give HOST:PORT"
                    ));
                };
                common::discovery::Topology::read(file)
                    .and_then(|t| t.endpoint(peer))
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// The TLS connector the settings ask for, its files read: `None` for
    /// plain TCP. A file that cannot be used or a bad server name is a
    /// problem at the key that names it; a client certificate without its
    /// key (or the other way round), at the one that is set.
    pub fn connector(&self) -> Result<Option<Connector>, Box<ConfigError>> {
        if !self.uses_tls() {
            return Ok(None);
        }
        let problem = |key: &str, message: String| {
            Box::new(ConfigError {
                key: key.to_string(),
                value: None,
                origin: None,
                message,
            })
        };
        // At the one that is set, whose origin helps most; naming the other.
        match (&self.cert, &self.key) {
            (Some(_), None) => return Err(problem(
                "cert",
                "is set, but key is not: a client certificate needs its private key; set key too"
                    .into(),
            )),
            (None, Some(_)) => return Err(problem(
                "key",
                "is set, but cert is not: a private key needs its client certificate; set cert too"
                    .into(),
            )),
            _ => {}
        }
        Connector::new(&ClientFiles {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            server_name: self.server_name.clone(),
        })
        .map(Some)
        .map_err(|e| {
            let message = if e.setting == "ca" && self.ca.is_none() {
                // The system's CAs, not a file.
                format!(
                    "is not set, and {} with {} or {}",
                    e.problem,
                    common::config::flag_name("ca"),
                    common::config::env_var(crate::cli::PROGRAM, "ca")
                )
            } else {
                format!("{}: {}", e.file.display(), e.problem)
            };
            problem(&e.setting, message)
        })
    }
}

impl common::config::ProgramSettings for Settings {
    fn problems(&self, origin: &dyn Fn(&str) -> Option<Origin>) -> Vec<ConfigError> {
        let given = self.tls_settings();
        let said_no = !self.tls && !matches!(origin("tls"), None | Some(Origin::Default));
        if said_no && !given.is_empty() {
            let (names, are) = listed(&given);
            return vec![ConfigError {
                key: "tls".to_string(),
                value: Some("false".to_string()),
                origin: None,
                message: format!(
                    "turns TLS off, but {names} {are} set, which only TLS uses: set tls to true, \
                     or leave out {names}"
                ),
            }];
        }
        self.connector().err().map(|e| *e).into_iter().collect()
    }

    fn effective(&self, key: &str) -> Option<(String, String)> {
        let given = self.tls_settings();
        (key == "tls" && !self.tls && !given.is_empty()).then(|| {
            let (names, are) = listed(&given);
            ("true".to_string(), format!("on, as {names} {are} set"))
        })
    }
}

/// `a`, `a and b` or `a, b and c`, and the verb that goes with it.
fn listed(names: &[&str]) -> (String, &'static str) {
    match names {
        [rest @ .., last] if !rest.is_empty() => (format!("{} and {last}", rest.join(", ")), "are"),
        _ => (names.join(""), "is"),
    }
}
