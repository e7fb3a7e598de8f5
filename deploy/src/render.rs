//! The service definition rendered for a real cluster engine (Kubernetes,
//! tied together with Kustomize) and for one host (a compose file).
//!
//! Kubernetes: per role a ConfigMap with its settings, a Deployment
//! (replicas = instances, TCP probes on the endpoint, resource requests,
//! the restricted pod security profile, the Secrets the role mounts as
//! read-only volumes) and a Service (LoadBalancer for a public endpoint,
//! ClusterIP for an internal one). Every image is built from the one
//! `Dockerfile` at the root of the repository.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Component, Path, PathBuf};

use serde_json::{json, Value};

use crate::definition::{Definition, Endpoint, Role, Visibility, ADMIN_PORT};

/// The image a program runs from, by the name the manifests use before
/// Kustomize's `images:` puts the registry and tag in:
/// `<service>/<program>:<tag>`, as the Dockerfile builds it locally
/// (`docker build --build-arg PROGRAM=<program> -t <image> .`).
pub fn local_image(definition: &Definition, program: &str) -> String {
    format!("{}/{program}:{}", definition.name, definition.image.tag)
}

/// The image a program runs from where it is pulled:
/// `<registry>/<program>:<tag>`.
pub fn image(definition: &Definition, program: &str) -> String {
    format!(
        "{}:{}",
        definition.image.repository(program),
        definition.image.tag
    )
}

/// Ports below 1024 need a privilege the restricted profile drops, so such
/// an endpoint listens on 10000 more inside the container; the Service keeps
/// the port clients use.
pub fn container_port(port: u16) -> u16 {
    if port < 1024 {
        port + 10_000
    } else {
        port
    }
}

/// What a role's headless Service is named after the role: `<role>-headless`.
pub const HEADLESS_SUFFIX: &str = "-headless";

/// The namespace's NetworkPolicy that admits nothing: what no role's own
/// policy admits is refused, for pods the rendering did not make too.
pub const DEFAULT_DENY: &str = "default-deny";

/// The name of a role's headless Service, whose DNS records list its
/// ready instances (A records, and SRV records per named port).
pub fn headless_service(role: &Role) -> String {
    format!("{}{HEADLESS_SUFFIX}", role.name)
}

/// The labels that select a role's pods (the Deployment's selector).
fn role_selector(role: &str) -> Value {
    json!({"app.kubernetes.io/name": role})
}

fn labels(definition: &Definition, role: &Role) -> Value {
    json!({
        "app.kubernetes.io/name": role.name,
        "app.kubernetes.io/part-of": definition.name,
    })
}

/// Where a peer named `role/Endpoint` is reached from inside a rendering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerAddress {
    /// Kubernetes: the endpoint's Service, `<role>:<port>` (in the
    /// namespace; kube-proxy spreads connections over the ready pods).
    Service,
    /// Compose: the endpoint's balancer, `<role>-balancer:<its port>`.
    Balancer,
}

/// `settings` with every target named `role/Endpoint` (in `target` or
/// `targets`, at the top or in a route) replaced by the address that
/// reaches that endpoint in the rendering: there is no topology file
/// there, and the address never changes while the pods behind it do.
/// Names of no endpoint are left as written (`deploy check` reports them).
fn peers_resolved(
    definition: &Definition,
    settings: &BTreeMap<String, Value>,
    how: PeerAddress,
) -> BTreeMap<String, Value> {
    map_targets(settings, |text| {
        let (role, endpoint) = peer_endpoint(definition, text)?;
        Some(match how {
            PeerAddress::Service => format!("{}:{}", role.name, endpoint.port),
            PeerAddress::Balancer => {
                format!("{}-balancer:{}", role.name, container_port(endpoint.port))
            }
        })
    })
}

/// The role and endpoint a target written `role/Endpoint` names, if it is
/// one of the definition's.
fn peer_endpoint<'d>(
    definition: &'d Definition,
    text: &str,
) -> Option<(&'d Role, &'d crate::definition::Endpoint)> {
    let text = text.trim();
    if !common::discovery::PeerName::looks_like(text) {
        return None;
    }
    let peer: common::discovery::PeerName = text.parse().ok()?;
    let role = definition.roles.iter().find(|r| r.name == peer.role)?;
    let endpoint = role.endpoints.iter().find(|e| e.name == peer.endpoint)?;
    Some((role, endpoint))
}

/// The roles whose endpoints `settings` name as targets.
fn called_roles(definition: &Definition, settings: &BTreeMap<String, Value>) -> Vec<String> {
    let mut called = Vec::new();
    map_targets(settings, |text| {
        if let Some((role, _)) = peer_endpoint(definition, text) {
            if !called.contains(&role.name) {
                called.push(role.name.clone());
            }
        }
        None
    });
    called
}

/// `settings` with every target (in `target` or `targets`, at the top or
/// in a route) replaced by what `address` makes of it, when it makes
/// something.
fn map_targets(
    settings: &BTreeMap<String, Value>,
    mut address: impl FnMut(&str) -> Option<String>,
) -> BTreeMap<String, Value> {
    let mut resolve_list = |value: &Value| -> Value {
        match value {
            Value::String(list) => Value::String(
                list.split(',')
                    .map(|item| address(item).unwrap_or_else(|| item.to_string()))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|item| match item.as_str().and_then(&mut address) {
                        Some(found) => Value::String(found),
                        None => item.clone(),
                    })
                    .collect(),
            ),
            other => other.clone(),
        }
    };
    let mut resolve_targets = |map: &mut serde_json::Map<String, Value>| {
        for key in ["target", "targets"] {
            if let Some(value) = map.get_mut(key) {
                *value = resolve_list(value);
            }
        }
    };
    let mut top: serde_json::Map<String, Value> = settings
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    resolve_targets(&mut top);
    if let Some(routes) = top.get_mut("routes") {
        let each: Vec<&mut Value> = match routes {
            Value::Array(list) => list.iter_mut().collect(),
            Value::Object(map) => map.values_mut().collect(),
            _ => Vec::new(),
        };
        for route in each {
            if let Value::Object(route) = route {
                resolve_targets(route);
            }
        }
    }
    top.into_iter().collect()
}

/// What an instance is given in a cluster: the settings as `<PREFIX>_*`
/// variables and where to listen; a tunnel also serves its admin
/// endpoint, where its readiness is probed.
fn settings_env(role: &Role, admin: Option<u16>) -> BTreeMap<String, String> {
    let program = role.program();
    let mut env: BTreeMap<String, String> =
        program.environment(&role.settings).into_iter().collect();
    if let Some(endpoint) = role.endpoints.first() {
        env.insert(
            format!("{}LISTEN", program.prefix()),
            format!("0.0.0.0:{}", container_port(endpoint.port)),
        );
    }
    if let Some(port) = admin {
        env.insert(
            format!("{}ADMIN", program.prefix()),
            format!("0.0.0.0:{port}"),
        );
    }
    env
}

/// The port a tunnel role's admin endpoint listens on in a cluster, for
/// roles whose readiness is their target's (a tunnel with an endpoint).
fn admin_port(role: &Role) -> Option<u16> {
    (role.program == "tunnel" && !role.endpoints.is_empty())
        .then(|| crate::definition::admin_port(role).unwrap_or(ADMIN_PORT))
}

/// Policy checks that do not fit this rendering, each with the reason
/// (checkov reads them from the `checkov.io/skip<N>` annotations of the
/// Deployment; a reason may not contain '=').
const SKIPPED_CHECKS: [(&str, &str); 2] = [
    (
        "CKV_K8S_43",
        "the images are built from this repository after rendering, so no digest is known yet; kustomization.yaml images take a digest once pushed",
    ),
    (
        "CKV_K8S_15",
        "pull policy Always would refuse images built or loaded on the node (kind, minikube); tags are versions, not latest",
    ),
];

fn with_annotations(mut metadata: Value) -> Value {
    let map: serde_json::Map<String, Value> = SKIPPED_CHECKS
        .iter()
        .enumerate()
        .map(|(i, (id, why))| {
            (
                format!("checkov.io/skip{}", i + 1),
                json!(format!("{id}={why}")),
            )
        })
        .collect();
    if !map.is_empty() {
        metadata["annotations"] = Value::Object(map);
    }
    metadata
}

/// The mode of a mounted Secret's files: readable by the owner and the
/// pod's group (`fsGroup`), octal 0440.
const SECRET_MODE: u32 = 0o440;

/// The name of a role's `index`th Secret volume (a Secret's name may be
/// longer than a volume name can be).
fn secret_volume(index: usize) -> String {
    format!("secret-{index}")
}

/// The Kubernetes documents of one role: ConfigMap, Deployment, Service.
/// `definition` is the one for Kubernetes
/// ([`Definition::in_environment`]).
pub fn kubernetes_role(definition: &Definition, role: &Role) -> Vec<Value> {
    let mut resolved = role.clone();
    resolved.settings = peers_resolved(definition, &role.settings, PeerAddress::Service);
    let role = &resolved;
    let program = role.program();
    let labels = labels(definition, role);
    let config_name = format!("{}-settings", role.name);
    let admin = admin_port(role);
    let mut docs = vec![json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": config_name, "labels": labels},
        "data": settings_env(role, admin),
    })];
    let mut ports: Vec<Value> = role
        .endpoints
        .iter()
        .map(|e| json!({"name": port_name(&e.name), "containerPort": container_port(e.port), "protocol": "TCP"}))
        .collect();
    if let Some(port) = admin {
        ports.push(json!({"name": "admin", "containerPort": port, "protocol": "TCP"}));
    }
    let mut container = json!({
        "name": program.name,
        "image": local_image(definition, program.name),
        "imagePullPolicy": "IfNotPresent",
        "envFrom": [{"configMapRef": {"name": config_name}}],
        "env": [{
            "name": format!("{}INSTANCE", program.prefix()),
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
        }],
        "ports": ports,
        "resources": {
            "requests": {"cpu": "50m", "memory": "32Mi"},
            "limits": {"cpu": "1", "memory": "256Mi"},
        },
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "runAsNonRoot": true,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    });
    if !role.secrets.is_empty() {
        container["volumeMounts"] = json!(role
            .secrets
            .iter()
            .enumerate()
            .map(|(i, s)| json!({"name": secret_volume(i), "mountPath": s.dir(), "readOnly": true}))
            .collect::<Vec<_>>());
    }
    if admin.is_some() {
        // Ready when a target answers; alive while the process serves.
        container["readinessProbe"] = json!({
            "httpGet": {"path": "/readyz", "port": "admin"},
            "initialDelaySeconds": 1,
            "periodSeconds": 5,
            "timeoutSeconds": 2,
        });
        container["livenessProbe"] = json!({
            "httpGet": {"path": "/healthz", "port": "admin"},
            "initialDelaySeconds": 5,
            "periodSeconds": 10,
        });
    } else if let Some(e) = role.endpoints.first() {
        let probe = |initial: u32, period: u32| {
            json!({
                "tcpSocket": {"port": port_name(&e.name)},
                "initialDelaySeconds": initial,
                "periodSeconds": period,
            })
        };
        container["readinessProbe"] = probe(1, 5);
        container["livenessProbe"] = probe(5, 10);
    }
    let mut pod = json!({
        "automountServiceAccountToken": false,
        // The programs take no Service-link variables; they would only
        // crowd the environment.
        "enableServiceLinks": false,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationGracePeriodSeconds": 30,
        "containers": [container],
    });
    if !role.secrets.is_empty() {
        // Each Secret's files are the pod group's to read (0440), no one
        // else's; the user runs in that group.
        pod["securityContext"]["fsGroup"] = json!(65532);
        pod["volumes"] = json!(role
            .secrets
            .iter()
            .enumerate()
            .map(|(i, s)| json!({
                "name": secret_volume(i),
                "secret": {"secretName": s.name, "defaultMode": SECRET_MODE},
            }))
            .collect::<Vec<_>>());
    }
    docs.push(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": with_annotations(json!({"name": role.name, "labels": labels})),
        "spec": {
            "replicas": role.count(),
            "selector": {"matchLabels": role_selector(&role.name)},
            "template": {
                "metadata": {"labels": labels},
                "spec": pod,
            },
        },
    }));
    docs.push(network_policy(definition, role, admin));
    for endpoint in &role.endpoints {
        let mut spec = json!({
            "type": match endpoint.visibility {
                Visibility::Public => "LoadBalancer",
                Visibility::Internal => "ClusterIP",
            },
            "selector": role_selector(&role.name),
            "ports": [{
                "name": port_name(&endpoint.name),
                "port": endpoint.port,
                "targetPort": port_name(&endpoint.name),
                "protocol": "TCP",
            }],
        });
        // `deploy check` refuses patterns for a public Kubernetes
        // endpoint, so these are all networks.
        let allowed = public_allow(role, endpoint);
        if !allowed.is_empty() {
            spec["loadBalancerSourceRanges"] = json!(allowed);
        }
        docs.push(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": role.name, "labels": labels},
            "spec": spec,
        }));
    }
    if !role.endpoints.is_empty() {
        // No cluster IP: the name resolves to the ready pods' own
        // addresses, and each named port has SRV records giving the port
        // to use with them (the container's).
        let ports: Vec<Value> = role
            .endpoints
            .iter()
            .map(|e| {
                json!({
                    "name": port_name(&e.name),
                    "port": container_port(e.port),
                    "targetPort": port_name(&e.name),
                    "protocol": "TCP",
                })
            })
            .collect();
        docs.push(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": headless_service(role), "labels": labels},
            "spec": {
                "clusterIP": "None",
                "selector": role_selector(&role.name),
                "ports": ports,
            },
        }));
    }
    docs
}

/// Who may connect to a role's pods: anyone to a public endpoint (the
/// load balancer filters by `loadBalancerSourceRanges`); to an internal
/// one, the pods of the roles its `allow_from` lists, or without it every
/// pod of the cluster; pods of the cluster to the admin endpoint; nobody
/// else to anything (the kubelet's probes come from the node, which
/// policies let through).
fn network_policy(definition: &Definition, role: &Role, admin: Option<u16>) -> Value {
    let cluster = json!([{"namespaceSelector": {}}]);
    let mut ingress: Vec<Value> = role
        .endpoints
        .iter()
        .map(|e| {
            let mut rule = json!({"ports": [{"port": port_name(&e.name), "protocol": "TCP"}]});
            if e.visibility == Visibility::Internal {
                rule["from"] = match e.allowed_roles() {
                    // A podSelector alone: pods of this namespace only.
                    Some(roles) => json!(roles
                        .iter()
                        .map(|r| json!({"podSelector": {"matchLabels": role_selector(r)}}))
                        .collect::<Vec<_>>()),
                    None => cluster.clone(),
                };
            }
            rule
        })
        .collect();
    if admin.is_some() {
        ingress.push(json!({"from": cluster, "ports": [{"port": "admin", "protocol": "TCP"}]}));
    }
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": role.name, "labels": labels(definition, role)},
        "spec": {
            "podSelector": {"matchLabels": role_selector(&role.name)},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    })
}

/// Who may reach a public endpoint from outside: the role's `allow`
/// entries as written; nothing for an internal one, which stays inside.
fn public_allow(role: &Role, endpoint: &Endpoint) -> Vec<String> {
    if endpoint.visibility != Visibility::Public {
        return Vec::new();
    }
    role.program()
        .allowed(&role.settings)
        .iter()
        .map(|a| a.text().to_string())
        .collect()
}

/// An endpoint's container port name (checked by the definition to be
/// one Kubernetes takes).
pub(crate) fn port_name(endpoint: &str) -> String {
    endpoint.to_ascii_lowercase()
}

fn yaml_docs(docs: &[Value]) -> String {
    docs.iter()
        .map(|d| common::yaml::to_string(d).expect("JSON values are YAML"))
        .collect::<Vec<_>>()
        .join("---\n")
}

const HEADER: &str =
    "# Rendered by `deploy render` from deploy/service.yaml; do not edit by hand.\n";

/// The Kubernetes files: one per role and a `kustomization.yaml` that
/// lists them and says which images they run, as (file name, contents).
/// `definition` is the one for Kubernetes ([`Definition::in_environment`]).
pub fn kubernetes(definition: &Definition) -> Vec<(String, String)> {
    let namespace = json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": definition.name,
            "labels": {
                "app.kubernetes.io/part-of": definition.name,
                // Pods that break the restricted profile are refused.
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest",
            },
        },
    });
    // Every pod of the namespace is selected, so what no role's policy
    // admits is refused. Policies add up: each role's own policy still
    // admits its public endpoints from anywhere and the others as it says.
    // The namespace is written here as well, so that `kubectl apply -f
    // namespace.yaml` alone puts the policy beside the namespace.
    let default_deny = json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": DEFAULT_DENY,
            "namespace": definition.name,
            "labels": {"app.kubernetes.io/part-of": definition.name},
        },
        "spec": {
            "podSelector": {},
            "policyTypes": ["Ingress"],
        },
    });
    let mut files = vec![(
        "namespace.yaml".to_string(),
        format!("{HEADER}{}", yaml_docs(&[namespace, default_deny])),
    )];
    let mut resources = vec!["namespace.yaml".to_string()];
    let mut programs: Vec<&str> = Vec::new();
    for role in &definition.roles {
        let file = format!("{}.yaml", role.name);
        files.push((
            file.clone(),
            format!("{HEADER}{}", yaml_docs(&kubernetes_role(definition, role))),
        ));
        resources.push(file);
        if !programs.contains(&role.program.as_str()) {
            programs.push(&role.program);
        }
    }
    programs.sort_unstable();
    let images: Vec<Value> = programs
        .iter()
        .map(|program| {
            json!({
                "name": format!("{}/{program}", definition.name),
                "newName": definition.image.repository(program),
                "newTag": definition.image.tag,
            })
        })
        .collect();
    let kustomization = json!({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": definition.name,
        "resources": resources,
        "images": images,
    });
    files.push((
        "kustomization.yaml".into(),
        format!("{HEADER}{}", yaml_docs(&[kustomization])),
    ));
    files
}

/// A compose file for one host: each role with its replicas, and for each
/// endpoint a balancer (the tunnel) that publishes the port and spreads
/// connections over the replicas by name. `definition` is the one for
/// compose ([`Definition::in_environment`]); `context` is the build
/// context (the directory of the Dockerfile) relative to where the file
/// is written, or `None` to pull the images instead of building them.
pub fn compose(definition: &Definition, context: Option<&str>) -> String {
    // Every container: its image (built here when there is a context),
    // a read-only root, no privilege, restarted unless stopped.
    let container = |program: &str| {
        let mut service = json!({
            "image": image(definition, program),
            "read_only": true,
            "security_opt": ["no-new-privileges:true"],
            "cap_drop": ["ALL"],
            "restart": "unless-stopped",
        });
        if let Some(context) = context {
            service["build"] = json!({"context": context, "args": {"PROGRAM": program}});
        }
        service
    };
    // `allow_from`, held to by networks: a role that only some roles may
    // call has its containers on a network of its own with its balancer
    // (`<role>-internal`), and its balancer also on `<role>-callers`, which
    // only the containers of the roles it admits join. Neither is on the
    // default network, so no other container can reach them, and its
    // port is not published on the host.
    let restricted = |name: &str| {
        definition
            .roles
            .iter()
            .find(|r| r.name == name)
            .and_then(Role::allowed_callers)
    };
    let mut networks = serde_json::Map::new();
    let mut services = serde_json::Map::new();
    for role in &definition.roles {
        let program = role.program();
        let mut resolved = role.clone();
        resolved.settings = peers_resolved(definition, &role.settings, PeerAddress::Balancer);
        // The networks its containers join: its own when it is
        // restricted, the callers' network of each restricted role that
        // admits it and that it calls, and the default one for the rest.
        let own = restricted(&role.name);
        let called = called_roles(definition, &role.settings);
        let mut joined: Vec<String> = Vec::new();
        if own.is_some() {
            joined.push(format!("{}-internal", role.name));
        }
        let mut needs_default = own.is_none();
        for callee in &called {
            match restricted(callee) {
                Some(admitted) if admitted.contains(&role.name) => {
                    joined.push(format!("{callee}-callers"))
                }
                Some(_) => {}
                None => needs_default = true,
            }
        }
        if needs_default {
            joined.insert(0, "default".into());
        }
        let mut env = settings_env(&resolved, None);
        // Replicas take their id from their container's host name.
        env.remove(&format!("{}INSTANCE", program.prefix()));
        let mut service = container(program.name);
        service["environment"] = json!(env);
        service["deploy"] = json!({"replicas": role.count()});
        if joined != ["default"] {
            service["networks"] = json!(joined);
        }
        services.insert(role.name.clone(), service);
        if own.is_some() {
            for suffix in ["internal", "callers"] {
                networks.insert(format!("{}-{suffix}", role.name), json!({"internal": true}));
            }
        }
        for endpoint in &role.endpoints {
            let published = match endpoint.visibility {
                Visibility::Public => {
                    format!("{}:{}", endpoint.port, container_port(endpoint.port))
                }
                Visibility::Internal => format!(
                    "127.0.0.1:{}:{}",
                    endpoint.port,
                    container_port(endpoint.port)
                ),
            };
            let mut balancer_env = json!({
                "TUNNEL_LISTEN": format!("0.0.0.0:{}", container_port(endpoint.port)),
                "TUNNEL_TARGET": format!("{}:{}", role.name, container_port(endpoint.port)),
            });
            let allowed = public_allow(role, endpoint);
            if !allowed.is_empty() {
                balancer_env["TUNNEL_ALLOW"] = json!(allowed.join(","));
            }
            let mut balancer = container("tunnel");
            balancer["environment"] = balancer_env;
            if own.is_some() {
                balancer["networks"] = json!([
                    format!("{}-internal", role.name),
                    format!("{}-callers", role.name)
                ]);
            } else {
                balancer["ports"] = json!([published]);
            }
            balancer["depends_on"] = json!([role.name]);
            services.insert(format!("{}-balancer", role.name), balancer);
        }
    }
    let mut file = json!({"name": definition.name, "services": services});
    if !networks.is_empty() {
        file["networks"] = Value::Object(networks);
    }
    format!(
        "{HEADER}{}",
        common::yaml::to_string(&file).expect("JSON values are YAML")
    )
}

/// The build context for a compose file written into `out`: the
/// directory holding the Dockerfile (the nearest one at or above the
/// current directory), relative to `out`. `None` when there is none.
pub fn build_context(out: &Path) -> Option<String> {
    let here = std::env::current_dir().ok()?;
    let root = here
        .ancestors()
        .find(|dir| dir.join("Dockerfile").is_file() && dir.join("Cargo.toml").is_file())?
        .to_path_buf();
    let out = if out.is_absolute() {
        out.to_path_buf()
    } else {
        here.join(out)
    };
    let out = normalize(&out);
    let root = normalize(&root);
    let common = out
        .components()
        .zip(root.components())
        .take_while(|(a, b)| a == b)
        .count();
    let mut rel = PathBuf::new();
    for _ in out.components().skip(common) {
        rel.push("..");
    }
    for part in root.components().skip(common) {
        rel.push(part);
    }
    let rel = rel.to_string_lossy().into_owned();
    Some(if rel.is_empty() { ".".into() } else { rel })
}

/// `path` without `.` and with `..` taken back where it can be, lexically
/// (what `out` will be once created; it may not exist yet).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out
}

/// Writes `files` into `dir`, creating it. Each name must be a plain file
/// name (nothing is written outside `dir`). Each file is written beside its
/// place and renamed over it, so a reader never sees half a manifest and a
/// symbolic link in `dir` is replaced, never followed.
pub fn write(dir: &Path, files: &[(String, String)]) -> io::Result<()> {
    for (name, _) in files {
        let plain = Path::new(name)
            .file_name()
            .is_some_and(|n| n == name.as_str());
        if !plain || name.starts_with('.') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} is not a plain file name; rename the role"),
            ));
        }
    }
    std::fs::create_dir_all(dir)?;
    for (name, contents) in files {
        let place = dir.join(name);
        let temporary = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        // A leftover of a run that died (a link, even) goes; removing does
        // not follow a link.
        let _ = std::fs::remove_file(&temporary);
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temporary)
            .and_then(|mut file| file.write_all(contents.as_bytes()))
            .and_then(|()| std::fs::rename(&temporary, &place));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temporary);
            return Err(io::Error::new(
                e.kind(),
                format!("{}: {e}", place.display()),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_replaces_links_instead_of_following_them() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside.txt");
        std::fs::write(&outside, "keep me").unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        std::os::unix::fs::symlink(&outside, out.join("echo.yaml")).unwrap();
        write(&out, &[("echo.yaml".into(), "kind: Deployment\n".into())]).unwrap();
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "keep me");
        assert_eq!(
            std::fs::read_to_string(out.join("echo.yaml")).unwrap(),
            "kind: Deployment\n"
        );
        assert!(!out.join("echo.yaml").is_symlink());
        let left: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file is left: {left:?}");
    }

    #[test]
    fn write_refuses_names_that_are_not_plain_file_names() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        for name in ["../escape.yaml", "a/b.yaml", "..", ".hidden", "/etc/x.yaml"] {
            let err = write(&out, &[(name.into(), "x".into())]).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{name}");
            assert!(err.to_string().contains("not a plain file name"), "{err}");
        }
        assert!(!dir.path().join("escape.yaml").exists());
        assert!(!out.exists(), "nothing is created for a refused write");
    }

    const CALLERS: &str = "name: demo\nroles:\n  - name: sq\n    program: square-server\n    endpoints: [{name: SquareEndpoint, visibility: internal, port: 2345, allow_from: [gate]}]\n  - name: db\n    program: tunnel\n    endpoints: [{name: Incoming, visibility: internal, port: 1001}]\n    settings: {target: \"db.internal:5432\"}\n  - name: gate\n    program: tunnel\n    endpoints: [{name: Incoming, visibility: public, port: 443}]\n    settings: {target: sq/SquareEndpoint, allow: [10.0.0.0/8]}\n";

    #[test]
    fn peers_are_named_by_the_address_that_reaches_them_there() {
        let d = Definition::parse(CALLERS, Path::new("s.yaml"))
            .unwrap()
            .in_environment(crate::definition::Environment::Kubernetes);
        let docs = kubernetes_role(&d, &d.roles[2]);
        assert_eq!(docs[0]["data"]["TUNNEL_TARGET"], "sq:2345");
        assert_eq!(docs[0]["data"]["TUNNEL_ALLOW"], "10.0.0.0/8");
        let compose = compose(&d, None);
        assert!(
            compose.contains("TUNNEL_TARGET: sq-balancer:2345"),
            "{compose}"
        );
        // allow_from by networks: sq and its balancer on their own, the
        // balancer also on the one gate joins; db alone on the default.
        let file: Value = common::yaml::from_str(&compose).unwrap();
        let services = &file["services"];
        assert_eq!(services["sq"]["networks"], json!(["sq-internal"]));
        assert_eq!(
            services["sq-balancer"]["networks"],
            json!(["sq-internal", "sq-callers"])
        );
        assert!(services["sq-balancer"].get("ports").is_none(), "{compose}");
        assert_eq!(
            services["gate"]["networks"],
            json!(["default", "sq-callers"])
        );
        assert!(services["db"].get("networks").is_none(), "{compose}");
        assert_eq!(
            file["networks"],
            json!({"sq-internal": {"internal": true}, "sq-callers": {"internal": true}})
        );
        // Lists, routes, and an internal endpoint below 1024 (whose
        // container, and compose balancer, listen 10000 higher).
        let settings: BTreeMap<String, Value> = serde_json::from_value(json!({
            "target": "sq/SquareEndpoint, db/Incoming,db.internal:5432",
            "routes": [
                {"name": "a", "listen": "0.0.0.0:1", "targets": ["db/Incoming", "x/Y", "certs/x.pem"]},
                {"name": "b", "listen": "0.0.0.0:2", "target": "sq/SquareEndpoint"},
            ],
            "tls_cert": "sq/SquareEndpoint",
        }))
        .unwrap();
        let service = peers_resolved(&d, &settings, PeerAddress::Service);
        assert_eq!(service["target"], "sq:2345,db:1001,db.internal:5432");
        assert_eq!(
            service["routes"][0]["targets"],
            json!(["db:1001", "x/Y", "certs/x.pem"])
        );
        assert_eq!(service["routes"][1]["target"], "sq:2345");
        assert_eq!(service["tls_cert"], "sq/SquareEndpoint", "only targets");
        let balancer = peers_resolved(&d, &settings, PeerAddress::Balancer);
        assert_eq!(
            balancer["target"],
            "sq-balancer:2345,db-balancer:11001,db.internal:5432"
        );
    }

    #[test]
    fn mounted_secrets_are_read_only_volumes_the_pods_group_reads() {
        let text = "name: demo\nroles:\n  - name: sq\n    program: square-server\n    endpoints: [{name: SquareEndpoint, visibility: public, port: 2345}]\n  - name: echo\n    program: echo-server\n    endpoints: [{name: EchoEndpoint, visibility: public, port: 1234}]\nenvironments:\n  kubernetes:\n    roles:\n      sq:\n        secrets: {sq-tls: /etc/tls/sq/, clients.example.com: /etc/tls/clients}\n        settings: {tls_cert: /etc/tls/sq/tls.crt, tls_key: /etc/tls/sq/tls.key, tls_client_ca: /etc/tls/clients/ca.crt}\n";
        let d = Definition::parse(text, Path::new("s.yaml"))
            .unwrap()
            .in_environment(crate::definition::Environment::Kubernetes);
        let docs = kubernetes_role(&d, &d.roles[0]);
        assert_eq!(
            docs[0]["data"]["SQUARE_SERVER_TLS_CERT"],
            "/etc/tls/sq/tls.crt"
        );
        let pod = &docs[1]["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["fsGroup"], 65532);
        assert_eq!(pod["securityContext"]["runAsUser"], 65532);
        assert_eq!(
            pod["volumes"],
            json!([
                {"name": "secret-0", "secret": {"secretName": "sq-tls", "defaultMode": 0o440}},
                {"name": "secret-1", "secret": {"secretName": "clients.example.com", "defaultMode": 0o440}},
            ])
        );
        assert_eq!(
            pod["containers"][0]["volumeMounts"],
            json!([
                {"name": "secret-0", "mountPath": "/etc/tls/sq", "readOnly": true},
                {"name": "secret-1", "mountPath": "/etc/tls/clients", "readOnly": true},
            ])
        );
        // A role without Secrets has no volumes and no group for them.
        let plain = kubernetes_role(&d, &d.roles[1]);
        let pod = &plain[1]["spec"]["template"]["spec"];
        assert!(pod.get("volumes").is_none(), "{pod}");
        assert!(pod["securityContext"].get("fsGroup").is_none(), "{pod}");
        assert!(pod["containers"][0].get("volumeMounts").is_none(), "{pod}");
    }
}
