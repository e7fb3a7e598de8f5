//! Who may connect: networks, rinetd-style address patterns, and the allow
//! and deny lists made of them, checked once per accepted connection.
//!
//! An entry of a list is an [`AddressPattern`]: a network in CIDR form
//! (`10.0.0.0/8`, a single address), or a [`Wildcard`] pattern as rinetd
//! writes them (`192.168.1.*`, `*.*.*.1`, `10.?.*.*`), matched against the
//! client's address in dotted decimal. A network is matched by comparing
//! bits; the address is written out as text only when a list holds a
//! pattern, once per decision, into a buffer on the stack.

use std::cell::OnceCell;
use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

use ipnet::IpNet;

use super::list::{text_serde, List};

/// A network in CIDR form (`10.0.0.0/8`, `2001:db8::/32`); a bare address
/// is a network of one. An IPv4-mapped entry (`::ffff:10.0.0.0/104`,
/// `::ffff:127.0.0.2`) is the IPv4 network it names (`10.0.0.0/8`),
/// because clients are matched, and logged, as IPv4 whichever way they
/// connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr(pub IpNet);

impl FromStr for Cidr {
    type Err = String;
    fn from_str(item: &str) -> Result<Self, String> {
        let item = item.trim();
        // Not truncated yet: whether the entry is written in mapped form
        // shows in the address as written.
        let net = match item.parse::<IpNet>() {
            Ok(net) => net,
            Err(_) => item.parse::<IpAddr>().map(IpNet::from).map_err(|_| {
                format!(
                    "{item:?} is not a network; write an address or CIDR such as 10.0.0.0/8 or ::1"
                )
            })?,
        };
        let IpNet::V6(v6) = net else {
            return Ok(Cidr(net.trunc()));
        };
        let Some(v4) = v6.addr().to_ipv4_mapped() else {
            return Ok(Cidr(net.trunc()));
        };
        if v6.prefix_len() < 96 {
            return Err(format!(
                "{item:?} mixes IPv4-mapped and other IPv6 addresses; write the IPv4 part as IPv4 (such as {v4}/{}) and the IPv6 part on its own",
                v6.prefix_len().saturating_sub(96)
            ));
        }
        Ok(Cidr(IpNet::V4(
            ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .expect("a prefix of at most 32")
                .trunc(),
        )))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A list of networks in CIDR form (see [`Cidr`]), written as a YAML list
/// or as one string with commas or spaces between the items.
pub type CidrList = List<Cidr>;

impl CidrList {
    /// Whether `ip` lies in one of the networks. An IPv4-mapped IPv6 address
    /// (`::ffff:10.1.2.3`) is matched as the IPv4 address it carries.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.0.contains(&ip))
    }
}

/// The longest [`Wildcard`] pattern: a dotted-decimal address is at most
/// 15 characters, so anything longer is mostly stars (and 63 positions
/// and an end fit the bits of a `u64` in [`matches_some_ipv4`]).
const MAX_WILDCARD_LEN: usize = 63;

/// A rinetd-style pattern over an IPv4 address written in dotted decimal
/// (`10.1.2.3`): `*` matches any run of characters, dots included, `?` any
/// one character, and a digit or dot itself. The whole address must match:
/// `192.168.1.*` matches `192.168.1.7` and `192.168.1.255`, not
/// `192.168.10.5`; `192.168.1*` matches both. Only IPv4 clients are
/// matched, as in rinetd: an IPv6 client (one not IPv4-mapped) matches no
/// pattern, so write IPv6 networks in CIDR form.
///
/// Kept as written, and written back so.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Wildcard(Box<str>);

impl Wildcard {
    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the pattern matches `text` from its first character to its
    /// last.
    pub fn matches(&self, text: &[u8]) -> bool {
        glob(self.0.as_bytes(), text)
    }

    /// Whether the pattern matches the IPv4 address `ip`.
    pub fn matches_ipv4(&self, ip: Ipv4Addr) -> bool {
        self.matches(Dotted::new(ip).as_bytes())
    }
}

impl FromStr for Wildcard {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.contains(':') {
            return Err(format!(
                "{text:?}: wildcards work only in IPv4 patterns; write an IPv6 network in CIDR form such as 2001:db8::/32"
            ));
        }
        if text.contains('/') {
            return Err(format!(
                "{text:?}: a CIDR network has no wildcards; write a network such as 10.0.0.0/8 or a pattern such as 10.*"
            ));
        }
        if !text
            .bytes()
            .all(|b| b.is_ascii_digit() || b".*?".contains(&b))
        {
            return Err(format!(
                "{text:?} is not an IP address, CIDR network or rinetd pattern (digits, dots, * and ?); host names cannot be matched"
            ));
        }
        if text.len() > MAX_WILDCARD_LEN {
            return Err(format!(
                "pattern {text:?} is longer than {MAX_WILDCARD_LEN} characters; an IPv4 address has at most 15"
            ));
        }
        if !matches_some_ipv4(text.as_bytes()) {
            return Err(format!(
                "{text:?} matches no IPv4 address; a pattern is matched against the whole address in dotted decimal, such as 192.168.1.* for 192.168.1.0 to 192.168.1.255"
            ));
        }
        Ok(Wildcard(text.into()))
    }
}

impl fmt::Display for Wildcard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One entry of an allow or deny list: a network, or a rinetd-style
/// wildcard pattern. Written as a network or address (`10.0.0.0/8`, `::1`,
/// `::ffff:10.0.0.0/104`, see [`Cidr`]) or as a pattern with `*` or `?`
/// (see [`Wildcard`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AddressPattern {
    /// A CIDR network; a single address is a network of one.
    Network(IpNet),
    /// A pattern matched against an IPv4 client's dotted-decimal address.
    Wildcard(Wildcard),
}

impl AddressPattern {
    /// Whether the client matches.
    fn matches(&self, client: &ClientAddr) -> bool {
        match self {
            AddressPattern::Network(net) => net.contains(&client.ip),
            AddressPattern::Wildcard(pattern) => client
                .dotted()
                .is_some_and(|text| pattern.matches(text.as_bytes())),
        }
    }
}

impl From<Cidr> for AddressPattern {
    fn from(net: Cidr) -> Self {
        AddressPattern::Network(net.0)
    }
}

impl FromStr for AddressPattern {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.contains(['*', '?']) {
            return text.parse().map(AddressPattern::Wildcard);
        }
        if text.parse::<IpNet>().is_err() && text.parse::<IpAddr>().is_err() {
            let host_name = text.bytes().any(|b| b.is_ascii_alphabetic()) && !text.contains(':');
            return Err(format!(
                "{text:?} is not an IP address, CIDR network or address pattern; write one such as 10.0.0.0/8, ::1 or 192.168.1.*{}",
                if host_name {
                    " (host names cannot be matched)"
                } else {
                    ""
                }
            ));
        }
        text.parse::<Cidr>().map(AddressPattern::from)
    }
}

impl fmt::Display for AddressPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddressPattern::Network(net) => net.fmt(f),
            AddressPattern::Wildcard(pattern) => pattern.fmt(f),
        }
    }
}

text_serde!(
    Cidr: "an address or CIDR network such as 10.0.0.0/8 or ::1",
    AddressPattern: "an address, CIDR network or pattern such as 10.0.0.0/8, ::1 or 192.168.1.*",
);

/// An allow or deny list: networks and patterns (see [`AddressPattern`]),
/// written as a YAML list or as one string with commas or spaces between
/// the items.
pub type AddressList = List<AddressPattern>;

impl AddressList {
    /// Whether `ip` matches an entry. An IPv4-mapped IPv6 address
    /// (`::ffff:10.1.2.3`) is matched as the IPv4 address it carries.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.matches(&ClientAddr::new(ip))
    }

    fn matches(&self, client: &ClientAddr) -> bool {
        self.0.iter().any(|entry| entry.matches(client))
    }
}

impl From<CidrList> for AddressList {
    fn from(list: CidrList) -> Self {
        List(list.0.into_iter().map(AddressPattern::from).collect())
    }
}

/// Client address rules: with an allow list, only matching clients get in;
/// a client on the deny list never does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessList {
    /// When not empty, the only clients let in.
    pub allow: AddressList,
    /// Clients always refused.
    pub deny: AddressList,
}

impl AccessList {
    /// Whether a client at `ip` may connect.
    pub fn permits(&self, ip: IpAddr) -> bool {
        self.admits(&ClientAddr::new(ip))
    }

    fn admits(&self, client: &ClientAddr) -> bool {
        (self.allow.is_empty() || self.allow.matches(client)) && !self.deny.matches(client)
    }
}

/// Several access lists that must all permit a client (global rules, then a
/// route's own).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessRules(pub Vec<AccessList>);

impl AccessRules {
    /// Whether every list permits `ip`.
    pub fn permits(&self, ip: IpAddr) -> bool {
        let client = ClientAddr::new(ip);
        self.0.iter().all(|list| list.admits(&client))
    }
}

impl From<AccessList> for AccessRules {
    fn from(list: AccessList) -> Self {
        AccessRules(vec![list])
    }
}

/// A client's address as the lists match it: canonical (an IPv4-mapped
/// IPv6 address is the IPv4 address it carries), with its dotted-decimal
/// text written on first need.
struct ClientAddr {
    ip: IpAddr,
    text: OnceCell<Dotted>,
}

impl ClientAddr {
    fn new(ip: IpAddr) -> Self {
        ClientAddr {
            ip: ip.to_canonical(),
            text: OnceCell::new(),
        }
    }

    /// The address in dotted decimal, for an IPv4 client.
    fn dotted(&self) -> Option<&Dotted> {
        match self.ip {
            IpAddr::V4(v4) => Some(self.text.get_or_init(|| Dotted::new(v4))),
            IpAddr::V6(_) => None,
        }
    }
}

/// An IPv4 address in dotted decimal, on the stack (`255.255.255.255` is
/// 15 bytes).
struct Dotted {
    bytes: [u8; 15],
    len: usize,
}

impl Dotted {
    fn new(ip: Ipv4Addr) -> Self {
        let mut dotted = Dotted::empty();
        for (i, octet) in ip.octets().into_iter().enumerate() {
            if i > 0 {
                dotted.push(b'.');
            }
            dotted.push_octet(octet);
        }
        dotted
    }

    fn empty() -> Self {
        Dotted {
            bytes: [0; 15],
            len: 0,
        }
    }

    fn push_octet(&mut self, octet: u8) {
        if octet >= 100 {
            self.push(b'0' + octet / 100);
        }
        if octet >= 10 {
            self.push(b'0' + octet / 10 % 10);
        }
        self.push(b'0' + octet % 10);
    }

    fn push(&mut self, byte: u8) {
        self.bytes[self.len] = byte;
        self.len += 1;
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Whether `pattern` (`*` any run, `?` any one byte) matches all of `text`.
///
/// Each `*` first matches nothing and takes one more byte each time what
/// follows it fails; only the latest `*` needs revisiting, because any
/// match of the rest found later could have been found from it.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // The position after the latest star, and where in the text it
    // resumes on the next retry.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p + 1, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((after, from)) => {
                    p = after;
                    t = from + 1;
                    star = Some((after, from + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Whether some IPv4 address in dotted decimal matches `pattern` (at most
/// 63 bytes): the pattern runs as a set of positions over the octets'
/// texts, 256 per octet, keeping each distinct set once.
fn matches_some_ipv4(pattern: &[u8]) -> bool {
    debug_assert!(pattern.len() <= MAX_WILDCARD_LEN);
    // The positions a `*` may skip to, since it may match nothing.
    let closure = |mut states: u64| {
        for (p, &c) in pattern.iter().enumerate() {
            if c == b'*' && states & (1 << p) != 0 {
                states |= 1 << (p + 1);
            }
        }
        states
    };
    let step = |states: u64, byte: u8| {
        let mut next = 0;
        for (p, &c) in pattern.iter().enumerate() {
            if states & (1 << p) != 0 {
                match c {
                    b'*' => next |= 1 << p,
                    b'?' => next |= 1 << (p + 1),
                    _ if c == byte => next |= 1 << (p + 1),
                    _ => {}
                }
            }
        }
        closure(next)
    };
    let mut reached = HashSet::from([closure(1)]);
    for octet in 0..4 {
        let mut next = HashSet::new();
        for &states in &reached {
            let states = if octet > 0 {
                step(states, b'.')
            } else {
                states
            };
            if states == 0 {
                continue;
            }
            for value in 0..=255u8 {
                let mut digits = Dotted::empty();
                digits.push_octet(value);
                let after = digits.as_bytes().iter().fold(states, |s, &b| step(s, b));
                if after != 0 {
                    next.insert(after);
                }
            }
        }
        reached = next;
    }
    let end = 1u64 << pattern.len();
    reached.iter().any(|states| states & end != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn wildcard(pattern: &str) -> Wildcard {
        pattern.parse().unwrap()
    }

    /// The plain recursive reading of a glob, to check the fast one by.
    fn slow_glob(p: &[u8], s: &[u8]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(b'*'), _) => slow_glob(&p[1..], s) || (!s.is_empty() && slow_glob(p, &s[1..])),
            (Some(b'?'), Some(_)) => slow_glob(&p[1..], &s[1..]),
            (Some(a), Some(b)) if a == b => slow_glob(&p[1..], &s[1..]),
            _ => false,
        }
    }

    #[test]
    fn access_lists_match_mapped_addresses_as_ipv4() {
        let list = AccessList {
            allow: "10.0.0.0/8, ::1".parse().unwrap(),
            deny: "10.9.9.9".parse().unwrap(),
        };
        assert!(list.permits("10.1.2.3".parse().unwrap()));
        assert!(list.permits("::ffff:10.1.2.3".parse().unwrap()));
        assert!(list.permits("::1".parse().unwrap()));
        assert!(!list.permits("10.9.9.9".parse().unwrap()));
        assert!(!list.permits("::ffff:10.9.9.9".parse().unwrap()));
        assert!(!list.permits("192.168.1.1".parse().unwrap()));
        assert!(AccessList::default().permits("203.0.113.5".parse().unwrap()));
    }

    #[test]
    fn mapped_entries_are_the_ipv4_networks_they_name() {
        let list: CidrList = "::ffff:127.0.0.2, ::ffff:10.0.0.0/104, ::1"
            .parse()
            .unwrap();
        assert_eq!(
            list.0.iter().map(|net| net.0).collect::<Vec<_>>(),
            vec![
                "127.0.0.2/32".parse::<IpNet>().unwrap(),
                "10.0.0.0/8".parse().unwrap(),
                "::1/128".parse().unwrap()
            ]
        );
        assert!(list.contains("127.0.0.2".parse().unwrap()));
        assert!(list.contains("10.200.0.1".parse().unwrap()));
        let err = "::ffff:0.0.0.0/80".parse::<CidrList>().unwrap_err();
        assert!(err.contains("IPv4-mapped"), "{err}");
        // The same in an allow or deny list.
        let list: AddressList = "::ffff:127.0.0.2, ::ffff:10.0.0.0/104".parse().unwrap();
        assert_eq!(list.to_string(), "127.0.0.2/32,10.0.0.0/8");
        let err = "::ffff:0.0.0.0/80".parse::<AddressList>().unwrap_err();
        assert!(err.contains("IPv4-mapped"), "{err}");
    }

    #[test]
    fn bad_networks_are_named() {
        let err = "10.0.0.0/8, tenfour".parse::<CidrList>().unwrap_err();
        assert!(err.contains("\"tenfour\""), "{err}");
        let err = "10.0.0.0/8, tenfour".parse::<AddressList>().unwrap_err();
        assert!(
            err.contains("\"tenfour\"") && err.contains("host names cannot be matched"),
            "{err}"
        );
        let err = "1.2.3".parse::<AddressList>().unwrap_err();
        assert!(
            err.contains("\"1.2.3\" is not an IP address") && !err.contains("host names"),
            "{err}"
        );
    }

    #[test]
    fn dotted_decimal_on_the_stack() {
        for text in ["0.0.0.0", "255.255.255.255", "10.0.100.9", "192.168.1.10"] {
            let dotted = Dotted::new(text.parse().unwrap());
            assert_eq!(dotted.as_bytes(), text.as_bytes());
        }
    }

    #[test]
    fn stars_questions_and_the_whole_address() {
        let cases: &[(&str, &str, bool)] = &[
            ("192.168.1.*", "192.168.1.7", true),
            ("192.168.1.*", "192.168.1.255", true),
            // The dot after 1 is literal: 192.168.10.5 has 0 there.
            ("192.168.1.*", "192.168.10.5", false),
            ("192.168.1.*", "192.168.1.", true),
            ("192.168.1*", "192.168.10.5", true),
            ("192.168.1*", "192.168.1.5", true),
            ("192.168.1*", "192.168.2.5", false),
            ("*.*.*.1", "127.0.0.1", true),
            ("*.*.*.1", "127.0.0.2", false),
            ("*.*.*.1", "10.20.30.41", false),
            ("*.*.*.1", "10.20.30.1", true),
            ("*.1", "10.0.0.1", true),
            ("*1", "10.0.0.21", true),
            ("127.0.0.?", "127.0.0.2", true),
            ("127.0.0.?", "127.0.0.12", false),
            ("10.?.*.*", "10.5.0.1", true),
            ("10.?.*.*", "10.50.0.1", false),
            ("10.?.*.*", "110.5.0.1", false),
            ("??.*", "10.0.0.1", true),
            ("??.*", "1.0.0.1", false),
            ("*", "1.2.3.4", true),
            ("**", "1.2.3.4", true),
            ("10.*", "10.0.0.1", true),
            ("10.*", "100.0.0.1", false),
            // Anchored at both ends: no match inside the text.
            ("0.0.1", "10.0.0.1", false),
            ("*0.0.1", "10.0.0.1", true),
            ("1.2.3.4", "1.2.3.45", false),
            ("1.2.3.4*", "1.2.3.45", true),
            ("*.2.*", "1.2.3.4", true),
            ("*.2.*", "1.22.3.4", false),
        ];
        for &(pattern, text, expected) in cases {
            assert_eq!(
                glob(pattern.as_bytes(), text.as_bytes()),
                expected,
                "{pattern} against {text}"
            );
            assert_eq!(slow_glob(pattern.as_bytes(), text.as_bytes()), expected);
        }
    }

    #[test]
    fn the_fast_glob_agrees_with_the_plain_one() {
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
            "*1*1*",
            "*.*.*.1",
            "*?*?*",
        ];
        let values = [0u8, 1, 2, 5, 10, 11, 20, 25, 31, 100, 105, 111, 200, 255];
        for pattern in patterns {
            let wild = wildcard(pattern);
            for a in values {
                for b in values {
                    for addr in [[10, a, b, 1], [10, b, 3, a], [a, b, a, b], [1, a, b, 4]] {
                        let text = Ipv4Addr::from(addr).to_string();
                        assert_eq!(
                            wild.matches_ipv4(Ipv4Addr::from(addr)),
                            slow_glob(pattern.as_bytes(), text.as_bytes()),
                            "{pattern} against {text}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn patterns_match_ipv4_clients_only() {
        let list: AddressList = "*, 10.*".parse().unwrap();
        assert!(list.contains(ip("203.0.113.9")));
        assert!(list.contains(ip("::ffff:203.0.113.9")), "mapped is IPv4");
        assert!(!list.contains(ip("::1")));
        assert!(!list.contains(ip("2001:db8::10")));
        // An allow list of patterns alone keeps IPv6 clients out; a deny
        // pattern never refuses them.
        let allow = AccessList {
            allow: "*".parse().unwrap(),
            deny: AddressList::default(),
        };
        assert!(!allow.permits(ip("::1")));
        let deny = AccessList {
            allow: AddressList::default(),
            deny: "*".parse().unwrap(),
        };
        assert!(deny.permits(ip("::1")));
        assert!(!deny.permits(ip("127.0.0.1")));
    }

    #[test]
    fn networks_and_patterns_in_one_list() {
        let rules = AccessRules(vec![
            AccessList {
                allow: "127.0.0.0/8, *.*.*.1, 2001:db8::/32".parse().unwrap(),
                deny: "127.0.0.?".parse().unwrap(),
            },
            AccessList {
                allow: AddressList::default(),
                deny: "10.0.0.1".parse().unwrap(),
            },
        ]);
        assert!(rules.permits(ip("127.0.0.10")));
        assert!(!rules.permits(ip("127.0.0.1")), "the first list's deny");
        assert!(rules.permits(ip("192.168.7.1")), "the pattern");
        assert!(!rules.permits(ip("192.168.7.2")));
        assert!(!rules.permits(ip("10.0.0.1")), "the second list's deny");
        assert!(rules.permits(ip("2001:db8::1")));
        assert!(!rules.permits(ip("2001:db9::1")));
    }

    #[test]
    fn patterns_are_kept_as_written() {
        let list: AddressList = " 192.168.1.* ,10.0.0.0/8 10.?.*.*, 10.1.2.3"
            .parse()
            .unwrap();
        assert_eq!(
            list.to_string(),
            "192.168.1.*,10.0.0.0/8,10.?.*.*,10.1.2.3/32"
        );
        assert_eq!(
            list.0[0],
            AddressPattern::Wildcard(Wildcard("192.168.1.*".into()))
        );
        assert_eq!(
            list.0[0].to_string().parse::<AddressPattern>(),
            Ok(list.0[0].clone())
        );
    }

    #[test]
    fn bad_patterns_say_why() {
        let err = |text: &str| text.parse::<AddressPattern>().unwrap_err();
        assert!(err("2001:db8::*").contains("wildcards work only in IPv4"));
        assert!(err("10.*/8").contains("no wildcards"));
        assert!(err("db*.internal").contains("host names cannot be matched"));
        assert!(err("300.*").contains("\"300.*\" matches no IPv4 address"));
        assert!(err("1.2.3.4.*").contains("matches no IPv4 address"));
        assert!(err("?.?.?.?.?").contains("matches no IPv4 address"));
        assert!(err("1???").contains("matches no IPv4 address"));
        assert!(err(&"*".repeat(64)).contains("longer than 63"));
        for good in [
            "*",
            "*.*.*.1",
            "25?.*",
            "1*1*1*1*1*1*1*1*1*1*1",
            "???.???.???.???",
        ] {
            assert!(good.parse::<AddressPattern>().is_ok(), "{good}");
        }
        // `?` matches a dot too: 3?6.* matches 3.6.0.0.
        assert!("3?6.*".parse::<AddressPattern>().is_ok());
        assert!(
            "2?6.*.*.*".parse::<AddressPattern>().is_ok(),
            "206 is an octet"
        );
        assert!(
            err("3?6.*.*.*").contains("matches no IPv4"),
            "306 to 396 are not, and 3.6 leaves too many dots"
        );
    }
}
