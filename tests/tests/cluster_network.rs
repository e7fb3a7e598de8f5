//! The rendering's network, as a cluster would have it: each endpoint's
//! names in the cluster's DNS (a Service for the balanced address, a
//! headless Service for the instances), and who may connect.
//!
//! The rendered NetworkPolicies admit exactly what the definition says,
//! worked out as a cluster's network plugin works them out: a pod that
//! some policy selects takes ingress only as one of those policies'
//! rules admits it (they add up), and a pod no policy selects takes
//! everything. The rendering goes through `kubectl kustomize`, as it
//! would reach a cluster, and each role's pods are asked, port by port,
//! who may connect: every role's pods, a pod of the namespace the
//! rendering did not make, pods of another namespace that carry a role's
//! labels, and a client outside the cluster.
//!
//! What is expected comes from the definition: a public endpoint from
//! anyone, an internal one from the pods of the roles its `allow_from`
//! lists (in the namespace), or from every pod of the cluster without it;
//! the tunnel's admin endpoint from every pod; nothing else, and nothing
//! at all to a pod the rendering did not make.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use deploy::definition::{Definition, Environment, Role, Visibility};
use serde_json::{json, Value};
use tests::require;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The documents `kubectl kustomize` makes of the rendering in `dir`.
fn kustomized(dir: &Path) -> Vec<Value> {
    let out = Command::new(require("kubectl"))
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl kustomize: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// Who connects.
#[derive(Debug, Clone)]
enum Source {
    /// A pod, by namespace and labels.
    Pod {
        namespace: String,
        labels: BTreeMap<String, String>,
        what: String,
    },
    /// A client outside the cluster (through a LoadBalancer).
    Outside,
}

impl Source {
    fn describe(&self) -> &str {
        match self {
            Source::Pod { what, .. } => what,
            Source::Outside => "a client outside the cluster",
        }
    }
}

/// Where a connection goes: a pod, and one of its ports by number and,
/// when it has one, name.
struct Target<'a> {
    namespace: &'a str,
    labels: &'a BTreeMap<String, String>,
    port: u16,
    port_name: Option<&'a str>,
}

fn label_map(value: &Value) -> BTreeMap<String, String> {
    value
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().expect("a label value").to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a label selector selects `labels`. An empty selector selects
/// everything; `matchExpressions` is not rendered, and so not evaluated.
fn selects(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    assert!(
        selector.get("matchExpressions").is_none(),
        "matchExpressions are not evaluated here: {selector}"
    );
    label_map(&selector["matchLabels"])
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
}

/// Whether one peer of a rule's `from` matches `source`, for a policy in
/// `namespace`.
fn peer_matches(peer: &Value, namespace: &str, source: &Source) -> bool {
    assert!(peer.get("ipBlock").is_none(), "ipBlock is not rendered");
    let Source::Pod {
        namespace: source_ns,
        labels,
        ..
    } = source
    else {
        // podSelector and namespaceSelector name pods; nothing from
        // outside the cluster matches them.
        return false;
    };
    let pods_ok = peer
        .get("podSelector")
        .is_none_or(|selector| selects(selector, labels));
    let namespace_ok = match peer.get("namespaceSelector") {
        // Namespaces are told by their labels; only the empty selector
        // (every namespace) is rendered.
        Some(selector) => {
            assert_eq!(selector, &json!({}), "only {{}} is evaluated");
            true
        }
        // A podSelector alone: pods of the policy's own namespace.
        None => source_ns == namespace,
    };
    pods_ok && namespace_ok
}

/// Whether a rule's port entry matches the target's port.
fn port_matches(entry: &Value, target: &Target) -> bool {
    assert_eq!(entry["protocol"].as_str().unwrap_or("TCP"), "TCP");
    assert!(entry.get("endPort").is_none(), "endPort is not rendered");
    match &entry["port"] {
        Value::Null => true,
        Value::Number(n) => n.as_u64() == Some(u64::from(target.port)),
        Value::String(name) => target.port_name == Some(name.as_str()),
        other => panic!("a port {other}"),
    }
}

/// Whether `policies` let `source` connect to `target`.
fn admits(policies: &[&Value], source: &Source, target: &Target) -> bool {
    let selecting: Vec<&&Value> = policies
        .iter()
        .filter(|p| p["metadata"]["namespace"] == target.namespace)
        .filter(|p| {
            let types = &p["spec"]["policyTypes"];
            // Without policyTypes, a policy is about ingress.
            types.is_null() || types.as_array().unwrap().iter().any(|t| t == "Ingress")
        })
        .filter(|p| selects(&p["spec"]["podSelector"], target.labels))
        .collect();
    if selecting.is_empty() {
        return true;
    }
    selecting.iter().any(|policy| {
        let rules = policy["spec"]["ingress"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        rules.iter().any(|rule| {
            let ports = rule["ports"].as_array().cloned().unwrap_or_default();
            let from = rule["from"].as_array().cloned().unwrap_or_default();
            // An empty or absent list matches everything.
            (ports.is_empty() || ports.iter().any(|p| port_matches(p, target)))
                && (from.is_empty()
                    || from
                        .iter()
                        .any(|peer| peer_matches(peer, target.namespace, source)))
        })
    })
}

/// The rendered NetworkPolicies of `objects`, and each Deployment's pods'
/// namespace, labels and container ports (name, number).
type Pods = Vec<(String, String, BTreeMap<String, String>, Vec<(String, u16)>)>;

fn policies_and_pods(objects: &[Value]) -> (Vec<&Value>, Pods) {
    let policies: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "NetworkPolicy")
        .collect();
    let pods = objects
        .iter()
        .filter(|o| o["kind"] == "Deployment")
        .map(|d| {
            let ports = d["spec"]["template"]["spec"]["containers"][0]["ports"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| {
                    (
                        p["name"].as_str().unwrap().to_string(),
                        u16::try_from(p["containerPort"].as_u64().unwrap()).unwrap(),
                    )
                })
                .collect();
            (
                d["metadata"]["name"].as_str().unwrap().to_string(),
                d["metadata"]["namespace"].as_str().unwrap().to_string(),
                label_map(&d["spec"]["template"]["metadata"]["labels"]),
                ports,
            )
        })
        .collect();
    (policies, pods)
}

/// Who may connect to port `port_name` of `role`'s pods, as the
/// definition says.
fn expected(role: &Role, port_name: &str, namespace: &str, source: &Source) -> bool {
    let endpoint = role
        .endpoints
        .iter()
        .find(|e| e.name.to_ascii_lowercase() == port_name);
    match (endpoint, source) {
        (Some(e), _) if e.visibility == Visibility::Public => true,
        (_, Source::Outside) => false,
        (
            Some(e),
            Source::Pod {
                namespace: source_ns,
                labels,
                ..
            },
        ) => match e.allowed_roles() {
            None => true,
            Some(roles) => {
                source_ns == namespace
                    && labels
                        .get("app.kubernetes.io/name")
                        .is_some_and(|name| roles.contains(&name.as_str()))
            }
        },
        // The tunnel's admin endpoint: every pod of the cluster.
        (None, Source::Pod { .. }) => port_name == "admin",
    }
}

/// Checks every role's pods against every source, port by port; returns
/// how many (source, port) pairs were admitted.
fn check(definition: &Definition, objects: &[Value]) -> usize {
    let namespace = definition.name.as_str();
    let (policies, pods) = policies_and_pods(objects);
    assert_eq!(
        pods.len(),
        definition.roles.len(),
        "one Deployment per role"
    );
    let mut sources: Vec<Source> = vec![Source::Outside];
    for (name, ns, labels, _) in &pods {
        sources.push(Source::Pod {
            namespace: ns.clone(),
            labels: labels.clone(),
            what: format!("a pod of role {name}"),
        });
        sources.push(Source::Pod {
            namespace: "elsewhere".into(),
            labels: labels.clone(),
            what: format!("a pod of another namespace labelled as role {name}"),
        });
    }
    sources.push(Source::Pod {
        namespace: namespace.into(),
        labels: BTreeMap::from([("run".into(), "debug".into())]),
        what: "a pod of the namespace the rendering did not make".into(),
    });
    let mut admitted = 0;
    for (name, ns, labels, ports) in &pods {
        assert_eq!(ns, namespace);
        let role = definition
            .roles
            .iter()
            .find(|r| &r.name == name)
            .unwrap_or_else(|| panic!("no role {name}"));
        // Every container port, and one nothing listens on.
        let mut asked: Vec<(Option<&str>, u16)> =
            ports.iter().map(|(n, p)| (Some(n.as_str()), *p)).collect();
        asked.push((None, 4444));
        for (port_name, port) in asked {
            let target = Target {
                namespace: ns,
                labels,
                port,
                port_name,
            };
            for source in &sources {
                let want = port_name.is_some_and(|p| expected(role, p, namespace, source));
                let got = admits(&policies, source, &target);
                assert_eq!(
                    got,
                    want,
                    "{} to role {name}'s port {port_name:?} ({port}): admitted {got}, the definition says {want}",
                    source.describe()
                );
                admitted += usize::from(got);
            }
        }
    }
    // A pod the rendering did not make takes nothing, on any port.
    let stray = BTreeMap::from([("run".into(), "debug".into())]);
    for source in &sources {
        let target = Target {
            namespace,
            labels: &stray,
            port: 8080,
            port_name: Some("http"),
        };
        assert!(
            !admits(&policies, source, &target),
            "{} reaches a pod the rendering did not make",
            source.describe()
        );
    }
    admitted
}

#[test]
fn the_committed_rendering_admits_what_the_default_definition_says() {
    let definition = Definition::load(&workspace().join(deploy::DEFAULT_DEFINITION))
        .unwrap_or_else(|p| panic!("{p}"))
        .in_environment(Environment::Kubernetes);
    let objects = kustomized(&workspace().join("deploy/kubernetes"));
    assert!(check(&definition, &objects) > 0);
}

const CALLERS: &str = "name: callers
roles:
  - name: square-server
    program: square-server
    instances: 2
    endpoints:
      - name: SquareEndpoint
        visibility: internal
        port: 2345
        allow_from: [gateway, square-server]
  - name: echo-server
    program: echo-server
    endpoints: [{name: EchoEndpoint, visibility: public, port: 1234}]
  - name: gateway
    program: tunnel
    endpoints: [{name: Incoming, visibility: public, port: 443}]
    settings: {target: square-server/SquareEndpoint, allow: [10.0.0.0/8]}
  - name: db
    program: tunnel
    endpoints: [{name: Incoming, visibility: internal, port: 1001, allow_from: [echo-server]}]
    settings: {target: \"db.internal:5432\"}
  - name: open
    program: tunnel
    endpoints: [{name: Incoming, visibility: internal, port: 1002}]
    settings: {target: \"db.internal:5432\"}
";

#[test]
fn allow_from_admits_exactly_the_roles_it_lists() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("service.yaml");
    std::fs::write(&file, CALLERS).unwrap();
    let out = dir.path().join("kubernetes");
    let render = Command::new(tests::binary("deploy"))
        .args(["render", "kubernetes"])
        .arg(&file)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        render.status.success(),
        "{}",
        String::from_utf8_lossy(&render.stderr)
    );
    let definition = Definition::load(&file)
        .unwrap()
        .in_environment(Environment::Kubernetes);
    let objects = kustomized(&out);
    check(&definition, &objects);
    check_names(&definition, &objects);
    validated(&out);

    // The policies themselves, as written: square-server's port admits
    // the pods of exactly the two roles listed, in the namespace.
    let policy = objects
        .iter()
        .find(|o| o["kind"] == "NetworkPolicy" && o["metadata"]["name"] == "square-server")
        .expect("square-server's NetworkPolicy");
    assert_eq!(policy["metadata"]["namespace"], "callers");
    assert_eq!(
        policy["spec"]["podSelector"],
        json!({"matchLabels": {"app.kubernetes.io/name": "square-server"}})
    );
    assert_eq!(
        policy["spec"]["ingress"],
        json!([{
            "ports": [{"port": "squareendpoint", "protocol": "TCP"}],
            "from": [
                {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "gateway"}}},
                {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "square-server"}}},
            ],
        }])
    );
    let deny = objects
        .iter()
        .find(|o| o["kind"] == "NetworkPolicy" && o["metadata"]["name"] == "default-deny")
        .expect("the namespace's default-deny NetworkPolicy");
    assert_eq!(
        deny["spec"],
        json!({"podSelector": {}, "policyTypes": ["Ingress"]})
    );
    assert_eq!(deny["metadata"]["namespace"], "callers");
}

/// The rendering in `dir` passes `kubernetes-validate --strict` and
/// checkov's policies, as the committed one does (tests/tests/deploy.rs).
fn validated(dir: &Path) {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap() != "kustomization.yaml")
        .collect();
    files.sort();
    let out = Command::new(require("kubernetes-validate"))
        .args(["--strict", "--kubernetes-version", "1.37.0"])
        .args(&files)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kubernetes-validate --strict:\n{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!report.contains("failed"), "{report}");
    let kustomized = Command::new(require("kubectl"))
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap();
    let manifests = dir.join("..").join("rendered.yaml");
    std::fs::write(&manifests, kustomized.stdout).unwrap();
    let summary = tests::checkov_kubernetes(&manifests);
    assert!(
        summary["resource_count"].as_u64().unwrap() > 20,
        "{summary}"
    );
}

/// Every role with an endpoint has the two names `role/Endpoint` resolves
/// to in the cluster's DNS: `<role>` (a Service with a cluster IP, in
/// front of the ready pods: the balanced address) and `<role>-headless`
/// (no cluster IP: A records for each ready pod, and SRV records per named
/// port, `_<endpoint>._tcp.<role>-headless`, with the port to use on them).
fn check_names(definition: &Definition, objects: &[Value]) {
    let services: Vec<&Value> = objects.iter().filter(|o| o["kind"] == "Service").collect();
    let named = |name: &str| {
        services
            .iter()
            .find(|s| s["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no Service {name}"))
    };
    let mut expected = 0;
    for role in &definition.roles {
        if role.endpoints.is_empty() {
            continue;
        }
        let pods = objects
            .iter()
            .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == role.name.as_str())
            .unwrap();
        let labels = label_map(&pods["spec"]["template"]["metadata"]["labels"]);
        let container_ports = &pods["spec"]["template"]["spec"]["containers"][0]["ports"];
        let balanced = named(&role.name);
        let headless = named(&format!("{}-headless", role.name));
        expected += 2;
        for service in [balanced, headless] {
            let selector = label_map(&service["spec"]["selector"]);
            assert!(!selector.is_empty());
            assert!(
                selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
                "{}: its selector does not select role {}'s pods",
                service["metadata"]["name"],
                role.name
            );
            assert_eq!(service["metadata"]["namespace"], definition.name.as_str());
        }
        assert_ne!(balanced["spec"]["clusterIP"], "None");
        assert_eq!(headless["spec"]["clusterIP"], "None");
        for endpoint in &role.endpoints {
            let port_name = endpoint.name.to_ascii_lowercase();
            let port_of = |service: &Value| {
                service["spec"]["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|p| p["name"] == port_name.as_str())
                    .cloned()
                    .unwrap_or_else(|| {
                        panic!("{}: no port {port_name}", service["metadata"]["name"])
                    })
            };
            // The balanced address keeps the port clients use...
            assert_eq!(port_of(balanced)["port"], endpoint.port);
            assert_eq!(port_of(balanced)["targetPort"], port_name.as_str());
            // ...and an instance is called on its container's port, which
            // the SRV records give (a headless Service has no proxy).
            let container = container_ports
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == port_name.as_str())
                .unwrap();
            assert_eq!(port_of(headless)["port"], container["containerPort"]);
            assert_eq!(port_of(headless)["targetPort"], port_name.as_str());
        }
    }
    assert_eq!(services.len(), expected, "no other Service");
}

#[test]
fn every_endpoint_has_a_balanced_name_and_an_instance_list() {
    let definition = Definition::load(&workspace().join(deploy::DEFAULT_DEFINITION))
        .unwrap_or_else(|p| panic!("{p}"))
        .in_environment(Environment::Kubernetes);
    check_names(
        &definition,
        &kustomized(&workspace().join("deploy/kubernetes")),
    );
}

/// The evaluation above is only as good as its reading of the rules:
/// these are the cases it must get right, from the NetworkPolicy
/// documentation.
#[test]
fn network_policies_are_evaluated_as_a_cluster_does() {
    let labels = |name: &str| BTreeMap::from([("app".to_string(), name.to_string())]);
    let pod = |ns: &str, name: &str| Source::Pod {
        namespace: ns.into(),
        labels: labels(name),
        what: format!("{ns}/{name}"),
    };
    let web = labels("web");
    let target = |port_name| Target {
        namespace: "ns",
        labels: &web,
        port: 80,
        port_name,
    };
    let policy = |spec: Value| json!({"metadata": {"namespace": "ns"}, "spec": spec});
    // No policy: everything.
    assert!(admits(&[], &Source::Outside, &target(Some("http"))));
    // Selected with no rules: nothing.
    let deny = policy(json!({"podSelector": {}, "policyTypes": ["Ingress"]}));
    assert!(!admits(&[&deny], &pod("ns", "api"), &target(Some("http"))));
    // Policies add up: the deny takes nothing away from an allow.
    let open = policy(json!({"podSelector": {"matchLabels": {"app": "web"}},
        "ingress": [{"ports": [{"port": "http"}]}]}));
    assert!(admits(
        &[&deny, &open],
        &Source::Outside,
        &target(Some("http"))
    ));
    assert!(!admits(&[&deny, &open], &Source::Outside, &target(None)));
    // A podSelector alone is this namespace's pods; an empty
    // namespaceSelector every namespace's; neither is outside.
    let api = policy(json!({"podSelector": {},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "api"}}}]}]}));
    assert!(admits(&[&api], &pod("ns", "api"), &target(None)));
    assert!(!admits(&[&api], &pod("other", "api"), &target(None)));
    assert!(!admits(&[&api], &pod("ns", "db"), &target(None)));
    assert!(!admits(&[&api], &Source::Outside, &target(None)));
    let cluster = policy(json!({"podSelector": {},
        "ingress": [{"from": [{"namespaceSelector": {}}]}]}));
    assert!(admits(&[&cluster], &pod("other", "db"), &target(None)));
    assert!(!admits(&[&cluster], &Source::Outside, &target(None)));
    // A policy of another namespace selects nothing here.
    let elsewhere = json!({"metadata": {"namespace": "other"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}});
    assert!(admits(&[&elsewhere], &Source::Outside, &target(None)));
}
