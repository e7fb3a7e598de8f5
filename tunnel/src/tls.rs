//! TLS on a route: terminating it for clients (the route's certificate,
//! re-read on SIGHUP and when its files change), originating it towards
//! the targets, and choosing among routes that share a listen address by
//! the server name of the client's hello (SNI).

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::config::ConfigError;
use common::serve::{Accepted, Handler, ServeOptions};
use common::tls::client::ClientTls;
use common::tls::hello::{read_client_hello, HelloError, Prefixed, UNRECOGNIZED_NAME_ALERT};
use common::tls::{HandshakeStats, ServerTls, TlsError};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::access_log::{AccessLog, End, Entry};
use crate::metrics::Metrics;
use crate::relay::OverTcp;
use crate::{Route, RouteHandler};

/// How long a client of an address shared by server name may take to
/// send its hello.
pub const HELLO_TIMEOUT: Duration = common::tls::HANDSHAKE_TIMEOUT;

/// A route's TLS, read from its files.
#[derive(Default)]
pub struct RouteTls {
    /// The listening side's certificate, when the route terminates TLS.
    pub server: Option<Arc<ServerTls>>,
    /// The connector towards the targets, when the route originates TLS.
    pub client: Option<Arc<ClientTls>>,
}

impl RouteTls {
    /// Reads `route`'s TLS files; handshakes are counted in `stats`. An
    /// error names the setting as a route writes it (`tls.cert`).
    pub fn load(route: &Route, stats: &Arc<HandshakeStats>) -> Result<RouteTls, TlsError> {
        let server = match &route.tls {
            Some(files) => Some(Arc::new(
                ServerTls::load(files.clone(), stats.clone()).map_err(|e| e.prefixed("tls."))?,
            )),
            None => {
                stats.set_expiry(None);
                None
            }
        };
        let client = match &route.target_tls {
            Some(files) => Some(Arc::new(
                ClientTls::load(files.clone()).map_err(|e| e.prefixed("target_tls."))?,
            )),
            None => None,
        };
        Ok(RouteTls { server, client })
    }
}

/// Every TLS file of `routes` that cannot be used, as configuration
/// errors at the key that names it: `tls_cert` in the quick form,
/// `routes.N.tls.cert` in a configuration's routes.
pub fn problems(routes: &[Route], quick: bool) -> Vec<ConfigError> {
    routes
        .iter()
        .enumerate()
        .filter_map(|(i, route)| {
            let e = RouteTls::load(route, &Arc::default()).err()?;
            let key = if quick {
                // tls.cert -> tls_cert, target_tls.ca -> target_ca
                e.setting
                    .replacen("target_tls.", "target_", 1)
                    .replacen("tls.", "tls_", 1)
            } else {
                format!("routes.{i}.{}", e.setting)
            };
            Some(ConfigError {
                key,
                value: None,
                origin: None,
                message: format!("{}: {}", e.file.display(), e.problem),
            })
        })
        .collect()
}

impl<S> OverTcp for Prefixed<S>
where
    S: OverTcp,
{
    fn tcp(&self) -> &TcpStream {
        self.get_ref().tcp()
    }
}

/// One route among those sharing a listen address: the names that choose
/// it, and how it serves.
pub struct Named {
    /// Its server names (lower case; exact, or `*.` and one label).
    pub names: Vec<String>,
    /// Its connections' handler.
    pub handler: Arc<RouteHandler>,
    /// Its cap and access lists.
    pub options: ServeOptions,
}

/// The accept loop's handler for an address shared by server name: reads
/// each client's hello, picks the route whose names match (an exact name
/// before a wildcard), and hands the connection over with the hello to
/// replay. No match, or no TLS, is refused with an access-log line.
pub struct SniRouter {
    /// The shared address, as logs and metrics name it.
    pub listen: String,
    /// The routes, in configuration order.
    pub routes: Vec<Named>,
    /// Where refusals are counted.
    pub metrics: Arc<Metrics>,
    /// Where refusals are logged.
    pub log: Arc<AccessLog>,
}

impl SniRouter {
    /// The route for `name`: an exact name first, then a wildcard.
    fn pick(&self, name: &str) -> Option<&Named> {
        let name = name.to_ascii_lowercase();
        self.routes
            .iter()
            .find(|r| r.names.contains(&name))
            .or_else(|| {
                self.routes.iter().find(|r| {
                    r.names
                        .iter()
                        .any(|n| n.starts_with("*.") && common::tls::names::matches(n, &name))
                })
            })
    }

    fn refuse(&self, conn: &Accepted, started: Instant, reason: &'static str, detail: String) {
        self.metrics.sni_refused(&self.listen, reason);
        self.log.record(&Entry {
            route: &self.listen,
            client: conn.peer,
            via: conn.via,
            target: "-".into(),
            sent: 0,
            received: 0,
            duration: started.elapsed(),
            end: End::NoRoute,
            detail: Some(detail),
        });
    }
}

impl Handler for SniRouter {
    async fn handle(self: Arc<Self>, mut client: TcpStream, conn: Accepted) -> anyhow::Result<()> {
        let started = Instant::now();
        let hello = match read_client_hello(&mut client, HELLO_TIMEOUT).await {
            Ok(hello) => hello,
            Err(HelloError::Closed { received: 0 }) => {
                // A port probe or a health check: nothing to say.
                return Ok(());
            }
            Err(e) => {
                let reason = match e {
                    HelloError::NotTls(_) | HelloError::TooLarge => "not_tls",
                    _ => "no_hello",
                };
                self.refuse(&conn, started, reason, e.to_string());
                return Ok(());
            }
        };
        let Some(name) = hello.server_name.clone() else {
            let _ = client.write_all(&UNRECOGNIZED_NAME_ALERT).await;
            self.refuse(
                &conn,
                started,
                "no_name",
                "the client's hello names no server (SNI); routes here are chosen by name".into(),
            );
            return Ok(());
        };
        let Some(route) = self.pick(&name) else {
            let _ = client.write_all(&UNRECOGNIZED_NAME_ALERT).await;
            self.refuse(
                &conn,
                started,
                "unknown_name",
                format!("no route for server name {name}"),
            );
            return Ok(());
        };
        if !route.options.access.permits(conn.peer.ip()) {
            drop(client);
            route.handler.refused(conn.id, conn.peer, conn.via);
            return Ok(());
        }
        let _source = match route
            .options
            .per_source
            .as_ref()
            .map(|l| l.admit(conn.peer.ip()))
        {
            None => None,
            Some(Ok(permit)) => Some(permit),
            Some(Err(refusal)) => {
                drop(client);
                route
                    .handler
                    .refused_per_source(conn.id, conn.peer, conn.via, &refusal);
                return Ok(());
            }
        };
        // The route's own cap: wait for a place, as its own accept loop
        // would, unless the tunnel is stopping.
        let _permit = match route.options.cap.try_acquire() {
            Some(permit) => permit,
            None => tokio::select! {
                permit = route.options.cap.acquire() => permit,
                _ = conn.draining.cancelled() => return Ok(()),
            },
        };
        route
            .handler
            .clone()
            .serve(
                crate::Client::Replay(Prefixed::new(hello.bytes, client)),
                conn,
                started,
            )
            .await
    }

    fn refused(&self, _id: u64, _peer: std::net::SocketAddr, _via: Option<std::net::SocketAddr>) {}

    fn header_refused(
        &self,
        _id: u64,
        peer: std::net::SocketAddr,
        why: &common::proxy::HeaderError,
    ) {
        if why.is_silent() {
            return;
        }
        self.metrics.sni_refused(&self.listen, "proxy_header");
        self.log.record(&Entry {
            route: &self.listen,
            client: peer,
            via: None,
            target: "-".into(),
            sent: 0,
            received: 0,
            duration: Duration::ZERO,
            end: End::ProxyHeader,
            detail: Some(why.to_string()),
        });
    }
}
