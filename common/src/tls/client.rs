//! The client side of TLS, for every program that connects to a TLS
//! server (the tunnel towards its targets, square-client): the CAs it
//! trusts (a PEM bundle, or the system's), its own certificate when the
//! server asks for one (mutual TLS), and the name the server's certificate
//! must carry. [`Connector::new`] reads the files once, at start, so a bad
//! one is a configuration error there; [`Connector::connect`] then runs a
//! handshake over any stream, and a failed one says with whom and why.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsConnector;

use super::{error, provider, read_certificates, read_key, ClientFiles, TlsError};

/// A client's side of a TLS connection.
pub use tokio_rustls::client::TlsStream;

/// The rustls configuration of a client with `files`: TLS 1.2 and 1.3,
/// the server checked against `ca` (or the system's trusted CAs), and the
/// client certificate of `cert` and `key` offered when the server asks.
pub fn client_config(files: &ClientFiles) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = match &files.ca {
        Some(ca) => roots_from_file(ca)?,
        None => system_roots(rustls_native_certs::load_native_certs())?,
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring has TLS 1.2 and 1.3")
        .with_root_certificates(roots);
    let config = match (&files.cert, &files.key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), None) => {
            return Err(error(
                "cert",
                cert,
                "is a client certificate without its private key: give the key too",
            ))
        }
        (None, Some(key)) => {
            return Err(error(
                "key",
                key,
                "is a private key without its client certificate: give the certificate too",
            ))
        }
        (Some(cert), Some(key)) => {
            let chain = read_certificates("cert", cert)?;
            let private = read_key("key", key)?;
            builder
                .with_client_auth_cert(chain, private)
                .map_err(|e| {
                    let problem = match e {
                        rustls::Error::InconsistentKeys(_) => format!(
                            "does not match the key in {}; give the certificate and the key made together",
                            key.display()
                        ),
                        other => format!(
                            "cannot be used with the key in {} ({other})",
                            key.display()
                        ),
                    };
                    error("cert", cert, problem)
                })?
        }
    };
    Ok(Arc::new(config))
}

/// The CAs of a PEM bundle.
fn roots_from_file(ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certificates("ca", ca)? {
        roots.add(cert).map_err(|e| {
            error(
                "ca",
                ca,
                format!("holds a certificate that cannot be a CA ({e})"),
            )
        })?;
    }
    Ok(roots)
}

/// The system's trusted CAs, as found (`SSL_CERT_FILE`, `SSL_CERT_DIR`,
/// then the system's usual places). Certificates that cannot be used are
/// skipped; none at all is an error.
fn system_roots(found: rustls_native_certs::CertificateResult) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    let (added, _unusable) = roots.add_parsable_certificates(found.certs);
    if added > 0 {
        for e in &found.errors {
            tracing::debug!(error = %e, "a system CA could not be read; the others are used");
        }
        return Ok(roots);
    }
    let why = match found.errors.first() {
        Some(e) => format!(" ({e})"),
        None => String::new(),
    };
    Err(error(
        "ca",
        Path::new("(not set)"),
        format!(
            "this system has no trusted CAs to check the server's certificate with{why}; \
             give the CA that signed it as a PEM file"
        ),
    ))
}

/// The name `text` as a TLS server name: a DNS name or an IP address (an
/// IPv6 address with or without brackets).
fn server_name(text: &str) -> Option<ServerName<'static>> {
    let bare = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    ServerName::try_from(bare.to_string()).ok()
}

/// Runs TLS handshakes as a client, with the configuration read once at
/// start. Cheap to clone: every connection of a program shares one.
#[derive(Clone)]
pub struct Connector {
    connector: TlsConnector,
    server_name: Option<ServerName<'static>>,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// A connector with the CAs, client certificate and server name of
    /// `files`, read now: a file that cannot be used, or a server name no
    /// certificate can have, is an error naming its setting.
    pub fn new(files: &ClientFiles) -> Result<Connector, TlsError> {
        let name = match &files.server_name {
            None => None,
            Some(text) => Some(server_name(text).ok_or_else(|| {
                error(
                    "server_name",
                    &PathBuf::from(text),
                    "is not a DNS name or an IP address, so no certificate can have it; \
                     give the name on the server's certificate",
                )
            })?),
        };
        Ok(Connector::with_config(client_config(files)?, name))
    }

    /// A connector with a configuration made elsewhere; `server_name`,
    /// when given, is checked in place of the host connected to.
    pub fn with_config(
        config: Arc<ClientConfig>,
        server_name: Option<ServerName<'static>>,
    ) -> Connector {
        Connector {
            connector: TlsConnector::from(config),
            server_name,
        }
    }

    /// The rustls configuration in use.
    pub fn config(&self) -> &Arc<ClientConfig> {
        self.connector.config()
    }

    /// The name the server's certificate must carry when connecting to
    /// `host`: the configured server name, or `host` itself.
    pub fn name_for(&self, host: &str) -> io::Result<ServerName<'static>> {
        match &self.server_name {
            Some(name) => Ok(name.clone()),
            None => server_name(host).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{host:?} is not a DNS name or an IP address, so no certificate can be \
                         checked against it; give the name on the server's certificate as the \
                         server name"
                    ),
                )
            }),
        }
    }

    /// The TLS handshake with the server at `host` (a name or an address,
    /// which the server's certificate must carry unless a server name was
    /// configured) over `stream`, a connection to it. A failure is a
    /// [`HandshakeError`] inside the [`io::Error`]. No time limit here:
    /// the caller bounds the wait.
    ///
    /// With TLS 1.3 a server that refuses the client's certificate (or
    /// its absence) says so after the handshake: the first read fails,
    /// and [`hint`] tells why.
    pub async fn connect<IO>(&self, stream: IO, host: &str) -> io::Result<TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let name = self.name_for(host)?;
        let server = name.to_str().into_owned();
        self.connector
            .connect(name, stream)
            .await
            .map_err(|source| io::Error::new(source.kind(), HandshakeError { server, source }))
    }
}

/// A TLS handshake that failed: with which server name, and why. What to
/// do about it, when that is known, is [`hint`]'s.
#[derive(Debug)]
pub struct HandshakeError {
    /// The name the server's certificate was checked against.
    pub server: String,
    /// What went wrong (a [`rustls::Error`] inside, when TLS said no).
    pub source: io::Error,
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "TLS handshake with {} failed: {}",
            self.server, self.source
        )
    }
}

impl std::error::Error for HandshakeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// A common reason for a TLS failure seen by a client, with what to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hint {
    /// The server's certificate is not from a CA trusted here.
    UnknownCa,
    /// The server's certificate is for another name.
    OtherName,
    /// The server's certificate has expired.
    Expired,
    /// The server wants a client certificate and got none.
    CertificateWanted,
    /// The server refused the client certificate given.
    CertificateRefused,
    /// What answered is not a TLS server (a plain TCP one, say).
    NotTls,
}

impl Hint {
    /// The client settings that may fix it, by their short names.
    pub fn settings(self) -> &'static [&'static str] {
        match self {
            Hint::UnknownCa => &["ca"],
            Hint::OtherName => &["server_name"],
            Hint::Expired | Hint::NotTls => &[],
            Hint::CertificateWanted | Hint::CertificateRefused => &["cert", "key"],
        }
    }
}

impl fmt::Display for Hint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hint::UnknownCa => {
                "the server's certificate is not signed by a CA trusted here: give the CA that signed it"
            }
            Hint::OtherName => {
                "the server's certificate is for another name: connect by that name, or give it as the server name"
            }
            Hint::Expired => "the server's certificate has expired: the server must renew it",
            Hint::CertificateWanted => {
                "the server asks for a client certificate: give one from its CA, and its key"
            }
            Hint::CertificateRefused => {
                "the server refused the client certificate: give one from the CA it trusts"
            }
            Hint::NotTls => "what answered does not talk TLS: is the server serving plain TCP?",
        })
    }
}

/// What to do about a TLS failure seen by a client (a handshake that
/// failed, or a connection the server closed after it), when it is a
/// common one.
pub fn hint(e: &io::Error) -> Option<Hint> {
    use rustls::{AlertDescription, CertificateError};
    let inner = e.get_ref()?;
    let tls = match inner.downcast_ref::<HandshakeError>() {
        Some(handshake) => handshake
            .source
            .get_ref()?
            .downcast_ref::<rustls::Error>()?,
        None => inner.downcast_ref::<rustls::Error>()?,
    };
    match tls {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => Some(Hint::UnknownCa),
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => Some(Hint::OtherName),
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => Some(Hint::Expired),
        rustls::Error::AlertReceived(AlertDescription::CertificateRequired) => {
            Some(Hint::CertificateWanted)
        }
        rustls::Error::AlertReceived(
            AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::AccessDenied,
        ) => Some(Hint::CertificateRefused),
        rustls::Error::InvalidMessage(
            rustls::InvalidMessage::InvalidContentType
            | rustls::InvalidMessage::UnknownProtocolVersion,
        ) => Some(Hint::NotTls),
        _ => None,
    }
}

/// A connector whose files are re-read when asked ([`ClientTls::reload`],
/// on SIGHUP) and when they change ([`ClientTls::watch`]); a set that does
/// not load is reported and the connector in force stays. Connections
/// made before keep the configuration they were made with.
pub struct ClientTls {
    files: ClientFiles,
    current: std::sync::RwLock<(Connector, Vec<super::Stamp>)>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Reads `files` (see [`Connector::new`]).
    pub fn load(files: ClientFiles) -> Result<ClientTls, TlsError> {
        let stamps = ClientTls::stamps_of(&files);
        let connector = Connector::new(&files)?;
        Ok(ClientTls {
            files,
            current: std::sync::RwLock::new((connector, stamps)),
        })
    }

    fn stamps_of(files: &ClientFiles) -> Vec<super::Stamp> {
        let all: Vec<&PathBuf> = [&files.ca, &files.cert, &files.key]
            .into_iter()
            .flatten()
            .collect();
        super::stamps(&all)
    }

    /// The connector new connections use.
    pub fn connector(&self) -> Connector {
        self.current.read().expect("tls lock").0.clone()
    }

    /// Reads the files again; on failure the connector in force stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamps = ClientTls::stamps_of(&self.files);
        let loaded = Connector::new(&self.files);
        let mut current = self.current.write().expect("tls lock");
        current.1 = stamps;
        current.0 = loaded?;
        Ok(())
    }

    /// Re-reads the files whenever they change, until `stop`, logging
    /// each change under `what`.
    pub async fn watch(self: Arc<Self>, what: String, stop: impl std::future::Future<Output = ()>) {
        let changed =
            || self.current.read().expect("tls lock").1 != ClientTls::stamps_of(&self.files);
        let reload = |why: &str| match self.reload() {
            Ok(()) => {
                tracing::info!(endpoint = %what, "TLS client files re-read ({why}); new connections use them")
            }
            Err(e) => {
                tracing::error!(endpoint = %what, error = %e, "TLS client files not re-read ({why}); the ones in force stay")
            }
        };
        super::watch(changed, reload, stop).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use rustls::server::WebPkiClientVerifier;
    use rustls::ServerConfig;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::{TcpListener, TcpStream};

    /// Two CAs, and certificates signed by the first: a server's for
    /// `server.test` and 127.0.0.1, and a client's. PEM files in a
    /// temporary directory.
    struct Pki {
        dir: tempfile::TempDir,
    }

    impl Pki {
        fn new() -> Pki {
            let dir = tempfile::tempdir().unwrap();
            let ca = Self::ca(dir.path(), "ca");
            Self::ca(dir.path(), "other-ca");
            for (stem, names) in [
                (
                    "server",
                    vec!["server.test".to_string(), "127.0.0.1".into()],
                ),
                ("client", vec!["client.test".to_string()]),
            ] {
                let key = KeyPair::generate().unwrap();
                let cert = CertificateParams::new(names)
                    .unwrap()
                    .signed_by(&key, &ca)
                    .unwrap();
                std::fs::write(dir.path().join(format!("{stem}.pem")), cert.pem()).unwrap();
                std::fs::write(dir.path().join(format!("{stem}.key")), key.serialize_pem())
                    .unwrap();
            }
            Pki { dir }
        }

        fn ca(dir: &Path, stem: &str) -> CertifiedIssuer<'static, KeyPair> {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, stem);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
            std::fs::write(dir.join(format!("{stem}.pem")), ca.pem()).unwrap();
            ca
        }

        fn path(&self, file: &str) -> PathBuf {
            self.dir.path().join(file)
        }

        fn files(&self, ca: &str, client: bool, server_name: Option<&str>) -> ClientFiles {
            ClientFiles {
                ca: Some(self.path(ca)),
                cert: client.then(|| self.path("client.pem")),
                key: client.then(|| self.path("client.key")),
                server_name: server_name.map(str::to_string),
            }
        }

        /// A TLS server on a loopback port that answers each line with
        /// the line, then `client-cert` or `no-client-cert`; with mutual
        /// TLS, only clients of the CA get in.
        async fn server(&self, mutual: bool) -> std::net::SocketAddr {
            let chain = CertificateDer::pem_file_iter(self.path("server.pem"))
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_file(self.path("server.key")).unwrap();
            let builder = ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap();
            let builder = if mutual {
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(self.path("ca.pem")).unwrap() {
                    roots.add(cert.unwrap()).unwrap();
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .build()
                        .unwrap();
                builder.with_client_cert_verifier(verifier)
            } else {
                builder.with_no_client_auth()
            };
            let config = builder.with_single_cert(chain, key).unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                loop {
                    let (tcp, _) = listener.accept().await.unwrap();
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let presented = tls.get_ref().1.peer_certificates().is_some();
                        let mut tls = BufReader::new(tls);
                        let mut line = String::new();
                        while tls.read_line(&mut line).await.is_ok_and(|n| n > 0) {
                            let who = if presented {
                                "client-cert"
                            } else {
                                "no-client-cert"
                            };
                            let answer = format!("{} {who}\n", line.trim_end());
                            if tls.get_mut().write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                            line.clear();
                        }
                    });
                }
            });
            addr
        }
    }

    /// Connects to `addr` as `host` with `files` and asks "hello": the
    /// answer, or the error of the handshake or the exchange.
    async fn ask(
        files: &ClientFiles,
        addr: std::net::SocketAddr,
        host: &str,
    ) -> io::Result<String> {
        let connector = Connector::new(files).unwrap();
        let tcp = TcpStream::connect(addr).await?;
        let mut tls = connector.connect(tcp, host).await?;
        tls.write_all(b"hello\n").await?;
        let mut answer = vec![0; 64];
        let n = tls.read(&mut answer).await?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
        }
        Ok(String::from_utf8_lossy(&answer[..n]).into_owned())
    }

    #[tokio::test]
    async fn a_server_of_the_ca_is_trusted_by_name_or_address() {
        let pki = Pki::new();
        let addr = pki.server(false).await;
        let answer = ask(&pki.files("ca.pem", false, None), addr, "127.0.0.1").await;
        assert_eq!(answer.unwrap(), "hello no-client-cert\n");
        let files = pki.files("ca.pem", false, Some("server.test"));
        let answer = ask(&files, addr, "127.0.0.1").await;
        assert_eq!(answer.unwrap(), "hello no-client-cert\n");
        // A client certificate the server does not ask for is not sent.
        let answer = ask(&pki.files("ca.pem", true, Some("server.test")), addr, "x").await;
        assert_eq!(answer.unwrap(), "hello no-client-cert\n");
    }

    #[tokio::test]
    async fn a_server_of_another_ca_is_refused_with_why() {
        let pki = Pki::new();
        let addr = pki.server(false).await;
        let files = pki.files("other-ca.pem", false, Some("server.test"));
        let e = ask(&files, addr, "127.0.0.1").await.unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with(
                "TLS handshake with server.test failed: invalid peer certificate: UnknownIssuer"
            ),
            "{text}"
        );
        assert_eq!(hint(&e), Some(Hint::UnknownCa));
        let handshake = e.get_ref().unwrap().downcast_ref::<HandshakeError>();
        assert_eq!(handshake.unwrap().server, "server.test");
    }

    #[tokio::test]
    async fn a_certificate_for_another_name_is_refused() {
        let pki = Pki::new();
        let addr = pki.server(false).await;
        let files = pki.files("ca.pem", false, Some("elsewhere.test"));
        let e = ask(&files, addr, "127.0.0.1").await.unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with("TLS handshake with elsewhere.test failed:"),
            "{text}"
        );
        assert!(text.contains("not valid for name"), "{text}");
        assert_eq!(hint(&e), Some(Hint::OtherName));
        // The host is the name when no server name is given.
        let files = pki.files("ca.pem", false, None);
        let text = ask(&files, addr, "localhost")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            text.starts_with("TLS handshake with localhost failed:"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn mutual_tls_sends_the_client_certificate_when_asked() {
        let pki = Pki::new();
        let addr = pki.server(true).await;
        let files = pki.files("ca.pem", true, Some("server.test"));
        let answer = ask(&files, addr, "127.0.0.1").await;
        assert_eq!(answer.unwrap(), "hello client-cert\n");
        // Without one, the server refuses: with TLS 1.3, at the first read.
        let files = pki.files("ca.pem", false, Some("server.test"));
        let e = ask(&files, addr, "127.0.0.1").await.unwrap_err();
        assert_eq!(hint(&e), Some(Hint::CertificateWanted), "{e}");
    }

    #[tokio::test]
    async fn a_plain_server_is_told_apart() {
        let pki = Pki::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let _ = tcp.write_all(b"ERR not a number\n").await;
            let _ = tcp.read(&mut [0; 1024]).await;
        });
        let e = ask(&pki.files("ca.pem", false, None), addr, "127.0.0.1")
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("TLS handshake with 127.0.0.1 failed"),
            "{e}"
        );
        assert_eq!(hint(&e), Some(Hint::NotTls), "{e}");
    }

    #[tokio::test]
    async fn connects_over_any_stream() {
        let pki = Pki::new();
        let addr = pki.server(false).await;
        let connector = Connector::new(&pki.files("ca.pem", false, None)).unwrap();
        // A stream type other than TcpStream: the handshake does not care.
        let tcp = BufReader::new(TcpStream::connect(addr).await.unwrap());
        let mut tls = connector.connect(tcp, "[127.0.0.1]").await.unwrap();
        tls.write_all(b"x\n").await.unwrap();
        let mut answer = String::new();
        BufReader::new(&mut tls)
            .read_line(&mut answer)
            .await
            .unwrap();
        assert_eq!(answer, "x no-client-cert\n");
        let e = connector
            .connect(TcpStream::connect(addr).await.unwrap(), "bad name")
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(
            e.to_string().contains("\"bad name\" is not a DNS name"),
            "{e}"
        );
    }

    #[test]
    fn every_bad_setting_is_named_with_what_is_wrong() {
        let pki = Pki::new();
        let not_pem = pki.path("not.pem");
        std::fs::write(&not_pem, "hello\n").unwrap();
        let problem = |files: ClientFiles| Connector::new(&files).unwrap_err().to_string();

        let mut files = pki.files("ca.pem", true, None);
        files.key = None;
        let e = problem(files);
        assert!(
            e.starts_with(&format!("cert {}: ", pki.path("client.pem").display())),
            "{e}"
        );
        assert!(e.contains("without its private key"), "{e}");

        let mut files = pki.files("ca.pem", true, None);
        files.cert = None;
        let e = problem(files);
        assert!(
            e.starts_with(&format!("key {}: ", pki.path("client.key").display())),
            "{e}"
        );
        assert!(e.contains("without its client certificate"), "{e}");

        let mut files = pki.files("ca.pem", true, None);
        files.key = Some(pki.path("server.key"));
        let e = problem(files);
        assert_eq!(
            e,
            format!(
                "cert {}: does not match the key in {}; give the certificate and the key made together",
                pki.path("client.pem").display(),
                pki.path("server.key").display()
            )
        );

        let e = problem(pki.files("not.pem", false, None));
        assert!(
            e.starts_with(&format!("ca {}: holds no certificate", not_pem.display())),
            "{e}"
        );
        let e = problem(pki.files("missing.pem", false, None));
        assert!(e.starts_with("ca ") && e.ends_with("does not exist"), "{e}");

        let mut files = pki.files("ca.pem", true, None);
        files.key = Some(pki.path("client.pem"));
        let e = problem(files);
        assert!(
            e.starts_with("key ") && e.contains("holds no private key"),
            "{e}"
        );

        let e = problem(pki.files("ca.pem", false, Some("not a name")));
        assert!(
            e.starts_with("server_name not a name: is not a DNS name or an IP address"),
            "{e}"
        );
        assert!(Connector::new(&pki.files("ca.pem", true, Some("::1"))).is_ok());
    }

    #[test]
    fn a_system_without_trusted_cas_says_to_give_one() {
        let e = system_roots(rustls_native_certs::CertificateResult::default())
            .unwrap_err()
            .prefixed("tls_");
        assert_eq!(e.setting, "tls_ca");
        assert!(e.problem.contains("no trusted CAs"), "{e}");
        assert!(e.problem.contains("give the CA"), "{e}");
    }

    #[test]
    fn server_names_are_dns_names_or_addresses() {
        assert!(matches!(
            server_name("db.internal"),
            Some(ServerName::DnsName(_))
        ));
        assert!(matches!(
            server_name("10.0.0.1"),
            Some(ServerName::IpAddress(_))
        ));
        assert!(matches!(server_name("::1"), Some(ServerName::IpAddress(_))));
        assert!(matches!(
            server_name("[::1]"),
            Some(ServerName::IpAddress(_))
        ));
        assert!(server_name("a b").is_none());
        assert!(server_name("").is_none());
    }
}
