//! Telling the service manager how the program is doing (systemd's
//! `sd_notify` protocol): `READY=1` once it serves, `RELOADING=1` while it
//! reloads, `STOPPING=1` when it stops, and a `STATUS=` line in words,
//! each a datagram to the socket `NOTIFY_SOCKET` names (a path, or
//! `@name` in the abstract namespace).
//!
//! Without `NOTIFY_SOCKET` nothing is sent. A message that cannot be sent
//! is logged once, and the program goes on exactly as it would have: the
//! service manager then waits for it, or times out, as it is set up to.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// Where notifications go.
#[derive(Debug)]
pub struct Notifier {
    /// `NOTIFY_SOCKET` as it was given, for the log.
    named: String,
    /// The socket to send from and the address to send to, or why there
    /// is none.
    sink: Result<(UnixDatagram, SocketAddr), String>,
    /// Whether a failure was logged already.
    warned: AtomicBool,
}

impl Notifier {
    /// Notifications to the socket named `named` as `NOTIFY_SOCKET` gives
    /// it: an absolute path, or `@` and a name in the abstract namespace.
    pub fn new(named: &str) -> Notifier {
        let sink = address(named).and_then(|to| {
            let socket = UnixDatagram::unbound()
                .map_err(|e| format!("cannot open a socket to send from ({e})"))?;
            // A full queue at the service manager is a failed message,
            // never a stalled program.
            socket
                .set_nonblocking(true)
                .map_err(|e| format!("cannot make the socket non-blocking ({e})"))?;
            Ok((socket, to))
        });
        Notifier {
            named: named.to_string(),
            sink,
            warned: AtomicBool::new(false),
        }
    }

    /// Sends `fields` (`READY=1`, `STATUS=...`) as one message. A failure
    /// is logged the first time only, and returned.
    pub fn send(&self, fields: &[String]) -> io::Result<()> {
        let message = fields.join("\n");
        let sent = match &self.sink {
            Ok((socket, to)) => socket.send_to_addr(message.as_bytes(), to).map(drop),
            Err(why) => Err(io::Error::other(why.clone())),
        };
        if let Err(e) = &sent {
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    notify_socket = %self.named,
                    error = %e,
                    "cannot tell the service manager how the program is doing (NOTIFY_SOCKET); it goes on all the same, and this is said only once"
                );
            }
        }
        sent
    }
}

/// The address `NOTIFY_SOCKET` names.
fn address(named: &str) -> Result<SocketAddr, String> {
    if let Some(name) = named.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(name.as_bytes())
            .map_err(|e| format!("{named} is not a usable abstract socket name ({e})"))
    } else if named.starts_with('/') {
        SocketAddr::from_pathname(named)
            .map_err(|e| format!("{named} is not a usable socket path ({e})"))
    } else {
        Err(format!(
            "{named} is neither a socket path nor an abstract socket name (@name)"
        ))
    }
}

fn process() -> Option<&'static Notifier> {
    static PROCESS: OnceLock<Option<Notifier>> = OnceLock::new();
    PROCESS
        .get_or_init(|| {
            let named = std::env::var("NOTIFY_SOCKET")
                .ok()
                .filter(|n| !n.is_empty())?;
            // Kept here: a child process must not speak for this one.
            std::env::remove_var("NOTIFY_SOCKET");
            Some(Notifier::new(&named))
        })
        .as_ref()
}

/// Reads `NOTIFY_SOCKET` now (see [`super::take_environment`]).
pub(super) fn take() {
    let _ = process();
}

/// Whether a service manager listens for notifications.
pub fn enabled() -> bool {
    process().is_some()
}

/// A `STATUS=` field: one line, as the protocol wants.
fn status(text: &str) -> String {
    format!("STATUS={}", text.replace('\n', " "))
}

fn send(fields: &[String]) {
    if let Some(notifier) = process() {
        let _ = notifier.send(fields);
    }
}

/// The program serves: `READY=1`, with `status` in words. Also the end of
/// a reload.
pub fn ready(text: &str) {
    send(&["READY=1".into(), status(text)]);
}

/// A reload begins: `RELOADING=1`, with the time it began on the
/// monotonic clock, which systemd 253 and later want to tell this reload
/// from an earlier one. [`ready`] ends it, whether the reload worked or not.
pub fn reloading(text: &str) {
    let mut fields = vec!["RELOADING=1".to_string(), status(text)];
    if let Some(usec) = monotonic_usec() {
        fields.push(format!("MONOTONIC_USEC={usec}"));
    }
    send(&fields);
}

/// The program stops: `STOPPING=1`, with `status` in words.
pub fn stopping(text: &str) {
    send(&["STOPPING=1".into(), status(text)]);
}

/// Only a `STATUS=` line, for the service manager's status display.
pub fn status_only(text: &str) {
    send(&[status(text)]);
}

/// Now on `CLOCK_MONOTONIC`, in microseconds.
pub fn monotonic_usec() -> Option<u64> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).ok()?;
    let secs = u64::try_from(now.tv_sec()).ok()?;
    let nanos = u64::try_from(now.tv_nsec()).ok()?;
    Some(secs * 1_000_000 + nanos / 1_000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn receive(socket: &UnixDatagram) -> String {
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn a_socket_path_receives_the_fields_as_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::new(path.to_str().unwrap());
        notifier
            .send(&["READY=1".into(), status("serving\n2 routes")])
            .unwrap();
        assert_eq!(receive(&listener), "READY=1\nSTATUS=serving 2 routes");
    }

    #[test]
    fn an_abstract_name_is_reached_with_the_at_sign() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("common-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        let notifier = Notifier::new(&format!("@{name}"));
        notifier.send(&["STOPPING=1".into()]).unwrap();
        assert_eq!(receive(&listener), "STOPPING=1");
    }

    #[test]
    fn a_missing_socket_or_a_bad_name_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let missing = Notifier::new(dir.path().join("nobody").to_str().unwrap());
        assert!(missing.send(&["READY=1".into()]).is_err());
        // The second failure is not logged again, and still reported.
        assert!(missing.send(&["READY=1".into()]).is_err());
        assert!(missing.warned.load(Ordering::Relaxed));
        let relative = Notifier::new("notify.sock");
        let error = relative.send(&["READY=1".into()]).unwrap_err();
        assert!(
            error.to_string().contains("neither a socket path"),
            "{error}"
        );
    }

    #[test]
    fn the_monotonic_clock_moves_forward() {
        let first = monotonic_usec().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        assert!(monotonic_usec().unwrap() >= first + 2_000);
    }
}
