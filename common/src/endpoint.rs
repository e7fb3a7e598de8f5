//! Named endpoints and binding them with errors that say what to do.
//!
//! As in the original platform, a role's endpoints have names
//! (`EchoEndpoint`, `Incoming`); each is set by a configuration key, so a
//! bind error can name the flag and the environment variable that move it.

use std::io;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

use crate::config::{env_var, flag_name};
use crate::settings::ListenAddr;

/// A named listening endpoint of a program.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The program's name (`echo-server`).
    pub program: &'static str,
    /// The endpoint's name (`EchoEndpoint`).
    pub name: &'static str,
    /// The configuration key that sets it (`listen`).
    pub key: &'static str,
    /// The address to bind.
    pub addr: ListenAddr,
}

impl Endpoint {
    /// A program's endpoint set by its `listen` setting.
    pub fn listen(program: &'static str, name: &'static str, addr: ListenAddr) -> Endpoint {
        Endpoint {
            program,
            name,
            key: "listen",
            addr,
        }
    }

    /// Binds the endpoint, with a listen backlog of 4096 and address reuse
    /// so a restart does not wait for old connections in TIME_WAIT.
    pub fn bind(&self) -> anyhow::Result<TcpListener> {
        bind_listener(self.addr).map_err(|e| anyhow::anyhow!(self.explain(&e)))
    }

    /// A bind failure in words a user can act on: the endpoint, the
    /// address, and the flag and the environment variable that move it.
    fn explain(&self, e: &io::Error) -> String {
        let fix = format!(
            "pass {} or set {}",
            flag_name(self.key),
            env_var(self.program, self.key)
        );
        bind_error(self.name, self.addr, e, &fix)
    }
}

/// A failed bind of `addr` in words a user can act on, the same for every
/// listener of every program: `what` names the listener (an endpoint, a
/// route), then what went wrong, then `fix`, what the user should change;
/// or, when a socket the service manager passed holds the port under
/// another address, that.
pub fn bind_error(what: &str, addr: ListenAddr, e: &io::Error, fix: &str) -> String {
    let passed = crate::systemd::activation::on_port(addr.0.port());
    if e.kind() == io::ErrorKind::AddrInUse && !passed.is_empty() {
        // The service manager holds the port for a socket written another
        // way (`[::]:80` for a bare `80`) than the configuration has it.
        let passed: Vec<String> = passed.iter().map(ToString::to_string).collect();
        return format!(
            "{what}: {addr} is already in use, by the socket the service manager passed for {} (socket activation); write the same address in the configuration and in the socket unit's ListenStream=",
            passed.join(", ")
        );
    }
    let problem = match e.kind() {
        io::ErrorKind::AddrInUse => format!("{addr} is already in use"),
        io::ErrorKind::PermissionDenied => format!(
            "no permission to listen on {addr} (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
        ),
        io::ErrorKind::AddrNotAvailable => format!("{addr} is not an address of this machine"),
        _ => format!("cannot listen on {addr} ({e})"),
    };
    format!("{what}: {problem}; {fix}")
}

/// Binds a TCP listener the way every program here does; when the
/// service manager passed a listening socket for `addr` (socket
/// activation, see [`crate::systemd::activation`]), that socket is used
/// instead.
pub fn bind_listener(addr: ListenAddr) -> io::Result<TcpListener> {
    if let Some(passed) = crate::systemd::activation::tcp_listener(addr.0) {
        return TcpListener::from_std(passed?);
    }
    let addr = addr.0;
    if addr.port() != 0 {
        // Taken, by anyone (another process's group of port-sharing
        // sockets included): the same error as ever, not a second
        // program silently sharing the port.
        let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        probe.set_reuse_address(true)?;
        if addr.is_ipv6() {
            let _ = probe.set_only_v6(false);
        }
        // Bound, never listening: no client can reach it meanwhile.
        probe.bind(&addr.into())?;
    }
    let socket = listening_socket(addr, cfg!(target_os = "linux"))?;
    TcpListener::from_std(socket.into())
}

/// A socket listening on `addr`, as every listener here is made; with
/// `shared`, other sockets of this process may listen on the same address
/// (`SO_REUSEPORT`), the kernel spreading new connections over them.
fn listening_socket(addr: std::net::SocketAddr, shared: bool) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if shared {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        // `[::]` takes IPv4 clients too, whatever the system default.
        let _ = socket.set_only_v6(false);
    }
    socket.set_nonblocking(true)?;
    // Every accepted socket inherits it (Linux), from the first: the accept
    // loop then sets nothing per connection (see `serve::accept_until`).
    let _ = socket.set_tcp_nodelay(true);
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket)
}

/// Another socket listening on `listener`'s address, sharing its
/// connections (the kernel gives each new one to one of them): for an
/// accept loop on another thread. Fails for a listener not made to share
/// (one passed by the service manager, or bound elsewhere).
pub fn sibling(listener: &TcpListener) -> io::Result<std::net::TcpListener> {
    let shared = socket2::SockRef::from(listener).reuse_port()?;
    if !shared {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "the listener does not share its address",
        ));
    }
    let socket = listening_socket(listener.local_addr()?, true)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn address_in_use_names_the_flag_and_variable() {
        let taken = bind_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let endpoint = Endpoint {
            program: "echo-server",
            name: "EchoEndpoint",
            key: "listen",
            addr: ListenAddr(taken.local_addr().unwrap()),
        };
        let message = endpoint.bind().unwrap_err().to_string();
        let addr = taken.local_addr().unwrap();
        assert_eq!(
            message,
            format!(
                "EchoEndpoint: {addr} is already in use; pass --listen or set ECHO_SERVER_LISTEN"
            )
        );
    }
}
