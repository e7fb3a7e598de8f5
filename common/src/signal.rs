//! The signals that end a program, and stopping in two steps.
//!
//! The first SIGINT or SIGTERM starts a graceful stop: stop accepting, let
//! connections finish within the grace period. A second one, while that
//! runs, means "now": every drain closes what is left at once, as an
//! impatient operator pressing Ctrl-C twice expects. [`Shutdown`] is those
//! two steps; [`process`] is the one the process's signals drive.

use std::io;
use std::sync::OnceLock;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// A stop in two steps: begun (finish what you are doing) and hurried
/// (stop now). Clones share the steps.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    begun: CancellationToken,
    hurried: CancellationToken,
}

impl Shutdown {
    /// A shutdown nothing has asked for yet.
    pub fn new() -> Self {
        Shutdown::default()
    }

    /// Starts a graceful stop.
    pub fn begin(&self) {
        self.begun.cancel();
    }

    /// Cuts the stop short (and begins it if it had not begun).
    pub fn hurry(&self) {
        self.begun.cancel();
        self.hurried.cancel();
    }

    /// Cancelled when the stop begins.
    pub fn begun(&self) -> &CancellationToken {
        &self.begun
    }

    /// Cancelled when the stop is hurried.
    pub fn hurried(&self) -> &CancellationToken {
        &self.hurried
    }
}

/// The process's own shutdown, driven by signals once [`listen`] is called.
pub fn process() -> &'static Shutdown {
    static PROCESS: OnceLock<Shutdown> = OnceLock::new();
    PROCESS.get_or_init(Shutdown::new)
}

/// Cancelled when a second stop signal arrives: drains stop waiting for
/// their grace period.
pub fn hurry() -> &'static CancellationToken {
    process().hurried()
}

/// The signals every server stops on.
pub const STOP_SIGNALS: &[(SignalKind, &str)] = &[
    (SignalKind::interrupt(), "SIGINT"),
    (SignalKind::terminate(), "SIGTERM"),
];

/// Drives [`process`] from `kinds` (each with its name for the log): the
/// first begins the stop, a second hurries it. The handlers are installed
/// at once (call it within a Tokio runtime, before anything starts), so
/// none of these signals finds its default action, which would kill the
/// process mid-stride.
pub fn listen(kinds: &[(SignalKind, &'static str)]) -> io::Result<&'static Shutdown> {
    let (arrived, mut arrivals) = tokio::sync::mpsc::unbounded_channel();
    for (kind, name) in kinds {
        let mut stream = signal(*kind)?;
        let (arrived, name) = (arrived.clone(), *name);
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if arrived.send(name).is_err() {
                    return;
                }
            }
        });
    }
    tokio::spawn(async move {
        let Some(first) = arrivals.recv().await else {
            return;
        };
        tracing::info!(signal = first, "stopping; send it again to stop at once");
        process().begin();
        let Some(second) = arrivals.recv().await else {
            return;
        };
        tracing::warn!(signal = second, "second signal: stopping at once");
        process().hurry();
    });
    Ok(process())
}

/// Completes when a SIGINT or SIGTERM begins the stop (see [`listen`]).
pub async fn shutdown() {
    match listen(STOP_SIGNALS) {
        Ok(stop) => stop.begun().cancelled().await,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch for SIGINT and SIGTERM; stop with SIGKILL");
            std::future::pending().await
        }
    }
}
