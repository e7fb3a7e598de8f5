//! Running the tunnel as its program does: the relay threads, the routes,
//! the admin endpoint and the pid file; a SIGHUP reloads the configuration,
//! and the stop drains.
//!
//! [`bind`] takes from the system what the configuration names (listen
//! addresses, the access-log file) before anything runs, so that a taken
//! address or an unwritable file is a configuration error; [`run`] serves
//! on what it took until the stop. Under systemd, listen addresses may be
//! sockets it passed, and it hears READY=1 once every route listens,
//! RELOADING=1 then READY=1 around a reload, and STOPPING=1 at the stop.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use common::endpoint::{bind_listener, Endpoint};
use common::runtime::Flavor;
use common::settings::ListenAddr;
use common::systemd::notify;
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::access_log::AccessLog;
use crate::admin::Admin;
use crate::settings::{Protocol, Route, Settings, PROGRAM};
use crate::{explain_bind, ApplyError, Tunnel};

/// What the tunnel took from the system before serving.
#[derive(Debug)]
pub struct Bound {
    /// Each route's listeners, by the address the route names.
    pub listeners: HashMap<ListenAddr, TcpListener>,
    /// Each UDP route's sockets, by the address the route names (a TCP
    /// and a UDP route may name the same one).
    pub udp: HashMap<ListenAddr, tokio::net::UdpSocket>,
    /// The admin endpoint's address and listener, when one is configured.
    pub admin: Option<(ListenAddr, TcpListener)>,
    /// Where access-log lines go.
    pub log: AccessLog,
}

/// Opens the access-log file, binds every route's listen addresses and
/// the admin endpoint. The error says what to change: every route address
/// that cannot be bound at once, worded as a reload would word it.
/// Call it within a Tokio runtime.
///
/// Under socket activation, an address the service manager passed a
/// socket for is that socket (see `common::systemd::activation`); a
/// passed socket no route and not the admin endpoint names is reported.
pub fn bind(settings: &Settings, routes: &[Route]) -> anyhow::Result<Bound> {
    let log = match &settings.access_log {
        Some(path) => AccessLog::to_file(path.as_ref()).map_err(|e| {
            anyhow::anyhow!("cannot open access log {path}: {e}; check access_log or --access-log")
        })?,
        None => AccessLog::to_log(),
    }
    .log_empty(settings.log_empty_connections);
    let mut listeners = HashMap::new();
    let mut udp = HashMap::new();
    let mut errors = Vec::new();
    for route in routes {
        if route.protocol == Protocol::Udp {
            for addr in &route.listen {
                match crate::udp::bind(*addr) {
                    Ok(socket) => {
                        udp.insert(*addr, socket);
                    }
                    Err(e) => errors.push(explain_bind(
                        &format!("{} (udp)", route.name),
                        *addr,
                        &e,
                        &[],
                    )),
                }
            }
            continue;
        }
        for addr in &route.listen {
            if listeners.contains_key(addr) {
                // Shared by server name with an earlier route.
                continue;
            }
            match bind_listener(*addr) {
                Ok(listener) => {
                    listeners.insert(*addr, listener);
                }
                Err(e) => errors.push(explain_bind(&route.name, *addr, &e, &[])),
            }
        }
    }
    if !errors.is_empty() {
        return Err(ApplyError(errors).into());
    }
    let admin = match settings.admin {
        Some(addr) => {
            let endpoint = Endpoint {
                program: PROGRAM,
                name: "Admin",
                key: "admin",
                addr,
            };
            Some((addr, endpoint.bind()?))
        }
        None => None,
    };
    common::systemd::activation::report_unused();
    Ok(Bound {
        listeners,
        udp,
        admin,
        log,
    })
}

/// Serves `routes` under `settings` on what [`bind`] took, until `shutdown`
/// completes; then stops accepting and drains (a second SIGINT or SIGTERM
/// cuts the drain short, see `common::signal`).
///
/// On SIGHUP, `reconfigure` gives the configuration as it is now, and its
/// routes replace the running ones (see [`Tunnel::apply`]); when it fails,
/// or a new address cannot be bound, the running routes stay and the log
/// says why. Settings that apply only at start are kept, and named in the
/// log when they changed.
///
/// The error is one the tunnel cannot start with: the system refused a
/// relay thread or its runtime, or the SIGHUP handler.
pub async fn run<F, E>(
    settings: Settings,
    routes: Vec<Route>,
    bound: Bound,
    mut reconfigure: F,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()>
where
    F: FnMut() -> Result<(Settings, Vec<Route>), E>,
    E: fmt::Display,
{
    let Bound {
        listeners,
        udp,
        admin,
        log,
    } = bound;
    let mut hangup = signal(SignalKind::hangup()).context("cannot watch for SIGHUP")?;
    let workers = start_workers(settings.workers)?;
    let tunnel = Arc::new(Tunnel::with_workers(
        settings.shutdown_grace.0,
        log,
        workers,
    ));
    // Every address is bound already: nothing is left to fail.
    let mut serving = routes.len();
    tunnel.apply_sockets(routes, listeners, udp).await?;
    let admin_stop = CancellationToken::new();
    let admin_task = admin.map(|(addr, listener)| {
        // The bound address: with port 0 the configured one says nothing.
        let bound = listener
            .local_addr()
            .map_or_else(|_| addr.to_string(), |a| a.to_string());
        tracing::info!(admin = %bound, "serving /metrics, /healthz and /readyz");
        let admin = Admin::new(tunnel.clone(), common::signal::process().clone());
        let stop = admin_stop.clone();
        tokio::spawn(common::serve::serve(
            listener,
            admin.options(&settings),
            Arc::new(admin),
            async move { stop.cancelled().await },
        ))
    });
    let pid_file = settings.pid_file.as_deref().map(PidFile::write);
    notify::ready(&serving_status(serving));
    tokio::pin!(shutdown);
    let mut reloads = true;
    // Targets named `role/Endpoint` follow the topology: a change of it
    // makes the routes again, as a SIGHUP would.
    let followed = settings.topology.clone().filter(|_| settings.names_peers());
    let mut stamp = followed.as_deref().map(common::files::Stamp::of);
    loop {
        let topology_changed = async {
            match (&followed, &stamp) {
                (Some(file), Some(since)) => common::discovery::changed(file, since).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut shutdown => break,
            now = topology_changed => {
                stamp = Some(now);
                notify::reloading("the topology changed: making the routes again");
                let status = match reload(&mut reconfigure, &settings, &tunnel, "the topology changed").await {
                    Some(count) => {
                        serving = count;
                        serving_status(serving)
                    }
                    None => format!("{}; the last reload failed, see the log", serving_status(serving)),
                };
                notify::ready(&status);
            }
            // A signal stream that ended delivers nothing more: wait for
            // the shutdown alone rather than spin on it.
            got = hangup.recv(), if reloads => match got {
                Some(()) => {
                    notify::reloading("reloading the configuration");
                    let status = match reload(&mut reconfigure, &settings, &tunnel, "SIGHUP").await {
                        Some(count) => {
                            serving = count;
                            serving_status(serving)
                        }
                        None => format!("{}; the last reload failed, see the log", serving_status(serving)),
                    };
                    // The reload is over, whether it worked or not.
                    notify::ready(&status);
                }
                None => reloads = false,
            },
        }
    }
    notify::stopping(&format!(
        "stopping: letting {} connections finish",
        tunnel.connections()
    ));
    tunnel.shutdown().await;
    admin_stop.cancel();
    if let Some(task) = admin_task {
        let _ = task.await;
    }
    drop(pid_file);
    Ok(())
}

/// The relay threads' runtimes: this thread's, then `count - 1` threads
/// with a single-threaded runtime each; with one, none (connections stay
/// on this thread). `0` is one per core.
fn start_workers(count: usize) -> anyhow::Result<Vec<Handle>> {
    let count = if count == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        count
    };
    if count <= 1 {
        return Ok(Vec::new());
    }
    let others: anyhow::Result<Vec<Handle>> = (1..count)
        .map(|i| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name(format!("relay-{i}"))
                .spawn(
                    move || match common::runtime::start(Flavor::CurrentThread) {
                        Ok(runtime) => {
                            let _ = tx.send(Ok(runtime.handle().clone()));
                            runtime.block_on(std::future::pending::<()>());
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    },
                )
                .map_err(|e| anyhow::anyhow!("cannot start a relay thread: {e}"))?;
            Ok(rx
                .recv()
                .map_err(|_| anyhow::anyhow!("a relay thread ended as it started"))??)
        })
        .collect();
    Ok(std::iter::once(Handle::current()).chain(others?).collect())
}

/// The service manager's status line while `count` routes run.
fn serving_status(count: usize) -> String {
    match count {
        1 => "serving 1 route".into(),
        n => format!("serving {n} routes"),
    }
}

/// Applies the configuration as it is now; on any problem the running
/// routes stay as they are, and the answer is `None`, else how many
/// routes run now. Settings that only take effect at start are named in
/// the log when they changed.
async fn reload<F, E>(
    reconfigure: &mut F,
    first: &Settings,
    tunnel: &Tunnel,
    why: &str,
) -> Option<usize>
where
    F: FnMut() -> Result<(Settings, Vec<Route>), E>,
    E: fmt::Display,
{
    tracing::info!("{why}: reloading the configuration");
    let (settings, routes) = match reconfigure() {
        Ok(pair) => pair,
        Err(errors) => {
            tracing::error!("reload failed, the running configuration stays: {errors}");
            return None;
        }
    };
    let mut kept = Vec::new();
    if settings.admin != first.admin
        || settings.admin_allow != first.admin_allow
        || settings.admin_deny != first.admin_deny
    {
        kept.push("admin");
    }
    if settings.workers != first.workers {
        kept.push("workers");
    }
    if settings.access_log != first.access_log
        || settings.log_empty_connections != first.log_empty_connections
    {
        kept.push("access_log");
    }
    if settings.shutdown_grace != first.shutdown_grace {
        kept.push("shutdown_grace");
    }
    if settings.pid_file != first.pid_file {
        kept.push("pid_file");
    }
    if settings.log != first.log {
        kept.push("log_level/log_format");
    }
    if settings.instance != first.instance {
        kept.push("instance");
    }
    if settings.topology != first.topology {
        kept.push("topology");
    }
    if !kept.is_empty() {
        tracing::warn!(
            settings = %kept.join(", "),
            "these settings changed but apply only at start; restart the tunnel to use them (the running values stay)"
        );
    }
    let names: Vec<String> = routes.iter().map(|r| r.name.clone()).collect();
    match tunnel.apply(routes, HashMap::new()).await {
        Ok(()) => {
            tracing::info!(routes = ?names, "reloaded");
            Some(names.len())
        }
        Err(e) => {
            tracing::error!("reload failed, the running configuration stays: {e}");
            None
        }
    }
}

/// The pid file, removed again when dropped if it still holds this
/// process's id.
struct PidFile(Option<PathBuf>);

impl PidFile {
    /// Writes the pid to a new file beside `path` and renames it into
    /// place: a symlink planted at `path` is replaced, never followed, and
    /// a reader never sees a half-written file.
    fn write(path: &str) -> PidFile {
        let path = PathBuf::from(path);
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let written = tempfile::Builder::new()
            .prefix(".tunnel-pid")
            .tempfile_in(&dir)
            .and_then(|mut file| {
                use std::io::Write;
                writeln!(file, "{}", std::process::id())?;
                file.persist(&path).map_err(|e| e.error)
            });
        match written {
            Ok(_) => PidFile(Some(path)),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot write the pid file; check pid_file");
                PidFile(None)
            }
        }
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let Some(path) = &self.0 else { return };
        let ours = std::fs::read_to_string(path)
            .is_ok_and(|text| text.trim() == std::process::id().to_string());
        if ours {
            let _ = std::fs::remove_file(path);
        }
    }
}
