//! The service definition rendered for a real cluster engine (Kubernetes,
//! tied together with Kustomize) and for one host (a compose file).
//!
//! Kubernetes: per role a ConfigMap with its settings, a Deployment
//! (replicas = instances, TCP probes on the endpoint, resource requests,
//! the restricted pod security profile) and a Service (LoadBalancer for a
//! public endpoint, ClusterIP for an internal one). Every image is built
//! from the one `Dockerfile` at the root of the repository.

use std::collections::BTreeMap;
use std::io::{self, Write};
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
pub(crate) fn port_name(endpoint: &str) -> String {
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
}
