//! Helpers for the end-to-end tests in `tests/tests/`, which run the
//! workspace's real binaries against real peers (the `telnet` client,
//! PostgreSQL, the square client).
//!
//! [`binary`] builds the workspace's binaries once per test run, in the
//! tests' own profile and target directory, so a test never runs a stale
//! one.

pub mod kubelet;
pub mod netns;
pub mod pki;
pub mod postgres;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a program may take to report where it listens.
const REPORT_WITHIN: Duration = Duration::from_secs(20);

/// The path of a workspace binary, built once per test run with the
/// profile and target directory of the tests, so it is never stale.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        // A test runs as <target>/<profile>/deps/<test>-<hash>.
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .to_path_buf();
        let target = profile_dir.parent().expect("target dir");
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace");
        let mut build = Command::new(env!("CARGO"));
        build
            .current_dir(workspace)
            .env("CARGO_TARGET_DIR", target)
            // The test's own manifest directory would make build scripts
            // that watch it (ring's) run again, and everything above them
            // rebuild, in every test process.
            .env_remove("CARGO_MANIFEST_DIR")
            .args(["build", "--quiet", "--workspace", "--bins"]);
        if profile_dir.file_name().is_some_and(|p| p == "release") {
            build.arg("--release");
        }
        let status = build.status().expect("cargo runs");
        assert!(status.success(), "building the workspace binaries failed");
        profile_dir
    });
    dir.join(name)
}

/// An echo server on threads of the test process: every connection gets
/// back what it sends. Returns its address and a count of the connections
/// it accepted.
pub fn counting_echo_server() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::Write;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// [`counting_echo_server`] without the count.
pub fn echo_server() -> SocketAddr {
    counting_echo_server().0
}

/// `127.0.0.1:port`.
pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Waits up to 15 s for `check` to hold, looking every 50 ms.
pub fn wait_for(mut check: impl FnMut() -> bool, what: &str) {
    let end = Instant::now() + Duration::from_secs(15);
    while !check() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A loopback port that was free a moment ago; another process may take it
/// before the test uses it. Only for an address that must be written down
/// before the program starts where the program refuses port 0 (a rinetd.conf
/// rule, an endpoint of a service definition, PostgreSQL's port), and the
/// race is accepted there. Everywhere else, give the program port 0 and
/// learn the address it got with [`Running::start_reporting`].
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The address a log line reports in `field` (`listen`, `admin`, `addr`):
/// `field=ADDR` in the text format, `"field":"ADDR"` in JSON.
pub fn logged_addr(line: &str, field: &str) -> Option<SocketAddr> {
    let text = format!("{field}=");
    let json = format!("\"{field}\":\"");
    line.match_indices(&text)
        .filter(|(at, _)| *at == 0 || line[..*at].ends_with(' '))
        .map(|(at, _)| line[at + text.len()..].split_whitespace().next())
        .chain(
            line.match_indices(&json)
                .map(|(at, _)| line[at + json.len()..].split('"').next()),
        )
        .find_map(|value| value?.parse().ok())
}

/// Starts `command` (stdin closed, stderr piped) with the log at info
/// unless the command sets `RUST_LOG` itself: start-up lines are logged at
/// info, and the test's own environment must not hide them.
fn spawn_logging(mut command: Command) -> Child {
    if !command.get_envs().any(|(key, _)| key == "RUST_LOG") {
        command.env_remove("RUST_LOG");
    }
    command
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"))
}

/// Starts `command` and reads its stderr until it has reported an address
/// in each of `fields` (see [`logged_addr`]); returns the process, those
/// addresses, and the stderr pipe, read up to there, for the test to close
/// (a log nobody reads any more) or to keep and never read. For a log the
/// test goes on reading, use [`Running::start_reporting`].
pub fn spawn_reporting(command: Command, fields: &[&str]) -> (Child, Vec<SocketAddr>, ChildStderr) {
    let mut child = spawn_logging(command);
    let pipe = child.stderr.take().expect("stderr is piped");
    let fields: Vec<String> = fields.iter().map(ToString::to_string).collect();
    let (found, report) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut addrs = vec![None; fields.len()];
        let mut seen = String::new();
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
            for (addr, field) in addrs.iter_mut().zip(&fields) {
                *addr = addr.or_else(|| logged_addr(&line, field));
            }
            seen.push_str(&line);
            line.clear();
            if let Some(addrs) = addrs.iter().copied().collect::<Option<Vec<_>>>() {
                let _ = found.send(Ok((addrs, reader.into_inner())));
                return;
            }
        }
        let _ = found.send(Err(seen));
    });
    match report.recv_timeout(REPORT_WITHIN) {
        Ok(Ok((addrs, pipe))) => (child, addrs, pipe),
        Ok(Err(seen)) => {
            let _ = child.kill();
            let status = child.wait().map_or("?".to_string(), |s| s.to_string());
            panic!("the program exited ({status}) before reporting where it listens:\n{seen}");
        }
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the program did not report where it listens within {REPORT_WITHIN:?}");
        }
    }
}

/// Waits until `child` listens on `count` TCP addresses and returns them,
/// as the kernel shows them (`/proc`), in no particular order: for a
/// program whose log the test cannot read. Its early exit is reported.
pub fn listening(child: &mut Child, count: usize) -> Vec<SocketAddr> {
    let end = Instant::now() + REPORT_WITHIN;
    loop {
        let found = listening_now(child.id(), count);
        if found.len() >= count {
            return found;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the program exited with {status} listening on {found:?}");
        }
        assert!(
            Instant::now() < end,
            "the program listens on {found:?} after {REPORT_WITHIN:?}, not on {count} addresses"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The TCP addresses process `pid` listens on, once there are `count`:
/// its sockets (`/proc/PID/fd`) found in the listening rows of its network
/// namespace's tables. The tables hold every socket of the namespace (tens
/// of thousands after a load test), so they are read only when the process
/// has enough sockets, and only as far as needed.
fn listening_now(pid: u32, count: usize) -> Vec<SocketAddr> {
    let sockets: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|link| {
            let inode = link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?;
            Some(inode.to_string())
        })
        .collect();
    let mut found = Vec::new();
    if sockets.len() < count {
        return found;
    }
    for table in ["tcp", "tcp6"] {
        if found.len() >= count {
            break;
        }
        let rows = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for row in rows.lines().skip(1) {
            // sl local_address rem_address st ... uid timeout inode
            let cols: Vec<&str> = row.split_whitespace().collect();
            let listens = cols.get(3) == Some(&"0A");
            if listens
                && cols
                    .get(9)
                    .is_some_and(|inode| sockets.iter().any(|s| s == inode))
            {
                found.extend(kernel_addr(cols[1]));
            }
        }
    }
    found
}

/// `ADDR:PORT` of `/proc/net/tcp{,6}`: the address as 32-bit words in
/// hexadecimal, each the bytes in memory read as a native integer, and
/// the port in hexadecimal.
fn kernel_addr(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::new();
    for word in ip.as_bytes().chunks(8) {
        let word = u32::from_str_radix(std::str::from_utf8(word).ok()?, 16).ok()?;
        bytes.extend(word.to_ne_bytes());
    }
    let ip = match bytes.len() {
        4 => std::net::IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => std::net::IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// A connection from the loopback address `from` (127.0.0.2, say), to
/// test what an access list lets in; reads time out after 10 s.
pub fn connect_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::from((from, 0)).into()).unwrap();
    socket.connect(&to.into()).unwrap();
    let stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// Waits until something accepts connections on `addr`, which `child`
/// serves (so its early exit is reported at once).
pub fn wait_listening(addr: SocketAddr, child: &mut Child) {
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the server exited with {status} before listening on {addr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listens on {addr} after 20 s");
}

/// A child process that is killed when the test ends, pass or fail. Its
/// stderr is read as it comes (a busy server's log must never fill the
/// pipe and stall it) and kept for [`Running::stop`].
pub struct Running {
    /// The process.
    pub child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    /// Waits until the process also listens on `other` (a second endpoint).
    pub fn wait_also(&mut self, other: SocketAddr) {
        wait_listening(other, &mut self.child);
    }

    /// Starts `command` (stderr kept for [`Running::stop`]) and waits until
    /// it listens on `addr`. Only for an address written down before the
    /// program starts (see [`free_port`]); the probe that finds it listening
    /// is a connection the program serves.
    pub fn start(mut command: Command, addr: SocketAddr) -> Running {
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the server");
        let mut running = Running::keeping_stderr(child, addr);
        wait_listening(addr, &mut running.child);
        running
    }

    /// Starts `command` and waits until its log reports the address it
    /// listens on in `field` (see [`logged_addr`]: `listen` for echo-server
    /// and a tunnel's first route, `addr` for square-server); that address
    /// is [`Running::addr`]. Give the program port 0: it binds, the kernel
    /// chooses, and no other process can take the port in between.
    pub fn start_reporting(mut command: Command, field: &str) -> Running {
        command.stdout(Stdio::piped());
        let child = spawn_logging(command);
        let mut running = Running::keeping_stderr(child, SocketAddr::from(([0, 0, 0, 0], 0)));
        running.addr = running.reported("", field);
        running
    }

    /// Reads `child`'s stderr as it comes into the kept log.
    fn keeping_stderr(mut child: Child, addr: SocketAddr) -> Running {
        let stderr = Arc::new(Mutex::new(String::new()));
        let reader = child.stderr.take().map(|mut pipe| {
            let sink = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            })
        });
        Running {
            child,
            addr,
            stderr,
            reader,
        }
    }

    /// Waits until the log has a line that contains `text`, and returns the
    /// first such line. Fails at once when the process exits without one,
    /// and after 20 s.
    pub fn wait_line(&mut self, text: &str) -> String {
        self.wait_logged(text, |line| {
            line.contains(text).then(|| line.trim_end().to_string())
        })
    }

    /// Waits until the log has a line that contains `line_has` (`route=db`,
    /// say; "" for any) and reports an address in `field`; returns the
    /// first such line's address.
    pub fn reported(&mut self, line_has: &str, field: &str) -> SocketAddr {
        self.wait_logged(&format!("{field}= on a line with {line_has:?}"), |line| {
            logged_addr(line, field).filter(|_| line.contains(line_has))
        })
    }

    /// The first complete line of the log for which `find` gives something,
    /// waiting up to [`REPORT_WITHIN`] for it.
    fn wait_logged<T>(&mut self, what: &str, find: impl Fn(&str) -> Option<T>) -> T {
        let end = Instant::now() + REPORT_WITHIN;
        loop {
            let exited = self.child.try_wait().unwrap();
            if exited.is_some() {
                // Its last lines are in once the pipe has closed.
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                }
            }
            let log = self.stderr();
            if let Some(found) = log
                .split_inclusive('\n')
                .filter(|l| l.ends_with('\n'))
                .find_map(&find)
            {
                return found;
            }
            if let Some(status) = exited {
                panic!("the program exited ({status}) before logging {what}:\n{log}");
            }
            assert!(
                Instant::now() < end,
                "the program did not log {what} within {REPORT_WITHIN:?}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What the process has written to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends `signal` (by name, as `kill -s` takes it).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args(["-s", signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Sends SIGTERM and waits; returns the exit status code and stderr.
    pub fn stop(mut self) -> (Option<i32>, String) {
        self.signal("TERM");
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // The pipe closes with the process: take in the last lines.
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                }
                return (status.code(), self.stderr());
            }
            assert!(Instant::now() < end, "the server ignored SIGTERM for 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a program is on the PATH. In CI a missing one is a failure: the
/// test script installs every peer the tests need.
pub fn require(program: &str) -> PathBuf {
    // The Python tools live in the test script's virtualenv.
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-tools/bin");
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain(std::iter::once(tools))
            .map(|p| p.join(program))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("{program} is not installed; the test script installs it (see README: running the tests)")
    })
}

/// Checks a Prometheus text exposition with the real `promtool check
/// metrics`; fails the test with promtool's words and the exposition.
pub fn promtool_check(body: &str) {
    let mut check = Command::new(require("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let checked = check.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics failed:\n{}{}\n{body}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
}

/// Runs checkov's Kubernetes policies on the manifests in `file` and
/// returns its summary (`passed`, `failed`, `resource_count`, ...), after
/// checking that it ran and failed no check.
pub fn checkov_kubernetes(file: &Path) -> serde_json::Value {
    let checked = Command::new(require("checkov"))
        .env("BC_SKIP_MAPPING", "TRUE")
        .env("CKV_SKIP_PACKAGE_UPDATE_CHECK", "true")
        .args(["--skip-download", "--quiet", "--compact", "-o", "json"])
        .args(["--framework", "kubernetes", "-f"])
        .arg(file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&checked.stdout);
    assert!(
        checked.status.success(),
        "checkov failed:\n{text}\n{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&text).expect("checkov's JSON report");
    let summary = report["summary"].clone();
    assert_eq!(summary["failed"], 0, "{summary}");
    assert_eq!(summary["parsing_errors"], 0, "{summary}");
    summary
}
