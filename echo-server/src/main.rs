//! `echo-server`: the date/time service, with its configuration resolved
//! by the shared role runtime.

use std::process::ExitCode;

use clap::Parser;
use common::cli::{serve_endpoint, start, CommonArgs, ServeArgs};
use common::endpoint::Endpoint;
use echo_server::{run, Settings, ENDPOINT, PROGRAM};
use serde::Serialize;

// A session's buffers come and go with bursts of input. jemalloc, with its
// background thread, gives freed pages back to the system within seconds
// even when the server then sits idle, so the process returns to its size
// at rest when clients leave; glibc's allocator and mimalloc keep them
// until the same threads allocate again.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The date/time service: connect with `telnet HOST 1234` and pick from the menu.
///
/// Every setting can also come from a YAML file (--config) or from an
/// ECHO_SERVER_* environment variable (ECHO_SERVER_LISTEN, ECHO_SERVER_UTC,
/// ECHO_SERVER_IDLE_TIMEOUT, ...); flags win over both.
#[derive(Debug, Parser, Serialize)]
#[command(version, about, long_about)]
struct Args {
    /// Address to listen on [default: 0.0.0.0:1234]
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<String>,

    /// Answer in UTC instead of the server's local time zone
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    utc: bool,

    /// Answer in this IANA time zone, such as Europe/Amsterdam
    #[arg(long, value_name = "ZONE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    time_zone: Option<String>,

    /// This instance's id, shown in the greeting [default: echo-server_IN_0]
    #[arg(long, value_name = "ID")]
    #[serde(skip_serializing_if = "Option::is_none")]
    instance: Option<String>,

    #[command(flatten)]
    #[serde(flatten)]
    serve: ServeArgs,

    #[command(flatten)]
    #[serde(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let (_, settings, _log) = match start::<Args, Settings>(PROGRAM, |a| &a.common, |s| &s.log) {
        Ok(started) => started,
        Err(code) => return code,
    };
    let endpoint = Endpoint::listen(PROGRAM, ENDPOINT, settings.listen);
    serve_endpoint(endpoint, |listener| {
        run(listener, settings, common::signal::shutdown())
    })
}
