//! The programs a role can run, and what the service definition needs to
//! know of each: its environment prefix, its endpoint and the setting that
//! places it, and which settings it accepts.
//!
//! Settings are checked against the program's own settings type, so a typo
//! or a bad value is caught by `deploy check`, not by a crashing instance.

use std::collections::BTreeMap;

use figment::providers::Serialized;
use figment::Figment;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use common::config::env_prefix;
use common::discovery::Topology;
use common::settings::{AddressList, AddressPattern, HostPort};

/// Settings by key, as a definition gives them.
pub type SettingsMap = BTreeMap<String, Value>;

/// An entry of an allow list: a network, or a pattern matched against
/// the client's address as text (which a load balancer's source ranges
/// cannot express).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed {
    /// A CIDR network.
    Network(String),
    /// A wildcard pattern such as `10.0.*.1`.
    Pattern(String),
}

impl Allowed {
    /// The entry as written in settings.
    pub fn text(&self) -> &str {
        match self {
            Allowed::Network(text) | Allowed::Pattern(text) => text,
        }
    }
}

/// A problem with one setting: its key and what is wrong.
pub type SettingProblem = (String, String);

/// A program of this workspace that can run as a role.
#[derive(Debug, Clone, Copy)]
pub struct Program {
    /// The binary's name.
    pub name: &'static str,
    /// Its endpoint's name, as in the original service definition.
    pub endpoint: &'static str,
    /// The port it listens on by default.
    pub default_port: u16,
    defaults: fn() -> Value,
    check: fn(&SettingsMap) -> Vec<SettingProblem>,
    targets: fn(&SettingsMap, &Topology) -> Result<Vec<HostPort>, String>,
}

/// Every program a role can name.
pub const PROGRAMS: [Program; 3] = [
    Program {
        name: "echo-server",
        endpoint: echo_server::ENDPOINT,
        default_port: 1234,
        defaults: defaults::<echo_server::Settings>,
        check: check::<echo_server::Settings>,
        targets: no_targets,
    },
    Program {
        name: "square-server",
        endpoint: square_server::ENDPOINT,
        default_port: 2345,
        defaults: defaults::<square_server::Settings>,
        check: check::<square_server::Settings>,
        targets: no_targets,
    },
    Program {
        name: "tunnel",
        endpoint: "Incoming",
        default_port: 1001,
        defaults: defaults::<tunnel::Settings>,
        check: check::<tunnel::Settings>,
        targets: tunnel_targets,
    },
];

/// Settings the fabric and the manifests set per instance; a definition
/// may not set them.
pub const MANAGED: [&str; 4] = ["listen", "instance", "topology", "allow_roles"];

impl Program {
    /// The program called `name`.
    pub fn named(name: &str) -> Option<Program> {
        PROGRAMS.iter().copied().find(|p| p.name == name)
    }

    /// The names of all programs, for messages.
    pub fn names() -> String {
        PROGRAMS.map(|p| p.name).join(", ")
    }

    /// Its environment prefix (`ECHO_SERVER_`).
    pub fn prefix(&self) -> String {
        env_prefix(self.name)
    }

    /// The settings it knows, sorted.
    pub fn known_settings(&self) -> Vec<String> {
        match (self.defaults)() {
            Value::Object(map) => map.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// Problems with `settings` for this program: `(key, message)`.
    pub fn check_settings(&self, settings: &BTreeMap<String, Value>) -> Vec<(String, String)> {
        let known = self.known_settings();
        let mut problems = Vec::new();
        let mut usable = BTreeMap::new();
        for (key, value) in settings {
            if MANAGED.contains(&key.as_str()) {
                problems.push((
                    key.clone(),
                    format!("{key} is set for each instance by the fabric and the rendering (from the role's endpoints and the topology); remove it"),
                ));
            } else if !known.contains(key) {
                problems.push((
                    key.clone(),
                    format!(
                        "{} has no setting {key}; it knows: {}",
                        self.name,
                        known
                            .iter()
                            .filter(|k| !MANAGED.contains(&k.as_str()))
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            } else {
                usable.insert(key.clone(), value.clone());
            }
        }
        problems.extend((self.check)(&usable));
        problems
    }

    /// Where the program connects to with `settings` (a tunnel's targets),
    /// or why it has nowhere to connect. Settings are taken as checked.
    pub fn targets(
        &self,
        settings: &SettingsMap,
        topology: &Topology,
    ) -> Result<Vec<HostPort>, String> {
        (self.targets)(settings, topology)
    }

    /// The client networks `settings` let in (`allow`), empty for
    /// everyone: networks as CIDRs, rinetd-style patterns as written.
    pub fn allowed(&self, settings: &SettingsMap) -> Vec<Allowed> {
        #[derive(serde::Deserialize)]
        struct Allow {
            #[serde(default)]
            allow: AddressList,
        }
        let Some(value) = settings.get("allow") else {
            return Vec::new();
        };
        Figment::from(Serialized::default("allow", env_form(value)))
            .extract::<Allow>()
            .map(|a| {
                a.allow
                    .0
                    .iter()
                    .map(|entry| match entry {
                        AddressPattern::Network(net) => Allowed::Network(net.to_string()),
                        other => Allowed::Pattern(other.to_string()),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The environment an instance gets for `settings`: `PREFIX_KEY=value`,
    /// lists joined with commas, nested keys joined with `__`.
    pub fn environment(&self, settings: &BTreeMap<String, Value>) -> Vec<(String, String)> {
        let mut env = Vec::new();
        for (key, value) in settings {
            flatten(
                &format!("{}{}", self.prefix(), key.to_uppercase()),
                value,
                &mut env,
            );
        }
        env
    }
}

fn flatten(name: &str, value: &Value, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                flatten(&format!("{name}__{}", k.to_uppercase()), v, out);
            }
        }
        other => out.push((name.to_string(), scalar(other))),
    }
}

/// A value as an environment variable holds it.
pub fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        Value::Array(items) => items.iter().map(scalar).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

fn defaults<S: Serialize + Default>() -> Value {
    serde_json::to_value(S::default()).unwrap_or(Value::Null)
}

fn no_targets(_: &SettingsMap, _: &Topology) -> Result<Vec<HostPort>, String> {
    Ok(Vec::new())
}

/// The targets of every route of a tunnel with `settings`, peers named
/// `role/Endpoint` looked up in `topology`.
fn tunnel_targets(settings: &SettingsMap, topology: &Topology) -> Result<Vec<HostPort>, String> {
    let given = |key: &str| settings.get(key).is_some_and(|v| !v.is_null());
    if !["target", "host", "port", "routes"]
        .iter()
        .any(|k| given(k))
    {
        return Err("a tunnel with no target: give it host and port, or target, or routes".into());
    }
    let figment = settings.iter().fold(
        Figment::from(Serialized::defaults(tunnel::Settings::default())),
        |figment, (key, value)| figment.merge(Serialized::default(key, env_form(value))),
    );
    let settings: tunnel::Settings = figment.extract().map_err(|e| e.to_string())?;
    let routes = settings.routes_in(Some(topology)).map_err(|errors| {
        errors
            .iter()
            .map(|e| e.message.clone())
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    Ok(routes.into_iter().flat_map(|r| r.targets).collect())
}

/// Each setting tried on its own over the defaults, so every bad one is
/// reported.
fn check<S: Serialize + DeserializeOwned + Default>(
    settings: &BTreeMap<String, Value>,
) -> Vec<(String, String)> {
    // Values arrive as an environment variable would carry them, so they
    // are checked in that form, the way each program checks its own.
    let given: figment::value::Dict = settings
        .iter()
        .map(|(key, value)| (key.clone(), env_form(value)))
        .collect();
    common::config::check_settings::<S>(&given, |_| false)
        .into_iter()
        .map(|(path, message)| match path.as_slice() {
            [key] => (key.clone(), message),
            [key, ..] => (key.clone(), format!("{}: {message}", path.join("."))),
            [] => (String::new(), message),
        })
        .collect()
}

/// A value parsed the way figment reads an environment variable, so the
/// check sees what the instance will see.
fn env_form(value: &Value) -> figment::value::Value {
    match value {
        Value::Object(map) => {
            let dict: figment::value::Dict =
                map.iter().map(|(k, v)| (k.clone(), env_form(v))).collect();
            dict.into()
        }
        other => scalar(other)
            .parse::<figment::value::Value>()
            .unwrap_or_else(|_| scalar(other).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, Value)]) -> BTreeMap<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn known_settings_come_from_the_programs() {
        let echo = Program::named("echo-server").unwrap();
        assert!(echo.known_settings().contains(&"idle_timeout".to_string()));
        assert!(echo.known_settings().contains(&"utc".to_string()));
        let tunnel = Program::named("tunnel").unwrap();
        assert!(tunnel.known_settings().contains(&"host".to_string()));
    }

    #[test]
    fn bad_and_unknown_settings_are_named() {
        let echo = Program::named("echo-server").unwrap();
        let problems = echo.check_settings(&settings(&[
            ("idle_timeout", Value::from("soon")),
            ("utc", Value::from(true)),
            ("colour", Value::from("blue")),
            ("listen", Value::from("0.0.0.0:1")),
        ]));
        let keys: Vec<&str> = problems.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["colour", "listen", "idle_timeout"], "{problems:?}");
        assert!(problems[0].1.contains("it knows:"), "{problems:?}");
        assert!(problems[2].1.contains("30s"), "{problems:?}");
    }

    #[test]
    fn environment_joins_lists_and_nests() {
        let tunnel = Program::named("tunnel").unwrap();
        let env = tunnel.environment(&settings(&[
            ("deny", serde_json::json!(["10.0.0.0/8", "::1"])),
            ("health_check", serde_json::json!({"interval": "1s"})),
            ("port", Value::from(5432)),
        ]));
        assert_eq!(
            env,
            [
                ("TUNNEL_DENY".to_string(), "10.0.0.0/8,::1".to_string()),
                (
                    "TUNNEL_HEALTH_CHECK__INTERVAL".to_string(),
                    "1s".to_string()
                ),
                ("TUNNEL_PORT".to_string(), "5432".to_string()),
            ]
        );
        assert!(tunnel
            .check_settings(&settings(&[
                ("port", Value::from(5432)),
                ("host", Value::from("db"))
            ]))
            .is_empty());
    }
}
