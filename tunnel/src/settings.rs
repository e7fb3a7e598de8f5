//! The tunnel's settings: global defaults, and routes, each a name, the
//! addresses it listens on and the target it forwards to.
//!
//! The quick form (`--listen` and `--target`, or the original `TUNNEL_HOST`
//! and `TUNNEL_PORT` settings) makes one route named `default`; a
//! configuration file can hold many. Per-route values left out take the
//! global ones.

use std::fmt;

use common::config::ConfigError;
use common::settings::{
    at_least_one, at_least_one_opt, nonzero_duration, nonzero_duration_opt, AccessList,
    AddressList, List, ListenAddr, LogSettings, Period,
};

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// The program's name: its configuration prefix is `TUNNEL_`.
pub const PROGRAM: &str = "tunnel";

/// A target to connect to: `HOST:PORT`, resolved at every connect.
pub use common::settings::HostPort as Target;

/// One or more listen addresses: a single string or a list.
pub type ListenList = List<ListenAddr>;

/// One or more targets: a `HOST:PORT` string (several separated by commas)
/// or a list.
pub type TargetList = List<Target>;

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
}

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
    /// Default connect timeout.
    #[serde(deserialize_with = "nonzero_duration")]
    pub connect_timeout: Period,
    /// Default idle timeout.
    #[serde(deserialize_with = "nonzero_duration")]
    pub idle_timeout: Period,
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
    /// How long live connections may take to finish on SIGTERM.
    pub shutdown_grace: Period,
    /// Where access-log lines go besides the log: a file path, or none.
    pub access_log: Option<String>,
    /// Also log connections that carried no byte (health checks, probes).
    pub log_empty_connections: bool,
    /// A file to write the process id to.
    pub pid_file: Option<String>,
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
            connect_timeout: Period::from_secs(5),
            idle_timeout: Period::from_secs(3600),
            keepalive: Keepalive::Default,
            max_connections: 10_000,
            balance: Policy::default(),
            health_check: None,
            admin: None,
            admin_allow: AddressList::default(),
            admin_deny: AddressList::default(),
            workers: 1,
            instance: format!("{PROGRAM}_IN_0"),
            shutdown_grace: Period::from_secs(30),
            access_log: None,
            log_empty_connections: false,
            pid_file: None,
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
}

impl Settings {
    /// A route's health checks: its own setting, else the global one, else
    /// on when it has several targets.
    fn health(&self, own: Option<HealthSetting>, targets: usize) -> (HealthCheck, bool) {
        match own.or(self.health_check) {
            Some(HealthSetting::On(h)) => (h, true),
            Some(HealthSetting::Off) => (HealthCheck::default(), false),
            None => (HealthCheck::default(), targets > 1),
        }
    }

    /// The routes to run, with global values filled in; every problem is
    /// reported (with the key it concerns).
    pub fn routes(&self) -> Result<Vec<Route>, Vec<ConfigError>> {
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
        let mut routes = Vec::new();
        if self.routes.is_empty() {
            let targets = match (&self.target, &self.host, self.port) {
                (Some(targets), _, _) => Some(targets.0.clone()),
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
                });
            }
        } else {
            if self.target.is_some() || self.host.is_some() {
                errors.push(problem(
                    "target",
                    "both a quick-form target and routes are given; put the target in a route"
                        .into(),
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
                let targets = match (&r.target, &r.targets) {
                    (Some(_), Some(_)) => {
                        errors.push(problem(
                            &key("targets"),
                            format!("route {name} has both target and targets; keep one"),
                        ));
                        continue;
                    }
                    (Some(t), None) | (None, Some(t)) if !t.0.is_empty() => t.0.clone(),
                    _ => {
                        errors.push(problem(
                            &key("target"),
                            format!("route {name} has no target; add target: HOST:PORT"),
                        ));
                        continue;
                    }
                };
                let (health, checks) = self.health(r.health_check, targets.len());
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
                    idle_timeout: r.idle_timeout.unwrap_or(self.idle_timeout),
                    keepalive: r.keepalive.unwrap_or(self.keepalive),
                    max_connections: r.max_connections.unwrap_or(self.max_connections),
                });
            }
        }
        // Names and addresses must be unique across routes.
        let mut seen_names = std::collections::HashMap::new();
        let mut seen_addrs = std::collections::HashMap::new();
        for (i, route) in routes.iter().enumerate() {
            if let Some(other) = seen_names.insert(route.name.clone(), i) {
                errors.push(problem(
                    &format!("routes.{i}.name"),
                    format!(
                        "route name {} is used twice (routes {} and {})",
                        route.name,
                        other + 1,
                        i + 1
                    ),
                ));
            }
            for addr in &route.listen {
                if let Some(other) = seen_addrs.insert(*addr, route.name.clone()) {
                    errors.push(problem(
                        &format!("routes.{i}.listen"),
                        format!("{addr} is claimed by routes {other} and {}", route.name),
                    ));
                    continue;
                }
                // 0.0.0.0:P takes port P on every IPv4 address (and [::]:P
                // on every address): no other listener can have it.
                let clash = routes.iter().take(i + 1).find_map(|earlier| {
                    earlier
                        .listen
                        .iter()
                        .take_while(|a| !(earlier.name == route.name && *a == addr))
                        .find(|a| *a != addr && overlaps(**a, *addr))
                        .map(|a| (earlier.name.clone(), *a))
                });
                if let Some((other, wide)) = clash {
                    errors.push(problem(
                        &format!("routes.{i}.listen"),
                        format!("{addr} (route {}) overlaps {wide} (route {other}): a wildcard address takes the port on every address; keep one of them or use another port", route.name),
                    ));
                }
            }
        }
        if errors.is_empty() {
            Ok(routes)
        } else {
            Err(errors)
        }
    }
}

impl common::config::ProgramSettings for Settings {
    /// With routes, the quick form's keys are not used; without, `routes`.
    fn unused(&self, key: &str) -> bool {
        match key {
            "listen" | "target" | "host" | "port" => !self.routes.is_empty(),
            "routes" => self.routes.is_empty(),
            _ => false,
        }
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
