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
//!   or service names (`/etc/services`, then a short built-in list); `/tcp`
//!   is accepted, `/udp` is refused because tunnel forwards TCP only. The
//!   bind address must be an IP address (`localhost` means `127.0.0.1`);
//!   the connect address may be a host name, resolved at every connect.
//! - Options in brackets: `timeout=N` is checked and ignored, because rinetd
//!   applies it to UDP only and tunnel's TCP idle timeout is its own
//!   `idle_timeout` setting; `src=ADDR` is refused (tunnel cannot choose the
//!   source address of outgoing connections), and so is anything else.
//! - `allow PATTERN` and `deny PATTERN` before the first rule apply to every
//!   rule; after a rule they apply to that rule alone, as in rinetd. A
//!   pattern is an IPv4 address with `*` and `?` wildcards, matched like
//!   rinetd against the dotted-decimal address, and converted to the CIDR
//!   networks it covers (see [`pattern_networks`]); an IPv6 address or a
//!   CIDR network may be written directly.
//! - `logfile PATH` sets the access log and `pidlogfile PATH` the pid file;
//!   `logcommon` is accepted, though tunnel always writes its own, richer
//!   access-log lines. `include` and anything else is an error.
//!
//! Every problem is reported with its line, all at once.

use std::cell::OnceCell;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::rc::Rc;

use common::config::{read_file, ConfigError, ConfigErrors, Origin};
use common::settings::{CidrList, ListenAddr};
use ipnet::{IpNet, Ipv4Net};

use crate::settings::{ListenList, RouteSettings, Settings, Target, TargetList};

/// The most networks one allow or deny pattern may expand to.
pub const MAX_PATTERN_NETWORKS: u64 = 65_536;

/// Parses the text of a rinetd configuration file into the tunnel's
/// settings: the forwarding rules become `routes`, the quick-form `listen`
/// is left empty, and everything rinetd does not set keeps its default.
///
/// On failure, every problem is returned as a 1-based line number and a
/// message; line 0 stands for a problem with the whole file (no rules).
pub fn parse(text: &str) -> Result<Settings, Vec<(usize, String)>> {
    let services = SystemServices::default();
    parse_with(text, &|name| services.port(name))
        .map_err(|problems| problems.into_iter().map(|p| (p.line, p.message)).collect())
}

/// Reads and parses the rinetd configuration file at `path` (see [`parse`]),
/// reporting each problem with the file and line it is on.
pub fn read(path: &Path) -> Result<Settings, ConfigErrors> {
    let text = read_file(path, "rinetd configuration file", "--rinetd-conf")?;
    let services = SystemServices::default();
    parse_with(&text, &|name| services.port(name)).map_err(|problems| {
        ConfigErrors(
            problems
                .into_iter()
                .map(|p| ConfigError {
                    key: String::new(),
                    value: p.value,
                    origin: Some(Origin::File {
                        path: path.to_path_buf(),
                        line: (p.line > 0).then_some(p.line),
                    }),
                    message: p.message,
                })
                .collect(),
        )
    })
}

/// The networks a rinetd `allow`/`deny` pattern covers.
///
/// A pattern of digits, dots, `*` (any run of characters, dots included)
/// and `?` (any one character) matches an IPv4 address when it matches the
/// address written in dotted decimal, exactly as rinetd matches it. The
/// matching addresses are returned as CIDR networks, adjacent ones merged:
/// `192.168.1.*` is `192.168.1.0/24`, `10.*` is `10.0.0.0/8`, `10.0.0.?` is
/// `10.0.0.0` to `10.0.0.9`. A pattern covering more than
/// [`MAX_PATTERN_NETWORKS`] separate networks is refused. A plain address
/// (IPv4 or IPv6) is a network of one; a CIDR network is taken as written.
pub fn pattern_networks(pattern: &str) -> Result<Vec<IpNet>, String> {
    let wild = pattern.contains(['*', '?']);
    if pattern.contains([':', '/']) {
        if wild {
            return Err(format!(
                "{pattern:?}: wildcards work only in IPv4 patterns; write a CIDR network such as 2001:db8::/32"
            ));
        }
        return CidrList::parse_item(pattern).map(|net| vec![net]);
    }
    if !pattern
        .bytes()
        .all(|b| b.is_ascii_digit() || b".*?".contains(&b))
    {
        return Err(format!(
            "{pattern:?} is not an IP address, CIDR network or rinetd pattern (digits, dots, * and ?); host names cannot be matched"
        ));
    }
    if !wild {
        return pattern
            .parse::<IpAddr>()
            .map(|ip| vec![IpNet::from(ip)])
            .map_err(|_| format!("{pattern:?} is not an IP address"));
    }
    let glob = Glob::new(pattern)?;
    let mut memo = HashMap::new();
    let start = glob.start();
    match glob.summary(start, 0, &mut memo) {
        Node::Empty => Err(format!("{pattern:?} matches no IPv4 address")),
        Node::Partial(count) if count > MAX_PATTERN_NETWORKS => Err(format!(
            "{pattern:?} covers {count} separate networks, more than {MAX_PATTERN_NETWORKS}; write the networks you mean in CIDR form, such as 10.0.0.0/8"
        )),
        _ => {
            let nets: Vec<Ipv4Net> = glob
                .networks(start, 0, &mut memo, &mut HashMap::new())
                .iter()
                .filter_map(|&(addr, len)| Ipv4Net::new(Ipv4Addr::from(addr), len).ok())
                .collect();
            Ok(Ipv4Net::aggregate(&nets)
                .into_iter()
                .map(IpNet::V4)
                .collect())
        }
    }
}

/// One problem, on a line (0: the whole file).
#[derive(Debug)]
struct Problem {
    line: usize,
    value: Option<String>,
    message: String,
}

/// Parses with `services` looking up port names.
fn parse_with(
    text: &str,
    services: &dyn Fn(&str) -> Option<u16>,
) -> Result<Settings, Vec<Problem>> {
    let mut parser = Parser {
        services,
        problems: Vec::new(),
        settings: Settings {
            listen: ListenList::default(),
            ..Settings::default()
        },
        rules: 0,
        last_rule: None,
        binds: HashMap::new(),
        logfile_line: None,
        pidlogfile_line: None,
    };
    for (index, raw) in text.lines().enumerate() {
        let content = raw.split('#').next().unwrap_or("").trim();
        if !content.is_empty() {
            parser.line(index + 1, content);
        }
    }
    if parser.rules == 0 && parser.problems.is_empty() {
        parser.problems.push(Problem {
            line: 0,
            value: None,
            message: "no forwarding rules; add a line such as `0.0.0.0 5432 db.internal 5432` \
                      (bindaddress bindport connectaddress connectport)"
                .into(),
        });
    }
    if parser.problems.is_empty() {
        Ok(parser.settings)
    } else {
        Err(parser.problems)
    }
}

struct Parser<'a> {
    services: &'a dyn Fn(&str) -> Option<u16>,
    problems: Vec<Problem>,
    settings: Settings,
    /// Forwarding rules seen, good or bad: after the first, `allow` and
    /// `deny` belong to the latest rule.
    rules: usize,
    /// The index in `settings.routes` of the latest rule, when it was good.
    last_rule: Option<usize>,
    /// Bind addresses in use, with the line of their rule.
    binds: HashMap<ListenAddr, usize>,
    logfile_line: Option<usize>,
    pidlogfile_line: Option<usize>,
}

impl Parser<'_> {
    fn problem(&mut self, line: usize, value: Option<&str>, message: String) {
        let duplicate = self
            .problems
            .iter()
            .any(|p| p.line == line && p.message == message);
        if !duplicate {
            self.problems.push(Problem {
                line,
                value: value.map(str::to_string),
                message,
            });
        }
    }

    fn line(&mut self, n: usize, content: &str) {
        let fields: Vec<&str> = content.split_whitespace().collect();
        let directive = fields[0].to_ascii_lowercase();
        let args = &fields[1..];
        match directive.as_str() {
            "allow" | "deny" => self.access(n, &directive, args),
            "logfile" | "pidlogfile" => self.path(n, &directive, content, args),
            "logcommon" => {
                // tunnel writes its own access-log format, a superset of
                // rinetd's; the choice of format is accepted and ignored.
                if !args.is_empty() {
                    self.problem(n, Some(args[0]), "logcommon takes no arguments".into());
                }
            }
            "include" => self.problem(
                n,
                Some(fields[0]),
                "include is not supported; copy the included file's lines here".into(),
            ),
            _ if fields.len() >= 4 => self.rule(n, &fields),
            _ if directive == "localhost" || unbracket(fields[0]).parse::<IpAddr>().is_ok() => self
                .problem(
                    n,
                    Some(fields[0]),
                    format!(
                        "incomplete forwarding rule: {} of the four fields \
                         `bindaddress bindport connectaddress connectport`",
                        fields.len()
                    ),
                ),
            _ => self.problem(
                n,
                Some(fields[0]),
                format!(
                    "unknown directive {:?}; a forwarding rule is \
                     `bindaddress bindport connectaddress connectport`",
                    fields[0]
                ),
            ),
        }
    }

    fn access(&mut self, n: usize, directive: &str, args: &[&str]) {
        let [pattern] = args else {
            let value = args.get(1).copied();
            self.problem(
                n,
                value,
                format!("{directive} needs exactly one pattern, such as `{directive} 192.168.1.*`"),
            );
            return;
        };
        let nets = match pattern_networks(pattern) {
            Ok(nets) => nets,
            Err(e) => {
                self.problem(n, Some(pattern), e);
                return;
            }
        };
        let list = if self.rules == 0 {
            if directive == "allow" {
                &mut self.settings.allow
            } else {
                &mut self.settings.deny
            }
        } else if let Some(i) = self.last_rule {
            let route = &mut self.settings.routes[i];
            if directive == "allow" {
                &mut route.allow
            } else {
                &mut route.deny
            }
        } else {
            // The rule it belongs to was bad and has been reported.
            return;
        };
        list.0.extend(nets);
    }

    fn path(&mut self, n: usize, directive: &str, content: &str, args: &[&str]) {
        let rest = content[directive.len()..].trim();
        let path = match rest.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
            Some(quoted) if !quoted.is_empty() => quoted,
            _ if args.len() == 1 => args[0],
            _ => {
                self.problem(
                    n,
                    args.get(1).copied(),
                    format!(
                        "{directive} needs one path, such as `{directive} /var/log/rinetd.log` \
                         (quote a path with spaces)"
                    ),
                );
                return;
            }
        };
        let first = if directive == "logfile" {
            &mut self.logfile_line
        } else {
            &mut self.pidlogfile_line
        };
        if let Some(first) = *first {
            self.problem(
                n,
                Some(path),
                format!("{directive} is given twice (first on line {first})"),
            );
            return;
        }
        *first = Some(n);
        if directive == "logfile" {
            self.settings.access_log = Some(path.to_string());
        } else {
            self.settings.pid_file = Some(path.to_string());
        }
    }

    fn rule(&mut self, n: usize, fields: &[&str]) {
        self.rules += 1;
        self.last_rule = None;
        let before = self.problems.len();
        let bind_ip = self.bind_address(n, fields[0]);
        let bind_port = self.port(n, fields[1]);
        let host = self.connect_address(n, fields[2]);
        let port = self.port(n, fields[3]);
        if fields.len() > 4 {
            self.options(n, &fields[4..].join(" "));
        }
        let (Some(ip), Some(bind_port), Some(host), Some(port)) = (bind_ip, bind_port, host, port)
        else {
            return;
        };
        let listen = ListenAddr(SocketAddr::new(ip, bind_port));
        if let Some(first) = self.binds.get(&listen) {
            let message = format!("{listen} is already forwarded by the rule on line {first}");
            self.problem(n, Some(fields[0]), message);
            return;
        }
        // 0.0.0.0 takes the port on every IPv4 address (and :: on every
        // address): rinetd itself would fail to bind the second rule.
        let overlap = self
            .binds
            .iter()
            .filter(|(other, _)| crate::overlaps(**other, listen))
            .map(|(other, line)| (*other, *line))
            .min_by_key(|(_, line)| *line);
        if let Some((other, first)) = overlap {
            let message = format!(
                "{listen} overlaps {other} of the rule on line {first} (a wildcard address takes the port on every address); keep one of them or use another port"
            );
            self.problem(n, Some(fields[0]), message);
            return;
        }
        self.binds.insert(listen, n);
        if self.problems.len() > before {
            return;
        }
        self.settings.routes.push(RouteSettings {
            name: listen.to_string(),
            listen: ListenList(vec![listen]),
            target: Some(TargetList(vec![Target { host, port }])),
            ..RouteSettings::default()
        });
        self.last_rule = Some(self.settings.routes.len() - 1);
    }

    fn bind_address(&mut self, n: usize, token: &str) -> Option<IpAddr> {
        let bare = unbracket(token);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Some(ip);
        }
        if bare.eq_ignore_ascii_case("localhost") {
            return Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        self.problem(
            n,
            Some(token),
            format!(
                "bind address {token:?} is not an IP address; use an IP address \
                 (0.0.0.0 for every IPv4 interface, :: for every IPv6 one, 127.0.0.1 for this machine only)"
            ),
        );
        None
    }

    fn connect_address(&mut self, n: usize, token: &str) -> Option<String> {
        let bare = unbracket(token);
        let name_like = !bare.is_empty()
            && bare
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
        if bare.parse::<IpAddr>().is_ok() || name_like {
            return Some(bare.to_string());
        }
        self.problem(
            n,
            Some(token),
            format!("connect address {token:?} is not a host name or IP address"),
        );
        None
    }

    fn port(&mut self, n: usize, token: &str) -> Option<u16> {
        let (service, proto) = match token.split_once('/') {
            Some((service, proto)) => (service, Some(proto)),
            None => (token, None),
        };
        match proto.map(str::to_ascii_lowercase).as_deref() {
            None | Some("tcp") => {}
            Some("udp") => {
                self.problem(
                    n,
                    Some(token),
                    format!(
                        "{token:?}: UDP forwarding is not supported (tunnel forwards TCP); \
                         leave this rule with rinetd or remove it"
                    ),
                );
                return None;
            }
            Some(other) => {
                self.problem(
                    n,
                    Some(token),
                    format!("{token:?}: unknown protocol {other:?}; write /tcp or nothing"),
                );
                return None;
            }
        }
        let found = if !service.is_empty() && service.bytes().all(|b| b.is_ascii_digit()) {
            match service.parse::<u16>() {
                Ok(port) if port != 0 => Some(port),
                _ => {
                    self.problem(
                        n,
                        Some(token),
                        format!("port {service:?} is out of range (1 to 65535)"),
                    );
                    return None;
                }
            }
        } else {
            (self.services)(service)
        };
        if found.is_none() {
            self.problem(
                n,
                Some(token),
                format!(
                    "{service:?} is not a port number or a known TCP service name \
                     (looked up in /etc/services); write the port number"
                ),
            );
        }
        found
    }

    fn options(&mut self, n: usize, text: &str) {
        let Some(inner) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) else {
            self.problem(
                n,
                Some(text),
                format!(
                    "unexpected {text:?} after the connect port; options go in brackets, \
                     such as [timeout=60]"
                ),
            );
            return;
        };
        for option in inner.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            let (name, value) = option.split_once('=').unwrap_or((option, ""));
            let (name, value) = (name.trim(), value.trim());
            match name.to_ascii_lowercase().as_str() {
                // rinetd applies timeout= to UDP only; tunnel forwards TCP,
                // whose idle timeout is tunnel's own idle_timeout setting.
                "timeout" => {
                    if value.parse::<u64>().is_err() {
                        self.problem(
                            n,
                            Some(option),
                            format!("timeout {value:?} is not a whole number of seconds"),
                        );
                    }
                }
                "src" => self.problem(
                    n,
                    Some(option),
                    "option src= (the source address of connections to the target) \
                     is not supported by tunnel; remove it"
                        .into(),
                ),
                _ => self.problem(
                    n,
                    Some(option),
                    format!(
                        "unknown option {name:?}; rinetd's options are timeout=SECONDS and src=ADDRESS"
                    ),
                ),
            }
        }
    }
}

/// An address without the brackets an IPv6 address may be written in.
fn unbracket(token: &str) -> &str {
    token
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(token)
}

/// Service names, from `/etc/services` (read once, when first needed), then
/// from a short built-in list for systems without that file.
#[derive(Default)]
struct SystemServices {
    file: OnceCell<HashMap<String, u16>>,
}

impl SystemServices {
    fn port(&self, name: &str) -> Option<u16> {
        let file = self.file.get_or_init(|| {
            std::fs::read_to_string("/etc/services")
                .map(|text| services_from(&text))
                .unwrap_or_default()
        });
        file.get(name).copied().or_else(|| {
            BUILT_IN_SERVICES
                .iter()
                .find(|(known, _)| *known == name)
                .map(|(_, port)| *port)
        })
    }
}

/// Well-known TCP services, for systems without `/etc/services`.
const BUILT_IN_SERVICES: &[(&str, u16)] = &[
    ("ftp", 21),
    ("ssh", 22),
    ("telnet", 23),
    ("smtp", 25),
    ("domain", 53),
    ("http", 80),
    ("www", 80),
    ("pop3", 110),
    ("imap", 143),
    ("imap2", 143),
    ("ldap", 389),
    ("https", 443),
    ("submission", 587),
    ("ldaps", 636),
    ("imaps", 993),
    ("pop3s", 995),
    ("ms-sql-s", 1433),
    ("mysql", 3306),
    ("ms-wbt-server", 3389),
    ("postgresql", 5432),
    ("postgres", 5432),
    ("redis", 6379),
    ("http-alt", 8080),
    ("webcache", 8080),
];

/// The TCP services in a file in `/etc/services` format: names and aliases.
fn services_from(text: &str) -> HashMap<String, u16> {
    let mut map = HashMap::new();
    for line in text.lines() {
        let mut fields = line.split('#').next().unwrap_or("").split_whitespace();
        let (Some(name), Some(port_proto)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Some(("tcp", port)) = port_proto.split_once('/').map(|(p, proto)| (proto, p)) else {
            continue;
        };
        let Ok(port) = port.parse::<u16>() else {
            continue;
        };
        for alias in std::iter::once(name).chain(fields) {
            map.entry(alias.to_string()).or_insert(port);
        }
    }
    map
}

/// How many of the addresses below a point in the address tree a pattern
/// matches.
#[derive(Debug, Clone, Copy)]
enum Node {
    /// None.
    Empty,
    /// All: one network.
    Full,
    /// Some, making up this many networks.
    Partial(u64),
}

/// Networks below a point in the address tree: (the address bits below the
/// octets already read, prefix length).
type Networks = Rc<Vec<(u32, u8)>>;

/// A glob pattern as a set-of-positions automaton (at most 63 characters,
/// so a set of positions fits in a `u64`).
struct Glob {
    pattern: Vec<u8>,
}

impl Glob {
    fn new(pattern: &str) -> Result<Glob, String> {
        if pattern.len() > 63 {
            return Err(format!("pattern {pattern:?} is too long"));
        }
        Ok(Glob {
            pattern: pattern.as_bytes().to_vec(),
        })
    }

    /// The positions before any character is read.
    fn start(&self) -> u64 {
        self.closure(1)
    }

    /// `states` plus the positions after each `*` they stand on (a `*` may
    /// match nothing).
    fn closure(&self, mut states: u64) -> u64 {
        for (p, &c) in self.pattern.iter().enumerate() {
            if c == b'*' && states & (1 << p) != 0 {
                states |= 1 << (p + 1);
            }
        }
        states
    }

    fn step(&self, states: u64, c: u8) -> u64 {
        let mut next = 0;
        for (p, &pc) in self.pattern.iter().enumerate() {
            if states & (1 << p) == 0 {
                continue;
            }
            match pc {
                b'*' => next |= 1 << p,
                b'?' => next |= 1 << (p + 1),
                _ if pc == c => next |= 1 << (p + 1),
                _ => {}
            }
        }
        self.closure(next)
    }

    fn accepts(&self, states: u64) -> bool {
        states & (1 << self.pattern.len()) != 0
    }

    /// The states after reading octet `value` at `depth` (with the dot
    /// before it, past the first octet).
    fn octet(&self, mut states: u64, depth: usize, value: u8) -> u64 {
        if depth > 0 {
            states = self.step(states, b'.');
        }
        let mut digits = [0u8; 3];
        let text = {
            let mut v = value;
            let mut i = 3;
            loop {
                i -= 1;
                digits[i] = b'0' + v % 10;
                v /= 10;
                if v == 0 {
                    break;
                }
            }
            &digits[i..]
        };
        text.iter().fold(states, |s, &c| self.step(s, c))
    }

    /// What the pattern matches among the addresses whose first `depth`
    /// octets led to `states`.
    fn summary(&self, states: u64, depth: usize, memo: &mut HashMap<(u64, usize), Node>) -> Node {
        if states == 0 {
            return Node::Empty;
        }
        if depth == 4 {
            return if self.accepts(states) {
                Node::Full
            } else {
                Node::Empty
            };
        }
        if let Some(node) = memo.get(&(states, depth)) {
            return *node;
        }
        let (mut full, mut empty, mut count) = (0, 0, 0u64);
        for value in 0..=255u8 {
            match self.summary(self.octet(states, depth, value), depth + 1, memo) {
                Node::Empty => empty += 1,
                Node::Full => {
                    full += 1;
                    count += 1;
                }
                Node::Partial(k) => count += k,
            }
        }
        let node = match (full, empty) {
            (256, _) => Node::Full,
            (_, 256) => Node::Empty,
            _ => Node::Partial(count),
        };
        memo.insert((states, depth), node);
        node
    }

    /// The networks the pattern matches among the addresses whose first
    /// `depth` octets led to `states`, as (address bits below those octets,
    /// prefix length). Results are shared between equal states, so the work
    /// follows the size of the answer, not the size of the address space.
    fn networks(
        &self,
        states: u64,
        depth: usize,
        memo: &mut HashMap<(u64, usize), Node>,
        cache: &mut HashMap<(u64, usize), Networks>,
    ) -> Networks {
        if let Some(found) = cache.get(&(states, depth)) {
            return found.clone();
        }
        let found = match self.summary(states, depth, memo) {
            Node::Empty => Vec::new(),
            Node::Full => vec![(0, u8::try_from(depth * 8).unwrap_or(32))],
            Node::Partial(_) => {
                let mut all = Vec::new();
                for value in 0..=255u8 {
                    let next = self.octet(states, depth, value);
                    let bits = u32::from(value) << (24 - 8 * depth);
                    let below = self.networks(next, depth + 1, memo, cache);
                    all.extend(below.iter().map(|&(addr, len)| (addr | bits, len)));
                }
                all
            }
        };
        let found = Rc::new(found);
        cache.insert((states, depth), found.clone());
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn nets(pattern: &str) -> Vec<String> {
        pattern_networks(pattern)
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    fn list(pattern: &str) -> CidrList {
        CidrList(pattern_networks(pattern).unwrap())
    }

    /// Problems as (line, message), from a parse that must fail.
    fn problems(text: &str) -> Vec<(usize, String)> {
        parse(text).unwrap_err()
    }

    /// Asserts a single problem on `line` whose message contains `needle`.
    fn one_problem(text: &str, line: usize, needle: &str) {
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
            ["192.168.0.0/16", "10.8.0.0/29", "10.8.0.8/31"]
        );
        assert_eq!(settings.deny, "192.168.99.0/24".parse().unwrap());

        let names: Vec<&str> = settings.routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["0.0.0.0:5432", "[::]:80", "127.0.0.1:8443"]);

        let db = &settings.routes[0];
        assert_eq!(db.listen.0, vec!["0.0.0.0:5432".parse().unwrap()]);
        assert_eq!(db.target, Some("db.internal:5432".parse().unwrap()));
        assert!(db.allow.contains(ip("192.168.1.1")));
        assert!(db.allow.contains(ip("192.168.1.150")));
        assert!(!db.allow.contains(ip("192.168.1.2")));
        assert_eq!(db.deny, "192.168.1.100".parse().unwrap());

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
        assert!(!web.permits(ip("192.168.99.4")), "the global deny");
    }

    #[test]
    fn ipv6_and_bracketed_addresses() {
        let settings = parse("[::1] 2222 [2001:db8::5] 22\n:: 23 fe80::1 23\n").unwrap();
        assert_eq!(settings.routes[0].name, "[::1]:2222");
        assert_eq!(
            settings.routes[0].target.as_ref().unwrap().0[0].host,
            "2001:db8::5"
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
    fn service_name_ports() {
        let settings = parse("0.0.0.0 http 10.0.0.1 postgresql\n").unwrap();
        let route = &settings.routes[0];
        assert_eq!(route.listen.0[0].0.port(), 80);
        assert_eq!(route.target.as_ref().unwrap().0[0].port, 5432);

        let services = services_from(
            "# comment\nfancy\t\t7001/tcp   fancy-alias # mine\nfancy\t7001/udp\nudponly 9999/udp\n",
        );
        let lookup = |name: &str| services.get(name).copied();
        let settings = parse_with("0.0.0.0 fancy 10.0.0.1 fancy-alias", &lookup).unwrap();
        assert_eq!(settings.routes[0].listen.0[0].0.port(), 7001);
        assert_eq!(settings.routes[0].target.as_ref().unwrap().0[0].port, 7001);
        let err = parse_with("0.0.0.0 udponly 10.0.0.1 1", &lookup).unwrap_err();
        assert_eq!(err[0].line, 1);
        assert!(err[0].message.contains("\"udponly\""), "{err:?}");
    }

    #[test]
    fn every_error_kind_with_its_line() {
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
            "0.0.0.0 1 h 1\n\n0.0.0.0 53/udp dns 53/udp",
            3,
            "UDP forwarding is not supported",
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
        one_problem("allow *.1\n0.0.0.0 1 h 1", 1, "CIDR");
        one_problem("allow 1.2.3\n0.0.0.0 1 h 1", 1, "is not an IP address");
        one_problem("allow 300.*\n0.0.0.0 1 h 1", 1, "matches no IPv4 address");
        one_problem(
            "allow 2001:db8::*\n0.0.0.0 1 h 1",
            1,
            "wildcards work only in IPv4",
        );
        one_problem("logfile\n0.0.0.0 1 h 1", 1, "logfile needs one path");
        one_problem("logfile a b\n0.0.0.0 1 h 1", 1, "logfile needs one path");
        one_problem(
            "pidlogfile /a\npidlogfile /b\n0.0.0.0 1 h 1",
            2,
            "given twice (first on line 1)",
        );
        one_problem("logcommon please\n0.0.0.0 1 h 1", 1, "no arguments");
        one_problem("# nothing here\n", 0, "no forwarding rules");
        one_problem("", 0, "no forwarding rules");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = "bogus\n0.0.0.0 53/udp db.internal nosuch\nallow *.*.*.1\nlogcommon x\n";
        let lines: Vec<usize> = problems(text).iter().map(|(line, _)| *line).collect();
        assert_eq!(lines, [1, 2, 2, 3, 4]);
    }

    #[test]
    fn allow_after_a_bad_rule_does_not_become_global() {
        let all = problems("0.0.0.0 1/udp h 1\nallow 10.*\n0.0.0.0 2 h 2\n");
        assert_eq!(all.len(), 1, "{all:?}");
        // Without the bad rule, the same allow is the rule's own.
        let settings = parse("0.0.0.0 2 h 2\nallow 10.*\n").unwrap();
        assert!(settings.allow.is_empty());
        assert_eq!(settings.routes[0].allow, "10.0.0.0/8".parse().unwrap());
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
    fn glob_patterns_become_networks() {
        assert_eq!(nets("192.168.1.*"), ["192.168.1.0/24"]);
        assert_eq!(nets("192.168.*"), ["192.168.0.0/16"]);
        assert_eq!(nets("192.168.*.*"), ["192.168.0.0/16"]);
        assert_eq!(nets("10.*"), ["10.0.0.0/8"]);
        assert_eq!(nets("*"), ["0.0.0.0/0"]);
        assert_eq!(nets("10.*.1.1").len(), 256);
        assert_eq!(nets("10.0.0.?"), ["10.0.0.0/29", "10.0.0.8/31"]);
        assert_eq!(
            nets("10.0.0.??"),
            [
                "10.0.0.10/31",
                "10.0.0.12/30",
                "10.0.0.16/28",
                "10.0.0.32/27",
                "10.0.0.64/27",
                "10.0.0.96/30"
            ]
        );

        let tens = list("10.0.0.?");
        assert!(tens.contains(ip("10.0.0.5")));
        assert!(tens.contains(ip("10.0.0.9")));
        assert!(!tens.contains(ip("10.0.0.15")));
        assert!(!tens.contains(ip("10.0.0.10")));
        assert!(tens.contains(ip("::ffff:10.0.0.5")));

        let ones = list("192.168.1.1*");
        let matched: Vec<u8> = (0..=255u8)
            .filter(|o| ones.contains(IpAddr::from([192, 168, 1, *o])))
            .collect();
        let expected: Vec<u8> = std::iter::once(1).chain(10..=19).chain(100..=199).collect();
        assert_eq!(matched, expected);
        assert!(!ones.contains(ip("192.168.2.1")));

        // A star in a short pattern runs over the dots, as in rinetd.
        let short = list("192.168.1*");
        assert!(short.contains(ip("192.168.1.7")));
        assert!(short.contains(ip("192.168.150.7")));
        assert!(!short.contains(ip("192.168.2.7")));
        assert_eq!(nets("192.168.1*").len(), 1 + 3 + 5, "111 /24s, merged");
    }

    #[test]
    fn glob_matching_agrees_with_rinetd_string_matching() {
        // A direct glob matcher over the dotted-decimal string, as rinetd's.
        fn glob(p: &[u8], s: &[u8]) -> bool {
            match (p.first(), s.first()) {
                (None, None) => true,
                (Some(b'*'), _) => glob(&p[1..], s) || (!s.is_empty() && glob(p, &s[1..])),
                (Some(b'?'), Some(_)) => glob(&p[1..], &s[1..]),
                (Some(a), Some(b)) if a == b => glob(&p[1..], &s[1..]),
                _ => false,
            }
        }
        let patterns = [
            "10.1?.*.3",
            "10.0.*.2?",
            "10.0.1*1",
            "10.?.*",
            "?.?.?.?",
            "10.2*.3*.4*",
            "10.1.*5",
            "1?2.1*",
            "10.0.*.*1",
            "10.?0?.*",
        ];
        let values = [0u8, 1, 2, 5, 10, 11, 20, 25, 31, 100, 105, 200, 255];
        for pattern in patterns {
            let found = CidrList(pattern_networks(pattern).unwrap());
            for a in values {
                for b in values {
                    for ip in [
                        [10, a, b, 1],
                        [10, b, 3, a],
                        [10, 1, a, b],
                        [10, 0, a, b],
                        [a, b, a, b],
                        [1, a, b, 4],
                        [a, 2, a, b],
                    ] {
                        let text = Ipv4Addr::from(ip).to_string();
                        assert_eq!(
                            found.contains(IpAddr::from(ip)),
                            glob(pattern.as_bytes(), text.as_bytes()),
                            "{pattern} against {text}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn plain_addresses_and_cidrs() {
        assert_eq!(nets("192.168.1.10"), ["192.168.1.10/32"]);
        assert_eq!(nets("2001:db8::1"), ["2001:db8::1/128"]);
        assert_eq!(nets("10.1.0.0/16"), ["10.1.0.0/16"]);
        assert_eq!(nets("2001:db8::/32"), ["2001:db8::/32"]);
    }

    #[test]
    fn too_wide_patterns_are_refused_with_a_hint() {
        let err = pattern_networks("*.*.*.1").unwrap_err();
        assert!(err.contains("\"*.*.*.1\"") && err.contains("CIDR"), "{err}");
        // Exactly at the limit is fine: 256 * 256 single addresses.
        assert_eq!(
            pattern_networks("10.*.*.1").unwrap().len() as u64,
            MAX_PATTERN_NETWORKS
        );
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
                line: Some(2)
            })
        );
        let shown = e.to_string();
        assert!(
            shown.starts_with(&format!(
                "{} line 2: unknown directive",
                file.path().display()
            )),
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
                line: None
            })
        );

        let mut good = tempfile::NamedTempFile::new().unwrap();
        write!(good, "{REALISTIC}").unwrap();
        assert_eq!(read(good.path()).unwrap().routes.len(), 3);
    }
}
