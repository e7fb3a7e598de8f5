//! A real, temporary PostgreSQL server for the end-to-end tests, and its
//! real clients (`psql`, `pgbench`).
//!
//! The binaries are Debian's (package `postgresql`), taken from the highest
//! version under `/usr/lib/postgresql/*/bin`. The tests run as root, which
//! `initdb` and `postgres` refuse, so the cluster lives in a temporary
//! directory owned by the `postgres` system user the package creates, and
//! the server programs run as that user (`setpriv`). Authentication is
//! `trust`; the server listens on 127.0.0.1 only, or on one address a test
//! chooses ([`Postgres::start_at`]), and admits loopback clients and the
//! ones the test names.
//!
//! A [`Client`] runs `psql` or `pgbench` against any host and port, and can
//! run them through a prefix such as `ip netns exec NAME` (see
//! [`crate::netns::Netns::prefix`]).

use std::ffi::OsString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::free_port;

/// How long one client command may take before it is killed.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The `bin` directory of the highest PostgreSQL version installed under
/// `/usr/lib/postgresql`. Panics when there is none: the test script
/// installs the `postgresql` package.
pub fn bin_dir() -> PathBuf {
    let versions = std::fs::read_dir("/usr/lib/postgresql").ok();
    let best = versions
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let bin = entry.path().join("bin");
            if !bin.join("postgres").is_file() {
                return None;
            }
            let name = entry.file_name().into_string().ok()?;
            let version: Vec<u32> = name
                .split('.')
                .map(|part| part.parse().ok())
                .collect::<Option<_>>()?;
            Some((version, bin))
        })
        .max();
    match best {
        Some((_, bin)) => bin,
        None => panic!(
            "no PostgreSQL server under /usr/lib/postgresql/*/bin; \
             the test script installs the Debian package postgresql"
        ),
    }
}

/// A PostgreSQL server on 127.0.0.1 (or another address of the host), in
/// a cluster of its own that is deleted when this is dropped.
#[derive(Debug)]
pub struct Postgres {
    /// The address it listens on, the only one.
    pub host: IpAddr,
    /// The TCP port it listens on.
    pub port: u16,
    /// The temporary directory: the cluster in `data/`, the Unix socket and
    /// the server's log `postgres.log`.
    pub dir: PathBuf,
    /// Where the server programs and clients are.
    pub bin: PathBuf,
    child: Child,
}

impl Postgres {
    /// Makes a fresh cluster (`initdb -A trust -U postgres`) and starts a
    /// server on a free loopback port; returns when it accepts connections.
    /// PostgreSQL takes ports 1 to 65535 only, so the port is chosen before
    /// it starts (see [`free_port`]).
    pub fn start() -> Postgres {
        Postgres::start_at(IpAddr::V4(Ipv4Addr::LOCALHOST), free_port(), &[])
    }

    /// Like [`Postgres::start`], listening on `host`:`port` only (an address
    /// of the host, such as a [`crate::netns::Netns`] link's host side), and
    /// admitting clients from `clients` besides the loopback ones and the
    /// host's own (whose connections to `host` come from `host`).
    pub fn start_at(host: IpAddr, port: u16, clients: &[IpAddr]) -> Postgres {
        let bin = bin_dir();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("pg-e2e-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let chown = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&dir)
            .status()
            .expect("run chown");
        assert!(
            chown.success(),
            "cannot give {} to the postgres user (does it exist? the \
             postgresql package creates it)",
            dir.display()
        );
        let data = dir.join("data");
        let out = as_postgres(&bin.join("initdb"), &dir)
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "-N",
            ])
            .arg("-D")
            .arg(&data)
            .stdin(Stdio::null())
            .output()
            .expect("run initdb");
        if !out.status.success() {
            let _ = std::fs::remove_dir_all(&dir);
            panic!(
                "initdb failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let own = Some(host).filter(|h| !h.is_loopback());
        let admitted: Vec<IpAddr> = own.into_iter().chain(clients.iter().copied()).collect();
        if !admitted.is_empty() {
            let mut hba = OpenOptions::new()
                .append(true)
                .open(data.join("pg_hba.conf"))
                .expect("open pg_hba.conf");
            for client in admitted {
                let bits = if client.is_ipv4() { 32 } else { 128 };
                writeln!(hba, "host all all {client}/{bits} trust").unwrap();
            }
        }
        let log = File::create(dir.join("postgres.log")).unwrap();
        let child = as_postgres(&bin.join("postgres"), &dir)
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(&dir)
            .args(["-p", &port.to_string()])
            .args(["-c", &format!("listen_addresses={host}")])
            // A test database: durability does not matter, speed does.
            .args(["-c", "fsync=off"])
            .args(["-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start postgres");
        let mut server = Postgres {
            host,
            port,
            dir,
            bin,
            child,
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&mut self) {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-h", &self.host.to_string(), "-p", &self.port.to_string()])
                .args(["-U", "postgres", "-d", "postgres", "-t", "1"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("run pg_isready");
            if ready.success() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("postgres exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < end,
                "postgres not ready after 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }

    /// The server's process id (the postmaster).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A client that connects straight to the server (over loopback, unless
    /// it listens elsewhere).
    pub fn client(&self) -> Client {
        Client::new(self.host, self.port)
    }

    /// `pgbench -i -s SCALE` straight to the server: creates and fills pgbench's
    /// tables. Panics when it fails.
    pub fn pgbench_init(&self, scale: u32) {
        self.client()
            .run_pgbench(&["-i", "-q", "-s", &scale.to_string()])
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGINT is PostgreSQL's fast shutdown: sessions are ended, no
        // waiting for clients.
        let _ = Command::new("kill")
            .args(["-s", "INT", &self.child.id().to_string()])
            .status();
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `program` run as the `postgres` user from `dir` (root's own working
/// directory may be closed to that user).
fn as_postgres(program: &Path, dir: &Path) -> Command {
    // setpriv execs the program itself, so the child's pid is the server's.
    let mut command = Command::new("setpriv");
    command
        .args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(program)
        .current_dir(dir)
        .env("LC_ALL", "C");
    command
}

/// A client program that did not succeed: what ran, how it ended, and what
/// it said.
#[derive(Debug)]
pub struct Failed {
    /// The command line.
    pub command: String,
    /// How it ended; `None` when it could not start or was killed after
    /// [`CLIENT_TIMEOUT`].
    pub status: Option<ExitStatus>,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error, or why it could not run.
    pub stderr: String,
}

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some(status) => write!(f, "`{}` failed ({status})", self.command)?,
            None => write!(f, "`{}` did not finish", self.command)?,
        }
        write!(f, "\nstdout:\n{}\nstderr:\n{}", self.stdout, self.stderr)
    }
}

impl std::error::Error for Failed {}

/// What a `pgbench` run reported.
#[derive(Debug, Clone)]
pub struct PgbenchReport {
    /// "number of transactions actually processed".
    pub processed: u64,
    /// "number of failed transactions" (0 when this version of pgbench
    /// does not report it).
    pub failed: u64,
    /// Transactions per second.
    pub tps: f64,
    /// The whole report (stdout).
    pub output: String,
}

impl PgbenchReport {
    /// Reads pgbench's summary; `None` when a figure is missing.
    pub fn parse(output: &str) -> Option<PgbenchReport> {
        let value = |prefix: &str| {
            output
                .lines()
                .find_map(|l| l.trim().strip_prefix(prefix))
                .and_then(|rest| rest.split_whitespace().next())
        };
        let processed = value("number of transactions actually processed:")?
            // "-T": "N"; "-t": "N/M"
            .split('/')
            .next()?
            .parse()
            .ok()?;
        let failed = match value("number of failed transactions:") {
            Some(n) => n.parse().ok()?,
            None => 0,
        };
        let tps = value("tps =")?.parse().ok()?;
        Some(PgbenchReport {
            processed,
            failed,
            tps,
            output: output.to_string(),
        })
    }
}

/// `psql` and `pgbench` aimed at one host and port as user `postgres`,
/// database `postgres`, optionally run through a prefix.
#[derive(Debug, Clone)]
pub struct Client {
    /// Where the client programs are.
    pub bin: PathBuf,
    /// Words run before the program, e.g. `ip netns exec NAME`.
    pub prefix: Vec<OsString>,
    /// The server's host name or address.
    pub host: String,
    /// The server's port.
    pub port: u16,
}

impl Client {
    /// A client for `host`:`port`, run directly.
    pub fn new(host: impl ToString, port: u16) -> Client {
        Client {
            bin: bin_dir(),
            prefix: Vec::new(),
            host: host.to_string(),
            port,
        }
    }

    /// The same client run behind `prefix` (e.g. [`crate::netns::Netns::prefix`]).
    pub fn within(mut self, prefix: Vec<OsString>) -> Client {
        self.prefix = prefix;
        self
    }

    /// The same client aimed at another port.
    pub fn at_port(mut self, port: u16) -> Client {
        self.port = port;
        self
    }

    fn command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        let mut command = match self.prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program);
                c
            }
            None => Command::new(program),
        };
        command
            .args(["-h", &self.host, "-p", &self.port.to_string()])
            .args(["-U", "postgres"])
            .env("PGCONNECT_TIMEOUT", "10")
            .env_remove("PGPASSWORD")
            .env_remove("PGSERVICE")
            .env_remove("PGOPTIONS");
        command
    }

    /// Runs `sql` (any number of statements, any size: it goes in on
    /// standard input) with `psql -X -q -A -t -v ON_ERROR_STOP=1` and
    /// returns what it printed, without the final newline.
    pub fn psql(&self, sql: &str) -> Result<String, Failed> {
        let mut command = self.command("psql");
        command.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]);
        command.args(["-d", "postgres", "-f", "-"]);
        let out = run(command, Some(sql.as_bytes()))?;
        Ok(out.strip_suffix('\n').unwrap_or(&out).to_string())
    }

    /// Runs `pgbench ARGS postgres` and returns its standard output.
    pub fn run_pgbench(&self, args: &[&str]) -> Result<String, Failed> {
        let mut command = self.command("pgbench");
        command.args(args).arg("postgres");
        run(command, None)
    }

    /// Runs a benchmark, `pgbench ARGS postgres` (after
    /// [`Postgres::pgbench_init`]), and reads its summary.
    pub fn pgbench(&self, args: &[&str]) -> Result<PgbenchReport, Failed> {
        let out = self.run_pgbench(args)?;
        PgbenchReport::parse(&out).ok_or_else(|| Failed {
            command: format!("pgbench {}", args.join(" ")),
            status: None,
            stdout: out,
            stderr: "no summary in pgbench's output".to_string(),
        })
    }
}

/// Runs `command` with `input` on stdin (or none) and returns its stdout,
/// or everything about it when it fails or runs past [`CLIENT_TIMEOUT`].
fn run(mut command: Command, input: Option<&[u8]>) -> Result<String, Failed> {
    let line = format!("{command:?}");
    let failed = |status, stdout: String, stderr: String| Failed {
        command: line.clone(),
        status,
        stdout,
        stderr,
    };
    let mut child = command
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(None, String::new(), e.to_string()))?;
    let reader = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let stdout = reader(Box::new(child.stdout.take().unwrap()));
    let stderr = reader(Box::new(child.stderr.take().unwrap()));
    let writer = input.map(|bytes| {
        let bytes = bytes.to_vec();
        let mut stdin = child.stdin.take().unwrap();
        std::thread::spawn(move || {
            // A client that exits early closes the pipe; its status tells.
            let _ = stdin.write_all(&bytes);
        })
    });
    let end = Instant::now() + CLIENT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if let Some(writer) = writer {
        let _ = writer.join();
    }
    let stdout = stdout.join().unwrap();
    let stderr = stderr.join().unwrap();
    match status {
        Some(status) if status.success() => Ok(stdout),
        status => Err(failed(status, stdout, stderr)),
    }
}
