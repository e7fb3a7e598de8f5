//! `deploy`: the definition check, the committed rendering, the manifests
//! against real validators (kubernetes-validate, kubectl kustomize,
//! hadolint), and the development fabric: surviving crashed instances, a
//! closed or stuck terminal, and leaving nothing behind however it is
//! stopped.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tests::{binary, free_port, require};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn deploy(args: &[&str]) -> std::process::Output {
    Command::new(binary("deploy"))
        .current_dir(workspace())
        .args(args)
        .output()
        .unwrap()
}

/// Runs deploy, which must succeed; its stderr (warnings) is returned.
fn deploy_ok(args: &[&str]) -> String {
    let out = deploy(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "deploy {args:?}: {err}");
    err
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("deploy-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn the_default_definition_checks() {
    let out = deploy(&["check"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "tcp-roles: 4 roles, 8 instances: ok\n"
    );
}

#[test]
fn a_bad_definition_is_reported_whole_with_lines() {
    let dir = temp_dir("bad");
    let file = dir.join("service.yaml");
    std::fs::write(
        &file,
        "name: broken\nroles:\n  - name: echo\n    program: echo-server\n    instances: 0\n    endpoints:\n      - name: EchoEndpoint\n        visibility: public\n        port: 1234\n    settings:\n      idle_timeot: 5m\n  - name: other\n    program: square-server\n    endpoints:\n      - name: SquareEndpoint\n        visibility: public\n        port: 1234\n  - name: db\n    program: mysql\n",
    )
    .unwrap();
    let out = deploy(&["check", file.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    let shown = file.display().to_string();
    assert!(err.contains("4 problems"), "{err}");
    assert!(
        err.contains(&format!("{shown}:5:5: role echo has 0 instances")),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{shown}:11:7: role echo: setting idle_timeot: echo-server has no setting idle_timeot"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{shown}:15:9: port 1234 is used by both echo/EchoEndpoint and other/SquareEndpoint"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("{shown}:19:5: role db: unknown program \"mysql\"")),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// Every file in `dir`, by name.
fn files(dir: &Path) -> HashMap<String, String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect()
}

#[test]
fn the_committed_rendering_is_current() {
    let dir = temp_dir("render");
    let k8s = dir.join("kubernetes");
    assert!(
        deploy(&["render", "kubernetes", "--out", k8s.to_str().unwrap()])
            .status
            .success()
    );
    assert!(
        deploy(&["render", "compose", "--out", dir.to_str().unwrap()])
            .status
            .success()
    );
    let committed = files(&workspace().join("deploy/kubernetes"));
    let fresh = files(&k8s);
    assert_eq!(
        committed.keys().collect::<HashSet<_>>(),
        fresh.keys().collect::<HashSet<_>>(),
        "deploy/kubernetes is stale: run `deploy render kubernetes` and commit"
    );
    for (name, text) in &fresh {
        assert_eq!(
            &committed[name], text,
            "deploy/kubernetes/{name} is stale: run `deploy render kubernetes` and commit"
        );
    }
    // The compose file's build context is the repository as seen from
    // where the file is written: from anywhere it finds the Dockerfile.
    let fresh = std::fs::read_to_string(dir.join("compose.yaml")).unwrap();
    let contexts: HashSet<&str> = fresh
        .lines()
        .filter_map(|l| l.trim().strip_prefix("context: "))
        .map(|c| c.trim_matches('"'))
        .collect();
    assert_eq!(contexts.len(), 1, "{fresh}");
    let context = contexts.into_iter().next().unwrap();
    assert!(
        dir.join(context).join("Dockerfile").is_file(),
        "context {context} from {} has no Dockerfile",
        dir.display()
    );
    let compose = std::fs::read_to_string(workspace().join("deploy/compose.yaml")).unwrap();
    assert_eq!(
        compose,
        fresh
            .lines()
            .map(|l| match l.trim().strip_prefix("context: ") {
                Some(_) => "      context: \"..\"",
                None => l,
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n",
        "deploy/compose.yaml is stale: run `deploy render compose` and commit"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

fn run_ok(program: PathBuf, args: &[&str], what: &str) -> String {
    let out = Command::new(program)
        .current_dir(workspace())
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

#[test]
fn the_manifests_pass_the_real_validators() {
    let manifests = [
        "namespace.yaml",
        "echo-server.yaml",
        "square-server.yaml",
        "tunnel.yaml",
    ];
    let paths: Vec<String> = manifests
        .iter()
        .map(|m| format!("deploy/kubernetes/{m}"))
        .collect();
    let mut args = vec!["--strict", "--kubernetes-version", "1.37.0"];
    args.extend(paths.iter().map(String::as_str));
    let report = run_ok(
        require("kubernetes-validate"),
        &args,
        "kubernetes-validate --strict",
    );
    assert_eq!(
        report.matches("passed for resource").count(),
        17,
        "{report}"
    );
    let rendered = run_ok(
        require("kubectl"),
        &["kustomize", "deploy/kubernetes"],
        "kubectl kustomize",
    );
    // Per role a Deployment, a ConfigMap, a NetworkPolicy and two
    // Services (its balanced address and its headless one); and the
    // namespace's default-deny NetworkPolicy.
    for (kind, count) in [
        ("kind: Deployment", 4),
        ("kind: Service", 8),
        ("kind: ConfigMap", 4),
        ("kind: NetworkPolicy", 5),
    ] {
        assert_eq!(
            rendered.matches(kind).count(),
            count,
            "{kind} in\n{rendered}"
        );
    }
    assert_eq!(rendered.matches("clusterIP: None").count(), 4, "{rendered}");
    assert_eq!(
        rendered.matches("namespace: tcp-roles").count(),
        21,
        "{rendered}"
    );
    assert!(rendered.contains("enforce: restricted"), "{rendered}");
    assert_eq!(
        rendered.matches("enableServiceLinks: false").count(),
        4,
        "{rendered}"
    );
    assert_eq!(
        rendered.matches("type: LoadBalancer").count(),
        2,
        "{rendered}"
    );
    run_ok(
        require("hadolint"),
        &["--failure-threshold", "warning", "Dockerfile"],
        "hadolint",
    );
}

/// The rendering and the Dockerfile pass checkov's policies, every check
/// that does not apply skipped with its reason in the rendering code.
#[test]
fn the_manifests_pass_the_policy_checker() {
    let dir = temp_dir("policy");
    let rendered = run_ok(
        require("kubectl"),
        &["kustomize", "deploy/kubernetes"],
        "kubectl kustomize",
    );
    let manifests = dir.join("rendered.yaml");
    std::fs::write(&manifests, &rendered).unwrap();
    let out = Command::new(require("checkov"))
        .current_dir(workspace())
        .env("BC_SKIP_MAPPING", "TRUE")
        .env("CKV_SKIP_PACKAGE_UPDATE_CHECK", "true")
        .args(["--skip-download", "--quiet", "--compact", "-o", "json"])
        .args(["--framework", "kubernetes", "dockerfile", "-f"])
        .arg(&manifests)
        .args(["-f", "Dockerfile"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "checkov failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // checkov also succeeds when it read nothing: check what it read.
    let reports: serde_json::Value = serde_json::from_str(&text).expect("checkov's JSON report");
    let reports = reports.as_array().cloned().unwrap_or_else(|| vec![reports]);
    let summary = |kind: &str| {
        reports
            .iter()
            .find(|r| r["check_type"] == kind)
            .map(|r| r["summary"].clone())
            .unwrap_or_else(|| panic!("no {kind} report in {text}"))
    };
    let k8s = summary("kubernetes");
    assert_eq!(k8s["failed"], 0, "{k8s}");
    assert_eq!(k8s["parsing_errors"], 0, "{k8s}");
    assert_eq!(k8s["resource_count"], 26, "{k8s}");
    assert!(k8s["passed"].as_u64().unwrap() > 200, "{k8s}");
    let docker = summary("dockerfile");
    assert_eq!(docker["failed"], 0, "{docker}");
    assert_eq!(docker["resource_count"], 1, "{docker}");
    std::fs::remove_dir_all(dir).unwrap();
}

const FIREWALLED: &str = "name: db-tunnel\nroles:\n  - name: tunnel\n    program: tunnel\n    endpoints:\n      - {name: Incoming, visibility: internal, port: 1001}\n    settings: {host: 127.0.0.1, port: 5432}\n";

#[test]
fn a_cluster_tunnel_pointed_at_loopback_is_refused() {
    let dir = temp_dir("loopback");
    let definition = dir.join("service.yaml");
    std::fs::write(&definition, FIREWALLED).unwrap();
    let shown = definition.display().to_string();
    let out = dir.join("kubernetes");
    let check = deploy(&["check", &shown]);
    let err = String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(64), "{err}");
    assert!(err.contains(&format!("{shown}:7:16: kubernetes, compose: role tunnel would forward to 127.0.0.1:5432, which there is the instance itself; set environments.<kubernetes|compose>.roles.tunnel.settings.host")), "{err}");
    let render = deploy(&[
        "render",
        "kubernetes",
        &shown,
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&render.stderr);
    assert_eq!(render.status.code(), Some(64), "{err}");
    assert!(
        err.contains("kubernetes: role tunnel would forward to 127.0.0.1:5432"),
        "{err}"
    );
    assert!(!out.exists(), "nothing is rendered");
    // The local fabric may use loopback: it is this machine.
    // With a layer for the cluster, the same definition renders.
    std::fs::write(
        &definition,
        format!("{FIREWALLED}environments:\n  kubernetes:\n    roles:\n      tunnel:\n        settings: {{host: db.internal}}\n  compose:\n    roles:\n      tunnel:\n        settings: {{target: \"10.1.2.3:5432\", host: ~, port: ~}}\n"),
    )
    .unwrap();
    let warnings = deploy_ok(&["check", &shown]);
    assert!(warnings.is_empty(), "{warnings}");
    deploy_ok(&[
        "render",
        "kubernetes",
        &shown,
        "--out",
        out.to_str().unwrap(),
    ]);
    let tunnel = std::fs::read_to_string(out.join("tunnel.yaml")).unwrap();
    assert!(tunnel.contains("TUNNEL_HOST: db.internal"), "{tunnel}");
    assert!(tunnel.contains("type: ClusterIP"), "{tunnel}");
    let compose = dir.join("compose");
    deploy_ok(&[
        "render",
        "compose",
        &shown,
        "--out",
        compose.to_str().unwrap(),
    ]);
    let file = std::fs::read_to_string(compose.join("compose.yaml")).unwrap();
    assert!(file.contains("TUNNEL_TARGET: 10.1.2.3:5432"), "{file}");
    assert!(!file.contains("TUNNEL_HOST"), "{file}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_public_tunnel_without_an_allow_list_is_warned_about_and_one_with_it_is_fenced() {
    let dir = temp_dir("exposure");
    let definition = dir.join("service.yaml");
    let public = FIREWALLED
        .replace("visibility: internal", "visibility: public")
        .replace("host: 127.0.0.1", "host: db.internal");
    std::fs::write(&definition, &public).unwrap();
    let shown = definition.display().to_string();
    let err = deploy_ok(&["check", &shown]);
    assert!(err.contains(&format!("{shown}:6:9: warning: local, kubernetes, compose: public endpoint tunnel/Incoming has no allow list: whatever it reaches (a database) is open to every network (in Kubernetes, the internet through a LoadBalancer)")), "{err}");
    let out = dir.join("kubernetes");
    let render = [
        "render",
        "kubernetes",
        &shown,
        "--out",
        out.to_str().unwrap(),
    ];
    let err = deploy_ok(&render);
    assert!(
        err.contains("warning: kubernetes: public endpoint"),
        "{err}"
    );
    let tunnel = std::fs::read_to_string(out.join("tunnel.yaml")).unwrap();
    assert!(tunnel.contains("type: LoadBalancer"), "{tunnel}");
    assert!(!tunnel.contains("loadBalancerSourceRanges"), "{tunnel}");

    std::fs::write(
        &definition,
        public.replace(
            "port: 5432}",
            "port: 5432, allow: [\"192.0.2.0/24\", \"2001:db8::1\"]}",
        ),
    )
    .unwrap();
    let warnings = deploy_ok(&["check", &shown]);
    assert!(warnings.is_empty(), "{warnings}");
    deploy_ok(&render);
    let tunnel = std::fs::read_to_string(out.join("tunnel.yaml")).unwrap();
    assert!(
        tunnel.contains("loadBalancerSourceRanges:\n  - 192.0.2.0/24\n  - 2001:db8::1/128\n"),
        "{tunnel}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn images_come_from_the_registry_and_tag_given() {
    let dir = temp_dir("images");
    let out = dir.join("kubernetes");
    deploy_ok(&[
        "render",
        "kubernetes",
        "--out",
        out.to_str().unwrap(),
        "--registry",
        "ghcr.io/acme/tcp-roles",
        "--tag",
        "1.2.3",
    ]);
    let rendered = run_ok(
        require("kubectl"),
        &["kustomize", out.to_str().unwrap()],
        "kubectl kustomize",
    );
    for program in ["echo-server", "square-server", "tunnel"] {
        assert!(
            rendered.contains(&format!("image: ghcr.io/acme/tcp-roles/{program}:1.2.3\n")),
            "{rendered}"
        );
    }
    for (flag, value) in [("--tag", ".x"), ("--registry", "https://ghcr.io/acme")] {
        let bad = deploy(&[
            "render",
            "kubernetes",
            "--out",
            out.to_str().unwrap(),
            flag,
            value,
        ]);
        let err = String::from_utf8_lossy(&bad.stderr);
        assert_eq!(bad.status.code(), Some(64), "{err}");
        assert!(err.contains(&format!("{flag} {value:?}")), "{err}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn every_schema_mistake_is_reported_at_once_with_its_place() {
    let dir = temp_dir("schema");
    let definition = dir.join("service.yaml");
    // Flow style, an unknown variant, an out-of-range port, a misplaced
    // key and an unknown environment, all in one file.
    std::fs::write(
        &definition,
        "name: x\nroles:\n  - {name: a, program: echo-server, endpoints: [{name: EchoEndpoint, visibility: publik, port: 70000}]}\n  - name: b\n    program: square-server\n    endpoints:\n      - name: SquareEndpoint\n        visibility: public\n        port: 2345\n        settings: {}\nenvironments: {staging: {}}\n",
    )
    .unwrap();
    let shown = definition.display().to_string();
    let check = deploy(&["check", &shown]);
    let err = String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(64), "{err}");
    assert!(err.contains("4 problems"), "{err}");
    for expected in [
        format!("{shown}:3:82: role a: endpoint EchoEndpoint: visibility is \"publik\"; it should be public or internal"),
        format!("{shown}:3:96: role a: endpoint EchoEndpoint: port is 70000; it should be a port number, 1 to 65535"),
        format!("{shown}:10:9: role b: an endpoint has no key \"settings\"; its keys are name, visibility, port"),
        format!("{shown}:11:16: environments has no key \"staging\"; its keys are local, kubernetes, compose"),
    ] {
        assert!(err.contains(&expected), "{expected}\nin\n{err}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// What the test does with the fabric's stdout and stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Output {
    /// Read line by line on threads.
    Read,
    /// Closed at once: every write of the fabric fails.
    Closed,
    /// Kept open and never read: the pipes fill up.
    Unread,
}

/// The fabric, started on a definition of our own. Dropping it stops the
/// fabric and kills whatever instance is left, pass or fail.
struct Fabric {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    /// Each instance's last state shown (id -> (state, pid, restarts)).
    status: HashMap<String, (String, u32, u32)>,
    /// How many instances a full status table shows.
    instances: usize,
    _unread: Option<(ChildStdout, ChildStderr)>,
}

impl Fabric {
    fn start(definition: &Path, instances: usize) -> Fabric {
        Fabric::launch(definition, instances, Output::Read)
    }

    fn launch(definition: &Path, instances: usize, output: Output) -> Fabric {
        let programs = binary("echo-server").parent().unwrap().to_path_buf();
        binary("deploy");
        let mut child = Command::new(binary("deploy"))
            .args([
                "run",
                definition.to_str().unwrap(),
                "--programs",
                programs.to_str().unwrap(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let (stdout, stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let mut unread = None;
        match output {
            Output::Read => {
                for pipe in [Box::new(stdout) as Box<dyn Read + Send>, Box::new(stderr)] {
                    let tx = tx.clone();
                    std::thread::spawn(move || {
                        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                            let _ = tx.send(line);
                        }
                    });
                }
            }
            Output::Closed => drop((stdout, stderr)),
            Output::Unread => unread = Some((stdout, stderr)),
        }
        Fabric {
            child,
            lines,
            seen: Vec::new(),
            status: HashMap::new(),
            instances,
            _unread: unread,
        }
    }

    /// Waits until the status (the table, then the rows of changes) shows
    /// the instances (id -> (state, pid, restarts)) such that `check`
    /// holds; returns them.
    fn table_where(
        &mut self,
        check: impl Fn(&HashMap<String, (String, u32, u32)>) -> bool,
    ) -> HashMap<String, (String, u32, u32)> {
        let end = Instant::now() + Duration::from_secs(30);
        if self.status.len() == self.instances && check(&self.status) {
            return self.status.clone();
        }
        while Instant::now() < end {
            let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) else {
                continue;
            };
            self.seen.push(line.clone());
            let cols: Vec<&str> = line.split_whitespace().collect();
            // ROLE INSTANCE PID ADDRESS RESTARTS STATE: the table at
            // start, then a row for each change.
            if cols.len() >= 6 && cols[1].contains("_IN_") {
                let pid = cols[2].parse().unwrap_or(0);
                let restarts = cols[4].parse().unwrap_or(0);
                self.status
                    .insert(cols[1].to_string(), (cols[5].to_string(), pid, restarts));
                if self.status.len() == self.instances && check(&self.status) {
                    return self.status.clone();
                }
            }
        }
        panic!(
            "no such status table; output so far:\n{}",
            self.seen.join("\n")
        );
    }

    /// Waits (30 s at most) for a line of the fabric's output that contains
    /// `text`, and returns it.
    fn wait_line(&mut self, text: &str) -> String {
        let end = Instant::now() + Duration::from_secs(30);
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            if let Ok(line) = self.lines.recv_timeout(left) {
                self.seen.push(line.clone());
                if line.contains(text) {
                    return line;
                }
            }
        }
        panic!(
            "no line with {text:?} in 30 s; output so far:\n{}",
            self.seen.join("\n")
        );
    }

    /// Every line the fabric writes during `period`.
    fn lines_for(&mut self, period: Duration) -> Vec<String> {
        let end = Instant::now() + period;
        let mut lines = Vec::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            if let Ok(line) = self.lines.recv_timeout(left) {
                self.seen.push(line.clone());
                lines.push(line);
            }
        }
        lines
    }

    /// Sends `signal` (by name, as `kill -s` takes it) to the fabric.
    fn signal(&self, signal: &str) {
        assert!(Command::new("kill")
            .args(["-s", signal, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success());
    }

    /// Waits for the fabric to exit, at most `limit`.
    fn exit_within(&mut self, limit: Duration) -> std::process::ExitStatus {
        let end = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < end,
                "the fabric is still running after {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Fabric {
    /// Even when the test fails: Ctrl-C first, so the fabric stops its
    /// instances, then SIGKILL whatever is left (instances a broken fabric
    /// left behind included).
    fn drop(&mut self) {
        let mut pids: Vec<u32> = instances_of(self.child.id())
            .iter()
            .map(|i| i.pid)
            .collect();
        for line in &self.seen {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() >= 6 && cols[1].contains("_IN_") {
                if let Ok(pid) = cols[cols.len() - 3].parse::<u32>() {
                    pids.push(pid);
                }
            }
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-INT", &self.child.id().to_string()])
                .status();
        }
        let end = Instant::now() + Duration::from_secs(15);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in pids {
            // Only an instance: the number may belong to someone else by now.
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if alive(pid)
                && ["echo-server", "square-server", "tunnel"]
                    .iter()
                    .any(|p| cmdline.contains(p))
            {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

/// An instance process as the kernel shows it.
#[derive(Debug, Clone)]
struct InstanceProcess {
    pid: u32,
    /// Its `<PREFIX>_INSTANCE`.
    id: String,
    /// Its `<PREFIX>_LISTEN`.
    listen: SocketAddr,
}

/// The instances `parent` runs now: its children that have an instance's
/// environment (so not one between fork and exec).
fn instances_of(parent: u32) -> Vec<InstanceProcess> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // "pid (comm) state ppid ...": the name may hold anything, so
        // count from its closing parenthesis.
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        let ppid = fields.next().and_then(|p| p.parse::<u32>().ok());
        if ppid != Some(parent) || state == Some("Z") {
            continue;
        }
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let mut id = None;
        let mut listen = None;
        for var in environ.split(|&b| b == 0) {
            let var = String::from_utf8_lossy(var);
            if let Some((key, value)) = var.split_once('=') {
                if key.ends_with("_INSTANCE") {
                    id = Some(value.to_string());
                } else if key.ends_with("_LISTEN") {
                    listen = value.parse().ok();
                }
            }
        }
        if let (Some(id), Some(listen)) = (id, listen) {
            found.push(InstanceProcess { pid, id, listen });
        }
    }
    found.sort_by(|a, b| a.id.cmp(&b.id));
    found
}

/// Calls `f` until it gives something, for at most `limit`.
fn eventually<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + limit;
    loop {
        if let Some(found) = f() {
            return found;
        }
        assert!(Instant::now() < end, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes a definition with one echo-server role and returns its path.
/// The endpoint's port is written down ([`free_port`]): the fabric's
/// endpoints take ports 1 to 65535 only.
fn echo_definition(dir: &Path, port: u16, instances: usize, settings: &str) -> PathBuf {
    let definition = dir.join("service.yaml");
    let mut text = format!("name: fabric-test\nroles:\n  - name: echo\n    program: echo-server\n    instances: {instances}\n    endpoints:\n      - name: EchoEndpoint\n        visibility: public\n        port: {port}\n");
    if !settings.is_empty() {
        text.push_str("    settings:\n");
        for line in settings.lines() {
            text.push_str(&format!("      {line}\n"));
        }
    }
    std::fs::write(&definition, text).unwrap();
    definition
}

/// Connects, reads the greeting, returns the instance id, says goodbye.
fn greeting(addr: SocketAddr) -> String {
    let (mut s, id) = greeted(addr).unwrap_or_else(|e| panic!("no greeting from {addr}: {e}"));
    let _ = s.write_all(b"9\n");
    id
}

/// Like [`greeting`], `None` when there is none (yet).
fn try_greeting(addr: SocketAddr) -> Option<String> {
    let (mut s, id) = greeted(addr).ok()?;
    let _ = s.write_all(b"9\n");
    Some(id)
}

/// [`try_greeting`] straight to an instance, past the balancer: it trusts
/// loopback to start with a PROXY header, as the balancer's connections
/// do, so one is sent (naming this connection's own ends).
fn try_greeting_direct(addr: SocketAddr) -> Option<String> {
    let (mut s, id) = greeted_after(addr, true).ok()?;
    let _ = s.write_all(b"9\n");
    Some(id)
}

/// Connects and reads the greeting (10 s at most); returns the connection
/// and the instance id.
fn greeted(addr: SocketAddr) -> std::io::Result<(TcpStream, String)> {
    greeted_after(addr, false)
}

/// [`greeted`], after a PROXY v1 header when `header` is set.
fn greeted_after(addr: SocketAddr, header: bool) -> std::io::Result<(TcpStream, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    if header {
        let (me, there) = (s.local_addr()?, s.peer_addr()?);
        write!(
            s,
            "PROXY TCP4 {} {} {} {}\r\n",
            me.ip(),
            there.ip(),
            me.port(),
            there.port()
        )?;
    }
    let mut text = String::new();
    let mut buf = [0u8; 256];
    while !text.contains("Your choice: ") {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::other(format!(
                "closed before the greeting: {text:?}"
            )));
        }
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let id = text
        .split("instance ")
        .nth(1)
        .and_then(|rest| rest.split('.').next())
        .ok_or_else(|| std::io::Error::other(format!("no instance id in {text:?}")))?;
    Ok((s, id.to_string()))
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn the_fabric_serves_every_connection_while_instances_are_killed() {
    let port = free_port();
    let dir = temp_dir("fabric");
    let definition = dir.join("service.yaml");
    std::fs::write(
        &definition,
        format!("name: crash-test\nroles:\n  - name: echo\n    program: echo-server\n    instances: 4\n    endpoints:\n      - name: EchoEndpoint\n        visibility: public\n        port: {port}\n"),
    )
    .unwrap();
    let mut fabric = Fabric::start(&definition, 4);
    let first = fabric.table_where(|t| t.values().all(|(state, _, _)| state == "running"));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    // 500 new connections; two instances are killed along the way.
    let victims = ["echo_IN_1", "echo_IN_2"];
    let mut served: HashMap<String, usize> = HashMap::new();
    for i in 0..500 {
        if i == 150 || i == 300 {
            let victim = victims[(i / 150) - 1];
            let pid = first[victim].1;
            assert!(Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()
                .unwrap()
                .success());
            // New connections while it is dead, not while the kernel is
            // still tearing it down: a connection its dying listener
            // accepted is reset with it (following a death in flight is
            // the fabric's discovery work, not this test's).
            let end = Instant::now() + Duration::from_secs(10);
            while alive(pid) {
                assert!(Instant::now() < end, "{victim} survived SIGKILL");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        *served.entry(greeting(addr)).or_default() += 1;
    }
    assert_eq!(served.values().sum::<usize>(), 500, "{served:?}");
    // Spread over all four, the victims included until they died.
    assert_eq!(served.len(), 4, "{served:?}");

    // The killed instances come back with new processes and serve again.
    let now = fabric.table_where(|t| victims.iter().all(|v| t[*v].0 == "running" && t[*v].2 >= 1));
    for v in victims {
        assert_ne!(now[v].1, first[v].1, "{v} has a new process");
        assert!(!alive(first[v].1));
    }
    // The balancer's health checks put them back within a check interval.
    let mut again = HashSet::new();
    for _ in 0..400 {
        again.insert(greeting(addr));
        if victims.iter().all(|v| again.contains(*v)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(
        victims.iter().all(|v| again.contains(*v)),
        "restarted instances not served: {again:?}"
    );

    // Ctrl-C stops everything: no instance is left behind.
    assert!(Command::new("kill")
        .args(["-INT", &fabric.child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let end = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = fabric.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < end, "the fabric ignored Ctrl-C");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    for (id, (_, pid, _)) in now.iter().chain(first.iter()) {
        assert!(!alive(*pid), "{id} (pid {pid}) is still running");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// A fabric whose terminal is gone (stdout and stderr closed: every write
/// fails) still restarts a killed instance, serves through it, and stops
/// cleanly.
#[test]
fn the_fabric_restarts_instances_with_its_output_closed() {
    let port = free_port();
    let dir = temp_dir("closed-output");
    let definition = echo_definition(&dir, port, 2, "");
    let mut fabric = Fabric::launch(&definition, 2, Output::Closed);
    let deploy = fabric.child.id();
    let first = eventually("two instances", Duration::from_secs(30), || {
        let found = instances_of(deploy);
        (found.len() == 2).then_some(found)
    });
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    eventually("the balancer serves", Duration::from_secs(30), || {
        try_greeting(addr)
    });

    let victim = first[0].clone();
    assert!(Command::new("kill")
        .args(["-KILL", &victim.pid.to_string()])
        .status()
        .unwrap()
        .success());
    let again = eventually(
        "the instance is started again",
        Duration::from_secs(30),
        || {
            instances_of(deploy)
                .into_iter()
                .find(|i| i.id == victim.id && i.pid != victim.pid)
        },
    );
    eventually("the new instance serves", Duration::from_secs(30), || {
        try_greeting_direct(again.listen).filter(|id| *id == victim.id)
    });
    eventually(
        "the balancer sends to the new instance",
        Duration::from_secs(30),
        || try_greeting(addr).filter(|id| *id == victim.id),
    );

    fabric.signal("INT");
    let status = fabric.exit_within(Duration::from_secs(20));
    assert!(status.success(), "{status}");
    for i in first.iter().chain([&again]) {
        assert!(!alive(i.pid), "{} (pid {}) is still running", i.id, i.pid);
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// Nobody reads the fabric's output (a stopped pager, a full pipe) while
/// every connection makes an instance log a line: the fabric drops lines,
/// never stalls, and stops promptly.
#[test]
fn the_fabric_serves_on_when_nobody_reads_its_output() {
    let port = free_port();
    let dir = temp_dir("unread-output");
    let definition = echo_definition(&dir, port, 4, "");
    let mut fabric = Fabric::launch(&definition, 4, Output::Unread);
    let deploy = fabric.child.id();
    eventually("four instances", Duration::from_secs(30), || {
        (instances_of(deploy).len() == 4).then_some(())
    });
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    eventually("the balancer serves", Duration::from_secs(30), || {
        try_greeting(addr)
    });
    // Each line too long is logged by its instance (about 150 bytes): far
    // more than the 64 KiB a pipe holds.
    let long = vec![b'x'; 1100];
    for n in 0..1500 {
        let (mut s, _) = greeted(addr)
            .unwrap_or_else(|e| panic!("connection {n}: no greeting ({e}); the fabric stalled"));
        let _ = s.write_all(&long);
        let _ = s.write_all(b"\n");
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    }
    fabric.signal("INT");
    let status = fabric.exit_within(Duration::from_secs(20));
    assert!(status.success(), "{status}");
    assert!(instances_of(deploy).is_empty());
    std::fs::remove_dir_all(dir).unwrap();
}

/// Closing the terminal sends SIGHUP: the fabric stops every instance
/// instead of dying and leaving them running.
#[test]
fn a_closed_terminal_stops_every_instance() {
    let port = free_port();
    let dir = temp_dir("hangup");
    let definition = echo_definition(&dir, port, 2, "");
    let mut fabric = Fabric::start(&definition, 2);
    let table = fabric.table_where(|t| t.values().all(|(state, _, _)| state == "running"));
    fabric.signal("HUP");
    let status = fabric.exit_within(Duration::from_secs(20));
    assert!(status.success(), "{status}");
    for (id, (_, pid, _)) in &table {
        assert!(!alive(*pid), "{id} (pid {pid}) is still running");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// A fabric killed with SIGKILL cannot stop anything: its instances go
/// with it all the same, restarted ones included, and not before.
#[test]
fn instances_die_with_a_killed_fabric() {
    let port = free_port();
    let dir = temp_dir("killed");
    let definition = echo_definition(&dir, port, 2, "");
    let mut fabric = Fabric::start(&definition, 2);
    let first = fabric.table_where(|t| t.values().all(|(state, _, _)| state == "running"));
    assert!(Command::new("kill")
        .args(["-KILL", &first["echo_IN_0"].1.to_string()])
        .status()
        .unwrap()
        .success());
    let table = fabric.table_where(|t| {
        t.values().all(|(state, _, _)| state == "running") && t["echo_IN_0"].2 >= 1
    });
    // The table was printed once; the restart came as rows of its own.
    let headers = fabric
        .seen
        .iter()
        .filter(|l| l.starts_with("ROLE "))
        .count();
    assert_eq!(headers, 1, "{}", fabric.seen.join("\n"));
    assert!(
        fabric
            .seen
            .iter()
            .any(|l| l.ends_with("-> 2 instances (2 live)")),
        "{}",
        fabric.seen.join("\n")
    );
    // Longer than an idle runtime thread lives: instances are tied to a
    // thread that lasts as long as the fabric, so none dies meanwhile. A
    // duration by design: what is checked is that nothing happens.
    std::thread::sleep(Duration::from_secs(12));
    for (id, (_, pid, _)) in &table {
        assert!(alive(*pid), "{id} (pid {pid}) died while the fabric ran");
    }
    fabric.child.kill().unwrap();
    fabric.child.wait().unwrap();
    for (id, (_, pid, _)) in &table {
        eventually(
            &format!("{id} (pid {pid}) ends with the fabric"),
            Duration::from_secs(10),
            || (!alive(*pid)).then_some(()),
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// A second signal during the stop does not wait out the grace period (a
/// connection still open, an instance slow to drain): the instances are
/// killed and the fabric exits at once.
#[test]
fn a_second_signal_stops_the_fabric_at_once() {
    let port = free_port();
    let dir = temp_dir("second-signal");
    // The instance would drain for a minute; the fabric gives it 10 s.
    let definition = echo_definition(&dir, port, 1, "shutdown_grace: 60s");
    let mut fabric = Fabric::start(&definition, 1);
    let table = fabric.table_where(|t| t.values().all(|(state, _, _)| state == "running"));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (_open, _) = eventually("a connection", Duration::from_secs(30), || {
        greeted(addr).ok()
    });
    fabric.signal("TERM");
    // The stop is under way, held by the open connection: the balancer (and
    // the instance) say they drain it.
    fabric.wait_line("draining connections");
    assert!(
        fabric.child.try_wait().unwrap().is_none(),
        "the fabric waits for the open connection"
    );
    let second = Instant::now();
    fabric.signal("INT");
    let status = fabric.exit_within(Duration::from_secs(20));
    let took = second.elapsed();
    assert!(status.success(), "{status}");
    assert!(
        took < Duration::from_secs(5),
        "the fabric took {took:?} after the second signal (its grace period is 10 s)"
    );
    for (id, (_, pid, _)) in &table {
        assert!(!alive(*pid), "{id} (pid {pid}) is still running");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// The balancers check every instance every second; the instances do not
/// log those probes (a line per probe would bury everything else).
#[test]
fn health_checks_leave_the_instances_quiet() {
    let dir = temp_dir("quiet");
    let (echo, square, tunnel) = (free_port(), free_port(), free_port());
    let definition = dir.join("service.yaml");
    std::fs::write(
        &definition,
        format!("name: quiet\nroles:\n  - name: echo\n    program: echo-server\n    instances: 4\n    endpoints:\n      - name: EchoEndpoint\n        visibility: public\n        port: {echo}\n  - name: square\n    program: square-server\n    endpoints:\n      - name: SquareEndpoint\n        visibility: internal\n        port: {square}\n  - name: db\n    program: tunnel\n    endpoints:\n      - name: Incoming\n        visibility: public\n        port: {tunnel}\n    settings:\n      host: 127.0.0.1\n      port: {square}\n"),
    )
    .unwrap();
    let mut fabric = Fabric::start(&definition, 6);
    fabric.table_where(|t| t.values().all(|(state, _, _)| state == "running"));
    // Seven rounds of checks on every instance: a probe that closes while
    // the greeting is on its way ends in a reset some of the time, which
    // instances used to log at info.
    let lines = fabric.lines_for(Duration::from_secs(8));
    let start_up = |l: &str| l.contains(" ready") || l.contains(" listening");
    let noise: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with('[') && !start_up(l))
        .collect();
    assert!(noise.is_empty(), "instances logged the probes:\n{noise:#?}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A role name that is not a Kubernetes name is refused by `check` and
/// `render`, with its line, and nothing is written (`../escape` would have
/// been written beside `--out`).
#[test]
fn names_kubernetes_cannot_take_are_refused() {
    let dir = temp_dir("names");
    let definition = dir.join("service.yaml");
    std::fs::write(
        &definition,
        "name: names\nroles:\n  - name: ../escape\n    program: echo-server\n  - name: Echo_Server\n    program: echo-server\n  - name: fine\n    program: square-server\n",
    )
    .unwrap();
    let out = dir.join("out").join("kubernetes");
    let shown = definition.display().to_string();
    for args in [
        vec!["check", definition.to_str().unwrap()],
        vec![
            "render",
            "kubernetes",
            definition.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
    ] {
        let result = deploy(&args);
        let err = String::from_utf8_lossy(&result.stderr);
        assert_eq!(result.status.code(), Some(64), "{args:?}: {err}");
        assert!(err.contains("2 problems"), "{err}");
        assert!(
            err.contains(&format!(
                "{shown}:3:5: role name \"../escape\" contains '.'"
            )),
            "{err}"
        );
        assert!(
            err.contains(&format!(
                "{shown}:5:5: role name \"Echo_Server\" contains 'E'"
            )),
            "{err}"
        );
        assert!(err.contains("(such as \"echo-server\")"), "{err}");
    }
    assert!(!dir.join("out").join("escape.yaml").exists());
    assert!(!out.exists(), "nothing is rendered");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A CA (`ca.pem`) and a server (`server.pem`, `server.key`, for
/// server.test) and a client (`client.pem`, `client.key`) certificate it
/// signed, made with the real openssl, in `dir`.
fn make_certificates(dir: &Path) {
    tests::pki::Pki::new().copy_to(
        dir,
        &[
            "ca.pem",
            "server.pem",
            "server.key",
            "client.pem",
            "client.key",
        ],
    );
}

/// A square-server role serving mutual TLS: from files beside the
/// definition on this machine, from two Secrets in Kubernetes.
const SQUARE_TLS: &str = "name: tls-demo
roles:
  - name: square-server
    program: square-server
    instances: 2
    endpoints:
      - {name: SquareEndpoint, visibility: public, port: 2345}
    settings:
      tls_cert: certs/server.pem
      tls_key: certs/server.key
      tls_client_ca: certs/ca.pem
environments:
  kubernetes:
    roles:
      square-server:
        secrets:
          square-tls: /etc/tls/square
          square-clients: /etc/tls/clients
        settings:
          tls_cert: /etc/tls/square/tls.crt
          tls_key: /etc/tls/square/tls.key
          tls_client_ca: /etc/tls/clients/ca.crt
  compose:
    roles:
      square-server:
        settings: {tls_cert: ~, tls_key: ~, tls_client_ca: ~}
";

/// TLS files are looked for beside the definition (deploy runs elsewhere
/// here), and one that is not there is an error at its setting's place.
#[test]
fn tls_files_are_checked_beside_the_definition() {
    let dir = temp_dir("tls-check");
    make_certificates(&dir.join("certs"));
    let definition = dir.join("service.yaml");
    std::fs::write(&definition, SQUARE_TLS).unwrap();
    let shown = definition.display().to_string();
    let out = deploy(&["check", &shown]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.is_empty(), "{err}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "tls-demo: 1 roles, 2 instances: ok\n"
    );

    std::fs::remove_file(dir.join("certs/server.key")).unwrap();
    let out = deploy(&["check", &shown]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    let missing = dir.join("certs/server.key");
    assert!(
        err.contains(&format!(
            "{shown}:10:7: local: role square-server: tls_key {} does not exist",
            missing.display()
        )),
        "{err}"
    );
    // `deploy render kubernetes` does not need this machine's files.
    let out_dir = dir.join("kubernetes");
    deploy_ok(&[
        "render",
        "kubernetes",
        &shown,
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    std::fs::remove_dir_all(dir).unwrap();
}

/// The Secrets a role mounts become read-only volumes, and the rendering
/// still passes the validators and the policy checker.
#[test]
fn mounted_secrets_pass_the_real_validators() {
    let dir = temp_dir("tls-render");
    let definition = dir.join("service.yaml");
    std::fs::write(&definition, SQUARE_TLS).unwrap();
    let out = dir.join("kubernetes");
    let err = deploy_ok(&[
        "render",
        "kubernetes",
        definition.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(err.is_empty(), "{err}");
    let manifest = out.join("square-server.yaml");
    let report = run_ok(
        require("kubernetes-validate"),
        &[
            "--strict",
            "--kubernetes-version",
            "1.37.0",
            out.join("namespace.yaml").to_str().unwrap(),
            manifest.to_str().unwrap(),
        ],
        "kubernetes-validate --strict",
    );
    assert_eq!(report.matches("passed for resource").count(), 7, "{report}");
    let rendered = run_ok(
        require("kubectl"),
        &["kustomize", out.to_str().unwrap()],
        "kubectl kustomize",
    );
    for expected in [
        "SQUARE_SERVER_TLS_CERT: /etc/tls/square/tls.crt\n",
        "SQUARE_SERVER_TLS_KEY: /etc/tls/square/tls.key\n",
        "SQUARE_SERVER_TLS_CLIENT_CA: /etc/tls/clients/ca.crt\n",
        "      volumes:\n      - name: secret-0\n        secret:\n          defaultMode: 288\n          secretName: square-tls\n",
        "      - name: secret-1\n        secret:\n          defaultMode: 288\n          secretName: square-clients\n",
        "        volumeMounts:\n        - mountPath: /etc/tls/square\n          name: secret-0\n          readOnly: true\n",
        "        - mountPath: /etc/tls/clients\n          name: secret-1\n          readOnly: true\n",
        "        fsGroup: 65532\n",
    ] {
        assert!(rendered.contains(expected), "{expected}\nin\n{rendered}");
    }
    let manifests = dir.join("rendered.yaml");
    std::fs::write(&manifests, &rendered).unwrap();
    let summary = tests::checkov_kubernetes(&manifests);
    assert_eq!(summary["resource_count"], 8, "{summary}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// What `openssl s_client` prints after sending `input` to `addr`,
/// trusting the test CA in `certs`, with `extra` arguments; read until the
/// server closes or `until` has come.
fn s_client(certs: &Path, addr: SocketAddr, input: &str, until: &str, extra: &[&str]) -> String {
    let mut child = Command::new(require("openssl"))
        .args(["s_client", "-quiet", "-verify_return_error"])
        .args(["-connect", &addr.to_string(), "-servername", "server.test"])
        .arg("-CAfile")
        .arg(certs.join("ca.pem"))
        .args(extra)
        .current_dir(certs)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // -quiet keeps the connection after the end of its input, until the
    // server closes it: the input stays open until then.
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).unwrap();
    let (tx, rx) = mpsc::channel();
    for mut pipe in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                let _ = tx.send(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        });
    }
    drop(tx);
    let end = Instant::now() + Duration::from_secs(10);
    let mut seen = String::new();
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(text) => seen.push_str(&text),
            Err(_) => break,
        }
        if seen.contains(until) {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    seen
}

/// The fabric balances TLS connections by passing them through: the
/// handshake, the client's certificate included, is the instance's. The
/// instances' files are found beside the definition, and the readiness
/// and health checks (TCP connects) work on TLS endpoints.
#[test]
fn the_fabric_passes_mutual_tls_through_to_its_instances() {
    let port = free_port();
    let dir = temp_dir("fabric-tls");
    let certs = dir.join("certs");
    make_certificates(&certs);
    let definition = echo_definition(
        &dir,
        port,
        2,
        "tls_cert: certs/server.pem\ntls_key: certs/server.key\ntls_client_ca: certs/ca.pem",
    );
    let mut fabric = Fabric::start(&definition, 2);
    fabric.table_where(|t| t.values().all(|(state, _, _)| state == "running"));
    fabric.wait_line("2 instances (2 live)");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let client = ["-cert", "client.pem", "-key", "client.key"];
    let mut served = HashSet::new();
    for _ in 0..4 {
        let text = s_client(&certs, addr, "9\r\n", "Goodbye", &client);
        assert!(text.contains("verify return:1"), "{text}");
        let id = text
            .split("instance ")
            .nth(1)
            .and_then(|rest| rest.split('.').next())
            .unwrap_or_else(|| panic!("no greeting over TLS: {text}"));
        served.insert(id.to_string());
    }
    assert_eq!(served.len(), 2, "both instances serve: {served:?}");
    // Without a client certificate the instance refuses the handshake.
    let refused = s_client(&certs, addr, "9\r\n", "Goodbye", &[]);
    assert!(!refused.contains("Welcome"), "{refused}");
    // Plain TCP gets no menu either.
    let mut plain = TcpStream::connect(addr).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = plain.write_all(b"1\r\n");
    let mut got = Vec::new();
    let _ = plain.read_to_end(&mut got);
    assert!(
        !String::from_utf8_lossy(&got).contains("Welcome"),
        "a plain client got the menu: {got:?}"
    );
    // Health checks went on meanwhile; the balancer kept both instances
    // in rotation all along.
    fabric.lines_for(Duration::from_millis(1500));
    assert!(
        !fabric
            .seen
            .iter()
            .any(|l| l.contains("ejected") || l.contains("crashed")),
        "{:#?}",
        fabric.seen
    );
    drop(fabric);
    std::fs::remove_dir_all(dir).unwrap();
}

/// The instance id in a date/time greeting read through `addr` from
/// `from`.
fn greeting_from(from: [u8; 4], addr: SocketAddr) -> String {
    let mut s = tests::connect_from(from, addr);
    let mut text = String::new();
    let mut buf = [0u8; 256];
    while !text.contains("Your choice: ") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed before the greeting: {text:?}");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    text.split("instance ")
        .nth(1)
        .and_then(|rest| rest.split('.').next())
        .unwrap_or_default()
        .to_string()
}

#[test]
fn a_role_finds_another_by_name_and_calls_its_instances() {
    let (echo_port, tunnel_port, square_port) = (free_port(), free_port(), free_port());
    let dir = temp_dir("discovery");
    let definition = dir.join("service.yaml");
    std::fs::write(
        &definition,
        format!(
            "name: discovery-test
roles:
  - name: echo-server
    program: echo-server
    instances: 3
    endpoints: [{{name: EchoEndpoint, visibility: internal, port: {echo_port}}}]
  - name: square-server
    program: square-server
    instances: 2
    endpoints: [{{name: SquareEndpoint, visibility: internal, port: {square_port}}}]
  - name: tunnel
    program: tunnel
    endpoints: [{{name: Incoming, visibility: public, port: {tunnel_port}}}]
    settings:
      target: echo-server/EchoEndpoint
      allow: [127.0.0.0/8]
"
        ),
    )
    .unwrap();
    // What a killed fabric left (no process has this id: it is over the
    // kernel's largest) is swept away by the next.
    let stale = std::env::temp_dir().join("deploy-4294967");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("topology.json"), "{}").unwrap();
    let mut fabric = Fabric::start(&definition, 6);
    fabric.table_where(|t| t.values().all(|(state, _, _)| state == "running"));
    assert!(!stale.exists(), "a killed fabric's topology is left behind");
    let written = "topology written";
    let topology = match fabric.seen.iter().find(|l| l.contains(written)) {
        Some(line) => line.clone(),
        None => fabric.wait_line(written),
    };
    let topology = topology
        .split("topology=")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .expect("the topology's path")
        .to_string();

    // The tunnel role balances over echo-server's instances, found by
    // name: every one of them greets through it, and each sees the
    // client that reached the tunnel's endpoint (the balancer and the
    // tunnel pass it on in PROXY headers).
    let addr: SocketAddr = format!("127.0.0.1:{tunnel_port}").parse().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..9 {
        seen.insert(greeting_from([127, 0, 0, 5], addr));
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["echo-server_IN_0", "echo-server_IN_1", "echo-server_IN_2"]
    );

    // An edit of the definition scales echo-server to 5: the fabric
    // rewrites the topology, and the tunnel balances over the new set.
    let text = std::fs::read_to_string(&definition).unwrap();
    std::fs::write(
        &definition,
        text.replacen("instances: 3", "instances: 5", 1),
    )
    .unwrap();
    fabric.wait_line("3 -> 5 instances: starting echo-server_IN_3, echo-server_IN_4");
    fabric.wait_line("the definition's changes are applied");
    let listed = std::fs::read_to_string(&topology).unwrap();
    assert!(listed.contains("echo-server_IN_4"), "{listed}");
    let all = eventually(
        "the tunnel calls the new instances",
        Duration::from_secs(10),
        || {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..10 {
                seen.insert(greeting_from([127, 0, 0, 5], addr));
            }
            (seen.len() == 5).then_some(seen)
        },
    );
    assert!(
        all.contains("echo-server_IN_3") && all.contains("echo-server_IN_4"),
        "{all:?}"
    );

    // square-client names the square service; the topology gives its
    // balanced address.
    let out = Command::new(binary("square-client"))
        .args([
            "--server",
            "square-server/SquareEndpoint",
            "--topology",
            &topology,
            "12",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "144",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(binary("square-client"))
        .args([
            "--server",
            "square-server/Squares",
            "--topology",
            &topology,
            "12",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("role square-server has no endpoint Squares (it has SquareEndpoint)"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fabric.signal("TERM");
    assert!(fabric.exit_within(Duration::from_secs(20)).success());
    assert!(
        !Path::new(&topology).exists(),
        "the fabric leaves its topology behind"
    );
}

/// One whole session through `addr`: the greeting, a date asked for and
/// answered, goodbye. Any failure on the way says what happened.
fn whole_session(addr: SocketAddr) -> Result<String, String> {
    let (mut s, id) = greeted(addr).map_err(|e| format!("greeting: {e}"))?;
    s.write_all(b"1\r\n")
        .map_err(|e| format!("{id}: asking: {e}"))?;
    let mut text = String::new();
    let mut buf = [0u8; 256];
    while !text.contains("Goodbye.") {
        if text.contains("Current date: ") && text.ends_with("Your choice: ") {
            s.write_all(b"9\r\n")
                .map_err(|e| format!("{id}: leaving: {e}"))?;
        }
        match s.read(&mut buf) {
            Ok(0) => return Err(format!("{id}: closed in the middle: {text:?}")),
            Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) => return Err(format!("{id}: {e} after {text:?}")),
        }
    }
    Ok(id)
}

/// The instances' `ECHO_SERVER_IDLE_TIMEOUT`, by pid.
fn idle_timeouts(parent: u32) -> HashMap<u32, String> {
    instances_of(parent)
        .iter()
        .map(|i| {
            let environ = std::fs::read(format!("/proc/{}/environ", i.pid)).unwrap_or_default();
            let value = environ
                .split(|&b| b == 0)
                .filter_map(|v| {
                    String::from_utf8_lossy(v)
                        .strip_prefix("ECHO_SERVER_IDLE_TIMEOUT=")
                        .map(str::to_string)
                })
                .next()
                .unwrap_or_default();
            (i.pid, value)
        })
        .collect()
}

#[test]
fn the_fabric_follows_edits_of_its_definition_without_losing_a_connection() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let port = free_port();
    let dir = temp_dir("follow");
    let definition = echo_definition(&dir, port, 4, "idle_timeout: 5m");
    let mut fabric = Fabric::start(&definition, 4);
    fabric.table_where(|t| t.values().all(|(state, _, _)| state == "running"));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let parent = fabric.child.id();

    // Clients all along: a whole session every 10 ms or so.
    let done = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let served = Arc::new(Mutex::new(HashSet::new()));
    let mut count = 0usize;
    let client = {
        let (done, failures, served) = (done.clone(), failures.clone(), served.clone());
        std::thread::spawn(move || {
            let mut sessions = 0usize;
            while !done.load(Ordering::Relaxed) {
                match whole_session(addr) {
                    Ok(id) => {
                        served.lock().unwrap().insert(id);
                    }
                    Err(e) => failures.lock().unwrap().push(e),
                }
                sessions += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            sessions
        })
    };
    let edit = |instances: usize, settings: &str| {
        echo_definition(&dir, port, instances, settings);
    };

    // 4 -> 6.
    edit(6, "idle_timeout: 5m");
    fabric.wait_line("4 -> 6 instances: starting echo_IN_4, echo_IN_5");
    fabric.wait_line("the definition's changes are applied");
    assert_eq!(instances_of(parent).len(), 6);
    std::thread::sleep(Duration::from_millis(500));
    served.lock().unwrap().clear();
    eventually("the new instances serve", Duration::from_secs(10), || {
        let served = served.lock().unwrap();
        (served.contains("echo_IN_4") && served.contains("echo_IN_5")).then_some(())
    });

    // 6 -> 2: the four highest drain.
    edit(2, "idle_timeout: 5m");
    fabric.wait_line("6 -> 2 instances: draining echo_IN_2, echo_IN_3, echo_IN_4, echo_IN_5");
    fabric.wait_line("the definition's changes are applied");
    let left = eventually("two instances left", Duration::from_secs(15), || {
        let ids: Vec<String> = instances_of(parent).into_iter().map(|i| i.id).collect();
        (ids.len() == 2).then_some(ids)
    });
    assert_eq!(left, ["echo_IN_0", "echo_IN_1"]);
    served.lock().unwrap().clear();
    std::thread::sleep(Duration::from_secs(1));
    let now: Vec<String> = {
        let mut ids: Vec<String> = served.lock().unwrap().iter().cloned().collect();
        ids.sort();
        ids
    };
    assert_eq!(now, ["echo_IN_0", "echo_IN_1"], "only the two left serve");

    // A setting reaches every instance: echo-server does not reload, so
    // each is replaced, one at a time.
    let before = idle_timeouts(parent);
    edit(2, "idle_timeout: 7m");
    fabric.wait_line("idle_timeout changed: replacing its instances one at a time");
    fabric.wait_line("the definition's changes are applied");
    let after = eventually(
        "the replaced instances only",
        Duration::from_secs(15),
        || {
            let after = idle_timeouts(parent);
            (after.len() == 2).then_some(after)
        },
    );
    assert!(
        after.keys().all(|pid| !before.contains_key(pid)),
        "{before:?} {after:?}"
    );
    assert!(after.values().all(|v| v == "7m"), "{after:?}");

    // A broken edit changes nothing.
    std::fs::write(
        &definition,
        "name: fabric-test\nroles:\n  - name: echo\n    program: echo-server\n    instances: [\n",
    )
    .unwrap();
    fabric.wait_line("cannot be used; the fabric goes on with the one it runs");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(idle_timeouts(parent), after);

    // deploy status, from another process.
    let out = deploy(&["status", definition.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    let rows: Vec<&str> = shown.lines().filter(|l| l.contains("_IN_")).collect();
    assert_eq!(rows.len(), 2, "{shown}");
    assert!(rows.iter().all(|r| r.ends_with("running")), "{shown}");
    assert!(
        shown.contains(&format!(
            "public endpoint echo/EchoEndpoint on 0.0.0.0:{port} -> 2 instances (2 live)"
        )),
        "{shown}"
    );
    for pid in after.keys() {
        assert!(shown.contains(&pid.to_string()), "{shown}");
    }

    done.store(true, Ordering::Relaxed);
    count += client.join().unwrap();
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {count} sessions failed: {failures:?}",
        failures.len()
    );
    assert!(count > 100, "only {count} sessions");
}

/// What square-client answers for 12 through `addr`, or its error.
fn square_through(addr: SocketAddr) -> Result<String, String> {
    let out = Command::new(binary("square-client"))
        .args(["--server", &addr.to_string(), "12"])
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn an_internal_endpoint_takes_calls_only_from_the_roles_of_its_allow_from() {
    let (square, gate, other) = (free_port(), free_port(), free_port());
    let dir = temp_dir("allow-from");
    let definition = dir.join("service.yaml");
    std::fs::write(
        &definition,
        format!(
            "name: allow-test
roles:
  - name: square-server
    program: square-server
    instances: 2
    endpoints:
      - {{name: SquareEndpoint, visibility: internal, port: {square}, allow_from: [gate]}}
  - name: gate
    program: tunnel
    endpoints: [{{name: Incoming, visibility: public, port: {gate}}}]
    settings: {{target: square-server/SquareEndpoint}}
  - name: other
    program: tunnel
    endpoints: [{{name: Incoming, visibility: internal, port: {other}}}]
    settings: {{target: square-server/SquareEndpoint}}
"
        ),
    )
    .unwrap();
    let mut fabric = Fabric::start(&definition, 4);
    fabric.table_where(|t| t.values().all(|(state, _, _)| state == "running"));
    let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));

    // The gate's instances may call: through its endpoint, squares.
    for _ in 0..4 {
        assert_eq!(square_through(at(gate)).as_deref(), Ok("144"));
    }
    // Another role may not, nor may a process that is no instance: not
    // through the endpoint's balancer, not straight to an instance with
    // the header a balancer would send.
    let refused = square_through(at(other)).unwrap_err();
    assert!(refused.contains("without answering"), "{refused}");
    let refused = square_through(at(square)).unwrap_err();
    assert!(
        refused.contains("reset") || refused.contains("without answering"),
        "{refused}"
    );
    let instance = instances_of(fabric.child.id())
        .into_iter()
        .find(|i| i.id.starts_with("square-server"))
        .expect("a square-server instance");
    let mut direct = TcpStream::connect(instance.listen).unwrap();
    let me = direct.local_addr().unwrap();
    write!(
        direct,
        "PROXY TCP4 127.0.0.9 127.0.0.1 {} {}\r\n12\n",
        me.port(),
        instance.listen.port()
    )
    .unwrap();
    direct
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut answer = String::new();
    let _ = direct.read_to_string(&mut answer);
    assert!(!answer.contains("144"), "{answer}");
    let said = fabric.wait_line("refused: not a role allowed to call");
    assert!(said.contains("is no instance of gate"), "{said}");

    // An edit that lets the other role call too applies while it runs.
    let text = std::fs::read_to_string(&definition).unwrap();
    std::fs::write(
        &definition,
        text.replace("allow_from: [gate]", "allow_from: [gate, other]"),
    )
    .unwrap();
    fabric.wait_line("the definition's changes are applied");
    let answer = eventually("the other role may call", Duration::from_secs(10), || {
        square_through(at(other)).ok()
    });
    assert_eq!(answer, "144");
    assert_eq!(square_through(at(gate)).as_deref(), Ok("144"));
}
