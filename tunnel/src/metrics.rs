//! Counters per route and target, and their Prometheus text exposition.
//!
//! Every route and target has one set of counters for the life of the
//! process, kept across reloads, so a reload never resets a counter; a route
//! or target that a reload removes is dropped from the exposition.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Counters of one target of one route.
#[derive(Debug, Default)]
pub struct TargetStats {
    /// Connections open now.
    pub active: AtomicI64,
    /// Connections made to this target.
    pub total: AtomicU64,
    /// Bytes from clients to the target (counted when a connection ends).
    pub sent: AtomicU64,
    /// Bytes from the target to clients (counted when a connection ends).
    pub received: AtomicU64,
    /// Connect attempts that failed (refused, timed out, did not resolve).
    pub connect_failures: AtomicU64,
    /// Connections the target closed or reset before its first byte that
    /// were sent on to another target (`retry_before_first_byte`).
    pub retries: AtomicU64,
    /// Whether new connections may go to it.
    pub up: AtomicBool,
}

/// Counters of one route.
#[derive(Debug, Default)]
pub struct RouteStats {
    /// Clients refused by an access list.
    pub refused: AtomicU64,
    /// Clients closed because no target could be reached.
    pub unavailable: AtomicU64,
    /// Connections closed for their PROXY protocol header: malformed,
    /// incomplete, missing, or from a source not in `accept_proxy`.
    pub proxy_refused: AtomicU64,
    /// TLS handshakes of the listening side, and the expiry of its
    /// certificate, when the route terminates TLS (kept across reloads
    /// like every counter).
    pub handshakes: Arc<common::tls::HandshakeStats>,
    /// Sessions and datagrams, when the route forwards UDP.
    pub udp: UdpStats,
    /// Refusals by the per-source limits and the sources they track (kept
    /// across reloads like every counter).
    pub per_source: Arc<common::limits::PerSourceStats>,
    targets: Mutex<BTreeMap<String, Arc<TargetStats>>>,
}

/// Why a datagram from a client or a target was not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// Its source is refused by the route's access lists.
    Access,
    /// It would have started a session, and the route has its most.
    SessionLimit,
    /// It filled the receive buffer, so it may have been cut short.
    Truncated,
    /// It came while its session was starting, and the queue for that
    /// was full.
    Backlog,
    /// Its session could not start (no target resolved) or had ended.
    NoTarget,
    /// Sending it failed.
    SendFailed,
}

impl Dropped {
    /// Every reason, in the order of the exposition.
    pub const ALL: [Dropped; 6] = [
        Dropped::Access,
        Dropped::SessionLimit,
        Dropped::Truncated,
        Dropped::Backlog,
        Dropped::NoTarget,
        Dropped::SendFailed,
    ];

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Dropped::Access => "access",
            Dropped::SessionLimit => "session_limit",
            Dropped::Truncated => "truncated",
            Dropped::Backlog => "backlog",
            Dropped::NoTarget => "no_target",
            Dropped::SendFailed => "send_failed",
        }
    }
}

/// Counters of a UDP route, counted as datagrams go (not as sessions
/// end, so a long session shows its traffic while it runs).
#[derive(Debug, Default)]
pub struct UdpStats {
    /// Whether the route forwards UDP (only such routes are exposed).
    pub enabled: AtomicBool,
    /// Sessions open now.
    pub sessions_active: AtomicI64,
    /// Sessions started.
    pub sessions_total: AtomicU64,
    /// Datagrams from clients forwarded to targets.
    pub datagrams_sent: AtomicU64,
    /// Their bytes.
    pub bytes_sent: AtomicU64,
    /// Datagrams from targets forwarded to clients.
    pub datagrams_received: AtomicU64,
    /// Their bytes.
    pub bytes_received: AtomicU64,
    dropped: [AtomicU64; Dropped::ALL.len()],
}

impl UdpStats {
    /// Counts a datagram not forwarded.
    pub fn dropped(&self, why: Dropped) {
        self.dropped[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Datagrams not forwarded for `why`.
    pub fn dropped_total(&self, why: Dropped) -> u64 {
        self.dropped[why as usize].load(Ordering::Relaxed)
    }
}

impl RouteStats {
    /// The counters of `target`, made at first use.
    pub fn target(&self, target: &str) -> Arc<TargetStats> {
        self.targets
            .lock()
            .expect("stats lock")
            .entry(target.to_string())
            .or_insert_with(|| {
                Arc::new(TargetStats {
                    up: AtomicBool::new(true),
                    ..TargetStats::default()
                })
            })
            .clone()
    }
}

/// All the counters of a tunnel.
#[derive(Debug, Default)]
pub struct Metrics {
    routes: Mutex<BTreeMap<String, Arc<RouteStats>>>,
    /// Clients of a listen address shared by name (SNI) that no route
    /// took: by address, then reason.
    sni_refused: Mutex<BTreeMap<(String, &'static str), u64>>,
}

impl Metrics {
    /// The counters of `route`, made at first use.
    pub fn route(&self, route: &str) -> Arc<RouteStats> {
        self.routes
            .lock()
            .expect("stats lock")
            .entry(route.to_string())
            .or_default()
            .clone()
    }

    /// Counts a client of the shared address `listen` that no route took,
    /// for `reason` (`unknown_name`, `no_name`, `not_tls`).
    pub fn sni_refused(&self, listen: &str, reason: &'static str) {
        *self
            .sni_refused
            .lock()
            .expect("stats lock")
            .entry((listen.to_string(), reason))
            .or_default() += 1;
    }

    /// Forgets routes and targets no longer configured.
    pub fn retain(&self, routes: &[(String, Vec<String>)]) {
        let mut all = self.routes.lock().expect("stats lock");
        all.retain(|name, _| routes.iter().any(|(r, _)| r == name));
        for (name, targets) in routes {
            if let Some(stats) = all.get(name) {
                stats
                    .targets
                    .lock()
                    .expect("stats lock")
                    .retain(|t, _| targets.contains(t));
            }
        }
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let routes = self.routes.lock().expect("stats lock");
        let mut out = String::new();
        for family in ROUTE_FAMILIES {
            family.header(&mut out);
            for (route, stats) in routes.iter() {
                let _ = writeln!(
                    out,
                    "{}{{route=\"{}\"}} {}",
                    family.name,
                    escape(route),
                    (family.value)(stats)
                );
            }
        }
        for family in TARGET_FAMILIES {
            family.header(&mut out);
            for (route, stats) in routes.iter() {
                for (target, t) in stats.targets.lock().expect("stats lock").iter() {
                    let _ = writeln!(
                        out,
                        "{}{{route=\"{}\",target=\"{}\"}} {}",
                        family.name,
                        escape(route),
                        escape(target),
                        (family.value)(t)
                    );
                }
            }
        }
        render_per_source(&routes, &mut out);
        render_tls(&routes, &mut out);
        render_udp(&routes, &mut out);
        let sni = self.sni_refused.lock().expect("stats lock");
        let _ = writeln!(
            out,
            "# HELP tunnel_sni_refused_total Clients of an address shared by server name that no route took, by reason.\n# TYPE tunnel_sni_refused_total counter"
        );
        for ((listen, reason), n) in sni.iter() {
            let _ = writeln!(
                out,
                "tunnel_sni_refused_total{{listen=\"{}\",reason=\"{reason}\"}} {n}",
                escape(listen)
            );
        }
        let _ = writeln!(
            out,
            "# HELP tunnel_log_lines_dropped_total Log and access-log lines lost: the writer could not keep up, or the write failed.\n# TYPE tunnel_log_lines_dropped_total counter\ntunnel_log_lines_dropped_total {}",
            common::telemetry::dropped_lines()
        );
        out
    }
}

/// The per-source families, for every route.
fn render_per_source(routes: &BTreeMap<String, Arc<RouteStats>>, out: &mut String) {
    let _ = writeln!(
        out,
        "# HELP tunnel_per_source_refused_total Clients refused by the route's per-source limits, by the limit they met.\n# TYPE tunnel_per_source_refused_total counter"
    );
    for (route, s) in routes.iter() {
        let route = escape(route);
        let s = &s.per_source;
        let _ = writeln!(
            out,
            "tunnel_per_source_refused_total{{route=\"{route}\",limit=\"connections\"}} {}\ntunnel_per_source_refused_total{{route=\"{route}\",limit=\"rate\"}} {}",
            s.refused_connections(),
            s.refused_rate()
        );
    }
    let _ = writeln!(
        out,
        "# HELP tunnel_per_source_sources Client addresses or prefixes the route's per-source limits remember now.\n# TYPE tunnel_per_source_sources gauge"
    );
    for (route, s) in routes.iter() {
        let _ = writeln!(
            out,
            "tunnel_per_source_sources{{route=\"{}\"}} {}",
            escape(route),
            s.per_source.sources()
        );
    }
}

/// The TLS families, for the routes that terminate TLS.
fn render_tls(routes: &BTreeMap<String, Arc<RouteStats>>, out: &mut String) {
    let tls = || routes.iter().filter(|(_, s)| s.handshakes.expiry() > 0);
    let _ = writeln!(
        out,
        "# HELP tunnel_tls_handshakes_total TLS handshakes completed on the route's listening side.\n# TYPE tunnel_tls_handshakes_total counter"
    );
    for (route, s) in tls() {
        let _ = writeln!(
            out,
            "tunnel_tls_handshakes_total{{route=\"{}\"}} {}",
            escape(route),
            s.handshakes.completed_total()
        );
    }
    let _ = writeln!(
        out,
        "# HELP tunnel_tls_handshake_failures_total TLS handshakes refused or failed on the route's listening side, by reason.\n# TYPE tunnel_tls_handshake_failures_total counter"
    );
    for (route, s) in tls() {
        for (reason, n) in s.handshakes.failed_totals() {
            let _ = writeln!(
                out,
                "tunnel_tls_handshake_failures_total{{route=\"{}\",reason=\"{}\"}} {n}",
                escape(route),
                reason.as_str()
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP tunnel_tls_certificate_expiry_seconds When the route's certificate expires (Unix time).\n# TYPE tunnel_tls_certificate_expiry_seconds gauge"
    );
    for (route, s) in tls() {
        let _ = writeln!(
            out,
            "tunnel_tls_certificate_expiry_seconds{{route=\"{}\"}} {}",
            escape(route),
            s.handshakes.expiry()
        );
    }
}

/// The UDP families, for the routes that forward UDP.
fn render_udp(routes: &BTreeMap<String, Arc<RouteStats>>, out: &mut String) {
    for family in UDP_FAMILIES {
        family.header(out);
        for (route, s) in routes.iter() {
            if s.udp.enabled.load(Ordering::Relaxed) {
                let _ = writeln!(
                    out,
                    "{}{{route=\"{}\"}} {}",
                    family.name,
                    escape(route),
                    (family.value)(&s.udp)
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP tunnel_udp_datagrams_dropped_total Datagrams not forwarded, by reason.\n# TYPE tunnel_udp_datagrams_dropped_total counter"
    );
    for (route, s) in routes.iter() {
        if s.udp.enabled.load(Ordering::Relaxed) {
            for why in Dropped::ALL {
                let _ = writeln!(
                    out,
                    "tunnel_udp_datagrams_dropped_total{{route=\"{}\",reason=\"{}\"}} {}",
                    escape(route),
                    why.as_str(),
                    s.udp.dropped_total(why)
                );
            }
        }
    }
}

const UDP_FAMILIES: [Family<UdpStats>; 6] = [
    Family {
        name: "tunnel_udp_sessions_active",
        kind: "gauge",
        help: "UDP sessions open now.",
        value: |s| s.sessions_active.load(Ordering::Relaxed).max(0) as u64,
    },
    Family {
        name: "tunnel_udp_sessions_total",
        kind: "counter",
        help: "UDP sessions started.",
        value: |s| s.sessions_total.load(Ordering::Relaxed),
    },
    Family {
        name: "tunnel_udp_sent_datagrams_total",
        kind: "counter",
        help: "Datagrams from clients forwarded to the targets.",
        value: |s| s.datagrams_sent.load(Ordering::Relaxed),
    },
    Family {
        name: "tunnel_udp_sent_bytes_total",
        kind: "counter",
        help: "Bytes of the datagrams from clients forwarded to the targets.",
        value: |s| s.bytes_sent.load(Ordering::Relaxed),
    },
    Family {
        name: "tunnel_udp_received_datagrams_total",
        kind: "counter",
        help: "Datagrams from the targets forwarded to clients.",
        value: |s| s.datagrams_received.load(Ordering::Relaxed),
    },
    Family {
        name: "tunnel_udp_received_bytes_total",
        kind: "counter",
        help: "Bytes of the datagrams from the targets forwarded to clients.",
        value: |s| s.bytes_received.load(Ordering::Relaxed),
    },
];

/// One metric family: its name, type, help, and how to read it.
struct Family<S> {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    value: fn(&S) -> u64,
}

impl<S> Family<S> {
    fn header(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP {} {}\n# TYPE {} {}",
            self.name, self.help, self.name, self.kind
        );
    }
}

const ROUTE_FAMILIES: [Family<RouteStats>; 3] = [
    Family {
        name: "tunnel_connections_refused_total",
        kind: "counter",
        help: "Clients refused by an access list.",
        value: |s| s.refused.load(Ordering::Relaxed),
    },
    Family {
        name: "tunnel_connections_unavailable_total",
        kind: "counter",
        help: "Clients closed because no target could be reached.",
        value: |s| s.unavailable.load(Ordering::Relaxed),
    },
    Family {
        name: "tunnel_proxy_headers_refused_total",
        kind: "counter",
        help: "Connections closed for their PROXY protocol header: malformed, incomplete, missing, or from a source not in accept_proxy.",
        value: |s| s.proxy_refused.load(Ordering::Relaxed),
    },
];

const TARGET_FAMILIES: [Family<TargetStats>; 7] = [
    Family {
        name: "tunnel_connections_active",
        kind: "gauge",
        help: "Connections open now.",
        value: |t| t.active.load(Ordering::Relaxed).max(0) as u64,
    },
    Family {
        name: "tunnel_connections_total",
        kind: "counter",
        help: "Connections made to the target.",
        value: |t| t.total.load(Ordering::Relaxed),
    },
    Family {
        name: "tunnel_sent_bytes_total",
        kind: "counter",
        help: "Bytes from clients to the target, counted as connections end.",
        value: |t| t.sent.load(Ordering::Relaxed),
    },
    Family {
        name: "tunnel_received_bytes_total",
        kind: "counter",
        help: "Bytes from the target to clients, counted as connections end.",
        value: |t| t.received.load(Ordering::Relaxed),
    },
    Family {
        name: "tunnel_connect_failures_total",
        kind: "counter",
        help: "Connect attempts to the target that failed.",
        value: |t| t.connect_failures.load(Ordering::Relaxed),
    },
    Family {
        name: "tunnel_retries_total",
        kind: "counter",
        help: "Connections the target closed or reset before answering, sent on to another target.",
        value: |t| t.retries.load(Ordering::Relaxed),
    },
    Family {
        name: "tunnel_target_up",
        kind: "gauge",
        help: "1 when new connections may go to the target, 0 while it is ejected.",
        value: |t| t.up.load(Ordering::Relaxed) as u64,
    },
];

/// A label value with `\`, `"` and newlines escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
