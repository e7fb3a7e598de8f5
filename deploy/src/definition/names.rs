//! What names and addresses a definition may use, as Kubernetes, image
//! registries and the clusters' networks take them.

use std::net::IpAddr;

/// Whether `host` names this machine: 127.0.0.0/8, ::1, `localhost`.
pub fn is_loopback(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    match host.parse::<IpAddr>() {
        Ok(ip) => ip.to_canonical().is_loopback() || ip.is_unspecified(),
        Err(_) => host == "localhost" || host.ends_with(".localhost"),
    }
}

/// Why `registry` cannot prefix an image repository, or `None`.
pub fn registry_problem(registry: &str) -> Option<String> {
    let rule = "write a registry and path such as ghcr.io/acme/tcp-roles, without scheme or tag";
    if registry.is_empty() {
        return Some(format!("is empty; {rule}"));
    }
    if registry.contains("://") || registry.contains('@') || registry.ends_with('/') {
        return Some(format!("is not a repository prefix; {rule}"));
    }
    let mut parts = registry.split('/');
    let host = parts.next().unwrap_or_default();
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'));
    let path_ok = parts.all(|p| {
        !p.is_empty()
            && p.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
            })
    });
    (!host_ok || !path_ok).then(|| format!("is not a repository prefix; {rule}"))
}

/// Why `tag` is not an image tag, or `None`.
pub fn tag_problem(tag: &str) -> Option<String> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    (!ok).then(|| {
        "is not an image tag: at most 128 letters, digits, '_', '.' and '-', not starting with '.' or '-'".to_string()
    })
}

/// Why an endpoint's name cannot name its container port, or `None`:
/// Kubernetes takes at most 15 lower-case letters, digits and '-' (an
/// IANA service name), and the name is lower-cased.
pub fn port_name_problem(endpoint: &str) -> Option<String> {
    let name = endpoint.to_ascii_lowercase();
    let rule = "it names a container port, which takes at most 15 letters, digits and single '-', with a letter, not starting or ending with '-'";
    let what = if name.len() > 15 {
        format!("is {} characters long", name.len())
    } else if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        format!("contains {bad:?}")
    } else if !name.chars().any(|c| c.is_ascii_lowercase())
        || name.starts_with('-')
        || name.ends_with('-')
        || name.contains("--")
    {
        "is not a port name".to_string()
    } else if name == "admin" {
        "is taken by the tunnel's admin endpoint".to_string()
    } else {
        return None;
    };
    Some(format!("{what}; {rule}"))
}

/// What a name is used for, which decides what it may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameUse {
    /// A role: it names Kubernetes Deployments, Services and ConfigMaps,
    /// compose services and files under `deploy render --out`, so it must
    /// be a DNS-1035 label (a DNS-1123 label starting with a letter, as
    /// Service names must).
    Role,
    /// The service: it becomes a label value, the image repository and
    /// the compose project, so it must be a DNS-1123 label.
    Service,
}

/// Why `name` cannot be used as `usage` says, or `None` when it can. The
/// message completes a sentence naming the name, and says what to use.
pub fn name_problem(name: &str, usage: NameUse) -> Option<String> {
    let what = what_is_wrong(name, usage)?;
    let rule = match usage {
        NameUse::Role => "a role name names Kubernetes objects and files: use at most 63 lower-case letters, digits and '-', starting with a letter and ending with a letter or digit",
        NameUse::Service => "the service name labels Kubernetes objects and names images: use at most 63 lower-case letters, digits and '-', starting and ending with a letter or digit",
    };
    let suggestion = suggest_name(name);
    let hint = if what_is_wrong(&suggestion, usage).is_none() {
        format!(" (such as {suggestion:?})")
    } else {
        String::new()
    };
    Some(format!("{what}; {rule}{hint}"))
}

fn what_is_wrong(name: &str, usage: NameUse) -> Option<String> {
    let valid_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    let first_ok = name.chars().next().is_some_and(|c| match usage {
        NameUse::Role => c.is_ascii_lowercase(),
        NameUse::Service => c.is_ascii_lowercase() || c.is_ascii_digit(),
    });
    let last_ok = name
        .chars()
        .last()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let what = if name.is_empty() {
        "is empty".to_string()
    } else if name.len() > 63 {
        format!("is {} characters long", name.len())
    } else if let Some(bad) = name.chars().find(|c| !valid_char(*c)) {
        format!("contains {bad:?}")
    } else if !first_ok {
        "does not start with a letter".to_string()
    } else if !last_ok {
        "does not end with a letter or digit".to_string()
    } else {
        return None;
    };
    Some(what)
}

/// `name` made into a DNS-1035 label, where that is easy: lower case,
/// other characters as '-', trimmed.
fn suggest_name(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    out.truncate(63);
    out.trim_end_matches('-').to_string()
}

/// Why `name` cannot name a Kubernetes Secret, or `None`: a DNS-1123
/// subdomain, at most 253 characters of dot-separated labels of lower-case
/// letters, digits and '-', each starting and ending with a letter or digit.
pub fn secret_name_problem(name: &str) -> Option<String> {
    let rule = "a Secret's name is a DNS name: at most 253 lower-case letters, digits, '-' and '.', each part between dots starting and ending with a letter or digit (such as square-tls)";
    let what = if name.is_empty() {
        "is empty".to_string()
    } else if name.len() > 253 {
        format!("is {} characters long", name.len())
    } else if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.')))
    {
        format!("contains {bad:?}")
    } else if name.split('.').any(|label| {
        label.is_empty() || label.len() > 63 || label.starts_with('-') || label.ends_with('-')
    }) {
        "is not a DNS name".to_string()
    } else {
        return None;
    };
    Some(format!("{what}; {rule}"))
}

/// Where the Dockerfile installs the program in every image.
const IMAGE_PROGRAM: &str = "/usr/local/bin/program";

/// Why `path` cannot be where a Secret is mounted, or `None`: an absolute
/// path, without `.` or `..` parts, below `/`.
pub fn mount_path_problem(path: &str) -> Option<String> {
    let rule = "mount it at an absolute directory of its own, such as /etc/tls/square";
    let what = if !path.starts_with('/') {
        "is not an absolute path"
    } else if path.trim_end_matches('/').is_empty() {
        "is the root directory, which would hide the whole image"
    } else if path
        .strip_suffix('/')
        .unwrap_or(path)
        .split('/')
        .skip(1)
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        "has empty, '.' or '..' parts"
    } else if path.contains(':') {
        "contains ':'"
    } else if IMAGE_PROGRAM.starts_with(&format!("{}/", path.trim_end_matches('/'))) {
        "holds the program in the image, which the Secret would hide"
    } else {
        return None;
    };
    Some(format!("{what}; {rule}"))
}
