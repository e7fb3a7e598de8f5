//! Waiting for the signals that end a program.
//!
//! The first SIGINT or SIGTERM starts a graceful stop: stop accepting, let
//! connections finish within the grace period. A second one, while that
//! runs, means "now": [`hurry`] is cancelled and every drain closes what is
//! left at once, as an impatient operator pressing Ctrl-C twice expects.

use std::sync::OnceLock;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

static HURRY: OnceLock<CancellationToken> = OnceLock::new();

/// Cancelled when a second SIGINT or SIGTERM arrives after [`shutdown`]
/// completed: drains stop waiting for the grace period.
pub fn hurry() -> &'static CancellationToken {
    HURRY.get_or_init(CancellationToken::new)
}

/// Completes on SIGINT or SIGTERM, and logs which arrived; from then on a
/// second one cancels [`hurry`].
pub async fn shutdown() {
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(
        signal = name,
        "shutting down; send it again to close every connection now"
    );
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::warn!(
            signal = name,
            "second signal: closing the remaining connections now"
        );
        hurry().cancel();
    });
}
