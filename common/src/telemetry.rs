//! Logging to stderr through tracing: human text or JSON lines, level from
//! `--log-level`, the configuration, or `RUST_LOG`.

use tracing_subscriber::EnvFilter;

use crate::settings::{LogFormat, LogSettings};

/// Installs the global subscriber. An unusable filter is reported and `info`
/// is used instead. Safe to call more than once (later calls do nothing).
pub fn init(settings: &LogSettings) {
    let spec = settings
        .log_level
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".to_string());
    let (filter, bad) = match EnvFilter::try_new(&spec) {
        Ok(filter) => (filter, None),
        Err(e) => (EnvFilter::new("info"), Some(e)),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match settings.log_format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder.json().with_current_span(true).try_init(),
    };
    if let Some(e) = bad {
        tracing::warn!(filter = %spec, error = %e, "unusable log level; using info");
    }
}
