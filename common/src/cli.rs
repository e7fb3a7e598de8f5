//! The command-line part every program shares: `--config`, `--print-config`,
//! `--log-level`, `--log-format`, and turning a resolved configuration or a
//! failure into what the user sees and the exit status.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use tokio::net::TcpListener;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::config::{env_var, resolve, ConfigError, ConfigErrors, Resolved, Sources, EXIT_USAGE};
use crate::endpoint::Endpoint;
use crate::runtime::Flavor;
use crate::settings::LogFormat;

/// Exit status: a request failed.
pub const EXIT_FAILED: u8 = 1;
/// Exit status: usage or configuration error (`EX_USAGE`).
pub const EXIT_CONFIG: u8 = EXIT_USAGE as u8;
/// Exit status: a needed service is unreachable (`EX_UNAVAILABLE`).
pub const EXIT_UNAVAILABLE: u8 = 69;

/// Flags every program has. Flatten it into the program's `clap` arguments;
/// it serializes only the flags that are settings, and only when given.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct CommonArgs {
    /// YAML configuration file (also the program's `<PREFIX>_CONFIG`)
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Print the resolved configuration, with where each value came from, and exit
    #[arg(long)]
    #[serde(skip)]
    pub print_config: bool,

    /// Log filter such as info, debug or tunnel=debug (default: RUST_LOG, then info)
    #[arg(long, value_name = "FILTER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,

    /// Log format
    #[arg(long, value_enum, value_name = "FORMAT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
}

/// Parses the command line. A usage error is printed with clap's help and
/// gives status 64 (clap's own is 2); `--help` and `--version` print and
/// give 0.
pub fn parse_args<A: clap::Parser>() -> Result<A, ExitCode> {
    let command = with_program_names(A::command());
    command
        .try_get_matches()
        .and_then(|matches| A::from_arg_matches(&matches))
        .map_err(|e| {
            let _ = e.print();
            if e.use_stderr() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::SUCCESS
            }
        })
}

/// The shared flags' help in the program's own words: its configuration
/// variable (`ECHO_SERVER_CONFIG`) and a log filter naming it.
pub fn with_program_names(command: clap::Command) -> clap::Command {
    let program = command.get_name().to_string();
    let has = |id: &str| command.get_arguments().any(|a| a.get_id() == id);
    let (config, log_level) = (has("config"), has("log_level"));
    let mut command = command;
    if config {
        let var = env_var(&program, "config");
        command = command.mut_arg("config", |a| {
            a.help(format!("YAML configuration file (also {var})"))
        });
    }
    if log_level {
        let target = program.replace('-', "_");
        command = command.mut_arg("log_level", |a| {
            a.help(format!(
                "Log filter such as info, debug or {target}=debug (default: RUST_LOG, then info)"
            ))
        });
    }
    command
}

/// Where a program's configuration comes from: the `--config` file or
/// `<PREFIX>_CONFIG`, the environment, and `flags`. A program that reloads
/// its configuration resolves these again.
pub fn sources<'a, F>(program: &'static str, common: &CommonArgs, flags: &'a F) -> Sources<&'a F> {
    let file = common.config.clone().or_else(|| {
        std::env::var_os(env_var(program, "config"))
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    Sources {
        program,
        file,
        flags,
        env_ignore: &["config"],
        converted: None,
    }
}

/// Flags of every server: how long an idle connection may stay, how many
/// connections at once, and how long shutdown may take. Flatten it into
/// the program's arguments beside [`CommonArgs`].
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct ServeArgs {
    /// Close a connection after this long without traffic (such as 30s, 5m)
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,

    /// Most connections at once; more wait in the listen backlog
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,

    /// Balancers whose connections start with a PROXY protocol header naming the client (comma-separated networks)
    #[arg(long, value_name = "CIDRS", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub accept_proxy: Vec<String>,

    /// On SIGINT/SIGTERM, how long open connections may take to finish
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_grace: Option<String>,

    /// Serve TLS with this certificate chain (PEM file; with --tls-key)
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM file)
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,

    /// Accept only clients with a certificate from this CA (PEM bundle): mutual TLS
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_client_ca: Option<PathBuf>,

    /// With --tls-client-ca: let in only client certificates with one of these names (comma-separated; *.example.com for one label)
    #[arg(long, value_name = "NAMES", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tls_client_names: Vec<String>,
}

/// A program's start, the same in every one: its arguments parsed, its
/// settings resolved (every problem printed, `--print-config` answered),
/// its log started; what a service manager passed in the environment is
/// taken (see [`crate::systemd::take_environment`]). `Err` is the status to
/// exit with.
pub fn start<A, T>(
    program: &'static str,
    common: impl Fn(&A) -> &CommonArgs,
    log: impl Fn(&T) -> &crate::settings::LogSettings,
) -> Result<(A, T, crate::telemetry::LogGuard), ExitCode>
where
    A: clap::Parser + Serialize,
    T: Serialize + DeserializeOwned + Default + crate::config::ProgramSettings,
{
    // Before any thread starts: it changes the environment.
    crate::systemd::take_environment();
    let args = parse_args::<A>()?;
    let settings = match load::<T, _>(program, common(&args), &args) {
        Loaded::Run(resolved) => resolved.settings,
        Loaded::Exit(code) => return Err(code),
    };
    let guard = crate::telemetry::init(log(&settings));
    Ok((args, settings, guard))
}

/// What a program does after loading its configuration.
pub enum Loaded<T> {
    /// Go on and run with these settings.
    Run(Box<Resolved<T>>),
    /// Stop now with this status (after `--print-config`, or an error that
    /// was already printed).
    Exit(ExitCode),
}

/// Resolves a program's configuration from its defaults, `--config` file or
/// `<PREFIX>_CONFIG`, environment and `flags` (the program's parsed
/// arguments). Errors are printed, every one, to stderr; `--print-config`
/// prints the result to stdout.
pub fn load<T, F>(program: &'static str, common: &CommonArgs, flags: &F) -> Loaded<T>
where
    T: Serialize + DeserializeOwned + Default + crate::config::ProgramSettings,
    F: Serialize,
{
    match resolve::<T, _>(&sources(program, common, flags)) {
        Ok(resolved) => {
            let problems: Vec<ConfigError> = resolved
                .settings
                .problems(&|key| resolved.origin(key))
                .into_iter()
                .map(|mut problem| {
                    if problem.origin.is_none() {
                        problem.origin = resolved.origin(&problem.key);
                    }
                    problem
                })
                .collect();
            if common.print_config {
                // What is printed is shown even when it would not run, with why.
                crate::telemetry::show(format_args!("{}", resolved.print_config()));
                for problem in &problems {
                    crate::telemetry::show(format_args!("# would not start: {problem}\n"));
                }
                return Loaded::Exit(ExitCode::SUCCESS);
            }
            if !problems.is_empty() {
                crate::telemetry::say(format_args!("{program}: {}", ConfigErrors(problems)));
                return Loaded::Exit(ExitCode::from(EXIT_CONFIG));
            }
            Loaded::Run(Box::new(resolved))
        }
        Err(errors) => {
            crate::telemetry::say(format_args!("{program}: {errors}"));
            Loaded::Exit(ExitCode::from(EXIT_CONFIG))
        }
    }
}

/// Starts a runtime of `flavor` for `program`; a failure is printed and
/// gives status 1.
pub fn runtime(program: &str, flavor: Flavor) -> Result<tokio::runtime::Runtime, ExitCode> {
    crate::runtime::start(flavor).map_err(|e| {
        crate::telemetry::say(format_args!("{program}: {e}"));
        ExitCode::from(EXIT_FAILED)
    })
}

/// Starts the async runtime, binds the program's endpoint and runs `serve`
/// on it until it returns; a bind failure says what to change (status 64),
/// a failure of `serve` gives status 1. Under systemd, the endpoint may be
/// a socket it passed, and it hears READY=1 once the endpoint listens and
/// STOPPING=1 when the stop begins.
pub fn serve_endpoint<F, Fut>(endpoint: Endpoint, serve: F) -> ExitCode
where
    F: FnOnce(TcpListener) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let runtime = match runtime(endpoint.program, Flavor::MultiThread) {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let program = endpoint.program;
    let endpoint_name = endpoint.name;
    runtime.block_on(async move {
        let listener = match endpoint.bind() {
            Ok(listener) => listener,
            Err(e) => {
                crate::telemetry::say(format_args!("{program}: {e}"));
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        tell_service_manager(endpoint_name, &listener);
        match serve(listener).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                crate::telemetry::say(format_args!("{program}: {e:#}"));
                ExitCode::from(EXIT_FAILED)
            }
        }
    })
}

/// Socket activation and readiness for a program of one endpoint: a
/// passed socket it does not use is reported, READY=1 is sent now that it
/// listens, and STOPPING=1 when the process's stop begins.
fn tell_service_manager(endpoint: &str, listener: &TcpListener) {
    use crate::systemd::{activation, notify};
    activation::report_unused();
    if !notify::enabled() {
        return;
    }
    let addr = listener
        .local_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    notify::ready(&format!("{endpoint} listening on {addr}"));
    tokio::spawn(async move {
        crate::signal::process().begun().cancelled().await;
        notify::stopping("stopping: finishing open connections");
    });
}
