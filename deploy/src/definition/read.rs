//! Reading a definition from its YAML tree: every key checked against
//! what it may be, every value against its type, each problem at its
//! place; then the checks across roles.

use std::collections::BTreeMap;
use std::path::Path;

use common::yaml::{self, Node, Pos};
use serde_json::Value;

use super::names::{
    mount_path_problem, name_problem, port_name_problem, registry_problem, secret_name_problem,
    tag_problem, NameUse,
};
use super::{
    AllowFrom, Definition, Endpoint, Environment, Image, Problem, Problems, Role, RoleLayer,
    SecretMount, Severity, Visibility, MAX_INSTANCES,
};
use crate::programs::Program;

/// Reads and checks the definition in `text`; `path` names it in
/// messages. Every problem is reported, each at its line and column.
pub(super) fn definition(text: &str, path: &Path) -> Result<Definition, Problems> {
    let mut r = Reader {
        file: path,
        problems: Vec::new(),
    };
    let doc = yaml::parse(text).map_err(|e| {
        Problems(vec![Problem {
            file: path.to_path_buf(),
            pos: e.pos,
            severity: Severity::Error,
            message: format!("not valid YAML: {}", e.message),
        }])
    })?;
    let start = Pos { line: 1, column: 1 };
    let Some(top) = r.mapping(&doc, "the definition", &TOP_KEYS) else {
        return Err(Problems(r.problems));
    };
    let name = r
        .required(top, "name", "the definition", start)
        .and_then(|n| r.string(n, "name"))
        .unwrap_or_default();
    let name_pos = get(top, "name").map(|(_, v)| v.pos);
    if let (Some(pos), Some(why)) = (name_pos, name_problem(&name, NameUse::Service)) {
        r.error(Some(pos), format!("service name {name:?} {why}"));
    }
    let image = read_image(&mut r, get(top, "image").map(|(_, v)| v), &name);

    let mut roles = Vec::new();
    if let Some(node) = r.required(top, "roles", "the definition", start) {
        match node.items() {
            Some([]) => r.error(Some(node.pos), "no roles; add at least one".into()),
            Some(items) => {
                for item in items {
                    if let Some(role) = read_role(&mut r, item) {
                        roles.push(role);
                    }
                }
            }
            None => r.error(
                Some(node.pos),
                format!("roles should be a list of roles, not {}", node.kind()),
            ),
        }
    }
    check_roles(&mut r, &roles);

    let mut environments = BTreeMap::new();
    if let Some((_, node)) = get(top, "environments") {
        environments = read_environments(&mut r, node, &roles);
    }
    r.problems.sort_by_key(|p| p.pos);
    if r.problems.is_empty() {
        Ok(Definition {
            file: path.to_path_buf(),
            name,
            image,
            roles,
            environments,
            applied: None,
        })
    } else {
        Err(Problems(r.problems))
    }
}

/// Collects the problems of one file as it is read.
struct Reader<'a> {
    file: &'a Path,
    problems: Vec<Problem>,
}

impl Reader<'_> {
    fn error(&mut self, pos: Option<Pos>, message: String) {
        self.problems.push(Problem {
            file: self.file.to_path_buf(),
            pos,
            severity: Severity::Error,
            message,
        });
    }

    /// The entries of `node` when it is a mapping with only `known` keys;
    /// each unknown key is reported (with the nearest known one).
    fn mapping<'n>(
        &mut self,
        node: &'n Node,
        what: &str,
        known: &[&str],
    ) -> Option<&'n [(yaml::Key, Node)]> {
        let Some(entries) = node.entries() else {
            self.error(
                Some(node.pos),
                format!("{what} should be a mapping, not {}", node.kind()),
            );
            return None;
        };
        for (key, _) in entries {
            if !known.contains(&key.name.as_str()) {
                let hint = nearest(&key.name, known)
                    .map(|k| format!("did you mean {k}? "))
                    .unwrap_or_default();
                self.error(
                    Some(key.pos),
                    format!(
                        "{what} has no key {:?}; {hint}its keys are {}",
                        key.name,
                        known.join(", ")
                    ),
                );
            }
        }
        Some(entries)
    }

    /// `node` as a `T`, or a problem at it saying what `what` should be.
    fn typed<T: serde::de::DeserializeOwned>(
        &mut self,
        node: &Node,
        what: &str,
        expected: &str,
    ) -> Option<T> {
        match node.typed::<T>() {
            Ok(value) => Some(value),
            Err(_) => {
                let shown = match &node.value {
                    yaml::Value::Str(s) => format!("{s:?}"),
                    yaml::Value::Int(i) => i.to_string(),
                    yaml::Value::Float(f) => f.to_string(),
                    yaml::Value::Bool(b) => b.to_string(),
                    _ => node.kind().to_string(),
                };
                self.error(
                    Some(node.pos),
                    format!("{what} is {shown}; it should be {expected}"),
                );
                None
            }
        }
    }

    fn string(&mut self, node: &Node, what: &str) -> Option<String> {
        self.typed(node, what, "a string")
    }

    fn required<'n>(
        &mut self,
        entries: &'n [(yaml::Key, Node)],
        key: &str,
        what: &str,
        at: Pos,
    ) -> Option<&'n Node> {
        let found = entries.iter().find(|(k, _)| k.name == key).map(|(_, v)| v);
        if found.is_none() {
            self.error(Some(at), format!("{what} has no {key}; add one"));
        }
        found
    }
}

fn get<'n>(entries: &'n [(yaml::Key, Node)], key: &str) -> Option<(&'n yaml::Key, &'n Node)> {
    entries
        .iter()
        .find(|(k, _)| k.name == key)
        .map(|(k, v)| (k, v))
}

/// The known word closest to `word`, when it is a likely typo of it.
fn nearest<'k>(word: &str, known: &[&'k str]) -> Option<&'k str> {
    let distance = |a: &str, b: &str| {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut last = row[0];
            row[0] = i + 1;
            for (j, cb) in b.iter().enumerate() {
                let here = row[j + 1];
                row[j + 1] = (last + usize::from(ca != *cb))
                    .min(row[j] + 1)
                    .min(here + 1);
                last = here;
            }
        }
        row[b.len()]
    };
    known
        .iter()
        .map(|k| (distance(word, k), *k))
        .filter(|(d, k)| *d <= 2.min(k.len() / 2))
        .min()
        .map(|(_, k)| k)
}

const TOP_KEYS: [&str; 4] = ["name", "image", "roles", "environments"];
const ROLE_KEYS: [&str; 5] = ["name", "program", "instances", "endpoints", "settings"];
const ENDPOINT_KEYS: [&str; 4] = ["name", "visibility", "port", "allow_from"];
const IMAGE_KEYS: [&str; 2] = ["registry", "tag"];
const LAYER_KEYS: [&str; 3] = ["instances", "settings", "secrets"];

fn read_image(r: &mut Reader<'_>, node: Option<&Node>, service: &str) -> Image {
    let mut image = Image {
        registry: service.to_string(),
        tag: env!("CARGO_PKG_VERSION").to_string(),
    };
    let Some(node) = node else {
        return image;
    };
    let Some(entries) = r.mapping(node, "image", &IMAGE_KEYS) else {
        return image;
    };
    if let Some((_, v)) = get(entries, "registry") {
        if let Some(registry) = r.string(v, "image.registry") {
            match registry_problem(&registry) {
                Some(why) => r.error(Some(v.pos), format!("image registry {registry:?} {why}")),
                None => image.registry = registry,
            }
        }
    }
    if let Some((_, v)) = get(entries, "tag") {
        // A tag like 1.0 reads as a number; take it as written.
        let tag = match &v.value {
            yaml::Value::Int(i) => Some(i.to_string()),
            yaml::Value::Float(_) => {
                r.error(
                    Some(v.pos),
                    "image.tag reads as a number; quote it (tag: \"1.10\") so it stays as written"
                        .into(),
                );
                None
            }
            _ => r.string(v, "image.tag"),
        };
        if let Some(tag) = tag {
            match tag_problem(&tag) {
                Some(why) => r.error(Some(v.pos), format!("image tag {tag:?} {why}")),
                None => image.tag = tag,
            }
        }
    }
    image
}

fn read_role(r: &mut Reader<'_>, node: &Node) -> Option<Role> {
    let called = match node.get("name").map(|n| &n.value) {
        Some(yaml::Value::Str(name)) => format!("role {name}"),
        _ => "a role".to_string(),
    };
    let entries = r.mapping(node, &called, &ROLE_KEYS)?;
    let mut places = BTreeMap::from([(String::new(), node.pos)]);
    for (key, _) in entries {
        places.insert(key.name.clone(), key.pos);
    }
    let name = r
        .required(entries, "name", "a role", node.pos)
        .and_then(|n| r.string(n, "role name"));
    let what = match &name {
        Some(name) => format!("role {name}"),
        None => "a role".to_string(),
    };
    let program = r
        .required(entries, "program", &what, node.pos)
        .and_then(|n| r.string(n, &format!("{what}: program")));
    let instances = match get(entries, "instances") {
        Some((_, n)) => r.typed::<i64>(n, &format!("{what}: instances"), "a number of instances"),
        None => Some(1),
    };
    let mut endpoints = Vec::new();
    if let Some((_, list)) = get(entries, "endpoints") {
        match list.items() {
            Some(items) => {
                for item in items {
                    if let Some(e) = read_endpoint(r, item, &what) {
                        endpoints.push(e);
                    }
                }
            }
            None if list.value == yaml::Value::Null => {}
            None => r.error(
                Some(list.pos),
                format!("{what}: endpoints should be a list, not {}", list.kind()),
            ),
        }
    }
    let mut settings = BTreeMap::new();
    if let Some((_, map)) = get(entries, "settings") {
        if let Some(s) = read_settings(r, map, &format!("{what}: settings")) {
            for (key, (value, pos)) in s {
                places.insert(format!("settings.{key}"), pos);
                settings.insert(key, value);
            }
        }
    }
    // What could not be read is reported; the rest is still checked.
    Some(Role {
        name: name?,
        program: program.unwrap_or_default(),
        instances: instances.unwrap_or(1),
        endpoints,
        settings,
        secrets: Vec::new(),
        places,
    })
}

fn read_endpoint(r: &mut Reader<'_>, node: &Node, role: &str) -> Option<Endpoint> {
    let what = format!("{role}: an endpoint");
    let entries = r.mapping(node, &what, &ENDPOINT_KEYS)?;
    let name = r
        .required(entries, "name", &what, node.pos)
        .and_then(|n| r.string(n, &format!("{role}: endpoint name")));
    let what = match &name {
        Some(name) => format!("{role}: endpoint {name}"),
        None => what,
    };
    let visibility = r
        .required(entries, "visibility", &what, node.pos)
        .and_then(|n| {
            r.typed::<Visibility>(n, &format!("{what}: visibility"), "public or internal")
        });
    let port = r.required(entries, "port", &what, node.pos).and_then(|n| {
        r.typed::<u16>(n, &format!("{what}: port"), "a port number, 1 to 65535")
            .filter(|p| {
                if *p == 0 {
                    r.error(
                        Some(n.pos),
                        format!("{what}: port 0 is no port; it should be 1 to 65535"),
                    );
                }
                *p != 0
            })
    });
    let allow_from = get(entries, "allow_from").and_then(|(key, list)| {
        Some(AllowFrom {
            roles: read_role_names(r, list, &format!("{what}: allow_from"))?,
            pos: key.pos,
        })
    });
    Some(Endpoint {
        name: name?,
        visibility: visibility?,
        port: port?,
        allow_from,
        pos: node.pos,
    })
}

/// A list of role names (`[tunnel, square-server]`), each with its place
/// (nothing written is an empty list); what is not a name is reported and
/// left out, and what is not a list is reported. Whether each is a role
/// is checked with the other roles, in [`check_roles`].
fn read_role_names(r: &mut Reader<'_>, node: &Node, what: &str) -> Option<Vec<(String, Pos)>> {
    let Some(items) = node.items() else {
        if node.value == yaml::Value::Null {
            return Some(Vec::new());
        }
        r.error(
            Some(node.pos),
            format!(
                "{what} should be a list of role names, such as [tunnel], not {}",
                node.kind()
            ),
        );
        return None;
    };
    let names = items
        .iter()
        .filter_map(|item| {
            r.typed::<String>(item, &format!("{what}: an entry"), "a role name")
                .map(|name| (name, item.pos))
        })
        .collect();
    Some(names)
}

fn read_settings(
    r: &mut Reader<'_>,
    node: &Node,
    what: &str,
) -> Option<BTreeMap<String, (Value, Pos)>> {
    if node.value == yaml::Value::Null {
        return Some(BTreeMap::new());
    }
    let Some(entries) = node.entries() else {
        r.error(
            Some(node.pos),
            format!(
                "{what} should be a mapping of the program's settings, not {}",
                node.kind()
            ),
        );
        return None;
    };
    Some(
        entries
            .iter()
            .map(|(k, v)| (k.name.clone(), (v.to_json(), k.pos)))
            .collect(),
    )
}

/// The checks across roles: names, programs, instances, endpoints, ports,
/// settings.
fn check_roles(r: &mut Reader<'_>, roles: &[Role]) {
    let mut names = BTreeMap::new();
    let mut ports: BTreeMap<u16, String> = BTreeMap::new();
    for (i, role) in roles.iter().enumerate() {
        if let Some(why) = name_problem(&role.name, NameUse::Role) {
            r.error(
                role.place("name"),
                format!("role name {:?} {why}", role.name),
            );
        } else if role.name == "kustomization" || role.name == "namespace" {
            r.error(
                role.place("name"),
                format!("role name {:?} is taken: `deploy render kubernetes` writes {}.yaml itself; choose another name", role.name, role.name),
            );
        } else if role.name == crate::render::DEFAULT_DENY {
            r.error(
                role.place("name"),
                format!("role name {:?} is taken: `deploy render kubernetes` names the namespace's default NetworkPolicy so; choose another name", role.name),
            );
        } else if !role.endpoints.is_empty()
            && role.name.len() + crate::render::HEADLESS_SUFFIX.len() > 63
        {
            r.error(
                role.place("name"),
                format!(
                    "role name {:?} is {} characters long: its headless Service, {}{}, would be longer than the 63 a Service name may have; use at most {} for a role with an endpoint",
                    role.name,
                    role.name.len(),
                    role.name,
                    crate::render::HEADLESS_SUFFIX,
                    63 - crate::render::HEADLESS_SUFFIX.len()
                ),
            );
        } else if let Some(base) = role
            .name
            .strip_suffix(crate::render::HEADLESS_SUFFIX)
            .filter(|base| {
                !role.endpoints.is_empty()
                    && roles
                        .iter()
                        .any(|o| o.name == *base && !o.endpoints.is_empty())
            })
        {
            r.error(
                role.place("name"),
                format!("role name {:?} is taken: `deploy render kubernetes` names role {base}'s headless Service so; choose another name", role.name),
            );
        } else if let Some(base) = role.name.strip_suffix("-balancer") {
            if roles
                .iter()
                .any(|o| o.name == base && !o.endpoints.is_empty())
            {
                r.error(
                    role.place("name"),
                    format!("role name {:?} is taken: the compose file names role {base}'s balancer so; choose another name", role.name),
                );
            }
        }
        if let Some(first) = names.insert(role.name.clone(), i) {
            r.error(
                role.place("name"),
                format!(
                    "role name {} is used twice (roles {} and {})",
                    role.name,
                    first + 1,
                    i + 1
                ),
            );
        }
        if role.instances < 1 {
            r.error(
                role.place("instances"),
                format!(
                    "role {} has {} instances; it needs at least 1",
                    role.name, role.instances
                ),
            );
        } else if role.instances > MAX_INSTANCES {
            r.error(
                role.place("instances"),
                format!(
                    "role {} has {} instances; at most {MAX_INSTANCES} can run",
                    role.name, role.instances
                ),
            );
        }
        for endpoint in &role.endpoints {
            check_allow_from(r, roles, role, endpoint);
        }
        if role.program.is_empty() {
            continue;
        }
        let Some(program) = Program::named(&role.program) else {
            r.error(
                role.place("program"),
                format!(
                    "role {}: unknown program {:?}; use one of {}",
                    role.name,
                    role.program,
                    Program::names()
                ),
            );
            continue;
        };
        for endpoint in &role.endpoints {
            if endpoint.name != program.endpoint {
                r.error(
                    Some(endpoint.pos),
                    format!(
                        "role {}: {} has no endpoint {}; its endpoint is {}",
                        role.name, program.name, endpoint.name, program.endpoint
                    ),
                );
            }
            if let Some(why) = port_name_problem(&endpoint.name) {
                r.error(
                    Some(endpoint.pos),
                    format!(
                        "role {}: endpoint name {:?} {why}",
                        role.name, endpoint.name
                    ),
                );
            }
            let owner = format!("{}/{}", role.name, endpoint.name);
            if let Some(other) = ports.insert(endpoint.port, owner.clone()) {
                r.error(
                    Some(endpoint.pos),
                    format!("port {} is used by both {other} and {owner}; give each endpoint its own port", endpoint.port),
                );
            }
        }
        if role.endpoints.len() > 1 {
            r.error(
                role.place("endpoints"),
                format!(
                    "role {}: {} has one endpoint, {}",
                    role.name, program.name, program.endpoint
                ),
            );
        }
        for (key, message) in program.check_settings(&role.settings) {
            r.error(
                role.place(&format!("settings.{key}")),
                format!("role {}: setting {key}: {message}", role.name),
            );
        }
    }
}

/// An endpoint's `allow_from`: only on an internal endpoint, naming at
/// least one role, each a role of the definition, once.
fn check_allow_from(r: &mut Reader<'_>, roles: &[Role], role: &Role, endpoint: &Endpoint) {
    let Some(allow) = &endpoint.allow_from else {
        return;
    };
    let what = format!("role {}: endpoint {}: allow_from", role.name, endpoint.name);
    if endpoint.visibility == Visibility::Public {
        r.error(
            Some(allow.pos),
            format!(
                "{what} is for internal endpoints: a public one is called from outside, where there are no roles; to choose who may reach it, list their networks in the role's allow setting (allow: [203.0.113.0/24]), or make the endpoint internal"
            ),
        );
        return;
    }
    if allow.roles.is_empty() {
        // An empty list is refused rather than read as "no role": it is
        // most likely meant as "no restriction" (a NetworkPolicy rule's
        // empty `from` admits everyone), and an endpoint no role may call
        // is better written as no endpoint.
        r.error(
            Some(allow.pos),
            format!(
                "{what} names no role, so nothing could call the endpoint; list the roles that may call it (allow_from: [tunnel]), or leave allow_from out to let every role call it"
            ),
        );
        return;
    }
    let known: Vec<&str> = roles.iter().map(|o| o.name.as_str()).collect();
    for (i, (name, pos)) in allow.roles.iter().enumerate() {
        if allow.roles[..i].iter().any(|(earlier, _)| earlier == name) {
            r.error(
                Some(*pos),
                format!("{what} names role {name} twice; name each role once"),
            );
        } else if !known.contains(&name.as_str()) {
            let hint = nearest(name, &known)
                .map(|k| format!("did you mean {k}? "))
                .unwrap_or_default();
            r.error(
                Some(*pos),
                format!(
                    "{what} names {name:?}, which is no role of the definition; {hint}the roles are {}",
                    known.join(", ")
                ),
            );
        }
    }
}

fn read_environments(
    r: &mut Reader<'_>,
    node: &Node,
    roles: &[Role],
) -> BTreeMap<Environment, BTreeMap<String, RoleLayer>> {
    let mut environments = BTreeMap::new();
    let names: Vec<&str> = Environment::ALL.iter().map(|e| e.name()).collect();
    let Some(entries) = r.mapping(node, "environments", &names) else {
        return environments;
    };
    for (key, body) in entries {
        let Some(environment) = Environment::named(&key.name) else {
            continue;
        };
        let what = format!("environments.{environment}");
        let Some(body_entries) = r.mapping(body, &what, &["roles"]) else {
            continue;
        };
        let mut layers = BTreeMap::new();
        if let Some((_, role_map)) = get(body_entries, "roles") {
            let Some(role_entries) = role_map.entries() else {
                r.error(
                    Some(role_map.pos),
                    format!(
                        "{what}.roles should map role names to their changes, not {}",
                        role_map.kind()
                    ),
                );
                continue;
            };
            for (role_key, layer_node) in role_entries {
                let what = format!("{what}.roles.{}", role_key.name);
                let Some(role) = roles.iter().find(|r| r.name == role_key.name) else {
                    let known: Vec<&str> = roles.iter().map(|r| r.name.as_str()).collect();
                    r.error(
                        Some(role_key.pos),
                        format!(
                            "{what}: there is no role {}; the roles are {}",
                            role_key.name,
                            known.join(", ")
                        ),
                    );
                    continue;
                };
                let Some(layer_entries) = r.mapping(layer_node, &what, &LAYER_KEYS) else {
                    continue;
                };
                let mut layer = RoleLayer::default();
                if let Some((k, n)) = get(layer_entries, "instances") {
                    if let Some(count) =
                        r.typed::<i64>(n, &format!("{what}.instances"), "a number of instances")
                    {
                        if !(1..=MAX_INSTANCES).contains(&count) {
                            r.error(
                                Some(n.pos),
                                format!("{what}.instances is {count}; it should be 1 to {MAX_INSTANCES}"),
                            );
                        }
                        layer.instances = Some((count, k.pos));
                    }
                }
                if let Some((_, n)) = get(layer_entries, "settings") {
                    if let Some(settings) = read_settings(r, n, &format!("{what}.settings")) {
                        layer.settings = settings;
                    }
                }
                if let Some((k, n)) = get(layer_entries, "secrets") {
                    if environment == Environment::Kubernetes {
                        layer.secrets = read_secrets(r, n, &format!("{what}.secrets"));
                    } else {
                        r.error(
                            Some(k.pos),
                            format!(
                                "{what}: secrets are mounted only by the Kubernetes rendering; move them to environments.kubernetes.roles.{}.secrets",
                                role.name
                            ),
                        );
                    }
                }
                if let Some(program) = Program::named(&role.program) {
                    let set: BTreeMap<String, Value> = layer
                        .settings
                        .iter()
                        .filter(|(_, (v, _))| !v.is_null())
                        .map(|(k, (v, _))| (k.clone(), v.clone()))
                        .collect();
                    for (key, message) in program.check_settings(&set) {
                        r.error(
                            layer.settings.get(&key).map(|(_, p)| *p),
                            format!("{what}: setting {key}: {message}"),
                        );
                    }
                }
                layers.insert(role.name.clone(), layer);
            }
        }
        environments.insert(environment, layers);
    }
    environments
}

/// A layer's Secrets: a mapping of each Secret's name to the directory it
/// is mounted at, one directory per Secret.
fn read_secrets(r: &mut Reader<'_>, node: &Node, what: &str) -> Vec<SecretMount> {
    let mut secrets: Vec<SecretMount> = Vec::new();
    if node.value == yaml::Value::Null {
        return secrets;
    }
    let Some(entries) = node.entries() else {
        r.error(
            Some(node.pos),
            format!(
                "{what} should map each Secret's name to the directory it is mounted at (square-tls: /etc/tls/square), not {}",
                node.kind()
            ),
        );
        return secrets;
    };
    for (key, value) in entries {
        if let Some(why) = secret_name_problem(&key.name) {
            r.error(
                Some(key.pos),
                format!("{what}: Secret name {:?} {why}", key.name),
            );
            continue;
        }
        let Some(path) = r.string(value, &format!("{what}.{}", key.name)) else {
            continue;
        };
        if let Some(why) = mount_path_problem(&path) {
            r.error(
                Some(value.pos),
                format!("{what}.{}: {path:?} {why}", key.name),
            );
            continue;
        }
        let mount = SecretMount {
            name: key.name.clone(),
            path,
            pos: key.pos,
        };
        let nested = |a: &SecretMount, b: &SecretMount| {
            a.dir() == b.dir() || a.dir().starts_with(&format!("{}/", b.dir()))
        };
        if let Some(other) = secrets
            .iter()
            .find(|o| nested(&mount, o) || nested(o, &mount))
        {
            r.error(
                Some(value.pos),
                format!(
                    "{what}.{}: {} overlaps {} where Secret {} is mounted; give each Secret a directory of its own",
                    mount.name, mount.path, other.path, other.name
                ),
            );
            continue;
        }
        secrets.push(mount);
    }
    secrets
}
