//! The local development fabric: every role's instances on one machine,
//! each public (or internal) endpoint fronted by the tunnel's balancer.
//!
//! Instances listen on loopback ports of their own and know who they are
//! (`<PREFIX>_INSTANCE`). The balancer sends each new connection to a live
//! instance, retrying the next one when a connect fails and ejecting dead
//! ones with active health checks. A crashed instance is started again with
//! exponential backoff. Every instance's output is prefixed with its role
//! and index, and a status table is printed at start and whenever an
//! instance changes state.
//!
//! The fabric leaves nothing behind. On SIGINT, SIGTERM or SIGHUP (a closed
//! terminal) the balancers drain and the instances get SIGTERM, then
//! SIGKILL after the grace period; a second signal cuts the grace period
//! short. Instances also get SIGKILL from the kernel when the fabric dies
//! without stopping them (see [`crate::parent_death`]).
//!
//! The fabric follows its definition file while it runs (see [`live`]):
//! an edit is checked, and a bad one reported and ignored; a good one is
//! applied as a difference (instances added, or drained and removed;
//! settings reloaded with SIGHUP where the program can, else instances
//! replaced one at a time, each new one serving before the old one
//! drains; endpoints added or removed), each change printed as it
//! happens. What runs is published in the fabric's directory for
//! `deploy status` (see [`state`]).
//!
//! Output is a side channel: the fabric's stdout and stderr are written
//! through bounded queues by threads of their own, so a reader that stops
//! reading, or went away, neither blocks nor breaks the fabric (lines are
//! dropped and counted instead), and instances' output is always drained.

pub mod live;
pub mod state;

use std::fmt::Write as _;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::Duration;

use std::os::unix::fs::DirBuilderExt;

use anyhow::{bail, Context};
use common::settings::{ListenAddr, Period};
pub use common::signal::Shutdown;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use tunnel::settings::{HealthCheck, Policy};
use tunnel::Route;

use crate::definition::{Definition, Role};

/// How the fabric runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where the programs' binaries are.
    pub programs: PathBuf,
    /// How long instances and connections get to finish on shutdown.
    pub grace: Duration,
    /// First restart delay; doubles up to `max_backoff`.
    pub backoff: Duration,
    /// Longest restart delay.
    pub max_backoff: Duration,
    /// The definition's file, followed while the fabric runs (none: the
    /// definition it started with runs unchanged).
    pub follow: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            programs: PathBuf::from("."),
            grace: Duration::from_secs(10),
            backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(10),
            follow: None,
        }
    }
}

/// What an instance is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Started, not yet accepting connections.
    Starting,
    /// Accepting connections.
    Running,
    /// Exited; waiting to be started again.
    Crashed(String),
    /// Out of rotation, finishing its connections before it stops (its
    /// role scaled down, or a replacement took its place).
    Draining,
    /// Stopped by the fabric.
    Stopped,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            State::Starting => f.write_str("starting"),
            State::Running => f.write_str("running"),
            State::Crashed(why) => write!(f, "crashed ({why})"),
            State::Draining => f.write_str("draining"),
            State::Stopped => f.write_str("stopped"),
        }
    }
}

/// One instance as the status table shows it.
#[derive(Debug, Clone)]
pub struct Instance {
    /// What tells it apart for the fabric's lifetime (a replacement has the
    /// id of the instance it replaces, and a key of its own).
    pub key: u64,
    /// Its role.
    pub role: String,
    /// Its id (`echo-server_IN_2`).
    pub id: String,
    /// Its own address.
    pub addr: SocketAddr,
    /// What it is doing.
    pub state: State,
    /// Its process id, while it has one.
    pub pid: Option<u32>,
    /// How often it was started again.
    pub restarts: u32,
    /// When its process last started.
    pub since: Option<std::time::SystemTime>,
}

/// The fabric's instances and endpoints, shared between the supervisors,
/// the fabric's control and the status it prints and publishes.
#[derive(Debug, Clone)]
struct Board {
    instances: Arc<Mutex<Vec<Instance>>>,
    endpoints: Arc<Mutex<Vec<EndpointLine>>>,
    changed: watch::Sender<u64>,
}

impl Board {
    fn new() -> Board {
        Board {
            instances: Arc::default(),
            endpoints: Arc::default(),
            changed: watch::channel(0).0,
        }
    }

    fn instances(&self) -> std::sync::MutexGuard<'_, Vec<Instance>> {
        // A panic elsewhere while the lock was held leaves the table as it
        // was; the supervisors go on with it.
        self.instances
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn update(&self, key: u64, change: impl FnOnce(&mut Instance)) {
        if let Some(instance) = self.instances().iter_mut().find(|i| i.key == key) {
            change(instance);
        }
        self.changed.send_modify(|n| *n += 1);
    }

    /// Adds `instance` after the others of its role (the table lists a
    /// role's instances together).
    fn add(&self, instance: Instance) {
        let mut instances = self.instances();
        let at = instances
            .iter()
            .rposition(|i| i.role == instance.role)
            .map_or(instances.len(), |p| p + 1);
        instances.insert(at, instance);
        drop(instances);
        self.changed.send_modify(|n| *n += 1);
    }

    fn remove(&self, key: u64) {
        self.instances().retain(|i| i.key != key);
        self.changed.send_modify(|n| *n += 1);
    }

    fn get(&self, key: u64) -> Option<Instance> {
        self.instances().iter().find(|i| i.key == key).cloned()
    }

    fn set_endpoints(&self, endpoints: Vec<EndpointLine>) {
        *self
            .endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = endpoints;
        self.changed.send_modify(|n| *n += 1);
    }

    fn endpoints(&self) -> Vec<EndpointLine> {
        self.endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn snapshot(&self) -> Vec<Instance> {
        self.instances().clone()
    }

    fn all_started(&self) -> bool {
        self.snapshot().iter().all(|i| i.state != State::Starting)
    }
}

/// An endpoint as the status shows it: what it is, and whose instances
/// serve it.
#[derive(Debug, Clone)]
pub struct EndpointLine {
    /// `public endpoint echo-server/EchoEndpoint on 0.0.0.0:1234`.
    pub text: String,
    /// The role whose instances serve it.
    pub role: String,
    /// The endpoint's name.
    pub endpoint: String,
    /// `public` or `internal`.
    pub visibility: &'static str,
    /// Where it listens.
    pub address: SocketAddr,
}

/// The status: a table printed once when everything has started, then a
/// row of the same shape for each instance whose state changes. The
/// columns are as wide as the table needs at start and the state, the one
/// column of varying width, comes last, so rows line up and never shift.
#[derive(Debug)]
pub struct Status {
    widths: [usize; 3],
    shown: Vec<Instance>,
}

impl Status {
    /// Column widths for `instances`.
    pub fn new(instances: &[Instance]) -> Status {
        let width = |header: &str, of: &dyn Fn(&Instance) -> usize| {
            instances
                .iter()
                .map(of)
                .max()
                .unwrap_or(0)
                .max(header.len())
        };
        Status {
            widths: [
                width("ROLE", &|i| i.role.len()),
                width("INSTANCE", &|i| i.id.len()),
                // 127.0.0.1:65535 at most for loopback; wider if need be.
                width("ADDRESS", &|i| i.addr.to_string().len()),
            ],
            shown: Vec::new(),
        }
    }

    fn row(&self, out: &mut String, cells: [&str; 6]) {
        let [role, id, address] = self.widths;
        let [r, i, pid, a, restarts, state] = cells;
        let _ = writeln!(
            out,
            "{r:<role$}  {i:<id$}  {pid:>7}  {a:<address$}  {restarts:>8}  {state}"
        );
    }

    fn instance_row(&self, out: &mut String, i: &Instance) {
        let pid = i.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
        let restarts = i.restarts.to_string();
        let address = i.addr.to_string();
        let state = i.state.to_string();
        self.row(out, [&i.role, &i.id, &pid, &address, &restarts, &state]);
    }

    /// The whole table, with each endpoint and how many of its instances
    /// are live.
    pub fn table(&mut self, instances: &[Instance], endpoints: &[EndpointLine]) -> String {
        let mut out = String::new();
        self.row(
            &mut out,
            ["ROLE", "INSTANCE", "PID", "ADDRESS", "RESTARTS", "STATE"],
        );
        for i in instances {
            self.instance_row(&mut out, i);
        }
        for e in endpoints {
            let of_role = instances.iter().filter(|i| i.role == e.role);
            let live = of_role
                .clone()
                .filter(|i| i.state == State::Running)
                .count();
            let _ = writeln!(
                out,
                "{} -> {} instances ({live} live)",
                e.text,
                of_role.count()
            );
        }
        self.shown = instances.to_vec();
        out
    }

    /// A row for each instance that changed since last shown, and a
    /// `stopped` row for one removed before its stop was shown.
    pub fn changes(&mut self, instances: &[Instance]) -> String {
        let mut out = String::new();
        for gone in &self.shown {
            if gone.state != State::Stopped && !instances.iter().any(|i| i.key == gone.key) {
                let stopped = Instance {
                    state: State::Stopped,
                    pid: None,
                    ..gone.clone()
                };
                self.instance_row(&mut out, &stopped);
            }
        }
        for i in instances {
            let before = self.shown.iter().find(|b| b.key == i.key);
            if before
                .is_none_or(|b| b.state != i.state || b.pid != i.pid || b.restarts != i.restarts)
            {
                self.instance_row(&mut out, i);
            }
        }
        self.shown = instances.to_vec();
        out
    }
}

/// Finds a program's binary: beside `dir`, else on the PATH.
pub fn locate(dir: &Path, program: &str) -> anyhow::Result<PathBuf> {
    let beside = dir.join(program);
    if beside.is_file() {
        return Ok(beside);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for p in std::env::split_paths(&paths) {
            let candidate = p.join(program);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    bail!(
        "{program} is neither in {} nor on the PATH; build it with `cargo build --release` (or run `cargo run --release -p deploy -- run`, which builds it)",
        dir.display()
    )
}

/// A loopback port for an instance, and a socket that keeps it: bound
/// (with address reuse) but not listening, so the instance can still bind
/// and listen on it, while no one else is handed the port by the kernel
/// meanwhile (another fabric starting at the same moment, say). Keep the
/// socket as long as the instance has the port.
fn free_loopback_port() -> anyhow::Result<(SocketAddr, socket2::Socket)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let reserve = || -> std::io::Result<(SocketAddr, Socket)> {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
        let addr = socket
            .local_addr()?
            .as_socket()
            .ok_or_else(|| std::io::Error::other("not an IP address"))?;
        Ok((addr, socket))
    };
    reserve().context("picking a loopback port")
}

/// Starts instances, all from one thread that lives as long as the fabric.
/// An instance's parent-death signal fires when the *thread* that forked it
/// ends; a runtime thread may end while the fabric runs (blocking-pool
/// threads do when idle), which would kill instances for no reason.
#[derive(Debug, Clone)]
struct Spawner {
    requests: mpsc::Sender<(Command, oneshot::Sender<io::Result<Child>>)>,
}

impl Spawner {
    /// Starts the thread; it ends when the last `Spawner` is dropped, and
    /// with it any instance still running.
    fn start() -> io::Result<Spawner> {
        let runtime = tokio::runtime::Handle::current();
        let (requests, incoming) = mpsc::channel::<(Command, oneshot::Sender<io::Result<Child>>)>();
        std::thread::Builder::new()
            .name("instance-spawner".into())
            .spawn(move || {
                // Children are reaped and their pipes read by the runtime.
                let _runtime = runtime.enter();
                for (mut command, reply) in incoming {
                    crate::parent_death::die_with_parent(&mut command);
                    let _ = reply.send(command.spawn());
                }
            })?;
        Ok(Spawner { requests })
    }

    async fn spawn(&self, command: Command) -> io::Result<Child> {
        let gone = || io::Error::other("the fabric's instance spawner has stopped");
        let (reply, answer) = oneshot::channel();
        self.requests.send((command, reply)).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// Runs the fabric for `definition` until `shutdown` begins, then stops
/// everything: within the grace period, or at once when it is hurried.
/// With [`Options::follow`], changes to the definition's file are applied
/// while it runs.
pub async fn run(
    definition: &Definition,
    options: &Options,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    // Dropping the guards at the end flushes what is queued, for at most
    // about a second each.
    let (out, _out_guard) = common::telemetry::non_blocking(io::stdout(), "fabric-stdout");
    let (err, _err_guard) = common::telemetry::non_blocking(io::stderr(), "fabric-stderr");
    // Cancelled on a shutdown, or when the fabric cannot go on.
    let stop = shutdown.begun().child_token();
    let mut fabric = live::Fabric::start(
        definition,
        options,
        stop.clone(),
        shutdown.hurried().clone(),
        out.clone(),
        err,
    )
    .await?;
    let board = fabric.board();

    // The table once everything has started, then a row per change.
    let table_board = board.clone();
    let table_stop = stop.clone();
    let mut table_out = out.clone();
    let printer = tokio::spawn(async move {
        let mut watch_changes = table_board.changed.subscribe();
        wait_started(&table_board, &table_stop).await;
        let snapshot = table_board.snapshot();
        let mut status = Status::new(&snapshot);
        let endpoints = table_board.endpoints();
        let _ = table_out.write_all(status.table(&snapshot, &endpoints).as_bytes());
        loop {
            tokio::select! {
                _ = table_stop.cancelled() => return status,
                changed = watch_changes.changed() => if changed.is_err() { return status },
            }
            let changes = status.changes(&table_board.snapshot());
            let _ = table_out.write_all(changes.as_bytes());
        }
    });

    let failed = fabric.follow_until_stopped().await;
    if failed.is_none() {
        tracing::info!("stopping: draining the balancers, then the instances");
    }
    let status = printer.await;
    fabric.stop().await;
    // How each instance ended.
    let snapshot = board.snapshot();
    let mut status = status.unwrap_or_else(|_| Status::new(&snapshot));
    let mut out = out;
    let _ = out.write_all(status.changes(&snapshot).as_bytes());
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Waits until no instance is starting any more, for at most 30 s, or
/// until `stop`.
async fn wait_started(board: &Board, stop: &CancellationToken) {
    let mut changes = board.changed.subscribe();
    let started = async {
        while !board.all_started() {
            if changes.changed().await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        _ = tokio::time::timeout(Duration::from_secs(30), started) => {}
        _ = stop.cancelled() => {}
    }
}

fn balancer_route(
    role: &Role,
    endpoint: &str,
    listen: ListenAddr,
    targets: Vec<tunnel::Target>,
    status: &Path,
) -> Route {
    // An internal endpoint with `allow_from` admits only those roles'
    // instances.
    let callers = role
        .endpoints
        .iter()
        .find(|e| e.name == endpoint)
        .and_then(|e| e.allowed_roles())
        .map(|roles| {
            common::fabric::Callers::new(
                roles.iter().map(|r| r.to_string()).collect(),
                status.to_path_buf(),
                false,
            )
        });
    Route {
        balance: Policy::RoundRobin,
        // Instances are local: check every second and act on the first
        // failure (a refused connect ejects at once, between checks too).
        health: HealthCheck {
            interval: Period::from_secs(1),
            timeout: Period::from_millis(500),
            rise: 1,
            fall: 1,
        },
        checks: true,
        connect_timeout: Period::from_secs(2),
        idle_timeout: Period::from_secs(3600),
        max_connections: 10_000,
        // Instances see the real client (and trust loopback to say so).
        send_proxy: Some(common::proxy::Version::V2),
        // An instance that dies with connections it accepted but never
        // answered (in its accept queue, or just read) loses none of
        // them: they go on to another instance.
        retry_before_first_byte: true,
        callers,
        ..Route::new(&format!("{}/{endpoint}", role.name), vec![listen], targets)
    }
}

/// A directory of the fabric's own for what it shares with its instances
/// (the topology), removed when the fabric ends.
struct RuntimeDir(PathBuf);

impl RuntimeDir {
    fn create() -> anyhow::Result<RuntimeDir> {
        let base = std::env::temp_dir();
        // Those of fabrics that were killed (SIGKILL runs no clean-up):
        // their process is gone, or is another program now.
        for (pid, dir) in fabric_dirs() {
            if !is_fabric(pid) && dir.join("topology.json").exists() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        let dir = base.join(format!("deploy-{}", std::process::id()));
        // Left by an earlier fabric of the same process id, long gone.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        Ok(RuntimeDir(dir))
    }
}

/// The directories fabrics made (`deploy-<pid>` in the temporary
/// directory), with the process id each names.
fn fabric_dirs() -> Vec<(u32, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry
                .file_name()
                .to_str()?
                .strip_prefix("deploy-")?
                .parse::<u32>()
                .ok()?;
            Some((pid, entry.path()))
        })
        .collect()
}

/// Whether process `pid` runs and is a `deploy` (a fabric).
fn is_fabric(pid: u32) -> bool {
    pid == std::process::id()
        || std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|comm| comm.trim_end() == "deploy")
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where the balancers' connections to instances come from: every
/// instance trusts these sources to start with a PROXY protocol header.
pub const BALANCER_SOURCES: &str = "127.0.0.0/8,::1/128";

/// An instance's environment: its role's settings, and the balancers
/// trusted to name clients with a PROXY header (added to any networks the
/// role trusts itself). A program that reloads its settings on SIGHUP
/// (`reloads`) takes them from `config` instead, a file the fabric
/// rewrites before the signal (the trusted networks stay in the
/// environment: changing them restarts the instance).
fn instance_environment(
    program: &crate::programs::Program,
    role: &Role,
    config: Option<&Path>,
) -> Vec<(String, String)> {
    let mut env = program.environment(&role.settings);
    let key = format!("{}ACCEPT_PROXY", program.prefix());
    match env.iter_mut().find(|(k, _)| *k == key) {
        Some((_, networks)) => *networks = format!("{networks},{BALANCER_SOURCES}"),
        None => env.push((key.clone(), BALANCER_SOURCES.into())),
    }
    let callers = format!("{}ALLOW_ROLES", program.prefix());
    if let Some(roles) = role.allowed_callers() {
        env.push((callers.clone(), roles.join(",")));
    }
    if let Some(config) = config {
        env.retain(|(k, _)| *k == key || *k == callers);
        env.push((
            format!("{}CONFIG", program.prefix()),
            config.display().to_string(),
        ));
    }
    env
}

/// Keeps one instance running until `stop`, starting it again after a
/// crash with exponential backoff.
struct Supervisor<O, E> {
    board: Board,
    key: u64,
    /// `echo-server/2`, the prefix of its output lines.
    label: String,
    id: String,
    /// Its program's environment prefix (`ECHO_SERVER_`).
    prefix: String,
    env: Vec<(String, String)>,
    binary: PathBuf,
    addr: SocketAddr,
    topology: PathBuf,
    options: Options,
    stop: CancellationToken,
    now: CancellationToken,
    spawner: Spawner,
    out: O,
    err: E,
}

impl<O, E> Supervisor<O, E>
where
    O: Write + Clone + Send + 'static,
    E: Write + Clone + Send + 'static,
{
    async fn run(self) {
        let Supervisor {
            board,
            key: index,
            label,
            id,
            prefix,
            env,
            binary,
            addr,
            topology,
            options,
            stop,
            now,
            spawner,
            out,
            err,
        } = self;
        let mut backoff = options.backoff;
        loop {
            let mut command = Command::new(&binary);
            command
                .envs(env.iter().map(|(k, v)| (k, v)))
                .env(format!("{prefix}TOPOLOGY"), &topology)
                .env(format!("{prefix}LISTEN"), addr.to_string())
                .env(format!("{prefix}INSTANCE"), &id)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                // Its own process group: Ctrl-C reaches the fabric, which
                // then stops the instances in order.
                .process_group(0)
                .kill_on_drop(true);
            let started = tokio::time::Instant::now();
            let mut child = match spawner.spawn(command).await {
                Ok(child) => child,
                Err(e) => {
                    tracing::warn!(instance = %id, binary = %binary.display(), error = %e, "cannot start the instance; trying again");
                    board.update(index, |i| {
                        i.state = State::Crashed(format!("cannot start: {e}"))
                    });
                    if !pause(&stop, backoff).await {
                        break;
                    }
                    backoff = (backoff * 2).min(options.max_backoff);
                    continue;
                }
            };
            let pid = child.id();
            board.update(index, |i| {
                i.pid = pid;
                i.state = State::Starting;
                i.since = Some(std::time::SystemTime::now());
            });
            if let Some(stream) = child.stdout.take() {
                tokio::spawn(forward(stream, label.clone(), out.clone()));
            }
            if let Some(stream) = child.stderr.take() {
                tokio::spawn(forward(stream, label.clone(), err.clone()));
            }
            tokio::select! {
                _ = wait_ready(addr, &mut child, &id) => board.update(index, |i| if i.state == State::Starting { i.state = State::Running }),
                _ = stop.cancelled() => {}
            }
            let status = tokio::select! {
                status = child.wait() => status,
                _ = stop.cancelled() => {
                    terminate(&mut child, options.grace, &now).await;
                    board.update(index, |i| { i.state = State::Stopped; i.pid = None; });
                    return;
                }
            };
            let why = match status {
                Ok(s) => s.to_string(),
                Err(e) => e.to_string(),
            };
            tracing::warn!(instance = %id, status = %why, "instance exited; starting it again");
            if started.elapsed() > Duration::from_secs(10) {
                backoff = options.backoff;
            }
            board.update(index, |i| {
                i.state = State::Crashed(why);
                i.pid = None;
            });
            if !pause(&stop, backoff).await {
                break;
            }
            backoff = (backoff * 2).min(options.max_backoff);
            board.update(index, |i| i.restarts += 1);
        }
        board.update(index, |i| {
            i.state = State::Stopped;
            i.pid = None;
        });
    }
}

/// Sleeps unless stopped first; false when stopped.
async fn pause(stop: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// Completes once the instance accepts connections (or has exited).
async fn wait_ready(addr: SocketAddr, child: &mut Child, id: &str) {
    let patience = Duration::from_secs(30);
    let since = tokio::time::Instant::now();
    let mut warned = false;
    loop {
        // A full backlog would hold a connect for minutes.
        let attempt =
            tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr));
        if let Ok(Ok(probe)) = attempt.await {
            // Closed as a client would: a server that greets sees an end
            // of stream, not a reset, and logs nothing.
            tunnel::connect::close_politely(probe, Duration::from_millis(500)).await;
            return;
        }
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        if !warned && since.elapsed() > patience {
            tracing::warn!(instance = %id, %addr, waited = ?patience, "the instance does not accept connections yet; still waiting");
            warned = true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// SIGTERM, then SIGKILL after `grace`, or at once when `now` is
/// cancelled (a second signal).
async fn terminate(child: &mut Child, grace: Duration, now: &CancellationToken) {
    if !now.is_cancelled() {
        if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        tokio::select! {
            exited = tokio::time::timeout(grace, child.wait()) => if exited.is_ok() { return },
            _ = now.cancelled() => {}
        }
    }
    let _ = child.start_kill();
    // SIGKILL cannot be ignored; the bound only keeps a process the kernel
    // cannot finish (stuck in I/O) from holding the fabric.
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
}

/// The longest line of an instance's output passed on whole; a longer one
/// is passed on in pieces of this size, so an instance cannot make the
/// fabric hold any amount of memory.
const MAX_LINE: usize = 16 * 1024;

/// Copies an instance's output line by line, each line prefixed with the
/// instance, until the instance closes it. Lines that are not UTF-8 are
/// passed on with replacement characters, and `sink` never fails, so the
/// pipe is always drained and the instance never blocks on it.
async fn forward(stream: impl AsyncRead + Unpin, label: String, mut sink: impl Write) {
    let mut reader = BufReader::with_capacity(8 * 1024, stream);
    let mut line = Vec::new();
    let mut emit = |line: &mut Vec<u8>| {
        while matches!(line.last(), Some(b'\n' | b'\r')) {
            line.pop();
        }
        let text = format!("[{label}] {}\n", String::from_utf8_lossy(line));
        // One write per line: the queue keeps lines whole.
        let _ = sink.write_all(text.as_bytes());
        line.clear();
    };
    loop {
        let chunk = match reader.fill_buf().await {
            Ok([]) => break,
            Ok(chunk) => chunk,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let chunk = &chunk[..chunk.len().min(MAX_LINE - line.len())];
        let (taken, ends) = match chunk.iter().position(|&b| b == b'\n') {
            Some(at) => (at + 1, true),
            None => (chunk.len(), false),
        };
        line.extend_from_slice(&chunk[..taken]);
        reader.consume(taken);
        if ends || line.len() == MAX_LINE {
            emit(&mut line);
        }
    }
    if !line.is_empty() {
        emit(&mut line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A sink the test can read afterwards.
    #[derive(Clone, Default)]
    struct Collected(Arc<Mutex<Vec<u8>>>);

    impl Write for Collected {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn output_is_drained_whatever_the_instance_writes() {
        let (mut instance, pipe) = tokio::io::duplex(1024);
        let sink = Collected::default();
        let forwarding = tokio::spawn(forward(pipe, "echo/0".into(), sink.clone()));
        instance
            .write_all(b"first\n\xff\xfe not UTF-8\r\n")
            .await
            .unwrap();
        instance.write_all(&[b'x'; 40_000]).await.unwrap();
        instance
            .write_all(b"\nlast without a newline")
            .await
            .unwrap();
        drop(instance);
        tokio::time::timeout(Duration::from_secs(10), forwarding)
            .await
            .expect("forwarding ends with the pipe")
            .unwrap();
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "[echo/0] first");
        assert_eq!(lines[1], "[echo/0] \u{fffd}\u{fffd} not UTF-8");
        assert_eq!(lines.last(), Some(&"[echo/0] last without a newline"));
        let long = &lines[2..lines.len() - 1];
        assert!(
            long.len() >= 3,
            "a long line comes in pieces: {}",
            long.len()
        );
        let xs: usize = long
            .iter()
            .map(|l| {
                let body = l.strip_prefix("[echo/0] ").unwrap();
                assert!(body.len() <= MAX_LINE, "{}", body.len());
                body.len()
            })
            .sum();
        assert_eq!(xs, 40_000, "nothing is lost");
    }

    #[tokio::test]
    async fn a_second_request_cuts_the_grace_period_short() {
        use std::os::unix::process::ExitStatusExt;
        // An instance that ignores SIGTERM would hold the stop for the
        // whole grace period.
        let mut child = Command::new("sh")
            .args(["-c", "trap '' TERM; echo ready; read never"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // Waiting closes the child's stdin; hold it open here instead.
        let _stdin = child.stdin.take();
        let mut ready = BufReader::new(child.stdout.take().unwrap()).lines();
        assert_eq!(ready.next_line().await.unwrap().as_deref(), Some("ready"));
        let shutdown = Shutdown::new();
        shutdown.begin();
        let started = tokio::time::Instant::now();
        let second = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            shutdown.hurry();
        };
        tokio::join!(
            terminate(&mut child, Duration::from_secs(60), shutdown.hurried()),
            second
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        let status = child.try_wait().unwrap().expect("killed and reaped");
        assert_eq!(status.signal(), Some(9), "{status}");
    }
}
