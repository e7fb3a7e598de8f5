//! Logging to stderr through tracing: human text or JSON lines, level from
//! `--log-level`, the configuration, or `RUST_LOG`.
//!
//! A log is a side channel: it must never change what a program does. Lines
//! go through a bounded queue to a writer thread ([`tracing_appender`]'s
//! non-blocking writer), so a slow or stopped reader of stderr never blocks
//! a runtime thread; when the queue is full, or the write fails (a closed
//! pipe, a full disk, a terminal that went away), the line is dropped and
//! counted ([`dropped_lines`]), never a panic.

use std::cell::RefCell;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::UNIX_EPOCH;

pub use tracing_appender::non_blocking::NonBlocking;
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
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

/// How long the writer thread lets lines gather after writing a batch.
const GATHER: std::time::Duration = std::time::Duration::from_millis(10);

/// Bytes gathered before they are written without waiting for the batch's end.
const GATHER_BYTES: usize = 64 * 1024;

/// The writer thread's side: lines from the queue gather in memory and go
/// to the sink in one write per batch (the writer thread flushes at the
/// end of each batch), then the thread pauses for [`GATHER`]. A program
/// that logs a line per connection would otherwise wake the writer thread
/// and make a system call for each line: at thousands of connections a
/// second, a fifth of the tunnel's CPU time per connection went to that.
/// A line waits at most about [`GATHER`]; failures are counted per line,
/// as [`Lossy`] does, and never reported.
#[derive(Debug)]
struct Batched<W: Write> {
    sink: W,
    pending: Vec<u8>,
    lines: u64,
}

impl<W: Write> Batched<W> {
    fn new(sink: W) -> Self {
        Batched {
            sink,
            pending: Vec::new(),
            lines: 0,
        }
    }

    fn write_pending(&mut self) {
        if !self.pending.is_empty() && self.sink.write_all(&self.pending).is_err() {
            FAILED_WRITES.fetch_add(self.lines, Ordering::Relaxed);
        }
        self.pending.clear();
        self.lines = 0;
    }
}

impl<W: Write> Write for Batched<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Each write is one queued line, whole.
        self.pending.extend_from_slice(buf);
        self.lines += 1;
        if self.pending.len() >= GATHER_BYTES {
            self.write_pending();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let wrote = !self.pending.is_empty();
        self.write_pending();
        let _ = self.sink.flush();
        if wrote {
            std::thread::sleep(GATHER);
        }
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
        .finish(Batched::new(sink));
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
    let plain = settings.log_format == LogFormat::Text && !ansi;
    let own = writer.clone();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Its own complaint about a failed write would go to stderr with
        // `eprintln!`, which panics when stderr is gone.
        .log_internal_errors(false)
        .with_timer(Stamp)
        .with_writer(writer);
    let installed = match settings.log_format {
        LogFormat::Text => builder.with_ansi(ansi).try_init(),
        LogFormat::Json => builder.json().with_current_span(true).try_init(),
    };
    if installed.is_ok() && plain {
        let _ = PLAIN.set(own);
    }
    if let Some(e) = bad {
        tracing::warn!(filter = %spec, error = %e, "unusable log level; using info");
    }
    LogGuard {
        _writer: installed.is_ok().then_some(guard),
    }
}

/// The time stamp of every log line, exactly as tracing-subscriber's
/// default ([`SystemTime`]) writes it, `2025-01-31T12:00:00.123456Z`, with
/// the date and time up to the second formatted once a second per thread:
/// the tunnel logs a line per connection, and the calendar arithmetic and
/// formatting were a tenth of what a short connection cost.
#[derive(Debug, Clone, Copy, Default)]
struct Stamp;

/// 9999-12-31T23:59:59Z: later stamps (and any before 1970) are left to
/// [`SystemTime`].
const LAST_FOUR_DIGIT_SECOND: u64 = 253_402_300_799;

thread_local! {
    /// The second last stamped on this thread, and its text up to the dot.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

impl FormatTime for Stamp {
    fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
        match Stamp::now(|second, tail| {
            w.write_str(second)?;
            w.write_str(tail)
        }) {
            Some(written) => written,
            None => SystemTime.format_time(w),
        }
    }
}

impl Stamp {
    /// Calls `write` with the time stamp of now in two parts (up to the
    /// second, then the fraction and `Z`); `None` outside the years this
    /// formats.
    fn now<R>(write: impl FnOnce(&str, &str) -> R) -> Option<R> {
        let since = match std::time::SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(since) if since.as_secs() <= LAST_FOUR_DIGIT_SECOND => since,
            _ => return None,
        };
        let mut tail = *b".000000Z";
        let mut micros = since.subsec_micros();
        for digit in tail[1..7].iter_mut().rev() {
            *digit = b'0' + (micros % 10) as u8;
            micros /= 10;
        }
        let tail = std::str::from_utf8(&tail).expect("ASCII digits");
        Some(SECOND.with(|second| {
            let mut second = second.borrow_mut();
            if second.0 != since.as_secs() {
                *second = (since.as_secs(), to_the_second(since.as_secs()));
            }
            write(&second.1, tail)
        }))
    }
}

/// The log's writer, when its lines are plain text (no colours, not
/// JSON): see [`plain_info`].
static PLAIN: std::sync::OnceLock<NonBlocking> = std::sync::OnceLock::new();

/// Writes an info line of `target` straight to the log's writer, as the
/// text format writes one (`<time>  INFO <target>: `, then what `body`
/// appends: the message and ` key=value` fields, `&str` values quoted),
/// without the formatter's work per field: for a line per connection.
/// False when the log is not plain text (colours, JSON, or not installed
/// here): the caller logs through `tracing` then. Whether the level is on
/// is the caller's to check (`tracing::enabled!`).
pub fn plain_info(target: &str, body: impl FnOnce(&mut String)) -> bool {
    let Some(writer) = PLAIN.get() else {
        return false;
    };
    let mut line = String::with_capacity(256);
    if Stamp::now(|second, tail| {
        line.push_str(second);
        line.push_str(tail);
    })
    .is_none()
    {
        return false;
    }
    line.push_str("  INFO ");
    line.push_str(target);
    line.push_str(": ");
    body(&mut line);
    line.push('\n');
    // One write is one queued line, whole.
    let _ = writer.clone().write_all(line.as_bytes());
    true
}

/// `secs` after the epoch as `YYYY-MM-DDTHH:MM:SS` (UTC, proleptic
/// Gregorian calendar), for years 1970 to 9999.
fn to_the_second(secs: u64) -> String {
    // Days to a civil date, counted in 400-year eras from 0000-03-01 (so
    // that the leap day ends a year).
    let days = (secs / 86_400) as i64 + 719_468;
    let (era, day_of_era) = (days.div_euclid(146_097), days.rem_euclid(146_097));
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = era * 400 + year_of_era + i64::from(month <= 2);
    let in_day = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        in_day / 3_600,
        in_day / 60 % 60,
        in_day % 60
    )
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
    fn calendar_dates_to_the_second() {
        assert_eq!(to_the_second(0), "1970-01-01T00:00:00");
        assert_eq!(to_the_second(951_782_400), "2000-02-29T00:00:00");
        assert_eq!(to_the_second(1_709_251_199), "2024-02-29T23:59:59");
        assert_eq!(to_the_second(1_709_251_200), "2024-03-01T00:00:00");
        assert_eq!(to_the_second(4_107_542_400), "2100-03-01T00:00:00");
        assert_eq!(to_the_second(LAST_FOUR_DIGIT_SECOND), "9999-12-31T23:59:59");
    }

    fn stamp(timer: impl FormatTime) -> String {
        let mut text = String::new();
        timer.format_time(&mut Writer::new(&mut text)).unwrap();
        text
    }

    /// Every field in the same place as tracing-subscriber's own stamp,
    /// twice within a second (the second time from the cache).
    #[test]
    fn the_stamp_reads_as_the_default_one() {
        for _ in 0..2 {
            let (ours, theirs) = loop {
                let (ours, theirs) = (stamp(Stamp), stamp(SystemTime));
                // Taken a moment apart: retry if a second began in between.
                if ours[..19] == theirs[..19] {
                    break (ours, theirs);
                }
            };
            assert_eq!(ours.len(), theirs.len(), "{ours} against {theirs}");
            assert_eq!(
                ours.bytes().map(|b| b.is_ascii_digit()).collect::<Vec<_>>(),
                theirs
                    .bytes()
                    .map(|b| b.is_ascii_digit())
                    .collect::<Vec<_>>(),
                "{ours} against {theirs}"
            );
            assert!(ours.ends_with('Z'));
        }
    }

    /// Lines gather until the batch ends (a flush), then go out in one
    /// write; a failed batch counts each of its lines.
    #[test]
    fn lines_go_out_in_one_write_per_batch() {
        #[derive(Default)]
        struct Writes(Vec<Vec<u8>>);
        impl Write for Writes {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.0.push(buf.to_vec());
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut batched = Batched::new(Writes::default());
        batched.write_all(b"one\n").unwrap();
        batched.write_all(b"two\n").unwrap();
        assert!(batched.sink.0.is_empty());
        batched.flush().unwrap();
        assert_eq!(batched.sink.0, vec![b"one\ntwo\n".to_vec()]);

        let before = FAILED_WRITES.load(Ordering::Relaxed);
        let mut broken = Batched::new(Broken);
        for _ in 0..3 {
            assert_eq!(broken.write(b"a line\n").unwrap(), 7);
        }
        broken.flush().unwrap();
        assert!(FAILED_WRITES.load(Ordering::Relaxed) >= before + 3);
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
