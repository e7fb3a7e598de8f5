//! The tunnel's settings: global defaults, and routes, each a name, the
//! addresses it listens on and the target it forwards to.
//!
//! The quick form (`--listen` and `--target`, or the original `TUNNEL_HOST`
//! and `TUNNEL_PORT` settings) makes one route named `default`; a
//! configuration file can hold many. Per-route values left out take the
//! global ones.
//!
//! A route may serve TLS (`tls`), speak TLS to its targets (`target_tls`),
//! and share its listen address with other routes, chosen by the server
//! name of the client's TLS hello (`sni`): see [`tls`].

use std::fmt;
use std::path::PathBuf;

use common::config::ConfigError;
use common::discovery::{Destination, Topology};
use common::limits::PerSourceSettings;
use common::proxy::Version as ProxyVersion;
use common::settings::{
    at_least_one, at_least_one_opt, nonzero_duration, nonzero_duration_opt, AccessList,
    AddressList, CidrList, List, ListenAddr, LogSettings, Period,
};

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

pub mod tls;

pub use tls::{ClientName, ServerName, SniName, TargetTls, TargetTlsSetting, TlsSettings};

/// The program's name: its configuration prefix is `TUNNEL_`.
pub const PROGRAM: &str = "tunnel";

/// A target to connect to: `HOST:PORT`, resolved at every connect.
pub use common::settings::HostPort as Target;

/// One or more listen addresses: a single string or a list.
pub type ListenList = List<ListenAddr>;

/// One or more targets: a `HOST:PORT` string (several separated by commas)
/// or a list.
pub type TargetList = List<Destination>;

/// Active health checks: `false`, `true` (the defaults), or the settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthSetting {
    /// No active checks; failed connects still eject a target.
    Off,
    /// Check every target.
    On(HealthCheck),
}

impl Serialize for HealthSetting {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            HealthSetting::Off => s.serialize_bool(false),
            HealthSetting::On(h) => h.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for HealthSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = HealthSetting;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("false, true, or {interval, timeout, rise, fall}")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<HealthSetting, E> {
                Ok(if v {
                    HealthSetting::On(HealthCheck::default())
                } else {
                    HealthSetting::Off
                })
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HealthSetting, E> {
                match v {
                    "true" | "on" => self.visit_bool(true),
                    "false" | "off" => self.visit_bool(false),
                    other => Err(E::custom(format!("{other:?} is not a health check setting; write false, true, or {{interval: 2s, timeout: 1s, rise: 2, fall: 3}}"))),
                }
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<HealthSetting, A::Error> {
                HealthCheck::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(HealthSetting::On)
            }
        }
        d.deserialize_any(V)
    }
}

/// How a route picks a target for each new connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Each live target in turn.
    #[default]
    RoundRobin,
    /// The live target with the fewest open connections.
    LeastConnections,
    /// The first live target in the list; the others are standbys.
    FirstAvailable,
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Policy::RoundRobin => "round-robin",
            Policy::LeastConnections => "least-connections",
            Policy::FirstAvailable => "first-available",
        })
    }
}

/// Active TCP health checks: a connect to each target every `interval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HealthCheck {
    /// Time between checks of a target.
    #[serde(deserialize_with = "common::settings::nonzero_duration")]
    pub interval: Period,
    /// How long a check's connect may take; also how long it waits for the
    /// target to close after the check has sent its end of stream.
    #[serde(deserialize_with = "common::settings::nonzero_duration")]
    pub timeout: Period,
    /// Consecutive successes that bring an ejected target back.
    #[serde(deserialize_with = "common::settings::at_least_one")]
    pub rise: u32,
    /// Consecutive failures (checks or client connects) that eject a target.
    #[serde(deserialize_with = "common::settings::at_least_one")]
    pub fall: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            interval: Period::from_secs(2),
            timeout: Period::from_secs(1),
            rise: 2,
            fall: 3,
        }
    }
}

/// TCP keepalive: off, or the idle time before the first probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Keepalive {
    /// No keepalive probes.
    Off,
    /// Probes after 60 s idle, the default.
    #[default]
    Default,
    /// Probe after this long idle.
    After(Period),
}

impl Keepalive {
    /// The idle time before probes, if on.
    pub fn time(self) -> Option<std::time::Duration> {
        match self {
            Keepalive::Off => None,
            Keepalive::Default => Some(std::time::Duration::from_secs(60)),
            Keepalive::After(s) => Some(s.0),
        }
    }
}

impl Serialize for Keepalive {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Keepalive::Off => s.serialize_bool(false),
            Keepalive::Default => s.serialize_str("60s"),
            Keepalive::After(d) => d.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Keepalive {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Keepalive;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("false, or the idle time before keepalive probes (60s)")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Keepalive, E> {
                Ok(if v {
                    Keepalive::Default
                } else {
                    Keepalive::Off
                })
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Keepalive, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Keepalive, E> {
                match v.trim() {
                    "false" | "off" | "no" => Ok(Keepalive::Off),
                    "true" | "on" | "yes" => Ok(Keepalive::Default),
                    other => match other.parse::<Period>().map_err(E::custom)? {
                        d if d.0 < std::time::Duration::from_secs(1) => Err(E::custom(
                            "keepalive probes start after at least 1s idle; write false to turn them off",
                        )),
                        d => Ok(Keepalive::After(d)),
                    },
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// What a route forwards: TCP connections (the default) or UDP datagrams.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP connections, relayed as byte streams.
    #[default]
    Tcp,
    /// UDP datagrams, each client a session of its own (see [`crate::udp`]).
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// Most relay threads: more than this is a typo, not a machine.
pub const MAX_WORKERS: usize = 1024;

fn workers<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = usize::deserialize(d)?;
    if n > MAX_WORKERS {
        return Err(de::Error::custom(format!(
            "at most {MAX_WORKERS} relay threads; 0 means one per CPU"
        )));
    }
    Ok(n)
}

/// One route as written: what is left out takes the global value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RouteSettings {
    /// The route's name, in logs and metrics.
    pub name: String,
    /// Where clients connect.
    pub listen: ListenList,
    /// Where their connections go: one target or several.
    pub target: Option<TargetList>,
    /// The same as `target`, for a list that reads better in the plural.
    pub targets: Option<TargetList>,
    /// How several targets share connections.
    pub balance: Option<Policy>,
    /// Active health checks of the targets (default: on with several).
    pub health_check: Option<HealthSetting>,
    /// Clients let in, on top of the global lists: networks and
    /// rinetd-style patterns.
    pub allow: AddressList,
    /// Clients refused, on top of the global lists.
    pub deny: AddressList,
    /// How long to wait for the target to accept.
    #[serde(deserialize_with = "nonzero_duration_opt")]
    pub connect_timeout: Option<Period>,
    /// Close a connection with no traffic either way for this long.
    #[serde(deserialize_with = "nonzero_duration_opt")]
    pub idle_timeout: Option<Period>,
    /// TCP keepalive on both sides.
    pub keepalive: Option<Keepalive>,
    /// Most connections at once on this route, over all its listen
    /// addresses.
    #[serde(deserialize_with = "at_least_one_opt")]
    pub max_connections: Option<usize>,
    /// Serve TLS to clients (terminate it) with this certificate.
    pub tls: Option<TlsSettings>,
    /// Speak TLS to the targets (originate it).
    pub target_tls: Option<TargetTlsSetting>,
    /// The TLS server names that choose this route among the routes on
    /// its listen addresses; without `tls`, the route passes TLS through
    /// untouched.
    pub sni: List<SniName>,
    /// Balancers whose connections start with a PROXY protocol header
    /// naming the client, on top of the global `accept_proxy`.
    pub accept_proxy: CidrList,
    /// Write a PROXY protocol header (`v1` or `v2`) with the client's
    /// address to the target before any other byte.
    pub send_proxy: Option<ProxyVersion>,
    /// What the route forwards: `tcp` (the default) or `udp`.
    pub protocol: Option<Protocol>,
    /// Limits on each client address or prefix on this route, in place of
    /// the global ones (`{}` turns them off here).
    pub per_source: Option<PerSourceSettings>,
    /// Try another target when one closes or resets a connection before
    /// its first byte (see [`crate::retry`]).
    pub retry_before_first_byte: Option<bool>,
}

/// The settings a reload (SIGHUP) does not apply: they are read at start
/// only, and a changed one is named in the reload's warning.
pub const START_ONLY: [&str; 12] = [
    "admin",
    "admin_allow",
    "admin_deny",
    "workers",
    "access_log",
    "log_empty_connections",
    "shutdown_grace",
    "pid_file",
    "log_level",
    "log_format",
    "instance",
    "topology",
];

/// The tunnel's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Quick form: where to listen (the `Incoming` endpoint).
    pub listen: ListenList,
    /// Quick form: where to forward, `HOST:PORT` (or several).
    pub target: Option<TargetList>,
    /// The original setting: the target's host (with `port`).
    pub host: Option<String>,
    /// The original setting: the target's port (with `host`).
    pub port: Option<u16>,
    /// Routes from a configuration file.
    pub routes: Vec<RouteSettings>,
    /// Clients let in on every route (empty: everyone): networks and
    /// rinetd-style patterns.
    pub allow: AddressList,
    /// Clients refused on every route.
    pub deny: AddressList,
    /// Balancers trusted on every route to send a PROXY protocol header
    /// naming the client (a route's own `accept_proxy` adds to these).
    pub accept_proxy: CidrList,
    /// Quick form: write a PROXY protocol header (`v1` or `v2`) to the
    /// target before any other byte.
    pub send_proxy: Option<ProxyVersion>,
    /// Default connect timeout.
    #[serde(deserialize_with = "nonzero_duration")]
    pub connect_timeout: Period,
    /// Default idle timeout.
    #[serde(deserialize_with = "nonzero_duration")]
    pub idle_timeout: Period,
    /// Default idle timeout of a UDP route's sessions (a route's own
    /// `idle_timeout` overrides it).
    #[serde(deserialize_with = "nonzero_duration")]
    pub udp_idle_timeout: Period,
    /// Default TCP keepalive.
    pub keepalive: Keepalive,
    /// Default connection cap per route.
    #[serde(deserialize_with = "at_least_one")]
    pub max_connections: usize,
    /// Default balancing policy.
    pub balance: Policy,
    /// Default health checks (default: on for routes with several targets).
    pub health_check: Option<HealthSetting>,
    /// Where to serve `/metrics`, `/healthz` and `/readyz` (off when unset).
    pub admin: Option<ListenAddr>,
    /// Clients let in to the admin endpoint (empty: everyone).
    pub admin_allow: AddressList,
    /// Clients refused by the admin endpoint.
    pub admin_deny: AddressList,
    /// Threads that relay connections (0: one per CPU).
    #[serde(deserialize_with = "workers")]
    pub workers: usize,
    /// This instance's name in logs (set per instance by a deployment).
    pub instance: String,
    /// The topology file in which targets named `role/Endpoint` are looked
    /// up (set by the development fabric for its instances); followed
    /// while the tunnel runs.
    pub topology: Option<PathBuf>,
    /// How long live connections may take to finish on SIGTERM.
    pub shutdown_grace: Period,
    /// Where access-log lines go besides the log: a file path, or none.
    pub access_log: Option<String>,
    /// Also log connections that carried no byte (health checks, probes).
    pub log_empty_connections: bool,
    /// A file to write the process id to.
    pub pid_file: Option<String>,
    /// Quick form: serve TLS with this certificate chain (PEM; with
    /// `tls_key`).
    pub tls_cert: Option<PathBuf>,
    /// Quick form: the private key of `tls_cert` (PEM).
    pub tls_key: Option<PathBuf>,
    /// Quick form: clients must present a certificate from this CA bundle
    /// (PEM): mutual TLS.
    pub tls_client_ca: Option<PathBuf>,
    /// Quick form: with `tls_client_ca`, only client certificates with one
    /// of these names get in.
    pub tls_client_names: List<ClientName>,
    /// Quick form: speak TLS to the target (implied by any `target_*` TLS
    /// setting below).
    pub target_tls: bool,
    /// Quick form: the CAs that may sign the target's certificate (PEM
    /// bundle; the system's roots when unset).
    pub target_ca: Option<PathBuf>,
    /// Quick form: the name the target's certificate must carry (the
    /// target's host when unset).
    pub target_server_name: Option<ServerName>,
    /// Quick form: a client certificate to present to the target (PEM;
    /// with `target_key`).
    pub target_cert: Option<PathBuf>,
    /// Quick form: the private key of `target_cert` (PEM).
    pub target_key: Option<PathBuf>,
    /// Default limits on each client address or prefix, per route (off
    /// when unset).
    pub per_source: Option<PerSourceSettings>,
    /// Default for every TCP route: when a target closes or resets a
    /// connection before sending its first byte, send what the client has
    /// sent so far to another target (see [`crate::retry`]). Off: only for
    /// protocols where a request not yet answered may be sent twice.
    pub retry_before_first_byte: bool,
    /// Only instances of these roles may connect to any route (the
    /// development fabric sets it for an internal endpoint's
    /// `allow_from`; it needs the topology, see [`common::fabric`]).
    pub allow_roles: List<common::fabric::RoleName>,
    /// Log level and format.
    #[serde(flatten)]
    pub log: LogSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: List(vec![ListenAddr(([0, 0, 0, 0], 1001).into())]),
            target: None,
            host: None,
            port: None,
            routes: Vec::new(),
            allow: AddressList::default(),
            deny: AddressList::default(),
            accept_proxy: CidrList::default(),
            send_proxy: None,
            connect_timeout: Period::from_secs(5),
            idle_timeout: Period::from_secs(3600),
            udp_idle_timeout: Period::from_secs(60),
            keepalive: Keepalive::Default,
            max_connections: 10_000,
            balance: Policy::default(),
            health_check: None,
            admin: None,
            admin_allow: AddressList::default(),
            admin_deny: AddressList::default(),
            workers: 1,
            instance: format!("{PROGRAM}_IN_0"),
            topology: None,
            shutdown_grace: Period::from_secs(30),
            access_log: None,
            log_empty_connections: false,
            pid_file: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            tls_client_names: List::default(),
            target_tls: false,
            target_ca: None,
            target_server_name: None,
            target_cert: None,
            target_key: None,
            per_source: None,
            retry_before_first_byte: false,
            allow_roles: List::default(),
            log: LogSettings::default(),
        }
    }
}

/// A route with every value decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The route's name.
    pub name: String,
    /// Where clients connect.
    pub listen: Vec<ListenAddr>,
    /// Where their connections go.
    pub targets: Vec<Target>,
    /// How the targets share connections.
    pub balance: Policy,
    /// Health check timing; also `fall` for failed connects.
    pub health: HealthCheck,
    /// Whether active checks run.
    pub checks: bool,
    /// Global rules, then the route's own: both must let a client in.
    pub access: Vec<AccessList>,
    /// How long to wait for the target to accept.
    pub connect_timeout: Period,
    /// Close after this long without traffic.
    pub idle_timeout: Period,
    /// TCP keepalive on both sides.
    pub keepalive: Keepalive,
    /// Most connections at once.
    pub max_connections: usize,
    /// Serve TLS to clients with these files (terminate it); `None`: the
    /// bytes from clients go to the target as they come.
    pub tls: Option<common::tls::ServerFiles>,
    /// Speak TLS to the targets with these (originate it); `None`: plain
    /// TCP to the targets.
    pub target_tls: Option<common::tls::ClientFiles>,
    /// The TLS server names (lower case; exact, or `*.` for one label)
    /// that choose this route among the routes sharing its listen
    /// addresses. Empty: the route has its addresses to itself.
    pub sni: Vec<String>,
    /// Sources whose connections start with a PROXY protocol header
    /// naming the client (the global list and the route's own).
    pub accept_proxy: CidrList,
    /// The PROXY protocol header written to the target first, if any.
    pub send_proxy: Option<ProxyVersion>,
    /// TCP or UDP. A UDP route's `idle_timeout` ends each client's
    /// session, `max_connections` caps its sessions, and `connect_timeout`
    /// bounds resolving the target when a session starts.
    pub protocol: Protocol,
    /// Limits on each client address or prefix (off by default).
    pub per_source: PerSourceSettings,
    /// When a target closes or resets a connection before its first byte,
    /// replay what the client sent (held, up to [`crate::retry::HOLD_MAX`])
    /// to another target (see [`crate::retry`]). TCP routes only.
    pub retry_before_first_byte: bool,
    /// Only these processes may connect: instances of the roles of
    /// `allow_roles` (see [`common::fabric`]).
    pub callers: Option<common::fabric::Callers>,
}

impl Route {
    /// A route from `listen` to `targets` with the global defaults for
    /// everything else (as a configuration that says nothing more gets);
    /// change fields with struct update syntax.
    pub fn new(name: &str, listen: Vec<ListenAddr>, targets: Vec<Target>) -> Route {
        let defaults = Settings::default();
        let (health, checks) = defaults.health(None, targets.len());
        Route {
            name: name.to_string(),
            listen,
            targets,
            balance: defaults.balance,
            health,
            checks,
            access: vec![AccessList::default()],
            connect_timeout: defaults.connect_timeout,
            idle_timeout: defaults.idle_timeout,
            keepalive: defaults.keepalive,
            max_connections: defaults.max_connections,
            tls: None,
            target_tls: None,
            sni: Vec::new(),
            accept_proxy: CidrList::default(),
            send_proxy: None,
            protocol: Protocol::Tcp,
            per_source: PerSourceSettings::default(),
            retry_before_first_byte: defaults.retry_before_first_byte,
            callers: None,
        }
    }

    /// Whether the route passes TLS through untouched: it is chosen by
    /// server name but holds no certificate of its own.
    pub fn passthrough(&self) -> bool {
        !self.sni.is_empty() && self.tls.is_none()
    }
}

impl Settings {
    /// Who may connect to the routes, when `allow_roles` says.
    fn callers(&self) -> Option<common::fabric::Callers> {
        common::fabric::Callers::beside(&self.allow_roles.0, self.topology.as_deref())
    }
    /// A route's health checks: its own setting, else the global one, else
    /// on when it has several targets.
    fn health(&self, own: Option<HealthSetting>, targets: usize) -> (HealthCheck, bool) {
        match own.or(self.health_check) {
            Some(HealthSetting::On(h)) => (h, true),
            Some(HealthSetting::Off) => (HealthCheck::default(), false),
            None => (HealthCheck::default(), targets > 1),
        }
    }

    /// The quick form's TLS keys that are set, with what they are: with
    /// routes, each is a mistake to report.
    fn quick_tls_given(&self) -> Vec<&'static str> {
        let set = [
            ("tls_cert", self.tls_cert.is_some()),
            ("tls_key", self.tls_key.is_some()),
            ("tls_client_ca", self.tls_client_ca.is_some()),
            ("tls_client_names", !self.tls_client_names.is_empty()),
            ("target_tls", self.target_tls),
            ("target_ca", self.target_ca.is_some()),
            ("target_server_name", self.target_server_name.is_some()),
            ("target_cert", self.target_cert.is_some()),
            ("target_key", self.target_key.is_some()),
        ];
        set.into_iter()
            .filter(|(_, given)| *given)
            .map(|(key, _)| key)
            .collect()
    }

    /// The quick form's `target_*` TLS settings that are set: each one
    /// turns TLS to the target on.
    pub fn target_tls_implied_by(&self) -> Vec<&'static str> {
        self.quick_tls_given()
            .into_iter()
            .filter(|key| key.starts_with("target_") && *key != "target_tls")
            .collect()
    }

    /// The quick form's TLS, as the default route has it: (tls,
    /// target_tls), each problem pushed as (key, message).
    fn quick_tls(
        &self,
        problems: &mut Vec<(String, String)>,
    ) -> (
        Option<common::tls::ServerFiles>,
        Option<common::tls::ClientFiles>,
    ) {
        let server = TlsSettings {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            client_ca: self.tls_client_ca.clone(),
            client_names: self.tls_client_names.clone(),
        };
        let tls = (server != TlsSettings::default())
            .then(|| {
                let at = tls::Place {
                    full: "tls_",
                    short: "tls_",
                };
                tls::server_files(&server, &at, problems)
            })
            .flatten();
        let target_tls = (self.target_tls || !self.target_tls_implied_by().is_empty())
            .then(|| {
                let client = TargetTls {
                    ca: self.target_ca.clone(),
                    server_name: self.target_server_name.clone(),
                    cert: self.target_cert.clone(),
                    key: self.target_key.clone(),
                };
                let at = tls::Place {
                    full: "target_",
                    short: "target_",
                };
                tls::client_files(&client, &at, problems)
            })
            .flatten();
        (tls, target_tls)
    }

    /// The routes to run, with global values filled in; every problem is
    /// reported (with the key it concerns).
    pub fn routes(&self) -> Result<Vec<Route>, Vec<ConfigError>> {
        self.routes_in(None)
    }

    /// [`Settings::routes`], with targets named `role/Endpoint` looked up
    /// in `topology` rather than in the `topology` file (when given).
    pub fn routes_in(&self, topology: Option<&Topology>) -> Result<Vec<Route>, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let problem = |key: &str, message: String| ConfigError {
            key: key.to_string(),
            value: None,
            origin: None,
            message,
        };
        let global = AccessList {
            allow: self.allow.clone(),
            deny: self.deny.clone(),
        };
        let mut peers = Peers::new(self.topology.as_deref(), topology);
        let mut routes = Vec::new();
        // Where each route's keys are: `routes.N.` (N in the file, which
        // differs from the index in `routes` once one is left out), or
        // nothing for the quick form's route.
        let mut prefixes: Vec<String> = Vec::new();
        let mut tls_problems = Vec::new();
        if self.routes.is_empty() {
            let targets = match (&self.target, &self.host, self.port) {
                (Some(targets), _, _) => match peers.expand(&targets.0) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        errors.push(problem("target", e));
                        None
                    }
                },
                (None, Some(host), Some(port)) => match format!("{host}:{port}").parse() {
                    Ok(t) => Some(vec![t]),
                    Err(e) => {
                        errors.push(problem("host", e));
                        None
                    }
                },
                (None, Some(_), None) => {
                    errors.push(problem("port", "TUNNEL_HOST is set but TUNNEL_PORT is not; set both, or pass --target HOST:PORT".into()));
                    None
                }
                (None, None, Some(_)) => {
                    errors.push(problem("host", "TUNNEL_PORT is set but TUNNEL_HOST is not; set both, or pass --target HOST:PORT".into()));
                    None
                }
                (None, None, None) => {
                    errors.push(problem("target", "nothing to forward to: pass --target HOST:PORT, set TUNNEL_HOST and TUNNEL_PORT, or list routes in a --config file".into()));
                    None
                }
            };
            if self.listen.0.is_empty() {
                errors.push(problem(
                    "listen",
                    "no listen address; pass --listen ADDR".into(),
                ));
            }
            let (tls, target_tls) = self.quick_tls(&mut tls_problems);
            if let Some(targets) = targets.filter(|t| !t.is_empty()) {
                let (health, checks) = self.health(None, targets.len());
                routes.push(Route {
                    name: "default".into(),
                    listen: self.listen.0.clone(),
                    targets,
                    balance: self.balance,
                    health,
                    checks,
                    access: vec![global.clone()],
                    connect_timeout: self.connect_timeout,
                    idle_timeout: self.idle_timeout,
                    keepalive: self.keepalive,
                    max_connections: self.max_connections,
                    tls,
                    target_tls,
                    sni: Vec::new(),
                    accept_proxy: self.accept_proxy.clone(),
                    // Peers' instances reached directly may expect a header.
                    send_proxy: self.send_proxy.or(peers.proxy),
                    protocol: Protocol::Tcp,
                    per_source: self.per_source.clone().unwrap_or_default(),
                    retry_before_first_byte: self.retry_before_first_byte,
                    callers: self.callers(),
                });
                prefixes.push(String::new());
            }
        } else {
            if self.target.is_some() || self.host.is_some() {
                errors.push(problem(
                    "target",
                    "both a quick-form target and routes are given; put the target in a route"
                        .into(),
                ));
            }
            if self.send_proxy.is_some() {
                errors.push(problem(
                    "send_proxy",
                    "is a setting of the quick form's route, and routes are configured; give each route its own send_proxy".into(),
                ));
            }
            for key in self.quick_tls_given() {
                errors.push(problem(
                    key,
                    "is a setting of the quick form's route, and routes are configured; give each route its own tls or target_tls".into(),
                ));
            }
            for (i, r) in self.routes.iter().enumerate() {
                let key = |k: &str| format!("routes.{i}.{k}");
                let name = if r.name.is_empty() {
                    format!("route{}", i + 1)
                } else {
                    r.name.clone()
                };
                if r.listen.0.is_empty() {
                    errors.push(problem(
                        &key("listen"),
                        format!("route {name} has no listen address"),
                    ));
                }
                let tls = r.tls.as_ref().and_then(|t| {
                    let full = key("tls.");
                    let at = tls::Place {
                        full: &full,
                        short: "tls.",
                    };
                    tls::server_files(t, &at, &mut tls_problems)
                });
                let target_tls = match &r.target_tls {
                    Some(TargetTlsSetting::On(t)) => {
                        let full = key("target_tls.");
                        let at = tls::Place {
                            full: &full,
                            short: "target_tls.",
                        };
                        tls::client_files(t, &at, &mut tls_problems)
                    }
                    Some(TargetTlsSetting::Off) | None => None,
                };
                let passthrough = !r.sni.is_empty() && r.tls.is_none();
                if passthrough && matches!(r.target_tls, Some(TargetTlsSetting::On(_))) {
                    errors.push(problem(
                        &key("target_tls"),
                        format!("route {name} passes TLS through untouched (it has sni and no tls), so it cannot speak TLS of its own to its target; remove target_tls, or add tls to decrypt and encrypt again"),
                    ));
                }
                let mut sni: Vec<String> = Vec::new();
                for n in &r.sni.0 {
                    if sni.contains(&n.0) {
                        errors.push(problem(
                            &key("sni"),
                            format!("route {name} lists {n} twice; list each name once"),
                        ));
                    } else {
                        sni.push(n.0.clone());
                    }
                }
                let targets = match (&r.target, &r.targets) {
                    (Some(_), Some(_)) => {
                        errors.push(problem(
                            &key("targets"),
                            format!("route {name} has both target and targets; keep one"),
                        ));
                        continue;
                    }
                    (Some(t), None) | (None, Some(t)) if !t.0.is_empty() => {
                        match peers.expand(&t.0) {
                            Ok(t) => t,
                            Err(e) => {
                                let which = if r.target.is_some() {
                                    "target"
                                } else {
                                    "targets"
                                };
                                errors.push(problem(&key(which), e));
                                continue;
                            }
                        }
                    }
                    _ => {
                        errors.push(problem(
                            &key("target"),
                            format!("route {name} has no target; add target: HOST:PORT"),
                        ));
                        continue;
                    }
                };
                let (health, checks) = self.health(r.health_check, targets.len());
                let protocol = r.protocol.unwrap_or_default();
                // Health checks connect over TCP: a UDP route has none.
                let checks = checks && protocol == Protocol::Tcp;
                if protocol == Protocol::Udp {
                    errors.extend(
                        udp_problems(r, &name)
                            .into_iter()
                            .map(|(k, message)| problem(&key(k), message)),
                    );
                }
                routes.push(Route {
                    name,
                    listen: r.listen.0.clone(),
                    targets,
                    balance: r.balance.unwrap_or(self.balance),
                    health,
                    checks,
                    access: vec![
                        global.clone(),
                        AccessList {
                            allow: r.allow.clone(),
                            deny: r.deny.clone(),
                        },
                    ],
                    connect_timeout: r.connect_timeout.unwrap_or(self.connect_timeout),
                    idle_timeout: r.idle_timeout.unwrap_or(match protocol {
                        Protocol::Tcp => self.idle_timeout,
                        Protocol::Udp => self.udp_idle_timeout,
                    }),
                    keepalive: r.keepalive.unwrap_or(self.keepalive),
                    max_connections: r.max_connections.unwrap_or(self.max_connections),
                    tls,
                    target_tls,
                    sni,
                    accept_proxy: List(
                        self.accept_proxy
                            .0
                            .iter()
                            .chain(r.accept_proxy.0.iter())
                            .copied()
                            .collect(),
                    ),
                    send_proxy: r.send_proxy.or(peers.proxy),
                    protocol,
                    per_source: r
                        .per_source
                        .clone()
                        .or_else(|| self.per_source.clone())
                        .unwrap_or_default(),
                    retry_before_first_byte: protocol == Protocol::Tcp
                        && r.retry_before_first_byte
                            .unwrap_or(self.retry_before_first_byte),
                    callers: self.callers(),
                });
                prefixes.push(key(""));
            }
        }
        errors.extend(
            tls_problems
                .into_iter()
                .map(|(key, message)| problem(&key, message)),
        );
        errors.extend(
            shared_addresses(&routes, &prefixes)
                .into_iter()
                .map(|(key, message)| problem(&key, message)),
        );
        if errors.is_empty() {
            Ok(routes)
        } else {
            Err(errors)
        }
    }
}

/// Targets named `role/Endpoint`, looked up in the topology file (read
/// once per configuration, when a route first names a peer).
struct Peers<'a> {
    file: Option<&'a std::path::Path>,
    given: Option<&'a Topology>,
    topology: Option<Result<Topology, String>>,
    /// The PROXY header the last expanded peers' instances expect.
    proxy: Option<ProxyVersion>,
}

impl<'a> Peers<'a> {
    fn new(file: Option<&'a std::path::Path>, given: Option<&'a Topology>) -> Self {
        Peers {
            file,
            given,
            topology: None,
            proxy: None,
        }
    }

    /// `targets` with every peer replaced by its instances; [`Peers::proxy`]
    /// is then the header they expect, if any.
    fn expand(&mut self, targets: &[Destination]) -> Result<Vec<Target>, String> {
        let mut out = Vec::new();
        self.proxy = None;
        for target in targets {
            match target {
                Destination::Address(a) => out.push(a.clone()),
                Destination::Peer(peer) => {
                    let (file, given) = (self.file, self.given);
                    let topology = self.topology.get_or_insert_with(|| match (given, file) {
                        (Some(given), _) => Ok(given.clone()),
                        (None, None) => Err(format!(
                            "{peer} names a peer, and no topology is given to look it up in; set topology (TUNNEL_TOPOLOGY, --topology FILE: deploy run sets it for its instances) or write HOST:PORT"
                        )),
                        (None, Some(file)) => Topology::read(file).map_err(|e| e.to_string()),
                    });
                    let topology = topology.as_ref().map_err(Clone::clone)?;
                    out.extend(topology.instances(peer).map_err(|e| e.to_string())?);
                    let entry = topology.entry(peer).map_err(|e| e.to_string())?;
                    if entry.instances.is_some() {
                        self.proxy = self.proxy.or(entry.proxy);
                    }
                }
            }
        }
        Ok(out)
    }
}

impl Settings {
    /// Whether a target is named `role/Endpoint`: the topology is then
    /// followed, and the routes made again when it changes.
    pub fn names_peers(&self) -> bool {
        let peer = |list: &Option<TargetList>| {
            list.iter()
                .flat_map(|l| l.0.iter())
                .any(|d| matches!(d, Destination::Peer(_)))
        };
        peer(&self.target)
            || self
                .routes
                .iter()
                .any(|r| peer(&r.target) || peer(&r.targets))
    }
}

/// What a UDP route `r` (named `name`) sets that only TCP routes have, as
/// (key, message).
fn udp_problems(r: &RouteSettings, name: &str) -> Vec<(&'static str, String)> {
    let tcp_only = [
        ("tls", r.tls.is_some(), "TLS (UDP would need DTLS)"),
        (
            "target_tls",
            matches!(r.target_tls, Some(TargetTlsSetting::On(_))),
            "TLS to the target",
        ),
        (
            "sni",
            !r.sni.is_empty(),
            "choosing a route by TLS server name",
        ),
        (
            "health_check",
            matches!(r.health_check, Some(HealthSetting::On(_))),
            "active health checks (they connect over TCP)",
        ),
        ("keepalive", r.keepalive.is_some(), "TCP keepalive"),
        (
            "accept_proxy",
            !r.accept_proxy.0.is_empty(),
            "PROXY protocol headers from balancers",
        ),
        (
            "send_proxy",
            r.send_proxy.is_some(),
            "a PROXY protocol header to the target",
        ),
        (
            "retry_before_first_byte",
            r.retry_before_first_byte == Some(true),
            "replaying a connection's first bytes to another target",
        ),
    ];
    tcp_only
        .into_iter()
        .filter(|(_, set, _)| *set)
        .map(|(key, _, what)| {
            (
                key,
                format!("route {name} forwards UDP, and {key} ({what}) is for TCP routes only; remove it, or make the route protocol: tcp"),
            )
        })
        .collect()
}

/// Problems with the names and listen addresses of `routes`, as (key,
/// message): names are unique; routes share a listen address only when
/// each has `sni` names and no name is on it twice; and no listen address
/// overlaps another (a wildcard and an address it covers) unless they are
/// the same. `prefixes` are where each route's keys are.
fn shared_addresses(routes: &[Route], prefixes: &[String]) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    let key = |i: usize, k: &str| format!("{}{k}", prefixes[i]);
    let mut seen_names = std::collections::HashMap::new();
    // The routes on each address, in the order the addresses come.
    let mut groups: Vec<(ListenAddr, Vec<usize>)> = Vec::new();
    for (i, route) in routes.iter().enumerate() {
        if let Some(other) = seen_names.insert(route.name.clone(), i) {
            problems.push((
                key(i, "name"),
                format!(
                    "route name {} is used twice (routes {} and {})",
                    route.name,
                    other + 1,
                    i + 1
                ),
            ));
        }
        for (n, addr) in route.listen.iter().enumerate() {
            if route.listen[..n].contains(addr) {
                problems.push((
                    key(i, "listen"),
                    format!(
                        "route {} lists {addr} twice; list each address once",
                        route.name
                    ),
                ));
                continue;
            }
            // A TCP and a UDP route may share an address: they are
            // different sockets.
            match groups
                .iter_mut()
                .find(|(a, g)| a == addr && routes[g[0]].protocol == route.protocol)
            {
                Some((_, group)) => group.push(i),
                None => groups.push((*addr, vec![i])),
            }
            // 0.0.0.0:P takes port P on every IPv4 address (and [::]:P
            // on every address): no other listener can have it.
            let clash = routes.iter().take(i + 1).find_map(|earlier| {
                if earlier.protocol != route.protocol {
                    return None;
                }
                earlier
                    .listen
                    .iter()
                    .take_while(|a| !(earlier.name == route.name && *a == addr))
                    .find(|a| *a != addr && overlaps(**a, *addr))
                    .map(|a| (earlier.name.clone(), *a))
            });
            if let Some((other, wide)) = clash {
                problems.push((
                    key(i, "listen"),
                    format!("{addr} (route {}) overlaps {wide} (route {other}): a wildcard address takes the port on every address; keep one of them or use another port", route.name),
                ));
            }
        }
    }
    for (addr, group) in groups.iter().filter(|(_, group)| group.len() > 1) {
        let without: Vec<usize> = group
            .iter()
            .copied()
            .filter(|&i| routes[i].sni.is_empty())
            .collect();
        if !without.is_empty() {
            let names = |which: &[usize]| {
                let names: Vec<&str> = which.iter().map(|&i| routes[i].name.as_str()).collect();
                match names.split_last() {
                    Some((last, [])) => format!("route {last}"),
                    Some((last, rest)) => format!("routes {} and {last}", rest.join(", ")),
                    None => String::new(),
                }
            };
            let (all, lacking) = (names(group), names(&without));
            let verb = if without.len() == 1 { "has" } else { "have" };
            // Said once, at the last route without names: it is the one
            // that claims an address already taken.
            let at = without[without.len() - 1];
            problems.push((
                key(at, "listen"),
                format!(
                    "{addr} is claimed by {all}; routes share a listen address only when each has sni names (TLS server names) to be chosen by, and {lacking} {verb} none"
                ),
            ));
            continue;
        }
        let mut claimed: std::collections::HashMap<&str, &str> = std::collections::HashMap::new();
        for &i in group {
            for name in &routes[i].sni {
                if let Some(other) = claimed.insert(name, &routes[i].name) {
                    if other != routes[i].name {
                        problems.push((
                            key(i, "sni"),
                            format!(
                                "{name} on {addr} is claimed by routes {other} and {}; a server name chooses one route, so keep it in one",
                                routes[i].name
                            ),
                        ));
                    }
                }
            }
        }
    }
    problems
}

impl common::config::ProgramSettings for Settings {
    /// With routes, the quick form's keys are not used; without, `routes`.
    fn unused(&self, key: &str) -> bool {
        match key {
            "listen" | "target" | "host" | "port" | "tls_cert" | "tls_key" | "tls_client_ca"
            | "tls_client_names" | "target_tls" | "target_ca" | "target_server_name"
            | "target_cert" | "target_key" | "send_proxy" => !self.routes.is_empty(),
            "routes" => self.routes.is_empty(),
            _ => false,
        }
    }

    /// `target_tls` is on when another `target_*` TLS setting is given.
    fn effective(&self, key: &str) -> Option<(String, String)> {
        let implied_by = self.target_tls_implied_by();
        (key == "target_tls" && !self.target_tls && !implied_by.is_empty()).then(|| {
            (
                "true".to_string(),
                format!("implied by {}", implied_by.join(", ")),
            )
        })
    }
}

/// Whether two listen addresses take the same port on some address: the
/// same address, or a wildcard (`0.0.0.0` over IPv4, `[::]` over both,
/// since listeners here are dual-stack) and an address it covers.
pub fn overlaps(a: ListenAddr, b: ListenAddr) -> bool {
    let (a, b) = (a.0, b.0);
    if a.port() != b.port() {
        return false;
    }
    let covers = |wide: std::net::SocketAddr, other: std::net::SocketAddr| {
        wide.ip().is_unspecified() && (wide.is_ipv6() || other.ip().to_canonical().is_ipv4())
    };
    a.ip().to_canonical() == b.ip().to_canonical() || covers(a, b) || covers(b, a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::config::ProgramSettings;
    use common::tls::{ClientFiles, ServerFiles};

    fn settings(yaml: &str) -> Settings {
        common::yaml::from_str(yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
    }

    /// The problems `yaml` has, as `key: message` lines.
    fn problems(yaml: &str) -> Vec<String> {
        match settings(yaml).routes() {
            Ok(routes) => panic!("no problem found; routes: {routes:?}"),
            Err(errors) => errors
                .into_iter()
                .map(|e| format!("{}: {}", e.key, e.message))
                .collect(),
        }
    }

    fn has(problems: &[String], key: &str, says: &str) {
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with(&format!("{key}: ")) && p.contains(says)),
            "no {key}: ...{says}... in\n{}",
            problems.join("\n")
        );
    }

    #[test]
    fn the_quick_form_serves_and_speaks_tls() {
        let s = settings(
            "target: gateway:6432\ntls_cert: gw.pem\ntls_key: gw.key\ntls_client_ca: ca.pem\ntls_client_names: 'a.example.com, *.b.example.com'\ntarget_ca: ca.pem\ntarget_cert: me.pem\ntarget_key: me.key\n",
        );
        let route = &s.routes().unwrap()[0];
        assert_eq!(
            route.tls,
            Some(ServerFiles {
                cert: "gw.pem".into(),
                key: "gw.key".into(),
                client_ca: Some("ca.pem".into()),
                client_names: vec!["a.example.com".into(), "*.b.example.com".into()],
            })
        );
        // target_ca and the client certificate imply target_tls.
        assert_eq!(
            route.target_tls,
            Some(ClientFiles {
                ca: Some("ca.pem".into()),
                cert: Some("me.pem".into()),
                key: Some("me.key".into()),
                server_name: None,
            })
        );
        assert!(route.sni.is_empty() && !route.passthrough());
        let (value, why) = s.effective("target_tls").unwrap();
        assert_eq!(value, "true");
        assert!(why.contains("target_ca, target_cert, target_key"), "{why}");

        // target_tls alone: the system's roots, the target's own name.
        let route = &settings("target: db:5432\ntarget_tls: true\n")
            .routes()
            .unwrap()[0];
        assert_eq!(route.target_tls, Some(ClientFiles::default()));
        assert_eq!(route.tls, None);
        // Without any: plain TCP both ways.
        let s = settings("target: db:5432\n");
        let route = &s.routes().unwrap()[0];
        assert_eq!((&route.tls, &route.target_tls), (&None, &None));
        assert_eq!(s.effective("target_tls"), None);
    }

    #[test]
    fn routes_on_one_address_are_chosen_by_server_name() {
        let s = settings(
            "routes:
  - name: web
    listen: 0.0.0.0:443
    sni: [WWW.example.com, '*.example.com']
    target: 10.0.0.5:443
  - name: api
    listen: 0.0.0.0:443
    sni: api.example.com
    tls: {cert: api.pem, key: api.key}
    target: 10.0.0.6:8080
    target_tls: {ca: inner.pem, server_name: api.internal}
  - name: other
    listen: 0.0.0.0:444
    sni: www.example.com
    target: 10.0.0.7:443
",
        );
        let routes = s.routes().unwrap();
        assert_eq!(routes[0].sni, ["www.example.com", "*.example.com"]);
        assert!(routes[0].passthrough());
        assert_eq!(routes[0].target_tls, None);
        assert!(!routes[1].passthrough());
        assert_eq!(
            routes[1].tls.as_ref().map(|t| &t.cert),
            Some(&PathBuf::from("api.pem"))
        );
        let target = routes[1].target_tls.as_ref().unwrap();
        assert_eq!(target.server_name.as_deref(), Some("api.internal"));
        assert_eq!(target.ca, Some("inner.pem".into()));
        // The same name on another address is another matter.
        assert_eq!(routes[2].sni, ["www.example.com"]);
    }

    #[test]
    fn a_shared_address_needs_names_on_every_route_and_each_name_once() {
        let p = problems(
            "routes:
  - {name: web, listen: 0.0.0.0:443, sni: [www.example.com, a.example.com], target: 'h:1'}
  - {name: api, listen: 0.0.0.0:443, sni: [API.example.com, WWW.example.com], target: 'h:2'}
  - {name: dup, listen: 127.0.0.1:8443, sni: [x.example.com, X.example.com], target: 'h:3'}
",
        );
        has(
            &p,
            "routes.1.sni",
            "www.example.com on 0.0.0.0:443 is claimed by routes web and api",
        );
        has(&p, "routes.2.sni", "route dup lists x.example.com twice");
        assert_eq!(p.len(), 2, "{p:?}");

        let p = problems(
            "routes:
  - {name: web, listen: 0.0.0.0:443, sni: www.example.com, target: 'h:1'}
  - {name: plain, listen: 0.0.0.0:443, target: 'h:2'}
",
        );
        has(&p, "routes.1.listen", "0.0.0.0:443 is claimed by routes web and plain; routes share a listen address only when each has sni names");
        has(&p, "routes.1.listen", "and route plain has none");
        let p = problems(
            "routes:
  - {name: a, listen: 127.0.0.1:1, target: 'h:1'}
  - {name: b, listen: 127.0.0.1:1, target: 'h:1'}
",
        );
        has(&p, "routes.1.listen", "claimed by routes a and b");
        assert_eq!(p.len(), 1, "{p:?}");
        // A wildcard address still takes the port from a specific one.
        let p = problems(
            "routes:
  - {name: a, listen: 0.0.0.0:443, sni: a.example.com, target: 'h:1'}
  - {name: b, listen: 127.0.0.1:443, sni: b.example.com, target: 'h:1'}
",
        );
        has(&p, "routes.1.listen", "overlaps 0.0.0.0:443 (route a)");
    }

    #[test]
    fn every_half_missing_is_named_at_its_key() {
        let p = problems(
            "routes:
  - {name: a, listen: 127.0.0.1:1, target: 'h:1', tls: {key: a.key}}
  - {name: b, listen: 127.0.0.1:2, target: 'h:1', tls: {cert: b.pem}}
  - {name: c, listen: 127.0.0.1:3, target: 'h:1', tls: {client_ca: ca.pem}}
  - {name: d, listen: 127.0.0.1:4, target: 'h:1', tls: {cert: d.pem, key: d.key, client_names: [x.example.com]}}
  - {name: e, listen: 127.0.0.1:5, target: 'h:1', tls: {}}
  - {name: f, listen: 127.0.0.1:6, target: 'h:1', target_tls: {cert: me.pem}}
  - {name: g, listen: 127.0.0.1:7, target: 'h:1', target_tls: {key: me.key}}
  - {name: h, listen: 127.0.0.1:8, sni: h.example.com, target: 'h:1', target_tls: true}
",
        );
        has(
            &p,
            "routes.0.tls.cert",
            "is missing: tls.key needs its certificate chain in tls.cert",
        );
        has(
            &p,
            "routes.1.tls.key",
            "is missing: tls.cert needs its private key in tls.key",
        );
        has(
            &p,
            "routes.2.tls.client_ca",
            "takes TLS: set tls.cert and tls.key too",
        );
        has(&p, "routes.3.tls.client_names", "needs tls.client_ca");
        has(&p, "routes.4.tls.cert", "is missing");
        has(&p, "routes.5.target_tls.key", "is missing");
        has(&p, "routes.6.target_tls.cert", "is missing");
        has(&p, "routes.7.target_tls", "passes TLS through untouched");
        assert_eq!(p.len(), 8, "{p:?}");

        let p = problems("target: 'h:1'\ntls_key: k.pem\ntarget_cert: me.pem\n");
        has(
            &p,
            "tls_cert",
            "is missing: tls_key needs its certificate chain in tls_cert",
        );
        has(
            &p,
            "target_key",
            "is missing: the client certificate in target_cert needs its private key in target_key",
        );
        let p = problems("target: 'h:1'\ntls_client_names: a.example.com\n");
        has(
            &p,
            "tls_client_names",
            "set tls_cert, tls_key and tls_client_ca too",
        );
    }

    #[test]
    fn the_quick_forms_tls_beside_routes_is_reported() {
        let s = settings(
            "tls_cert: a.pem\ntarget_tls: true\nroutes:\n  - {name: a, listen: 127.0.0.1:1, target: 'h:1'}\n",
        );
        assert!(s.unused("tls_cert") && s.unused("target_key"));
        assert!(!s.unused("routes"));
        let errors = s.routes().unwrap_err();
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["tls_cert", "target_tls"]);
        assert!(errors[0].message.contains("give each route its own tls"));
        let quick = settings("target: 'h:1'\n");
        assert!(!quick.unused("tls_cert") && quick.unused("routes"));
    }

    #[test]
    fn tls_settings_are_written_back_as_they_read() {
        let s = settings(
            "target_tls: true\ntarget_server_name: db.internal\ntls_client_names: [spiffe://example.com/a]\nroutes:
  - name: a
    listen: 127.0.0.1:1
    target: 'h:1'
    sni: [a.example.com]
    tls: {cert: a.pem, key: a.key, client_ca: ca.pem, client_names: ['*.example.com']}
    target_tls: {ca: ca.pem}
  - {name: b, listen: 127.0.0.1:2, target: 'h:1', target_tls: true}
  - {name: c, listen: 127.0.0.1:3, target: 'h:1', target_tls: false}
",
        );
        let yaml = common::yaml::to_string(&s).unwrap();
        let back = settings(&yaml);
        assert_eq!(back.routes, s.routes, "{yaml}");
        let quick = |s: &Settings| {
            (
                s.tls_client_names.clone(),
                s.target_tls,
                s.target_server_name.clone(),
            )
        };
        assert_eq!(quick(&back), quick(&s), "{yaml}");
    }

    #[test]
    fn udp_routes_share_addresses_with_tcp_routes_only() {
        let s = settings(
            "udp_idle_timeout: 30s
routes:
  - {name: dns, protocol: udp, listen: '127.0.0.1:53', target: '10.0.0.53:53'}
  - {name: dns-tcp, listen: '127.0.0.1:53', target: '10.0.0.53:53'}
  - {name: ntp, protocol: udp, listen: '0.0.0.0:123', targets: 'a:123,b:123', idle_timeout: 5s, max_connections: 100}
",
        );
        let routes = s.routes().unwrap();
        let shape: Vec<(Protocol, u64, bool)> = routes
            .iter()
            .map(|r| (r.protocol, r.idle_timeout.0.as_secs(), r.checks))
            .collect();
        // Two targets turn health checks on for TCP only.
        assert_eq!(
            shape,
            [
                (Protocol::Udp, 30, false),
                (Protocol::Tcp, 3600, false),
                (Protocol::Udp, 5, false)
            ]
        );
        assert_eq!(routes[2].max_connections, 100);
        assert_eq!(Settings::default().udp_idle_timeout, Period::from_secs(60));

        let p = problems(
            "routes:
  - {name: a, protocol: udp, listen: '127.0.0.1:53', target: 'h:1'}
  - {name: b, protocol: udp, listen: '127.0.0.1:53', target: 'h:2'}
  - {name: c, protocol: udp, listen: '0.0.0.0:54', target: 'h:2'}
  - {name: d, protocol: udp, listen: '127.0.0.1:54', target: 'h:2'}
  - {name: e, listen: '127.0.0.1:54', target: 'h:2'}
",
        );
        has(
            &p,
            "routes.1.listen",
            "127.0.0.1:53 is claimed by routes a and b",
        );
        has(
            &p,
            "routes.3.listen",
            "127.0.0.1:54 (route d) overlaps 0.0.0.0:54 (route c)",
        );
        assert_eq!(p.len(), 2, "{p:?}");

        let p = problems(
            "routes:
  - name: u
    protocol: udp
    listen: '127.0.0.1:53'
    target: 'h:1'
    sni: a.example.com
    tls: {cert: a.pem, key: a.key}
    target_tls: true
    health_check: true
    keepalive: 30s
    retry_before_first_byte: true
",
        );
        for key in [
            "tls",
            "target_tls",
            "sni",
            "health_check",
            "keepalive",
            "retry_before_first_byte",
        ] {
            has(&p, &format!("routes.0.{key}"), "route u forwards UDP, and");
        }
        let e = common::yaml::from_str::<Settings>(
            "routes:\n  - {name: a, protocol: sctp, listen: '127.0.0.1:1', target: 'h:1'}\n",
        )
        .unwrap_err();
        assert!(e.contains("tcp") && e.contains("udp"), "{e}");
    }

    #[test]
    fn retry_before_first_byte_is_off_unless_set_globally_or_per_route() {
        let routes = |yaml: &str| -> Vec<bool> {
            settings(yaml)
                .routes()
                .unwrap()
                .iter()
                .map(|r| r.retry_before_first_byte)
                .collect()
        };
        let list = "routes:
  - {name: a, listen: 127.0.0.1:1, target: 'h:1'}
  - {name: b, listen: 127.0.0.1:2, target: 'h:1', retry_before_first_byte: true}
  - {name: c, listen: 127.0.0.1:3, target: 'h:1', retry_before_first_byte: false}
  - {name: u, listen: 127.0.0.1:4, target: 'h:1', protocol: udp}
";
        assert_eq!(routes(list), [false, true, false, false]);
        // The global default, which a UDP route ignores.
        assert_eq!(
            routes(&format!("retry_before_first_byte: true\n{list}")),
            [true, true, false, false]
        );
        // The quick form takes the global setting.
        assert_eq!(routes("target: 'h:1'\n"), [false]);
        assert_eq!(
            routes("target: 'h:1'\nretry_before_first_byte: true\n"),
            [true]
        );
        assert!(!Route::new("r", Vec::new(), Vec::new()).retry_before_first_byte);
    }

    #[test]
    fn per_source_limits_are_global_defaults_a_route_may_replace() {
        let s = settings(
            "per_source: {max_connections: 10, rate: 50/s, burst: 100}
routes:
  - {name: a, listen: 127.0.0.1:1, target: 'h:1'}
  - {name: b, listen: 127.0.0.1:2, target: 'h:1', per_source: {rate: 600/min, prefix_v6: 48}}
  - {name: c, listen: 127.0.0.1:3, target: 'h:1', per_source: {}}
",
        );
        let routes = s.routes().unwrap();
        let a = &routes[0].per_source;
        assert_eq!((a.max_connections, a.burst()), (Some(10), 100));
        let b = &routes[1].per_source;
        assert_eq!(b.max_connections, None);
        assert_eq!(b.rate.unwrap().to_string(), "600/min");
        assert_eq!((b.burst(), b.prefix_v4, b.prefix_v6), (600, 32, 48));
        assert!(!routes[2].per_source.is_on());
        // Off unless configured.
        let quick = settings("target: 'h:1'\n").routes().unwrap();
        assert!(!quick[0].per_source.is_on());
        // A bad value is named at its key.
        let e = common::yaml::from_str::<Settings>(
            "routes:\n  - {name: a, listen: 127.0.0.1:1, target: 'h:1', per_source: {burst: 0, rate: 5/s}}\n",
        )
        .unwrap_err();
        assert!(e.contains("burst must be at least 1"), "{e}");
    }

    #[test]
    fn bad_names_are_reported_where_written() {
        for (yaml, says) in [
            ("sni: ['a b']", "is not a DNS name"),
            (
                "sni: 'a.*.example.com'",
                "a wildcard stands for one whole label",
            ),
            ("target_tls: {server_name: '*.x'}", "is not a DNS name"),
            ("tls: {client_names: [a..b]}", "\"a..b\" is not a name"),
        ] {
            let text =
                format!("routes:\n  - {{name: a, listen: 127.0.0.1:1, target: 'h:1', {yaml}}}\n");
            let e = common::yaml::from_str::<Settings>(&text).unwrap_err();
            assert!(e.contains(says), "{yaml}: {e}");
        }
    }
}
