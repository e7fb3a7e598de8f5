//! `square-server`: parses arguments and configuration, binds
//! `SquareEndpoint` and runs the square service until SIGINT or SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use common::cli::{serve_endpoint, start, CommonArgs, ServeArgs};
use common::endpoint::Endpoint;
use serde::Serialize;
use square_server::{Settings, ENDPOINT, PROGRAM};

/// The square service: send one number per line, get its exact square back.
///
/// Every setting can also come from a YAML file (--config) or an environment
/// variable SQUARE_SERVER_<KEY> (SQUARE_SERVER_MAX_DIGITS=20000).
#[derive(Debug, Parser, Serialize)]
#[command(name = "square-server", version)]
struct Args {
    #[command(flatten)]
    #[serde(flatten)]
    serve: ServeArgs,

    #[command(flatten)]
    #[serde(flatten)]
    common: CommonArgs,

    /// Address for SquareEndpoint, IP:PORT [default: 0.0.0.0:2345] (also SQUARE_SERVER_LISTEN)
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<String>,

    /// Most digits in a number, 1 to 1000000 [default: 10000] (also SQUARE_SERVER_MAX_DIGITS)
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_digits: Option<usize>,

    /// Most bytes in a request line, max_digits + 2 to 1048576 [default: 16384] (also SQUARE_SERVER_MAX_LINE)
    #[arg(long, value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_line: Option<usize>,
}

fn main() -> ExitCode {
    let (_, settings, _log) = match start::<Args, Settings>(PROGRAM, |a| &a.common, |s| &s.log) {
        Ok(started) => started,
        Err(code) => return code,
    };
    let endpoint = Endpoint::listen(PROGRAM, ENDPOINT, settings.listen);
    serve_endpoint(endpoint, |listener| async move {
        square_server::run(listener, settings, common::signal::shutdown()).await;
        Ok(())
    })
}
