//! Port numbers for the service names a rinetd.conf may use (`http`,
//! `postgresql`, `domain/udp`): from `/etc/services`, read once when first
//! needed, then from a short built-in list for systems without that file.
//! A `/udp` port is looked up among the UDP services.

use std::cell::OnceCell;
use std::collections::HashMap;

use crate::settings::Protocol;

/// Service names, from `/etc/services`, then from [`BUILT_IN_SERVICES`]
/// (or [`BUILT_IN_UDP_SERVICES`]).
#[derive(Default)]
pub(super) struct SystemServices {
    /// The TCP services, then the UDP ones.
    file: OnceCell<(HashMap<String, u16>, HashMap<String, u16>)>,
}

impl SystemServices {
    /// The port of the service called `name` over `protocol`.
    pub(super) fn port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        let (tcp, udp) = self.file.get_or_init(|| {
            std::fs::read_to_string("/etc/services")
                .map(|text| {
                    (
                        services_from(&text, Protocol::Tcp),
                        services_from(&text, Protocol::Udp),
                    )
                })
                .unwrap_or_default()
        });
        let (file, built_in) = match protocol {
            Protocol::Tcp => (tcp, BUILT_IN_SERVICES),
            Protocol::Udp => (udp, BUILT_IN_UDP_SERVICES),
        };
        file.get(name).copied().or_else(|| {
            built_in
                .iter()
                .find(|(known, _)| *known == name)
                .map(|(_, port)| *port)
        })
    }
}

/// Well-known UDP services, for systems without `/etc/services`.
const BUILT_IN_UDP_SERVICES: &[(&str, u16)] = &[
    ("domain", 53),
    ("bootps", 67),
    ("bootpc", 68),
    ("tftp", 69),
    ("ntp", 123),
    ("snmp", 161),
    ("snmp-trap", 162),
    ("syslog", 514),
    ("openvpn", 1194),
    ("radius", 1812),
    ("radius-acct", 1813),
    ("mdns", 5353),
];

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

/// The services over `protocol` in a file in `/etc/services` format: names
/// and aliases.
pub(super) fn services_from(text: &str, protocol: Protocol) -> HashMap<String, u16> {
    let wanted = protocol.to_string();
    let mut map = HashMap::new();
    for line in text.lines() {
        let mut fields = line.split('#').next().unwrap_or("").split_whitespace();
        let (Some(name), Some(port_proto)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Some((port, proto)) = port_proto.split_once('/') else {
            continue;
        };
        if proto != wanted {
            continue;
        }
        let Ok(port) = port.parse::<u16>() else {
            continue;
        };
        for alias in std::iter::once(name).chain(fields) {
            map.entry(alias.to_string()).or_insert(port);
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::super::{parse, parse_with};
    use super::*;

    #[test]
    fn service_name_ports() {
        let settings = parse("0.0.0.0 http 10.0.0.1 postgresql\n").unwrap();
        let route = &settings.routes[0];
        assert_eq!(route.listen.0[0].0.port(), 80);
        assert_eq!(
            route.target.as_ref().unwrap().0[0].to_string(),
            "10.0.0.1:5432"
        );

        let text = "# comment\nfancy\t\t7001/tcp   fancy-alias # mine\nfancy\t7001/udp\nudponly 9999/udp\n";
        let (tcp, udp) = (
            services_from(text, Protocol::Tcp),
            services_from(text, Protocol::Udp),
        );
        let lookup = |name: &str, protocol: Protocol| match protocol {
            Protocol::Tcp => tcp.get(name).copied(),
            Protocol::Udp => udp.get(name).copied(),
        };
        let settings = parse_with("0.0.0.0 fancy 10.0.0.1 fancy-alias", &lookup).unwrap();
        assert_eq!(settings.routes[0].listen.0[0].0.port(), 7001);
        assert_eq!(
            settings.routes[0].target.as_ref().unwrap().0[0].to_string(),
            "10.0.0.1:7001"
        );
        let err = parse_with("0.0.0.0 udponly 10.0.0.1 1", &lookup).unwrap_err();
        assert_eq!(err[0].line, 1);
        assert!(
            err[0]
                .message
                .contains("\"udponly\" is not a port number or a known TCP service"),
            "{err:?}"
        );
        // Over UDP, the UDP services.
        let settings = parse_with("0.0.0.0 udponly/udp 10.0.0.1 fancy/udp", &lookup).unwrap();
        assert_eq!(settings.routes[0].listen.0[0].0.port(), 9999);
        assert_eq!(settings.routes[0].protocol, Some(Protocol::Udp));
        let err = parse_with("0.0.0.0 fancy-alias/udp 10.0.0.1 1/udp", &lookup).unwrap_err();
        assert!(err[0].message.contains("known UDP service"), "{err:?}");
    }
}
