//! What a running fabric publishes about itself, and `deploy status`,
//! which shows it from another terminal.
//!
//! The fabric rewrites `status.json` in its directory (beside the
//! topology) whenever an instance or an endpoint changes: the fabric's
//! process, the definition it follows, each endpoint, and each instance
//! with its state, process, restarts and when it last started. `deploy
//! status` finds the fabrics of this machine by their directories, keeps
//! those whose process still runs, and adds what only the moment can say:
//! each instance's and endpoint's open connections (from the kernel's
//! socket tables) and uptimes.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{EndpointLine, Instance, State};

pub use common::fabric::{Published, PublishedEndpoint, PublishedInstance, STATUS_FILE};

fn epoch_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Writes the status to `path` (atomically). A failure is logged once in
/// a while and changes nothing else: the fabric runs on without it.
pub(super) fn publish(
    path: &Path,
    definition: Option<&Path>,
    instances: &[Instance],
    endpoints: &[EndpointLine],
) {
    let published = Published {
        pid: std::process::id(),
        definition: definition.map(|d| std::path::absolute(d).unwrap_or_else(|_| d.to_path_buf())),
        endpoints: endpoints
            .iter()
            .map(|e| PublishedEndpoint {
                role: e.role.clone(),
                endpoint: e.endpoint.clone(),
                visibility: e.visibility.to_string(),
                address: e.address,
            })
            .collect(),
        instances: instances
            .iter()
            .map(|i| PublishedInstance {
                role: i.role.clone(),
                id: i.id.clone(),
                addr: i.addr,
                state: i.state.to_string(),
                pid: i.pid,
                restarts: i.restarts,
                since: i.since.map(epoch_seconds),
            })
            .collect(),
    };
    let written = serde_json::to_vec_pretty(&published)
        .map_err(std::io::Error::other)
        .and_then(|text| common::files::write_atomically(path, &text));
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e, "cannot publish the fabric's status; `deploy status` will not show it");
    }
}

/// The fabrics running on this machine, each read from its status file:
/// those whose process is a live `deploy`, oldest process first.
pub fn running() -> Vec<Published> {
    let mut found = Vec::new();
    for (pid, dir) in super::fabric_dirs() {
        if !super::is_fabric(pid) {
            continue;
        }
        let file = dir.join(STATUS_FILE);
        let Ok(text) = std::fs::read(&file) else {
            continue;
        };
        match serde_json::from_slice::<Published>(&text) {
            Ok(published) if published.pid == pid => found.push(published),
            _ => {}
        }
    }
    found.sort_by_key(|p| p.pid);
    found
}

/// Established TCP connections by local port, from the kernel's tables
/// (see [`common::fabric::tcp_sockets`]); empty where they cannot be read.
pub fn connections_by_port() -> std::collections::HashMap<u16, usize> {
    let mut counts = std::collections::HashMap::new();
    for socket in common::fabric::tcp_sockets() {
        // 1: established.
        if socket.state == 1 {
            *counts.entry(socket.local.port()).or_insert(0) += 1;
        }
    }
    counts
}

/// `1h02m`, `3m05s`, `12s`.
pub fn uptime(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// The status of `fabric` as a table: a row per instance, then a line
/// per endpoint. `connections` counts open connections by local port;
/// `now` is the moment shown.
pub fn render(
    fabric: &Published,
    connections: &std::collections::HashMap<u16, usize>,
    now: SystemTime,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "fabric {}{}",
        fabric.pid,
        fabric
            .definition
            .as_ref()
            .map(|d| format!(", following {}", d.display()))
            .unwrap_or_default()
    );
    let rows: Vec<[String; 8]> = fabric
        .instances
        .iter()
        .map(|i| {
            let alive = i.pid.is_some();
            [
                i.role.clone(),
                i.id.clone(),
                i.pid.map_or("-".into(), |p| p.to_string()),
                i.addr.to_string(),
                i.restarts.to_string(),
                connections
                    .get(&i.addr.port())
                    .copied()
                    .unwrap_or(0)
                    .to_string(),
                match (alive, i.since) {
                    (true, Some(since)) => uptime(
                        now.duration_since(UNIX_EPOCH + Duration::from_secs(since))
                            .unwrap_or_default(),
                    ),
                    _ => "-".into(),
                },
                i.state.clone(),
            ]
        })
        .collect();
    let headers = [
        "ROLE",
        "INSTANCE",
        "PID",
        "ADDRESS",
        "RESTARTS",
        "CONNECTIONS",
        "UPTIME",
        "STATE",
    ];
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |out: &mut String, cells: &[&str]| {
        let mut text = String::new();
        for (n, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            match n {
                // The state, last, is not padded.
                7 => text.push_str(cell),
                // Numbers to the right.
                2 | 4 | 5 | 6 => {
                    let _ = write!(text, "{cell:>w$}  ");
                }
                _ => {
                    let _ = write!(text, "{cell:<w$}  ");
                }
            }
        }
        let _ = writeln!(out, "{}", text.trim_end());
    };
    line(&mut out, &headers);
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        line(&mut out, &cells);
    }
    for e in &fabric.endpoints {
        let of_role: Vec<&PublishedInstance> = fabric
            .instances
            .iter()
            .filter(|i| i.role == e.role)
            .collect();
        let live = of_role
            .iter()
            .filter(|i| i.state == State::Running.to_string())
            .count();
        let open = connections.get(&e.address.port()).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "{} endpoint {}/{} on {} -> {} instances ({live} live), {open} connections",
            e.visibility,
            e.role,
            e.endpoint,
            e.address,
            of_role.len()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn uptimes_read_at_a_glance() {
        assert_eq!(uptime(Duration::from_secs(0)), "0s");
        assert_eq!(uptime(Duration::from_secs(59)), "59s");
        assert_eq!(uptime(Duration::from_secs(65)), "1m05s");
        assert_eq!(uptime(Duration::from_secs(3720)), "1h02m");
        assert_eq!(uptime(Duration::from_secs(90_000)), "1d01h");
    }

    #[test]
    fn the_table_has_a_row_per_instance_and_a_line_per_endpoint() {
        let published = Published {
            pid: 42,
            definition: Some(PathBuf::from("/srv/service.yaml")),
            endpoints: vec![PublishedEndpoint {
                role: "echo-server".into(),
                endpoint: "EchoEndpoint".into(),
                visibility: "public".into(),
                address: "0.0.0.0:1234".parse().unwrap(),
            }],
            instances: vec![
                PublishedInstance {
                    role: "echo-server".into(),
                    id: "echo-server_IN_0".into(),
                    addr: "127.0.0.1:40001".parse().unwrap(),
                    state: "running".into(),
                    pid: Some(1001),
                    restarts: 2,
                    since: Some(1_000),
                },
                PublishedInstance {
                    role: "echo-server".into(),
                    id: "echo-server_IN_1".into(),
                    addr: "127.0.0.1:40002".parse().unwrap(),
                    state: "crashed (exit status: 1)".into(),
                    pid: None,
                    restarts: 0,
                    since: Some(1_000),
                },
            ],
        };
        let connections = [(40001, 3), (1234, 3)].into_iter().collect();
        let text = render(
            &published,
            &connections,
            UNIX_EPOCH + Duration::from_secs(1_065),
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "fabric 42, following /srv/service.yaml");
        assert!(lines[1].starts_with("ROLE"), "{text}");
        let first: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(
            first,
            [
                "echo-server",
                "echo-server_IN_0",
                "1001",
                "127.0.0.1:40001",
                "2",
                "3",
                "1m05s",
                "running"
            ]
        );
        assert!(lines[3].ends_with("-  crashed (exit status: 1)"), "{text}");
        assert_eq!(
            lines[4],
            "public endpoint echo-server/EchoEndpoint on 0.0.0.0:1234 -> 2 instances (1 live), 3 connections"
        );
    }
}
