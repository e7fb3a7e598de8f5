//! TLS for every endpoint, on rustls (no OpenSSL): a server's certificate
//! chain and key, and the clients it accepts (mutual TLS), read from PEM
//! files into a rustls configuration. Every problem names its file and
//! what is wrong with it, so a bad file is a configuration error at start.

pub mod client;
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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::{SystemTime, UNIX_EPOCH};

pub mod names;
pub use names::CertInfo;
use names::{NameNotAllowed, NamedClients};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, OtherError};
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
/// to it (and, with client names, carries one of them) get in. Also the
/// validity of the endpoint's own certificate: an expired one is an error.
pub fn server_config(files: &ServerFiles) -> Result<(Arc<ServerConfig>, CertInfo), TlsError> {
    let chain = read_certificates("cert", &files.cert)?;
    let info = CertInfo::of(&chain[0]).ok_or_else(|| {
        error(
            "cert",
            &files.cert,
            "holds a certificate that is not X.509 (is the PEM block damaged?)",
        )
    })?;
    let now = SystemTime::now();
    if info.not_after < now {
        return Err(error(
            "cert",
            &files.cert,
            format!(
                "expired on {}; renew it (or give the renewed file)",
                names::when(info.not_after)
            ),
        ));
    }
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
            if files.client_names.is_empty() {
                builder.with_client_cert_verifier(verifier)
            } else {
                builder.with_client_cert_verifier(Arc::new(NamedClients::new(
                    verifier,
                    files.client_names.clone(),
                )))
            }
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
    Ok((Arc::new(config), info))
}

/// The longest a client may take over its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a handshake failed, as metrics count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No complete handshake within [`HANDSHAKE_TIMEOUT`].
    Timeout,
    /// The client went away (or reset) during the handshake; most often
    /// a port probe or a health check that never meant to speak TLS.
    /// Logged at debug level and not counted.
    Closed,
    /// Mutual TLS, and the client sent no certificate.
    NoClientCertificate,
    /// The client's certificate does not chain to the client CA.
    UnknownCa,
    /// The client's certificate has expired (or is not valid yet).
    Expired,
    /// The client's certificate has none of the client names.
    NameNotAllowed,
    /// The client's certificate is unusable otherwise.
    BadCertificate,
    /// The server name the client asked for is not served here.
    UnknownServerName,
    /// Anything else: not TLS, no common version or cipher suite.
    Protocol,
}

impl Failure {
    /// Every reason, in the order metrics list them.
    /// [`Failure::Closed`] is not among them: a client that connects and
    /// goes (a port probe, a balancer's health check) is no failure.
    pub const ALL: [Failure; 8] = [
        Failure::Timeout,
        Failure::NoClientCertificate,
        Failure::UnknownCa,
        Failure::Expired,
        Failure::NameNotAllowed,
        Failure::BadCertificate,
        Failure::UnknownServerName,
        Failure::Protocol,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Closed => "closed",
            Failure::NoClientCertificate => "no_client_certificate",
            Failure::UnknownCa => "unknown_ca",
            Failure::Expired => "expired",
            Failure::NameNotAllowed => "name_not_allowed",
            Failure::BadCertificate => "bad_certificate",
            Failure::UnknownServerName => "unknown_server_name",
            Failure::Protocol => "protocol",
        }
    }

    /// Why a handshake that ended in `e` failed, and in which words.
    pub fn of(e: &std::io::Error) -> (Failure, String) {
        use std::io::ErrorKind;
        let Some(tls) = e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) else {
            return match e.kind() {
                ErrorKind::UnexpectedEof
                | ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::BrokenPipe => (
                    Failure::Closed,
                    format!("the client went away during the handshake ({e})"),
                ),
                _ => (Failure::Protocol, e.to_string()),
            };
        };
        let failure = match tls {
            rustls::Error::NoCertificatesPresented => Failure::NoClientCertificate,
            rustls::Error::InvalidCertificate(c) => match c {
                CertificateError::UnknownIssuer => Failure::UnknownCa,
                CertificateError::ExpiredContext { not_after, .. } => {
                    let when = names::when(UNIX_EPOCH + Duration::from_secs(not_after.as_secs()));
                    return (
                        Failure::Expired,
                        format!("the client's certificate expired on {when}"),
                    );
                }
                CertificateError::Expired
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => Failure::Expired,
                CertificateError::Other(OtherError(other))
                    if other.downcast_ref::<NameNotAllowed>().is_some() =>
                {
                    return (Failure::NameNotAllowed, other.to_string());
                }
                _ => Failure::BadCertificate,
            },
            _ => Failure::Protocol,
        };
        (failure, tls.to_string())
    }
}

/// Handshakes of one endpoint: completed, and failed by reason.
#[derive(Debug, Default)]
pub struct HandshakeStats {
    completed: AtomicU64,
    failed: [AtomicU64; Failure::ALL.len()],
    /// When the certificate in force expires, Unix seconds (0: none).
    expiry: AtomicU64,
}

impl HandshakeStats {
    /// Counts a handshake that completed.
    pub fn completed(&self) {
        self.completed.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a handshake that failed.
    pub fn failed(&self, why: Failure) {
        if let Some(i) = Failure::ALL.iter().position(|f| *f == why) {
            self.failed[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// When the certificate in force expires, in Unix seconds; 0 when the
    /// endpoint serves no TLS.
    pub fn expiry(&self) -> u64 {
        self.expiry.load(Ordering::Relaxed)
    }

    /// Records when the certificate in force expires (`None`: no TLS).
    pub fn set_expiry(&self, at: Option<SystemTime>) {
        let secs = at.map_or(0, |t| {
            t.duration_since(UNIX_EPOCH)
                .map_or(1, |d| d.as_secs().max(1))
        });
        self.expiry.store(secs, Ordering::Relaxed);
    }

    /// Handshakes completed so far.
    pub fn completed_total(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
    }

    /// Handshakes failed so far, by reason (every reason, zeros included).
    pub fn failed_totals(&self) -> impl Iterator<Item = (Failure, u64)> + '_ {
        Failure::ALL
            .iter()
            .zip(&self.failed)
            .map(|(f, n)| (*f, n.load(Ordering::Relaxed)))
    }
}

pub(crate) use crate::files::Stamp;

/// A TLS endpoint's configuration as it is now, and what it was made of.
struct Current {
    config: Arc<ServerConfig>,
    cert: CertInfo,
    /// The files' stamps when last read (successfully or not).
    stamps: Vec<Stamp>,
}

/// A TLS endpoint's certificate, key and client CA, re-read when asked
/// ([`ServerTls::reload`], on SIGHUP) and when the files change
/// ([`ServerTls::watch`]). A new set that does not load is reported and
/// the old one stays in force; handshakes in progress and sessions
/// already made keep the configuration they started with.
pub struct ServerTls {
    files: ServerFiles,
    current: RwLock<Current>,
    stats: Arc<HandshakeStats>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

/// How often [`ServerTls::watch`] looks at the files.
pub const WATCH_EVERY: Duration = Duration::from_secs(2);

/// Within this of its expiry, a certificate is warned about.
const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 86_400);

impl ServerTls {
    /// Reads `files`; counts handshakes in `stats`.
    pub fn load(files: ServerFiles, stats: Arc<HandshakeStats>) -> Result<ServerTls, TlsError> {
        let stamps = ServerTls::stamps_of(&files);
        let (config, cert) = server_config(&files)?;
        stats.set_expiry(Some(cert.not_after));
        Ok(ServerTls {
            files,
            current: RwLock::new(Current {
                config,
                cert,
                stamps,
            }),
            stats,
        })
    }

    fn stamps_of(files: &ServerFiles) -> Vec<Stamp> {
        [
            Some(&files.cert),
            Some(&files.key),
            files.client_ca.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|f| Stamp::of(f))
        .collect()
    }

    /// The files it is served from.
    pub fn files(&self) -> &ServerFiles {
        &self.files
    }

    /// The configuration new handshakes get.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current.read().expect("tls lock").config.clone()
    }

    /// When the certificate in force expires.
    pub fn expires(&self) -> SystemTime {
        self.current.read().expect("tls lock").cert.not_after
    }

    /// The handshake counters.
    pub fn stats(&self) -> &Arc<HandshakeStats> {
        &self.stats
    }

    /// Reads the files again; on success new handshakes use them, on
    /// failure the configuration in force stays and the error says why.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamps = ServerTls::stamps_of(&self.files);
        let loaded = server_config(&self.files);
        let mut current = self.current.write().expect("tls lock");
        current.stamps = stamps;
        let (config, cert) = loaded?;
        expiry_warning(&self.files, &cert);
        self.stats.set_expiry(Some(cert.not_after));
        current.config = config;
        current.cert = cert;
        Ok(())
    }

    /// Whether a file changed since it was last read.
    fn changed(&self) -> bool {
        self.current.read().expect("tls lock").stamps != ServerTls::stamps_of(&self.files)
    }

    /// Re-reads the files whenever they change, until `stop` (see
    /// [`watch`]).
    pub async fn watch(self: Arc<Self>, what: String, stop: impl std::future::Future<Output = ()>) {
        watch(
            || self.changed(),
            |why| self.reload_logged(&what, why),
            stop,
        )
        .await
    }

    /// [`ServerTls::reload`], with its outcome logged under `what`.
    pub fn reload_logged(&self, what: &str, why: &str) {
        match self.reload() {
            Ok(()) => tracing::info!(
                endpoint = what,
                cert = %self.files.cert.display(),
                expires = %names::when(self.expires()),
                "TLS certificate re-read ({why}); new connections use it"
            ),
            Err(e) => tracing::error!(
                endpoint = what,
                error = %e,
                "TLS files not re-read ({why}); the certificate in force stays"
            ),
        }
    }
}

/// Calls `reload` whenever `changed` says the files changed (looked at
/// every [`WATCH_EVERY`]) until `stop`. A change that does not load is
/// reported once by `reload`; the old configuration stays until the files
/// change again.
pub async fn watch(
    changed: impl Fn() -> bool,
    reload: impl Fn(&str),
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(WATCH_EVERY) => {}
        }
        if !changed() {
            continue;
        }
        // A renewal writes the certificate and the key one after the
        // other: give the second write a moment.
        tokio::time::sleep(Duration::from_millis(200)).await;
        reload("the files changed");
    }
}

/// The stamps of `files`, to see later whether one changed.
pub(crate) fn stamps(files: &[&PathBuf]) -> Vec<Stamp> {
    files.iter().map(|f| Stamp::of(f)).collect()
}

/// Warns when the certificate in force expires within 14 days (said once
/// when serving starts, and at every re-read).
pub fn warn_if_expiring(tls: &ServerTls) {
    let current = tls.current.read().expect("tls lock");
    expiry_warning(&tls.files, &current.cert);
}

fn expiry_warning(files: &ServerFiles, cert: &CertInfo) {
    let left = cert
        .not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    if left < EXPIRY_WARNING {
        tracing::warn!(
            cert = %files.cert.display(),
            expires = %names::when(cert.not_after),
            "TLS certificate expires in less than 14 days; renew it"
        );
    }
}

/// A service served over TLS: the accept loop hands it TCP connections,
/// it completes each handshake (within [`HANDSHAKE_TIMEOUT`]) and hands
/// the decrypted stream to the service. A handshake that fails is logged
/// with its reason and the client, counted, and the service never sees
/// it.
pub struct Tls<H> {
    tls: Arc<ServerTls>,
    service: Arc<H>,
}

impl<H> Tls<H> {
    /// `service`, served with `tls`.
    pub fn new(tls: Arc<ServerTls>, service: Arc<H>) -> Tls<H> {
        Tls { tls, service }
    }
}

/// Completes the server side of a handshake on `stream` with `tls`'s
/// configuration of the moment, within [`HANDSHAKE_TIMEOUT`]; counts it,
/// and logs a failure with `peer` and its reason.
pub async fn accept<S>(
    tls: &ServerTls,
    stream: S,
    peer: SocketAddr,
) -> Result<TlsStream<S>, Failure>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let acceptor = TlsAcceptor::from(tls.config());
    let (failure, reason) =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
            Ok(Ok(stream)) => {
                tls.stats.completed();
                return Ok(stream);
            }
            Ok(Err(e)) => Failure::of(&e),
            Err(_) => (
                Failure::Timeout,
                format!("no handshake within {HANDSHAKE_TIMEOUT:?}"),
            ),
        };
    if failure == Failure::Closed {
        tracing::debug!(%peer, %reason, "TLS handshake not begun or not finished");
        return Err(failure);
    }
    tls.stats.failed(failure);
    tracing::info!(%peer, %reason, "TLS handshake failed");
    Err(failure)
}

impl<H: Handler<TlsStream<TcpStream>>> Handler<TcpStream> for Tls<H> {
    async fn handle(self: Arc<Self>, stream: TcpStream, conn: Accepted) -> anyhow::Result<()> {
        match accept(&self.tls, stream, conn.peer).await {
            Ok(tls) => self.service.clone().handle(tls, conn).await,
            Err(_) => Ok(()),
        }
    }

    fn refused(&self, id: u64, peer: SocketAddr, via: Option<SocketAddr>) {
        self.service.refused(id, peer, via);
    }

    fn header_refused(&self, id: u64, peer: SocketAddr, why: &crate::proxy::HeaderError) {
        self.service.header_refused(id, peer, why);
    }

    fn refused_per_source(
        &self,
        id: u64,
        peer: SocketAddr,
        via: Option<SocketAddr>,
        refusal: &crate::limits::Refusal,
    ) {
        self.service.refused_per_source(id, peer, via, refusal);
    }
}

/// Serves `listener` with `service` until `shutdown`, over TLS with `tls`
/// when there is one (re-read on SIGHUP and when its files change), plain
/// TCP otherwise (see [`crate::serve::serve`]).
pub async fn serve<H>(
    listener: tokio::net::TcpListener,
    options: crate::serve::ServeOptions,
    tls: Option<Arc<ServerTls>>,
    service: Arc<H>,
    shutdown: impl std::future::Future<Output = ()>,
) where
    H: Handler<TcpStream> + Handler<TlsStream<TcpStream>>,
{
    match tls {
        Some(tls) => {
            warn_if_expiring(&tls);
            let stop = tokio_util::sync::CancellationToken::new();
            let what = listener
                .local_addr()
                .map_or_else(|_| "listener".to_string(), |a| a.to_string());
            tokio::spawn(
                tls.clone()
                    .watch(what.clone(), stop.clone().cancelled_owned()),
            );
            tokio::spawn(reload_on_hangup(tls.clone(), what, stop.clone()));
            crate::serve::serve(
                listener,
                options,
                Arc::new(Tls::new(tls, service)),
                shutdown,
            )
            .await;
            stop.cancel();
        }
        None => crate::serve::serve(listener, options, service, shutdown).await,
    }
}

/// Re-reads `tls` on every SIGHUP until `stop`.
async fn reload_on_hangup(
    tls: Arc<ServerTls>,
    what: String,
    stop: tokio_util::sync::CancellationToken,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch for SIGHUP; TLS files are re-read only when they change");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            got = hangups.recv() => match got {
                Some(()) => tls.reload_logged(&what, "SIGHUP"),
                None => return,
            },
        }
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
        let (config, _) = server_config(&ServerFiles {
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
