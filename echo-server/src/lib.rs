//! The date/time service people reach with `telnet`.
//!
//! On connect a client sees a greeting naming the host and the instance, a
//! numbered menu and a prompt: `1` answers `Current date: YYYY-MM-DD`, `2`
//! answers `Current time: HH:MM:SS` (24-hour), `9` says goodbye and closes.
//! Anything else gets one line saying what was wrong, then the menu again.
//! A session is bounded: a line longer than the limit ends it, and so does a
//! telnet subnegotiation that never ends, or a client that sends nothing (or
//! takes none of its answers) for the idle timeout; none of this affects any
//! other session. Its memory is bounded too: a client that sends and never
//! reads stops being read once [`OUTPUT_BOUND`] bytes of answers wait for
//! it. On shutdown every connected user is told before the connection
//! closes.

pub mod telnet;

use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use common::config::{ConfigError, Origin};
use common::serve::{Accepted, Handler, ServeOptions, Stream};
use common::settings::{ListenAddr, LogSettings, ServeSettings};
use jiff::tz::TimeZone;
use jiff::{Timestamp, Zoned};
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::telnet::{Input, LineReader, SUBNEGOTIATION_LIMIT};

/// Bytes read from a client at a time.
pub const READ_SIZE: usize = 4096;
/// Answers waiting to be sent, in bytes, past which a session sends them
/// and reads no more input until the client has taken them. One answer
/// more may go over it (a wrong choice's answer is about 200 bytes).
pub const OUTPUT_BOUND: usize = 16 * 1024;
/// The output buffer a session keeps while it waits for input; a larger
/// one, grown by a burst of answers, is given back.
const KEPT_OUTPUT: usize = 1024;
/// The kernel's send buffer for each client (Linux doubles it for its own
/// bookkeeping). Left to itself the kernel grows it to megabytes for a
/// client that takes nothing, and the session fills it with answers: a
/// menu needs far less, and so a client that never reads costs the
/// machine little memory and the server little work.
pub const SOCKET_SEND_BUFFER: usize = 32 * 1024;
/// The kernel's receive buffer for each client: what a client can have
/// waiting that the session has not read yet.
pub const SOCKET_RECEIVE_BUFFER: usize = 16 * 1024;

/// The program's name: its configuration prefix is `ECHO_SERVER_`.
pub const PROGRAM: &str = "echo-server";
/// The endpoint's name, as in the original service definition.
pub const ENDPOINT: &str = "EchoEndpoint";

/// The service's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Where to listen (the `EchoEndpoint`).
    pub listen: ListenAddr,
    /// This instance's id, shown in the greeting: printable, at most
    /// [`INSTANCE_LIMIT`] characters.
    #[serde(deserialize_with = "instance_id")]
    pub instance: String,
    /// Answer in UTC instead of the local time zone.
    pub utc: bool,
    /// Answer in this IANA time zone (`Europe/Amsterdam`) instead of the
    /// local one.
    pub time_zone: Option<ZoneName>,
    /// Longest accepted input line, in bytes: 1 to [`MAX_LINE_LIMIT`].
    #[serde(deserialize_with = "line_limit")]
    pub max_line: usize,
    /// Connection cap, access lists, idle timeout, shutdown grace.
    #[serde(flatten)]
    pub serve: ServeSettings,
    /// Log level and format.
    #[serde(flatten)]
    pub log: LogSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: ListenAddr(([0, 0, 0, 0], 1234).into()),
            instance: format!("{PROGRAM}_IN_0"),
            utc: false,
            time_zone: None,
            max_line: 1024,
            serve: ServeSettings::default(),
            log: LogSettings::default(),
        }
    }
}

/// The largest `max_line`: a line is kept whole until it ends, so this
/// bounds what a session holds for one.
pub const MAX_LINE_LIMIT: usize = 64 * 1024;

/// The longest instance id, in characters (a Kubernetes pod name, which a
/// cluster hands over as the id, is at most 253).
pub const INSTANCE_LIMIT: usize = 253;

fn check_max_line(n: u64) -> Result<usize, String> {
    usize::try_from(n)
        .ok()
        .filter(|n| (1..=MAX_LINE_LIMIT).contains(n))
        .ok_or_else(|| {
            format!("the line limit must be 1 to {MAX_LINE_LIMIT} bytes; the default is 1024")
        })
}

fn line_limit<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    struct V;
    impl de::Visitor<'_> for V {
        type Value = usize;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "a number of bytes, 1 to {MAX_LINE_LIMIT}")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<usize, E> {
            check_max_line(v).map_err(E::custom)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<usize, E> {
            check_max_line(u64::try_from(v).unwrap_or(0)).map_err(E::custom)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<usize, E> {
            match v.trim().parse::<i128>() {
                Ok(n) => check_max_line(u64::try_from(n).unwrap_or(0)).map_err(E::custom),
                Err(_) => Err(E::custom(format!(
                    "not a number of bytes; write one from 1 to {MAX_LINE_LIMIT}, such as 1024"
                ))),
            }
        }
    }
    d.deserialize_any(V)
}

fn check_instance(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err(
            "the instance id is empty; leave it unset for the default, or name the instance".into(),
        );
    }
    if id.chars().count() > INSTANCE_LIMIT {
        return Err(format!(
            "the instance id is longer than {INSTANCE_LIMIT} characters; use a shorter one"
        ));
    }
    if id.chars().any(char::is_control) {
        return Err(
            "the instance id has control characters (it is shown to users); use printable ones"
                .into(),
        );
    }
    Ok(())
}

fn instance_id<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct V;
    impl de::Visitor<'_> for V {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an instance id such as echo-server_IN_0")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            check_instance(v).map_err(E::custom)?;
            Ok(v.to_string())
        }
        // An id that looks like a number arrives as one from the
        // environment.
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    d.deserialize_any(V)
}

impl Settings {
    /// Settings that contradict each other, which no single value shows:
    /// reported like any bad value, with the key, the value and where it
    /// came from (`origin` tells that for a key).
    pub fn conflicts(&self, origin: &dyn Fn(&str) -> Option<Origin>) -> Vec<ConfigError> {
        let mut problems = Vec::new();
        if let (true, Some(zone)) = (self.utc, &self.time_zone) {
            let utc_from = origin("utc")
                .map(|o| format!(" (from {o})"))
                .unwrap_or_default();
            problems.push(ConfigError {
                key: "time_zone".into(),
                value: Some(format!("{:?}", zone.0)),
                origin: origin("time_zone"),
                message: format!(
                    "utc = true{utc_from} chooses a zone too; keep one of the two settings"
                ),
            });
        }
        problems
    }

    /// Every problem with these settings, for settings that were not read
    /// through the configuration (which refuses each bad value with its
    /// origin).
    pub fn check(&self) -> anyhow::Result<()> {
        let mut problems: Vec<String> = self
            .conflicts(&|_| None)
            .into_iter()
            .map(|e| e.to_string())
            .collect();
        if let Err(e) = check_max_line(self.max_line as u64) {
            problems.push(format!("max_line = {}: {e}", self.max_line));
        }
        if let Err(e) = check_instance(&self.instance) {
            problems.push(format!("instance = {:?}: {e}", self.instance));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("invalid settings: {}", problems.join("; "))
        }
    }
}

/// An IANA time zone name that this machine (or the built-in database)
/// knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneName(pub String);

impl FromStr for ZoneName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        TimeZone::get(s)
            .map(|_| ZoneName(s.to_string()))
            .map_err(|_| {
                format!("unknown time zone {s:?}; use an IANA name such as UTC or Europe/Amsterdam")
            })
    }
}

impl Serialize for ZoneName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ZoneName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

/// Which clock the service reads.
#[derive(Debug, Clone)]
pub struct Clock {
    zone: TimeZone,
    name: String,
}

impl Clock {
    /// The clock the settings ask for: UTC, a named zone, or the system's.
    pub fn from_settings(settings: &Settings) -> anyhow::Result<Clock> {
        if settings.utc {
            return Ok(Clock {
                zone: TimeZone::UTC,
                name: "UTC".into(),
            });
        }
        if let Some(ZoneName(name)) = &settings.time_zone {
            let zone = TimeZone::get(name).with_context(|| format!("time zone {name}"))?;
            return Ok(Clock {
                zone,
                name: name.clone(),
            });
        }
        let zone = TimeZone::system();
        let name = zone
            .iana_name()
            .map(str::to_string)
            .unwrap_or_else(|| "the server's local time".into());
        Ok(Clock { zone, name })
    }

    /// The current moment on this clock.
    pub fn now(&self) -> Zoned {
        Timestamp::now().to_zoned(self.zone.clone())
    }

    /// The zone's name, as shown to users.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// What one session says; kept in one place so tests read the same words.
pub mod text {
    /// The menu, after the greeting and after a wrong choice.
    pub const MENU: &str = "  1  current date\r\n  2  current time\r\n  9  quit\r\n";
    /// The prompt, with no line end so the answer goes beside it.
    pub const PROMPT: &str = "Your choice: ";
    /// The answer to `1` starts with this.
    pub const DATE: &str = "Current date: ";
    /// The answer to `2` starts with this.
    pub const TIME: &str = "Current time: ";
    /// The answer to `9`.
    pub const GOODBYE: &str = "Goodbye.\r\n";
    /// Told to every user when the service stops.
    pub const GOING_DOWN: &str = "The service is going down now; goodbye.\r\n";
}

/// The service: one instance serves every connection.
#[derive(Debug)]
pub struct DateTime {
    greeting: String,
    clock: Clock,
    max_line: usize,
}

impl DateTime {
    /// The service with `settings`, greeting as `host`.
    pub fn new(settings: &Settings, host: &str) -> anyhow::Result<Self> {
        settings.check()?;
        let clock = Clock::from_settings(settings)?;
        let greeting = format!(
            "Welcome to the date/time service on {host}, instance {}.\r\nTimes are in {}.\r\n\r\n",
            settings.instance,
            clock.name()
        );
        Ok(DateTime {
            greeting,
            clock,
            max_line: settings.max_line,
        })
    }

    /// Runs one session on any byte stream until the user quits, the line
    /// limit or idle timeout ends it, or the service drains.
    ///
    /// Its memory is bounded whatever the client does: input is read
    /// [`READ_SIZE`] bytes at a time, and answered only until
    /// [`OUTPUT_BOUND`] bytes wait to be sent; then nothing more is read
    /// until the client has taken them. A client that sends and never
    /// reads is held back by TCP itself, and a quiet session keeps no
    /// output buffer.
    pub async fn session<S>(&self, stream: S, conn: &Accepted) -> anyhow::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (mut reader, mut writer) = tokio::io::split(stream);
        let idle = conn.idle_timeout;
        let mut out = Vec::new();
        out.extend_from_slice(self.greeting.as_bytes());
        out.extend_from_slice(text::MENU.as_bytes());
        out.extend_from_slice(text::PROMPT.as_bytes());
        send(&mut writer, &mut out, idle).await?;

        let mut lines = LineReader::new(self.max_line);
        let mut buf = [0u8; READ_SIZE];
        loop {
            let read = tokio::select! {
                _ = conn.draining.cancelled() => {
                    out.extend_from_slice(b"\r\n");
                    out.extend_from_slice(text::GOING_DOWN.as_bytes());
                    return close(&mut writer, &mut out, idle).await;
                }
                read = tokio::time::timeout(idle, reader.read(&mut buf)) => read,
            };
            let n = match read {
                Err(_) => {
                    out.extend_from_slice(
                        format!(
                            "\r\nNo input for {}; closing the connection.\r\n",
                            Minutes(idle)
                        )
                        .as_bytes(),
                    );
                    tracing::info!(conn = conn.id, peer = %conn.peer, via = conn.via.map(tracing::field::display), timeout = ?idle, "idle timeout");
                    return close(&mut writer, &mut out, idle).await;
                }
                Ok(Ok(0)) => return Ok(()),
                Ok(Ok(n)) => n,
                Ok(Err(e)) => return Err(e).context("reading from the client"),
            };
            let mut rest = &buf[..n];
            while !rest.is_empty() {
                let (used, input) = lines.decode(rest, &mut out);
                rest = &rest[used..];
                if let Some(input) = input {
                    if self.respond(input, &mut out, conn) == Next::Quit {
                        return close(&mut writer, &mut out, idle).await;
                    }
                }
                if out.len() >= OUTPUT_BOUND {
                    send(&mut writer, &mut out, idle).await?;
                }
            }
            send(&mut writer, &mut out, idle).await?;
            // Waiting for the client now, which may take minutes: keep no
            // buffer a burst of answers grew.
            if out.capacity() > KEPT_OUTPUT {
                out = Vec::new();
            }
            if n == READ_SIZE {
                // A client that pipelines (a full read, likely more
                // waiting) lets the other sessions of this thread have a
                // turn before its next read.
                tokio::task::yield_now().await;
            }
        }
    }

    /// Appends what the client is told about `input`; says whether the
    /// session goes on.
    fn respond(&self, input: Input, out: &mut Vec<u8>, conn: &Accepted) -> Next {
        match input {
            Input::Line(line) => self.answer(&line, out),
            Input::TooLong => {
                out.extend_from_slice(
                    format!(
                        "\r\nLine too long (over {} bytes); closing the connection.\r\n",
                        self.max_line
                    )
                    .as_bytes(),
                );
                tracing::info!(conn = conn.id, peer = %conn.peer, via = conn.via.map(tracing::field::display), limit = self.max_line, "line too long");
                Next::Quit
            }
            Input::SubnegotiationTooLong => {
                out.extend_from_slice(
                    format!(
                        "\r\nTelnet subnegotiation over {SUBNEGOTIATION_LIMIT} bytes without its end (IAC SE); closing the connection.\r\n"
                    )
                    .as_bytes(),
                );
                tracing::info!(conn = conn.id, peer = %conn.peer, via = conn.via.map(tracing::field::display), limit = SUBNEGOTIATION_LIMIT, "telnet subnegotiation too long");
                Next::Quit
            }
        }
    }

    /// Appends the answer to one line; says whether the session goes on.
    fn answer(&self, line: &[u8], out: &mut Vec<u8>) -> Next {
        let choice = String::from_utf8_lossy(line);
        match choice.trim() {
            "1" => {
                let now = self.clock.now();
                out.extend_from_slice(
                    format!("{}{}\r\n", text::DATE, now.strftime("%Y-%m-%d")).as_bytes(),
                );
            }
            "2" => {
                let now = self.clock.now();
                out.extend_from_slice(
                    format!("{}{}\r\n", text::TIME, now.strftime("%H:%M:%S")).as_bytes(),
                );
            }
            "9" => {
                out.extend_from_slice(text::GOODBYE.as_bytes());
                return Next::Quit;
            }
            "" => {}
            other => {
                out.extend_from_slice(
                    format!(
                        "{} is not on the menu; type 1, 2 or 9 and press Enter.\r\n",
                        shorten(other)
                    )
                    .as_bytes(),
                );
                out.extend_from_slice(text::MENU.as_bytes());
            }
        }
        out.extend_from_slice(text::PROMPT.as_bytes());
        Next::Continue
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Next {
    Continue,
    Quit,
}

/// User input as it can be shown safely: quoted, control characters
/// escaped, at most 40 characters.
fn shorten(input: &str) -> String {
    let escaped: String = input.chars().flat_map(char::escape_debug).collect();
    if escaped.chars().count() > 40 {
        let head: String = escaped.chars().take(37).collect();
        format!("\"{head}...\"")
    } else {
        format!("\"{escaped}\"")
    }
}

/// A duration in the words of a message to a user.
struct Minutes(Duration);

impl fmt::Display for Minutes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.as_secs();
        match secs {
            s if s >= 60 && s % 60 == 0 && s / 60 == 1 => f.write_str("1 minute"),
            s if s >= 60 && s % 60 == 0 => write!(f, "{} minutes", s / 60),
            1 => f.write_str("1 second"),
            0 => write!(f, "{} ms", self.0.as_millis()),
            s => write!(f, "{s} seconds"),
        }
    }
}

/// Writes what is pending; a client that stops reading is bounded by the
/// idle timeout too.
async fn send<W: AsyncWrite + Unpin>(
    writer: &mut W,
    out: &mut Vec<u8>,
    idle: Duration,
) -> anyhow::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    tokio::time::timeout(idle, writer.write_all(out))
        .await
        .context("the client stopped reading")?
        .context("writing to the client")?;
    out.clear();
    Ok(())
}

async fn close<W: AsyncWrite + Unpin>(
    writer: &mut W,
    out: &mut Vec<u8>,
    idle: Duration,
) -> anyhow::Result<()> {
    send(writer, out, idle).await?;
    // Bounded too: a stream that has a last word of its own (TLS's
    // close_notify) waits for the client to take it.
    let _ = tokio::time::timeout(idle, writer.shutdown()).await;
    Ok(())
}

impl<S: Stream> Handler<S> for DateTime {
    async fn handle(self: Arc<Self>, stream: S, conn: Accepted) -> anyhow::Result<()> {
        self.session(stream, &conn).await
    }
}

/// Serves the date/time service on `listener` until `shutdown` completes,
/// then tells every connected user and drains.
pub async fn run(
    listener: TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    let service = Arc::new(DateTime::new(&settings, &host)?);
    // Accepted sockets inherit the listener's buffer sizes (those accepted
    // by the kernel before this line keep the defaults).
    let socket = socket2::SockRef::from(&listener);
    if let Err(e) = socket
        .set_send_buffer_size(SOCKET_SEND_BUFFER)
        .and_then(|()| socket.set_recv_buffer_size(SOCKET_RECEIVE_BUFFER))
    {
        tracing::warn!(error = %e, "cannot bound the clients' socket buffers; the kernel's defaults apply");
    }
    tracing::info!(
        listen = %listener.local_addr()?,
        instance = %settings.instance,
        zone = %service.clock.name(),
        "date/time service ready"
    );
    let tls = settings.serve.tls().map_err(|e| anyhow::anyhow!("{e}"))?;
    common::tls::serve(
        listener,
        ServeOptions::from(&settings.serve),
        tls,
        service,
        shutdown,
    )
    .await;
    Ok(())
}

impl common::config::ProgramSettings for Settings {
    fn problems(&self, origin: &dyn Fn(&str) -> Option<Origin>) -> Vec<ConfigError> {
        let mut problems = self.conflicts(origin);
        problems.extend(self.serve.tls().err().map(|e| *e));
        problems
    }

    /// `--print-config` shows the zone the clock reads, not `null`.
    fn effective(&self, key: &str) -> Option<(String, String)> {
        if key != "time_zone" || self.time_zone.is_some() {
            return None;
        }
        let clock = Clock::from_settings(self).ok()?;
        let why = if self.utc {
            "utc = true".to_string()
        } else {
            "the system's zone".to_string()
        };
        Some((clock.name().to_string(), why))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_input_is_escaped_and_short() {
        assert_eq!(shorten("abc"), "\"abc\"");
        assert_eq!(shorten("a\u{1b}[2J"), "\"a\\u{1b}[2J\"");
        assert_eq!(
            shorten(&"x".repeat(100)),
            format!("\"{}...\"", "x".repeat(37))
        );
    }

    #[test]
    fn durations_for_people() {
        assert_eq!(Minutes(Duration::from_secs(300)).to_string(), "5 minutes");
        assert_eq!(Minutes(Duration::from_secs(60)).to_string(), "1 minute");
        assert_eq!(Minutes(Duration::from_secs(90)).to_string(), "90 seconds");
        assert_eq!(Minutes(Duration::from_millis(200)).to_string(), "200 ms");
    }

    #[test]
    fn unknown_zones_are_refused_with_an_example() {
        assert!("Europe/Amsterdam".parse::<ZoneName>().is_ok());
        let err = "Mars/Olympus".parse::<ZoneName>().unwrap_err();
        assert!(err.contains("Mars/Olympus") && err.contains("UTC"), "{err}");
    }
}
