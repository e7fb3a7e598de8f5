//! The service definition rendered for a real cluster engine (Kubernetes,
//! tied together with Kustomize) and for one host (a compose file).
//!
//! Kubernetes: per role a ConfigMap with its settings, a Deployment
//! (replicas = instances, TCP probes on the endpoint, resource requests,
//! the restricted pod security profile) and a Service (LoadBalancer for a
//! public endpoint, ClusterIP for an internal one). Every image is built
//! from the one `Dockerfile` at the root of the repository.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::definition::{Definition, Role, Visibility};

/// The image a program runs from, as the Dockerfile builds it:
/// `docker build --build-arg PROGRAM=<program> -t <image> .`
pub fn image(definition: &Definition, program: &str) -> String {
    format!(
        "{}/{program}:{}",
        definition.name,
        env!("CARGO_PKG_VERSION")
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

fn labels(definition: &Definition, role: &Role) -> Value {
    json!({
        "app.kubernetes.io/name": role.name,
        "app.kubernetes.io/part-of": definition.name,
    })
}

fn settings_env(role: &Role) -> BTreeMap<String, String> {
    let program = role.program();
    let mut env: BTreeMap<String, String> =
        program.environment(&role.settings).into_iter().collect();
    if let Some(endpoint) = role.endpoints.first() {
        env.insert(
            format!("{}LISTEN", program.prefix()),
            format!("0.0.0.0:{}", container_port(endpoint.port)),
        );
    }
    env
}

/// The Kubernetes documents of one role: ConfigMap, Deployment, Service.
pub fn kubernetes_role(definition: &Definition, role: &Role) -> Vec<Value> {
    let program = role.program();
    let labels = labels(definition, role);
    let config_name = format!("{}-settings", role.name);
    let mut docs = vec![json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": config_name, "labels": labels},
        "data": settings_env(role),
    })];
    let ports: Vec<Value> = role
        .endpoints
        .iter()
        .map(|e| json!({"name": port_name(&e.name), "containerPort": container_port(e.port), "protocol": "TCP"}))
        .collect();
    let probe = |initial: u32, period: u32| match role.endpoints.first() {
        Some(e) => json!({
            "tcpSocket": {"port": port_name(&e.name)},
            "initialDelaySeconds": initial,
            "periodSeconds": period,
        }),
        None => Value::Null,
    };
    let mut container = json!({
        "name": program.name,
        "image": image(definition, program.name),
        "imagePullPolicy": "IfNotPresent",
        "envFrom": [{"configMapRef": {"name": config_name}}],
        "env": [{
            "name": format!("{}INSTANCE", program.prefix()),
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
        }],
        "ports": ports,
        "resources": {
            "requests": {"cpu": "50m", "memory": "32Mi"},
            "limits": {"memory": "256Mi"},
        },
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "runAsNonRoot": true,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    });
    if !role.endpoints.is_empty() {
        container["readinessProbe"] = probe(1, 5);
        container["livenessProbe"] = probe(5, 10);
    }
    docs.push(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": role.name, "labels": labels},
        "spec": {
            "replicas": role.count(),
            "selector": {"matchLabels": {"app.kubernetes.io/name": role.name}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "automountServiceAccountToken": false,
                    "securityContext": {
                        "runAsNonRoot": true,
                        "runAsUser": 65532,
                        "runAsGroup": 65532,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "terminationGracePeriodSeconds": 30,
                    "containers": [container],
                },
            },
        },
    }));
    for endpoint in &role.endpoints {
        let kind = match endpoint.visibility {
            Visibility::Public => "LoadBalancer",
            Visibility::Internal => "ClusterIP",
        };
        docs.push(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": role.name, "labels": labels},
            "spec": {
                "type": kind,
                "selector": {"app.kubernetes.io/name": role.name},
                "ports": [{
                    "name": port_name(&endpoint.name),
                    "port": endpoint.port,
                    "targetPort": port_name(&endpoint.name),
                    "protocol": "TCP",
                }],
            },
        }));
    }
    docs
}

/// A port name Kubernetes accepts (lower case, at most 15 characters).
fn port_name(endpoint: &str) -> String {
    let mut name: String = endpoint
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    name.truncate(15);
    name
}

fn yaml_docs(docs: &[Value]) -> String {
    docs.iter()
        .map(|d| serde_yaml::to_string(d).expect("JSON values are YAML"))
        .collect::<Vec<_>>()
        .join("---\n")
}

const HEADER: &str =
    "# Rendered by `deploy render` from deploy/service.yaml; do not edit by hand.\n";

/// The Kubernetes files: one per role and a `kustomization.yaml`, as
/// (file name, contents).
pub fn kubernetes(definition: &Definition) -> Vec<(String, String)> {
    let mut files = Vec::new();
    let mut resources = Vec::new();
    for role in &definition.roles {
        let file = format!("{}.yaml", role.name);
        files.push((
            file.clone(),
            format!("{HEADER}{}", yaml_docs(&kubernetes_role(definition, role))),
        ));
        resources.push(file);
    }
    let kustomization = json!({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": resources,
    });
    files.push((
        "kustomization.yaml".into(),
        format!("{HEADER}{}", yaml_docs(&[kustomization])),
    ));
    files
}

/// A compose file for one host: each role with its replicas, and for each
/// endpoint a balancer (the tunnel) that publishes the port and spreads
/// connections over the replicas by name.
pub fn compose(definition: &Definition) -> String {
    let mut services = serde_json::Map::new();
    for role in &definition.roles {
        let program = role.program();
        let mut env = settings_env(role);
        // Replicas take their id from their container's host name.
        env.remove(&format!("{}INSTANCE", program.prefix()));
        services.insert(
            role.name.clone(),
            json!({
                "image": image(definition, program.name),
                "build": {"context": "..", "args": {"PROGRAM": program.name}},
                "environment": env,
                "deploy": {"replicas": role.count()},
                "read_only": true,
                "security_opt": ["no-new-privileges:true"],
                "cap_drop": ["ALL"],
                "restart": "unless-stopped",
            }),
        );
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
            services.insert(
                format!("{}-balancer", role.name),
                json!({
                    "image": image(definition, "tunnel"),
                    "build": {"context": "..", "args": {"PROGRAM": "tunnel"}},
                    "environment": {
                        "TUNNEL_LISTEN": format!("0.0.0.0:{}", container_port(endpoint.port)),
                        "TUNNEL_TARGET": format!("{}:{}", role.name, container_port(endpoint.port)),
                    },
                    "ports": [published],
                    "depends_on": [role.name],
                    "read_only": true,
                    "security_opt": ["no-new-privileges:true"],
                    "cap_drop": ["ALL"],
                    "restart": "unless-stopped",
                }),
            );
        }
    }
    let file = json!({"name": definition.name, "services": services});
    format!(
        "{HEADER}{}",
        serde_yaml::to_string(&file).expect("JSON values are YAML")
    )
}

/// Writes `files` into `dir`, creating it.
pub fn write(dir: &Path, files: &[(String, String)]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, contents) in files {
        std::fs::write(dir.join(name), contents)?;
    }
    Ok(())
}
