//! Setting types every program shares: durations, lists (see [`List`]),
//! networks and access lists, listen addresses, and the serving and
//! telemetry settings.
//!
//! Each type reads the forms a person would write in YAML, an environment
//! variable or a flag (`5m` or `300` for a duration, `10.0.0.0/8, ::1` for a
//! list) and says what it expected when it cannot.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

mod access;
mod list;

pub use access::{AccessList, AccessRules, AddressList, AddressPattern, Cidr, CidrList, Wildcard};
use list::text_serde;
pub use list::{deserialize_text, List, TextValue};

/// A length of time in a setting, written as `300ms`, `30s`, `5m`, `1h 30m`,
/// or a whole number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Period(pub Duration);

impl Period {
    /// The duration of `secs` seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Period(Duration::from_secs(secs))
    }
    /// The duration of `ms` milliseconds.
    pub const fn from_millis(ms: u64) -> Self {
        Period(Duration::from_millis(ms))
    }
}

/// The longest duration a setting takes: a year. Longer is no policy
/// anyone means, and a clock moved by much more overflows.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

fn within_bounds(d: Duration) -> Result<Period, String> {
    if d > MAX_DURATION {
        Err("longer than 365 days, the longest duration allowed; write a shorter one such as 1h or 30d".into())
    } else {
        Ok(Period(d))
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl FromStr for Period {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(secs) = s.parse::<u64>() {
            return within_bounds(Duration::from_secs(secs));
        }
        humantime::parse_duration(s)
            .map_err(|e| format!("not a duration ({e}); write it like 30s, 5m, 1h or 250ms"))
            .and_then(within_bounds)
    }
}

impl Serialize for Period {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Period {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Period;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as 30s, 5m or 1h")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Period, E> {
                within_bounds(Duration::from_secs(v)).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Period, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom("a duration cannot be negative"))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Period, E> {
                Duration::try_from_secs_f64(v)
                    .map_err(|_| E::custom("a duration must be a positive number of seconds"))
                    .and_then(|d| within_bounds(d).map_err(E::custom))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Period, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// For `#[serde(deserialize_with)]` on a duration that cannot be zero (a
/// timeout of zero would close every connection at once; an interval of
/// zero would spin).
pub fn nonzero_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Period, D::Error> {
    let value = Period::deserialize(d)?;
    if value.0.is_zero() {
        return Err(de::Error::custom(
            "must be longer than 0; write a duration such as 30s or 5m",
        ));
    }
    Ok(value)
}

/// [`nonzero_duration`] for a setting that may be left out.
pub fn nonzero_duration_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Period>, D::Error> {
    Option::<Period>::deserialize(d)?
        .map(|value| {
            if value.0.is_zero() {
                Err(de::Error::custom(
                    "must be longer than 0; write a duration such as 30s or 5m",
                ))
            } else {
                Ok(value)
            }
        })
        .transpose()
}

/// For `#[serde(deserialize_with)]` on a count that must be at least 1 (a
/// connection cap of 0 would accept no one, ever).
pub fn at_least_one<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + PartialEq + Default,
{
    let value = T::deserialize(d)?;
    if value == T::default() {
        return Err(de::Error::custom("must be at least 1"));
    }
    Ok(value)
}

/// [`at_least_one`] for a setting that may be left out.
pub fn at_least_one_opt<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + PartialEq + Default,
{
    match Option::<T>::deserialize(d)? {
        Some(value) if value == T::default() => Err(de::Error::custom("must be at least 1")),
        other => Ok(other),
    }
}

/// An address to listen on, `IP:PORT` (`0.0.0.0:1234`, `[::]:1234`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenAddr(pub SocketAddr);

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(ListenAddr(addr));
        }
        if let Some(port) = s
            .strip_prefix(':')
            .or(Some(s))
            .and_then(|p| p.parse::<u16>().ok())
        {
            return Ok(ListenAddr(SocketAddr::from(([0, 0, 0, 0], port))));
        }
        if let Some((host, port)) = s.rsplit_once(':') {
            if host == "localhost" {
                if let Ok(port) = port.parse::<u16>() {
                    return Ok(ListenAddr(SocketAddr::from(([127, 0, 0, 1], port))));
                }
            }
            if port.parse::<u16>().is_err() {
                return Err(format!(
                    "{port:?} is not a port number (0 to 65535); write IP:PORT such as 0.0.0.0:1234"
                ));
            }
        }
        Err(
            "not a listen address; write IP:PORT such as 0.0.0.0:1234, [::]:1234 or 127.0.0.1:1234"
                .to_string(),
        )
    }
}

/// A peer to connect to, `HOST:PORT`: a host name or address and a port.
/// A name is kept as written and resolved at each connect, so a peer that
/// moves is followed. IPv6 addresses are written in brackets (`[::1]:5432`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port, 1 to 65535.
    pub port: u16,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for HostPort {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let usage = "write HOST:PORT such as db.internal:5432, 127.0.0.1:2345 or [::1]:2345";
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err(format!("{s:?} has no port; {usage}"));
        };
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{port:?} is not a port number (1 to 65535); {usage}"))?;
        let bracketed = host.starts_with('[') && host.ends_with(']');
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if bare.is_empty()
            || (host.contains(':') && !bracketed)
            || bare.contains(|c: char| c.is_whitespace() || c == '/' || c == '[' || c == ']')
        {
            return Err(format!("{host:?} is not a host name or address; {usage}"));
        }
        Ok(HostPort {
            host: bare.to_string(),
            port,
        })
    }
}

text_serde!(
    crate::tls::names::NamePattern: "a name: client.example.com, *.example.com or a URI",
    ListenAddr: "a listen address IP:PORT",
    HostPort: "HOST:PORT",
    crate::discovery::Destination: "HOST:PORT, or a peer's ROLE/Endpoint",
    crate::proxy::Version: "a PROXY protocol version, v1 or v2",
    crate::fabric::RoleName: "a role name",
);

/// How a program serves connections: the part of every program's settings
/// the shared accept loop reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServeSettings {
    /// Most connections served at once; more wait in the listen backlog.
    #[serde(deserialize_with = "at_least_one")]
    pub max_connections: usize,
    /// Client networks allowed in (empty: everyone).
    pub allow: CidrList,
    /// Client networks refused.
    pub deny: CidrList,
    /// Balancers trusted to send a PROXY protocol header (v1 or v2): a
    /// connection from these networks must start with one, and the client
    /// it names is the client for access lists and logs. From anywhere
    /// else a header is refused.
    pub accept_proxy: CidrList,
    /// Where the other roles' instances and endpoints are listed (a
    /// topology file, see [`crate::discovery`]; the development fabric
    /// sets it for every instance).
    pub topology: Option<std::path::PathBuf>,
    /// Only instances of these roles may connect (the development fabric
    /// sets it for an internal endpoint's `allow_from`; it needs the
    /// topology, see [`crate::fabric`]).
    pub allow_roles: List<crate::fabric::RoleName>,
    /// A connection with no traffic for this long is closed.
    #[serde(deserialize_with = "nonzero_duration")]
    pub idle_timeout: Period,
    /// On SIGINT/SIGTERM, how long live connections may take to finish.
    pub shutdown_grace: Period,
    /// With `tls_key`: serve TLS 1.2/1.3 with this certificate chain (PEM).
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key of `tls_cert` (PEM).
    pub tls_key: Option<std::path::PathBuf>,
    /// Clients must present a certificate that chains to this CA bundle
    /// (PEM): mutual TLS.
    pub tls_client_ca: Option<std::path::PathBuf>,
    /// With `tls_client_ca`: only client certificates with one of these
    /// names (DNS or URI subject alternative name, or common name; exact
    /// or `*.` for one label) get in.
    pub tls_client_names: List<crate::tls::names::NamePattern>,
    /// Limits on each client address or prefix: connections at once and
    /// new connections over time (off when unset).
    pub per_source: Option<crate::limits::PerSourceSettings>,
}

impl Default for ServeSettings {
    fn default() -> Self {
        ServeSettings {
            max_connections: 10_000,
            allow: CidrList::default(),
            deny: CidrList::default(),
            accept_proxy: CidrList::default(),
            topology: None,
            allow_roles: List::default(),
            idle_timeout: Period::from_secs(300),
            shutdown_grace: Period::from_secs(10),
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            tls_client_names: List::default(),
            per_source: None,
        }
    }
}

impl ServeSettings {
    /// The TLS configuration the settings ask for, read from its files:
    /// `None` for plain TCP. A missing half, or a file that cannot be
    /// used, is a problem at the key that names it.
    pub fn tls(
        &self,
    ) -> Result<Option<std::sync::Arc<crate::tls::ServerTls>>, Box<crate::config::ConfigError>>
    {
        let problem = |key: &str, message: String| {
            Box::new(crate::config::ConfigError {
                key: key.to_string(),
                value: None,
                origin: None,
                message,
            })
        };
        let (cert, key) =
            match (&self.tls_cert, &self.tls_key) {
                (None, None) if self.tls_client_ca.is_some() => return Err(problem(
                    "tls_client_ca",
                    "asks for client certificates, which need TLS: set tls_cert and tls_key too"
                        .into(),
                )),
                (None, None) if !self.tls_client_names.0.is_empty() => return Err(problem(
                    "tls_client_names",
                    "names the clients let in, which needs TLS: set tls_cert, tls_key and tls_client_ca too"
                        .into(),
                )),
                (None, None) => return Ok(None),
                (Some(_), None) => {
                    return Err(problem(
                        "tls_key",
                        "is missing: tls_cert needs its private key in tls_key".into(),
                    ))
                }
                (None, Some(_)) => {
                    return Err(problem(
                        "tls_cert",
                        "is missing: tls_key needs its certificate chain in tls_cert".into(),
                    ))
                }
                (Some(cert), Some(key)) => (cert, key),
            };
        if !self.tls_client_names.0.is_empty() && self.tls_client_ca.is_none() {
            return Err(problem(
                "tls_client_names",
                "needs tls_client_ca: names are checked on client certificates, which are asked for only with a client CA".into(),
            ));
        }
        crate::tls::ServerTls::load(
            crate::tls::ServerFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca.clone(),
                client_names: self
                    .tls_client_names
                    .0
                    .iter()
                    .map(|n| n.0.clone())
                    .collect(),
            },
            std::sync::Arc::default(),
        )
        .map(|tls| Some(std::sync::Arc::new(tls)))
        .map_err(|e| {
            let e = e.prefixed("tls_");
            problem(&e.setting, format!("{}: {}", e.file.display(), e.problem))
        })
    }

    /// The allow and deny lists as one access list.
    pub fn access(&self) -> AccessList {
        AccessList {
            allow: self.allow.clone().into(),
            deny: self.deny.clone().into(),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Logging settings every program has.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LogSettings {
    /// A tracing filter (`info`, `debug`, `tunnel=debug,info`); when unset,
    /// `RUST_LOG`, then `info`.
    pub log_level: Option<String>,
    /// `text` or `json`.
    pub log_format: LogFormat,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_the_forms_people_write() {
        assert_eq!("30".parse::<Period>().unwrap(), Period::from_secs(30));
        assert_eq!("5m".parse::<Period>().unwrap(), Period::from_secs(300));
        assert_eq!("250ms".parse::<Period>().unwrap(), Period::from_millis(250));
        assert!("soon".parse::<Period>().unwrap_err().contains("30s"));
    }

    #[test]
    fn durations_past_a_year_are_refused() {
        assert!("365d".parse::<Period>().is_ok());
        let err = "18446744073709551615".parse::<Period>().unwrap_err();
        assert!(err.contains("longest"), "{err}");
        assert!("400d".parse::<Period>().is_err());
    }

    #[test]
    fn host_and_port() {
        let t: HostPort = "db.internal:5432".parse().unwrap();
        assert_eq!((t.host.as_str(), t.port), ("db.internal", 5432));
        let v6: HostPort = "[::1]:2345".parse().unwrap();
        assert_eq!(v6.host, "::1");
        assert_eq!(v6.to_string(), "[::1]:2345");
        assert!("db.internal"
            .parse::<HostPort>()
            .unwrap_err()
            .contains("no port"));
        assert!("db:0"
            .parse::<HostPort>()
            .unwrap_err()
            .contains("port number"));
        assert!("::1:5432"
            .parse::<HostPort>()
            .unwrap_err()
            .contains("not a host"));
        assert!(":5432".parse::<HostPort>().is_err());
    }

    #[test]
    fn listen_addresses() {
        assert_eq!("0.0.0.0:1234".parse::<ListenAddr>().unwrap().0.port(), 1234);
        assert_eq!("[::]:80".parse::<ListenAddr>().unwrap().0.port(), 80);
        assert_eq!(
            ":99".parse::<ListenAddr>().unwrap().to_string(),
            "0.0.0.0:99"
        );
        assert!("1.2.3.4:99999"
            .parse::<ListenAddr>()
            .unwrap_err()
            .contains("port"));
        assert!("nonsense".parse::<ListenAddr>().is_err());
    }
}
