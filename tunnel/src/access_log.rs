//! One line per connection: time, route, client, target, bytes each way,
//! duration, how it ended, and more about a failure. Lines go to the log
//! (target `access`, the same fields in the same order, the target as
//! `target_addr` and the duration as `duration_ms`) and, when configured,
//! are appended to a file, like rinetd's `logfile`.
//!
//! The file is written by a thread of its own through a bounded queue
//! ([`common::telemetry::non_blocking`]): a slow disk never stalls a
//! connection, and a full disk or a full queue drops lines (counted in
//! `tunnel_log_lines_dropped_total`), never the connection.

use std::fmt;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tracing_appender::non_blocking::{NonBlocking, WorkerGuard};

use crate::relay;

/// How a connection ended, as the access log says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The route's access lists refused the client: `refused by access
    /// list`.
    Refused,
    /// No target could be reached: `target unreachable`.
    Unreachable,
    /// The client's TLS handshake failed: `TLS handshake failed`.
    Handshake,
    /// No route of an address shared by server name took the client:
    /// `no route for the server name`.
    NoRoute,
    /// The connection's PROXY protocol header was malformed, incomplete,
    /// missing, or sent by a source not in `accept_proxy`: `PROXY header
    /// refused`.
    ProxyHeader,
    /// The client's address or prefix was over the route's per-source
    /// limits: `refused: per-source limit`.
    PerSource,
    /// Relayed to a target, and ended so (`closed by client`, `idle
    /// timeout`, ...).
    Relayed(relay::End),
}

impl End {
    /// The words of the access log.
    pub fn as_str(self) -> &'static str {
        match self {
            End::Refused => "refused by access list",
            End::Unreachable => "target unreachable",
            End::Handshake => "TLS handshake failed",
            End::NoRoute => "no route for the server name",
            End::ProxyHeader => "PROXY header refused",
            End::PerSource => "refused: per-source limit",
            End::Relayed(end) => end.as_str(),
        }
    }
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One connection, as the access log records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<'a> {
    /// The route's name.
    pub route: &'a str,
    /// The client's address (the one a PROXY header named, when it came
    /// through a balancer).
    pub client: SocketAddr,
    /// The balancer the client came through, when a PROXY header named
    /// it.
    pub via: Option<SocketAddr>,
    /// The target as connected (an address), or as configured when no
    /// connection was made.
    pub target: String,
    /// Bytes from the client to the target.
    pub sent: u64,
    /// Bytes from the target to the client.
    pub received: u64,
    /// From accept to close.
    pub duration: Duration,
    /// How it ended.
    pub end: End,
    /// More about a failure.
    pub detail: Option<String>,
}

impl Entry<'_> {
    /// The log's line after its target, as the text format writes the
    /// `tracing` event of [`AccessLog::record`] (`connection route="..."
    /// client=...`): `&str` values quoted as `{:?}` does, an absent value
    /// left out.
    pub fn fields(&self, line: &mut String) {
        use std::fmt::Write as _;
        let _ = write!(
            line,
            "connection route={:?} client={}",
            self.route, self.client
        );
        if let Some(via) = self.via {
            let _ = write!(line, " via={via}");
        }
        let _ = write!(
            line,
            " target_addr={} sent={} received={} duration_ms={} end={:?}",
            self.target,
            self.sent,
            self.received,
            self.duration.as_millis() as u64,
            self.end.as_str()
        );
        if let Some(detail) = &self.detail {
            let _ = write!(line, " detail={detail:?}");
        }
    }

    /// The entry as one line, without the time stamp.
    pub fn line(&self) -> String {
        let via = self.via.map(|v| format!(" via={v}")).unwrap_or_default();
        let mut line = format!(
            "route={} client={}{via} target={} sent={} received={} duration={:.3}s end=\"{}\"",
            self.route,
            self.client,
            self.target,
            self.sent,
            self.received,
            self.duration.as_secs_f64(),
            self.end
        );
        if let Some(detail) = &self.detail {
            line.push_str(&format!(" detail=\"{}\"", detail.replace('"', "'")));
        }
        line
    }
}

/// Where access-log lines go.
#[derive(Debug, Default)]
pub struct AccessLog {
    /// The file's writer, and the guard that flushes it when the log is
    /// dropped.
    file: Option<(NonBlocking, WorkerGuard)>,
    log_empty: bool,
}

impl AccessLog {
    /// Lines only to the log.
    pub fn to_log() -> Self {
        AccessLog::default()
    }

    /// Whether connections that carried no byte and were closed by the
    /// client (health checks, port probes) get a line too; otherwise they
    /// are logged at debug level only, like HAProxy's `dontlognull`.
    pub fn log_empty(mut self, yes: bool) -> Self {
        self.log_empty = yes;
        self
    }

    /// Lines to the log and appended to `path`.
    pub fn to_file(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(AccessLog {
            file: Some(common::telemetry::non_blocking(file, "access-log")),
            log_empty: false,
        })
    }

    /// Records one connection.
    pub fn record(&self, entry: &Entry<'_>) {
        let empty = entry.sent == 0
            && entry.received == 0
            && entry.end == End::Relayed(relay::End::ClosedByClient);
        if empty && !self.log_empty {
            tracing::debug!(target: "access", route = entry.route, client = %entry.client, "connection closed without a byte");
            return;
        }
        if tracing::enabled!(target: "access", tracing::Level::INFO)
            && common::telemetry::plain_info("access", |line| entry.fields(line))
        {
            // The same line, written without the formatter's work per field.
        } else {
            self.event(entry);
        }
        if self.file.is_some() {
            // Formatted only for a file: most tunnels log to stderr alone.
            self.append(&entry.line());
        }
    }

    /// The line as a `tracing` event, for any log that is not plain text.
    fn event(&self, entry: &Entry<'_>) {
        tracing::info!(
            target: "access",
            route = entry.route,
            client = %entry.client,
            via = entry.via.map(tracing::field::display),
            target_addr = %entry.target,
            sent = entry.sent,
            received = entry.received,
            duration_ms = entry.duration.as_millis() as u64,
            end = entry.end.as_str(),
            detail = entry.detail.as_deref(),
            "connection"
        );
    }

    /// Appends `line` (without its time stamp) to the file, if there is
    /// one: for lines of another shape, such as a UDP session's.
    pub fn append(&self, line: &str) {
        if let Some((file, _)) = &self.file {
            let stamp = jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.3fZ");
            let line = format!("{stamp} {line}\n");
            // One write is one queued line, whole; the writer thread
            // appends it.
            let _ = file.clone().write_all(line.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the log's text format writes for the `tracing` event of
    /// `entry` (without the time stamp).
    fn formatted(entry: &Entry<'_>) -> String {
        #[derive(Clone, Default)]
        struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let out = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .without_time()
            .with_writer(move || out.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || AccessLog::to_log().event(entry));
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        text
    }

    #[test]
    fn the_fast_line_is_the_formatted_event_byte_for_byte() {
        let mut entry = Entry {
            route: "a \"quoted\" route",
            client: "10.1.2.3:50122".parse().unwrap(),
            via: None,
            target: "10.0.0.5:5432".into(),
            sent: 120,
            received: 4096,
            duration: Duration::from_millis(2345),
            end: End::Relayed(relay::End::ClosedByClient),
            detail: None,
        };
        for (via, detail) in [
            (None, None),
            (
                Some("127.0.0.1:40000"),
                Some("connection refused (os error 111)"),
            ),
        ] {
            entry.via = via.map(|v| v.parse().unwrap());
            entry.detail = detail.map(str::to_string);
            let mut fast = String::from(" INFO access: ");
            entry.fields(&mut fast);
            fast.push('\n');
            assert_eq!(fast, formatted(&entry));
        }
    }

    /// The line the README shows, with the end in the access log's words.
    #[test]
    fn a_line_says_how_the_connection_ended_in_words() {
        let mut entry = Entry {
            route: "postgres",
            client: "10.1.2.3:50122".parse().unwrap(),
            via: None,
            target: "10.0.0.5:5432".into(),
            sent: 1834,
            received: 92810,
            duration: Duration::from_millis(12_503),
            end: End::Relayed(relay::End::ClosedByClient),
            detail: None,
        };
        assert_eq!(
            entry.line(),
            "route=postgres client=10.1.2.3:50122 target=10.0.0.5:5432 sent=1834 received=92810 duration=12.503s end=\"closed by client\""
        );
        entry.end = End::Unreachable;
        entry.detail = Some("10.0.0.5:5432: connection \"refused\"".into());
        assert!(entry.line().ends_with(
            "end=\"target unreachable\" detail=\"10.0.0.5:5432: connection 'refused'\""
        ));
        assert_eq!(End::Refused.to_string(), "refused by access list");
        // A client named by a balancer's PROXY header: both are recorded.
        entry.via = Some("10.0.0.9:40000".parse().unwrap());
        assert!(entry
            .line()
            .starts_with("route=postgres client=10.1.2.3:50122 via=10.0.0.9:40000 target="));
    }
}
