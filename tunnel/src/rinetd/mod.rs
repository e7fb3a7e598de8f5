//! Reading rinetd's own configuration file (`tunnel --rinetd-conf FILE`), so
//! a site can switch from rinetd without rewriting its `rinetd.conf`.
//!
//! The format is rinetd's (0.62 and 0.70): one item per line, `#` starts a
//! comment (on its own line or after content), blank lines are ignored.
//!
//! - `bindaddress bindport connectaddress connectport [options]` is a
//!   forwarding rule; it becomes a route named `BINDADDR:PORT` as tunnel
//!   prints it (`0.0.0.0:5432`, `[::]:80`). Names are unique because two
//!   rules on the same bind address and port are an error. Ports are numbers
//!   or service names (`/etc/services`, then a short built-in list). A port
//!   is TCP unless it says `/udp`; a rule with `/udp` on both ports forwards
//!   UDP (see [`crate::udp`]), and is named `BINDADDR:PORT/udp`, so a TCP
//!   and a UDP rule may share an address. A rule between UDP and TCP, which
//!   rinetd relays by pouring datagrams into a stream, is refused: tunnel
//!   keeps datagrams whole. The bind address must be an IP address
//!   (`localhost` means `127.0.0.1`); the connect address may be a host
//!   name, resolved at every connect (and at every UDP session's start).
//! - Options in brackets: `timeout=N` is a UDP rule's session idle timeout
//!   in seconds, as in rinetd (0, or none: rinetd's 72 seconds); on a TCP
//!   rule it is checked and ignored, as rinetd ignores it, and the idle
//!   timeout is tunnel's own `idle_timeout` setting. `src=ADDR` is refused
//!   (tunnel cannot choose the source address of outgoing connections),
//!   and so is anything else.
//! - `allow PATTERN` and `deny PATTERN` before the first rule apply to every
//!   rule; after a rule they apply to that rule alone, as in rinetd. A
//!   pattern is an IPv4 address with `*` and `?` wildcards, kept as written
//!   and matched like rinetd against the client's dotted-decimal address
//!   when a connection is accepted (see
//!   [`Wildcard`](common::settings::Wildcard)); an IPv6 address or a CIDR
//!   network may be written too.
//! - `logfile PATH` sets the access log and `pidlogfile PATH` the pid file;
//!   `logcommon` is accepted, though tunnel always writes its own, richer
//!   access-log lines. `include` and anything else is an error.
//!
//! Every problem is reported with its line, all at once.
//!
//! The parts: `line` reads one line's tokens (a rule, its options, an
//! `allow`/`deny` pattern, a path), `convert` takes the lines in file order
//! into routes and global settings, and `services` looks up port names.

mod convert;
mod line;
mod services;

use std::path::Path;

use common::config::{read_file, ConfigError, ConfigErrors, Origin};

use crate::settings::Settings;

/// Parses the text of a rinetd configuration file into the tunnel's
/// settings: the forwarding rules become `routes`, the quick-form `listen`
/// is left empty, and everything rinetd does not set keeps its default.
///
/// On failure, every problem is returned as a 1-based line number and a
/// message; line 0 stands for a problem with the whole file (no rules).
pub fn parse(text: &str) -> Result<Settings, Vec<(usize, String)>> {
    let services = services::SystemServices::default();
    parse_with(text, &|name, protocol| services.port(name, protocol))
        .map_err(|problems| problems.into_iter().map(|p| (p.line, p.message)).collect())
}

/// Reads and parses the rinetd configuration file at `path` (see [`parse`]),
/// reporting each problem with the file and line it is on.
pub fn read(path: &Path) -> Result<Settings, ConfigErrors> {
    let text = read_file(path, "rinetd configuration file", "--rinetd-conf")?;
    let services = services::SystemServices::default();
    parse_with(&text, &|name, protocol| services.port(name, protocol)).map_err(|problems| {
        ConfigErrors(
            problems
                .into_iter()
                .map(|p| ConfigError {
                    key: String::new(),
                    value: p.value,
                    origin: Some(Origin::File {
                        path: path.to_path_buf(),
                        line: (p.line > 0).then_some(p.line),
                        column: None,
                    }),
                    message: p.message,
                })
                .collect(),
        )
    })
}

/// One problem, on a line (0: the whole file).
#[derive(Debug)]
struct Problem {
    line: usize,
    value: Option<String>,
    message: String,
}

/// The problems found so far, in the order of the lines, each once.
#[derive(Debug, Default)]
struct Problems(Vec<Problem>);

impl Problems {
    /// Adds a problem on `line`, unless the same one is already there.
    fn add(&mut self, line: usize, value: Option<&str>, message: String) {
        let duplicate = self
            .0
            .iter()
            .any(|p| p.line == line && p.message == message);
        if !duplicate {
            self.0.push(Problem {
                line,
                value: value.map(str::to_string),
                message,
            });
        }
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Parses with `services` looking up port names: each line is read (see
/// [`line`]) and taken into the settings (see [`convert`]) in
/// file order, so problems come in the order of their lines.
fn parse_with(
    text: &str,
    services: &dyn Fn(&str, crate::settings::Protocol) -> Option<u16>,
) -> Result<Settings, Vec<Problem>> {
    let mut problems = Problems::default();
    let mut converter = convert::Converter::new();
    for (index, raw) in text.lines().enumerate() {
        let content = raw.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        let n = index + 1;
        if let Some(line) = line::read_line(n, content, services, &mut problems) {
            converter.line(n, line, &mut problems);
        }
    }
    let settings = converter.finish(&mut problems);
    if problems.is_empty() {
        Ok(settings)
    } else {
        Err(problems.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::IpAddr;

    use crate::settings::ListenList;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Problems as (line, message), from a parse that must fail.
    pub(super) fn problems(text: &str) -> Vec<(usize, String)> {
        parse(text).unwrap_err()
    }

    /// Asserts a single problem on `line` whose message contains `needle`.
    pub(super) fn one_problem(text: &str, line: usize, needle: &str) {
        let all = problems(text);
        assert_eq!(all.len(), 1, "{all:?}");
        assert_eq!(all[0].0, line, "{all:?}");
        assert!(all[0].1.contains(needle), "{:?} lacks {needle:?}", all[0].1);
    }

    const REALISTIC: &str = "\
# rinetd.conf for the database gateway
#
# global rules: only the office and the VPN, never the guest Wi-Fi
allow 192.168.*
allow 10.8.0.?
deny 192.168.99.*

logfile /var/log/rinetd.log
logcommon
pidlogfile /run/rinetd.pid

# PostgreSQL, for the reporting hosts only
0.0.0.0     5432    db.internal     5432   # primary
allow 192.168.1.1*
deny 192.168.1.100

# the web UI, on both stacks
::          http    10.0.0.7        8080/tcp [timeout=1200]
127.0.0.1   8443/tcp localhost      https
";

    #[test]
    fn a_realistic_rinetd_conf() {
        let settings = parse(REALISTIC).unwrap();
        assert_eq!(settings.listen, ListenList::default());
        assert_eq!(settings.access_log.as_deref(), Some("/var/log/rinetd.log"));
        assert_eq!(settings.pid_file.as_deref(), Some("/run/rinetd.pid"));
        assert_eq!(
            settings
                .allow
                .0
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["192.168.*", "10.8.0.?"],
            "patterns are kept as written"
        );
        assert_eq!(settings.deny, "192.168.99.*".parse().unwrap());

        let names: Vec<&str> = settings.routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["0.0.0.0:5432", "[::]:80", "127.0.0.1:8443"]);

        let db = &settings.routes[0];
        assert_eq!(db.listen.0, vec!["0.0.0.0:5432".parse().unwrap()]);
        assert_eq!(db.target, Some("db.internal:5432".parse().unwrap()));
        assert!(db.allow.contains(ip("192.168.1.1")));
        assert!(db.allow.contains(ip("192.168.1.150")));
        assert!(!db.allow.contains(ip("192.168.1.2")));
        assert_eq!(db.deny.to_string(), "192.168.1.100/32");

        let web = &settings.routes[1];
        assert_eq!(web.listen.0, vec!["[::]:80".parse().unwrap()]);
        assert_eq!(web.target, Some("10.0.0.7:8080".parse().unwrap()));
        assert!(web.allow.is_empty() && web.deny.is_empty());
        assert_eq!(web.idle_timeout, None, "timeout= is for UDP and ignored");

        let local = &settings.routes[2];
        assert_eq!(local.target, Some("localhost:443".parse().unwrap()));

        // The routes resolve like routes from a YAML file: global rules
        // first, then the rule's own.
        let routes = settings.routes().unwrap();
        assert_eq!(routes.len(), 3);
        let access = common::settings::AccessRules(routes[0].access.clone());
        assert!(access.permits(ip("192.168.1.15")));
        assert!(!access.permits(ip("192.168.1.100")), "the rule's deny");
        assert!(
            !access.permits(ip("192.168.1.2")),
            "not in the rule's allow"
        );
        assert!(!access.permits(ip("172.16.0.1")), "not in the global allow");
        let web = common::settings::AccessRules(routes[1].access.clone());
        assert!(web.permits(ip("10.8.0.3")));
        assert!(!web.permits(ip("10.8.0.10")), "10.8.0.? is one digit");
        assert!(!web.permits(ip("192.168.99.4")), "the global deny");
        assert!(web.permits(ip("192.168.199.4")), "192.168.99.* has a dot");
        assert!(!web.permits(ip("2001:db8::1")), "patterns match IPv4 only");
    }

    #[test]
    fn patterns_rinetd_matches_and_no_network_can_express() {
        let settings =
            parse("allow *.*.*.1\ndeny 10.?.*.*\n0.0.0.0 1 h 1\nallow 1?2.*\ndeny *.2?.*.1\n")
                .unwrap();
        let routes = settings.routes().unwrap();
        let access = common::settings::AccessRules(routes[0].access.clone());
        assert!(access.permits(ip("192.168.0.1")));
        assert!(access.permits(ip("172.16.5.1")));
        assert!(access.permits(ip("1.2.3.1")), "? matches the dot too");
        assert!(!access.permits(ip("192.168.0.2")), "not *.*.*.1");
        assert!(!access.permits(ip("192.168.0.11")), "not *.*.*.1");
        assert!(!access.permits(ip("127.0.0.1")), "not the rule's 1?2.*");
        assert!(!access.permits(ip("172.25.0.1")), "the rule's deny");
        assert!(access.permits(ip("172.250.0.1")), "2? is two digits");
        assert!(access.permits(ip("::ffff:192.168.0.1")), "IPv4-mapped");
        assert!(
            !access.permits(ip("2001:db8::1")),
            "patterns match IPv4 only"
        );

        // The global deny: 10.? is one digit.
        let global = common::settings::AccessRules(vec![routes[0].access[0].clone()]);
        assert!(!global.permits(ip("10.1.0.1")));
        assert!(global.permits(ip("10.10.0.1")));
    }

    #[test]
    fn printed_settings_read_back_the_same() {
        let settings = parse(REALISTIC).unwrap();
        let yaml = common::yaml::to_string(&settings).unwrap();
        assert!(yaml.contains("192.168.1.1*"), "{yaml}");
        let back: Settings = common::yaml::from_str(&yaml).unwrap();
        assert_eq!(back.routes, settings.routes);
        assert_eq!((back.allow, back.deny), (settings.allow, settings.deny));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = "bogus\n0.0.0.0 53/sctp db.internal nosuch\nallow 999.*\nlogcommon x\n";
        let lines: Vec<usize> = problems(text).iter().map(|(line, _)| *line).collect();
        assert_eq!(lines, [1, 2, 2, 3, 4]);
    }

    #[test]
    fn read_names_the_file_and_line() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        write!(file, "0.0.0.0 1 h 1\nfrobnicate now\n").unwrap();
        let err = read(file.path()).unwrap_err();
        assert_eq!(err.0.len(), 1);
        let e = &err.0[0];
        assert_eq!(e.value.as_deref(), Some("frobnicate"));
        assert_eq!(
            e.origin,
            Some(Origin::File {
                path: file.path().to_path_buf(),
                line: Some(2),
                column: None,
            })
        );
        let shown = e.to_string();
        assert!(
            shown.starts_with(&format!("{}:2: unknown directive", file.path().display())),
            "{shown}"
        );

        let missing = Path::new("/nonexistent/rinetd.conf");
        let err = read(missing).unwrap_err().to_string();
        assert!(
            err.contains("/nonexistent/rinetd.conf") && err.contains("--rinetd-conf"),
            "{err}"
        );

        let mut empty = tempfile::NamedTempFile::new().unwrap();
        writeln!(empty, "# only comments").unwrap();
        let err = read(empty.path()).unwrap_err();
        assert_eq!(
            err.0[0].origin,
            Some(Origin::File {
                path: empty.path().to_path_buf(),
                line: None,
                column: None,
            })
        );

        let mut good = tempfile::NamedTempFile::new().unwrap();
        write!(good, "{REALISTIC}").unwrap();
        assert_eq!(read(good.path()).unwrap().routes.len(), 3);
    }
}
