//! The tokio runtimes the programs run on, built one way, with one wording
//! for the rare failure to start one.

use std::fmt;

use tokio::runtime::{Builder, Runtime};

/// Which runtime a program or a thread needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// Worker threads, one per core: tokio's default runtime.
    MultiThread,
    /// Everything on the thread that runs it.
    CurrentThread,
}

/// Why a runtime could not be started (the system refused a thread or a
/// descriptor, say).
#[derive(Debug)]
pub struct StartError(pub std::io::Error);

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot start the runtime: {}", self.0)
    }
}

impl std::error::Error for StartError {}

/// Builds a runtime of `flavor` with its timers and I/O driver on.
pub fn start(flavor: Flavor) -> Result<Runtime, StartError> {
    let mut builder = match flavor {
        Flavor::MultiThread => Builder::new_multi_thread(),
        Flavor::CurrentThread => Builder::new_current_thread(),
    };
    builder.enable_all().build().map_err(StartError)
}
