//! The service definition (`deploy/service.yaml`): roles, their program,
//! instance count, endpoints (public or internal, with a port) and
//! settings; the images they run from; and a layer of settings per
//! environment (the local fabric, Kubernetes, compose), so one definition
//! points the local tunnel at `127.0.0.1:5432` and the cluster's at the
//! real database. The Kubernetes layer can also mount Secrets into a
//! role's pods, for the files TLS settings name there.
//!
//! [`Definition::load`] reads and checks one, reporting every problem at
//! once with its line and column, schema mistakes included; then
//! [`Definition::findings`] checks what one environment would run.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use common::yaml::Pos;
use serde::Deserialize;
use serde_json::Value;

use crate::programs::{Allowed, Program};

mod files;
mod names;
mod read;

pub use files::{file_settings, FileSetting};
pub use names::{
    is_loopback, mount_path_problem, name_problem, port_name_problem, registry_problem,
    secret_name_problem, tag_problem, NameUse,
};

/// Who can reach an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Visibility {
    /// Reachable from outside: a load balancer on all addresses.
    Public,
    /// Reachable only from inside the service (loopback in the fabric,
    /// the cluster in Kubernetes).
    Internal,
}

/// A named endpoint of a role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Its name (`EchoEndpoint`).
    pub name: String,
    /// Public or internal.
    pub visibility: Visibility,
    /// The port clients use.
    pub port: u16,
    /// Which roles may call it (internal endpoints only); `None`: every
    /// role, and in a cluster every pod of the cluster.
    pub allow_from: Option<AllowFrom>,
    /// Where it is written.
    pub pos: Pos,
}

/// The roles whose instances alone may call an internal endpoint
/// (`allow_from: [tunnel]`): in Kubernetes, a NetworkPolicy admits only
/// their pods to its port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowFrom {
    /// The roles, each with where it is written; checked to be roles of
    /// the definition, each once, at least one.
    pub roles: Vec<(String, Pos)>,
    /// Where the `allow_from` key is written.
    pub pos: Pos,
}

impl Endpoint {
    /// The names of the roles that may call it, when it says.
    pub fn allowed_roles(&self) -> Option<Vec<&str>> {
        self.allow_from
            .as_ref()
            .map(|a| a.roles.iter().map(|(name, _)| name.as_str()).collect())
    }
}

/// A role: a program run as some number of identical instances.
#[derive(Debug, Clone, PartialEq)]
pub struct Role {
    /// The role's name, unique in the definition.
    pub name: String,
    /// Which program it runs.
    pub program: String,
    /// How many instances.
    pub instances: i64,
    /// Its endpoints.
    pub endpoints: Vec<Endpoint>,
    /// Settings, handed to each instance as `<PREFIX>_<KEY>`.
    pub settings: BTreeMap<String, Value>,
    /// Secrets mounted into its pods: only in Kubernetes, from that
    /// environment's layer.
    pub secrets: Vec<SecretMount>,
    /// Where the role and its parts are written: `""` for the role,
    /// `name`, `program`, `instances`, `settings` and `settings.<key>`.
    pub places: BTreeMap<String, Pos>,
}

/// A Kubernetes Secret mounted read-only into a role's pods, so settings
/// can name the files it holds (`tls_cert: /etc/tls/square/tls.crt`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretMount {
    /// The Secret's name, in the service's namespace.
    pub name: String,
    /// The directory it is mounted at; each of its keys is a file there.
    pub path: String,
    /// Where it is written.
    pub pos: Pos,
}

/// Where a definition runs; each can have its own layer of settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Environment {
    /// `deploy run`: every instance on this machine.
    Local,
    /// `deploy render kubernetes`.
    Kubernetes,
    /// `deploy render compose`.
    Compose,
}

impl Environment {
    /// Every environment, in the order they are checked.
    pub const ALL: [Environment; 3] = [
        Environment::Local,
        Environment::Kubernetes,
        Environment::Compose,
    ];

    /// Its name in the definition (`kubernetes`).
    pub fn name(self) -> &'static str {
        match self {
            Environment::Local => "local",
            Environment::Kubernetes => "kubernetes",
            Environment::Compose => "compose",
        }
    }

    /// Whether its instances run apart from this machine, where loopback
    /// is the instance itself.
    pub fn is_cluster(self) -> bool {
        self != Environment::Local
    }

    fn named(name: &str) -> Option<Environment> {
        Environment::ALL.into_iter().find(|e| e.name() == name)
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What one environment changes for one role.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoleLayer {
    /// Instances there, in place of the role's.
    pub instances: Option<(i64, Pos)>,
    /// Settings there, over the role's, key by key; `null` removes one.
    pub settings: BTreeMap<String, (Value, Pos)>,
    /// Secrets mounted there (Kubernetes only), by name.
    pub secrets: Vec<SecretMount>,
}

impl RoleLayer {
    /// Lays this layer over `role`.
    fn apply(&self, role: &mut Role) {
        if let Some((instances, pos)) = self.instances {
            role.instances = instances;
            role.places.insert("instances".into(), pos);
        }
        for (key, (value, pos)) in &self.settings {
            if value.is_null() {
                role.settings.remove(key);
            } else {
                role.settings.insert(key.clone(), value.clone());
            }
            role.places.insert(format!("settings.{key}"), *pos);
        }
        if !self.secrets.is_empty() {
            role.secrets = self.secrets.clone();
        }
    }
}

/// Where the images come from: `<registry>/<program>:<tag>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// The repository prefix (`ghcr.io/acme/tcp-roles`); by default the
    /// service's name, for images built on the machine that runs them.
    pub registry: String,
    /// The tag; by default the version of these programs.
    pub tag: String,
}

impl Image {
    /// The image of `program`, without its tag.
    pub fn repository(&self, program: &str) -> String {
        format!("{}/{program}", self.registry)
    }
}

/// A whole service definition.
#[derive(Debug, Clone, PartialEq)]
pub struct Definition {
    /// The file it was read from, for messages.
    pub file: PathBuf,
    /// The service's name; names the Kubernetes resources' common label.
    pub name: String,
    /// Where the images come from.
    pub image: Image,
    /// Its roles.
    pub roles: Vec<Role>,
    /// Per environment, per role name, what changes there.
    pub environments: BTreeMap<Environment, BTreeMap<String, RoleLayer>>,
    /// Which environment's layer has been applied, if any.
    pub applied: Option<Environment>,
}

/// How bad a problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// It cannot run (or render) this way.
    Error,
    /// It runs, but probably not as meant.
    Warning,
}

/// A problem in a definition, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file.
    pub file: PathBuf,
    /// Line and column, when known.
    pub pos: Option<Pos>,
    /// Error or warning.
    pub severity: Severity,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(pos) = self.pos {
            write!(f, ":{pos}")?;
        }
        if self.severity == Severity::Warning {
            f.write_str(": warning")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in a definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        common::config::write_problems(f, "", "", &self.0)
    }
}

impl std::error::Error for Problems {}

impl Problems {
    /// Whether any of them is an error.
    pub fn has_errors(&self) -> bool {
        self.0.iter().any(|p| p.severity == Severity::Error)
    }
}

/// The most instances a role may have: a Deployment's replicas are a
/// 32-bit number.
pub const MAX_INSTANCES: i64 = i32::MAX as i64;

/// The port of the tunnel's admin endpoint in a cluster, where its
/// readiness is probed, unless its settings name one.
pub const ADMIN_PORT: u16 = 9900;

impl Role {
    /// The program it runs (checked by [`Definition::load`]).
    pub fn program(&self) -> Program {
        Program::named(&self.program).expect("a checked definition names known programs")
    }

    /// Its instance count (checked to be at least 1).
    pub fn count(&self) -> usize {
        self.instances.max(1) as usize
    }

    /// The id of instance `index`, in the original platform's form
    /// (`echo-server_IN_0`).
    pub fn instance_id(&self, index: usize) -> String {
        format!("{}_IN_{index}", self.name)
    }

    /// The roles whose instances alone may call this role's instances:
    /// when every endpoint of the role has `allow_from`, all that they list
    /// (an instance serves all its role's endpoints, so one endpoint open
    /// to every role opens the instance to every role; the endpoint's own
    /// balancer still holds to its own list). `None`: every role may.
    pub fn allowed_callers(&self) -> Option<Vec<String>> {
        if self.endpoints.is_empty() {
            return None;
        }
        let mut roles: Vec<String> = Vec::new();
        for endpoint in &self.endpoints {
            for name in endpoint.allowed_roles()? {
                if !roles.iter().any(|r| r == name) {
                    roles.push(name.to_string());
                }
            }
        }
        Some(roles)
    }

    /// Where `part` of the role is written, else the role itself.
    pub fn place(&self, part: &str) -> Option<Pos> {
        self.places.get(part).or(self.places.get("")).copied()
    }
}

impl Definition {
    /// Reads and checks the definition in `path`.
    pub fn load(path: &Path) -> Result<Definition, Problems> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Problems(vec![Problem {
                file: path.to_path_buf(),
                pos: None,
                severity: Severity::Error,
                message: format!("cannot read the service definition: {e}"),
            }])
        })?;
        Definition::parse(&text, path)
    }

    /// Parses and checks a definition; `path` names it in messages. Every
    /// problem is reported, each at its line and column.
    pub fn parse(text: &str, path: &Path) -> Result<Definition, Problems> {
        read::definition(text, path)
    }

    /// The roles and endpoints peers can name (`role/Endpoint`), for
    /// checking the names: each endpoint at its role's name and its port,
    /// as a cluster's DNS would give it, with no instances listed.
    pub fn peer_topology(&self) -> common::discovery::Topology {
        let mut topology = common::discovery::Topology::default();
        for role in &self.roles {
            let endpoints = topology.roles.entry(role.name.clone()).or_default();
            for endpoint in &role.endpoints {
                endpoints.insert(
                    endpoint.name.clone(),
                    common::discovery::EndpointEntry {
                        address: format!("{}:{}", role.name, endpoint.port),
                        instances: None,
                        proxy: None,
                    },
                );
            }
        }
        topology
    }

    /// The definition as it runs in `environment`: that environment's
    /// instances, settings and Secrets in place of the roles' own. On this
    /// machine, a relative file path in the settings is taken from the
    /// definition's directory.
    pub fn in_environment(&self, environment: Environment) -> Definition {
        let mut applied = self.clone();
        applied.applied = Some(environment);
        let layers = self.environments.get(&environment);
        for role in &mut applied.roles {
            if let Some(layer) = layers.and_then(|l| l.get(&role.name)) {
                layer.apply(role);
            }
            if environment == Environment::Local {
                files::resolve(
                    &mut role.settings,
                    self.file.parent().unwrap_or(Path::new("")),
                );
            }
        }
        applied
    }

    /// What is wrong or worth knowing about running in `environment`
    /// (errors stop `deploy run` and `deploy render`; warnings do not).
    pub fn findings(&self, environment: Environment) -> Vec<Problem> {
        self.findings_in(environment)
            .into_iter()
            .map(|(pos, severity, text)| Problem {
                file: self.file.clone(),
                pos,
                severity,
                message: format!(
                    "{environment}: {}",
                    text.replace("{env}", environment.name())
                ),
            })
            .collect()
    }

    /// The findings of one environment, as templates where `{env}` stands
    /// for the environment's name, so the same finding in several
    /// environments is reported once.
    fn findings_in(&self, environment: Environment) -> Vec<Finding> {
        let applied = self.in_environment(environment);
        let topology = applied.peer_topology();
        let mut found = Vec::new();
        for role in &applied.roles {
            let program = role.program();
            let hint = |key: &str| {
                format!(
                    "set environments.{{env}}.roles.{}.settings.{key}",
                    role.name
                )
            };
            match program.targets(&role.settings, &topology) {
                Err(why) => found.push((
                    role.place("settings"),
                    Severity::Error,
                    format!("role {}: {why}", role.name),
                )),
                Ok(targets) => {
                    for target in targets {
                        if environment.is_cluster() && is_loopback(&target.host) {
                            let pos = [
                                "settings.host",
                                "settings.target",
                                "settings.targets",
                                "settings.routes",
                            ]
                            .iter()
                            .find_map(|k| role.places.get(*k))
                            .copied()
                            .or(role.place("settings"));
                            found.push((
                                pos,
                                Severity::Error,
                                format!(
                                    "role {} would forward to {target}, which there is the instance itself; {} (or target) to where the service really is, as seen from there",
                                    role.name,
                                    hint("host")
                                ),
                            ));
                        }
                    }
                }
            }
            found.extend(files::findings(role, environment));
            if program.name == "tunnel" {
                for endpoint in &role.endpoints {
                    if endpoint.visibility == Visibility::Public
                        && program.allowed(&role.settings).is_empty()
                    {
                        found.push((
                            Some(endpoint.pos),
                            Severity::Warning,
                            format!(
                                "public endpoint {}/{} has no allow list: whatever it reaches (a database) is open to every network (in Kubernetes, the internet through a LoadBalancer); list its clients' networks in the role's allow setting, or make the endpoint internal",
                                role.name,
                                endpoint.name,
                            ),
                        ));
                    }
                }
                if environment == Environment::Kubernetes {
                    for endpoint in &role.endpoints {
                        if endpoint.visibility != Visibility::Public {
                            continue;
                        }
                        for allowed in program.allowed(&role.settings) {
                            if let Allowed::Pattern(pattern) = allowed {
                                found.push((
                                    role.place("settings.allow"),
                                    Severity::Error,
                                    format!(
                                        "role {}: allow entry {pattern:?} is a pattern, which a LoadBalancer's source ranges cannot hold; {} to networks (CIDR)",
                                        role.name,
                                        hint("allow")
                                    ),
                                ));
                            }
                        }
                    }
                    if let Some(problem) = admin_problem(role) {
                        found.push((role.place("settings.admin"), Severity::Error, problem));
                    }
                }
            }
        }
        found
    }

    /// Every finding in every environment (the same one in several
    /// environments once), and the notes that hold in all of them.
    pub fn all_findings(&self) -> Vec<Problem> {
        let mut found: Vec<Problem> = Vec::new();
        for role in &self.roles {
            if role.endpoints.is_empty() {
                found.push(Problem {
                    file: self.file.clone(),
                    pos: role.place(""),
                    severity: Severity::Warning,
                    message: format!(
                        "role {} has no endpoint: it runs its instances, but nothing can connect to them (in Kubernetes a Deployment without a Service or probes)",
                        role.name
                    ),
                });
            }
        }
        let mut grouped: Vec<(Finding, Vec<Environment>)> = Vec::new();
        for environment in Environment::ALL {
            for finding in self.findings_in(environment) {
                match grouped.iter_mut().find(|(f, _)| *f == finding) {
                    Some((_, envs)) => envs.push(environment),
                    None => grouped.push((finding, vec![environment])),
                }
            }
        }
        for ((pos, severity, text), envs) in grouped {
            let names: Vec<&str> = envs.iter().map(|e| e.name()).collect();
            let env = match names.as_slice() {
                [one] => one.to_string(),
                many => format!("<{}>", many.join("|")),
            };
            found.push(Problem {
                file: self.file.clone(),
                pos,
                severity,
                message: format!("{}: {}", names.join(", "), text.replace("{env}", &env)),
            });
        }
        found.sort_by_key(|p| p.pos);
        found
    }
}

/// A finding in one environment: where, how bad, and a message where
/// `{env}` stands for the environment's name.
type Finding = (Option<Pos>, Severity, String);

/// The admin address of a tunnel role in a cluster: its own, which must
/// listen on every address to be probed, or [`ADMIN_PORT`].
pub fn admin_port(role: &Role) -> Result<u16, String> {
    match role.settings.get("admin") {
        None | Some(Value::Null) => Ok(ADMIN_PORT),
        Some(value) => {
            let text = crate::programs::scalar(value);
            let addr: std::net::SocketAddr = text.parse().map_err(|_| {
                format!("admin {text:?} is not an address such as 0.0.0.0:{ADMIN_PORT}")
            })?;
            if !addr.ip().is_unspecified() {
                return Err(format!(
                    "admin {addr} cannot be probed by the kubelet; listen on 0.0.0.0:{} (or leave admin out for 0.0.0.0:{ADMIN_PORT})",
                    addr.port()
                ));
            }
            Ok(addr.port())
        }
    }
}

fn admin_problem(role: &Role) -> Option<String> {
    let port = match admin_port(role) {
        Ok(port) => port,
        Err(why) => return Some(format!("role {}: {why}", role.name)),
    };
    role.endpoints
        .iter()
        .find(|e| crate::render::container_port(e.port) == port)
        .map(|e| {
            format!(
                "role {}: endpoint {} and the admin endpoint (readiness, metrics) would both listen on port {port}; set environments.kubernetes.roles.{}.settings.admin to 0.0.0.0:<another port>",
                role.name, e.name, role.name
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "name: demo\nroles:\n  - name: echo\n    program: echo-server\n    instances: 2\n    endpoints:\n      - name: EchoEndpoint\n        visibility: public\n        port: 1234\n    settings:\n      utc: true\n";

    #[test]
    fn a_good_definition_loads() {
        let d = Definition::parse(GOOD, Path::new("s.yaml")).unwrap();
        assert_eq!(d.roles[0].count(), 2);
        assert_eq!(d.roles[0].instance_id(1), "echo_IN_1");
        assert_eq!(d.roles[0].endpoints[0].visibility, Visibility::Public);
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let text = "name: demo\nroles:\n  - name: echo\n    program: echo-server\n    instances: 0\n    endpoints:\n      - name: EchoEndpoint\n        visibility: public\n        port: 1234\n    settings:\n      idle_timeout: soonish\n      colour: blue\n  - name: math\n    program: square-server\n    endpoints:\n      - name: SquareEndpoint\n        visibility: internal\n        port: 1234\n  - name: db\n    program: postgres\n";
        let problems = Definition::parse(text, Path::new("s.yaml")).unwrap_err().0;
        let shown: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(problems.len(), 5, "{shown:#?}");
        assert!(
            shown[0].starts_with("s.yaml:5:5: role echo has 0 instances"),
            "{shown:#?}"
        );
        assert!(
            shown
                .iter()
                .any(|s| s.starts_with("s.yaml:11:7: role echo: setting idle_timeout")),
            "{shown:#?}"
        );
        assert!(
            shown.iter().any(|s| s.starts_with(
                "s.yaml:12:7: role echo: setting colour: echo-server has no setting colour"
            )),
            "{shown:#?}"
        );
        assert!(
            shown.iter().any(|s| s.starts_with(
                "s.yaml:16:9: port 1234 is used by both echo/EchoEndpoint and math/SquareEndpoint"
            )),
            "{shown:#?}"
        );
        assert!(
            shown
                .iter()
                .any(|s| s.starts_with("s.yaml:20:5: role db: unknown program \"postgres\"")),
            "{shown:#?}"
        );
    }

    #[test]
    fn names_kubernetes_cannot_take_are_refused_with_their_line() {
        let text = "name: Demo\nroles:\n  - name: ../../etc\n    program: echo-server\n  - name: Echo_Server\n    program: echo-server\n  - name: 1echo\n    program: echo-server\n  - name: kustomization\n    program: echo-server\n  - name: sq\n    program: square-server\n    endpoints:\n      - name: SquareEndpoint\n        visibility: public\n        port: 2345\n  - name: sq-balancer\n    program: echo-server\n";
        let problems = Definition::parse(text, Path::new("s.yaml")).unwrap_err().0;
        let shown: Vec<String> = problems.iter().map(ToString::to_string).collect();
        let expected = [
            "s.yaml:1:7: service name \"Demo\" contains 'D'",
            "s.yaml:3:5: role name \"../../etc\" contains '.'; a role name names Kubernetes objects and files",
            "s.yaml:5:5: role name \"Echo_Server\" contains 'E'",
            "s.yaml:7:5: role name \"1echo\" does not start with a letter",
            "s.yaml:9:5: role name \"kustomization\" is taken",
            "s.yaml:17:5: role name \"sq-balancer\" is taken: the compose file names role sq's balancer so",
        ];
        assert_starts(&shown, &expected);
        assert!(
            shown[2].ends_with("(such as \"echo-server\")"),
            "{}",
            shown[2]
        );
        assert!(shown[1].ends_with("(such as \"etc\")"), "{}", shown[1]);
    }

    const CALLED: &str = "name: demo\nroles:\n  - name: sq\n    program: square-server\n    endpoints:\n      - name: SquareEndpoint\n        visibility: internal\n        port: 2345\n        allow_from: [gate, sq]\n  - name: gate\n    program: tunnel\n    endpoints: [{name: Incoming, visibility: public, port: 443}]\n    settings: {target: sq/SquareEndpoint, allow: [10.0.0.0/8]}\n";

    #[test]
    fn allow_from_names_the_roles_that_may_call_an_internal_endpoint() {
        let d = Definition::parse(CALLED, Path::new("s.yaml")).unwrap();
        let endpoint = &d.roles[0].endpoints[0];
        assert_eq!(endpoint.allowed_roles(), Some(vec!["gate", "sq"]));
        let allow = endpoint.allow_from.as_ref().unwrap();
        assert_eq!(allow.pos, Pos { line: 9, column: 9 });
        assert_eq!(
            allow.roles[1].1,
            Pos {
                line: 9,
                column: 28
            }
        );
        // Without it, every role may call.
        assert_eq!(d.roles[1].endpoints[0].allowed_roles(), None);
        // Every rendering holds to it: nothing to warn about.
        assert!(shown(CALLED).is_empty(), "{:?}", shown(CALLED));
    }

    #[test]
    fn allow_from_mistakes_are_reported_where_they_are() {
        let text = CALLED
            .replace("[gate, sq]", "[gate, gates, sq, gate, 7]")
            .replace("port: 443}]", "port: 443, allow_from: [sq]}]");
        let expected = [
            "s.yaml:9:28: role sq: endpoint SquareEndpoint: allow_from names \"gates\", which is no role of the definition; did you mean gate? the roles are sq, gate",
            "s.yaml:9:39: role sq: endpoint SquareEndpoint: allow_from names role gate twice; name each role once",
            "s.yaml:9:45: role sq: endpoint SquareEndpoint: allow_from: an entry is 7; it should be a role name",
            "s.yaml:12:65: role gate: endpoint Incoming: allow_from is for internal endpoints: a public one is called from outside, where there are no roles; to choose who may reach it, list their networks in the role's allow setting (allow: [203.0.113.0/24]), or make the endpoint internal",
        ];
        assert_starts(&shown(&text), &expected);
        // A role of its own is fine: its instances call each other.
        let text = CALLED.replace("[gate, sq]", "[sq]");
        let d = Definition::parse(&text, Path::new("s.yaml")).unwrap();
        assert!(d.findings(Environment::Kubernetes).is_empty());
        for empty in ["[]", "", "~"] {
            let text = CALLED.replace(" [gate, sq]", &format!(" {empty}"));
            assert_starts(
                &shown(&text),
                &["s.yaml:9:9: role sq: endpoint SquareEndpoint: allow_from names no role, so nothing could call the endpoint; list the roles that may call it (allow_from: [tunnel]), or leave allow_from out to let every role call it"],
            );
        }
        let text = CALLED.replace("[gate, sq]", "gate");
        assert_starts(
            &shown(&text),
            &["s.yaml:9:21: role sq: endpoint SquareEndpoint: allow_from should be a list of role names, such as [tunnel], not"],
        );
    }

    #[test]
    fn headless_service_names_are_kept_free_and_short_enough() {
        let long = "a".repeat(55);
        let text = format!("name: demo\nroles:\n  - name: {long}\n    program: echo-server\n    endpoints: [{{name: EchoEndpoint, visibility: public, port: 1234}}]\n  - name: sq\n    program: square-server\n    endpoints: [{{name: SquareEndpoint, visibility: public, port: 2345}}]\n  - name: sq-headless\n    program: echo-server\n    endpoints: [{{name: EchoEndpoint, visibility: public, port: 1235}}]\n  - name: default-deny\n    program: echo-server\n  - name: {}\n    program: echo-server\n", "b".repeat(63));
        let expected = [
            "s.yaml:3:5: role name \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\" is 55 characters long: its headless Service, aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-headless, would be longer than the 63 a Service name may have; use at most 54 for a role with an endpoint",
            "s.yaml:9:5: role name \"sq-headless\" is taken: `deploy render kubernetes` names role sq's headless Service so",
            "s.yaml:12:5: role name \"default-deny\" is taken: `deploy render kubernetes` names the namespace's default NetworkPolicy so",
        ];
        // The role of 63 characters has no endpoint, so no headless
        // Service, and is fine.
        assert_starts(&shown(&text), &expected);
    }

    #[test]
    fn kubernetes_names_follow_dns_labels() {
        for good in ["a", "echo", "echo-server-2", &"a".repeat(63)] {
            assert_eq!(name_problem(good, NameUse::Role), None, "{good}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "1a",
            "a.b",
            "a/b",
            "A",
            "é",
            &"a".repeat(64),
        ] {
            assert!(name_problem(bad, NameUse::Role).is_some(), "{bad}");
        }
        assert_eq!(name_problem("3tier", NameUse::Service), None);
        assert!(name_problem("3tier", NameUse::Role)
            .unwrap()
            .starts_with("does not start with a letter"));
        assert!(name_problem(&"b".repeat(64), NameUse::Service)
            .unwrap()
            .starts_with("is 64 characters long"));
    }

    #[test]
    fn every_endpoint_makes_a_kubernetes_port_name() {
        // Endpoint names must be the program's, and become port names
        // (IANA service names: at most 15 lower-case letters, digits, '-').
        for program in crate::programs::PROGRAMS {
            let port = crate::render::port_name(program.endpoint);
            assert!(
                !port.is_empty()
                    && port.len() <= 15
                    && port
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
                "{} -> {port}",
                program.endpoint
            );
        }
    }

    /// Each of `shown` starts with its `expected`, and there are as many.
    fn assert_starts(shown: &[String], expected: &[&str]) {
        assert_eq!(shown.len(), expected.len(), "{shown:#?}");
        for (shown, expected) in shown.iter().zip(expected) {
            assert!(shown.starts_with(expected), "{shown}\nexpected {expected}");
        }
    }

    fn shown(text: &str) -> Vec<String> {
        match Definition::parse(text, Path::new("s.yaml")) {
            Ok(d) => d.all_findings().iter().map(ToString::to_string).collect(),
            Err(problems) => problems.0.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn schema_mistakes_are_all_reported_where_they_are() {
        let shown = shown(
            "name: x\nimage: {tag: 1.10}\nroles:\n  - name: a\n    progam: tunnel\n    instances: many\n    endpoints: [{name: Incoming, visibility: publik, port: 70000}]\n  - name: b\n    program: echo-server\n    endpoints:\n      - name: EchoEndpoint\n        visibility: internal\n        port: 0\nenvironments: {staging: {}}\n",
        );
        let expected = [
            "s.yaml:2:14: image.tag reads as a number; quote it",
            "s.yaml:4:5: role a has no program; add one",
            "s.yaml:5:5: role a has no key \"progam\"; did you mean program?",
            "s.yaml:6:16: role a: instances is \"many\"; it should be a number of instances",
            "s.yaml:7:46: role a: endpoint Incoming: visibility is \"publik\"; it should be public or internal",
            "s.yaml:7:60: role a: endpoint Incoming: port is 70000; it should be a port number, 1 to 65535",
            "s.yaml:13:15: role b: endpoint EchoEndpoint: port 0 is no port",
            "s.yaml:14:16: environments has no key \"staging\"; its keys are local, kubernetes, compose",
        ];
        assert_starts(&shown, &expected);
    }

    #[test]
    fn not_yaml_is_one_problem_with_its_place() {
        let unclosed = shown("name: x\nroles: [\n");
        assert_eq!(unclosed.len(), 1, "{unclosed:#?}");
        assert!(
            unclosed[0].starts_with("s.yaml:2:8: not valid YAML"),
            "{unclosed:#?}"
        );
        let twice = shown("name: x\nroles: []\nname: y\n");
        assert!(
            twice[0].starts_with("s.yaml:3:1: not valid YAML"),
            "{twice:#?}"
        );
    }

    const FIREWALLED: &str = "name: db\nroles:\n  - name: tunnel\n    program: tunnel\n    endpoints: [{name: Incoming, visibility: internal, port: 1001}]\n    settings: {host: 127.0.0.1, port: 5432}\nenvironments:\n  kubernetes:\n    roles:\n      tunnel:\n        instances: 3\n        settings: {host: db.internal}\n";

    #[test]
    fn environments_layer_settings_over_the_roles() {
        let d = Definition::parse(FIREWALLED, Path::new("s.yaml")).unwrap();
        let local = d.in_environment(Environment::Local);
        assert_eq!(local.roles[0].settings["host"], "127.0.0.1");
        assert_eq!(local.roles[0].count(), 1);
        let cluster = d.in_environment(Environment::Kubernetes);
        assert_eq!(cluster.roles[0].settings["host"], "db.internal");
        assert_eq!(cluster.roles[0].settings["port"], 5432);
        assert_eq!(cluster.roles[0].count(), 3);
        assert_eq!(
            cluster.roles[0].place("settings.host"),
            Some(Pos {
                line: 12,
                column: 20
            })
        );
        assert!(d.findings(Environment::Kubernetes).is_empty());
        // Compose has no layer: its tunnel would forward to itself.
        let compose = d.findings(Environment::Compose);
        assert_eq!(compose.len(), 1, "{compose:#?}");
        assert!(compose[0].to_string().starts_with("s.yaml:6:16: compose: role tunnel would forward to 127.0.0.1:5432, which there is the instance itself; set environments.compose.roles.tunnel.settings.host"), "{}", compose[0]);
        assert_eq!(compose[0].severity, Severity::Error);
    }

    #[test]
    fn a_null_in_a_layer_removes_the_setting() {
        let text = FIREWALLED.replace(
            "settings: {host: db.internal}",
            "settings: {host: ~, port: ~, target: \"db:5432\"}",
        );
        let d = Definition::parse(&text, Path::new("s.yaml")).unwrap();
        let cluster = d.in_environment(Environment::Kubernetes);
        assert_eq!(cluster.roles[0].settings.get("host"), None);
        assert_eq!(cluster.roles[0].settings["target"], "db:5432");
        assert!(
            d.findings(Environment::Kubernetes).is_empty(),
            "{:?}",
            d.findings(Environment::Kubernetes)
        );
    }

    #[test]
    fn layers_are_checked_like_the_roles() {
        let text = FIREWALLED.replace(
            "settings: {host: db.internal}",
            "settings: {colour: red, idle_timeout: soon}\n      nobody: {instances: 2}",
        );
        let shown = shown(&text);
        let expected = [
            "s.yaml:12:20: environments.kubernetes.roles.tunnel: setting colour: tunnel has no setting colour",
            "s.yaml:12:33: environments.kubernetes.roles.tunnel: setting idle_timeout",
            "s.yaml:13:7: environments.kubernetes.roles.nobody: there is no role nobody; the roles are tunnel",
        ];
        assert_starts(&shown, &expected);
    }

    #[test]
    fn exposure_and_dead_ends_are_warned_about() {
        let text = "name: db\nroles:\n  - name: tunnel\n    program: tunnel\n    endpoints: [{name: Incoming, visibility: public, port: 1001}]\n    settings: {target: \"db.internal:5432\"}\n  - name: quiet\n    program: echo-server\n  - name: lost\n    program: tunnel\n    endpoints: [{name: Incoming, visibility: internal, port: 1002}]\n";
        let found = shown(text);
        let expected = [
            "s.yaml:5:17: warning: local, kubernetes, compose: public endpoint tunnel/Incoming has no allow list",
            "s.yaml:7:5: warning: role quiet has no endpoint",
            "s.yaml:9:5: local, kubernetes, compose: role lost: a tunnel with no target",
        ];
        assert_starts(&found, &expected);
        let allowed = text.replace(
            "{target: \"db.internal:5432\"}",
            "{target: \"db.internal:5432\", allow: [10.1.0.0/16]}",
        );
        assert!(!shown(&allowed).iter().any(|s| s.contains("allow list")));
        // A rinetd-style pattern: the tunnel matches it, a LoadBalancer's
        // source ranges cannot hold it.
        let pattern = text.replace(
            "{target: \"db.internal:5432\"}",
            "{target: \"db.internal:5432\", allow: [\"10.1.*.*\"]}",
        );
        let found = shown(&pattern);
        assert!(
            !found.iter().any(|s| s.contains("allow list")),
            "{found:#?}"
        );
        assert!(
            found.iter().any(|s| s.starts_with("s.yaml:6:44: kubernetes: role tunnel: allow entry \"10.1.*.*\" is a pattern, which a LoadBalancer's source ranges cannot hold")),
            "{found:#?}"
        );
    }

    #[test]
    fn loopback_is_any_name_for_this_machine() {
        for host in [
            "127.0.0.1",
            "127.3.2.1",
            "::1",
            "::ffff:127.0.0.1",
            "localhost",
            "LOCALHOST.",
            "db.localhost",
            "0.0.0.0",
            "::",
        ] {
            assert!(is_loopback(host), "{host}");
        }
        for host in ["10.0.0.1", "db.internal", "localhost.example", "::2"] {
            assert!(!is_loopback(host), "{host}");
        }
    }

    #[test]
    fn images_are_named_as_registries_take_them() {
        assert_eq!(registry_problem("ghcr.io/acme/tcp-roles"), None);
        assert_eq!(registry_problem("localhost:5000/x"), None);
        assert_eq!(registry_problem("tcp-roles"), None);
        for bad in [
            "",
            "https://ghcr.io/x",
            "ghcr.io/Acme",
            "ghcr.io/x/",
            "x@sha256:00",
            "a//b",
        ] {
            assert!(registry_problem(bad).is_some(), "{bad}");
        }
        assert_eq!(tag_problem("0.1.0"), None);
        assert_eq!(tag_problem("v1_rc-2"), None);
        for bad in ["", ".x", "-x", "a:b", &"a".repeat(129)] {
            assert!(tag_problem(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn port_names_kubernetes_refuses_are_caught() {
        assert_eq!(port_name_problem("SquareEndpoint"), None);
        assert!(port_name_problem("AVeryLongEndpointName")
            .unwrap()
            .starts_with("is 21 characters long"));
        assert!(port_name_problem("Echo_Endpoint")
            .unwrap()
            .starts_with("contains '_'"));
        assert!(port_name_problem("1234").is_some());
        assert!(port_name_problem("Admin")
            .unwrap()
            .contains("admin endpoint"));
    }

    const SQUARE_TLS: &str = "name: demo\nroles:\n  - name: sq\n    program: square-server\n    endpoints: [{name: SquareEndpoint, visibility: public, port: 2345}]\n    settings:\n      tls_cert: certs/sq.pem\n      tls_key: certs/sq.key\nenvironments:\n  kubernetes:\n    roles:\n      sq:\n        secrets:\n          sq-tls: /etc/tls/sq\n        settings: {tls_cert: /etc/tls/sq/tls.crt, tls_key: /etc/tls/sq/tls.key}\n  compose:\n    roles:\n      sq:\n        settings: {tls_cert: ~, tls_key: ~}\n";

    #[test]
    fn tls_files_are_taken_from_the_definitions_directory_and_must_be_there() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("service.yaml");
        let d = Definition::parse(SQUARE_TLS, &file).unwrap();
        let local = d.in_environment(Environment::Local);
        let cert = dir.path().join("certs/sq.pem");
        assert_eq!(local.roles[0].settings["tls_cert"], cert.to_str().unwrap());
        let cluster = d.in_environment(Environment::Kubernetes);
        assert_eq!(cluster.roles[0].settings["tls_cert"], "/etc/tls/sq/tls.crt");
        assert_eq!(cluster.roles[0].secrets[0].name, "sq-tls");
        assert!(local.roles[0].secrets.is_empty());

        let shown: Vec<String> = d.all_findings().iter().map(ToString::to_string).collect();
        let at = file.display();
        assert_eq!(shown.len(), 2, "{shown:#?}");
        assert!(
            shown[0].starts_with(&format!(
                "{at}:7:7: local: role sq: tls_cert {} does not exist",
                cert.display()
            )),
            "{shown:#?}"
        );
        assert!(shown[1].starts_with(&format!("{at}:8:7: local: role sq: tls_key ")));
        assert!(d.findings(Environment::Local)[0].severity == Severity::Error);

        std::fs::create_dir(dir.path().join("certs")).unwrap();
        std::fs::write(&cert, "").unwrap();
        std::fs::create_dir(dir.path().join("certs/sq.key")).unwrap();
        let shown: Vec<String> = d.all_findings().iter().map(ToString::to_string).collect();
        assert_eq!(shown.len(), 1, "{shown:#?}");
        assert!(shown[0].contains("tls_key") && shown[0].contains("is a directory"));
    }

    #[test]
    fn tls_files_in_a_cluster_must_be_in_a_mounted_secret() {
        let text = SQUARE_TLS.replace("tls_key: /etc/tls/sq/tls.key", "tls_key: /etc/tls/sq");
        let text = text.replace("tls_cert: /etc/tls/sq/tls.crt", "tls_cert: /etc/sq.pem");
        let d = Definition::parse(&text, Path::new("s.yaml")).unwrap();
        let found = d.findings(Environment::Kubernetes);
        let shown: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert_starts(
            &shown,
            &[
                "s.yaml:15:20: warning: kubernetes: role sq: tls_cert /etc/sq.pem is not in a mounted Secret (the role mounts sq-tls at /etc/tls/sq)",
                "s.yaml:15:43: warning: kubernetes: role sq: tls_key /etc/tls/sq is the directory Secret sq-tls is mounted at; point it at a file in it, such as /etc/tls/sq/tls.key",
            ],
        );
        // Without the compose layer, compose has the local paths, and
        // mounts nothing.
        let text = SQUARE_TLS.split("  compose:").next().unwrap();
        let d = Definition::parse(text, Path::new("s.yaml")).unwrap();
        let compose: Vec<String> = d
            .findings(Environment::Compose)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_starts(
            &compose,
            &["s.yaml:7:7: warning: compose: role sq: tls_cert, tls_key name files, and the compose rendering mounts none"],
        );
    }

    #[test]
    fn secrets_are_checked_where_they_are_written() {
        let text = SQUARE_TLS
            .replace(
                "          sq-tls: /etc/tls/sq\n",
                "          sq-tls: /etc/tls/sq\n          Sq_CA: /etc/ca\n          sq-ca: etc/ca\n          sq-inner: /etc/tls/sq/inner\n          sq-bin: /usr/local\n",
            )
            .replace(
                "  compose:\n    roles:\n      sq:\n",
                "  compose:\n    roles:\n      sq:\n        secrets: {sq-tls: /etc/tls/sq}\n",
            );
        let shown = shown(&text);
        assert_starts(
            &shown,
            &[
                "s.yaml:15:11: environments.kubernetes.roles.sq.secrets: Secret name \"Sq_CA\" contains 'S'",
                "s.yaml:16:18: environments.kubernetes.roles.sq.secrets.sq-ca: \"etc/ca\" is not an absolute path",
                "s.yaml:17:21: environments.kubernetes.roles.sq.secrets.sq-inner: /etc/tls/sq/inner overlaps /etc/tls/sq where Secret sq-tls is mounted",
                "s.yaml:18:19: environments.kubernetes.roles.sq.secrets.sq-bin: \"/usr/local\" holds the program in the image",
                "s.yaml:23:9: environments.compose.roles.sq: secrets are mounted only by the Kubernetes rendering",
            ],
        );
        for good in ["square-tls", "tls.example.com", "a", &"a".repeat(63)] {
            assert_eq!(secret_name_problem(good), None, "{good}");
        }
        for bad in ["", "a..b", "-a", "a-", ".a", "A", "a_b", &"a".repeat(64)] {
            assert!(secret_name_problem(bad).is_some(), "{bad}");
        }
        for good in ["/etc/tls/square", "/etc/tls/square/", "/run/secrets/x"] {
            assert_eq!(mount_path_problem(good), None, "{good}");
        }
        for bad in [
            "/",
            "//",
            "relative",
            "/etc/../x",
            "/etc//x",
            "/a:b",
            "/usr/local/bin",
        ] {
            assert!(mount_path_problem(bad).is_some(), "{bad}");
        }
    }
}
