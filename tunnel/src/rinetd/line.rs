//! Reading one line of a rinetd.conf: its tokens, and what they say.
//!
//! A line is a forwarding rule (`bindaddress bindport connectaddress
//! connectport [options]`), an `allow` or `deny` pattern, `logfile` or
//! `pidlogfile` with a path, or `logcommon`. Every token is checked here,
//! port names looked up as services; what depends on other lines (which
//! rule an `allow` belongs to, a bind address used twice, a second
//! `logfile`) is decided by the conversion (see `convert`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use common::settings::{AddressPattern, ListenAddr};

use super::Problems;
use crate::settings::{Protocol, Target};

/// What a line says, once its tokens are checked.
#[derive(Debug)]
pub(super) enum Line {
    /// A forwarding rule; `None` when a problem with its addresses or
    /// ports was reported (it still counts as a rule: the `allow` and
    /// `deny` lines after it are its own, not global).
    Rule(Option<Forward>),
    /// `allow` (or `deny`) and its pattern.
    Access {
        allow: bool,
        pattern: AddressPattern,
    },
    /// `logfile PATH`.
    LogFile(String),
    /// `pidlogfile PATH`.
    PidLogFile(String),
}

/// A forwarding rule whose addresses and ports are good.
#[derive(Debug)]
pub(super) struct Forward {
    /// The bind address as written, for messages.
    pub bind: String,
    /// `bindaddress bindport`.
    pub listen: ListenAddr,
    /// `connectaddress connectport`.
    pub target: Target,
    /// TCP, or UDP when both ports say `/udp`.
    pub protocol: Protocol,
    /// `[timeout=N]`: a UDP session's idle seconds (0 or none: rinetd's
    /// default).
    pub timeout: Option<u64>,
    /// False when its options had a problem: the rule still takes its bind
    /// address (a second rule on it is reported too) but makes no route.
    pub options_ok: bool,
}

/// Reads line `n`, whose comment is already cut off and which is not
/// blank; reports its problems and returns what it says, if anything.
pub(super) fn read_line(
    n: usize,
    content: &str,
    services: &dyn Fn(&str, Protocol) -> Option<u16>,
    problems: &mut Problems,
) -> Option<Line> {
    let mut reader = Reader {
        n,
        services,
        problems,
    };
    reader.line(content)
}

/// The reader of one line: where it is, and where its problems go.
struct Reader<'a> {
    n: usize,
    services: &'a dyn Fn(&str, Protocol) -> Option<u16>,
    problems: &'a mut Problems,
}

impl Reader<'_> {
    fn problem(&mut self, value: Option<&str>, message: String) {
        self.problems.add(self.n, value, message);
    }

    fn line(&mut self, content: &str) -> Option<Line> {
        let fields: Vec<&str> = content.split_whitespace().collect();
        let directive = fields[0].to_ascii_lowercase();
        let args = &fields[1..];
        match directive.as_str() {
            "allow" | "deny" => self.access(&directive, args),
            "logfile" | "pidlogfile" => self.path(&directive, content, args),
            "logcommon" => {
                // tunnel writes its own access-log format, a superset of
                // rinetd's; the choice of format is accepted and ignored.
                if !args.is_empty() {
                    self.problem(Some(args[0]), "logcommon takes no arguments".into());
                }
                None
            }
            "include" => {
                self.problem(
                    Some(fields[0]),
                    "include is not supported; copy the included file's lines here".into(),
                );
                None
            }
            _ if fields.len() >= 4 => Some(Line::Rule(self.rule(&fields))),
            _ if directive == "localhost" || unbracket(fields[0]).parse::<IpAddr>().is_ok() => {
                self.problem(
                    Some(fields[0]),
                    format!(
                        "incomplete forwarding rule: {} of the four fields \
                         `bindaddress bindport connectaddress connectport`",
                        fields.len()
                    ),
                );
                None
            }
            _ => {
                self.problem(
                    Some(fields[0]),
                    format!(
                        "unknown directive {:?}; a forwarding rule is \
                         `bindaddress bindport connectaddress connectport`",
                        fields[0]
                    ),
                );
                None
            }
        }
    }

    fn access(&mut self, directive: &str, args: &[&str]) -> Option<Line> {
        let [pattern] = args else {
            let value = args.get(1).copied();
            self.problem(
                value,
                format!("{directive} needs exactly one pattern, such as `{directive} 192.168.1.*`"),
            );
            return None;
        };
        match pattern.parse() {
            Ok(pattern) => Some(Line::Access {
                allow: directive == "allow",
                pattern,
            }),
            Err(e) => {
                self.problem(Some(pattern), e);
                None
            }
        }
    }

    fn path(&mut self, directive: &str, content: &str, args: &[&str]) -> Option<Line> {
        let rest = content[directive.len()..].trim();
        let path = match rest.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
            Some(quoted) if !quoted.is_empty() => quoted,
            _ if args.len() == 1 => args[0],
            _ => {
                self.problem(
                    args.get(1).copied(),
                    format!(
                        "{directive} needs one path, such as `{directive} /var/log/rinetd.log` \
                         (quote a path with spaces)"
                    ),
                );
                return None;
            }
        };
        Some(if directive == "logfile" {
            Line::LogFile(path.to_string())
        } else {
            Line::PidLogFile(path.to_string())
        })
    }

    fn rule(&mut self, fields: &[&str]) -> Option<Forward> {
        let bind_ip = self.bind_address(fields[0]);
        let bind_port = self.port(fields[1]);
        let host = self.connect_address(fields[2]);
        let port = self.port(fields[3]);
        let checked = self.problems.len();
        let timeout = if fields.len() > 4 {
            self.options(&fields[4..].join(" "))
        } else {
            None
        };
        let (Some(ip), Some((bind_port, bind_proto)), Some(host), Some((port, proto))) =
            (bind_ip, bind_port, host, port)
        else {
            return None;
        };
        if bind_proto != proto {
            // rinetd writes a datagram's bytes into the stream and cuts
            // the stream into datagrams as it reads it; tunnel keeps every
            // datagram whole.
            self.problem(
                Some(fields[3]),
                format!(
                    "{} is {bind_proto} and {} is {proto}: forwarding between UDP and TCP is not supported \
                     (tunnel keeps datagrams whole); write /udp after both ports to forward UDP, or neither for TCP",
                    fields[1], fields[3]
                ),
            );
            return None;
        }
        Some(Forward {
            bind: fields[0].to_string(),
            listen: ListenAddr(SocketAddr::new(ip, bind_port)),
            target: Target { host, port },
            protocol: proto,
            timeout,
            options_ok: self.problems.len() == checked,
        })
    }

    fn bind_address(&mut self, token: &str) -> Option<IpAddr> {
        let bare = unbracket(token);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Some(ip);
        }
        if bare.eq_ignore_ascii_case("localhost") {
            return Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        self.problem(
            Some(token),
            format!(
                "bind address {token:?} is not an IP address; use an IP address \
                 (0.0.0.0 for every IPv4 interface, :: for every IPv6 one, 127.0.0.1 for this machine only)"
            ),
        );
        None
    }

    fn connect_address(&mut self, token: &str) -> Option<String> {
        let bare = unbracket(token);
        let name_like = !bare.is_empty()
            && bare
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
        if bare.parse::<IpAddr>().is_ok() || name_like {
            return Some(bare.to_string());
        }
        self.problem(
            Some(token),
            format!("connect address {token:?} is not a host name or IP address"),
        );
        None
    }

    /// A port and its protocol (`/tcp`, `/udp`, or nothing: TCP, as in
    /// rinetd).
    fn port(&mut self, token: &str) -> Option<(u16, Protocol)> {
        let (service, proto) = match token.split_once('/') {
            Some((service, proto)) => (service, Some(proto)),
            None => (token, None),
        };
        let protocol = match proto.map(str::to_ascii_lowercase).as_deref() {
            None | Some("tcp") => Protocol::Tcp,
            Some("udp") => Protocol::Udp,
            Some(other) => {
                self.problem(
                    Some(token),
                    format!("{token:?}: unknown protocol {other:?}; write /tcp, /udp or nothing"),
                );
                return None;
            }
        };
        let found = if !service.is_empty() && service.bytes().all(|b| b.is_ascii_digit()) {
            match service.parse::<u16>() {
                Ok(port) if port != 0 => Some(port),
                _ => {
                    self.problem(
                        Some(token),
                        format!("port {service:?} is out of range (1 to 65535)"),
                    );
                    return None;
                }
            }
        } else {
            (self.services)(service, protocol)
        };
        if found.is_none() {
            self.problem(
                Some(token),
                format!(
                    "{service:?} is not a port number or a known {} service name \
                     (looked up in /etc/services); write the port number",
                    protocol.to_string().to_uppercase()
                ),
            );
        }
        found.map(|port| (port, protocol))
    }

    /// Checks the options in brackets; returns `timeout=N`'s N.
    fn options(&mut self, text: &str) -> Option<u64> {
        let Some(inner) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) else {
            self.problem(
                Some(text),
                format!(
                    "unexpected {text:?} after the connect port; options go in brackets, \
                     such as [timeout=60]"
                ),
            );
            return None;
        };
        let mut timeout = None;
        for option in inner.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            let (name, value) = option.split_once('=').unwrap_or((option, ""));
            let (name, value) = (name.trim(), value.trim());
            match name.to_ascii_lowercase().as_str() {
                // rinetd applies timeout= to UDP only (the conversion
                // does too); a TCP rule's idle timeout is tunnel's own
                // idle_timeout setting.
                "timeout" => match value.parse::<u64>() {
                    Ok(seconds) => timeout = Some(seconds),
                    Err(_) => self.problem(
                        Some(option),
                        format!("timeout {value:?} is not a whole number of seconds"),
                    ),
                },
                "src" => self.problem(
                    Some(option),
                    "option src= (the source address of connections to the target) \
                     is not supported by tunnel; remove it"
                        .into(),
                ),
                _ => self.problem(
                    Some(option),
                    format!(
                        "unknown option {name:?}; rinetd's options are timeout=SECONDS and src=ADDRESS"
                    ),
                ),
            }
        }
        timeout
    }
}

/// An address without the brackets an IPv6 address may be written in.
fn unbracket(token: &str) -> &str {
    token
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(token)
}

#[cfg(test)]
mod tests {
    use super::super::parse;
    use super::super::tests::one_problem;

    #[test]
    fn ipv6_and_bracketed_addresses() {
        let settings = parse("[::1] 2222 [2001:db8::5] 22\n:: 23 fe80::1 23\n").unwrap();
        assert_eq!(settings.routes[0].name, "[::1]:2222");
        assert_eq!(
            settings.routes[0].target.as_ref().unwrap().0[0].to_string(),
            "[2001:db8::5]:22"
        );
        assert_eq!(
            settings.routes[1].target.as_ref().unwrap().to_string(),
            "[fe80::1]:23"
        );
    }

    #[test]
    fn localhost_binds_the_loopback_address() {
        let settings = parse("localhost 8000 example.org 80").unwrap();
        assert_eq!(
            settings.routes[0].listen.0,
            vec!["127.0.0.1:8000".parse().unwrap()]
        );
    }

    #[test]
    fn trailing_comments_crlf_quoted_paths_and_case() {
        let text =
            "LOGFILE \"/var/log/my rinetd.log\" # quoted\r\n0.0.0.0\t8080\tweb\t80 # web\r\n";
        let settings = parse(text).unwrap();
        assert_eq!(
            settings.access_log.as_deref(),
            Some("/var/log/my rinetd.log")
        );
        assert_eq!(settings.routes[0].target, Some("web:80".parse().unwrap()));
    }

    #[test]
    fn every_line_error_with_its_line() {
        one_problem(
            "# hello\n\nbogus thing\n0.0.0.0 1 h 1",
            3,
            "unknown directive \"bogus\"",
        );
        one_problem(
            "0.0.0.0 1 h 1\n:: 5432 db",
            2,
            "incomplete forwarding rule: 3 of the four",
        );
        one_problem(
            "0.0.0.0 1 h 1\ninclude /etc/more.conf",
            2,
            "include is not supported",
        );
        one_problem(
            "0.0.0.0 1 h 1\n\n0.0.0.0 53/udp dns 53",
            3,
            "53/udp is udp and 53 is tcp: forwarding between UDP and TCP is not supported",
        );
        one_problem(
            "0.0.0.0 8000/tcp h 8000/udp",
            1,
            "8000/tcp is tcp and 8000/udp is udp",
        );
        one_problem("0.0.0.0 80/sctp h 80", 1, "unknown protocol \"sctp\"");
        one_problem("0.0.0.0 1 h 70000", 1, "out of range");
        one_problem("0.0.0.0 0 h 1", 1, "out of range");
        one_problem(
            "0.0.0.0 1 h nosuchservice",
            1,
            "\"nosuchservice\" is not a port number",
        );
        one_problem("gateway.example 1 h 1", 1, "use an IP address");
        one_problem("0.0.0.0 1 bad/host 1", 1, "not a host name or IP address");
        one_problem(
            "0.0.0.0 1 h 1 [timeout=soon]",
            1,
            "not a whole number of seconds",
        );
        one_problem("0.0.0.0 1 h 1 [src=10.0.0.1]", 1, "src= ");
        one_problem("0.0.0.0 1 h 1 [color=blue]", 1, "unknown option \"color\"");
        one_problem("0.0.0.0 1 h 1 extra", 1, "options go in brackets");
        one_problem("allow\n0.0.0.0 1 h 1", 1, "exactly one pattern");
        one_problem(
            "deny 1.2.3.4 5.6.7.8\n0.0.0.0 1 h 1",
            1,
            "exactly one pattern",
        );
        one_problem(
            "allow db.internal\n0.0.0.0 1 h 1",
            1,
            "host names cannot be matched",
        );
        one_problem("allow 1.2.3\n0.0.0.0 1 h 1", 1, "is not an IP address");
        one_problem("allow 300.*\n0.0.0.0 1 h 1", 1, "matches no IPv4 address");
        one_problem(
            "allow 2001:db8::*\n0.0.0.0 1 h 1",
            1,
            "wildcards work only in IPv4",
        );
        one_problem("deny 10.*/8\n0.0.0.0 1 h 1", 1, "no wildcards");
        one_problem("logfile\n0.0.0.0 1 h 1", 1, "logfile needs one path");
        one_problem("logfile a b\n0.0.0.0 1 h 1", 1, "logfile needs one path");
        one_problem("logcommon please\n0.0.0.0 1 h 1", 1, "no arguments");
    }
}
