//! `tunnel`: forwards TCP connections to a target, or many routes from a
//! configuration file; SIGHUP reloads it, SIGTERM drains.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use common::cli::{parse_args, runtime, sources, CommonArgs, ServeArgs, EXIT_CONFIG, EXIT_FAILED};
use common::config::{env_var, resolve, ConfigError, ConfigErrors, Converted, Origin, Resolved};
use common::endpoint::Endpoint;
use common::runtime::Flavor;
use serde::Serialize;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tunnel::access_log::AccessLog;
use tunnel::admin::Admin;
use tunnel::settings::{Route, Settings, PROGRAM};
use tunnel::{rinetd, Tunnel};

// An idle connection is a handful of small allocations, two of them
// cache-line aligned (tokio's readiness slots); mimalloc packs those far
// tighter than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Forward TCP connections to a target behind a firewall.
///
/// Quick form: `tunnel --listen 0.0.0.0:1001 --target db.internal:5432`, or
/// set TUNNEL_HOST and TUNNEL_PORT. Many routes: `--config FILE` (YAML) or
/// rinetd's own format with `--rinetd-conf FILE`. Every setting can also come
/// from a TUNNEL_* environment variable. SIGHUP reloads the configuration;
/// SIGTERM or Ctrl-C stops accepting and lets connections finish.
#[derive(Debug, Parser, Serialize)]
#[command(version, about, long_about)]
struct Args {
    /// Address(es) to listen on, IP:PORT [default: 0.0.0.0:1001]
    #[arg(long, value_name = "ADDR", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    listen: Vec<String>,

    /// Where to forward connections, HOST:PORT; several, comma-separated, are balanced (or TUNNEL_HOST and TUNNEL_PORT)
    #[arg(long, value_name = "HOST:PORT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<String>,

    /// How several targets share connections: round-robin, least-connections, first-available
    #[arg(long, value_name = "POLICY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    balance: Option<String>,

    /// Serve /metrics (Prometheus), /healthz and /readyz on this address [default: off]
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    admin: Option<String>,

    /// Read rinetd's configuration format instead of YAML
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    #[serde(skip)]
    rinetd_conf: Option<PathBuf>,

    /// Also append one line per connection to this file
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    access_log: Option<String>,

    /// How long to wait for the target to accept [default: 5s]
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    connect_timeout: Option<String>,

    #[command(flatten)]
    #[serde(flatten)]
    serve: ServeArgs,

    #[command(flatten)]
    #[serde(flatten)]
    common: CommonArgs,
}

/// Reads the settings and the routes they make, every problem at once. A
/// rinetd.conf is one layer of the same pipeline as a YAML file: the
/// environment and the flags apply over it.
fn configure(args: &Args) -> Result<(Resolved<Settings>, Vec<Route>), ConfigErrors> {
    let mut sources = sources(PROGRAM, &args.common, args);
    if let Some(path) = &args.rinetd_conf {
        if let Some(yaml) = &sources.file {
            return Err(ConfigErrors::single(
                None,
                format!(
                    "both --rinetd-conf {} and the YAML configuration {} (from --config or TUNNEL_CONFIG) are given; use one",
                    path.display(),
                    yaml.display()
                ),
            ));
        }
        let from_rinetd = rinetd::read(path)?;
        // rinetd has no quick-form listen address: leave it out so that a
        // --listen beside the file is reported, not taken from the file.
        sources.converted = Some(Converted::changed(path, &from_rinetd, &["listen"])?);
    }
    let resolved = resolve::<Settings, _>(&sources)?;
    let mut errors = Vec::new();
    if !resolved.settings.routes.is_empty() {
        if let Some(origin) = resolved.origin("listen").filter(|o| *o != Origin::Default) {
            errors.push(ConfigError {
                key: "listen".into(),
                value: Some(format!("{:?}", resolved.settings.listen.0.iter().map(ToString::to_string).collect::<Vec<_>>())),
                origin: Some(origin),
                message: "is the quick form's listen address, and routes are configured; give each route its own listen addresses".into(),
            });
        }
    }
    match resolved.settings.routes() {
        Ok(routes) if errors.is_empty() => Ok((resolved, routes)),
        Ok(_) => Err(ConfigErrors(errors)),
        Err(found) => {
            // A missing port while TUNNEL_PORT holds Kubernetes' Service
            // link (left out, as it is not a port number) needs saying.
            let port_var = env_var(PROGRAM, "port");
            let link = resolved
                .service_links()
                .contains(&port_var)
                .then(|| std::env::var(&port_var).ok())
                .flatten();
            // Point at where the route's values were written.
            errors.extend(found.into_iter().map(|mut e| {
                if let (Some(link), "port") = (&link, e.key.as_str()) {
                    e.message.push_str(&format!(
                        " ({port_var}={link} is the Service link Kubernetes sets for a Service named {PROGRAM}, not a port number, and is ignored)"
                    ));
                }
                if e.origin.is_none() {
                    e.origin = resolved.origin(&e.key).or_else(|| {
                        e.key
                            .rsplit_once('.')
                            .and_then(|(parent, _)| resolved.origin(parent))
                    });
                }
                e
            }));
            Err(ConfigErrors(errors))
        }
    }
}

fn main() -> ExitCode {
    let args = match parse_args::<Args>() {
        Ok(args) => args,
        Err(code) => return code,
    };
    let (resolved, routes) = match configure(&args) {
        Ok(pair) => pair,
        Err(errors) => {
            common::telemetry::say(format_args!("{PROGRAM}: {errors}"));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.common.print_config {
        if args.rinetd_conf.is_some() {
            // The YAML a rinetd user would write instead, without the
            // settings left empty.
            let mut yaml = serde_yaml::to_value(&resolved.settings).unwrap_or_default();
            prune(&mut yaml);
            common::telemetry::show(serde_yaml::to_string(&yaml).unwrap_or_default());
        } else {
            common::telemetry::show(resolved.describe());
        }
        return ExitCode::SUCCESS;
    }
    let settings = resolved.settings;
    let _log = common::telemetry::init(&settings.log);
    let log = match &settings.access_log {
        Some(path) => match AccessLog::to_file(path.as_ref()) {
            Ok(log) => log,
            Err(e) => {
                common::telemetry::say(format_args!("{PROGRAM}: cannot open access log {path}: {e}; check access_log or --access-log"));
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => AccessLog::to_log(),
    }
    .log_empty(settings.log_empty_connections);
    let runtime = match runtime(PROGRAM, Flavor::CurrentThread) {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    runtime.block_on(serve(args, settings, routes, log))
}

/// Threads with a single-threaded runtime each, for the connections; with
/// one worker, connections stay on the main thread.
fn start_workers(count: usize) -> anyhow::Result<Vec<tokio::runtime::Handle>> {
    let count = if count == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        count
    };
    if count <= 1 {
        return Ok(Vec::new());
    }
    (0..count)
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
        .collect()
}

/// Drops nulls and empty lists and maps, recursively.
fn prune(value: &mut serde_yaml::Value) {
    use serde_yaml::Value;
    let empty = |v: &Value| match v {
        Value::Null => true,
        Value::Sequence(s) => s.is_empty(),
        Value::Mapping(m) => m.is_empty(),
        _ => false,
    };
    match value {
        Value::Mapping(map) => {
            for (_, v) in map.iter_mut() {
                prune(v);
            }
            map.retain(|_, v| !empty(v));
        }
        Value::Sequence(items) => items.iter_mut().for_each(prune),
        _ => {}
    }
}

async fn serve(args: Args, settings: Settings, routes: Vec<Route>, log: AccessLog) -> ExitCode {
    let workers = match start_workers(settings.workers) {
        Ok(workers) => workers,
        Err(e) => {
            common::telemetry::say(format_args!("{PROGRAM}: {e}"));
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let tunnel = Arc::new(Tunnel::with_workers(
        settings.shutdown_grace.0,
        log,
        workers,
    ));
    if let Err(e) = tunnel.apply(routes, HashMap::new()).await {
        common::telemetry::say(format_args!("{PROGRAM}: {e}"));
        return ExitCode::from(EXIT_CONFIG);
    }
    let admin_stop = CancellationToken::new();
    let mut admin_task = None;
    if let Some(addr) = settings.admin {
        let endpoint = Endpoint {
            program: PROGRAM,
            name: "Admin",
            key: "admin",
            addr,
        };
        match endpoint.bind() {
            Ok(listener) => {
                tracing::info!(admin = %addr, "serving /metrics, /healthz and /readyz");
                let admin = Admin::new(tunnel.clone(), common::signal::process().clone());
                let stop = admin_stop.clone();
                admin_task = Some(tokio::spawn(common::serve::serve(
                    listener,
                    admin.options(&settings),
                    Arc::new(admin),
                    async move { stop.cancelled().await },
                )));
            }
            Err(e) => {
                common::telemetry::say(format_args!("{PROGRAM}: {e}"));
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    }
    let pid_file = settings.pid_file.as_deref().map(PidFile::write);
    let mut hangup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    let shutdown = common::signal::shutdown();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = hangup.recv() => reload(&args, &settings, &tunnel).await,
        }
    }
    // A second SIGINT or SIGTERM cuts the drain short (see common::signal).
    tunnel.shutdown().await;
    admin_stop.cancel();
    if let Some(task) = admin_task {
        let _ = task.await;
    }
    drop(pid_file);
    ExitCode::SUCCESS
}

/// The pid file, removed again when dropped if it still holds this
/// process's id.
struct PidFile(Option<std::path::PathBuf>);

impl PidFile {
    /// Writes the pid to a new file beside `path` and renames it into
    /// place: a symlink planted at `path` is replaced, never followed, and
    /// a reader never sees a half-written file.
    fn write(path: &str) -> PidFile {
        let path = std::path::PathBuf::from(path);
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => std::path::PathBuf::from("."),
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

/// Applies the configuration as it is now; on any problem the running
/// routes stay as they are. Settings that only take effect at start are
/// named in the log when they changed.
async fn reload(args: &Args, first: &Settings, tunnel: &Tunnel) {
    tracing::info!("SIGHUP: reloading the configuration");
    let (resolved, routes) = match configure(args) {
        Ok(pair) => pair,
        Err(errors) => {
            tracing::error!("reload failed, the running configuration stays: {errors}");
            return;
        }
    };
    let settings = &resolved.settings;
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
    if !kept.is_empty() {
        tracing::warn!(
            settings = %kept.join(", "),
            "these settings changed but apply only at start; restart the tunnel to use them (the running values stay)"
        );
    }
    let names: Vec<String> = routes.iter().map(|r| r.name.clone()).collect();
    match tunnel.apply(routes, HashMap::new()).await {
        Ok(()) => tracing::info!(routes = ?names, "reloaded"),
        Err(e) => tracing::error!("reload failed, the running configuration stays: {e}"),
    }
}
