//! The default service definition run the way a kubelet runs it. The
//! rendering of `deploy render kubernetes`, through `kubectl kustomize`,
//! becomes one pod per Deployment:
//!
//! - in a network namespace of its own with a veth link to the host (the
//!   node), whose `/etc/hosts` names the pod and `db.internal`;
//! - with its container's environment built as the kubelet builds it
//!   (Service links, `envFrom`, `env` with `$(VAR)` references, field and
//!   ConfigMap references) and nothing else but the runtime's `PATH` and
//!   `HOSTNAME`;
//! - running the image's entrypoint (the program the image is named after)
//!   with the rendered `command` and `args`, as the rendered user and group,
//!   without privileges to gain or capabilities to keep.
//!
//! The test, as the kubelet, then looks at each pod from the node: the
//! process stays up, every container port accepts on the pod's IP, the
//! readiness and liveness probes pass after their initial delays, each
//! program serves, and the tunnel is ready exactly while the database
//! behind `db.internal` (a real PostgreSQL on the node) runs. Last, SIGTERM
//! stops every pod cleanly within its grace period.
//!
//! It runs twice: as rendered (`enableServiceLinks: false`), and with the
//! Service links a kubelet adds once that line is removed by hand.
//!
//! A role that calls another by its Service (the square-gateway's target,
//! `square-server:2346`) reaches it as in a cluster: the pod's DNS (its
//! `/etc/hosts` here) names every Service, and what kube-proxy does, a
//! forwarder on the node does: one route per pod and Service port, from the
//! node's end of the pod's link to the pod behind the Service.
//!
//! Not simulated: the read-only root filesystem, seccomp, resource limits,
//! the pod's own hostname (a UTS namespace), the Services' cluster IPs
//! (made up, and only in the links that name them), and NetworkPolicies
//! (tests/tests/cluster_network.rs works those out).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use deploy::definition::{Definition, Environment};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tempfile::TempDir;
use tests::kubelet::service_links;
use tests::netns::Netns;
use tests::postgres::{Client, Postgres};
use tests::{binary, require};

/// The namespace of objects kustomize gave none.
const DEFAULT_NAMESPACE: &str = "default";

/// The image's ENTRYPOINT (see the Dockerfile): the program the image is
/// named after, its only one.
const ENTRYPOINT: &str = "/usr/local/bin/program";

/// The `PATH` the image's base sets, which the container runtime passes on.
const IMAGE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The image's `USER`, for a pod that sets no `runAsUser`/`runAsGroup`.
const IMAGE_USER: (u32, u32) = (65532, 65532);

/// The API server's Service, `kubernetes` in the default namespace: the
/// kubelet gives every pod its links, whatever `enableServiceLinks` says.
const API_SERVER: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);

/// The name the kubernetes environment of the default definition gives the
/// tunnel's target, the database.
const DATABASE: &str = "db.internal";

/// How long every process must run at least.
const STAYS_UP: Duration = Duration::from_secs(3);

/// How many failed probes the kubelet allows by default
/// (`failureThreshold`); the test gives a change of state that many
/// periods to show.
const PERIODS: u32 = 3;

#[test]
fn the_rendering_runs_as_a_kubelet_runs_it() {
    simulate(Links::AsRendered);
}

#[test]
fn the_rendering_runs_with_service_links_forced_on() {
    simulate(Links::ForcedOn);
}

/// Whether the pods get Service links.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Links {
    /// As rendered: `enableServiceLinks: false`.
    AsRendered,
    /// As if a user removed `enableServiceLinks: false` from every pod.
    ForcedOn,
}

fn simulate(links: Links) {
    let mut objects = rendered();
    check_replicas(&objects);
    for deployment in objects.iter_mut().filter(|o| o["kind"] == "Deployment") {
        let deployment_name = name(deployment).to_string();
        let spec = &mut deployment["spec"]["template"]["spec"];
        assert_eq!(
            spec["enableServiceLinks"],
            Value::Bool(false),
            "the rendered pod of {deployment_name} must set enableServiceLinks: false"
        );
        if links == Links::ForcedOn {
            spec.as_object_mut().unwrap().remove("enableServiceLinks");
        }
    }
    let services = cluster_services(&objects);
    remove_stale_hosts();

    // One pod per Deployment, whatever its `replicas`: the replicas are
    // identical, and one shows how each runs.
    let deployments: Vec<&Value> = of_kind(&objects, "Deployment").collect();
    assert!(!deployments.is_empty(), "no Deployment rendered");
    let mut pods: Vec<Pod> = deployments
        .iter()
        .map(|d| Pod::start(&objects, d, &services))
        .collect();

    for pod in &mut pods {
        for (port_name, port) in pod.ports() {
            pod.wait_accepting(&port_name, port);
        }
        pod.check_process();
        // The links of the rendered Services, besides the API server's.
        let linked = pod
            .env
            .keys()
            .filter(|k| k.ends_with("_SERVICE_HOST") && *k != "KUBERNETES_SERVICE_HOST")
            .count();
        let expected = match links {
            Links::AsRendered => 0,
            Links::ForcedOn => services.len() - 1,
        };
        assert_eq!(linked, expected, "{}: Service links", pod.name);
    }

    // What kube-proxy does for the Services: from each pod's link, each
    // Service port reaches the pod behind it.
    let _kube_proxy = KubeProxy::start(&pods, &services);

    // The database tunnel's target, which the test runs on the node.
    let tunnel = pods
        .iter()
        .position(|p| p.program == "tunnel" && p.env.contains_key("TUNNEL_HOST"))
        .expect("no tunnel pod with a database host");
    let db_host = pods[tunnel].env_var("TUNNEL_HOST");
    assert_eq!(db_host, DATABASE, "the tunnel's target host");
    let db_port: u16 = pods[tunnel]
        .env_var("TUNNEL_PORT")
        .parse()
        .unwrap_or_else(|e| panic!("TUNNEL_PORT is not a port: {e}"));

    // Readiness, then liveness, each after its initial delay; the
    // database is down.
    for pod in &pods {
        pod.wait_initial_delay("readinessProbe");
        let ready = pod.probe("readinessProbe");
        if pod.program == "tunnel" && pod.env.contains_key("TUNNEL_HOST") {
            match ready {
                Err(why) if why.starts_with("HTTP 503") => {}
                other => pod.fail(&format!(
                    "readiness with the database down: {other:?}, not HTTP 503"
                )),
            }
        } else {
            ready.unwrap_or_else(|why| pod.fail(&format!("readiness probe: {why}")));
        }
    }
    for pod in &pods {
        pod.wait_initial_delay("livenessProbe");
        pod.live();
    }

    // Each program serves, from the node to the pod's IP.
    for pod in &pods {
        match pod.program.as_str() {
            "echo-server" => echo_serves(pod),
            "square-server" => square_serves(pod),
            // A role that calls another through its Service: what it
            // publishes is the other's service.
            "tunnel" if !pod.env.contains_key("TUNNEL_HOST") => {
                let target = pod.env_var("TUNNEL_TARGET");
                let service = target.split(':').next().unwrap_or_default();
                let called = pods
                    .iter()
                    .find(|p| p.deployment == service)
                    .unwrap_or_else(|| pod.fail(&format!("no pod behind {target}")));
                match called.program.as_str() {
                    "square-server" => square_serves_inside(pod),
                    other => pod.fail(&format!("no check for a gateway to {other}")),
                }
            }
            "tunnel" => {}
            other => panic!("the simulation has no check for the program {other}"),
        }
    }

    // The database comes up: the tunnel turns ready and relays to it.
    let tunnel = &pods[tunnel];
    let db = Postgres::start_at(
        IpAddr::V4(tunnel.net.ns.host_addr),
        db_port,
        &[IpAddr::V4(tunnel.ip)],
    );
    tunnel.becomes("ready", true);
    let incoming = tunnel.port("incoming");
    let answer = Client::new(tunnel.ip, incoming)
        .psql("select 1")
        .unwrap_or_else(|e| tunnel.fail(&format!("psql through the tunnel: {e}")));
    assert_eq!(answer, "1");
    tunnel.live();

    // And goes away: the tunnel is no longer ready, but still live.
    drop(db);
    let why = tunnel.becomes("not ready", false);
    if !why.starts_with("HTTP 503") {
        tunnel.fail(&format!(
            "readiness without the database: {why}, not HTTP 503"
        ));
    }
    tunnel.live();

    for pod in &mut pods {
        pod.wait_stayed_up();
    }
    // Deleted, each pod's process gets SIGTERM and its grace period.
    for pod in &mut pods {
        pod.terminate();
    }
}

/// The objects a cluster would be given: `deploy render kubernetes` of
/// the default definition, through `kubectl kustomize`.
fn rendered() -> Vec<Value> {
    let kubectl = require("kubectl");
    let out = tempfile::tempdir().unwrap();
    let mut render = Command::new(binary("deploy"));
    render
        .current_dir(workspace())
        .args(["render", "kubernetes", "--out"])
        .arg(out.path());
    succeeded(
        bounded(&mut render, Duration::from_secs(30)),
        "deploy render",
    );
    let mut kustomize = Command::new(kubectl);
    kustomize.arg("kustomize").arg(out.path());
    let built = succeeded(
        bounded(&mut kustomize, Duration::from_secs(30)),
        "kubectl kustomize",
    );
    let text = String::from_utf8(built.stdout).unwrap();
    serde_saphyr::from_multiple(&text)
        .unwrap_or_else(|e| panic!("kubectl kustomize wrote no YAML documents: {e}\n{text}"))
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn of_kind<'a>(objects: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    objects.iter().filter(move |o| o["kind"] == kind)
}

fn name(object: &Value) -> &str {
    text(&object["metadata"]["name"], "metadata.name")
}

/// `value` as a string, or a panic naming `what`.
fn text<'a>(value: &'a Value, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {value}"))
}

/// Every Deployment has the instances its role has in the definition's
/// kubernetes environment, and every role has its Deployment.
fn check_replicas(objects: &[Value]) {
    let definition = Definition::load(&workspace().join(deploy::DEFAULT_DEFINITION))
        .unwrap_or_else(|problems| panic!("{problems}"))
        .in_environment(Environment::Kubernetes);
    let deployments: Vec<&Value> = of_kind(objects, "Deployment").collect();
    for role in &definition.roles {
        let deployment = deployments
            .iter()
            .find(|d| name(d) == role.name)
            .unwrap_or_else(|| panic!("no Deployment for the role {}", role.name));
        assert_eq!(
            deployment["spec"]["replicas"].as_i64(),
            Some(role.instances),
            "the replicas of {}",
            role.name
        );
        let image = text(
            &deployment["spec"]["template"]["spec"]["containers"][0]["image"],
            "image",
        );
        assert_eq!(
            program_of(image),
            role.program,
            "the image of {}",
            role.name
        );
    }
    assert_eq!(deployments.len(), definition.roles.len());
}

/// The program an image runs: the one it is named after
/// (`registry/<program>:<tag>`).
fn program_of(image: &str) -> String {
    let image = image.split('@').next().unwrap();
    let last = image.rsplit('/').next().unwrap();
    last.split(':').next().unwrap().to_string()
}

/// A Service as the kubelet sees it.
#[derive(Debug)]
struct Service {
    name: String,
    cluster_ip: Ipv4Addr,
    /// Each port's number, protocol and name.
    ports: Vec<(u16, String, String)>,
    /// Each port's target on the pods: a number or a container port's name.
    targets: Vec<String>,
    /// The Deployment whose pods it selects (`app.kubernetes.io/name`).
    selects: String,
    /// Whether its links are given with `enableServiceLinks: false` too.
    master: bool,
}

/// The API server's Service and the rendered ones, each with a made-up
/// cluster IP.
fn cluster_services(objects: &[Value]) -> Vec<Service> {
    let mut services = vec![Service {
        name: "kubernetes".into(),
        cluster_ip: API_SERVER,
        ports: vec![(443, "TCP".into(), "https".into())],
        targets: Vec::new(),
        selects: String::new(),
        master: true,
    }];
    // A headless Service (the instances of a role, by DNS) has no cluster
    // IP, and the kubelet makes no links for it.
    let linked = of_kind(objects, "Service").filter(|s| s["spec"]["clusterIP"] != "None");
    for (n, service) in linked.enumerate() {
        let spec = &service["spec"];
        assert!(
            spec.get("clusterIP").is_none() && spec["type"] != "ExternalName",
            "Service {}: a Service with a cluster IP of its own or an external one is not simulated",
            name(service)
        );
        let ports = spec["ports"]
            .as_array()
            .unwrap_or_else(|| panic!("Service {} has no ports", name(service)))
            .iter()
            .map(|p| {
                let number = p["port"].as_u64().expect("a Service port's number");
                (
                    u16::try_from(number).unwrap(),
                    p["protocol"].as_str().unwrap_or("TCP").to_string(),
                    p["name"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        let targets = spec["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| match &p["targetPort"] {
                Value::String(name) => name.clone(),
                Value::Number(n) => n.to_string(),
                _ => p["port"].to_string(),
            })
            .collect();
        services.push(Service {
            name: name(service).to_string(),
            cluster_ip: Ipv4Addr::new(10, 96, 0, 10 + u8::try_from(n).unwrap()),
            ports,
            targets,
            selects: spec["selector"]["app.kubernetes.io/name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            master: false,
        });
    }
    services
}

/// The variables the kubelet makes for one Service.
fn link_variables(service: &Service) -> Vec<(String, String)> {
    let ports: Vec<(u16, &str, &str)> = service
        .ports
        .iter()
        .map(|(port, protocol, name)| (*port, protocol.as_str(), name.as_str()))
        .collect();
    service_links(&service.name, service.cluster_ip.into(), &ports)
}

/// `input` with `$(NAME)` replaced by `lookup(NAME)` and `$$` by `$`, as
/// Kubernetes expands `env` values, `command` and `args`; a reference
/// `lookup` does not know, or one without its `)`, stays as written.
fn expand(input: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::new();
    let mut rest = input;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if after.is_empty() {
            rest = &rest[at..];
            break;
        }
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(reference) = after.strip_prefix('(') {
            match reference.find(')') {
                Some(end) => {
                    let name = &reference[..end];
                    match lookup(name) {
                        Some(value) => out.push_str(&value),
                        None => out.push_str(&format!("$({name})")),
                    }
                    rest = &reference[end + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = reference;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[test]
fn references_expand_as_kubernetes_expands_them() {
    let lookup = |name: &str| match name {
        "A" => Some("x".to_string()),
        "EMPTY" => Some(String::new()),
        _ => None,
    };
    for (input, expanded) in [
        ("$(A)", "x"),
        ("a-$(A)-$(A)", "a-x-x"),
        ("$(EMPTY)|", "|"),
        ("$$(A)", "$(A)"),
        ("$$$(A)", "$x"),
        ("$(B)", "$(B)"),
        ("$(A", "$(A"),
        ("$A $", "$A $"),
        ("cost: 5$", "cost: 5$"),
        ("$()", "$()"),
    ] {
        assert_eq!(expand(input, lookup), expanded, "{input}");
    }
}

#[test]
fn service_links_are_named_as_the_kubelet_names_them() {
    let service = Service {
        name: "foo-bar".into(),
        cluster_ip: Ipv4Addr::new(10, 96, 0, 7),
        ports: vec![
            (1234, "TCP".into(), "x-y".into()),
            (53, "UDP".into(), "dns".into()),
        ],
        targets: Vec::new(),
        selects: String::new(),
        master: false,
    };
    let vars: Vec<String> = link_variables(&service)
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    assert_eq!(
        vars,
        [
            "FOO_BAR_SERVICE_HOST=10.96.0.7",
            "FOO_BAR_SERVICE_PORT=1234",
            "FOO_BAR_SERVICE_PORT_X_Y=1234",
            "FOO_BAR_SERVICE_PORT_DNS=53",
            "FOO_BAR_PORT=tcp://10.96.0.7:1234",
            "FOO_BAR_PORT_1234_TCP=tcp://10.96.0.7:1234",
            "FOO_BAR_PORT_1234_TCP_PROTO=tcp",
            "FOO_BAR_PORT_1234_TCP_PORT=1234",
            "FOO_BAR_PORT_1234_TCP_ADDR=10.96.0.7",
            "FOO_BAR_PORT_53_UDP=udp://10.96.0.7:53",
            "FOO_BAR_PORT_53_UDP_PROTO=udp",
            "FOO_BAR_PORT_53_UDP_PORT=53",
            "FOO_BAR_PORT_53_UDP_ADDR=10.96.0.7",
        ]
    );
}

/// What a pod's container is given by the kubelet: `name`, `ip`, the
/// objects (its ConfigMaps) and the Services of the namespace.
struct PodContext<'a> {
    objects: &'a [Value],
    services: &'a [Service],
    name: &'a str,
    namespace: &'a str,
    ip: Ipv4Addr,
}

impl PodContext<'_> {
    /// The `data` of ConfigMap `name`; `None` when there is none and it is
    /// `optional`. Without it the kubelet would not start the container.
    fn config_map(&self, name: &str, optional: bool) -> Option<&serde_json::Map<String, Value>> {
        let found = of_kind(self.objects, "ConfigMap").find(|c| self::name(c) == name);
        match found {
            Some(map) => Some(
                map["data"]
                    .as_object()
                    .unwrap_or_else(|| panic!("ConfigMap {name} has no data")),
            ),
            None if optional => None,
            None => {
                panic!("ConfigMap {name} is not in the rendering: the container would not start")
            }
        }
    }

    /// The container's environment as the kubelet makes it: the Service
    /// links (the API server's always, the others while
    /// `enableServiceLinks` is true or absent), overridden by `envFrom`,
    /// overridden by `env`.
    fn environment(&self, spec: &Value, container: &Value) -> BTreeMap<String, String> {
        let links_on = spec["enableServiceLinks"].as_bool().unwrap_or(true);
        let links: BTreeMap<String, String> = self
            .services
            .iter()
            .filter(|s| s.master || links_on)
            .flat_map(link_variables)
            .collect();
        let mut env = BTreeMap::new();
        for source in container["envFrom"].as_array().into_iter().flatten() {
            let prefix = source["prefix"].as_str().unwrap_or("");
            let reference = &source["configMapRef"];
            assert!(
                reference.is_object(),
                "envFrom {source}: only configMapRef is simulated"
            );
            let map_name = text(&reference["name"], "configMapRef.name");
            let optional = reference["optional"].as_bool().unwrap_or(false);
            for (key, value) in self.config_map(map_name, optional).into_iter().flatten() {
                let var = format!("{prefix}{key}");
                assert!(
                    !var.is_empty() && !var.contains('='),
                    "ConfigMap {map_name}: {var:?} is no variable name; the kubelet would skip it"
                );
                env.insert(var, text(value, key).to_string());
            }
        }
        for entry in container["env"].as_array().into_iter().flatten() {
            let var = text(&entry["name"], "env name").to_string();
            let value = if let Some(from) = entry.get("valueFrom") {
                match self.value_from(from) {
                    Some(value) => value,
                    None => continue,
                }
            } else {
                let raw = entry["value"].as_str().unwrap_or("");
                expand(raw, |name| {
                    env.get(name).or_else(|| links.get(name)).cloned()
                })
            };
            env.insert(var, value);
        }
        for (var, value) in links {
            env.entry(var).or_insert(value);
        }
        env
    }

    /// An `env` entry's `valueFrom`; `None` for an optional key that is
    /// not there (the variable is then not set).
    fn value_from(&self, from: &Value) -> Option<String> {
        if let Some(field) = from.get("fieldRef") {
            let path = text(&field["fieldPath"], "fieldRef.fieldPath");
            return Some(match path {
                "metadata.name" => self.name.to_string(),
                "metadata.namespace" => self.namespace.to_string(),
                "status.podIP" | "status.podIPs" => self.ip.to_string(),
                other => panic!("fieldRef {other} is not simulated"),
            });
        }
        if let Some(key_ref) = from.get("configMapKeyRef") {
            let map_name = text(&key_ref["name"], "configMapKeyRef.name");
            let key = text(&key_ref["key"], "configMapKeyRef.key");
            let optional = key_ref["optional"].as_bool().unwrap_or(false);
            let value = self
                .config_map(map_name, optional)
                .and_then(|data| data.get(key));
            return match value {
                Some(value) => Some(text(value, key).to_string()),
                None if optional => None,
                None => {
                    panic!("ConfigMap {map_name} has no key {key}: the container would not start")
                }
            };
        }
        panic!("valueFrom {from}: only fieldRef and configMapKeyRef are simulated")
    }
}

/// The process's command line: `command` replaces the image's ENTRYPOINT,
/// `args` its CMD (empty), both with `$(VAR)` references to the kubelet's
/// environment `env` expanded.
fn command_line(container: &Value, env: &BTreeMap<String, String>) -> Vec<String> {
    let list = |key: &str| {
        container.get(key).map(|words| {
            words
                .as_array()
                .unwrap_or_else(|| panic!("{key} is not a list"))
                .iter()
                .map(|w| expand(text(w, key), |name| env.get(name).cloned()))
                .collect::<Vec<_>>()
        })
    };
    let mut words = list("command").unwrap_or_else(|| vec![ENTRYPOINT.to_string()]);
    words.extend(list("args").unwrap_or_default());
    words
}

/// A pod's network: a namespace linked to the node, and the files
/// `ip netns exec` puts over `/etc` inside (deleted with it).
struct PodNet {
    ns: Netns,
    etc: PathBuf,
}

impl PodNet {
    fn create() -> PodNet {
        let ns = Netns::create("pod");
        let etc = Path::new("/etc/netns").join(&ns.name);
        PodNet { ns, etc }
    }

    /// The pod's `/etc/hosts`, as the kubelet manages it, naming the
    /// database as the cluster would: the node, over this pod's link.
    fn write_hosts(&self, pod_name: &str, services: &[Service]) {
        fs::create_dir_all(&self.etc).unwrap();
        // Every Service by name, at the node's end of the link, where the
        // test's kube-proxy forwards its ports.
        let names: String = services
            .iter()
            .filter(|s| !s.master)
            .map(|s| format!("{}\t{}\n", self.ns.host_addr, s.name))
            .collect();
        let hosts = format!(
            "# Kubernetes-managed hosts file.\n\
             127.0.0.1\tlocalhost\n\
             ::1\tlocalhost ip6-localhost ip6-loopback\n\
             fe00::0\tip6-localnet\n\
             fe00::0\tip6-mcastprefix\n\
             fe00::1\tip6-allnodes\n\
             fe00::2\tip6-allrouters\n\
             {}\t{pod_name}\n\
             {}\t{DATABASE}\n\
             {names}",
            self.ns.ns_addr, self.ns.host_addr
        );
        fs::write(self.etc.join("hosts"), hosts).unwrap();
    }
}

impl Drop for PodNet {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.etc);
    }
}

/// Removes `/etc/netns` entries of this test's namespaces that are gone
/// (left by a run that was killed).
fn remove_stale_hosts() {
    let Ok(entries) = fs::read_dir("/etc/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let ns = file_name.to_string_lossy();
        if ns.starts_with("e2e-pod-") && !Path::new("/run/netns").join(&*ns).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Whether the test runs as root.
fn is_root() -> bool {
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Whether `uid`:`gid` may run `path`: every directory above it searchable,
/// the file readable and executable.
fn runnable_by(path: &Path, uid: u32, gid: u32) -> bool {
    let allowed = |meta: &fs::Metadata, want: u32| {
        let mode = meta.mode();
        let bits = if meta.uid() == uid {
            mode >> 6
        } else if meta.gid() == gid {
            mode >> 3
        } else {
            mode
        };
        bits & want == want
    };
    let Ok(path) = path.canonicalize() else {
        return false;
    };
    let file_ok = fs::metadata(&path).is_ok_and(|m| allowed(&m, 0o5));
    file_ok
        && path
            .ancestors()
            .skip(1)
            .all(|dir| fs::metadata(dir).is_ok_and(|m| allowed(&m, 0o1)))
}

#[test]
fn a_binary_in_a_closed_directory_is_not_runnable_by_others() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("program");
    fs::write(&file, "").unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o755)).unwrap();
    let (uid, gid) = (IMAGE_USER.0 + 1, IMAGE_USER.1 + 1);
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
    assert!(!runnable_by(&file, uid, gid));
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o711)).unwrap();
    assert!(runnable_by(&file, uid, gid));
    fs::set_permissions(&file, fs::Permissions::from_mode(0o750)).unwrap();
    assert!(!runnable_by(&file, uid, gid));
}

/// A running container: its process (the program itself) and its log, the
/// process's stdout and stderr. The process is killed when dropped.
struct Container {
    child: Child,
    log: PathBuf,
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One pod of a Deployment, running.
struct Pod {
    deployment: String,
    name: String,
    program: String,
    ip: Ipv4Addr,
    container: Value,
    env: BTreeMap<String, String>,
    binary: PathBuf,
    user: (u32, u32),
    no_new_privs: bool,
    drop_all: bool,
    grace: Duration,
    started: Instant,
    exited: Option<std::process::ExitStatus>,
    // Dropped in this order: the process, the namespace, the scratch
    // directory (the log and any copy of the binary).
    process: Container,
    net: PodNet,
    _scratch: TempDir,
}

impl Pod {
    /// Starts the pod of `deployment` as the kubelet would.
    fn start(objects: &[Value], deployment: &Value, services: &[Service]) -> Pod {
        let deployment_name = name(deployment).to_string();
        let spec = &deployment["spec"]["template"]["spec"];
        assert!(
            spec.get("initContainers").is_none(),
            "{deployment_name}: init containers are not simulated"
        );
        let containers = spec["containers"].as_array().expect("containers");
        assert_eq!(
            containers.len(),
            1,
            "{deployment_name}: one container per pod is simulated"
        );
        let container = containers[0].clone();
        let program = program_of(text(&container["image"], "image"));
        // A name as a ReplicaSet gives its pods.
        let pod_name = format!("{deployment_name}-5d8f7c6b9-x2x4q");

        let net = PodNet::create();
        net.write_hosts(&pod_name, services);
        let ip = net.ns.ns_addr;
        let env = PodContext {
            objects,
            services,
            name: &pod_name,
            namespace: deployment["metadata"]["namespace"]
                .as_str()
                .unwrap_or(DEFAULT_NAMESPACE),
            ip,
        }
        .environment(spec, &container);
        let argv = command_line(&container, &env);
        // What the container runtime adds where the container sets none:
        // the image's PATH, and the pod's name as HOSTNAME.
        let mut env = env;
        env.entry("PATH".into()).or_insert(IMAGE_PATH.into());
        env.entry("HOSTNAME".into())
            .or_insert_with(|| pod_name.clone());
        assert_eq!(
            argv[0], ENTRYPOINT,
            "{deployment_name}: the image has no other program"
        );

        let security = |key: &str| {
            let own = &container["securityContext"][key];
            if own.is_null() {
                spec["securityContext"][key].clone()
            } else {
                own.clone()
            }
        };
        let id = |key: &str, default: u32| {
            security(key)
                .as_u64()
                .map_or(default, |n| u32::try_from(n).unwrap())
        };
        let user = (
            id("runAsUser", IMAGE_USER.0),
            id("runAsGroup", IMAGE_USER.1),
        );
        if security("runAsNonRoot") == Value::Bool(true) {
            assert_ne!(
                user.0, 0,
                "{deployment_name}: runAsNonRoot with user 0: the kubelet would not start it"
            );
        }
        let no_new_privs =
            container["securityContext"]["allowPrivilegeEscalation"] == Value::Bool(false);
        let drop_all = container["securityContext"]["capabilities"]["drop"]
            .as_array()
            .is_some_and(|caps| caps.iter().any(|c| c == "ALL"));
        let grace =
            Duration::from_secs(spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30));

        // The image's program, where the pod's user can run it.
        let scratch = tempfile::tempdir().unwrap();
        let mut program_path = binary(&program);
        if !runnable_by(&program_path, user.0, user.1) {
            fs::set_permissions(scratch.path(), fs::Permissions::from_mode(0o755)).unwrap();
            let copy = scratch.path().join(&program);
            fs::copy(&program_path, &copy).unwrap();
            fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).unwrap();
            program_path = copy;
        }

        let log = scratch.path().join("container.log");
        let log_file = File::create(&log).unwrap();
        let mut command = Command::new(require("ip"));
        command.args(["netns", "exec", &net.ns.name]);
        if is_root() {
            command
                .arg(require("setpriv"))
                .args(["--reuid", &user.0.to_string()])
                .args(["--regid", &user.1.to_string()])
                .arg("--clear-groups");
            if no_new_privs {
                command.arg("--no-new-privs");
            }
            if drop_all {
                command.args(["--inh-caps=-all", "--bounding-set=-all"]);
            }
            command.arg("--");
        } else {
            eprintln!(
                "note: not root, so {pod_name} runs as this user, not as {}:{}",
                user.0, user.1
            );
        }
        command
            .arg(&program_path)
            .args(&argv[1..])
            .env_clear()
            .envs(&env)
            .current_dir(container["workingDir"].as_str().unwrap_or("/"))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {pod_name}: {e}"));
        Pod {
            deployment: deployment_name,
            name: pod_name,
            program,
            ip,
            container,
            env,
            binary: program_path,
            user,
            no_new_privs,
            drop_all,
            grace,
            started: Instant::now(),
            exited: None,
            process: Container { child, log },
            net,
            _scratch: scratch,
        }
    }

    /// What the container wrote so far.
    fn log(&self) -> String {
        fs::read_to_string(&self.process.log).unwrap_or_default()
    }

    /// Panics with `what`, the pod's name and its log.
    fn fail(&self, what: &str) -> ! {
        panic!(
            "{} ({}): {what}\n--- its log:\n{}",
            self.name,
            self.deployment,
            self.log()
        )
    }

    /// Whether the process still runs; records how it ended if not.
    fn running(&mut self) -> bool {
        if self.exited.is_none() {
            self.exited = self.process.child.try_wait().unwrap();
        }
        self.exited.is_none()
    }

    /// How the process ended, once it has.
    fn ended(&self) -> String {
        self.exited
            .map_or_else(|| "still running".into(), |status| status.to_string())
    }

    /// A variable of the container's environment.
    fn env_var(&self, var: &str) -> &str {
        self.env
            .get(var)
            .unwrap_or_else(|| panic!("{}: no {var} in the environment", self.name))
    }

    /// The container's ports by name.
    fn ports(&self) -> Vec<(String, u16)> {
        self.container["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                let number = p["containerPort"].as_u64().expect("containerPort");
                (
                    p["name"].as_str().unwrap_or("").to_string(),
                    u16::try_from(number).unwrap(),
                )
            })
            .collect()
    }

    /// The container port named `port_name`.
    fn port(&self, port_name: &str) -> u16 {
        self.ports()
            .into_iter()
            .find(|(n, _)| n == port_name)
            .unwrap_or_else(|| panic!("{}: no container port {port_name}", self.name))
            .1
    }

    /// A probe's port: a number, or a container port's name.
    fn probe_port(&self, port: &Value) -> u16 {
        match port {
            Value::Number(n) => u16::try_from(n.as_u64().unwrap()).unwrap(),
            Value::String(s) => match s.parse() {
                Ok(n) => n,
                Err(_) => self.port(s),
            },
            other => panic!("{}: a probe's port {other}", self.name),
        }
    }

    /// The process is the program itself, as the pod's user and group,
    /// with no groups, privileges or capabilities beyond the rendering's,
    /// and exactly the environment the kubelet gives.
    /// Run once it accepts connections: by then it has been exec'd.
    fn check_process(&mut self) {
        let pid = self.process.child.id();
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        if !self.running() {
            self.fail(&format!("exited: {}", self.ended()));
        }
        let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap();
        assert_eq!(
            exe,
            self.binary.canonicalize().unwrap(),
            "{}: the pod's process is the program",
            self.name
        );
        if is_root() {
            let field = |key: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .map(str::trim)
                    .unwrap_or_else(|| panic!("no {key} in\n{status}"))
                    .to_string()
            };
            let (uid, gid) = (self.user.0.to_string(), self.user.1.to_string());
            assert_eq!(field("Uid:"), [uid.as_str(); 4].join("\t"), "{}", self.name);
            assert_eq!(field("Gid:"), [gid.as_str(); 4].join("\t"), "{}", self.name);
            assert_eq!(field("Groups:"), "", "{}", self.name);
            assert_eq!(field("CapEff:"), "0000000000000000", "{}", self.name);
            if self.drop_all {
                assert_eq!(field("CapBnd:"), "0000000000000000", "{}", self.name);
            }
            if self.no_new_privs {
                assert_eq!(field("NoNewPrivs:"), "1", "{}", self.name);
            }
        }
        let environ = fs::read(format!("/proc/{pid}/environ")).unwrap();
        let got: BTreeMap<String, String> = environ
            .split(|b| *b == 0)
            .filter(|v| !v.is_empty())
            .map(|v| {
                let v = String::from_utf8_lossy(v);
                let (k, val) = v.split_once('=').unwrap_or((&v, ""));
                (k.to_string(), val.to_string())
            })
            .collect();
        assert_eq!(got, self.env, "{}: the process's environment", self.name);
    }

    /// Waits until the pod's IP accepts connections on `port`.
    fn wait_accepting(&mut self, port_name: &str, port: u16) {
        let addr = SocketAddr::from((self.ip, port));
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
                return;
            }
            if !self.running() {
                self.fail(&format!(
                    "exited ({}) before accepting on port {port_name} ({addr})",
                    self.ended()
                ));
            }
            if Instant::now() > until {
                self.fail(&format!(
                    "port {port_name} ({addr}) accepts nothing after 20 s"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sleeps until the kubelet would first run `which` probe.
    fn wait_initial_delay(&self, which: &str) {
        let delay = self.container[which]["initialDelaySeconds"]
            .as_u64()
            .unwrap_or(0);
        let at = self.started + Duration::from_secs(delay);
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
    }

    /// The container's `which` probe, run once as the kubelet runs it:
    /// what it saw when it passed, or why it failed.
    fn probe(&self, which: &str) -> Result<String, String> {
        let probe = &self.container[which];
        assert!(probe.is_object(), "{}: no {which}", self.deployment);
        let timeout = Duration::from_secs(probe["timeoutSeconds"].as_u64().unwrap_or(1));
        let host = |action: &Value| match action["host"].as_str() {
            Some(host) => host.parse().expect("a probe's host as an address"),
            None => IpAddr::V4(self.ip),
        };
        if let Some(tcp) = probe.get("tcpSocket") {
            let addr = SocketAddr::new(host(tcp), self.probe_port(&tcp["port"]));
            return match TcpStream::connect_timeout(&addr, timeout) {
                Ok(_) => Ok(format!("{addr} accepted")),
                Err(e) => Err(format!("{addr}: {e}")),
            };
        }
        if let Some(http) = probe.get("httpGet") {
            let scheme = http["scheme"].as_str().unwrap_or("HTTP");
            assert_eq!(
                scheme, "HTTP",
                "{}: only HTTP probes are simulated",
                self.name
            );
            let addr = SocketAddr::new(host(http), self.probe_port(&http["port"]));
            let path = http["path"].as_str().unwrap_or("/");
            let headers: Vec<(String, String)> = http["httpHeaders"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|h| {
                    (
                        text(&h["name"], "header name").to_string(),
                        text(&h["value"], "header value").to_string(),
                    )
                })
                .collect();
            return http_get(addr, path, &headers, timeout);
        }
        panic!(
            "{}: {which} {probe}: only httpGet and tcpSocket probes are simulated",
            self.name
        )
    }

    /// The liveness probe passes.
    fn live(&self) {
        if let Err(why) = self.probe("livenessProbe") {
            self.fail(&format!("liveness probe failed: {why}"));
        }
    }

    /// Runs the readiness probe until it passes (`ready`) or fails (not),
    /// within [`PERIODS`] of its periods; returns what the last probe saw.
    fn becomes(&self, state: &str, ready: bool) -> String {
        let period = self.container["readinessProbe"]["periodSeconds"]
            .as_u64()
            .unwrap_or(10);
        let limit = Duration::from_secs(period) * PERIODS;
        let until = Instant::now() + limit;
        loop {
            let seen = self.probe("readinessProbe");
            if seen.is_ok() == ready {
                return seen.unwrap_or_else(|why| why);
            }
            if Instant::now() > until {
                self.fail(&format!(
                    "not {state} within {PERIODS} probe periods ({limit:?}): {seen:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until the process has run [`STAYS_UP`], and checks it still
    /// runs.
    fn wait_stayed_up(&mut self) {
        std::thread::sleep((self.started + STAYS_UP).saturating_duration_since(Instant::now()));
        if !self.running() {
            self.fail(&format!(
                "exited after less than {STAYS_UP:?}: {}",
                self.ended()
            ));
        }
    }

    /// SIGTERM, as the kubelet stops a container: the process exits with
    /// status 0 within the grace period.
    fn terminate(&mut self) {
        let pid = Pid::from_raw(i32::try_from(self.process.child.id()).unwrap());
        kill(pid, Signal::SIGTERM).unwrap();
        let until = Instant::now() + self.grace;
        while self.running() {
            if Instant::now() > until {
                self.fail(&format!(
                    "still running {:?} (its grace period) after SIGTERM",
                    self.grace
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let status = self.exited.unwrap();
        if status.code() != Some(0) {
            self.fail(&format!("exited with {status} on SIGTERM"));
        }
    }
}

/// An HTTP/1.1 GET as the kubelet's probe makes it, within `timeout`
/// from connecting to the whole answer: `Ok` for a status of 200 to 399.
/// Either way it says `HTTP <status> <body>` (or why there was none).
fn http_get(
    addr: SocketAddr,
    path: &str,
    headers: &[(String, String)],
    timeout: Duration,
) -> Result<String, String> {
    let until = Instant::now() + timeout;
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/1.37\r\nAccept: */*\r\n"
    );
    for (header, value) in headers {
        request.push_str(&format!("{header}: {value}\r\n"));
    }
    request.push_str("Connection: close\r\n\r\n");
    let left = |until: Instant| {
        let left = until.saturating_duration_since(Instant::now());
        (!left.is_zero())
            .then_some(left)
            .ok_or_else(|| format!("{addr}: no answer within {timeout:?}"))
    };
    stream.set_write_timeout(Some(left(until)?)).unwrap();
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("{addr}: {e}"))?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        stream.set_read_timeout(Some(left(until)?)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!("{addr}: no answer within {timeout:?}"))
            }
            Err(e) => return Err(format!("{addr}: {e}")),
        }
        if complete(&answer) {
            break;
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status: u16 = head
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("HTTP/1."))
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("{addr}: not an HTTP answer: {answer:?}"))?;
    let seen = format!("HTTP {status} {}", body.trim());
    if (200..400).contains(&status) {
        Ok(seen)
    } else {
        Err(seen)
    }
}

/// Whether an HTTP answer is whole by its `Content-Length` (else it ends
/// when the server closes).
fn complete(answer: &[u8]) -> bool {
    let text = String::from_utf8_lossy(answer);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .is_some_and(|length| body.len() >= length)
}

/// A connection to the echo server's pod gets the date/time service's
/// greeting, from the instance that is the pod, and today's date.
fn echo_serves(pod: &Pod) {
    let (_, port) = pod.ports()[0].clone();
    let addr = SocketAddr::from((pod.ip, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| pod.fail(&format!("connect to {addr}: {e}")));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let greeting = read_until(&mut s, "Your choice: ", pod);
    assert!(
        greeting.starts_with("Welcome to the date/time service on ")
            && greeting.contains(&format!(", instance {}.", pod.name)),
        "{}: {greeting:?}",
        pod.name
    );
    s.write_all(b"1\n").unwrap();
    let date = read_until(&mut s, "Your choice: ", pod);
    assert!(date.contains("Current date: "), "{}: {date:?}", pod.name);
    s.write_all(b"9\n").unwrap();
}

/// Reads until what came ends with `end`, within the stream's timeout.
fn read_until(s: &mut TcpStream, end: &str, pod: &Pod) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).ends_with(end) {
        match s.read(&mut buf) {
            Ok(0) => pod.fail(&format!(
                "closed before {end:?}: {:?}",
                String::from_utf8_lossy(&got)
            )),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => pod.fail(&format!(
                "{e} waiting for {end:?} after {:?}",
                String::from_utf8_lossy(&got)
            )),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// `square-client`, on the node, gets its squares from the pod.
fn square_serves(pod: &Pod) {
    let (_, port) = pod.ports()[0].clone();
    let addr = SocketAddr::from((pod.ip, port));
    let mut client = Command::new(binary("square-client"));
    client
        .env_clear()
        .env("PATH", IMAGE_PATH)
        .args(["--server", &addr.to_string(), "-4", "12"]);
    let out = bounded(&mut client, Duration::from_secs(20));
    if out.status.code() != Some(0) || out.stdout != b"16\n144\n" {
        pod.fail(&format!(
            "square-client to {addr}: {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
}

/// [`square_serves`] from inside the pod, to its own loopback: a gateway
/// admits only the networks of its `allow` list, and the node's end of the
/// link is in none of them.
fn square_serves_inside(pod: &Pod) {
    let (_, port) = pod.ports()[0].clone();
    let server = SocketAddr::from(([127, 0, 0, 1], port)).to_string();
    let mut client = pod.net.ns.exec(
        binary("square-client"),
        ["--server", server.as_str(), "-4", "12"],
    );
    client.env_clear().env("PATH", IMAGE_PATH);
    let out = bounded(&mut client, Duration::from_secs(20));
    if out.status.code() != Some(0) || out.stdout != b"16\n144\n" {
        pod.fail(&format!(
            "square-client to {server} in the pod: {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
}

/// The test's kube-proxy: one tunnel on the node with a route per pod and
/// Service port, from the node's end of the pod's link to the selected
/// pod's container port.
struct KubeProxy {
    child: Child,
    _dir: TempDir,
}

impl KubeProxy {
    fn start(pods: &[Pod], services: &[Service]) -> KubeProxy {
        let mut routes = String::from("routes:\n");
        let mut count = 0;
        for (n, from) in pods.iter().enumerate() {
            for service in services.iter().filter(|s| !s.master) {
                let Some(behind) = pods.iter().find(|p| p.deployment == service.selects) else {
                    continue;
                };
                for ((port, protocol, _), target) in service.ports.iter().zip(&service.targets) {
                    if protocol != "TCP" {
                        continue;
                    }
                    let to = target
                        .parse::<u16>()
                        .unwrap_or_else(|_| behind.port(target));
                    routes.push_str(&format!(
                        "  - {{name: p{n}-{}-{port}, listen: \"{}:{port}\", target: \"{}:{to}\"}}\n",
                        service.name, from.net.ns.host_addr, behind.ip
                    ));
                    count += 1;
                }
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("kube-proxy.yaml");
        fs::write(&config, &routes).unwrap();
        let log = File::create(dir.path().join("kube-proxy.log")).unwrap();
        let child = Command::new(binary("tunnel"))
            .args(["--config", config.to_str().unwrap(), "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        // Its routes accept once it has bound them.
        let last = pods.last().map(|p| p.net.ns.host_addr);
        let until = Instant::now() + Duration::from_secs(10);
        while count > 0 && Instant::now() < until {
            let bound = last.is_some_and(|addr| {
                services.iter().filter(|s| !s.master).all(|s| {
                    s.ports.iter().all(|(port, _, _)| {
                        TcpStream::connect_timeout(
                            &SocketAddr::from((addr, *port)),
                            Duration::from_millis(200),
                        )
                        .is_ok()
                    })
                })
            });
            if bound {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        KubeProxy { child, _dir: dir }
    }
}

impl Drop for KubeProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `command` to its end, killing it after `limit`.
fn bounded(command: &mut Command, limit: Duration) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    let reader = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = reader(Box::new(child.stdout.take().unwrap()));
    let stderr = reader(Box::new(child.stderr.take().unwrap()));
    let until = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// `out`, when it is a success; else a panic with what `what` said.
fn succeeded(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
