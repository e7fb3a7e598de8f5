//! A route's TLS settings: the certificate its listening side serves
//! (it terminates TLS), the TLS it speaks to its targets (it originates
//! TLS), and the server names (SNI) that choose it among routes sharing a
//! listen address.
//!
//! Only their shape is checked here: the files are read when the routes
//! are applied, so `--print-config` works on a machine without them.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

use common::settings::{deserialize_text, List, TextValue};
use common::tls::{ClientFiles, ServerFiles};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// TLS on a route's listening side: clients speak TLS to the tunnel, which
/// serves this certificate (and, with `client_ca`, asks for theirs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TlsSettings {
    /// The certificate chain served, the route's own certificate first
    /// (PEM file; with `key`).
    pub cert: Option<PathBuf>,
    /// Its private key (PEM file).
    pub key: Option<PathBuf>,
    /// Clients must present a certificate that chains to this CA bundle
    /// (PEM file): mutual TLS.
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: only client certificates with one of these names
    /// get in (empty: any certificate from the CA).
    pub client_names: List<ClientName>,
}

/// TLS towards a route's targets: the tunnel is the TLS client.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TargetTls {
    /// The CAs that may sign the target's certificate (PEM bundle); the
    /// system's roots when unset.
    pub ca: Option<PathBuf>,
    /// The name the target's certificate must carry, also sent as SNI;
    /// the target's host when unset.
    pub server_name: Option<ServerName>,
    /// A client certificate chain for targets that ask for one (PEM file;
    /// with `key`).
    pub cert: Option<PathBuf>,
    /// Its private key (PEM file).
    pub key: Option<PathBuf>,
}

/// A route's `target_tls`: `false`, `true` (TLS with the defaults), or the
/// settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetTlsSetting {
    /// Plain TCP to the targets.
    Off,
    /// TLS to the targets.
    On(TargetTls),
}

impl Serialize for TargetTlsSetting {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            TargetTlsSetting::Off => s.serialize_bool(false),
            TargetTlsSetting::On(t) if *t == TargetTls::default() => s.serialize_bool(true),
            TargetTlsSetting::On(t) => t.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for TargetTlsSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TargetTlsSetting;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("false, true, or {ca, server_name, cert, key}")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<TargetTlsSetting, E> {
                Ok(if v {
                    TargetTlsSetting::On(TargetTls::default())
                } else {
                    TargetTlsSetting::Off
                })
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<TargetTlsSetting, E> {
                match v.trim() {
                    "true" | "on" | "yes" => self.visit_bool(true),
                    "false" | "off" | "no" => self.visit_bool(false),
                    other => Err(E::custom(format!("{other:?} is not a target_tls setting; write false, true, or {{ca: ca.pem, server_name: db.example.com, cert: me.pem, key: me.key}}"))),
                }
            }
            fn visit_unit<E: de::Error>(self) -> Result<TargetTlsSetting, E> {
                Ok(TargetTlsSetting::Off)
            }
            fn visit_map<A: de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<TargetTlsSetting, A::Error> {
                TargetTls::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(TargetTlsSetting::On)
            }
        }
        d.deserialize_any(V)
    }
}

/// Why `name` cannot be a DNS name, if it cannot: labels of letters,
/// digits, `-` and `_`, split by dots, none empty.
fn dns_problem(name: &str) -> Option<&'static str> {
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    if name.is_empty() {
        Some("is empty")
    } else if name.len() > 253 {
        Some("is longer than a DNS name can be (253 characters)")
    } else if name.ends_with('.') {
        Some("ends with a dot; leave the dot out")
    } else if !name.split('.').all(label_ok) {
        Some("is not a DNS name (letters, digits and - between dots)")
    } else {
        None
    }
}

/// A name in a route's `sni`: a DNS name, or `*.` and a DNS name for any
/// one label in its place (`*.example.com` is `a.example.com`, not
/// `example.com` nor `a.b.example.com`). Kept in lower case, as names are
/// compared.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SniName(pub String);

impl FromStr for SniName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let name = s.trim().to_ascii_lowercase();
        if name.parse::<IpAddr>().is_ok() {
            return Err(format!(
                "{name:?} is an IP address, which clients never send as a TLS server name (SNI); give the route a listen address of its own instead"
            ));
        }
        let rest = name.strip_prefix("*.").unwrap_or(&name);
        if rest.contains('*') {
            return Err(format!(
                "{name:?} is not a server name pattern: a wildcard stands for one whole label, first (*.example.com)"
            ));
        }
        if let Some(problem) = dns_problem(rest) {
            return Err(format!(
                "{name:?} {problem}; write a server name such as db.example.com, or *.example.com for one label"
            ));
        }
        Ok(SniName(name))
    }
}

impl fmt::Display for SniName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The name a target's certificate must carry: a DNS name or an IP
/// address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerName(pub String);

impl FromStr for ServerName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let name = s.trim();
        if let Ok(ip) = name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            return Ok(ServerName(ip.to_string()));
        }
        if let Some(problem) = dns_problem(name) {
            return Err(format!(
                "{name:?} {problem}; write the DNS name or IP address the target's certificate carries"
            ));
        }
        Ok(ServerName(name.to_ascii_lowercase()))
    }
}

impl fmt::Display for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A name a client certificate may carry to get in (the same as every
/// server's `tls_client_names`).
pub use common::tls::names::NamePattern as ClientName;

macro_rules! text_setting {
    ($($ty:ty: $expecting:literal),+ $(,)?) => {$(
        impl TextValue for $ty {
            const EXPECTING: &'static str = $expecting;
        }

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                deserialize_text(d)
            }
        }
    )+};
}

text_setting!(
    SniName: "a server name: db.example.com, or *.example.com for one label",
    ServerName: "a server name: a DNS name or an IP address",
);

/// Where a group of TLS settings is written, for messages: `full` before
/// a short name is its key (`routes.0.tls.` or `tls_`), `short` is how a
/// message names a sibling (`tls.` in a route, `tls_` in the quick form).
pub(super) struct Place<'a> {
    pub(super) full: &'a str,
    pub(super) short: &'a str,
}

impl Place<'_> {
    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.full)
    }

    fn name(&self, name: &str) -> String {
        format!("{}{name}", self.short)
    }
}

/// The files a route's listening side serves TLS from, or the problems
/// with them as (key, message): a certificate needs its key and the
/// other way round; client CAs and names need a certificate; names need
/// a CA.
pub(super) fn server_files(
    tls: &TlsSettings,
    at: &Place,
    problems: &mut Vec<(String, String)>,
) -> Option<ServerFiles> {
    let before = problems.len();
    match (&tls.cert, &tls.key) {
        (Some(_), None) => problems.push((
            at.key("key"),
            format!(
                "is missing: {} needs its private key in {} (a PEM file)",
                at.name("cert"),
                at.name("key")
            ),
        )),
        (None, Some(_)) => problems.push((
            at.key("cert"),
            format!(
                "is missing: {} needs its certificate chain in {} (a PEM file)",
                at.name("key"),
                at.name("cert")
            ),
        )),
        (None, None) if tls.client_ca.is_some() => problems.push((
            at.key("client_ca"),
            format!(
                "asks clients for certificates, which takes TLS: set {} and {} too",
                at.name("cert"),
                at.name("key")
            ),
        )),
        (None, None) if !tls.client_names.is_empty() => problems.push((
            at.key("client_names"),
            format!(
                "names the clients let in, which takes TLS with client certificates: set {}, {} and {} too",
                at.name("cert"),
                at.name("key"),
                at.name("client_ca")
            ),
        )),
        (None, None) => problems.push((
            at.key("cert"),
            format!(
                "is missing: TLS on the listening side needs {} and {} (PEM files)",
                at.name("cert"),
                at.name("key")
            ),
        )),
        (Some(_), Some(_)) => {}
    }
    if !tls.client_names.is_empty()
        && tls.client_ca.is_none()
        && (tls.cert.is_some() || tls.key.is_some())
    {
        problems.push((
            at.key("client_names"),
            format!(
                "needs {}: names are checked on client certificates, which are asked for only with a client CA",
                at.name("client_ca")
            ),
        ));
    }
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) if problems.len() == before => Some(ServerFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: tls.client_ca.clone(),
            client_names: tls.client_names.0.iter().map(|n| n.0.clone()).collect(),
        }),
        _ => None,
    }
}

/// The files and name a route's TLS towards its targets uses, or the
/// problems with them as (key, message): a client certificate needs its
/// key and the other way round.
pub(super) fn client_files(
    tls: &TargetTls,
    at: &Place,
    problems: &mut Vec<(String, String)>,
) -> Option<ClientFiles> {
    match (&tls.cert, &tls.key) {
        (Some(_), None) => problems.push((
            at.key("key"),
            format!(
                "is missing: the client certificate in {} needs its private key in {} (a PEM file)",
                at.name("cert"),
                at.name("key")
            ),
        )),
        (None, Some(_)) => problems.push((
            at.key("cert"),
            format!(
                "is missing: the private key in {} needs its client certificate chain in {} (a PEM file)",
                at.name("key"),
                at.name("cert")
            ),
        )),
        _ => {
            return Some(ClientFiles {
                ca: tls.ca.clone(),
                cert: tls.cert.clone(),
                key: tls.key.clone(),
                server_name: tls.server_name.as_ref().map(|n| n.0.clone()),
            })
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_for_sni() {
        for (written, kept) in [
            ("db.example.com", "db.example.com"),
            ("DB.Example.COM", "db.example.com"),
            ("*.example.com", "*.example.com"),
            (" localhost ", "localhost"),
            ("_srv.example.com", "_srv.example.com"),
        ] {
            assert_eq!(written.parse::<SniName>(), Ok(SniName(kept.into())));
        }
        for (bad, says) in [
            ("", "is empty"),
            ("*", "a wildcard stands for one whole label"),
            ("*example.com", "a wildcard stands for one whole label"),
            ("a.*.example.com", "a wildcard stands for one whole label"),
            ("*.*.example.com", "a wildcard stands for one whole label"),
            ("db*.example.com", "a wildcard stands for one whole label"),
            ("example.com.", "ends with a dot"),
            ("a..example.com", "is not a DNS name"),
            ("-a.example.com", "is not a DNS name"),
            ("db example.com", "is not a DNS name"),
            ("db:443", "is not a DNS name"),
            ("10.0.0.1", "is an IP address"),
            ("::1", "is an IP address"),
        ] {
            let e = bad.parse::<SniName>().unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
        let long = format!("{}.example.com", "a".repeat(64));
        assert!(long.parse::<SniName>().is_err());
    }

    #[test]
    fn target_server_names_and_client_names() {
        assert_eq!(
            "DB.internal".parse::<ServerName>(),
            Ok(ServerName("db.internal".into()))
        );
        assert_eq!("[::1]".parse::<ServerName>(), Ok(ServerName("::1".into())));
        assert!("*.internal".parse::<ServerName>().is_err());
        assert!("db/x".parse::<ServerName>().is_err());

        for good in [
            "client.example.com",
            "*.example.com",
            "spiffe://example.com/a",
            "alice",
        ] {
            assert_eq!(good.parse::<ClientName>(), Ok(ClientName(good.into())));
        }
        let e = "a.*.example.com".parse::<ClientName>().unwrap_err();
        assert!(e.contains("one whole label"), "{e}");
    }

    #[test]
    fn target_tls_is_a_switch_or_its_settings() {
        let read = |yaml: &str| common::yaml::from_str::<TargetTlsSetting>(yaml);
        let on = TargetTlsSetting::On(TargetTls::default());
        assert_eq!(read("true"), Ok(on.clone()));
        assert_eq!(read("'on'"), Ok(on.clone()));
        assert_eq!(read("{}"), Ok(on.clone()));
        assert_eq!(read("false"), Ok(TargetTlsSetting::Off));
        let full =
            read("{ca: ca.pem, server_name: DB.internal, cert: me.pem, key: me.key}").unwrap();
        assert_eq!(
            full,
            TargetTlsSetting::On(TargetTls {
                ca: Some("ca.pem".into()),
                server_name: Some(ServerName("db.internal".into())),
                cert: Some("me.pem".into()),
                key: Some("me.key".into()),
            })
        );
        // Written back as it reads.
        for setting in [on, full, TargetTlsSetting::Off] {
            let text = common::yaml::to_string(&setting).unwrap();
            assert_eq!(read(&text), Ok(setting), "{text}");
        }
        let e = read("maybe").unwrap_err();
        assert!(e.contains("write false, true, or"), "{e}");
        let e = read("{server_name: 'a b'}").unwrap_err();
        assert!(e.contains("is not a DNS name"), "{e}");
    }
}
