//! rinetd's `allow`/`deny` patterns as the CIDR networks they cover.
//!
//! rinetd matches a pattern of digits, dots, `*` and `?` against the
//! client's address written in dotted decimal; the same set of addresses
//! is found here as networks, by walking the address tree octet by octet
//! with the pattern as an automaton.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::rc::Rc;

use common::settings::Cidr;
use ipnet::{IpNet, Ipv4Net};

/// The most networks one allow or deny pattern may expand to.
pub const MAX_PATTERN_NETWORKS: u64 = 65_536;

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
        return pattern.parse::<Cidr>().map(|net| vec![net.0]);
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
    use common::settings::{CidrList, List};

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
        List(
            pattern_networks(pattern)
                .unwrap()
                .into_iter()
                .map(Cidr)
                .collect(),
        )
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
            let found = list(pattern);
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
}
