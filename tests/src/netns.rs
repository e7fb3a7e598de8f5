//! A throw-away network namespace joined to the root namespace by a veth
//! pair, so a test can run a client on "another machine": one that reaches
//! the test host only over the veth link and cannot see the host's loopback.
//!
//! The link uses a /30 out of 198.51.100.0/24 (TEST-NET-2, reserved for
//! documentation), the host side in the root namespace and the other side in
//! the namespace. Nothing is routed beyond the link. The /30 is one whose
//! addresses the host does not already use (a sandbox may number its own
//! network from a documentation range), so its more specific route covers
//! only those four unused addresses. Creating one needs root and
//! `ip` (iproute2).

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

/// Names of this module's namespaces start with this, then the tag, the
/// creating process's id and a counter.
const PREFIX: &str = "e2e-";

/// How many /30 networks fit in 198.51.100.0/24.
const SLOTS: u32 = 64;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Held from choosing a /30 until its address is on the link, so that tests
/// running at once in one process never pick the same one.
static CHOOSING: Mutex<()> = Mutex::new(());

/// A network namespace with a veth link to the root namespace; deleted,
/// link and all, when dropped.
#[derive(Debug)]
pub struct Netns {
    /// The namespace's name, as `ip netns` knows it.
    pub name: String,
    /// The address of the link's end in the root namespace: what a client
    /// in the namespace uses to reach the host.
    pub host_addr: Ipv4Addr,
    /// The address of the link's end inside the namespace.
    pub ns_addr: Ipv4Addr,
    /// The name of the veth end in the root namespace.
    pub host_veth: String,
    /// The name of the veth end inside the namespace.
    pub ns_veth: String,
}

impl Netns {
    /// Creates a namespace whose name contains `tag` (keep it short and
    /// made of letters, digits and `-`), with loopback up and a veth link to
    /// the root namespace on a /30 of 198.51.100.0/24 that no other interface
    /// of the host uses. Panics, after cleaning up, when a step fails.
    pub fn create(tag: &str) -> Netns {
        remove_stale();
        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{tag}-{pid}-{n}");
        // Interface names are at most 15 bytes: "ve" + 7-digit pid + "x"
        // + counter + side stays within that for any Linux pid.
        let host_veth = format!("ve{pid}x{n}h");
        let ns_veth = format!("ve{pid}x{n}n");
        assert!(host_veth.len() <= 15, "veth name {host_veth} too long");
        let choosing = CHOOSING.lock().unwrap_or_else(|e| e.into_inner());
        let slot = free_slot(pid.wrapping_add(n.wrapping_mul(7)));
        let base = u32::from(Ipv4Addr::new(198, 51, 100, 0)) + slot * 4;
        let ns = Netns {
            name,
            host_addr: Ipv4Addr::from(base + 1),
            ns_addr: Ipv4Addr::from(base + 2),
            host_veth,
            ns_veth,
        };
        // A leftover of the same name (same pid reused) goes first.
        ns.delete();
        let host = format!("{}/30", ns.host_addr);
        let inside = format!("{}/30", ns.ns_addr);
        let steps: [&[&str]; 7] = [
            &["netns", "add", &ns.name],
            &[
                "link",
                "add",
                &ns.host_veth,
                "type",
                "veth",
                "peer",
                "name",
                &ns.ns_veth,
                "netns",
                &ns.name,
            ],
            &["addr", "add", &host, "dev", &ns.host_veth],
            &["link", "set", &ns.host_veth, "up"],
            &["-n", &ns.name, "addr", "add", &inside, "dev", &ns.ns_veth],
            &["-n", &ns.name, "link", "set", &ns.ns_veth, "up"],
            &["-n", &ns.name, "link", "set", "lo", "up"],
        ];
        for step in steps {
            ip(step).unwrap_or_else(|e| panic!("creating namespace {}: {e}", ns.name));
        }
        drop(choosing);
        ns
    }

    /// `ip netns exec NAME program args...`: the program runs inside the
    /// namespace.
    pub fn exec<I, S>(&self, program: impl Into<OsString>, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.name])
            .arg(program.into())
            .args(args.into_iter().map(Into::into));
        command
    }

    /// The words that put a command inside the namespace when written
    /// before it: `ip netns exec NAME`.
    pub fn prefix(&self) -> Vec<OsString> {
        ["ip", "netns", "exec", &self.name]
            .into_iter()
            .map(OsString::from)
            .collect()
    }

    /// Kills what still runs inside, then deletes the link and the
    /// namespace; errors (nothing to delete) are ignored.
    fn delete(&self) {
        delete(&self.name, &self.host_veth);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.delete();
    }
}

/// Runs `ip ARGS`, returning its stderr when it fails.
fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip (install iproute2): {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn delete(name: &str, host_veth: &str) {
    // Processes left inside (a client that hung) would keep the namespace's
    // sockets alive; they were started by the test that owns it.
    if let Ok(pids) = ip(&["netns", "pids", name]) {
        for pid in pids.split_whitespace() {
            let _ = Command::new("kill")
                .args(["-s", "KILL", pid])
                .stderr(Stdio::null())
                .status();
        }
    }
    // Deleting the namespace destroys its veth end, and with it the pair,
    // but the kernel does that asynchronously; delete the host end now so
    // its address is free at once.
    let _ = ip(&["link", "del", host_veth]);
    let _ = ip(&["netns", "del", name]);
}

/// Picks a /30 of 198.51.100.0/24 none of whose four addresses the root
/// namespace already knows: no interface has it, no route goes via it or
/// from it, no neighbour answers to it. (TEST-NET-1 may be in real use: a
/// sandbox's own interface and gateway can live there.) Searches downwards
/// from a slot near the top that depends on `seed`, away from the low
/// addresses gateways tend to have.
fn free_slot(seed: u32) -> u32 {
    let mut known = String::new();
    for args in [
        &["-o", "-4", "addr", "show"][..],
        &["-4", "route", "show", "table", "all"][..],
        &["-4", "neigh", "show"][..],
    ] {
        known += &ip(args).unwrap_or_else(|e| panic!("{e}"));
        known.push('\n');
    }
    let in_use: Vec<Ipv4Addr> = known
        .split(|c: char| c.is_whitespace() || c == '/')
        .filter_map(|word| word.parse().ok())
        .collect();
    let start = SLOTS - 1 - seed % 16;
    (0..SLOTS)
        .map(|i| (start + SLOTS - i) % SLOTS)
        .find(|slot| {
            let network = u32::from(Ipv4Addr::new(198, 51, 100, 0)) + slot * 4;
            (network..network + 4).all(|a| !in_use.contains(&Ipv4Addr::from(a)))
        })
        .expect("every /30 of 198.51.100.0/24 is in use on this host")
}

/// Deletes namespaces (and their links) that this module made in test
/// processes that no longer run, e.g. ones killed before their cleanup.
fn remove_stale() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let mut parts = rest.rsplitn(3, '-');
        let (Some(n), Some(pid), Some(_tag)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let (Ok(n), Ok(pid)) = (n.parse::<u32>(), pid.parse::<u32>()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            delete(name, &format!("ve{pid}x{n}h"));
        }
    }
}
