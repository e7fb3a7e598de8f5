//! The PROXY protocol (HAProxy's specification, version 1 text and
//! version 2 binary), so a server behind a balancer still sees its clients
//! and a tunnel can tell its targets who connected.
//!
//! A header is written with [`header`] before any other byte of a
//! connection. On the accepting side, [`read_header`] reads one from the
//! start of a socket: bounded in time (the caller's timeout covers the
//! whole header) and in size ([`MAX_V1`], [`MAX_V2`]), and never a byte
//! past it, so the service gets every byte the client sent after the
//! header. The bytes are parsed by the `ppp` crate; [`parse`] only frames
//! them (how many bytes, whether more can help) and says what they carry.
//!
//! [`sends_header`] is for connections from sources that are not trusted
//! to send one: it looks at the first bytes the client sent, without
//! taking them, to refuse a header rather than hand it to the service.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use ppp::v2;
use ppp::PartialResult;
use tokio::net::TcpStream;

/// The longest version 1 header, `\r\n` included (the specification's
/// bound: a TCP6 line with the longest addresses and ports).
pub const MAX_V1: usize = 107;

/// The longest version 2 header taken: the 16 fixed bytes and up to 4 KiB
/// of addresses and TLVs. Balancers send a few dozen bytes of TLVs (a
/// connection id, a TLS summary); the 64 KiB the length field allows is no
/// header anyone means, and would be held in memory per connection.
pub const MAX_V2: usize = 16 + 4096;

/// The 12 bytes every version 2 header starts with.
pub const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// What every version 1 header starts with.
pub const V1_PREFIX: &[u8; 6] = b"PROXY ";

/// Which version of the protocol to send.
/// Written `v1` or `v2` in settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// The text header: `PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n`.
    V1,
    /// The binary header, which every current balancer and server reads.
    V2,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        })
    }
}

impl FromStr for Version {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "v1" | "1" => Ok(Version::V1),
            "v2" | "2" => Ok(Version::V2),
            other => Err(format!(
                "{other:?} is not a PROXY protocol version; write v1 (text) or v2 (binary)"
            )),
        }
    }
}

/// What a header says of its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carried {
    /// A proxied TCP connection: the client's address, and the address it
    /// connected to (IPv4-mapped IPv6 addresses are given as IPv4).
    Tcp {
        /// The client.
        source: SocketAddr,
        /// Where the client connected.
        destination: SocketAddr,
    },
    /// No client address: a LOCAL header (the proxy's own connection, such
    /// as a health check), or a version 1 `UNKNOWN` or version 2 header of
    /// an unspecified or UNIX family. The connection's own addresses stand.
    Local,
}

/// The header for a TCP connection from `client` to `destination` (the
/// address the client reached). When one address is IPv4 and the other
/// IPv6, both are given as IPv6 (the IPv4 one mapped), as HAProxy does.
pub fn header(version: Version, client: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (source, destination) = same_family(client, destination);
    match version {
        Version::V1 => {
            let addresses = match (source, destination) {
                (SocketAddr::V4(s), SocketAddr::V4(d)) => {
                    ppp::v1::Addresses::new_tcp4(*s.ip(), *d.ip(), s.port(), d.port())
                }
                (s, d) => ppp::v1::Addresses::new_tcp6(v6(s.ip()), v6(d.ip()), s.port(), d.port()),
            };
            addresses.to_string().into_bytes()
        }
        Version::V2 => v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Stream,
            (source, destination),
        )
        .build()
        // Twelve or 36 bytes of addresses always fit the length field.
        .expect("a TCP header fits"),
    }
}

/// A header that carries no client: version 2 LOCAL, or version 1
/// `UNKNOWN`. What a proxy sends on a connection of its own (a health
/// check), so the server keeps the connection's own addresses.
pub fn local_header(version: Version) -> Vec<u8> {
    match version {
        Version::V1 => ppp::v1::Addresses::Unknown.to_string().into_bytes(),
        Version::V2 => v2::Builder::new(
            v2::Version::Two | v2::Command::Local,
            v2::AddressFamily::Unspecified | v2::Protocol::Unspecified,
        )
        .build()
        .expect("an empty header fits"),
    }
}

fn v6(ip: std::net::IpAddr) -> std::net::Ipv6Addr {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        std::net::IpAddr::V6(v6) => v6,
    }
}

/// Both addresses in one family: IPv4 when both are (IPv4-mapped IPv6
/// counts as IPv4), else IPv6.
fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    let (a, b) = (canonical(a), canonical(b));
    if a.is_ipv4() == b.is_ipv4() {
        return (a, b);
    }
    let mapped = |s: SocketAddr| SocketAddr::new(v6(s.ip()).into(), s.port());
    (mapped(a), mapped(b))
}

fn canonical(s: SocketAddr) -> SocketAddr {
    SocketAddr::new(s.ip().to_canonical(), s.port())
}

/// What the bytes at the start of a connection are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// The start of a header: read more.
    NeedMore,
    /// A whole header, its first `len` bytes; what follows is the
    /// service's.
    Header {
        /// The header's length in bytes.
        len: usize,
        /// What it says.
        carried: Carried,
    },
    /// Not a header, and no more bytes can make it one: why.
    Invalid(String),
}

/// Frames and parses a header at the start of `bytes` (which may go on
/// past it). Never asks for more than [`MAX_V1`] bytes of a version 1
/// header or [`MAX_V2`] of a version 2 one.
pub fn parse(bytes: &[u8]) -> Parsed {
    match bytes.first() {
        None => Parsed::NeedMore,
        Some(b'\r') => parse_v2(bytes),
        Some(b'P') => parse_v1(bytes),
        Some(_) => Parsed::Invalid(format!(
            "no PROXY protocol header: the connection starts with {}, neither \"PROXY \" nor the version 2 signature",
            shown(bytes)
        )),
    }
}

fn parse_v2(bytes: &[u8]) -> Parsed {
    let seen = bytes.len().min(V2_SIGNATURE.len());
    if bytes[..seen] != V2_SIGNATURE[..seen] {
        return Parsed::Invalid(format!(
            "no PROXY protocol header: the connection starts with {}, not the version 2 signature",
            shown(bytes)
        ));
    }
    if bytes.len() < 16 {
        return Parsed::NeedMore;
    }
    let len = 16 + usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    if len > MAX_V2 {
        return Parsed::Invalid(format!(
            "a PROXY v2 header of {len} bytes, more than the {MAX_V2} taken"
        ));
    }
    let header = match v2::Header::try_from(&bytes[..bytes.len().min(len)]) {
        Ok(header) => header,
        Err(e) if e.is_incomplete() => return Parsed::NeedMore,
        Err(e) => return Parsed::Invalid(format!("a malformed PROXY v2 header: {e}")),
    };
    let carried = match (header.command, header.addresses) {
        (v2::Command::Local, _) => Carried::Local,
        (_, v2::Addresses::IPv4(a)) if header.protocol == v2::Protocol::Stream => Carried::Tcp {
            source: SocketAddr::from((a.source_address, a.source_port)),
            destination: SocketAddr::from((a.destination_address, a.destination_port)),
        },
        (_, v2::Addresses::IPv6(a)) if header.protocol == v2::Protocol::Stream => Carried::Tcp {
            source: canonical(SocketAddr::from((a.source_address, a.source_port))),
            destination: canonical(SocketAddr::from((
                a.destination_address,
                a.destination_port,
            ))),
        },
        (_, v2::Addresses::IPv4(_) | v2::Addresses::IPv6(_))
            if header.protocol == v2::Protocol::Datagram =>
        {
            return Parsed::Invalid("a PROXY v2 header for a UDP client on a TCP connection".into())
        }
        // The specification's unspecified family or transport, and UNIX
        // sockets: the connection's own addresses stand.
        _ => Carried::Local,
    };
    Parsed::Header { len, carried }
}

fn parse_v1(bytes: &[u8]) -> Parsed {
    let window = &bytes[..bytes.len().min(MAX_V1)];
    let seen = window.len().min(V1_PREFIX.len());
    if window[..seen] != V1_PREFIX[..seen] {
        return Parsed::Invalid(format!(
            "no PROXY protocol header: the connection starts with {}, not \"PROXY \"",
            shown(bytes)
        ));
    }
    // The line ends at the first CR, which must be followed by LF; a bare
    // LF before it is no line end a header may have.
    let cr = window.iter().position(|&b| b == b'\r');
    let line = &window[..cr.unwrap_or(window.len())];
    if line.contains(&b'\n') {
        return Parsed::Invalid(
            "a malformed PROXY v1 header: a line feed without a carriage return before it".into(),
        );
    }
    // Only a whole line is parsed: its fields can be judged only once
    // they end (`1` may be the start of `1234`).
    if cr.is_none_or(|at| at + 1 >= window.len()) {
        return if window.len() == MAX_V1 {
            Parsed::Invalid(format!(
                "a PROXY v1 header without its line end within {MAX_V1} bytes"
            ))
        } else {
            Parsed::NeedMore
        };
    }
    let header = match ppp::v1::Header::try_from(window) {
        Ok(header) => header,
        Err(e) => return Parsed::Invalid(format!("a malformed PROXY v1 header: {e}")),
    };
    let carried = match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => Carried::Tcp {
            source: SocketAddr::from((a.source_address, a.source_port)),
            destination: SocketAddr::from((a.destination_address, a.destination_port)),
        },
        ppp::v1::Addresses::Tcp6(a) => Carried::Tcp {
            source: canonical(SocketAddr::from((a.source_address, a.source_port))),
            destination: canonical(SocketAddr::from((
                a.destination_address,
                a.destination_port,
            ))),
        },
        ppp::v1::Addresses::Unknown => Carried::Local,
    };
    Parsed::Header {
        len: header.header.len(),
        carried,
    }
}

/// The first bytes of a connection as a log line shows them: printable
/// ASCII as it is, the rest escaped, at most 16 bytes.
fn shown(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(16)];
    let mut text = String::from("\"");
    text.extend(
        head.iter()
            .flat_map(|&b| std::ascii::escape_default(b).map(char::from)),
    );
    text.push('"');
    if bytes.len() > head.len() {
        text.push_str("...");
    }
    text
}

/// Whether `bytes`, the first a client sent, begin a PROXY protocol
/// header: `Some(true)` for the version 1 prefix or the version 2
/// signature, `Some(false)` when they cannot, `None` while they are a
/// beginning of one of them and more bytes will tell.
pub fn looks_like_header(bytes: &[u8]) -> Option<bool> {
    if bytes.is_empty() {
        return None;
    }
    let mut undecided = false;
    for signature in [&V1_PREFIX[..], &V2_SIGNATURE[..]] {
        if bytes.len() >= signature.len() {
            if bytes.starts_with(signature) {
                return Some(true);
            }
        } else if signature.starts_with(bytes) {
            undecided = true;
        }
    }
    if undecided {
        None
    } else {
        Some(false)
    }
}

/// Why no header could be read.
#[derive(Debug)]
pub enum HeaderError {
    /// The client closed the connection after `received` bytes, before
    /// the header was whole (0: a port probe or a health check).
    Closed {
        /// Bytes of header received.
        received: usize,
    },
    /// No whole header within the time allowed.
    Timeout {
        /// The time allowed.
        after: Duration,
        /// Bytes of header received by then.
        received: usize,
    },
    /// Bytes that are no header.
    Invalid(String),
    /// A header from a source not trusted to send one.
    Untrusted,
    /// The socket failed.
    Io(io::Error),
}

impl HeaderError {
    /// Whether the client sent nothing at all and went: no more than a
    /// port probe or a health check, not worth a log line at info level.
    pub fn is_silent(&self) -> bool {
        matches!(self, HeaderError::Closed { received: 0 })
    }

    /// A short label for metrics: `closed`, `timeout`, `malformed`,
    /// `untrusted`, `error`.
    pub fn reason(&self) -> &'static str {
        match self {
            HeaderError::Closed { .. } => "closed",
            HeaderError::Timeout { .. } => "timeout",
            HeaderError::Invalid(_) => "malformed",
            HeaderError::Untrusted => "untrusted",
            HeaderError::Io(_) => "error",
        }
    }
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::Closed { received: 0 } => {
                f.write_str("closed before sending its PROXY header")
            }
            HeaderError::Closed { received } => write!(
                f,
                "closed after {received} bytes of an incomplete PROXY header"
            ),
            HeaderError::Timeout { after, received: 0 } => {
                write!(f, "no PROXY header within {after:?}")
            }
            HeaderError::Timeout { after, received } => write!(
                f,
                "an incomplete PROXY header ({received} bytes) after {after:?}"
            ),
            HeaderError::Invalid(why) => f.write_str(why),
            HeaderError::Untrusted => f.write_str(
                "a PROXY header from a source not in accept_proxy; if it is a balancer, add its address to accept_proxy",
            ),
            HeaderError::Io(e) => write!(f, "reading the PROXY header: {e}"),
        }
    }
}

impl std::error::Error for HeaderError {}

/// Reads a header from the start of `stream` within `timeout`, and not a
/// byte more: every byte after the header stays in the socket for the
/// service.
///
/// The bytes are looked at with `MSG_PEEK` and taken only once known to
/// be header: all of them while they are the start of one, and exactly
/// the header's length once it is whole. Each wait for more bytes takes
/// the ones already seen first, so a slow sender is waited for, never
/// spun on.
pub async fn read_header(stream: &TcpStream, timeout: Duration) -> Result<Carried, HeaderError> {
    let mut taken = Vec::new();
    match tokio::time::timeout(timeout, read_into(stream, &mut taken)).await {
        Ok(result) => result,
        Err(_) => Err(HeaderError::Timeout {
            after: timeout,
            received: taken.len(),
        }),
    }
}

async fn read_into(stream: &TcpStream, taken: &mut Vec<u8>) -> Result<Carried, HeaderError> {
    let mut window = [0u8; 512];
    loop {
        let room = window.len().min(MAX_V2 - taken.len());
        let n = stream
            .peek(&mut window[..room])
            .await
            .map_err(HeaderError::Io)?;
        if n == 0 {
            return Err(HeaderError::Closed {
                received: taken.len(),
            });
        }
        let before = taken.len();
        taken.extend_from_slice(&window[..n]);
        match parse(taken) {
            Parsed::NeedMore => {
                // All of it is header: take it from the socket.
                take(stream, n).await?;
            }
            Parsed::Header { len, carried } => {
                take(stream, len - before).await?;
                taken.truncate(len);
                return Ok(carried);
            }
            Parsed::Invalid(why) => return Err(HeaderError::Invalid(why)),
        }
    }
}

/// Takes `n` bytes already seen (peeked) from the socket.
async fn take(stream: &TcpStream, mut n: usize) -> Result<(), HeaderError> {
    let mut sink = [0u8; 512];
    // `&TcpStream` reads through `readable` and `try_read`.
    while n > 0 {
        stream.readable().await.map_err(HeaderError::Io)?;
        match stream.try_read(&mut sink[..n.min(512)]) {
            Ok(0) => return Err(HeaderError::Closed { received: 0 }),
            Ok(read) => n -= read,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(HeaderError::Io(e)),
        }
    }
    Ok(())
}

/// How long a connection from a source not in `accept_proxy` is watched
/// for a PROXY header before the service gets it, when the client has
/// sent nothing yet. A balancer sends its header at once; a client that
/// waits for the server to speak first (a greeting) waits this much more.
pub const UNTRUSTED_WATCH: Duration = Duration::from_millis(50);

/// Whether the client on `stream` starts with a PROXY protocol header,
/// looked at (not taken) as soon as it has sent enough to tell, for at
/// most `within`: a client that sends nothing in that time (one that
/// waits for the server to speak first) does not.
pub async fn sends_header(stream: &TcpStream, within: Duration) -> io::Result<bool> {
    let deadline = tokio::time::Instant::now() + within;
    let mut first = [0u8; V2_SIGNATURE.len()];
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
            Err(_) => return Ok(false),
            Ok(peeked) => peeked?,
        };
        if n == 0 {
            return Ok(false);
        }
        if let Some(answer) = looks_like_header(&first[..n]) {
            return Ok(answer);
        }
        // The beginning of a signature: the bytes seen stay readable, so
        // look again shortly rather than spin on them.
        if tokio::time::timeout_at(deadline, tokio::time::sleep(Duration::from_millis(5)))
            .await
            .is_err()
        {
            return Ok(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn header_of(bytes: &[u8]) -> (usize, Carried) {
        match parse(bytes) {
            Parsed::Header { len, carried } => (len, carried),
            other => panic!("{other:?} for {bytes:?}"),
        }
    }

    fn invalid(bytes: &[u8]) -> String {
        match parse(bytes) {
            Parsed::Invalid(why) => why,
            other => panic!("{other:?} for {bytes:?}"),
        }
    }

    #[test]
    fn headers_round_trip_in_both_versions_and_families() {
        for (client, dest) in [
            ("203.0.113.7:51234", "10.0.0.1:443"),
            ("[2001:db8::7]:51234", "[2001:db8::1]:443"),
            ("0.0.0.0:0", "255.255.255.255:65535"),
        ] {
            let (client, dest) = (addr(client), addr(dest));
            for version in [Version::V1, Version::V2] {
                let mut bytes = header(version, client, dest);
                let len = bytes.len();
                bytes.extend_from_slice(b"service bytes");
                assert_eq!(
                    header_of(&bytes),
                    (
                        len,
                        Carried::Tcp {
                            source: client,
                            destination: dest
                        }
                    ),
                    "{version}"
                );
            }
        }
        assert_eq!(
            header(Version::V1, addr("203.0.113.7:51234"), addr("10.0.0.1:443")),
            b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n"
        );
        let v2 = header(Version::V2, addr("127.0.0.2:1"), addr("127.0.0.1:2"));
        assert_eq!(&v2[..12], V2_SIGNATURE);
        assert_eq!(&v2[12..16], [0x21, 0x11, 0, 12]);
        assert_eq!(v2.len(), 28);
    }

    #[test]
    fn mixed_families_are_sent_as_ipv6_and_mapped_ones_read_as_ipv4() {
        let (client, dest) = (addr("192.0.2.9:5000"), addr("[2001:db8::1]:443"));
        let v1 = header(Version::V1, client, dest);
        assert_eq!(
            String::from_utf8(v1.clone()).unwrap(),
            "PROXY TCP6 ::ffff:192.0.2.9 2001:db8::1 5000 443\r\n"
        );
        for bytes in [v1, header(Version::V2, client, dest)] {
            // The mapped client comes back as the IPv4 address it is.
            assert_eq!(
                header_of(&bytes).1,
                Carried::Tcp {
                    source: client,
                    destination: dest
                }
            );
        }
        // A dual-stack listener's mapped addresses are sent as IPv4.
        let v1 = header(
            Version::V1,
            addr("[::ffff:192.0.2.9]:5000"),
            addr("[::ffff:192.0.2.1]:443"),
        );
        assert!(v1.starts_with(b"PROXY TCP4 192.0.2.9 192.0.2.1 "));
    }

    #[test]
    fn local_headers_carry_no_client() {
        for version in [Version::V1, Version::V2] {
            let mut bytes = local_header(version);
            let len = bytes.len();
            bytes.push(b'x');
            assert_eq!(header_of(&bytes), (len, Carried::Local), "{version}");
        }
        assert_eq!(local_header(Version::V1), b"PROXY UNKNOWN\r\n");
        assert_eq!(local_header(Version::V2).len(), 16);
        // v1 UNKNOWN may carry addresses, which are ignored.
        let (len, carried) = header_of(b"PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\nabc");
        assert_eq!((len, carried), (35, Carried::Local));
        // v2 PROXY with the unspecified family, and UNIX sockets.
        let mut unspec = V2_SIGNATURE.to_vec();
        unspec.extend_from_slice(&[0x21, 0x00, 0, 0]);
        assert_eq!(header_of(&unspec), (16, Carried::Local));
        let mut unix = V2_SIGNATURE.to_vec();
        unix.extend_from_slice(&[0x21, 0x31, 0, 216]);
        unix.extend_from_slice(&[0u8; 216]);
        assert_eq!(header_of(&unix), (232, Carried::Local));
    }

    #[test]
    fn tlvs_are_skipped_and_counted_in_the_length() {
        let mut bytes = V2_SIGNATURE.to_vec();
        bytes.extend_from_slice(&[0x21, 0x11, 0, 12 + 7]);
        bytes.extend_from_slice(&[192, 0, 2, 1, 10, 0, 0, 1, 0x13, 0x88, 1, 187]);
        bytes.extend_from_slice(&[0x05, 0, 4, b'a', b'b', b'c', b'd']); // PP2_TYPE_UNIQUE_ID
        bytes.extend_from_slice(b"GET /");
        assert_eq!(
            header_of(&bytes),
            (
                35,
                Carried::Tcp {
                    source: addr("192.0.2.1:5000"),
                    destination: addr("10.0.0.1:443")
                }
            )
        );
    }

    #[test]
    fn every_prefix_of_a_header_asks_for_more() {
        let headers = [
            header(
                Version::V1,
                addr("[2001:db8::7]:1"),
                addr("[2001:db8::1]:2"),
            ),
            header(Version::V1, addr("1.2.3.4:1"), addr("5.6.7.8:2")),
            header(
                Version::V2,
                addr("[2001:db8::7]:1"),
                addr("[2001:db8::1]:2"),
            ),
            local_header(Version::V1),
            local_header(Version::V2),
        ];
        for bytes in headers {
            for cut in 0..bytes.len() {
                assert_eq!(
                    parse(&bytes[..cut]),
                    Parsed::NeedMore,
                    "{:?} cut at {cut}",
                    String::from_utf8_lossy(&bytes)
                );
            }
        }
    }

    #[test]
    fn every_malformed_shape_is_refused_with_a_reason() {
        let v2 = |tail: &[u8]| {
            let mut b = V2_SIGNATURE.to_vec();
            b.extend_from_slice(tail);
            b
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"GET / HTTP/1.1\r\n".to_vec(), "neither \"PROXY \""),
            (b"\x16\x03\x01".to_vec(), "neither"),
            (b"PROXX TCP4".to_vec(), "not \"PROXY \""),
            (b"\r\n\r\nxyz".to_vec(), "not the version 2 signature"),
            (
                b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
                "invalid protocol",
            ),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r".to_vec(), "end"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n".to_vec(), "port"),
            (b"PROXY TCP4 1.2.3.4\r\n".to_vec(), "missing"),
            (b"PROXY \r\n".to_vec(), "protocol"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n".to_vec(), "end"),
            (b"PROXY TCP4 ::1 ::1 1 2\r\n".to_vec(), "invalid IP address"),
            (
                b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n".to_vec(),
                "invalid IP address",
            ),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n".to_vec(), "port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n".to_vec(), "port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n".to_vec(), "line feed"),
            (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n".to_vec(), "invalid"),
            (b"PROXY \xff\xfe\r\n".to_vec(), "UTF-8"),
            (
                [&b"PROXY UNKNOWN "[..], &[b'a'; 100]].concat(),
                "within 107",
            ),
            (v2(&[0x11, 0x11, 0, 12]), "version"),
            (v2(&[0x23, 0x11, 0, 12]), "command"),
            (v2(&[0x21, 0x41, 0, 12]), "family"),
            (v2(&[0x21, 0x13, 0, 12]), "protocol"),
            (v2(&[0x21, 0x11, 0, 4, 1, 2, 3, 4]), "address"),
            (v2(&[0x21, 0x21, 0, 12]), "address"),
            (v2(&[0x21, 0x11, 0xff, 0xff]), "more than"),
            (
                v2(&[0x21, 0x12, 0, 12, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2]),
                "UDP",
            ),
        ];
        for (bytes, says) in cases {
            let why = invalid(&bytes);
            assert!(
                why.to_lowercase().contains(&says.to_lowercase()),
                "{:?}: {why}",
                String::from_utf8_lossy(&bytes)
            );
        }
        // Bytes the log shows are escaped and cut short.
        assert!(invalid(b"\x00\x01abc").contains(r#""\x00\x01abc""#));
        assert!(invalid(&[b'x'; 40]).contains("..."));
    }

    #[test]
    fn the_size_bounds_hold_exactly() {
        // The longest v1 line is taken...
        let longest = format!(
            "PROXY TCP6 {a} {a} 65535 65535\r\n",
            a = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        );
        assert_eq!(longest.len(), 104);
        assert_eq!(header_of(longest.as_bytes()).0, 104);
        let unknown = format!("PROXY UNKNOWN {}\r\n", "x".repeat(MAX_V1 - 16));
        assert_eq!(unknown.len(), MAX_V1);
        assert_eq!(header_of(unknown.as_bytes()), (MAX_V1, Carried::Local));
        // ...one byte more is not, whole or cut.
        let over = format!("PROXY UNKNOWN {}\r\n", "x".repeat(MAX_V1 - 15));
        invalid(over.as_bytes());
        invalid(&over.as_bytes()[..MAX_V1]);
        // The v2 cap: 4096 bytes of TLVs are taken, 4097 are not.
        let mut at_cap = V2_SIGNATURE.to_vec();
        at_cap.extend_from_slice(&[0x20, 0x00, 0x10, 0x00]);
        at_cap.extend_from_slice(&[0u8; 4096]);
        assert_eq!(header_of(&at_cap), (MAX_V2, Carried::Local));
        let mut over = V2_SIGNATURE.to_vec();
        over.extend_from_slice(&[0x20, 0x00, 0x10, 0x01]);
        assert!(invalid(&over).contains("more than"));
    }

    #[test]
    fn headers_are_told_apart_from_other_first_bytes() {
        assert_eq!(looks_like_header(b""), None);
        assert_eq!(looks_like_header(b"PRO"), None);
        assert_eq!(looks_like_header(b"PROXY"), None);
        assert_eq!(looks_like_header(b"PROXY "), Some(true));
        assert_eq!(looks_like_header(b"PROPFIND /"), Some(false));
        assert_eq!(looks_like_header(b"\r\n\r\n"), None);
        assert_eq!(looks_like_header(&V2_SIGNATURE[..]), Some(true));
        assert_eq!(looks_like_header(b"\r\n\r\nQUIT"), Some(false));
        assert_eq!(looks_like_header(b"hello"), Some(false));
    }

    #[test]
    fn versions_read_as_written() {
        assert_eq!("v2".parse::<Version>().unwrap(), Version::V2);
        assert_eq!(" V1 ".parse::<Version>().unwrap(), Version::V1);
        assert!("v3"
            .parse::<Version>()
            .unwrap_err()
            .contains("v1 (text) or v2"));
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn a_header_is_read_and_not_a_byte_more() {
        use tokio::io::AsyncWriteExt;
        for version in [Version::V1, Version::V2] {
            let (mut client, mut server) = pair().await;
            let (source, dest) = (addr("192.0.2.7:4000"), addr("10.1.1.1:80"));
            let mut bytes = header(version, source, dest);
            bytes.extend_from_slice(b"first bytes of the service");
            client.write_all(&bytes).await.unwrap();
            let carried = read_header(&server, Duration::from_secs(5)).await.unwrap();
            assert_eq!(
                carried,
                Carried::Tcp {
                    source,
                    destination: dest
                }
            );
            drop(client);
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await.unwrap();
            assert_eq!(rest, b"first bytes of the service", "{version}");
        }
    }

    #[tokio::test]
    async fn a_slow_header_is_waited_for_and_a_stalled_one_times_out() {
        use tokio::io::AsyncWriteExt;
        let (mut client, mut server) = pair().await;
        let bytes = header(Version::V1, addr("192.0.2.7:4000"), addr("10.1.1.1:80"));
        let writer = tokio::spawn(async move {
            for b in bytes {
                client.write_all(&[b]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            client.write_all(b"after").await.unwrap();
            client
        });
        let carried = read_header(&server, Duration::from_secs(5)).await.unwrap();
        assert!(matches!(carried, Carried::Tcp { .. }));
        drop(writer.await.unwrap());
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"after");

        let (mut client, server) = pair().await;
        client.write_all(b"PROXY TCP4 1.2.").await.unwrap();
        let started = std::time::Instant::now();
        let e = read_header(&server, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(
            matches!(e, HeaderError::Timeout { received: 15, .. }),
            "{e:?}"
        );
        assert!(
            e.to_string().contains("incomplete PROXY header (15 bytes)"),
            "{e}"
        );

        let (client, server) = pair().await;
        drop(client);
        let e = read_header(&server, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(e.is_silent(), "{e:?}");
    }

    #[tokio::test]
    async fn a_header_from_an_untrusted_client_is_seen_without_taking_it() {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = pair().await;
        client.write_all(b"PRO").await.unwrap();
        let later = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            client.write_all(b"XY TCP4 ").await.unwrap();
            client
        });
        assert!(sends_header(&server, Duration::from_secs(2)).await.unwrap());
        let _client = later.await.unwrap();
        let mut first = [0u8; 8];
        server.peek(&mut first).await.unwrap();
        assert_eq!(&first, b"PROXY TC", "nothing was taken");

        // A client that waits for the server to speak first.
        let (_client, server) = pair().await;
        let started = std::time::Instant::now();
        assert!(!sends_header(&server, Duration::from_millis(50))
            .await
            .unwrap());
        assert!(started.elapsed() < Duration::from_secs(1));
        let (mut client, server) = pair().await;
        client.write_all(b"hello").await.unwrap();
        assert!(!sends_header(&server, Duration::from_secs(2)).await.unwrap());
    }
}
