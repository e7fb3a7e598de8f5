//! Kubernetes' Service-link variables, which are not settings: the
//! kubelet gives every pod `<SERVICE>_SERVICE_HOST`, `<SERVICE>_PORT` and
//! the like for each Service in its namespace, and many share a program's
//! prefix.

/// Whether the environment variable `name=value` is one of the Service-link
/// variables the kubelet gives every pod for every Service in its namespace
/// (unless the pod has `enableServiceLinks: false`). For a Service `tunnel`
/// with cluster IP 10.96.0.12 and TCP port 1001 named `incoming`:
///
/// ```text
/// TUNNEL_SERVICE_HOST=10.96.0.12
/// TUNNEL_SERVICE_PORT=1001
/// TUNNEL_SERVICE_PORT_INCOMING=1001
/// TUNNEL_PORT=tcp://10.96.0.12:1001
/// TUNNEL_PORT_1001_TCP=tcp://10.96.0.12:1001
/// TUNNEL_PORT_1001_TCP_PROTO=tcp
/// TUNNEL_PORT_1001_TCP_PORT=1001
/// TUNNEL_PORT_1001_TCP_ADDR=10.96.0.12
/// ```
///
/// The Service's name is upper-cased with `-` as `_`, and may be longer
/// than a program's prefix (`ECHO_SERVER_BALANCER_SERVICE_HOST` is under
/// `ECHO_SERVER_`). All but one of these forms are recognised by the name
/// alone. `<SERVICE>_PORT` is the exception: it would also be the
/// environment variable of a setting ending in `port` (the tunnel's own
/// `port`, `TUNNEL_PORT`), so it counts as a Service link only when its
/// value has the link form `tcp://ADDRESS:PORT` (or `udp://`, `sctp://`;
/// the address as written, IPv6 in brackets or not). A port number is
/// never a Service link, and a link-form value never a setting.
pub fn is_service_link(name: &str, value: &str) -> bool {
    if !name
        .bytes()
        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    {
        return false;
    }
    // Every `_` after the first character may end the Service's name.
    name.match_indices('_')
        .filter(|&(at, _)| at > 0)
        .any(|(at, _)| is_link_suffix(&name[at + 1..], value))
}

/// Whether `rest`, what follows `<SERVICE>_` in a variable's name, is one of
/// the Service-link forms (with `value`, for `PORT`).
fn is_link_suffix(rest: &str, value: &str) -> bool {
    if rest == "SERVICE_HOST" || rest == "SERVICE_PORT" {
        return true;
    }
    if let Some(port_name) = rest.strip_prefix("SERVICE_PORT_") {
        // A named port: its name upper-cased, `-` as `_`.
        return !port_name.is_empty();
    }
    if rest == "PORT" {
        return is_service_link_value(value);
    }
    let Some(port) = rest.strip_prefix("PORT_") else {
        return false;
    };
    let mut parts = port.split('_');
    let number = parts.next().unwrap_or("");
    let protocol = parts.next().unwrap_or("");
    let detail = parts.next();
    is_port_number(number)
        && matches!(protocol, "TCP" | "UDP" | "SCTP")
        && matches!(detail, None | Some("PROTO" | "PORT" | "ADDR"))
        && parts.next().is_none()
}

/// Whether `value` has the form of a Service link's address:
/// `tcp://ADDRESS:PORT`, `udp://...` or `sctp://...`. The scheme is taken
/// exactly as the kubelet writes it; the address loosely (an IPv4 address,
/// an IPv6 one with or without brackets), the port as a port number.
pub fn is_service_link_value(value: &str) -> bool {
    let Some((scheme, rest)) = value.split_once("://") else {
        return false;
    };
    let Some((address, port)) = rest.rsplit_once(':') else {
        return false;
    };
    matches!(scheme, "tcp" | "udp" | "sctp")
        && !address.is_empty()
        && !address.contains(|c: char| c.is_whitespace() || c == '/')
        && is_port_number(port)
}

fn is_port_number(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) && text.parse::<u16>().is_ok()
}

/// The environment variables under `prefix` that are Service links (see
/// [`is_service_link`]), by name, sorted.
pub(super) fn service_links(prefix: &str) -> Vec<String> {
    let mut links: Vec<String> = std::env::vars_os()
        .filter_map(|(name, value)| {
            let name = name.to_str()?;
            (name.starts_with(prefix) && is_service_link(name, &value.to_string_lossy()))
                .then(|| name.to_string())
        })
        .collect();
    links.sort();
    links
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The kubelet's variables for a Service `name` with `ip` and one port.
    pub(crate) fn kubelet(
        name: &str,
        ip: &str,
        port: u16,
        protocol: &str,
        port_name: &str,
    ) -> Vec<(String, String)> {
        let svc = name.to_ascii_uppercase().replace('-', "_");
        let proto = protocol.to_ascii_lowercase();
        let host_port = if ip.contains(':') {
            format!("[{ip}]:{port}")
        } else {
            format!("{ip}:{port}")
        };
        let link = format!("{proto}://{host_port}");
        let each = format!("{svc}_PORT_{port}_{}", protocol.to_ascii_uppercase());
        let mut vars = vec![
            (format!("{svc}_SERVICE_HOST"), ip.to_string()),
            (format!("{svc}_SERVICE_PORT"), port.to_string()),
            (format!("{svc}_PORT"), link.clone()),
            (each.clone(), link),
            (format!("{each}_PROTO"), proto),
            (format!("{each}_PORT"), port.to_string()),
            (format!("{each}_ADDR"), ip.to_string()),
        ];
        if !port_name.is_empty() {
            vars.push((
                format!(
                    "{svc}_SERVICE_PORT_{}",
                    port_name.to_ascii_uppercase().replace('-', "_")
                ),
                port.to_string(),
            ));
        }
        vars
    }

    #[test]
    fn every_service_link_form_is_recognised() {
        let services = [
            kubelet("tunnel", "10.96.0.12", 1001, "TCP", "incoming"),
            kubelet("echo-server", "10.96.0.13", 1234, "TCP", "echoendpoint"),
            kubelet("echo-server-balancer", "10.96.0.14", 1234, "TCP", ""),
            kubelet("square-server", "fd00::2345", 2345, "UDP", "square-alt"),
            kubelet("square-client", "10.96.0.16", 9, "SCTP", "discard"),
        ];
        for (name, value) in services.iter().flatten() {
            assert!(is_service_link(name, value), "{name}={value}");
        }
        // Eight variables for a named port, seven for an unnamed one.
        assert_eq!(services.iter().flatten().count(), 4 * 8 + 7);
        for (name, value) in [
            ("TUNNEL_PORT", "tcp://10.96.0.12:1001"),
            ("TUNNEL_PORT", "udp://10.96.0.12:53"),
            ("TUNNEL_PORT", "sctp://10.96.0.12:9"),
            ("TUNNEL_PORT", "tcp://[fd00::12]:1001"),
            ("TUNNEL_PORT", "tcp://fd00::12:1001"),
            ("TUNNEL_PORT", "tcp://tunnel.default.svc:1001"),
            ("SQUARE_SERVER_PORT_2345_TCP_ADDR", "10.96.0.15"),
            ("SQUARE_SERVER_SERVICE_PORT_HTTP_ALT", "8080"),
            // A Service name may itself hold the words.
            ("TUNNEL_SERVICE_SERVICE_HOST", "10.96.0.17"),
            ("TUNNEL_PORT_1_PORT_1_TCP", "tcp://10.96.0.18:1"),
            // The name-only forms do not look at the value.
            ("TUNNEL_SERVICE_HOST", ""),
            ("TUNNEL_PORT_1001_TCP_PORT", "1001"),
        ] {
            assert!(is_service_link(name, value), "{name}={value}");
        }
    }

    #[test]
    fn a_port_variable_is_a_service_link_only_with_a_link_value() {
        for value in [
            "5433",
            "",
            "tcp://10.96.0.12",
            "tcp://:1001",
            "tcp://10.96.0.12:",
            "tcp://10.96.0.12:99999",
            "tcp://10.96.0.12:+1",
            "tcp://10.96.0.12:1001/",
            "tcp://10.96.0.12/x:1001",
            "tcp://10.96. 0.12:1001",
            "TCP://10.96.0.12:1001",
            "http://10.96.0.12:1001",
            "tcp:/10.96.0.12:1001",
            " tcp://10.96.0.12:1001",
            "10.96.0.12:1001",
        ] {
            assert!(
                !is_service_link("TUNNEL_PORT", value),
                "TUNNEL_PORT={value:?}"
            );
            assert!(!is_service_link_value(value), "{value:?}");
        }
        // The same rule for any key that ends in `port`, nested or not.
        assert!(is_service_link(
            "TUNNEL_HEALTH_CHECK__PORT",
            "tcp://10.96.0.12:1001"
        ));
        assert!(!is_service_link("TUNNEL_HEALTH_CHECK__PORT", "8080"));
        assert!(is_service_link(
            "TUNNEL_ADMIN_PORT",
            "tcp://10.96.0.12:9090"
        ));
        assert!(!is_service_link("TUNNEL_ADMIN_PORT", "9090"));
    }

    #[test]
    fn near_misses_are_not_service_links() {
        for (name, value) in [
            ("TUNNEL_PORT_X", "1"),
            ("TUNNEL_PORTS", "tcp://10.96.0.12:1001"),
            ("TUNNEL_SERVICE_HOSTS", "10.96.0.12"),
            ("TUNNEL_SERVICE_HOST_", "10.96.0.12"),
            ("TUNNEL_SERVICE", "10.96.0.12"),
            ("TUNNEL_SERVICE_PORT_", "1001"),
            ("TUNNEL_SERVICEPORT", "1001"),
            ("TUNNEL_PORT_1001", "tcp://10.96.0.12:1001"),
            ("TUNNEL_PORT_1001_HTTP", "tcp://10.96.0.12:1001"),
            ("TUNNEL_PORT_1001_TCP_HOST", "10.96.0.12"),
            ("TUNNEL_PORT_1001_TCP_ADDR_X", "10.96.0.12"),
            ("TUNNEL_PORT_99999_TCP", "tcp://10.96.0.12:99999"),
            ("TUNNEL_PORT__TCP", "tcp://10.96.0.12:1001"),
            ("TUNNEL_PORT_1001_tcp", "tcp://10.96.0.12:1001"),
            ("tunnel_service_host", "10.96.0.12"),
            ("Tunnel_Service_Host", "10.96.0.12"),
            ("SERVICE_HOST", "10.96.0.12"),
            ("_SERVICE_HOST", "10.96.0.12"),
            ("PORT", "tcp://10.96.0.12:1001"),
            ("TUNNEL-X_SERVICE_HOST", "10.96.0.12"),
            ("ECHO_SERVER_PORT", "1234"),
            ("ECHO_SERVER_IDLE_TIMEOT", "5m"),
            ("TUNNEL_PORT", "5433"),
            ("TUNNEL_HOST", "10.96.0.12"),
        ] {
            assert!(!is_service_link(name, value), "{name}={value}");
        }
    }
}
