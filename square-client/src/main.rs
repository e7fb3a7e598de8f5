//! `square-client`: parses arguments and configuration and runs
//! [`square_client::cli::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use common::cli::{runtime, start, CommonArgs};
use common::runtime::Flavor;
use serde::Serialize;
use square_client::cli::{Format, PROGRAM};
use square_client::settings::Settings;

/// Ask the square service for the exact squares of numbers.
///
/// Prints each square on its own line. With no NUMBER, squares every line of
/// standard input, pipelined. Exit status: 0 all squared, 1 a number was
/// refused, 64 usage or configuration error, 69 the server is unreachable,
/// fails the TLS handshake or sends no answer within the reply timeout.
#[derive(Debug, Parser, Serialize)]
#[command(name = "square-client", version)]
struct Args {
    /// The square server, HOST:PORT, or ROLE/Endpoint looked up in --topology [default: 127.0.0.1:2345] (also SQUARE_CLIENT_SERVER)
    #[arg(long, value_name = "HOST:PORT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    server: Option<String>,

    /// Topology file in which a --server named ROLE/Endpoint is looked up (deploy run prints its path) (also SQUARE_CLIENT_TOPOLOGY)
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    topology: Option<PathBuf>,

    /// How long to wait for the server to accept (and the TLS handshake), such as 5s or 500ms [default: 5s] (also SQUARE_CLIENT_CONNECT_TIMEOUT)
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    connect_timeout: Option<String>,

    /// How long to wait for the server's next answer while requests are unanswered, such as 30s or 2m [default: 30s] (also SQUARE_CLIENT_REPLY_TIMEOUT)
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    reply_timeout: Option<String>,

    /// Talk TLS to the server (on by itself with --ca, --cert, --key or --server-name) (also SQUARE_CLIENT_TLS)
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    tls: bool,

    /// Trust the server's certificate only if this CA signed it (PEM bundle) [default: the system's trusted CAs] (also SQUARE_CLIENT_CA)
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    ca: Option<PathBuf>,

    /// Client certificate chain for a server that asks for one: mutual TLS (PEM; with --key) (also SQUARE_CLIENT_CERT)
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    cert: Option<PathBuf>,

    /// The private key of --cert (PEM) (also SQUARE_CLIENT_KEY)
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<PathBuf>,

    /// The name the server's certificate must carry [default: the host of --server] (also SQUARE_CLIENT_SERVER_NAME)
    #[arg(long, value_name = "NAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    server_name: Option<String>,

    /// Print one JSON object per line: {"input":"12","square":"144"} or {"input":"x","error":"..."}
    #[arg(long)]
    #[serde(skip)]
    json: bool,

    /// Numbers to square (integers or decimals, any size up to the server's limit)
    #[arg(value_name = "NUMBER", allow_negative_numbers = true)]
    #[serde(skip)]
    numbers: Vec<String>,

    #[command(flatten)]
    #[serde(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let (args, settings, _log) = match start::<Args, Settings>(PROGRAM, |a| &a.common, |s| &s.log) {
        Ok(started) => started,
        Err(code) => return code,
    };
    let format = if args.json {
        Format::Json
    } else {
        Format::Plain
    };
    let runtime = match runtime(PROGRAM, Flavor::MultiThread) {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let code = runtime.block_on(square_client::cli::run(&settings, args.numbers, format));
    // Answers are flushed as they come; what may still run is a read of a
    // stdin that stays open (the server went away while a user types), and
    // the exit must not wait for it.
    runtime.shutdown_background();
    code
}
