//! Discovery: how one role finds another's instances and endpoints.
//!
//! A program names a peer as `role/Endpoint` (`square-server/SquareEndpoint`)
//! wherever it takes an address. The names are looked up in a topology: a
//! JSON file that whoever runs the roles writes and keeps current. On one
//! machine the development fabric writes it, gives its path to every
//! instance (`<PREFIX>_TOPOLOGY`) and rewrites it, atomically (a new file
//! renamed into place), whenever the topology changes; a program that
//! follows a peer looks at the file's stamp every second and reads it again
//! when it changed.
//!
//! ```json
//! {"roles": {"square-server": {"SquareEndpoint": {
//!     "address": "127.0.0.1:2345",
//!     "instances": [{"id": "square-server_IN_0", "addr": "127.0.0.1:45743"},
//!                   {"id": "square-server_IN_1", "addr": "127.0.0.1:38053"}],
//!     "proxy": "v2"}}}}
//! ```
//!
//! `address` is the endpoint's one balanced address; `instances` its
//! instances, each reachable on its own; `proxy`, the PROXY protocol
//! header a caller that reaches an instance directly must send first (the
//! fabric's instances trust loopback to name their clients). An endpoint listed without
//! instances has only its balanced address (in a cluster, a Service in
//! front of however many pods run): [`Topology::instances`] then gives
//! that address as the one instance to use.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::files::Stamp;
use crate::settings::HostPort;

/// How often a followed topology file is looked at.
pub const FOLLOW_EVERY: Duration = Duration::from_secs(1);

/// The largest topology file read: far more than thousands of instances
/// take, and a bound on what a stray path can make a program read.
pub const MAX_TOPOLOGY: u64 = 4 << 20;

/// A peer named by role and endpoint: `square-server/SquareEndpoint`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerName {
    /// The role (`square-server`).
    pub role: String,
    /// The endpoint of the role (`SquareEndpoint`).
    pub endpoint: String,
}

impl PeerName {
    /// Whether `text` is written as a peer name rather than `HOST:PORT`:
    /// it has a `/` (which no host name or address has) and no `:`.
    pub fn looks_like(text: &str) -> bool {
        text.contains('/') && !text.contains(':')
    }
}

impl fmt::Display for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.role, self.endpoint)
    }
}

impl FromStr for PeerName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let usage = "name a peer as ROLE/Endpoint, such as square-server/SquareEndpoint";
        let Some((role, endpoint)) = s.split_once('/') else {
            return Err(format!("{s:?} is not a peer name; {usage}"));
        };
        let fine = |part: &str| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        };
        if !fine(role) || !fine(endpoint) {
            return Err(format!(
                "{s:?} is not a peer name (letters, digits, '-', '_' and '.' on each side of one '/'); {usage}"
            ));
        }
        Ok(PeerName {
            role: role.into(),
            endpoint: endpoint.into(),
        })
    }
}

/// Where a program is to connect: `HOST:PORT`, or a peer named by role
/// and endpoint, looked up in the topology.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Destination {
    /// `HOST:PORT`.
    Address(HostPort),
    /// `role/Endpoint`.
    Peer(PeerName),
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Address(a) => a.fmt(f),
            Destination::Peer(p) => p.fmt(f),
        }
    }
}

impl FromStr for Destination {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if PeerName::looks_like(s) {
            s.parse().map(Destination::Peer)
        } else {
            s.parse().map(Destination::Address)
        }
    }
}

impl From<HostPort> for Destination {
    fn from(a: HostPort) -> Self {
        Destination::Address(a)
    }
}

/// One instance of a role, as the topology lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Its id (`square-server_IN_0`).
    pub id: String,
    /// Where it serves the endpoint.
    pub addr: SocketAddr,
}

/// One endpoint in the topology.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointEntry {
    /// The balanced address, `HOST:PORT`.
    pub address: String,
    /// The instances, each on its own address (none: only the balanced
    /// address is known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<Vec<Instance>>,
    /// The PROXY protocol header the instances expect before any other
    /// byte from a caller that reaches them directly (the development
    /// fabric's instances trust loopback to send one, as its balancers
    /// do); none when they expect none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<crate::proxy::Version>,
}

/// Every role's endpoints: role name, then endpoint name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// The roles and their endpoints.
    pub roles: BTreeMap<String, BTreeMap<String, EndpointEntry>>,
}

/// Why a peer could not be found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryError(pub String);

impl fmt::Display for DiscoveryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DiscoveryError {}

impl Topology {
    /// Reads the topology file at `path`.
    pub fn read(path: &Path) -> Result<Topology, DiscoveryError> {
        let fail = |why: String| DiscoveryError(format!("topology {}: {why}", path.display()));
        let meta = std::fs::metadata(path).map_err(|e| {
            fail(format!(
                "{e}; it is written by whoever runs the roles (deploy run), and its path given in <PREFIX>_TOPOLOGY"
            ))
        })?;
        if meta.len() > MAX_TOPOLOGY {
            return Err(fail(format!(
                "{} bytes, more than the {MAX_TOPOLOGY} a topology may have",
                meta.len()
            )));
        }
        let text = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
        let topology: Topology =
            serde_json::from_slice(&text).map_err(|e| fail(format!("not a topology: {e}")))?;
        for (role, endpoints) in &topology.roles {
            for (name, entry) in endpoints {
                entry
                    .address
                    .parse::<HostPort>()
                    .map_err(|e| fail(format!("{role}/{name}: address: {e}")))?;
            }
        }
        Ok(topology)
    }

    /// Writes the topology to `path` atomically: to a new file beside it,
    /// then renamed over it, so a reader sees the old file or the new one,
    /// never a part.
    pub fn write(&self, path: &Path) -> io::Result<()> {
        let text = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        crate::files::write_atomically(path, &text)
    }

    /// The entry of `peer`, or why there is none (naming what there is).
    pub fn entry(&self, peer: &PeerName) -> Result<&EndpointEntry, DiscoveryError> {
        let Some(endpoints) = self.roles.get(&peer.role) else {
            let known: Vec<&str> = self.roles.keys().map(String::as_str).collect();
            return Err(DiscoveryError(format!(
                "{peer}: no role {} in the topology (it has {}); check the role's name in the service definition",
                peer.role,
                list(&known)
            )));
        };
        endpoints.get(&peer.endpoint).ok_or_else(|| {
            let known: Vec<&str> = endpoints.keys().map(String::as_str).collect();
            DiscoveryError(format!(
                "{peer}: role {} has no endpoint {} (it has {})",
                peer.role,
                peer.endpoint,
                list(&known)
            ))
        })
    }

    /// The one balanced address of `peer`.
    pub fn endpoint(&self, peer: &PeerName) -> Result<HostPort, DiscoveryError> {
        let entry = self.entry(peer)?;
        entry
            .address
            .parse()
            .map_err(|e| DiscoveryError(format!("{peer}: {e}")))
    }

    /// The instances of `peer`: those listed, or, when the topology lists
    /// none (a cluster's Service), the balanced address as the one to use.
    pub fn instances(&self, peer: &PeerName) -> Result<Vec<HostPort>, DiscoveryError> {
        let entry = self.entry(peer)?;
        match &entry.instances {
            Some(listed) if listed.is_empty() => Err(DiscoveryError(format!(
                "{peer}: the role has no instances now; give it some (instances: N in the service definition)"
            ))),
            Some(listed) => Ok(listed
                .iter()
                .map(|i| HostPort {
                    host: i.addr.ip().to_string(),
                    port: i.addr.port(),
                })
                .collect()),
            None => Ok(vec![self.endpoint(peer)?]),
        }
    }
}

fn list(names: &[&str]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// Completes when the file at `path` changes from `since` (looked at every
/// [`FOLLOW_EVERY`]), with its new stamp.
pub async fn changed(path: &Path, since: &Stamp) -> Stamp {
    loop {
        tokio::time::sleep(FOLLOW_EVERY).await;
        let now = Stamp::of(path);
        if now != *since {
            return now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(s: &str) -> PeerName {
        s.parse().unwrap()
    }

    fn sample() -> Topology {
        serde_json::from_str(
            r#"{"roles": {
                "square-server": {"SquareEndpoint": {"address": "127.0.0.1:2345",
                    "instances": [{"id": "square-server_IN_0", "addr": "127.0.0.1:40001"},
                                  {"id": "square-server_IN_1", "addr": "127.0.0.1:40002"}]}},
                "echo-server": {"EchoEndpoint": {"address": "echo.prod.svc:1234"}},
                "idle": {"Nothing": {"address": "127.0.0.1:9", "instances": []}}}}"#,
        )
        .unwrap()
    }

    #[test]
    fn peer_names_read_as_written_and_are_told_from_addresses() {
        assert_eq!(
            peer("square-server/SquareEndpoint"),
            PeerName {
                role: "square-server".into(),
                endpoint: "SquareEndpoint".into()
            }
        );
        assert!(PeerName::looks_like("square-server/SquareEndpoint"));
        assert!(!PeerName::looks_like("db.internal:5432"));
        assert!(!PeerName::looks_like("[::1]:80"));
        for bad in ["square-server", "/E", "r/", "a/b/c", "a b/c"] {
            let e = bad.parse::<PeerName>().unwrap_err();
            assert!(e.contains("ROLE/Endpoint"), "{bad}: {e}");
        }
    }

    #[test]
    fn lookups_give_instances_or_the_balanced_address() {
        let t = sample();
        let p = peer("square-server/SquareEndpoint");
        assert_eq!(t.endpoint(&p).unwrap().to_string(), "127.0.0.1:2345");
        let got: Vec<String> = t
            .instances(&p)
            .unwrap()
            .iter()
            .map(|h| h.to_string())
            .collect();
        assert_eq!(got, ["127.0.0.1:40001", "127.0.0.1:40002"]);
        // A Service alone: its address is the one instance.
        let got = t.instances(&peer("echo-server/EchoEndpoint")).unwrap();
        assert_eq!(got[0].to_string(), "echo.prod.svc:1234");
        let e = t.instances(&peer("idle/Nothing")).unwrap_err();
        assert!(e.0.contains("has no instances now"), "{e}");
        let e = t
            .instances(&peer("sqaure-server/SquareEndpoint"))
            .unwrap_err();
        assert!(
            e.0.contains(
                "no role sqaure-server in the topology (it has echo-server, idle, square-server)"
            ),
            "{e}"
        );
        let e = t.endpoint(&peer("square-server/Square")).unwrap_err();
        assert!(
            e.0.contains("has no endpoint Square (it has SquareEndpoint)"),
            "{e}"
        );
    }

    #[test]
    fn a_written_topology_reads_back_and_changes_its_stamp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("topology.json");
        let t = sample();
        t.write(&path).unwrap();
        assert_eq!(Topology::read(&path).unwrap(), t);
        let before = Stamp::of(&path);
        let mut t2 = t.clone();
        t2.roles.remove("idle");
        t2.write(&path).unwrap();
        assert_ne!(Stamp::of(&path), before, "a rename gives a new inode");
        assert_eq!(Topology::read(&path).unwrap(), t2);
        // Nothing but the file is left.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn bad_files_are_named_with_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        let e = Topology::read(&path).unwrap_err();
        assert!(e.0.contains("deploy run"), "{e}");
        std::fs::write(&path, r#"{"roles": {"a": {"E": {"address": "nowhere"}}}}"#).unwrap();
        let e = Topology::read(&path).unwrap_err();
        assert!(
            e.0.contains("a/E: address:") && e.0.contains("no port"),
            "{e}"
        );
        std::fs::write(&path, r#"{"roles": {}, "extra": 1}"#).unwrap();
        let e = Topology::read(&path).unwrap_err();
        assert!(e.0.contains("not a topology"), "{e}");
    }
}
