//! What a development fabric publishes about the instances it runs, and
//! the check that lets only some roles' instances call an endpoint.
//!
//! The fabric (`deploy run`) writes `status.json` beside the topology (see
//! [`crate::discovery`]) whenever an instance or an endpoint changes:
//! `deploy status` shows it, and [`Callers`] reads it to tell which
//! process holds the other end of a connection.
//!
//! An internal endpoint's `allow_from: [roles]` is enforced on one machine
//! by process, as a cluster's NetworkPolicy does it by pod: a connection
//! is admitted only when the socket at its other end belongs to an
//! instance of one of the roles (or, on an instance, to the fabric, whose
//! balancers pass on the calls they admitted). The kernel's socket table
//! (`/proc/net/tcp`, `tcp6`) gives the other end's inode, and each
//! candidate process's descriptors (`/proc/PID/fd`) say whether it holds
//! it. Only loopback callers can be told apart this way; a call from any
//! other address is refused.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::files::Stamp;

/// The status file's name in a fabric's directory.
pub const STATUS_FILE: &str = "status.json";

/// A fabric as it publishes itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Published {
    /// The fabric's process.
    pub pid: u32,
    /// The definition file it follows, when it follows one.
    pub definition: Option<PathBuf>,
    /// Its endpoints.
    pub endpoints: Vec<PublishedEndpoint>,
    /// Its instances.
    pub instances: Vec<PublishedInstance>,
}

/// An endpoint in the published status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishedEndpoint {
    /// Its role.
    pub role: String,
    /// Its name.
    pub endpoint: String,
    /// `public` or `internal`.
    pub visibility: String,
    /// Where the balancer listens.
    pub address: SocketAddr,
}

/// An instance in the published status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishedInstance {
    /// Its role.
    pub role: String,
    /// Its id.
    pub id: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it is doing (`running`, `crashed (...)`, `draining`, ...).
    pub state: String,
    /// Its process, while it has one.
    pub pid: Option<u32>,
    /// How often it was started again.
    pub restarts: u32,
    /// When its process last started, in seconds since the Unix epoch.
    pub since: Option<u64>,
}

impl Published {
    /// Reads a fabric's status file.
    pub fn read(path: &Path) -> Result<Published, String> {
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if meta.len() > crate::discovery::MAX_TOPOLOGY {
            return Err(format!(
                "{}: {} bytes is too large",
                path.display(),
                meta.len()
            ));
        }
        let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// A role's name, as `allow_roles` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoleName(pub String);

impl std::str::FromStr for RoleName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() || s.contains(|c: char| c.is_whitespace() || c == '/' || c == ',') {
            return Err(format!("{s:?} is not a role name (such as square-gateway)"));
        }
        Ok(RoleName(s.to_string()))
    }
}

impl std::fmt::Display for RoleName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Only instances of some roles may call: the check of `allow_roles`.
#[derive(Debug, Clone)]
pub struct Callers {
    /// The roles whose instances may call.
    roles: Vec<String>,
    /// Whether the fabric's own process may call (its balancers call
    /// instances; a balancer itself admits only the roles).
    fabric: bool,
    /// The fabric's status file (none: no topology was given, so nothing
    /// can be admitted).
    status: Option<PathBuf>,
    /// The processes that may call, as last read, with the file's stamp.
    cached: Arc<Mutex<(Stamp, Vec<u32>)>>,
}

impl PartialEq for Callers {
    fn eq(&self, other: &Callers) -> bool {
        (&self.roles, self.fabric, &self.status) == (&other.roles, other.fabric, &other.status)
    }
}

impl Eq for Callers {}

impl Callers {
    /// Callers for the instances of `roles`, as the fabric's status file
    /// `status` lists them, and the fabric itself when `fabric`.
    pub fn new(roles: Vec<String>, status: PathBuf, fabric: bool) -> Callers {
        Callers {
            roles,
            fabric,
            status: Some(status),
            cached: Arc::new(Mutex::new((Stamp::of(Path::new("")), Vec::new()))),
        }
    }

    /// For a program given `allow_roles` (none when it is empty) and a
    /// topology, beside which the fabric lists its instances. Without a
    /// topology every call is refused, saying so.
    pub fn beside(roles: &[RoleName], topology: Option<&Path>) -> Option<Callers> {
        if roles.is_empty() {
            return None;
        }
        let roles: Vec<String> = roles.iter().map(|r| r.0.clone()).collect();
        let status = topology.map(|t| t.parent().unwrap_or(Path::new(".")).join(STATUS_FILE));
        Some(Callers {
            status,
            ..Callers::new(roles, PathBuf::new(), true)
        })
    }

    /// The roles.
    pub fn roles(&self) -> &[String] {
        &self.roles
    }

    /// The processes that may call now.
    fn processes(&self, status: &Path) -> Vec<u32> {
        let now = Stamp::of(status);
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if cached.0 != now {
            let pids = match Published::read(status) {
                Ok(published) => {
                    let mut pids: Vec<u32> = published
                        .instances
                        .iter()
                        .filter(|i| self.roles.contains(&i.role))
                        .filter_map(|i| i.pid)
                        .collect();
                    if self.fabric {
                        pids.push(published.pid);
                    }
                    pids
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the fabric's list of instances: refusing the roles' calls until it can be read");
                    Vec::new()
                }
            };
            *cached = (now, pids);
        }
        cached.1.clone()
    }

    /// Whether the connection from `peer` to `local` comes from a process
    /// that may call; the reason when it does not. Reads files of
    /// `/proc`: call it off the event loop.
    pub fn admit(&self, peer: SocketAddr, local: SocketAddr) -> Result<(), String> {
        let who = || {
            let mut roles = self.roles.join(", ");
            if self.fabric {
                roles.push_str(", or the fabric's balancers");
            }
            roles
        };
        if !peer.ip().to_canonical().is_loopback() {
            return Err(format!(
                "allow_roles: {peer} is not on this machine, so it is no instance of {}",
                who()
            ));
        }
        let Some(inode) = socket_inode(peer, local) else {
            return Err(format!(
                "allow_roles: the socket of {peer} is not in the kernel's table (it went away)"
            ));
        };
        let Some(status) = &self.status else {
            return Err(format!(
                "allow_roles ({}) needs the fabric's topology (topology, or <PREFIX>_TOPOLOGY), beside which the fabric lists its instances",
                self.roles.join(", ")
            ));
        };
        let pids = self.processes(status);
        if pids.iter().any(|pid| holds(*pid, inode)) {
            return Ok(());
        }
        Err(format!("allow_roles: {peer} is no instance of {}", who()))
    }
}

/// One TCP socket of the kernel's tables (`/proc/net/tcp`, `tcp6`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSocket {
    /// Its own address (IPv4-mapped addresses as IPv4).
    pub local: SocketAddr,
    /// The other end's.
    pub remote: SocketAddr,
    /// Its state as the kernel numbers it (1: established, 10: listening).
    pub state: u8,
    /// Its inode, which names it in `/proc/PID/fd` (0 for one no process
    /// holds any more).
    pub inode: u64,
}

/// The machine's TCP sockets, from the kernel's tables; none of a table
/// that cannot be read.
pub fn tcp_sockets() -> Vec<TcpSocket> {
    let mut sockets = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            if fields.len() < 10 {
                continue;
            }
            let (Some(local), Some(remote), Ok(state), Ok(inode)) = (
                parse_addr(fields[1]),
                parse_addr(fields[2]),
                u8::from_str_radix(fields[3], 16),
                fields[9].parse(),
            ) else {
                continue;
            };
            sockets.push(TcpSocket {
                local,
                remote,
                state,
                inode,
            });
        }
    }
    sockets
}

/// The inode of the socket whose own address is `from` and whose other
/// end is `to`.
fn socket_inode(from: SocketAddr, to: SocketAddr) -> Option<u64> {
    let (from, to) = (canonical(from), canonical(to));
    tcp_sockets()
        .into_iter()
        .find(|s| s.local == from && s.remote == to)
        .map(|s| s.inode)
        .filter(|i| *i != 0)
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// An address of the kernel's tables: `0100007F:1F90` (IPv4) or 32 hex
/// digits (IPv6, four 32-bit words in the machine's byte order) and the
/// port.
fn parse_addr(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(ip, 16).ok()?.to_ne_bytes(),
        )),
        32 => {
            let mut bytes = [0u8; 16];
            for (n, chunk) in bytes.chunks_mut(4).enumerate() {
                let word = u32::from_str_radix(&ip[n * 8..n * 8 + 8], 16).ok()?;
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes)).to_canonical()
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Whether process `pid` holds the socket of `inode`.
fn holds(pid: u32, inode: u64) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    let wanted = format!("socket:[{inode}]");
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| target.as_os_str() == wanted.as_str())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_of_the_kernels_tables() {
        assert_eq!(
            parse_addr("0100007F:1F90"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            parse_addr("00000000000000000000000001000000:0050"),
            Some("[::1]:80".parse().unwrap())
        );
        // An IPv4 client of a dual-stack socket.
        assert_eq!(
            parse_addr("0000000000000000FFFF00000100007F:0050"),
            Some("127.0.0.1:80".parse().unwrap())
        );
        assert_eq!(parse_addr("nonsense"), None);
    }

    #[test]
    fn the_process_at_the_other_end_is_found() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, peer) = listener.accept().unwrap();
        let local = listener.local_addr().unwrap();
        let inode = socket_inode(peer, local).expect("the client's socket");
        assert!(holds(std::process::id(), inode));
        // Not some other process.
        assert!(!holds(1, inode) || std::process::id() == 1);

        let dir = std::env::temp_dir().join(format!("callers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let status = dir.join(STATUS_FILE);
        let write = |role: &str, pid: u32, fabric: u32| {
            let published = Published {
                pid: fabric,
                definition: None,
                endpoints: Vec::new(),
                instances: vec![PublishedInstance {
                    role: role.into(),
                    id: format!("{role}_IN_0"),
                    addr: local,
                    state: "running".into(),
                    pid: Some(pid),
                    restarts: 0,
                    since: None,
                }],
            };
            crate::files::write_atomically(&status, &serde_json::to_vec(&published).unwrap())
                .unwrap();
        };
        let me = std::process::id();
        write("gate", me, 1);
        let callers = Callers::new(vec!["gate".into()], status.clone(), false);
        assert_eq!(callers.admit(peer, local), Ok(()));
        let others = Callers::new(vec!["other".into()], status.clone(), false);
        let refused = others.admit(peer, local).unwrap_err();
        assert!(refused.contains("is no instance of other"), "{refused}");
        // The fabric's own process, when it may call.
        write("other", 1, me);
        let instance_side = Callers::new(vec!["gate".into()], status.clone(), true);
        assert_eq!(instance_side.admit(peer, local), Ok(()));
        let balancer_side = Callers::new(vec!["gate".into()], status.clone(), false);
        assert!(balancer_side.admit(peer, local).is_err());
        let far: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        assert!(callers
            .admit(far, local)
            .unwrap_err()
            .contains("not on this machine"));
        drop(client);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
