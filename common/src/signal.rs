//! Waiting for the signals that end a program.

use tokio::signal::unix::{signal, SignalKind};

/// Completes on SIGINT or SIGTERM, and logs which arrived.
pub async fn shutdown() {
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "shutting down");
}
