//! `deploy`: the definition check, the committed rendering, the manifests
//! against real validators (kubernetes-validate, kubectl kustomize,
//! hadolint), and the development fabric surviving crashed instances.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
        "tcp-roles: 3 roles, 7 instances: ok\n"
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
        err.contains(&format!("{shown} line 5: role echo has 0 instances")),
        "{err}"
    );
    assert!(err.contains(&format!("{shown} line 11: role echo: setting idle_timeot: echo-server has no setting idle_timeot")), "{err}");
    assert!(
        err.contains(&format!(
            "{shown} line 17: port 1234 is used by both echo/EchoEndpoint and other/SquareEndpoint"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{shown} line 19: role db: unknown program \"mysql\""
        )),
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
    let compose = std::fs::read_to_string(workspace().join("deploy/compose.yaml")).unwrap();
    assert_eq!(
        compose,
        std::fs::read_to_string(dir.join("compose.yaml")).unwrap(),
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
    let manifests = ["echo-server.yaml", "square-server.yaml", "tunnel.yaml"];
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
    assert_eq!(report.matches("passed for resource").count(), 9, "{report}");
    let rendered = run_ok(
        require("kubectl"),
        &["kustomize", "deploy/kubernetes"],
        "kubectl kustomize",
    );
    for kind in ["kind: Deployment", "kind: Service", "kind: ConfigMap"] {
        assert_eq!(rendered.matches(kind).count(), 3, "{kind} in\n{rendered}");
    }
    assert!(rendered.contains("type: LoadBalancer"), "{rendered}");
    run_ok(
        require("hadolint"),
        &["--failure-threshold", "warning", "Dockerfile"],
        "hadolint",
    );
}

/// The fabric, started on a definition of our own, with its output read
/// line by line on threads.
struct Fabric {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Fabric {
    fn start(definition: &Path) -> Fabric {
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
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        Fabric {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a status table in which `check` holds for the instances
    /// (id -> (state, pid, restarts)); returns them.
    fn table_where(
        &mut self,
        check: impl Fn(&HashMap<String, (String, u32, u32)>) -> bool,
    ) -> HashMap<String, (String, u32, u32)> {
        let end = Instant::now() + Duration::from_secs(30);
        let mut current = HashMap::new();
        while Instant::now() < end {
            let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) else {
                continue;
            };
            self.seen.push(line.clone());
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() >= 6 && cols[1].contains("_IN_") {
                let n = cols.len();
                let pid = cols[n - 3].parse().unwrap_or(0);
                let restarts = cols[n - 1].parse().unwrap_or(0);
                current.insert(cols[1].to_string(), (cols[2].to_string(), pid, restarts));
                if current.len() == 4 && check(&current) {
                    return current;
                }
            }
        }
        panic!(
            "no such status table; output so far:\n{}",
            self.seen.join("\n")
        );
    }
}

impl Drop for Fabric {
    /// Even when the test fails: Ctrl-C first, so the fabric stops its
    /// instances (they run in their own process group and would outlive a
    /// SIGKILLed fabric), then SIGKILL whatever is left.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let end = Instant::now() + Duration::from_secs(15);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for line in &self.seen {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() >= 6 && cols[1].contains("_IN_") {
                if let Ok(pid) = cols[cols.len() - 3].parse::<u32>() {
                    // Only an instance: the number may belong to someone else by now.
                    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    if alive(pid) && String::from_utf8_lossy(&cmdline).contains("echo-server") {
                        let _ = Command::new("kill")
                            .args(["-KILL", &pid.to_string()])
                            .status();
                    }
                }
            }
        }
    }
}

/// Connects, reads the greeting, returns the instance id, says goodbye.
fn greeting(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).expect("the balancer accepts");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut text = String::new();
    let mut buf = [0u8; 256];
    while !text.contains("Your choice: ") {
        let n = s.read(&mut buf).expect("a greeting");
        assert!(n > 0, "closed before the greeting: {text:?}");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let _ = s.write_all(b"9\n");
    let id = text
        .split("instance ")
        .nth(1)
        .and_then(|rest| rest.split('.').next())
        .expect("an instance id");
    id.to_string()
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
    let mut fabric = Fabric::start(&definition);
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
