//! Socket activation: listening sockets a service manager (systemd, or
//! `systemd-socket-activate`) opened for the program and passed to it as
//! file descriptors 3, 4, ... with `LISTEN_FDS` and `LISTEN_PID`.
//!
//! They are taken once, at start, and the variables are removed so that a
//! child process does not take them for its own. Binding an address then
//! means finding the passed socket with that local address first
//! ([`tcp_listener`], which `endpoint::bind_listener` asks): a
//! configuration names the same addresses with or without activation.
//! The originals stay here for the life of the process, as the service
//! manager keeps its own copies, and each use is a duplicate: a route that
//! a reload removes and a later one brings back finds its socket again.

use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::{Mutex, MutexGuard, OnceLock};

use socket2::SockRef;

/// A socket the service manager passed.
#[derive(Debug)]
struct Inherited {
    /// Its local address, what a configuration names.
    addr: SocketAddr,
    /// Its name in `LISTEN_FDNAMES` (the socket unit's
    /// `FileDescriptorName=`, by default the unit's name).
    name: String,
    socket: Kind,
    /// Whether anything has listened on it.
    used: bool,
}

#[derive(Debug)]
enum Kind {
    Stream(TcpListener),
    Datagram(UdpSocket),
}

impl Kind {
    fn protocol(&self) -> &'static str {
        match self {
            Kind::Stream(_) => "TCP",
            Kind::Datagram(_) => "UDP",
        }
    }
}

/// What was passed: the usable sockets, and why any other descriptor was
/// left alone (said once the log is up, by [`report_unused`]).
#[derive(Debug, Default)]
struct Passed {
    sockets: Vec<Inherited>,
    problems: Vec<String>,
    reported: bool,
}

fn passed() -> MutexGuard<'static, Passed> {
    static PASSED: OnceLock<Mutex<Passed>> = OnceLock::new();
    PASSED
        .get_or_init(|| Mutex::new(from_env()))
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Takes the passed sockets now (see [`super::take_environment`]).
pub(super) fn take() {
    drop(passed());
}

/// The sockets `LISTEN_FDS` announces for this process, taken, with the
/// activation variables removed from the environment.
fn from_env() -> Passed {
    if std::env::var_os("LISTEN_FDS").is_none() {
        return Passed::default();
    }
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    std::env::remove_var("LISTEN_FDNAMES");
    // Checks LISTEN_PID against this process, and removes both variables.
    let mut fds = listenfd::ListenFd::from_env();
    let names: Vec<&str> = names.split(':').collect();
    let mut passed = Passed::default();
    for index in 0..fds.len() {
        let fd = 3 + index;
        let name = names
            .get(index)
            .filter(|n| !n.is_empty())
            .map_or_else(|| format!("fd {fd}"), |n| format!("{n} (fd {fd})"));
        match take_one(&mut fds, index) {
            Ok((addr, socket)) => passed.sockets.push(Inherited {
                addr,
                name,
                socket,
                used: false,
            }),
            Err(why) => passed
                .problems
                .push(format!("the passed socket {name} {why}, and is not used")),
        }
    }
    passed
}

/// The socket at `index`: a listening TCP socket or a UDP one, with its
/// local address.
fn take_one(fds: &mut listenfd::ListenFd, index: usize) -> Result<(SocketAddr, Kind), String> {
    if let Ok(Some(listener)) = fds.take_tcp_listener(index) {
        // A connection (a socket unit with Accept=yes) is a stream socket
        // too, and cannot be listened on.
        if !SockRef::from(&listener).is_listener().unwrap_or(false) {
            return Err(
                "is a TCP connection, not a listening socket (set Accept=no in the socket unit)"
                    .into(),
            );
        }
        let addr = listener
            .local_addr()
            .map_err(|e| format!("has no local address ({e})"))?;
        return Ok((addr, Kind::Stream(listener)));
    }
    if let Ok(Some(socket)) = fds.take_udp_socket(index) {
        let addr = socket
            .local_addr()
            .map_err(|e| format!("has no local address ({e})"))?;
        return Ok((addr, Kind::Datagram(socket)));
    }
    Err("is neither a TCP listening socket nor a UDP socket (only ListenStream= and ListenDatagram= with IP addresses are understood)".into())
}

/// The passed TCP listener whose local address is `addr`, when there is
/// one: a duplicate of it, non-blocking, ready for Tokio. Its use is
/// logged.
pub fn tcp_listener(addr: SocketAddr) -> Option<io::Result<TcpListener>> {
    let mut passed = passed();
    let found = passed
        .sockets
        .iter_mut()
        .find(|s| s.addr == addr && matches!(s.socket, Kind::Stream(_)))?;
    let Kind::Stream(listener) = &found.socket else {
        return None;
    };
    let copy = listener.try_clone().and_then(|copy| {
        copy.set_nonblocking(true)?;
        Ok(copy)
    });
    log_use(found, copy.is_ok());
    Some(copy)
}

/// The passed UDP socket whose local address is `addr`, when there is
/// one: a duplicate of it, non-blocking, ready for Tokio. Its use is
/// logged.
pub fn udp_socket(addr: SocketAddr) -> Option<io::Result<UdpSocket>> {
    let mut passed = passed();
    let found = passed
        .sockets
        .iter_mut()
        .find(|s| s.addr == addr && matches!(s.socket, Kind::Datagram(_)))?;
    let Kind::Datagram(socket) = &found.socket else {
        return None;
    };
    let copy = socket.try_clone().and_then(|copy| {
        copy.set_nonblocking(true)?;
        Ok(copy)
    });
    log_use(found, copy.is_ok());
    Some(copy)
}

fn log_use(socket: &mut Inherited, ok: bool) {
    if ok {
        socket.used = true;
        tracing::info!(
            inherited = %socket.addr,
            socket = %socket.name,
            protocol = socket.socket.protocol(),
            "using the socket the service manager passed (socket activation) instead of binding"
        );
    }
}

/// The addresses of the passed sockets on `port` (for a bind error that
/// may be an address written differently in the socket unit).
pub fn on_port(port: u16) -> Vec<SocketAddr> {
    passed()
        .sockets
        .iter()
        .filter(|s| s.addr.port() == port)
        .map(|s| s.addr)
        .collect()
}

/// How many sockets the service manager passed and the program can use.
pub fn count() -> usize {
    passed().sockets.len()
}

/// Warns, once, about every passed socket nothing listens on (no route or
/// endpoint names its address) and every passed descriptor that is not a
/// usable socket. Call it when the program has bound what its
/// configuration names.
pub fn report_unused() {
    let mut passed = passed();
    if passed.reported {
        return;
    }
    passed.reported = true;
    for problem in &passed.problems {
        tracing::warn!("{problem}; check the socket unit");
    }
    for socket in passed.sockets.iter().filter(|s| !s.used) {
        tracing::warn!(
            inherited = %socket.addr,
            socket = %socket.name,
            protocol = socket.socket.protocol(),
            "the service manager passed a socket for {} that nothing is configured to listen on; name exactly this address in the configuration, or remove it from the socket unit",
            socket.addr
        );
    }
}
