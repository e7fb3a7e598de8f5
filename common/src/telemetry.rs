//! Logging to stderr through tracing: human text or JSON lines, level from
//! `--log-level`, the configuration, or `RUST_LOG`.
//!
//! A log is a side channel: it must never change what a program does. Lines
//! go through a bounded queue to a writer thread ([`tracing_appender`]'s
//! non-blocking writer), so a slow or stopped reader of stderr never blocks
//! a runtime thread; when the queue is full, or the write fails (a closed
//! pipe, a full disk, a terminal that went away), the line is dropped and
//! counted ([`dropped_lines`]), never a panic.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

use crate::settings::{LogFormat, LogSettings};

/// Lines a writer thread may have queued before new ones are dropped.
const QUEUED_LINES: usize = 16 * 1024;

/// Writes that failed, over every [`Lossy`] writer of the process.
static FAILED_WRITES: AtomicU64 = AtomicU64::new(0);

/// The queues' own counters of lines dropped because they were full.
static QUEUES: OnceLock<std::sync::Mutex<Vec<ErrorCounter>>> = OnceLock::new();

/// Log and access-log lines lost so far: dropped because the writer could
/// not keep up, or because writing them failed.
pub fn dropped_lines() -> u64 {
    let queued: usize = QUEUES
        .get()
        .and_then(|q| {
            q.lock()
                .ok()
                .map(|q| q.iter().map(ErrorCounter::dropped_lines).sum())
        })
        .unwrap_or(0);
    FAILED_WRITES.load(Ordering::Relaxed) + queued as u64
}

/// A writer whose failures are counted and otherwise ignored: the caller
/// always sees success, so nothing above it (tracing's formatter, an access
/// log) ever reports, retries or panics because of a log line.
#[derive(Debug)]
pub struct Lossy<W>(pub W);

impl<W: Write> Write for Lossy<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.0.write_all(buf).is_err() {
            FAILED_WRITES.fetch_add(1, Ordering::Relaxed);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = self.0.flush();
        Ok(())
    }
}

/// A lossy, non-blocking writer to `sink` on a thread named `name`, and the
/// guard that flushes it when dropped (keep it until the program ends).
pub fn non_blocking<W: Write + Send + 'static>(sink: W, name: &str) -> (NonBlocking, WorkerGuard) {
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name(name)
        .finish(Lossy(sink));
    if let Ok(mut queues) = QUEUES.get_or_init(Default::default).lock() {
        queues.push(writer.error_counter());
    }
    (writer, guard)
}

/// Keeps the log's writer thread; dropping it flushes what is queued (for
/// at most about a second, so a stuck stderr cannot hold up an exit).
#[must_use = "dropping the guard at once stops the log"]
#[derive(Debug)]
pub struct LogGuard {
    _writer: Option<WorkerGuard>,
}

/// Installs the global subscriber. An unusable filter is reported and `info`
/// is used instead. Safe to call more than once (later calls do nothing and
/// return an empty guard).
pub fn init(settings: &LogSettings) -> LogGuard {
    let spec = settings
        .log_level
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".to_string());
    let (filter, bad) = match EnvFilter::try_new(&spec) {
        Ok(filter) => (filter, None),
        Err(e) => (EnvFilter::new("info"), Some(e)),
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = non_blocking(std::io::stderr(), "log-writer");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Its own complaint about a failed write would go to stderr with
        // `eprintln!`, which panics when stderr is gone.
        .log_internal_errors(false)
        .with_writer(writer);
    let installed = match settings.log_format {
        LogFormat::Text => builder.with_ansi(ansi).try_init(),
        LogFormat::Json => builder.json().with_current_span(true).try_init(),
    };
    if let Some(e) = bad {
        tracing::warn!(filter = %spec, error = %e, "unusable log level; using info");
    }
    LogGuard {
        _writer: installed.is_ok().then_some(guard),
    }
}

/// Writes `text` to stderr for a person to read (a configuration error, a
/// usage message): never panics, whatever stderr is.
pub fn say(text: impl std::fmt::Display) {
    let _ = writeln!(io::stderr().lock(), "{text}");
}

/// Writes `text` to stdout as a program's result: never panics when stdout
/// is closed (the reader has its answer, or went away).
pub fn show(text: impl std::fmt::Display) {
    let mut out = io::stdout().lock();
    let _ = write!(out, "{text}");
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
    }

    #[test]
    fn a_failed_write_is_counted_not_reported() {
        let before = FAILED_WRITES.load(Ordering::Relaxed);
        let mut w = Lossy(Broken);
        assert_eq!(w.write(b"a line\n").unwrap(), 7);
        w.flush().unwrap();
        assert_eq!(FAILED_WRITES.load(Ordering::Relaxed), before + 1);
    }
}
