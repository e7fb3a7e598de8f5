//! Turning the lines of a rinetd.conf into the tunnel's settings, in file
//! order as rinetd reads them: each forwarding rule becomes a route named
//! after its bind address, `allow` and `deny` before the first rule are
//! global and after a rule are that rule's own, and `logfile` and
//! `pidlogfile` set the access log and the pid file (once each).
//!
//! A `/udp` rule becomes a UDP route named `BINDADDR:PORT/udp` (so a TCP
//! and a UDP rule may share an address, as in rinetd); its `[timeout=N]`
//! is the route's `idle_timeout`, and without one (or with 0) its sessions
//! end after rinetd's default of 72 idle seconds, which the conversion
//! sets as `udp_idle_timeout`.

use std::collections::HashMap;

use common::settings::{List, ListenAddr, Period};

use super::line::{Forward, Line};
use super::Problems;
use crate::settings::{Protocol, RouteSettings, Settings};

/// rinetd's idle timeout of a UDP session, when its rule sets none.
pub(super) const RINETD_UDP_TIMEOUT: u64 = 72;

/// The settings made so far, and what later lines need to know.
pub(super) struct Converter {
    settings: Settings,
    /// Forwarding rules seen, good or bad: after the first, `allow` and
    /// `deny` belong to the latest rule.
    rules: usize,
    /// The index in `settings.routes` of the latest rule, when it was good.
    last_rule: Option<usize>,
    /// Bind addresses in use, by protocol, with the line of their rule.
    binds: HashMap<(ListenAddr, Protocol), usize>,
    logfile_line: Option<usize>,
    pidlogfile_line: Option<usize>,
}

impl Converter {
    /// A converter with no lines yet: tunnel's defaults, and no quick-form
    /// listen address (rinetd has none).
    pub(super) fn new() -> Self {
        Converter {
            settings: Settings {
                listen: List::default(),
                ..Settings::default()
            },
            rules: 0,
            last_rule: None,
            binds: HashMap::new(),
            logfile_line: None,
            pidlogfile_line: None,
        }
    }

    /// Takes what line `n` says into the settings.
    pub(super) fn line(&mut self, n: usize, line: Line, problems: &mut Problems) {
        match line {
            Line::Rule(rule) => self.rule(n, rule, problems),
            Line::Access { allow, pattern } => {
                let list = if self.rules == 0 {
                    if allow {
                        &mut self.settings.allow
                    } else {
                        &mut self.settings.deny
                    }
                } else if let Some(i) = self.last_rule {
                    let route = &mut self.settings.routes[i];
                    if allow {
                        &mut route.allow
                    } else {
                        &mut route.deny
                    }
                } else {
                    // The rule it belongs to was bad and has been reported.
                    return;
                };
                list.0.push(pattern);
            }
            Line::LogFile(path) => {
                if self.once(n, "logfile", &path, problems) {
                    self.settings.access_log = Some(path);
                }
            }
            Line::PidLogFile(path) => {
                if self.once(n, "pidlogfile", &path, problems) {
                    self.settings.pid_file = Some(path);
                }
            }
        }
    }

    /// Whether `directive` on line `n` is its first; reports a second.
    fn once(&mut self, n: usize, directive: &str, path: &str, problems: &mut Problems) -> bool {
        let first = if directive == "logfile" {
            &mut self.logfile_line
        } else {
            &mut self.pidlogfile_line
        };
        if let Some(first) = *first {
            problems.add(
                n,
                Some(path),
                format!("{directive} is given twice (first on line {first})"),
            );
            return false;
        }
        *first = Some(n);
        true
    }

    fn rule(&mut self, n: usize, rule: Option<Forward>, problems: &mut Problems) {
        self.rules += 1;
        self.last_rule = None;
        let Some(Forward {
            bind,
            listen,
            target,
            protocol,
            timeout,
            options_ok,
        }) = rule
        else {
            return;
        };
        if let Some(first) = self.binds.get(&(listen, protocol)) {
            let message = format!("{listen} is already forwarded by the rule on line {first}");
            problems.add(n, Some(&bind), message);
            return;
        }
        // 0.0.0.0 takes the port on every IPv4 address (and :: on every
        // address): rinetd itself would fail to bind the second rule.
        let overlap = self
            .binds
            .iter()
            .filter(|((other, p), _)| *p == protocol && crate::overlaps(*other, listen))
            .map(|((other, _), line)| (*other, *line))
            .min_by_key(|(_, line)| *line);
        if let Some((other, first)) = overlap {
            let message = format!(
                "{listen} overlaps {other} of the rule on line {first} (a wildcard address takes the port on every address); keep one of them or use another port"
            );
            problems.add(n, Some(&bind), message);
            return;
        }
        self.binds.insert((listen, protocol), n);
        if !options_ok {
            return;
        }
        let route = match protocol {
            Protocol::Tcp => RouteSettings {
                name: listen.to_string(),
                ..RouteSettings::default()
            },
            Protocol::Udp => {
                self.settings.udp_idle_timeout = Period::from_secs(RINETD_UDP_TIMEOUT);
                RouteSettings {
                    name: format!("{listen}/udp"),
                    protocol: Some(Protocol::Udp),
                    // As rinetd: 0 is its default.
                    idle_timeout: timeout.filter(|&t| t > 0).map(Period::from_secs),
                    ..RouteSettings::default()
                }
            }
        };
        self.settings.routes.push(RouteSettings {
            listen: List(vec![listen]),
            target: Some(List(vec![target.into()])),
            ..route
        });
        self.last_rule = Some(self.settings.routes.len() - 1);
    }

    /// The settings, once every line is read; a file without a good rule
    /// is reported (on line 0, the whole file) unless it has other
    /// problems.
    pub(super) fn finish(self, problems: &mut Problems) -> Settings {
        if self.rules == 0 && problems.is_empty() {
            problems.add(
                0,
                None,
                "no forwarding rules; add a line such as `0.0.0.0 5432 db.internal 5432` \
                 (bindaddress bindport connectaddress connectport)"
                    .into(),
            );
        }
        self.settings
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse;
    use super::super::tests::{one_problem, problems};

    #[test]
    fn every_conversion_error_with_its_line() {
        one_problem(
            "0.0.0.0 1 h 1\n0.0.0.0 1 other 2",
            2,
            "already forwarded by the rule on line 1",
        );
        one_problem(
            "5.0.0.0 5432 h 1\n0.0.0.0 5432 other 2",
            2,
            "overlaps 5.0.0.0:5432 of the rule on line 1",
        );
        one_problem(":: 80 h 1\n127.0.0.1 80 other 2", 2, "overlaps [::]:80");
        one_problem(
            "0.0.0.0 53/udp h 53/udp\n0.0.0.0 53/udp other 53/udp",
            2,
            "already forwarded by the rule on line 1",
        );
        one_problem(
            "pidlogfile /a\npidlogfile /b\n0.0.0.0 1 h 1",
            2,
            "given twice (first on line 1)",
        );
        one_problem("# nothing here\n", 0, "no forwarding rules");
        one_problem("", 0, "no forwarding rules");
    }

    #[test]
    fn a_rule_with_a_bad_option_still_takes_its_address() {
        let all = problems("0.0.0.0 1 h 1 [color=blue]\n0.0.0.0 1 other 2\n");
        let lines: Vec<usize> = all.iter().map(|(line, _)| *line).collect();
        assert_eq!(lines, [1, 2], "{all:?}");
        assert!(all[1].1.contains("already forwarded by the rule on line 1"));
    }

    #[test]
    fn allow_after_a_bad_rule_does_not_become_global() {
        let all = problems("0.0.0.0 1/udp h 1\nallow 10.*\n0.0.0.0 2 h 2\n");
        assert_eq!(all.len(), 1, "{all:?}");
        // Without the bad rule, the same allow is the rule's own.
        let settings = parse("0.0.0.0 2 h 2\nallow 10.*\n").unwrap();
        assert!(settings.allow.is_empty());
        assert_eq!(settings.routes[0].allow, "10.*".parse().unwrap());
    }
}

#[cfg(test)]
mod udp_tests {
    use super::super::parse;
    use super::RINETD_UDP_TIMEOUT;
    use crate::settings::Protocol;
    use common::settings::Period;

    #[test]
    fn udp_rules_become_udp_routes_with_rinetds_timeout() {
        let settings = parse(
            "0.0.0.0 53/udp 10.0.0.53 53/udp\n\
             0.0.0.0 53 10.0.0.53 53\n\
             127.0.0.1 5353/udp localhost domain/udp [timeout=5]\n\
             allow 127.0.0.*\n\
             127.0.0.1 1194/udp vpn 1194/udp [timeout=0]\n\
             127.0.0.1 8080 web 80 [timeout=1200]\n",
        )
        .unwrap();
        let names: Vec<&str> = settings.routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "0.0.0.0:53/udp",
                "0.0.0.0:53",
                "127.0.0.1:5353/udp",
                "127.0.0.1:1194/udp",
                "127.0.0.1:8080"
            ]
        );
        assert_eq!(
            settings.udp_idle_timeout,
            Period::from_secs(RINETD_UDP_TIMEOUT)
        );
        let routes = settings.routes().unwrap();
        let udp: Vec<(Protocol, u64)> = routes
            .iter()
            .map(|r| (r.protocol, r.idle_timeout.0.as_secs()))
            .collect();
        assert_eq!(
            udp,
            [
                (Protocol::Udp, 72),
                (Protocol::Tcp, 3600),
                (Protocol::Udp, 5),
                (Protocol::Udp, 72),
                // timeout= is for UDP; a TCP rule keeps tunnel's own.
                (Protocol::Tcp, 3600),
            ]
        );
        assert_eq!(routes[2].targets[0].to_string(), "localhost:53");
        assert!(
            !routes[2].access[1].allow.is_empty(),
            "the rule's own allow"
        );

        // Printed as YAML, read back the same.
        let yaml = common::yaml::to_string(&settings).unwrap();
        assert!(yaml.contains("protocol: udp"), "{yaml}");
        let back: crate::settings::Settings = common::yaml::from_str(&yaml).unwrap();
        assert_eq!(back.routes, settings.routes);
        assert_eq!(back.udp_idle_timeout, settings.udp_idle_timeout);

        // Without a UDP rule, nothing UDP is set.
        let tcp = parse("0.0.0.0 1 h 1\n").unwrap();
        assert_eq!(tcp.udp_idle_timeout, Period::from_secs(60));
    }
}
