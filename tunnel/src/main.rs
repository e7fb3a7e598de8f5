//! `tunnel`: forwards TCP connections to a target, or many routes from a
//! configuration file; SIGHUP reloads it, SIGTERM drains.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use common::cli::{parse_args, runtime, sources, CommonArgs, ServeArgs, EXIT_CONFIG, EXIT_FAILED};
use common::config::{
    env_var, in_use, resolve, ConfigError, ConfigErrors, Converted, Origin, Resolved,
};
use common::runtime::Flavor;
use serde::Serialize;
use tunnel::settings::{Route, Settings, PROGRAM};
use tunnel::{program, rinetd};

// An idle connection is a handful of small allocations, two of them
// cache-line aligned (tokio's readiness slots); mimalloc packs those far
// tighter than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Forward TCP connections (and UDP datagrams) to a target behind a firewall.
///
/// Quick form: `tunnel --listen 0.0.0.0:1001 --target db.internal:5432`, or
/// set TUNNEL_HOST and TUNNEL_PORT. Many routes: `--config FILE` (YAML) or
/// rinetd's own format with `--rinetd-conf FILE`. TLS: `--tls-cert` and
/// `--tls-key` serve it to clients, `--target-tls` speaks it to the target.
/// Every setting can also come from a TUNNEL_* environment variable. SIGHUP reloads the configuration;
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

    /// Topology file in which targets named ROLE/Endpoint are looked up, and followed (deploy run sets it)
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    topology: Option<PathBuf>,

    /// How long to wait for the target to accept [default: 5s]
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    connect_timeout: Option<String>,

    /// Write a PROXY protocol header (v1 text or v2 binary) with the client's address to the target first
    #[arg(long, value_name = "VERSION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    send_proxy: Option<String>,

    /// Speak TLS to the target (implied by the other --target-* TLS flags)
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    target_tls: bool,

    /// Trust only this CA bundle (PEM) for the target's certificate [default: the system's roots]
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    target_ca: Option<PathBuf>,

    /// The name the target's certificate must carry, also sent as SNI [default: the target's host]
    #[arg(long, value_name = "NAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    target_server_name: Option<String>,

    /// Present this client certificate chain (PEM) to the target (with --target-key)
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    target_cert: Option<PathBuf>,

    /// The private key of --target-cert (PEM)
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    target_key: Option<PathBuf>,

    /// When a target closes or resets a connection before its first byte, replay what the client sent (up to 16 KiB) to another target; only for protocols where an unanswered request may be sent twice
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    retry_before_first_byte: bool,

    #[command(flatten)]
    #[serde(flatten)]
    serve: ServeArgs,

    #[command(flatten)]
    #[serde(flatten)]
    common: CommonArgs,
}

fn is_false(value: &bool) -> bool {
    !value
}

/// Reads the settings, every problem at once. A rinetd.conf is one layer
/// of the same pipeline as a YAML file: the environment and the flags
/// apply over it.
fn configure(args: &Args) -> Result<Resolved<Settings>, ConfigErrors> {
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
    resolve::<Settings, _>(&sources)
}

/// The routes the settings make, every problem at once, each pointed at
/// where its values were written.
fn routes_of(resolved: &Resolved<Settings>) -> Result<Vec<Route>, ConfigErrors> {
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
    // target_tls written false beside the settings that turn it on.
    let implied_by = resolved.settings.target_tls_implied_by();
    if let Some(origin) = resolved
        .origin("target_tls")
        .filter(|o| *o != Origin::Default && !resolved.settings.target_tls)
        .filter(|_| !implied_by.is_empty() && resolved.settings.routes.is_empty())
    {
        errors.push(ConfigError {
            key: "target_tls".into(),
            value: Some("false".into()),
            origin: Some(origin),
            message: format!(
                "turns TLS to the target off, but {} is set, which needs it; remove one or the other",
                implied_by.join(" and ")
            ),
        });
    }
    match resolved.settings.routes() {
        Ok(routes) if errors.is_empty() => {
            // The TLS files, read: one that cannot be used stops the start
            // (and a reload) here, named with where it was set.
            let quick = resolved.settings.routes.is_empty();
            let problems: Vec<ConfigError> = tunnel::tls::problems(&routes, quick)
                .into_iter()
                .map(|mut e| {
                    e.origin = resolved.origin(&e.key);
                    e
                })
                .collect();
            if problems.is_empty() {
                Ok(routes)
            } else {
                Err(ConfigErrors(problems))
            }
        }
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
    // Before any thread starts: it changes the environment.
    common::systemd::take_environment();
    let args = match parse_args::<Args>() {
        Ok(args) => args,
        Err(code) => return code,
    };
    let resolved = match configure(&args) {
        Ok(resolved) => resolved,
        Err(errors) => {
            common::telemetry::say(format_args!("{PROGRAM}: {errors}"));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.common.print_config {
        if args.rinetd_conf.is_some() {
            // The YAML a rinetd user would write instead, without the
            // settings left empty or not used.
            common::telemetry::show(
                common::yaml::to_string_pruned(&in_use(&resolved.settings)).unwrap_or_default(),
            );
        } else {
            common::telemetry::show(resolved.print_config());
        }
        // What is printed is shown even when it would not run, with why.
        if let Err(errors) = routes_of(&resolved) {
            for error in errors.0 {
                common::telemetry::show(format_args!("# would not start: {error}\n"));
            }
        }
        return ExitCode::SUCCESS;
    }
    let routes = match routes_of(&resolved) {
        Ok(routes) => routes,
        Err(errors) => {
            common::telemetry::say(format_args!("{PROGRAM}: {errors}"));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let settings = resolved.settings;
    let _log = common::telemetry::init(&settings.log);
    let runtime = match runtime(PROGRAM, Flavor::CurrentThread) {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    runtime.block_on(async {
        let bound = match program::bind(&settings, &routes) {
            Ok(bound) => bound,
            Err(e) => {
                common::telemetry::say(format_args!("{PROGRAM}: {e}"));
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        // A reload reads the file, the environment and the flags again.
        let reconfigure =
            || configure(&args).and_then(|r| routes_of(&r).map(|routes| (r.settings, routes)));
        let shutdown = common::signal::shutdown();
        match program::run(settings, routes, bound, reconfigure, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                common::telemetry::say(format_args!("{PROGRAM}: {e:#}"));
                ExitCode::from(EXIT_FAILED)
            }
        }
    })
}
