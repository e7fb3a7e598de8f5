//! What a kubelet gives a container of its own accord: the Service-link
//! variables for each Service of the pod's namespace.

use std::net::{IpAddr, SocketAddr};

/// `foo-bar` as the kubelet writes it in a variable's name: `FOO_BAR`.
pub fn env_name(name: &str) -> String {
    name.to_ascii_uppercase().replace('-', "_")
}

/// The variables the kubelet makes for the Service `name` at cluster IP
/// `ip` with `ports` (number, protocol such as `TCP`, port name or ""):
/// `<NAME>_SERVICE_HOST`, `<NAME>_SERVICE_PORT` and one per named port, and
/// the Docker-style links `<NAME>_PORT`, `<NAME>_PORT_<n>_<PROTO>` and its
/// `_PROTO`, `_PORT`, `_ADDR`.
pub fn service_links(name: &str, ip: IpAddr, ports: &[(u16, &str, &str)]) -> Vec<(String, String)> {
    let prefix = env_name(name);
    let mut vars = vec![(format!("{prefix}_SERVICE_HOST"), ip.to_string())];
    if let Some((first, _, _)) = ports.first() {
        vars.push((format!("{prefix}_SERVICE_PORT"), first.to_string()));
    }
    for (port, _, port_name) in ports {
        if !port_name.is_empty() {
            vars.push((
                format!("{prefix}_SERVICE_PORT_{}", env_name(port_name)),
                port.to_string(),
            ));
        }
    }
    for (i, (port, protocol, _)) in ports.iter().enumerate() {
        let proto = protocol.to_ascii_lowercase();
        let link = format!("{proto}://{}", SocketAddr::new(ip, *port));
        if i == 0 {
            vars.push((format!("{prefix}_PORT"), link.clone()));
        }
        let each = format!("{prefix}_PORT_{port}_{}", protocol.to_ascii_uppercase());
        vars.push((each.clone(), link));
        vars.push((format!("{each}_PROTO"), proto));
        vars.push((format!("{each}_PORT"), port.to_string()));
        vars.push((format!("{each}_ADDR"), ip.to_string()));
    }
    vars
}
