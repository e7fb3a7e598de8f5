//! The local development fabric: every role's instances on one machine,
//! each public (or internal) endpoint fronted by the tunnel's balancer.
//!
//! Instances listen on loopback ports of their own and know who they are
//! (`<PREFIX>_INSTANCE`). The balancer sends each new connection to a live
//! instance, retrying the next one when a connect fails and ejecting dead
//! ones with active health checks. A crashed instance is started again with
//! exponential backoff. Every instance's output is prefixed with its role
//! and index, and a status table is printed at start and whenever an
//! instance changes state. On Ctrl-C or SIGTERM the balancers drain, the
//! instances get SIGTERM (SIGKILL after the grace period), and nothing is
//! left running.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use common::settings::{AccessList, ListenAddr, Seconds};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tunnel::access_log::AccessLog;
use tunnel::balance::{HealthCheck, Policy};
use tunnel::settings::Keepalive;
use tunnel::{Route, Tunnel};

use crate::definition::{Definition, Role, Visibility};

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
}

impl Default for Options {
    fn default() -> Self {
        Options {
            programs: PathBuf::from("."),
            grace: Duration::from_secs(10),
            backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(10),
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
    /// Stopped by the fabric.
    Stopped,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            State::Starting => f.write_str("starting"),
            State::Running => f.write_str("running"),
            State::Crashed(why) => write!(f, "crashed ({why})"),
            State::Stopped => f.write_str("stopped"),
        }
    }
}

/// One instance as the status table shows it.
#[derive(Debug, Clone)]
pub struct Instance {
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
}

/// The fabric's instances, shared between supervisors and the table.
#[derive(Debug, Clone)]
struct Board {
    instances: Arc<Mutex<Vec<Instance>>>,
    changed: watch::Sender<u64>,
}

impl Board {
    fn update(&self, index: usize, change: impl FnOnce(&mut Instance)) {
        change(&mut self.instances.lock().expect("board lock")[index]);
        self.changed.send_modify(|n| *n += 1);
    }

    fn snapshot(&self) -> Vec<Instance> {
        self.instances.lock().expect("board lock").clone()
    }
}

/// The status table.
pub fn table(instances: &[Instance], endpoints: &[String]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:<22} {:<24} {:>8}  {:<16} {:>8}",
        "ROLE", "INSTANCE", "STATE", "PID", "ADDRESS", "RESTARTS"
    );
    for i in instances {
        let pid = i.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:<16} {:<22} {:<24} {:>8}  {:<16} {:>8}",
            i.role,
            i.id,
            i.state.to_string(),
            pid,
            i.addr.to_string(),
            i.restarts
        );
    }
    for e in endpoints {
        let _ = writeln!(out, "{e}");
    }
    out
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

fn free_loopback_port() -> anyhow::Result<SocketAddr> {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").context("picking a loopback port")?;
    Ok(socket.local_addr()?)
}

/// Runs the fabric for `definition` until `shutdown` completes, then stops
/// everything.
pub async fn run(
    definition: &Definition,
    options: &Options,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    // Bind every endpoint first: a port in use is reported before anything
    // starts.
    let mut listeners = HashMap::new();
    let mut routes = Vec::new();
    let mut endpoint_lines = Vec::new();
    let mut instances = Vec::new();
    let mut plans = Vec::new();
    for role in &definition.roles {
        let program = role.program();
        let binary = locate(&options.programs, program.name)?;
        let mut targets = Vec::new();
        for index in 0..role.count() {
            let addr = free_loopback_port()?;
            targets.push(addr.to_string().parse().expect("an address is a target"));
            instances.push(Instance {
                role: role.name.clone(),
                id: role.instance_id(index),
                addr,
                state: State::Starting,
                pid: None,
                restarts: 0,
            });
            plans.push((role.clone(), index, binary.clone(), addr));
        }
        for endpoint in &role.endpoints {
            let ip = match endpoint.visibility {
                Visibility::Public => [0, 0, 0, 0],
                Visibility::Internal => [127, 0, 0, 1],
            };
            let addr = ListenAddr(SocketAddr::from((ip, endpoint.port)));
            let listener = common::endpoint::bind_listener(addr).map_err(|e| {
                anyhow::anyhow!(
                    "cannot listen on {addr} for {}/{}: {e}; change its port in the service definition",
                    role.name,
                    endpoint.name
                )
            })?;
            let listen = listener.local_addr()?;
            listeners.insert(addr, listener);
            endpoint_lines.push(format!(
                "{} endpoint {}/{} on {listen} -> {} instances",
                match endpoint.visibility {
                    Visibility::Public => "public",
                    Visibility::Internal => "internal",
                },
                role.name,
                endpoint.name,
                role.count()
            ));
            routes.push(balancer_route(role, &endpoint.name, addr, targets.clone()));
        }
    }

    let (changed, mut watch_changes) = watch::channel(0u64);
    let board = Board {
        instances: Arc::new(Mutex::new(instances)),
        changed,
    };
    let stop = CancellationToken::new();
    let supervisors = TaskTracker::new();
    for (index, (role, instance, binary, addr)) in plans.into_iter().enumerate() {
        supervisors.spawn(supervise(
            board.clone(),
            index,
            role,
            instance,
            binary,
            addr,
            options.clone(),
            stop.clone(),
        ));
    }
    supervisors.close();

    // Balance only once the instances listen, or the first health checks
    // would eject them all while they start (clients wait in the backlog).
    let mut started = board.changed.subscribe();
    let all_started = async {
        while board.snapshot().iter().any(|i| i.state == State::Starting) {
            if started.changed().await.is_err() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(30), all_started).await;
    let balancer = Tunnel::new(options.grace, AccessLog::to_log());
    balancer
        .apply(routes, listeners)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;

    // The table: once everything has started, then on every change.
    let table_board = board.clone();
    let table_stop = stop.clone();
    let printer = tokio::spawn(async move {
        let started = async {
            loop {
                if table_board
                    .snapshot()
                    .iter()
                    .all(|i| i.state != State::Starting)
                {
                    break;
                }
                if watch_changes.changed().await.is_err() {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(30), started).await;
        loop {
            print!("{}", table(&table_board.snapshot(), &endpoint_lines));
            tokio::select! {
                _ = table_stop.cancelled() => return,
                changed = watch_changes.changed() => if changed.is_err() { return },
            }
            // Several changes at once make one table.
            tokio::time::sleep(Duration::from_millis(100)).await;
            watch_changes.borrow_and_update();
        }
    });

    shutdown.await;
    tracing::info!("stopping: draining the balancers, then the instances");
    stop.cancel();
    let _ = printer.await;
    tokio::join!(balancer.shutdown(), supervisors.wait());
    print!("{}", table(&board.snapshot(), &[]));
    Ok(())
}

fn balancer_route(
    role: &Role,
    endpoint: &str,
    listen: ListenAddr,
    targets: Vec<tunnel::Target>,
) -> Route {
    Route {
        name: format!("{}/{endpoint}", role.name),
        listen: vec![listen],
        targets,
        balance: Policy::RoundRobin,
        // Instances are local: check every second and act on the first
        // failure (a refused connect ejects at once, between checks too).
        health: HealthCheck {
            interval: Seconds::from_secs(1),
            timeout: Seconds::from_millis(500),
            rise: 1,
            fall: 1,
        },
        checks: true,
        access: vec![AccessList::default()],
        connect_timeout: Seconds::from_secs(2),
        idle_timeout: Seconds::from_secs(3600),
        keepalive: Keepalive::Default,
        max_connections: 10_000,
    }
}

/// Keeps one instance running until `stop`, starting it again after a
/// crash with exponential backoff.
#[allow(clippy::too_many_arguments)]
async fn supervise(
    board: Board,
    index: usize,
    role: Role,
    instance: usize,
    binary: PathBuf,
    addr: SocketAddr,
    options: Options,
    stop: CancellationToken,
) {
    let program = role.program();
    let label = format!("{}/{instance}", role.name);
    let mut backoff = options.backoff;
    loop {
        let mut command = Command::new(&binary);
        command
            .envs(program.environment(&role.settings))
            .env(format!("{}LISTEN", program.prefix()), addr.to_string())
            .env(
                format!("{}INSTANCE", program.prefix()),
                role.instance_id(instance),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: Ctrl-C reaches the fabric, which then
            // stops the instances in order.
            .process_group(0)
            .kill_on_drop(true);
        let started = tokio::time::Instant::now();
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
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
        });
        if let Some(out) = child.stdout.take() {
            tokio::spawn(forward(out, label.clone(), false));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(forward(err, label.clone(), true));
        }
        let ready = wait_ready(addr, &mut child);
        tokio::select! {
            _ = ready => board.update(index, |i| if i.state == State::Starting { i.state = State::Running }),
            _ = stop.cancelled() => {}
        }
        let status = tokio::select! {
            status = child.wait() => status,
            _ = stop.cancelled() => {
                terminate(&mut child, options.grace).await;
                board.update(index, |i| { i.state = State::Stopped; i.pid = None; });
                return;
            }
        };
        let why = match status {
            Ok(s) => s.to_string(),
            Err(e) => e.to_string(),
        };
        tracing::warn!(instance = %role.instance_id(instance), status = %why, "instance exited; starting it again");
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

/// Sleeps unless stopped first; false when stopped.
async fn pause(stop: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// Completes once the instance accepts connections (or has exited).
async fn wait_ready(addr: SocketAddr, child: &mut Child) {
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// SIGTERM, then SIGKILL after `grace`.
async fn terminate(child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

/// Copies an instance's output line by line, each line prefixed with the
/// instance.
async fn forward(stream: impl AsyncRead + Unpin, label: String, to_stderr: bool) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if to_stderr {
            eprintln!("[{label}] {line}");
        } else {
            println!("[{label}] {line}");
        }
    }
}
