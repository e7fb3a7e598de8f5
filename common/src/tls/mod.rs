//! TLS for every endpoint, on rustls (no OpenSSL): a server's certificate
//! chain and key, and the clients it accepts (mutual TLS), read from PEM
//! files into a rustls configuration. Every problem names its file and
//! what is wrong with it, so a bad file is a configuration error at start.

pub mod hello;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::net::SocketAddr;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::serve::{Accepted, Handler};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The files a TLS endpoint is served from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFiles {
    /// The certificate chain, the endpoint's own certificate first (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// When set, clients must present a certificate that chains to one of
    /// these (a PEM bundle): mutual TLS.
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: only client certificates with one of these names
    /// (DNS or URI subject alternative name, or common name; exact, or
    /// `*.` for one label) get in. Empty: any name.
    pub client_names: Vec<String>,
}

/// What a TLS client (the tunnel towards a target, square-client) uses:
/// the CAs it trusts, its own certificate if the server asks for one, and
/// the name it expects the server's certificate to have.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientFiles {
    /// The CAs that may sign the server's certificate (PEM bundle); the
    /// system's roots when unset.
    pub ca: Option<PathBuf>,
    /// A client certificate chain for mutual TLS (PEM; with `key`).
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
    /// The name the server's certificate must carry (and the SNI sent);
    /// the host connected to when unset.
    pub server_name: Option<String>,
}

/// A TLS file that cannot be used: which one (by the setting that names
/// it), and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError {
    /// The setting that names the file, as the caller calls it: `cert`,
    /// `key`, `client_ca`, `ca`, prefixed with [`TlsError::prefixed`]
    /// (`tls_cert`, `routes.0.tls.cert`).
    pub setting: String,
    /// The file.
    pub file: PathBuf,
    /// What is wrong, and what to do.
    pub problem: String,
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.setting,
            self.file.display(),
            self.problem
        )
    }
}

impl std::error::Error for TlsError {}

impl TlsError {
    /// The same error with the setting's name as the program writes it:
    /// `prefix` before the short name (`tls_` makes `tls_cert`).
    pub fn prefixed(mut self, prefix: &str) -> TlsError {
        self.setting = format!("{prefix}{}", self.setting);
        self
    }
}

/// The cryptography every TLS endpoint uses: ring's, TLS 1.2 and 1.3.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub(crate) fn error(setting: &str, file: &Path, problem: impl Into<String>) -> TlsError {
    TlsError {
        setting: setting.to_string(),
        file: file.to_path_buf(),
        problem: problem.into(),
    }
}

/// What a PEM reading error says, in a user's words.
fn pem_problem(e: pem::Error, what: &str) -> String {
    match e {
        pem::Error::NoItemsFound => format!("holds no {what} (is it PEM, `-----BEGIN ...`?)"),
        pem::Error::Io(e) if e.kind() == std::io::ErrorKind::NotFound => {
            "does not exist".to_string()
        }
        pem::Error::Io(e) => format!("cannot be read ({e})"),
        other => format!("is not valid PEM ({other})"),
    }
}

/// The certificates in a PEM file; at least one.
pub fn read_certificates(
    setting: &str,
    file: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(file)
        .map_err(|e| error(setting, file, pem_problem(e, "certificate")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(setting, file, pem_problem(e, "certificate")))?;
    if certs.is_empty() {
        return Err(error(
            setting,
            file,
            "holds no certificate (is it PEM, `-----BEGIN CERTIFICATE-----`?)",
        ));
    }
    Ok(certs)
}

/// The private key in a PEM file.
pub fn read_key(setting: &str, file: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(file)
        .map_err(|e| error(setting, file, pem_problem(e, "private key")))
}

/// The rustls configuration of a TLS endpoint served from `files`: TLS 1.2
/// and 1.3 only; with a client CA, only clients whose certificate chains
/// to it get in.
pub fn server_config(files: &ServerFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = read_certificates("cert", &files.cert)?;
    let key = read_key("key", &files.key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| error("cert", &files.cert, e.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certificates("client_ca", ca)? {
                roots.add(cert).map_err(|e| {
                    error(
                        "client_ca",
                        ca,
                        format!("holds a certificate that cannot be a CA ({e})"),
                    )
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| error("client_ca", ca, e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(chain, key).map_err(|e| {
        let problem = match e {
            rustls::Error::InconsistentKeys(_) => format!(
                "does not match the key in {}; give the certificate and the key made together",
                files.key.display()
            ),
            other => format!(
                "cannot be used with the key in {} ({other})",
                files.key.display()
            ),
        };
        error("cert", &files.cert, problem)
    })?;
    Ok(Arc::new(config))
}

/// The longest a client may take over its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A service served over TLS: the accept loop hands it TCP connections,
/// it completes each handshake (within [`HANDSHAKE_TIMEOUT`]) and hands
/// the decrypted stream to the service. A handshake that fails is logged
/// with its reason and the client, and the service never sees it.
pub struct Tls<H> {
    acceptor: TlsAcceptor,
    service: Arc<H>,
}

impl<H> Tls<H> {
    /// `service`, served with `config`.
    pub fn new(config: Arc<ServerConfig>, service: Arc<H>) -> Tls<H> {
        Tls {
            acceptor: TlsAcceptor::from(config),
            service,
        }
    }
}

impl<H: Handler<TlsStream<TcpStream>>> Handler<TcpStream> for Tls<H> {
    async fn handle(self: Arc<Self>, stream: TcpStream, conn: Accepted) -> anyhow::Result<()> {
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(stream)).await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::info!(peer = %conn.peer, reason = %e, "TLS handshake failed");
                return Ok(());
            }
            Err(_) => {
                let reason = format!("no handshake within {HANDSHAKE_TIMEOUT:?}");
                tracing::info!(peer = %conn.peer, %reason, "TLS handshake failed");
                return Ok(());
            }
        };
        self.service.clone().handle(tls, conn).await
    }

    fn refused(&self, id: u64, peer: SocketAddr) {
        self.service.refused(id, peer);
    }
}

/// Serves `listener` with `service` until `shutdown`, over TLS with
/// `config` when there is one, plain TCP otherwise (see
/// [`crate::serve::serve`]).
pub async fn serve<H>(
    listener: tokio::net::TcpListener,
    options: crate::serve::ServeOptions,
    config: Option<Arc<ServerConfig>>,
    service: Arc<H>,
    shutdown: impl std::future::Future<Output = ()>,
) where
    H: Handler<TcpStream> + Handler<TlsStream<TcpStream>>,
{
    match config {
        Some(config) => {
            crate::serve::serve(
                listener,
                options,
                Arc::new(Tls::new(config, service)),
                shutdown,
            )
            .await
        }
        None => crate::serve::serve(listener, options, service, shutdown).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `name` and its key, as PEM files in
    /// `dir` named after `stem`.
    fn make(dir: &Path, stem: &str, name: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cert_file = dir.join(format!("{stem}.pem"));
        let key_file = dir.join(format!("{stem}.key"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        (cert_file, key_file)
    }

    #[test]
    fn a_certificate_and_its_key_make_a_server() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = make(dir.path(), "server", "echo.test");
        let config = server_config(&ServerFiles {
            cert: cert.clone(),
            key,
            client_ca: Some(cert),
            client_names: Vec::new(),
        })
        .unwrap();
        assert!(config.alpn_protocols.is_empty());
    }

    #[test]
    fn every_bad_file_is_named_with_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = make(dir.path(), "a", "a.test");
        let (_, other_key) = make(dir.path(), "b", "b.test");
        let not_pem = dir.path().join("not.pem");
        std::fs::write(&not_pem, "hello\n").unwrap();
        let missing = dir.path().join("missing.pem");
        let files = |cert: &Path, key: &Path, ca: Option<&Path>| ServerFiles {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            client_ca: ca.map(Path::to_path_buf),
            client_names: Vec::new(),
        };
        let problem = |f: ServerFiles| server_config(&f).unwrap_err().to_string();

        let e = problem(files(&not_pem, &key, None));
        assert!(
            e.starts_with(&format!("cert {}: holds no certificate", not_pem.display())),
            "{e}"
        );
        let e = problem(files(&missing, &key, None));
        assert!(e.ends_with("does not exist"), "{e}");
        let e = problem(files(&cert, &not_pem, None));
        assert!(
            e.starts_with(&format!("key {}: holds no private key", not_pem.display())),
            "{e}"
        );
        // The key file holds a certificate, not a key.
        let e = problem(files(&cert, &cert, None));
        assert!(e.contains("holds no private key"), "{e}");
        let e = problem(files(&cert, &other_key, None));
        assert!(
            e.starts_with(&format!(
                "cert {}: does not match the key in",
                cert.display()
            )),
            "{e}"
        );
        let e = problem(files(&cert, &key, Some(&not_pem)));
        assert!(
            e.starts_with(&format!(
                "client_ca {}: holds no certificate",
                not_pem.display()
            )),
            "{e}"
        );
    }
}
