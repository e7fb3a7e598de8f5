//! `deploy`: check the service definition, run it on this machine, or render
//! it for Kubernetes or compose.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use common::cli::{parse_args, runtime, EXIT_CONFIG, EXIT_FAILED};
use common::runtime::Flavor;
use common::telemetry::{say, show};
use deploy::definition::{registry_problem, tag_problem, Definition, Environment, Problems};
use deploy::fabric::{self, Options};
use deploy::{render, DEFAULT_DEFINITION, PROGRAM};
use tokio::signal::unix::SignalKind;

/// Check a service definition (roles, their programs and instance counts,
/// endpoints, settings per environment), run it on this machine behind
/// load balancers (the development fabric), or render it for Kubernetes or
/// compose.
///
/// The definition is deploy/service.yaml unless a FILE is given. `deploy
/// check` reports every problem at once, with its line and column.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Args {
    #[command(subcommand)]
    command: Command,

    /// Log filter such as info or debug (default: RUST_LOG, then info)
    #[arg(long, value_name = "FILTER", global = true)]
    log_level: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check the definition for every environment; report every problem with its place
    Check {
        /// The service definition [default: deploy/service.yaml]
        file: Option<PathBuf>,
    },
    /// Show the fabrics running on this machine: roles, instances, state, address, restarts, connections, uptime
    Status {
        /// Only the fabric that follows this definition
        file: Option<PathBuf>,
        /// What the fabrics publish, as JSON
        #[arg(long)]
        json: bool,
    },
    /// Run every role's instances on this machine behind load balancers; edits of the definition apply while it runs
    Run {
        /// The service definition [default: deploy/service.yaml]
        file: Option<PathBuf>,
        /// Where the programs are [default: beside deploy]
        #[arg(long, value_name = "DIR")]
        programs: Option<PathBuf>,
    },
    /// Write manifests for a cluster engine or for one host
    Render {
        /// What to render
        target: Target,
        /// The service definition [default: deploy/service.yaml]
        file: Option<PathBuf>,
        /// Where to write [default: deploy/kubernetes, or deploy for compose]
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Where the images are pulled from, such as ghcr.io/acme/tcp-roles
        /// [default: the definition's image.registry, else its name]
        #[arg(long, value_name = "REGISTRY")]
        registry: Option<String>,
        /// The images' tag [default: the definition's image.tag, else the
        /// programs' version]
        #[arg(long, value_name = "TAG")]
        tag: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Target {
    /// Deployments, Services and ConfigMaps, with a kustomization.yaml
    Kubernetes,
    /// One compose.yaml for a single host
    Compose,
}

fn load(file: &Option<PathBuf>) -> Result<Definition, ExitCode> {
    let path = file
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DEFINITION));
    Definition::load(&path).map_err(|problems| {
        say(format_args!("{PROGRAM}: {problems}"));
        ExitCode::from(EXIT_CONFIG)
    })
}

/// Loads the definition as it runs in `environment`, reporting what is
/// found there: warnings go to stderr, errors stop.
fn load_for(file: &Option<PathBuf>, environment: Environment) -> Result<Definition, ExitCode> {
    let definition = load(file)?;
    let found = Problems(definition.findings(environment));
    report(&found);
    if found.has_errors() {
        return Err(ExitCode::from(EXIT_CONFIG));
    }
    Ok(definition.in_environment(environment))
}

fn report(found: &Problems) {
    for problem in &found.0 {
        say(format_args!("{PROGRAM}: {problem}"));
    }
}

fn main() -> ExitCode {
    let args = match parse_args::<Args>() {
        Ok(args) => args,
        Err(code) => return code,
    };
    let _log = common::telemetry::init(&common::settings::LogSettings {
        log_level: args.log_level.clone(),
        ..Default::default()
    });
    match args.command {
        Command::Check { file } => {
            let d = match load(&file) {
                Ok(d) => d,
                Err(code) => return code,
            };
            let found = Problems(d.all_findings());
            report(&found);
            if found.has_errors() {
                return ExitCode::from(EXIT_CONFIG);
            }
            let instances: usize = d.roles.iter().map(|r| r.count()).sum();
            show(format_args!(
                "{}: {} roles, {instances} instances: ok\n",
                d.name,
                d.roles.len()
            ));
            ExitCode::SUCCESS
        }
        Command::Render {
            target,
            file,
            out,
            registry,
            tag,
        } => {
            let environment = match target {
                Target::Kubernetes => Environment::Kubernetes,
                Target::Compose => Environment::Compose,
            };
            let mut definition = match load_for(&file, environment) {
                Ok(d) => d,
                Err(code) => return code,
            };
            if let Some(registry) = registry {
                if let Some(why) = registry_problem(&registry) {
                    say(format_args!("{PROGRAM}: --registry {registry:?} {why}"));
                    return ExitCode::from(EXIT_CONFIG);
                }
                definition.image.registry = registry;
            }
            if let Some(tag) = tag {
                if let Some(why) = tag_problem(&tag) {
                    say(format_args!("{PROGRAM}: --tag {tag:?} {why}"));
                    return ExitCode::from(EXIT_CONFIG);
                }
                definition.image.tag = tag;
            }
            let (dir, files) = match target {
                Target::Kubernetes => (
                    out.unwrap_or_else(|| PathBuf::from("deploy/kubernetes")),
                    render::kubernetes(&definition),
                ),
                Target::Compose => {
                    let dir = out.unwrap_or_else(|| PathBuf::from("deploy"));
                    let context = render::build_context(&dir);
                    if context.is_none() {
                        say(format_args!("{PROGRAM}: no Dockerfile at or above this directory: the compose file pulls its images instead of building them"));
                    }
                    let file = render::compose(&definition, context.as_deref());
                    (dir, vec![("compose.yaml".to_string(), file)])
                }
            };
            match render::write(&dir, &files) {
                Ok(()) => {
                    for (name, _) in &files {
                        show(format_args!("{}\n", dir.join(name).display()));
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    say(format_args!(
                        "{PROGRAM}: cannot write to {}: {e}",
                        dir.display()
                    ));
                    ExitCode::from(EXIT_FAILED)
                }
            }
        }
        Command::Status { file, json } => status(file.as_deref(), json),
        Command::Run { file, programs } => {
            let definition = match load_for(&file, Environment::Local) {
                Ok(d) => d,
                Err(code) => return code,
            };
            let here = std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
                .unwrap_or_else(|| PathBuf::from("."));
            if programs.is_none() {
                if let Err(e) = build_programs(&here) {
                    say(format_args!("{PROGRAM}: {e:#}"));
                    return ExitCode::from(EXIT_FAILED);
                }
            }
            let options = Options {
                programs: programs.unwrap_or(here),
                follow: Some(file.unwrap_or_else(|| PathBuf::from(DEFAULT_DEFINITION))),
                ..Options::default()
            };
            let runtime = match runtime(PROGRAM, Flavor::MultiThread) {
                Ok(runtime) => runtime,
                Err(code) => return code,
            };
            let result = runtime.block_on(async {
                // SIGHUP too: a closed terminal stops the fabric, not just it.
                let shutdown = common::signal::listen(&[
                    (SignalKind::interrupt(), "SIGINT"),
                    (SignalKind::terminate(), "SIGTERM"),
                    (SignalKind::hangup(), "SIGHUP"),
                ])
                .context("installing the signal handlers")?
                .clone();
                fabric::run(&definition, &options, shutdown).await
            });
            // What is left (connections cut short by a second signal) is
            // closed, not waited for.
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    say(format_args!("{PROGRAM}: {e:#}"));
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        }
    }
}

/// Under `cargo run`, builds every program of the workspace with the same
/// profile (the roles' programs, and square-client and deploy beside
/// them), so one command builds the whole system and its client.
/// `deploy status`: each running fabric's table (or JSON), or why there
/// is none.
fn status(file: Option<&Path>, json: bool) -> ExitCode {
    let mut fabrics = fabric::state::running();
    if let Some(file) = file {
        let wanted = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
        fabrics.retain(|f| {
            f.definition
                .as_ref()
                .and_then(|d| std::fs::canonicalize(d).ok())
                .is_some_and(|d| d == wanted)
        });
    }
    if fabrics.is_empty() {
        say(format_args!(
            "{PROGRAM}: no fabric runs on this machine{}; start one with `deploy run`",
            file.map(|f| format!(" for {}", f.display()))
                .unwrap_or_default()
        ));
        return ExitCode::from(EXIT_FAILED);
    }
    if json {
        match serde_json::to_string_pretty(&fabrics) {
            Ok(text) => show(format_args!("{text}\n")),
            Err(e) => {
                say(format_args!("{PROGRAM}: {e}"));
                return ExitCode::from(EXIT_FAILED);
            }
        }
        return ExitCode::SUCCESS;
    }
    let connections = fabric::state::connections_by_port();
    let now = std::time::SystemTime::now();
    let tables: Vec<String> = fabrics
        .iter()
        .map(|f| fabric::state::render(f, &connections, now))
        .collect();
    show(format_args!("{}", tables.join("\n")));
    ExitCode::SUCCESS
}

fn build_programs(here: &Path) -> anyhow::Result<()> {
    let (Some(cargo), Some(manifest)) = (
        std::env::var_os("CARGO"),
        std::env::var_os("CARGO_MANIFEST_DIR"),
    ) else {
        return Ok(());
    };
    let workspace = Path::new(&manifest).parent().unwrap_or(Path::new("."));
    let mut build = std::process::Command::new(cargo);
    build
        .current_dir(workspace)
        .args(["build", "--quiet", "--workspace", "--bins"]);
    if here.file_name().is_some_and(|p| p == "release") {
        build.arg("--release");
    }
    say(format_args!("{PROGRAM}: building the programs"));
    let status = build.status()?;
    anyhow::ensure!(status.success(), "building the programs failed");
    Ok(())
}
