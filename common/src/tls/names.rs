//! What a certificate says about itself (its names and validity), and
//! the client-name check of mutual TLS: a client whose certificate chains
//! to the CA gets in only if one of its names is listed.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The names and validity of one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// DNS and URI subject alternative names, then the subject's common
    /// names.
    pub names: Vec<String>,
    /// The first moment it is valid.
    pub not_before: SystemTime,
    /// The last moment it is valid.
    pub not_after: SystemTime,
}

fn time(unix: i64) -> SystemTime {
    match u64::try_from(unix) {
        Ok(secs) => UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => UNIX_EPOCH - Duration::from_secs(unix.unsigned_abs()),
    }
}

impl CertInfo {
    /// Reads a DER certificate; `None` when it is not X.509.
    pub fn of(der: &[u8]) -> Option<CertInfo> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let mut names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(n) | GeneralName::URI(n) => names.push(n.to_string()),
                    _ => {}
                }
            }
        }
        for cn in cert.subject().iter_common_name() {
            if let Ok(cn) = cn.as_str() {
                if !names.iter().any(|n| n == cn) {
                    names.push(cn.to_string());
                }
            }
        }
        let validity = cert.validity();
        Some(CertInfo {
            names,
            not_before: time(validity.not_before.timestamp()),
            not_after: time(validity.not_after.timestamp()),
        })
    }
}

/// A moment as the logs write it: `2026-11-22T07:20:00Z`.
pub fn when(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Whether `name` is what `pattern` allows: the same name (DNS names in
/// any case), or for `*.rest`, one label followed by `.rest`.
pub fn matches(pattern: &str, name: &str) -> bool {
    if let Some(rest) = pattern.strip_prefix("*.") {
        return match name.split_once('.') {
            Some((label, tail)) => {
                !label.is_empty() && !label.contains('*') && tail.eq_ignore_ascii_case(rest)
            }
            None => false,
        };
    }
    if pattern.contains(':') {
        // A URI: exactly as written.
        return pattern == name;
    }
    pattern.eq_ignore_ascii_case(name)
}

/// A client certificate that chains to the CA but carries none of the
/// allowed names.
#[derive(Debug)]
pub struct NameNotAllowed {
    /// The names the certificate has.
    pub presented: Vec<String>,
}

impl fmt::Display for NameNotAllowed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.presented.is_empty() {
            f.write_str("client certificate has no name (no DNS or URI subject alternative name, no common name), and tls_client_names is set")
        } else {
            write!(
                f,
                "client certificate names {} are not in tls_client_names",
                self.presented.join(", ")
            )
        }
    }
}

impl std::error::Error for NameNotAllowed {}

/// The CA's verifier, and then the names: a client gets in only if its
/// certificate chains to the CA and has one of `allowed`.
#[derive(Debug)]
pub struct NamedClients {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Vec<String>,
}

impl NamedClients {
    /// `inner` checks the chain; `allowed` the names.
    pub fn new(inner: Arc<dyn ClientCertVerifier>, allowed: Vec<String>) -> NamedClients {
        NamedClients { inner, allowed }
    }
}

impl ClientCertVerifier for NamedClients {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let presented = CertInfo::of(end_entity)
            .map(|info| info.names)
            .unwrap_or_default();
        if presented
            .iter()
            .any(|name| self.allowed.iter().any(|p| matches(p, name)))
        {
            return Ok(verified);
        }
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(NameNotAllowed { presented })),
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A name a certificate must carry (or a server name to route by): a DNS
/// name, `*.` and a DNS name (one label), or a URI.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NamePattern(pub String);

impl std::str::FromStr for NamePattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        check_pattern(s.trim())?;
        Ok(NamePattern(s.trim().to_string()))
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `pattern` can be a client name: a DNS name, `*.` and a DNS
/// name, or a URI (`spiffe://…`). `Err` says what is wrong.
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    if pattern.contains("://") {
        return if pattern.chars().any(char::is_whitespace) {
            Err(format!("{pattern:?} is not a URI (it has spaces)"))
        } else {
            Ok(())
        };
    }
    let name = pattern.strip_prefix("*.").unwrap_or(pattern);
    if name.contains('*') {
        return Err(format!(
            "{pattern:?} is not a name: a wildcard stands for one whole label, first (*.example.com)"
        ));
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!(
            "{pattern:?} is not a name: write a DNS name (client.example.com), one wildcard label (*.example.com) or a URI (spiffe://example.com/client)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_exactly_or_by_one_wildcard_label() {
        assert!(matches("client.example.com", "Client.Example.com"));
        assert!(!matches("client.example.com", "other.example.com"));
        assert!(matches("*.example.com", "a.example.com"));
        assert!(!matches("*.example.com", "a.b.example.com"));
        assert!(!matches("*.example.com", "example.com"));
        assert!(!matches("*.example.com", ".example.com"));
        assert!(matches("spiffe://x/y", "spiffe://x/y"));
        assert!(!matches("spiffe://x/y", "spiffe://x/Y"));
    }

    #[test]
    fn patterns_are_checked() {
        assert!(check_pattern("a.example.com").is_ok());
        assert!(check_pattern("*.example.com").is_ok());
        assert!(check_pattern("spiffe://example.com/a").is_ok());
        assert!(check_pattern("a.*.com").is_err());
        assert!(check_pattern("").is_err());
        assert!(check_pattern("a b").is_err());
    }

    #[test]
    fn a_certificate_tells_its_names_and_validity() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["a.example".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "The A");
        params.not_after = rcgen::date_time_ymd(2030, 1, 2);
        let cert = params.self_signed(&key).unwrap();
        let info = CertInfo::of(cert.der()).unwrap();
        assert_eq!(info.names, vec!["a.example", "The A"]);
        assert_eq!(when(info.not_after), "2030-01-02T00:00:00Z");
        assert!(CertInfo::of(b"not a certificate").is_none());
    }
}
