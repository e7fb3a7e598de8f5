//! `tunnel`: forwards TCP connections to a target, or many routes from a
//! configuration file; SIGHUP reloads it, SIGTERM drains.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use common::cli::{parse_args, sources, CommonArgs, ServeArgs, EXIT_CONFIG};
use common::config::{resolve, ConfigErrors};
use serde::Serialize;
use tokio::signal::unix::{signal, SignalKind};
use tunnel::access_log::AccessLog;
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

    /// Serve /metrics (Prometheus) and /healthz on this address [default: off]
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

/// rinetd's format has no place for these, so the flags still apply on top
/// of a rinetd file.
fn flags_over_rinetd(args: &Args, settings: &mut Settings) -> Result<(), ConfigErrors> {
    use common::config::{ConfigError, Origin};
    use common::settings::Seconds;
    let mut errors = Vec::new();
    let mut duration = |key: &str, value: &Option<String>, slot: &mut Seconds| {
        if let Some(text) = value {
            match text.parse::<Seconds>() {
                Ok(d) => *slot = d,
                Err(message) => errors.push(ConfigError {
                    key: key.into(),
                    value: Some(format!("{text:?}")),
                    origin: Some(Origin::Flag(common::config::flag_name(key))),
                    message,
                }),
            }
        }
    };
    duration(
        "connect_timeout",
        &args.connect_timeout,
        &mut settings.connect_timeout,
    );
    duration(
        "idle_timeout",
        &args.serve.idle_timeout,
        &mut settings.idle_timeout,
    );
    duration(
        "shutdown_grace",
        &args.serve.shutdown_grace,
        &mut settings.shutdown_grace,
    );
    if let Some(n) = args.serve.max_connections {
        settings.max_connections = n;
    }
    if let Some(level) = &args.common.log_level {
        settings.log.log_level = Some(level.clone());
    }
    if let Some(format) = args.common.log_format {
        settings.log.log_format = format;
    }
    if let Some(path) = &args.access_log {
        settings.access_log = Some(path.clone());
    }
    if let Some(admin) = &args.admin {
        match admin.parse() {
            Ok(addr) => settings.admin = Some(addr),
            Err(message) => errors.push(ConfigError {
                key: "admin".into(),
                value: Some(format!("{admin:?}")),
                origin: Some(Origin::Flag("--admin".into())),
                message,
            }),
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Reads the settings and the routes they make, every problem at once.
fn configure(args: &Args) -> Result<(Settings, Vec<Route>), ConfigErrors> {
    let settings = match &args.rinetd_conf {
        Some(path) => {
            let mut settings = rinetd::read(path)?;
            flags_over_rinetd(args, &mut settings)?;
            settings
        }
        None => {
            let resolved = resolve::<Settings, _>(&sources(PROGRAM, &args.common, args))?;
            let routes = resolved.settings.routes().map_err(|errors| {
                // Point at where the route's values were written.
                ConfigErrors(
                    errors
                        .into_iter()
                        .map(|mut e| {
                            if e.origin.is_none() {
                                e.origin = resolved.origin(&e.key).or_else(|| {
                                    e.key
                                        .rsplit_once('.')
                                        .and_then(|(parent, _)| resolved.origin(parent))
                                });
                            }
                            e
                        })
                        .collect(),
                )
            })?;
            return Ok((resolved.settings, routes));
        }
    };
    let routes = settings.routes().map_err(ConfigErrors)?;
    Ok((settings, routes))
}

fn main() -> ExitCode {
    let args = match parse_args::<Args>() {
        Ok(args) => args,
        Err(code) => return code,
    };
    let (settings, routes) = match configure(&args) {
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
            let mut yaml = serde_yaml::to_value(&settings).unwrap_or_default();
            prune(&mut yaml);
            common::telemetry::show(format_args!(
                "{}",
                serde_yaml::to_string(&yaml).unwrap_or_default()
            ));
        } else if let Ok(resolved) = resolve::<Settings, _>(&sources(PROGRAM, &args.common, &args))
        {
            common::telemetry::show(format_args!("{}", resolved.describe()));
        }
        return ExitCode::SUCCESS;
    }
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
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(serve(args, settings, routes, log))
}

/// Threads with a single-threaded runtime each, for the connections; with
/// one worker, connections stay on the main thread.
fn start_workers(count: usize) -> Vec<tokio::runtime::Handle> {
    let count = if count == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        count
    };
    if count <= 1 {
        return Vec::new();
    }
    (0..count)
        .map(|i| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name(format!("relay-{i}"))
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("tokio runtime");
                    let _ = tx.send(runtime.handle().clone());
                    runtime.block_on(std::future::pending::<()>());
                })
                .expect("a relay thread");
            rx.recv().expect("the relay thread's runtime")
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
    let tunnel = Tunnel::with_workers(
        settings.shutdown_grace.0,
        log,
        start_workers(settings.workers),
    );
    if let Err(e) = tunnel.apply(routes, HashMap::new()).await {
        common::telemetry::say(format_args!("{PROGRAM}: {e}"));
        return ExitCode::from(EXIT_CONFIG);
    }
    let admin_stop = tokio_util::sync::CancellationToken::new();
    if let Some(addr) = settings.admin {
        match common::endpoint::bind_listener(addr) {
            Ok(listener) => {
                tracing::info!(admin = %addr, "serving /metrics and /healthz");
                tokio::spawn(tunnel::admin::serve(
                    listener,
                    tunnel.metrics(),
                    admin_stop.clone(),
                ));
            }
            Err(e) => {
                common::telemetry::say(format_args!("{PROGRAM}: cannot serve the admin endpoint on {addr}: {e}; pass --admin or set TUNNEL_ADMIN"));
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    }
    if let Some(pid_file) = &settings.pid_file {
        if let Err(e) = std::fs::write(pid_file, format!("{}\n", std::process::id())) {
            tracing::warn!(file = %pid_file, error = %e, "cannot write the pid file");
        }
    }
    let mut hangup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    let shutdown = common::signal::shutdown();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = hangup.recv() => reload(&args, &settings, &tunnel).await,
        }
    }
    tunnel.shutdown().await;
    admin_stop.cancel();
    if let Some(pid_file) = &settings.pid_file {
        let _ = std::fs::remove_file(pid_file);
    }
    ExitCode::SUCCESS
}

/// Applies the configuration as it is now; on any problem the running
/// routes stay as they are.
async fn reload(args: &Args, first: &Settings, tunnel: &Tunnel) {
    tracing::info!("SIGHUP: reloading the configuration");
    let (settings, routes) = match configure(args) {
        Ok(pair) => pair,
        Err(errors) => {
            tracing::error!("reload failed, the running configuration stays: {errors}");
            return;
        }
    };
    if settings.access_log != first.access_log || settings.shutdown_grace != first.shutdown_grace {
        tracing::warn!("access_log and shutdown_grace changes take effect at the next start");
    }
    let names: Vec<String> = routes.iter().map(|r| r.name.clone()).collect();
    match tunnel.apply(routes, HashMap::new()).await {
        Ok(()) => tracing::info!(routes = ?names, "reloaded"),
        Err(e) => tracing::error!("reload failed, the running configuration stays: {e}"),
    }
}
