//! The fabric's control: it starts the definition's roles, then follows the
//! definition's file, applying each good edit as a difference.
//!
//! Every instance has a slot: its process (kept running by a supervisor),
//! its own address, and whether it is in rotation. The balancers' routes
//! and the topology are made from the slots in rotation, so a change is
//! always the same three steps: start what is new and wait until it
//! serves; publish (routes and topology) with the new in rotation and the
//! old out of it; drain the old (a pause for those that follow the
//! topology to see it, then SIGTERM, and the grace period for its
//! connections). No connection is refused or cut on the way: the balancer
//! keeps its listeners across a change, and a connection already on an
//! instance finishes there.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use common::discovery::{EndpointEntry, Topology};
use common::endpoint::{bind_error, bind_listener};
use common::files::Stamp;
use common::settings::ListenAddr;
use common::telemetry::NonBlocking;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tunnel::access_log::AccessLog;
use tunnel::{Route, Tunnel};

use super::{
    balancer_route, free_loopback_port, instance_environment, locate, wait_started, Board,
    EndpointLine, Instance, Options, RuntimeDir, Spawner, State, Supervisor,
};
use crate::definition::{Definition, Environment, Problems, Role, Severity, Visibility};

/// How long a drained instance stays up after it left the rotation
/// before it is told to stop: long enough for every program that follows
/// the topology (which looks at it every [`common::discovery::FOLLOW_EVERY`])
/// to stop choosing it.
const DRAIN_NOTICE: Duration = Duration::from_millis(1500);

/// How long a new instance may take to serve before a change gives up on
/// it (the old instances keep serving).
const READY_PATIENCE: Duration = Duration::from_secs(30);

/// One instance's place in the fabric.
#[derive(Debug)]
struct Slot {
    key: u64,
    /// Its number in the role (`echo-server_IN_<index>`).
    index: usize,
    addr: SocketAddr,
    /// Stops this instance alone.
    stop: CancellationToken,
    /// Whether the balancers and the topology give it connections.
    serving: bool,
    /// Keeps the port the instance's (see `free_loopback_port`).
    _port: socket2::Socket,
}

/// A role as it runs.
#[derive(Debug)]
struct RoleRun {
    role: Role,
    binary: PathBuf,
    slots: Vec<Slot>,
    /// Where a program that reloads on SIGHUP reads its settings.
    config: Option<PathBuf>,
}

/// What the fabric is running, and how to change it.
pub struct Fabric {
    definition: Definition,
    roles: Vec<RoleRun>,
    balancer: Tunnel,
    board: Board,
    spawner: Spawner,
    options: Options,
    stop: CancellationToken,
    now: CancellationToken,
    out: NonBlocking,
    err: NonBlocking,
    runtime: RuntimeDir,
    supervisors: TaskTracker,
    next_key: u64,
}

/// A settings key whose change a program applies only at start, so the
/// fabric replaces instances rather than signal them.
fn restart_needed(program: &str, old: &Role, new: &Role) -> bool {
    if old.program != new.program || old.allowed_callers() != new.allowed_callers() {
        return true;
    }
    let Some(start_only) = reload_keys(program) else {
        return old.settings != new.settings;
    };
    let keys = old.settings.keys().chain(new.settings.keys());
    keys.into_iter()
        .filter(|k| old.settings.get(*k) != new.settings.get(*k))
        .any(|k| start_only.contains(&k.as_str()))
}

/// For a program that reloads its settings on SIGHUP, the keys it reads
/// only at start; `None` for one that does not reload.
fn reload_keys(program: &str) -> Option<Vec<&'static str>> {
    (program == "tunnel").then(|| {
        let mut keys = tunnel::settings::START_ONLY.to_vec();
        // Kept in the instance's environment (see instance_environment).
        keys.push("accept_proxy");
        keys
    })
}

/// What a role's instances are started with, to tell whether a change
/// touches them.
fn same_instances(old: &Role, new: &Role) -> bool {
    old.program == new.program
        && old.settings == new.settings
        && old.allowed_callers() == new.allowed_callers()
}

/// What of a role's endpoints the fabric acts on (not where they are
/// written).
fn endpoint_shapes(role: &Role) -> Vec<(String, Visibility, u16, Option<Vec<&str>>)> {
    role.endpoints
        .iter()
        .map(|e| (e.name.clone(), e.visibility, e.port, e.allowed_roles()))
        .collect()
}

/// The endpoints of a role as they listen: `(name, address)`.
fn listen_addrs(role: &Role) -> Vec<(String, ListenAddr)> {
    role.endpoints
        .iter()
        .map(|e| {
            let ip = match e.visibility {
                Visibility::Public => [0, 0, 0, 0],
                Visibility::Internal => [127, 0, 0, 1],
            };
            (e.name.clone(), ListenAddr(SocketAddr::from((ip, e.port))))
        })
        .collect()
}

impl Fabric {
    /// Binds every endpoint (a port in use is reported before anything
    /// starts), writes the topology, starts every instance, and once they
    /// have started, the balancers.
    pub(super) async fn start(
        definition: &Definition,
        options: &Options,
        stop: CancellationToken,
        now: CancellationToken,
        out: NonBlocking,
        err: NonBlocking,
    ) -> anyhow::Result<Fabric> {
        let mut listeners = HashMap::new();
        let mut roles = Vec::new();
        for role in &definition.roles {
            let binary = locate(&options.programs, role.program().name)?;
            for (name, addr) in listen_addrs(role) {
                let listener = bind_listener(addr).map_err(|e| {
                    anyhow::anyhow!(bind_error(
                        &format!("{}/{name}", role.name),
                        addr,
                        &e,
                        "change its port in the service definition"
                    ))
                })?;
                listeners.insert(addr, listener);
            }
            roles.push(RoleRun {
                role: role.clone(),
                binary,
                slots: Vec::new(),
                config: None,
            });
        }
        let runtime = RuntimeDir::create()?;
        let spawner = Spawner::start().context("starting the instance spawner thread")?;
        let mut fabric = Fabric {
            definition: definition.clone(),
            roles,
            balancer: Tunnel::new(options.grace, AccessLog::to_log()),
            board: Board::new(),
            spawner,
            options: options.clone(),
            stop,
            now,
            out,
            err,
            runtime,
            supervisors: TaskTracker::new(),
            next_key: 0,
        };
        // Every instance's address is known before any starts, so the
        // first topology lists them all.
        let mut planned = Vec::new();
        for r in 0..fabric.roles.len() {
            fabric.write_config(r)?;
            for index in 0..fabric.roles[r].role.count() {
                planned.push((r, fabric.plan(r, index)?));
            }
        }
        for (_, slot) in &mut planned {
            slot.serving = true;
        }
        for (r, slot) in planned {
            fabric.roles[r].slots.push(slot);
        }
        let topology = fabric.topology_file();
        fabric
            .topology()
            .write(&topology)
            .with_context(|| format!("writing the topology to {}", topology.display()))?;
        tracing::info!(
            topology = %topology.display(),
            "topology written: a ROLE/Endpoint name is looked up there (--topology FILE; every instance has it in <PREFIX>_TOPOLOGY)"
        );
        // The status, for `deploy status` and for the checks of
        // `allow_from`, which need each instance's process as soon as it
        // has one.
        let (board, published, followed, stop) = (
            fabric.board.clone(),
            fabric.status_file(),
            options.follow.clone(),
            fabric.stop.clone(),
        );
        tokio::spawn(async move {
            let mut changes = board.changed.subscribe();
            loop {
                super::state::publish(
                    &published,
                    followed.as_deref(),
                    &board.snapshot(),
                    &board.endpoints(),
                );
                tokio::select! {
                    _ = stop.cancelled() => return,
                    changed = changes.changed() => if changed.is_err() { return },
                }
            }
        });
        for r in 0..fabric.roles.len() {
            for s in 0..fabric.roles[r].slots.len() {
                fabric.launch(r, s);
            }
        }
        fabric.board.set_endpoints(fabric.endpoint_lines());
        // Balance only once the instances listen, or the first health
        // checks would eject them all while they start (clients wait in
        // the backlog).
        wait_started(&fabric.board, &fabric.stop).await;
        if !fabric.stop.is_cancelled() {
            if let Err(e) = fabric.balancer.apply(fabric.routes(), listeners).await {
                fabric.stop().await;
                anyhow::bail!("{e}");
            }
        }
        Ok(fabric)
    }

    /// The status board, for the table and the published status.
    pub(super) fn board(&self) -> Board {
        self.board.clone()
    }

    /// Where the status is published for `deploy status`.
    pub(super) fn status_file(&self) -> PathBuf {
        self.runtime.0.join(super::state::STATUS_FILE)
    }

    fn topology_file(&self) -> PathBuf {
        self.runtime.0.join("topology.json")
    }

    /// Runs until the fabric stops, applying each change of the followed
    /// definition; the error that stopped it, if one did.
    pub(super) async fn follow_until_stopped(&mut self) -> Option<anyhow::Error> {
        let Some(path) = self.options.follow.clone() else {
            self.stop.cancelled().await;
            return None;
        };
        let mut seen = Stamp::of(&path);
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return None,
                _ = tokio::time::sleep(common::discovery::FOLLOW_EVERY) => {}
            }
            let now = Stamp::of(&path);
            if now == seen {
                continue;
            }
            seen = now;
            match load(&path) {
                Err(problems) => {
                    self.say(format_args!(
                        "the service definition {} changed but cannot be used; the fabric goes on with the one it runs:\n{problems}",
                        path.display()
                    ));
                }
                Ok((definition, warnings)) => {
                    for warning in &warnings.0 {
                        self.say(format_args!("{warning}"));
                    }
                    self.apply(definition).await;
                }
            }
        }
    }

    /// Stops everything: the balancers drain while the instances stop.
    pub(super) async fn stop(self) {
        self.stop.cancel();
        self.supervisors.close();
        let drain = async {
            tokio::select! {
                _ = self.balancer.shutdown() => {}
                _ = self.now.cancelled() => {}
            }
        };
        tokio::join!(drain, self.supervisors.wait());
    }

    /// A line on the fabric's output.
    fn say(&self, line: std::fmt::Arguments<'_>) {
        let mut out = self.out.clone();
        let _ = out.write_all(format!("deploy: {line}\n").as_bytes());
    }

    /// A slot for instance `index` of role `r`, on an address of its own,
    /// on the board as starting; not yet running, not yet serving.
    fn plan(&mut self, r: usize, index: usize) -> anyhow::Result<Slot> {
        let (addr, port) = free_loopback_port()?;
        let key = self.next_key;
        self.next_key += 1;
        let role = &self.roles[r].role;
        self.board.add(Instance {
            key,
            role: role.name.clone(),
            id: role.instance_id(index),
            addr,
            state: State::Starting,
            pid: None,
            restarts: 0,
            since: None,
        });
        Ok(Slot {
            key,
            index,
            addr,
            stop: self.stop.child_token(),
            serving: false,
            _port: port,
        })
    }

    /// Starts the process of slot `s` of role `r`, kept running until its
    /// own stop.
    fn launch(&self, r: usize, s: usize) {
        let run = &self.roles[r];
        let slot = &run.slots[s];
        let program = run.role.program();
        let supervisor = Supervisor {
            board: self.board.clone(),
            key: slot.key,
            label: format!("{}/{}", run.role.name, slot.index),
            id: run.role.instance_id(slot.index),
            prefix: program.prefix(),
            env: instance_environment(&program, &run.role, run.config.as_deref()),
            binary: run.binary.clone(),
            addr: slot.addr,
            topology: self.topology_file(),
            options: self.options.clone(),
            stop: slot.stop.clone(),
            now: self.now.clone(),
            spawner: self.spawner.clone(),
            out: self.out.clone(),
            err: self.err.clone(),
        };
        self.supervisors.spawn(supervisor.run());
    }

    /// For a program that reloads on SIGHUP, writes role `r`'s settings to
    /// the file its instances read.
    fn write_config(&mut self, r: usize) -> anyhow::Result<()> {
        let run = &mut self.roles[r];
        if reload_keys(&run.role.program).is_none() {
            run.config = None;
            return Ok(());
        }
        let path = self.runtime.0.join(format!("{}.yaml", run.role.name));
        // JSON is YAML: the settings as the definition wrote them, without
        // the trusted networks (kept in the environment).
        let settings: BTreeMap<&String, &serde_json::Value> = run
            .role
            .settings
            .iter()
            .filter(|(k, _)| k.as_str() != "accept_proxy")
            .collect();
        let text = serde_json::to_vec_pretty(&settings)?;
        common::files::write_atomically(&path, &text)
            .with_context(|| format!("writing {}", path.display()))?;
        run.config = Some(path);
        Ok(())
    }

    /// The balancers' routes: each endpoint over its role's instances in
    /// rotation.
    fn routes(&self) -> Vec<Route> {
        let mut routes = Vec::new();
        for run in &self.roles {
            let targets: Vec<tunnel::Target> = run
                .slots
                .iter()
                .filter(|s| s.serving)
                .map(|s| tunnel::Target {
                    host: s.addr.ip().to_string(),
                    port: s.addr.port(),
                })
                .collect();
            for (name, addr) in listen_addrs(&run.role) {
                routes.push(balancer_route(
                    &run.role,
                    &name,
                    addr,
                    targets.clone(),
                    &self.status_file(),
                ));
            }
        }
        routes
    }

    /// Each endpoint's balanced address (on loopback) and its role's
    /// instances in rotation.
    fn topology(&self) -> Topology {
        let mut topology = Topology::default();
        for run in &self.roles {
            let endpoints = topology.roles.entry(run.role.name.clone()).or_default();
            for endpoint in &run.role.endpoints {
                endpoints.insert(
                    endpoint.name.clone(),
                    EndpointEntry {
                        address: SocketAddr::from(([127, 0, 0, 1], endpoint.port)).to_string(),
                        instances: Some(
                            run.slots
                                .iter()
                                .filter(|s| s.serving)
                                .map(|s| common::discovery::Instance {
                                    id: run.role.instance_id(s.index),
                                    addr: s.addr,
                                })
                                .collect(),
                        ),
                        // Instances trust loopback to name the client.
                        proxy: Some(common::proxy::Version::V2),
                    },
                );
            }
        }
        topology
    }

    fn endpoint_lines(&self) -> Vec<EndpointLine> {
        let mut lines = Vec::new();
        for run in &self.roles {
            for (endpoint, (name, addr)) in run.role.endpoints.iter().zip(listen_addrs(&run.role)) {
                let visibility = match endpoint.visibility {
                    Visibility::Public => "public",
                    Visibility::Internal => "internal",
                };
                lines.push(EndpointLine {
                    text: format!(
                        "{visibility} endpoint {}/{name} on {}",
                        run.role.name, addr.0
                    ),
                    role: run.role.name.clone(),
                    endpoint: name,
                    visibility,
                    address: addr.0,
                });
            }
        }
        lines
    }

    /// Makes the slots in rotation, and the endpoints, what the balancers
    /// and the topology say. `bound`: listeners for new endpoints.
    async fn publish(&self, bound: HashMap<ListenAddr, TcpListener>) -> Result<(), String> {
        self.balancer
            .apply(self.routes(), bound)
            .await
            .map_err(|e| e.to_string())?;
        let path = self.topology_file();
        self.topology()
            .write(&path)
            .map_err(|e| format!("cannot write the topology to {}: {e}", path.display()))?;
        self.board.set_endpoints(self.endpoint_lines());
        Ok(())
    }

    /// Waits until the instance of `key` serves; false when it does not
    /// within [`READY_PATIENCE`] or the fabric stops.
    async fn serving(&self, key: u64) -> bool {
        let mut changes = self.board.changed.subscribe();
        let ready = async {
            loop {
                match self.board.get(key).map(|i| i.state) {
                    Some(State::Running) => return true,
                    None | Some(State::Stopped) => return false,
                    _ => {}
                }
                if changes.changed().await.is_err() {
                    return false;
                }
            }
        };
        tokio::select! {
            ready = tokio::time::timeout(READY_PATIENCE, ready) => ready.unwrap_or(false),
            _ = self.stop.cancelled() => false,
        }
    }

    /// Takes the slots of `keys` out of rotation, tells the others, then
    /// stops them, and waits until they have stopped (each within the
    /// grace period for its connections).
    async fn drain(&mut self, keys: &[u64]) {
        if keys.is_empty() {
            return;
        }
        for run in &mut self.roles {
            for slot in &mut run.slots {
                if keys.contains(&slot.key) {
                    slot.serving = false;
                }
            }
        }
        if let Err(e) = self.publish(HashMap::new()).await {
            self.say(format_args!("{e}"));
        }
        for key in keys {
            self.board.update(*key, |i| {
                if i.state != State::Stopped {
                    i.state = State::Draining
                }
            });
        }
        tokio::select! {
            _ = tokio::time::sleep(DRAIN_NOTICE) => {}
            _ = self.stop.cancelled() => {}
        }
        let mut changes = self.board.changed.subscribe();
        for run in &self.roles {
            for slot in &run.slots {
                if keys.contains(&slot.key) {
                    slot.stop.cancel();
                }
            }
        }
        let stopped = || {
            keys.iter()
                .all(|k| self.board.get(*k).is_none_or(|i| i.state == State::Stopped))
        };
        // The supervisor waits the grace period, then kills.
        let bound = self.options.grace + Duration::from_secs(10);
        let _ = tokio::time::timeout(bound, async {
            while !stopped() {
                if changes.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
        for run in &mut self.roles {
            run.slots.retain(|s| !keys.contains(&s.key));
        }
        for key in keys {
            self.board.remove(*key);
        }
    }

    /// Starts instances `indexes` of role `r` and waits until they serve;
    /// the keys of those that do, after stopping those that do not.
    async fn add(&mut self, r: usize, indexes: &[usize]) -> Result<Vec<u64>, String> {
        let mut keys = Vec::new();
        for &index in indexes {
            let slot = self.plan(r, index).map_err(|e| format!("{e:#}"))?;
            keys.push(slot.key);
            self.roles[r].slots.push(slot);
            let s = self.roles[r].slots.len() - 1;
            self.launch(r, s);
        }
        let mut failed = Vec::new();
        for &key in &keys {
            if !self.serving(key).await {
                failed.push(key);
            }
        }
        if !failed.is_empty() {
            let ids: Vec<String> = failed
                .iter()
                .filter_map(|k| self.board.get(*k).map(|i| i.id))
                .collect();
            self.drain(&failed).await;
            return Err(format!(
                "{} did not start serving within {READY_PATIENCE:?} (see its output above)",
                ids.join(", ")
            ));
        }
        for run in &mut self.roles {
            for slot in &mut run.slots {
                if keys.contains(&slot.key) {
                    slot.serving = true;
                }
            }
        }
        Ok(keys)
    }

    /// Applies `new` as the difference from what runs.
    async fn apply(&mut self, new: Definition) {
        // New endpoints are bound first: a port in use leaves everything
        // as it is.
        let held: Vec<ListenAddr> = self
            .roles
            .iter()
            .flat_map(|r| listen_addrs(&r.role))
            .map(|(_, a)| a)
            .collect();
        let mut bound = HashMap::new();
        for role in &new.roles {
            for (name, addr) in listen_addrs(role) {
                if held.contains(&addr) || bound.contains_key(&addr) {
                    continue;
                }
                match bind_listener(addr) {
                    Ok(listener) => {
                        bound.insert(addr, listener);
                    }
                    Err(e) => {
                        self.say(format_args!(
                            "the change cannot be applied; the fabric goes on with the definition it runs: {}",
                            bind_error(
                                &format!("{}/{name}", role.name),
                                addr,
                                &e,
                                "change its port in the service definition"
                            )
                        ));
                        return;
                    }
                }
            }
        }
        let binaries: Result<Vec<PathBuf>, _> = new
            .roles
            .iter()
            .map(|r| locate(&self.options.programs, r.program().name))
            .collect();
        let binaries = match binaries {
            Ok(b) => b,
            Err(e) => {
                self.say(format_args!(
                    "the change cannot be applied; the fabric goes on with the definition it runs: {e:#}"
                ));
                return;
            }
        };
        let mut changed = false;

        // Roles that are gone: out of the balancers and the topology, then
        // drained.
        let gone: Vec<String> = self
            .roles
            .iter()
            .map(|r| r.role.name.clone())
            .filter(|name| !new.roles.iter().any(|r| r.name == *name))
            .collect();
        for name in gone {
            changed = true;
            let r = self.role_index(&name).expect("a running role");
            let keys: Vec<u64> = self.roles[r].slots.iter().map(|s| s.key).collect();
            self.say(format_args!(
                "role {name} removed: its endpoints close and its {} instances drain",
                keys.len()
            ));
            self.roles[r].role.endpoints.clear();
            self.drain(&keys).await;
            self.roles.remove(r);
            let _ = std::fs::remove_file(self.runtime.0.join(format!("{name}.yaml")));
        }

        for (role, binary) in new.roles.iter().zip(binaries) {
            if self.stop.is_cancelled() {
                return;
            }
            match self.role_index(&role.name) {
                None => {
                    changed = true;
                    self.say(format_args!(
                        "role {} added: starting {} instances of {}",
                        role.name,
                        role.count(),
                        role.program
                    ));
                    self.roles.push(RoleRun {
                        role: role.clone(),
                        binary,
                        slots: Vec::new(),
                        config: None,
                    });
                    let r = self.roles.len() - 1;
                    // Its endpoints open once its instances serve.
                    let endpoints = std::mem::take(&mut self.roles[r].role.endpoints);
                    if let Err(e) = self.write_config(r) {
                        self.say(format_args!("role {}: {e:#}", role.name));
                    }
                    let indexes: Vec<usize> = (0..role.count()).collect();
                    if let Err(e) = self.add(r, &indexes).await {
                        self.say(format_args!("role {}: {e}", role.name));
                    }
                    self.roles[r].role.endpoints = endpoints;
                    self.published(&mut bound).await;
                }
                Some(r) => {
                    if self.change_role(r, role, binary, &mut bound).await {
                        changed = true;
                    }
                }
            }
        }
        // The roles in the new definition's order.
        self.roles.sort_by_key(|run| {
            new.roles
                .iter()
                .position(|r| r.name == run.role.name)
                .unwrap_or(usize::MAX)
        });
        if changed {
            self.say(format_args!("the definition's changes are applied"));
        } else {
            self.say(format_args!(
                "the service definition changed, but nothing the fabric runs"
            ));
        }
        self.definition = new;
    }

    /// Publishes, reporting a failure.
    async fn published(&mut self, bound: &mut HashMap<ListenAddr, TcpListener>) {
        if let Err(e) = self.publish(std::mem::take(bound)).await {
            self.say(format_args!("{e}"));
        }
    }

    fn role_index(&self, name: &str) -> Option<usize> {
        self.roles.iter().position(|r| r.role.name == name)
    }

    /// Applies the changes of one role; whether there were any.
    async fn change_role(
        &mut self,
        r: usize,
        new: &Role,
        binary: PathBuf,
        bound: &mut HashMap<ListenAddr, TcpListener>,
    ) -> bool {
        let old = self.roles[r].role.clone();
        let name = new.name.clone();
        let mut changed = false;

        // Endpoints: the balancers follow at the next publish.
        let before = listen_addrs(&old);
        let after = listen_addrs(new);
        if before != after || endpoint_shapes(&old) != endpoint_shapes(new) {
            changed = true;
            for (endpoint, addr) in &after {
                if !before.contains(&(endpoint.clone(), *addr)) {
                    self.say(format_args!(
                        "endpoint {name}/{endpoint} opens on {}",
                        addr.0
                    ));
                }
            }
            for (endpoint, addr) in &before {
                if !after.contains(&(endpoint.clone(), *addr)) {
                    self.say(format_args!(
                        "endpoint {name}/{endpoint} on {} closes",
                        addr.0
                    ));
                }
            }
            self.roles[r].role.endpoints = new.endpoints.clone();
            self.published(bound).await;
        }

        // Fewer instances: the highest numbers drain first, before any
        // replacement, so none is replaced only to be removed.
        let count = new.count();
        let extra: Vec<u64> = self.roles[r]
            .slots
            .iter()
            .filter(|s| s.index >= count)
            .map(|s| s.key)
            .collect();
        if !extra.is_empty() {
            changed = true;
            self.say(format_args!(
                "role {name}: {} -> {count} instances: draining {}",
                old.count(),
                self.ids(&extra)
            ));
            self.drain(&extra).await;
        }

        // Settings (or the program): a reload, or a rolling replacement.
        if !same_instances(&old, new) {
            changed = true;
            let restart = restart_needed(&old.program, &old, new);
            let mut keys: Vec<String> = old
                .settings
                .keys()
                .chain(new.settings.keys())
                .filter(|k| old.settings.get(*k) != new.settings.get(*k))
                .cloned()
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            if keys.is_empty() {
                keys.push("allow_from".into());
            }
            self.roles[r].role.settings = new.settings.clone();
            self.roles[r].role.program = new.program.clone();
            self.roles[r].binary = binary;
            if let Err(e) = self.write_config(r) {
                self.say(format_args!("role {name}: {e:#}"));
            }
            if restart {
                self.say(format_args!(
                    "role {name}: {} changed: replacing its instances one at a time",
                    keys.join(", ")
                ));
                self.roll(r).await;
            } else {
                self.reload(r, &keys);
            }
        }

        // More instances: started with the role's settings as they are now.
        let have = self.roles[r].slots.len();
        if count > have {
            changed = true;
            let indexes: Vec<usize> = (0..count)
                .filter(|i| !self.roles[r].slots.iter().any(|s| s.index == *i))
                .collect();
            let ids: Vec<String> = indexes.iter().map(|i| new.instance_id(*i)).collect();
            self.say(format_args!(
                "role {name}: {have} -> {count} instances: starting {}",
                ids.join(", ")
            ));
            if let Err(e) = self.add(r, &indexes).await {
                self.say(format_args!("role {name}: {e}"));
            }
            self.published(bound).await;
        }
        self.roles[r].role = new.clone();
        changed
    }

    fn ids(&self, keys: &[u64]) -> String {
        keys.iter()
            .filter_map(|k| self.board.get(*k).map(|i| i.id))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Sends SIGHUP to every running instance of role `r`, which reads its
    /// settings file again.
    fn reload(&self, r: usize, keys: &[String]) {
        let run = &self.roles[r];
        let pids: Vec<u32> = run
            .slots
            .iter()
            .filter_map(|s| self.board.get(s.key).and_then(|i| i.pid))
            .collect();
        self.say(format_args!(
            "role {}: {} changed: reloading its {} instances (SIGHUP)",
            run.role.name,
            keys.join(", "),
            pids.len()
        ));
        for pid in pids {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGHUP,
                );
            }
        }
    }

    /// Replaces role `r`'s instances one at a time: a new one on a new
    /// address, serving before the old one drains. A new one that does not
    /// serve stops the roll; the old ones left keep serving.
    async fn roll(&mut self, r: usize) {
        let old: Vec<(u64, usize)> = self.roles[r]
            .slots
            .iter()
            .map(|s| (s.key, s.index))
            .collect();
        for (key, index) in old {
            if self.stop.is_cancelled() {
                return;
            }
            match self.add(r, &[index]).await {
                Ok(new) => {
                    let id = self.ids(&new);
                    self.say(format_args!("the new {id} serves; the old one drains"));
                    self.drain(&[key]).await;
                }
                Err(e) => {
                    self.say(format_args!(
                        "role {}: {e}; the replacement stops here, the instances left keep their settings",
                        self.roles[r].role.name
                    ));
                    return;
                }
            }
        }
    }
}

/// Reads and checks the definition in `path` as `deploy run` does: its
/// errors, or the definition as it runs here and its warnings.
pub fn load(path: &Path) -> Result<(Definition, Problems), Problems> {
    let definition = Definition::load(path)?;
    let found = definition.findings(Environment::Local);
    if found.iter().any(|p| p.severity == Severity::Error) {
        return Err(Problems(found));
    }
    Ok((
        definition.in_environment(Environment::Local),
        Problems(found),
    ))
}
