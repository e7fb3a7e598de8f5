//! Helpers for the end-to-end tests in `tests/tests/`, which run the
//! workspace's real binaries against real peers (the `telnet` client,
//! PostgreSQL, the square client).
//!
//! [`binary`] builds the workspace's binaries once per test run, in the
//! tests' own profile and target directory, so a test never runs a stale
//! one.

pub mod kubelet;
pub mod netns;
pub mod postgres;

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

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

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
    /// it listens on `addr`.
    pub fn start(mut command: Command, addr: SocketAddr) -> Running {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the server");
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
        wait_listening(addr, &mut child);
        Running {
            child,
            addr,
            stderr,
            reader,
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
