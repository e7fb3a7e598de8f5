//! The TLS ClientHello at the start of a connection, read for its server
//! name (SNI) before anything else happens, so one listen address can
//! serve several routes chosen by name. The hello is parsed by rustls
//! itself (its [`Acceptor`]), never by a parser of our own, and the bytes
//! read are kept: a passthrough route forwards them to its target as they
//! came, a terminating route replays them to its TLS server through
//! [`Prefixed`] as if nothing had been read.
//!
//! Reading is bounded in time (the caller's timeout covers the whole
//! hello) and in memory ([`MAX_HELLO`] bytes at most), so a client that
//! sends slowly, or sends a huge or endless hello, costs little.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use rustls::server::Acceptor;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The most bytes read while waiting for a complete ClientHello: one full
/// TLS record (a 5-byte header and 16 KiB of payload), however the client
/// splits it into records. Real hellos are far smaller (under 2 KiB with
/// post-quantum key shares); anything larger is refused.
pub const MAX_HELLO: usize = 5 + 16 * 1024;

/// A fatal TLS alert `unrecognized_name` (112), as a whole TLS 1.2 record:
/// what a server sends to refuse a hello whose server name it does not
/// serve, before closing the connection.
pub const UNRECOGNIZED_NAME_ALERT: [u8; 7] = [
    0x15, // content type: alert
    0x03, 0x03, // record version: TLS 1.2
    0x00, 0x02, // length
    0x02, // level: fatal
    112,  // description: unrecognized_name
];

/// What the bytes read so far from a new connection are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peek {
    /// The start of a ClientHello, or nothing yet: read more.
    NeedMore,
    /// A complete ClientHello.
    Hello {
        /// The name the client asked for (SNI), lowercase and without a
        /// trailing dot; `None` when it sent none (or sent an IP address,
        /// which SNI does not allow).
        server_name: Option<String>,
    },
    /// Not a TLS ClientHello, and no more bytes can make it one: why.
    NotTls(String),
    /// No complete ClientHello within the first [`MAX_HELLO`] bytes.
    TooLarge,
}

impl Peek {
    /// Whether this is an answer (more bytes change nothing).
    pub fn is_final(&self) -> bool {
        !matches!(self, Peek::NeedMore)
    }
}

/// Parses a ClientHello from bytes fed as they arrive; each call to
/// [`HelloParser::feed`] passes only the bytes that are new. Once it has
/// answered anything but [`Peek::NeedMore`], it keeps that answer.
pub struct HelloParser {
    /// `None` once answered.
    acceptor: Option<Acceptor>,
    /// Bytes given to the acceptor so far (at most [`MAX_HELLO`]).
    fed: usize,
    answer: Peek,
}

impl Default for HelloParser {
    fn default() -> Self {
        HelloParser::new()
    }
}

impl fmt::Debug for HelloParser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HelloParser")
            .field("fed", &self.fed)
            .field("answer", &self.answer)
            .finish()
    }
}

impl HelloParser {
    /// A parser that has seen nothing yet.
    pub fn new() -> HelloParser {
        HelloParser {
            acceptor: Some(Acceptor::default()),
            fed: 0,
            answer: Peek::NeedMore,
        }
    }

    /// The answer so far, after `more` bytes follow the ones fed before.
    /// Bytes past the first [`MAX_HELLO`] are not looked at.
    pub fn feed(&mut self, more: &[u8]) -> Peek {
        if let Some(mut acceptor) = self.acceptor.take() {
            self.answer = self.read(&mut acceptor, more);
            if !self.answer.is_final() {
                self.acceptor = Some(acceptor);
            }
        }
        self.answer.clone()
    }

    fn read(&mut self, acceptor: &mut Acceptor, more: &[u8]) -> Peek {
        let mut rest = &more[..more.len().min(MAX_HELLO - self.fed)];
        if self.fed == 0 {
            // Every ClientHello starts with a handshake record; anything
            // else is refused on its first byte, with a hint of what it is.
            if let Some(&first) = rest.first() {
                if first != 0x16 {
                    return Peek::NotTls(not_a_record(rest));
                }
            }
        }
        while !rest.is_empty() {
            let before = rest.len();
            if let Err(e) = acceptor.read_tls(&mut rest) {
                return Peek::NotTls(format!("not a TLS ClientHello: {e}"));
            }
            if rest.len() == before {
                // rustls takes no more bytes; never loop on that.
                return Peek::NotTls("not a TLS ClientHello: rustls reads no further".into());
            }
            self.fed += before - rest.len();
            // Ask after every read: rustls reads at most 4 KiB at a time
            // and buffers what it has not handled, so handling the hello
            // as soon as it is complete keeps its buffer small.
            match acceptor.accept() {
                Ok(None) => {}
                Ok(Some(accepted)) => {
                    return Peek::Hello {
                        server_name: accepted.client_hello().server_name().and_then(normalize),
                    }
                }
                Err((e, _alert)) => return Peek::NotTls(format!("not a TLS ClientHello: {e}")),
            }
        }
        if self.fed >= MAX_HELLO {
            Peek::TooLarge
        } else {
            Peek::NeedMore
        }
    }
}

/// A server name as routes compare it: rustls gives it lowercase, but
/// with the trailing dot of a fully qualified name if the client sent one
/// (RFC 6066 says not to; some clients do), which is dropped here so that
/// `a.example.` reaches the route for `a.example`.
fn normalize(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    (!name.is_empty()).then(|| name.to_string())
}

/// Why a connection's first bytes, starting with a byte other than a
/// handshake record's 0x16, are not TLS, naming what they look like.
fn not_a_record(bytes: &[u8]) -> String {
    let shown: String = bytes
        .iter()
        .take(16)
        .map(|&b| match b {
            b' '..=b'~' => char::from(b).to_string(),
            _ => format!("\\x{b:02x}"),
        })
        .collect();
    let looks = match bytes[0] {
        b'A'..=b'Z' | b'a'..=b'z' => " (text; plain HTTP or another clear-text protocol?)",
        0x80..=0xff => " (an SSL 2 hello? SSL 2 is not supported)",
        _ => "",
    };
    format!(
        "not TLS: the first byte is 0x{:02x}, not a TLS handshake record (0x16); \
         it starts with \"{shown}\"{looks}",
        bytes[0]
    )
}

/// What `bytes` — everything read from a connection so far — are: the
/// one-call form of [`HelloParser`].
pub fn peek(bytes: &[u8]) -> Peek {
    HelloParser::new().feed(bytes)
}

/// A ClientHello read from a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Every byte read, the hello and anything the client sent after it
    /// in the same reads: replay them to whoever handles the connection.
    pub bytes: Vec<u8>,
    /// The server name asked for; see [`Peek::Hello`].
    pub server_name: Option<String>,
}

/// Why no ClientHello could be read.
#[derive(Debug)]
pub enum HelloError {
    /// The timeout passed before a complete hello.
    Timeout {
        /// The timeout.
        after: Duration,
        /// Bytes received by then.
        received: usize,
    },
    /// The client closed the connection before a complete hello.
    Closed {
        /// Bytes received before.
        received: usize,
    },
    /// The bytes are not a TLS ClientHello: why.
    NotTls(String),
    /// No complete hello within [`MAX_HELLO`] bytes.
    TooLarge,
    /// Reading failed.
    Io(io::Error),
}

impl fmt::Display for HelloError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HelloError::Timeout { after, received } => write!(
                f,
                "no complete TLS ClientHello within {after:?} ({received} bytes received)"
            ),
            HelloError::Closed { received: 0 } => {
                write!(
                    f,
                    "the client closed the connection before sending anything"
                )
            }
            HelloError::Closed { received } => write!(
                f,
                "the client closed the connection after {received} bytes, \
                 before a complete TLS ClientHello"
            ),
            HelloError::NotTls(reason) => f.write_str(reason),
            HelloError::TooLarge => write!(
                f,
                "no complete TLS ClientHello within {MAX_HELLO} bytes; larger hellos are refused"
            ),
            HelloError::Io(e) => write!(f, "reading the TLS ClientHello failed: {e}"),
        }
    }
}

impl std::error::Error for HelloError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HelloError::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// The most read at once; the first read usually holds the whole hello.
const READ_CHUNK: usize = 4096;

/// Reads a ClientHello from the start of `stream`, within `timeout` for
/// the whole of it, reading no more than [`MAX_HELLO`] bytes.
pub async fn read_client_hello<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Result<Hello, HelloError> {
    let mut bytes = Vec::new();
    // How much of `bytes` holds what was read: a read cut short by the
    // timeout leaves its zeroed space behind.
    let mut received = 0;
    let read = async {
        let mut parser = HelloParser::new();
        loop {
            let start = received;
            let chunk = READ_CHUNK.min(MAX_HELLO - start);
            bytes.resize(start + chunk, 0);
            let n = stream.read(&mut bytes[start..]).await;
            let n = n.map_err(HelloError::Io)?;
            received += n;
            bytes.truncate(received);
            if n == 0 {
                return Err(HelloError::Closed { received: start });
            }
            match parser.feed(&bytes[start..]) {
                Peek::NeedMore => {}
                Peek::Hello { server_name } => return Ok(server_name),
                Peek::NotTls(reason) => return Err(HelloError::NotTls(reason)),
                Peek::TooLarge => return Err(HelloError::TooLarge),
            }
        }
    };
    let answer = tokio::time::timeout(timeout, read).await;
    bytes.truncate(received);
    match answer {
        Ok(Ok(server_name)) => Ok(Hello { bytes, server_name }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(HelloError::Timeout {
            after: timeout,
            received,
        }),
    }
}

pin_project! {
    /// A stream that reads `prefix` first, then from the stream inside;
    /// writes go straight to the stream inside. A TLS server handed
    /// `Prefixed::new(hello.bytes, socket)` sees the connection as if the
    /// hello had never been read. The prefix is freed once read.
    #[derive(Debug)]
    pub struct Prefixed<S> {
        prefix: Vec<u8>,
        // How much of `prefix` has been read.
        offset: usize,
        #[pin]
        inner: S,
    }
}

impl<S> Prefixed<S> {
    /// `inner`, with `prefix` read before it.
    pub fn new(prefix: Vec<u8>, inner: S) -> Prefixed<S> {
        Prefixed {
            prefix,
            offset: 0,
            inner,
        }
    }

    /// The stream inside.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The stream inside. Reading from it directly skips what is left of
    /// the prefix.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The part of the prefix not read yet, and the stream inside.
    pub fn into_parts(mut self) -> (Vec<u8>, S) {
        self.prefix.drain(..self.offset);
        (self.prefix, self.inner)
    }
}

impl<S: AsyncRead> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if *this.offset < this.prefix.len() {
            let left = &this.prefix[*this.offset..];
            let n = left.len().min(buf.remaining());
            buf.put_slice(&left[..n]);
            *this.offset += n;
            if *this.offset == this.prefix.len() {
                // Replayed: give the memory back (idle connections stay small).
                *this.prefix = Vec::new();
                *this.offset = 0;
            }
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_read(cx, buf)
    }
}

impl<S: AsyncWrite> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Arc;
    use std::time::Instant;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig};
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    fn client_config(roots: RootCertStore) -> Arc<ClientConfig> {
        Arc::new(
            ClientConfig::builder_with_provider(crate::tls::provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }

    /// The first flight a rustls client sends to `name`: its ClientHello.
    fn client_hello(name: &str) -> Vec<u8> {
        let name = ServerName::try_from(name.to_string()).unwrap();
        let mut client =
            ClientConnection::new(client_config(RootCertStore::empty()), name).unwrap();
        let mut hello = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut hello).unwrap();
        }
        hello
    }

    fn named(name: &str) -> Peek {
        Peek::Hello {
            server_name: Some(name.to_string()),
        }
    }

    #[test]
    fn a_rustls_hello_gives_its_server_name() {
        let hello = client_hello("a.example");
        assert_eq!(hello[0], 0x16);
        assert_eq!(peek(&hello), named("a.example"));
        // Names are compared lowercase.
        assert_eq!(peek(&client_hello("A.Example")), named("a.example"));
    }

    #[test]
    fn a_trailing_dot_is_dropped_from_the_server_name() {
        // rustls clients drop it themselves; put one back in place of a
        // letter, so no length changes.
        let mut hello = client_hello("aa.example");
        let at = hello.windows(10).position(|w| w == b"aa.example").unwrap();
        hello[at..at + 10].copy_from_slice(b"a.example.");
        assert_eq!(peek(&hello), named("a.example"));
    }

    #[test]
    fn an_ip_address_sends_no_server_name() {
        for ip in ["192.0.2.7", "::1"] {
            assert_eq!(
                peek(&client_hello(ip)),
                Peek::Hello { server_name: None },
                "{ip}"
            );
        }
    }

    #[test]
    fn every_prefix_needs_more_and_one_byte_at_a_time_works() {
        let hello = client_hello("a.example");
        for end in 0..hello.len() {
            assert_eq!(peek(&hello[..end]), Peek::NeedMore, "{end} bytes");
        }
        let mut parser = HelloParser::new();
        let (last, most) = hello.split_last().unwrap();
        for byte in most {
            assert_eq!(parser.feed(std::slice::from_ref(byte)), Peek::NeedMore);
        }
        assert_eq!(parser.feed(&[*last]), named("a.example"));
        // The answer stays.
        assert_eq!(parser.feed(b"more"), named("a.example"));
    }

    #[test]
    fn bytes_after_the_hello_do_not_matter() {
        let mut bytes = client_hello("a.example");
        bytes.extend(b"\x17\x03\x03\x00\x05early");
        assert_eq!(peek(&bytes), named("a.example"));
        bytes.resize(MAX_HELLO * 2, 0xaa);
        assert_eq!(peek(&bytes), named("a.example"));
    }

    #[test]
    fn plain_text_is_refused_on_its_first_byte() {
        let Peek::NotTls(reason) = peek(b"GET / HTTP/1.1\r\n") else {
            panic!("HTTP taken for TLS");
        };
        assert!(reason.contains("0x47"), "{reason}");
        assert!(reason.contains("GET / HTTP/1.1\\x0d\\x0a"), "{reason}");
        assert!(reason.contains("plain HTTP"), "{reason}");
        assert!(matches!(peek(b"G"), Peek::NotTls(_)));
        assert_eq!(peek(b""), Peek::NeedMore);
    }

    #[test]
    fn broken_hellos_are_refused_with_rustls_reason() {
        // A handshake record holding a ServerHello (2), not a ClientHello.
        let Peek::NotTls(reason) = peek(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00") else {
            panic!("a ServerHello taken for a ClientHello");
        };
        assert!(reason.starts_with("not a TLS ClientHello: "), "{reason}");
        // A record too long for TLS is refused from its header.
        assert!(matches!(peek(b"\x16\x03\x01\xff\xff"), Peek::NotTls(_)));
        // A hello whose body is cut short inside its own length.
        let mut hello = client_hello("a.example");
        hello[8] = hello[8].wrapping_sub(1);
        assert!(
            matches!(peek(&hello), Peek::NotTls(_)),
            "{:?}",
            peek(&hello)
        );
    }

    /// A handshake record of a full 16 KiB starting a ClientHello that
    /// says it is 64 KiB long.
    fn endless_hello() -> Vec<u8> {
        let mut bytes = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0xff, 0xff];
        bytes.resize(MAX_HELLO, 0);
        bytes.extend([0x16, 0x03, 0x01, 0x40, 0x00]);
        bytes.resize(MAX_HELLO + 1000, 0);
        bytes
    }

    #[test]
    fn a_hello_over_the_limit_is_refused() {
        let bytes = endless_hello();
        assert_eq!(peek(&bytes[..MAX_HELLO - 1]), Peek::NeedMore);
        assert_eq!(peek(&bytes[..MAX_HELLO]), Peek::TooLarge);
        assert_eq!(peek(&bytes), Peek::TooLarge);
        let mut parser = HelloParser::new();
        assert_eq!(parser.feed(&bytes[..100]), Peek::NeedMore);
        assert_eq!(parser.feed(&bytes[100..]), Peek::TooLarge);
    }

    #[tokio::test]
    async fn read_client_hello_reads_the_hello_and_keeps_the_bytes() {
        let hello = client_hello("a.example");
        let (mut client, mut server) = tokio::io::duplex(64);
        let sent = hello.clone();
        let writer = tokio::spawn(async move {
            // In pieces, as a network might deliver it.
            for piece in sent.chunks(100) {
                client.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            client
        });
        let got = read_client_hello(&mut server, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(got.server_name.as_deref(), Some("a.example"));
        assert_eq!(got.bytes, hello);
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn read_client_hello_refuses_plain_text_at_once() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let start = Instant::now();
        // The client stays connected; the answer must not wait for more.
        let e = read_client_hello(&mut server, Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(matches!(e, HelloError::NotTls(_)), "{e}");
        assert!(start.elapsed() < Duration::from_secs(2));
        assert!(
            e.to_string().starts_with("not TLS: the first byte is 0x47"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn read_client_hello_gives_up_on_time_on_close_and_on_size() {
        let hello = client_hello("a.example");

        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(&hello[..10]).await.unwrap();
        let start = Instant::now();
        let e = read_client_hello(&mut server, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(start.elapsed() >= Duration::from_millis(100));
        assert!(
            matches!(e, HelloError::Timeout { received: 10, .. }),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "no complete TLS ClientHello within 100ms (10 bytes received)"
        );

        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(&hello[..10]).await.unwrap();
        drop(client);
        let e = read_client_hello(&mut server, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, HelloError::Closed { received: 10 }), "{e:?}");

        let (client, mut server) = tokio::io::duplex(64);
        drop(client);
        let e = read_client_hello(&mut server, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "the client closed the connection before sending anything"
        );

        let (mut client, mut server) = tokio::io::duplex(4096);
        let writer = tokio::spawn(async move {
            // Writes until the reader stops reading and drops its end.
            let _ = client.write_all(&endless_hello()).await;
        });
        let e = read_client_hello(&mut server, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, HelloError::TooLarge), "{e:?}");
        assert!(e.to_string().contains("16389 bytes"), "{e}");
        drop(server);
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn prefixed_replays_then_reads_on_and_writes_through() {
        let (mut peer, inner) = tokio::io::duplex(64);
        let mut stream = Prefixed::new(b"hello ".to_vec(), inner);
        peer.write_all(b"world").await.unwrap();
        drop(peer.shutdown().await);

        // A small buffer first: the prefix comes out in pieces.
        let mut first = [0u8; 4];
        stream.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"hell");
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"o world");
        // Replayed: the prefix is gone.
        assert_eq!(stream.prefix.capacity(), 0);

        stream.write_all(b"back").await.unwrap();
        stream.flush().await.unwrap();
        stream.shutdown().await.unwrap();
        let mut back = Vec::new();
        peer.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"back");

        let (_peer, inner) = tokio::io::duplex(64);
        let mut stream = Prefixed::new(b"abcdef".to_vec(), inner);
        let mut two = [0u8; 2];
        stream.read_exact(&mut two).await.unwrap();
        let (left, _inner) = stream.into_parts();
        assert_eq!(left, b"cdef");
    }

    #[tokio::test]
    async fn a_tls_server_handshakes_through_prefixed_after_the_hello_was_read() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.example".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der: CertificateDer<'static> = cert.der().clone();
        let server_config = ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![der.clone()],
                PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let hello = read_client_hello(&mut socket, Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(hello.server_name.as_deref(), Some("a.example"));
            let mut tls = acceptor
                .accept(Prefixed::new(hello.bytes, socket))
                .await
                .unwrap();
            assert_eq!(tls.get_ref().1.server_name(), Some("a.example"));
            let mut line = [0u8; 4];
            tls.read_exact(&mut line).await.unwrap();
            tls.write_all(&line.map(|b| b.to_ascii_uppercase()))
                .await
                .unwrap();
            tls.shutdown().await.unwrap();
            // The hello's buffer is gone once the handshake read it.
            assert_eq!(tls.get_ref().0.prefix.capacity(), 0);
        });

        let mut roots = RootCertStore::empty();
        roots.add(der).unwrap();
        let connector = tokio_rustls::TlsConnector::from(client_config(roots));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("a.example").unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        tls.write_all(b"ping").await.unwrap();
        let mut answer = Vec::new();
        tls.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"PING");
        server.await.unwrap();
    }

    #[test]
    fn the_alert_refuses_a_rustls_client_with_unrecognized_name() {
        let name = ServerName::try_from("b.example").unwrap();
        let mut client =
            ClientConnection::new(client_config(RootCertStore::empty()), name).unwrap();
        let mut hello = Vec::new();
        client.write_tls(&mut hello).unwrap();
        client.read_tls(&mut &UNRECOGNIZED_NAME_ALERT[..]).unwrap();
        let e = client.process_new_packets().unwrap_err();
        assert_eq!(
            e,
            rustls::Error::AlertReceived(rustls::AlertDescription::UnrecognisedName)
        );
    }
}
