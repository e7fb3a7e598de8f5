//! The service definition (`deploy/service.yaml`): roles, their program,
//! instance count, endpoints (public or internal, with a port) and
//! settings. [`Definition::load`] reads and checks one, reporting every
//! problem at once with its line in the file.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use common::config::yaml_line;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::programs::Program;

/// Who can reach an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Visibility {
    /// Reachable from outside: a load balancer on all addresses.
    Public,
    /// Reachable only from inside the service (loopback in the fabric,
    /// the cluster in Kubernetes).
    Internal,
}

/// A named endpoint of a role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// Its name (`EchoEndpoint`).
    pub name: String,
    /// Public or internal.
    pub visibility: Visibility,
    /// The port clients use.
    pub port: u16,
}

/// A role: a program run as some number of identical instances.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Role {
    /// The role's name, unique in the definition.
    pub name: String,
    /// Which program it runs.
    pub program: String,
    /// How many instances.
    #[serde(default = "one")]
    pub instances: i64,
    /// Its endpoints.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// Settings, handed to each instance as `<PREFIX>_<KEY>`.
    #[serde(default)]
    pub settings: BTreeMap<String, Value>,
}

fn one() -> i64 {
    1
}

/// A whole service definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    /// The service's name; names the Kubernetes resources' common label.
    pub name: String,
    /// Its roles.
    pub roles: Vec<Role>,
}

/// A problem in a definition, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file.
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{} line {line}: {}", self.file.display(), self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

/// Every problem found in a definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [one] => write!(f, "{one}"),
            many => {
                write!(f, "{} problems:", many.len())?;
                for p in many {
                    write!(f, "\n  {p}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for Problems {}

/// The most instances a role may have: a Deployment's replicas are a
/// 32-bit number.
pub const MAX_INSTANCES: i64 = i32::MAX as i64;

/// What a name is used for, which decides what it may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameUse {
    /// A role: it names Kubernetes Deployments, Services and ConfigMaps,
    /// compose services and files under `deploy render --out`, so it must
    /// be a DNS-1035 label (a DNS-1123 label starting with a letter, as
    /// Service names must).
    Role,
    /// The service: it becomes a label value, the image repository and
    /// the compose project, so it must be a DNS-1123 label.
    Service,
}

/// Why `name` cannot be used as `usage` says, or `None` when it can. The
/// message completes a sentence naming the name, and says what to use.
pub fn name_problem(name: &str, usage: NameUse) -> Option<String> {
    let what = what_is_wrong(name, usage)?;
    let rule = match usage {
        NameUse::Role => "a role name names Kubernetes objects and files: use at most 63 lower-case letters, digits and '-', starting with a letter and ending with a letter or digit",
        NameUse::Service => "the service name labels Kubernetes objects and names images: use at most 63 lower-case letters, digits and '-', starting and ending with a letter or digit",
    };
    let suggestion = suggest_name(name);
    let hint = if what_is_wrong(&suggestion, usage).is_none() {
        format!(" (such as {suggestion:?})")
    } else {
        String::new()
    };
    Some(format!("{what}; {rule}{hint}"))
}

fn what_is_wrong(name: &str, usage: NameUse) -> Option<String> {
    let valid_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    let first_ok = name.chars().next().is_some_and(|c| match usage {
        NameUse::Role => c.is_ascii_lowercase(),
        NameUse::Service => c.is_ascii_lowercase() || c.is_ascii_digit(),
    });
    let last_ok = name
        .chars()
        .last()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let what = if name.is_empty() {
        "is empty".to_string()
    } else if name.len() > 63 {
        format!("is {} characters long", name.len())
    } else if let Some(bad) = name.chars().find(|c| !valid_char(*c)) {
        format!("contains {bad:?}")
    } else if !first_ok {
        "does not start with a letter".to_string()
    } else if !last_ok {
        "does not end with a letter or digit".to_string()
    } else {
        return None;
    };
    Some(what)
}

/// `name` made into a DNS-1035 label, where that is easy: lower case,
/// other characters as '-', trimmed.
fn suggest_name(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    out.truncate(63);
    out.trim_end_matches('-').to_string()
}

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
}

impl Definition {
    /// Reads and checks the definition in `path`.
    pub fn load(path: &Path) -> Result<Definition, Problems> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Problems(vec![Problem {
                file: path.to_path_buf(),
                line: None,
                message: format!("cannot read the service definition: {e}"),
            }])
        })?;
        Definition::parse(&text, path)
    }

    /// Parses and checks a definition; `path` names it in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Definition, Problems> {
        let problem = |line: Option<usize>, message: String| Problem {
            file: path.to_path_buf(),
            line,
            message,
        };
        let definition: Definition = serde_yaml::from_str(text).map_err(|e| {
            let line = e.location().map(|l| l.line());
            Problems(vec![problem(line, e.to_string())])
        })?;
        let at = |keys: &[&str]| {
            let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
            yaml_line(text, &keys)
        };
        let mut problems = Vec::new();
        let mut names = BTreeMap::new();
        let mut ports: BTreeMap<u16, String> = BTreeMap::new();
        if let Some(why) = name_problem(&definition.name, NameUse::Service) {
            problems.push(problem(
                at(&["name"]),
                format!("service name {:?} {why}", definition.name),
            ));
        }
        if definition.roles.is_empty() {
            problems.push(problem(at(&["roles"]), "no roles; add at least one".into()));
        }
        for (i, role) in definition.roles.iter().enumerate() {
            let index = i.to_string();
            let here = |key: &str| at(&["roles", &index, key]).or(at(&["roles", &index]));
            if let Some(why) = name_problem(&role.name, NameUse::Role) {
                problems.push(problem(
                    here("name"),
                    format!("role name {:?} {why}", role.name),
                ));
            } else if role.name == "kustomization" {
                problems.push(problem(
                    here("name"),
                    "role name \"kustomization\" is taken: `deploy render kubernetes` writes kustomization.yaml itself; choose another name".into(),
                ));
            } else if let Some(base) = role.name.strip_suffix("-balancer") {
                if definition
                    .roles
                    .iter()
                    .any(|r| r.name == base && !r.endpoints.is_empty())
                {
                    problems.push(problem(
                        here("name"),
                        format!("role name {:?} is taken: the compose file names role {base}'s balancer so; choose another name", role.name),
                    ));
                }
            }
            if let Some(first) = names.insert(role.name.clone(), i) {
                problems.push(problem(
                    here("name"),
                    format!(
                        "role name {} is used twice (roles {} and {})",
                        role.name,
                        first + 1,
                        i + 1
                    ),
                ));
            }
            if role.instances < 1 {
                problems.push(problem(
                    here("instances"),
                    format!(
                        "role {} has {} instances; it needs at least 1",
                        role.name, role.instances
                    ),
                ));
            } else if role.instances > MAX_INSTANCES {
                problems.push(problem(
                    here("instances"),
                    format!(
                        "role {} has {} instances; at most {MAX_INSTANCES} can run",
                        role.name, role.instances
                    ),
                ));
            }
            let Some(program) = Program::named(&role.program) else {
                problems.push(problem(
                    here("program"),
                    format!(
                        "role {}: unknown program {:?}; use one of {}",
                        role.name,
                        role.program,
                        Program::names()
                    ),
                ));
                continue;
            };
            for (j, endpoint) in role.endpoints.iter().enumerate() {
                let e_index = j.to_string();
                let line = at(&["roles", &index, "endpoints", &e_index]);
                if endpoint.name != program.endpoint {
                    problems.push(problem(
                        line,
                        format!(
                            "role {}: {} has no endpoint {}; its endpoint is {}",
                            role.name, program.name, endpoint.name, program.endpoint
                        ),
                    ));
                }
                if endpoint.port == 0 {
                    problems.push(problem(
                        line,
                        format!(
                            "role {}: endpoint {} needs a port",
                            role.name, endpoint.name
                        ),
                    ));
                }
                let owner = format!("{}/{}", role.name, endpoint.name);
                if let Some(other) = ports.insert(endpoint.port, owner.clone()) {
                    problems.push(problem(
                        at(&["roles", &index, "endpoints", &e_index, "port"]).or(line),
                        format!("port {} is used by both {other} and {owner}; give each endpoint its own port", endpoint.port),
                    ));
                }
            }
            if role.endpoints.len() > 1 {
                problems.push(problem(
                    here("endpoints"),
                    format!(
                        "role {}: {} has one endpoint, {}",
                        role.name, program.name, program.endpoint
                    ),
                ));
            }
            for (key, message) in program.check_settings(&role.settings) {
                problems.push(problem(
                    at(&["roles", &index, "settings", &key]).or(here("settings")),
                    format!("role {}: setting {key}: {message}", role.name),
                ));
            }
        }
        if problems.is_empty() {
            Ok(definition)
        } else {
            Err(Problems(problems))
        }
    }
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
            shown[0].starts_with("s.yaml line 5: role echo has 0 instances"),
            "{shown:#?}"
        );
        assert!(
            shown
                .iter()
                .any(|s| s.starts_with("s.yaml line 11: role echo: setting idle_timeout")),
            "{shown:#?}"
        );
        assert!(
            shown.iter().any(|s| s.starts_with(
                "s.yaml line 12: role echo: setting colour: echo-server has no setting colour"
            )),
            "{shown:#?}"
        );
        assert!(shown.iter().any(|s| s.starts_with("s.yaml line 18: port 1234 is used by both echo/EchoEndpoint and math/SquareEndpoint")), "{shown:#?}");
        assert!(
            shown
                .iter()
                .any(|s| s.starts_with("s.yaml line 20: role db: unknown program \"postgres\"")),
            "{shown:#?}"
        );
    }

    #[test]
    fn names_kubernetes_cannot_take_are_refused_with_their_line() {
        let text = "name: Demo\nroles:\n  - name: ../../etc\n    program: echo-server\n  - name: Echo_Server\n    program: echo-server\n  - name: 1echo\n    program: echo-server\n  - name: kustomization\n    program: echo-server\n  - name: sq\n    program: square-server\n    endpoints:\n      - name: SquareEndpoint\n        visibility: public\n        port: 2345\n  - name: sq-balancer\n    program: echo-server\n";
        let problems = Definition::parse(text, Path::new("s.yaml")).unwrap_err().0;
        let shown: Vec<String> = problems.iter().map(ToString::to_string).collect();
        let expected = [
            "s.yaml line 1: service name \"Demo\" contains 'D'",
            "s.yaml line 3: role name \"../../etc\" contains '.'; a role name names Kubernetes objects and files",
            "s.yaml line 5: role name \"Echo_Server\" contains 'E'",
            "s.yaml line 7: role name \"1echo\" does not start with a letter",
            "s.yaml line 9: role name \"kustomization\" is taken",
            "s.yaml line 17: role name \"sq-balancer\" is taken: the compose file names role sq's balancer so",
        ];
        assert_eq!(shown.len(), expected.len(), "{shown:#?}");
        for (shown, expected) in shown.iter().zip(expected) {
            assert!(shown.starts_with(expected), "{shown}\nexpected {expected}");
        }
        assert!(
            shown[2].ends_with("(such as \"echo-server\")"),
            "{}",
            shown[2]
        );
        assert!(shown[1].ends_with("(such as \"etc\")"), "{}", shown[1]);
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

    #[test]
    fn yaml_mistakes_name_the_line() {
        let err = Definition::parse(
            "name: x\nroles:\n  - name: a\n    progam: tunnel\n",
            Path::new("s.yaml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown field `progam`"), "{err}");
        assert!(err.starts_with("s.yaml line"), "{err}");
    }
}
