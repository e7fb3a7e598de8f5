//! The square service's client library, and the code behind the
//! `square-client` command.
//!
//! [`Client::connect`] and [`Client::square`] ask for one square at a time;
//! [`Client::stream`] pipelines a whole input (a file, standard input) with a
//! bounded window: a writer task reads the input and sends requests in
//! batches while the caller's task reads the answers, so throughput is not
//! limited by round trips and memory stays constant however long the input.
//!
//! [`Client::connect_tls`] talks TLS, with a [`Connector`] made from the
//! TLS settings.
//!
//! Every wait on the server is bounded: connecting (and the TLS handshake)
//! by the connect timeout,
//! and, while any request is unanswered, each wait for more of the answers
//! by the reply timeout ([`Client::with_reply_timeout`]); a server that
//! accepts and never answers is [`SquareError::NoAnswer`]. Only waiting for
//! the caller's own input is not bounded.

pub mod cli;
pub mod settings;

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncBufReadExt, ReadHalf, WriteHalf};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use common::settings::HostPort;
pub use common::tls::client::Connector;
use common::tls::client::TlsStream;

/// How long [`Client::connect`] waits for the server to accept.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client waits for the server's next answer while requests are
/// unanswered, unless told otherwise.
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Bytes asked of the input or the socket per read.
const READ_SIZE: usize = 64 * 1024;
/// How much of a very long request line is kept to show with its answer.
const LONG_LINE_PREFIX: usize = 64;
/// The longest answer line taken from a server: twice that of the largest
/// square a square-server can send (a million digits squared is 2,000,002
/// bytes). A longer one is from something else, and is not kept growing.
const MAX_ANSWER: usize = 4 * 1024 * 1024;

/// Why a square could not be had.
#[derive(Debug)]
pub enum SquareError {
    /// The server could not be reached (name not resolved, refused, or no
    /// answer within the connect timeout).
    Unreachable {
        /// The address as given.
        addr: String,
        /// What went wrong.
        source: io::Error,
    },
    /// The server was reached, but the TLS handshake with it failed (its
    /// certificate is not trusted, or is for another name).
    Handshake {
        /// The address as given.
        addr: String,
        /// What went wrong, with whom: a
        /// [`HandshakeError`](common::tls::client::HandshakeError) inside.
        source: io::Error,
    },
    /// The server answered `ERR`: the input is not a number it accepts.
    Rejected {
        /// The request as sent.
        input: String,
        /// The server's reason, which names the input and the rule broken.
        reason: String,
    },
    /// The request cannot be sent: it holds a line break, so it would be
    /// more than one request.
    InvalidRequest {
        /// The request as given.
        input: String,
    },
    /// The connection failed or the server closed it before answering
    /// everything.
    Connection(io::Error),
    /// Requests were unanswered and nothing came from the server for the
    /// reply timeout.
    NoAnswer {
        /// The reply timeout.
        waited: Duration,
    },
    /// Reading the input of [`Client::stream`] failed.
    Input(io::Error),
    /// Writing the output of [`Client::stream`] failed.
    Output(io::Error),
}

impl fmt::Display for SquareError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SquareError::Unreachable { addr, source } => {
                write!(f, "cannot reach the square server at {addr}: {source}")
            }
            SquareError::Handshake { addr, source } => {
                write!(
                    f,
                    "cannot talk TLS to the square server at {addr}: {source}"
                )
            }
            SquareError::Rejected { reason, .. } => f.write_str(reason),
            SquareError::InvalidRequest { input } => write!(
                f,
                "{input:?} holds a line break; send one number per request"
            ),
            SquareError::Connection(e) => {
                write!(f, "lost the connection to the square server: {e}")
            }
            SquareError::NoAnswer { waited } => write!(
                f,
                "the square server sent no answer for {}",
                humantime::format_duration(*waited)
            ),
            SquareError::Input(e) => write!(f, "cannot read the input: {e}"),
            SquareError::Output(e) => write!(f, "cannot write the output: {e}"),
        }
    }
}

impl std::error::Error for SquareError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SquareError::Unreachable { source: e, .. }
            | SquareError::Handshake { source: e, .. }
            | SquareError::Connection(e)
            | SquareError::Input(e)
            | SquareError::Output(e) => Some(e),
            _ => None,
        }
    }
}

/// A connection to a square server.
#[derive(Debug)]
pub struct Client<S = TcpStream> {
    stream: BufReader<S>,
    line: Vec<u8>,
    reply_timeout: Duration,
}

impl Client<TcpStream> {
    /// Connects to `addr` (`HOST:PORT`), waiting at most
    /// [`DEFAULT_CONNECT_TIMEOUT`].
    pub async fn connect(addr: &str) -> Result<Self, SquareError> {
        Self::connect_timeout(addr, DEFAULT_CONNECT_TIMEOUT).await
    }

    /// Connects to `addr` (`HOST:PORT`; every address a host name resolves
    /// to is tried), waiting at most `timeout` in all.
    pub async fn connect_timeout(addr: &str, timeout: Duration) -> Result<Self, SquareError> {
        within(addr, timeout, tcp(addr)).await.map(Client::new)
    }
}

impl Client<TlsStream<TcpStream>> {
    /// Connects to `addr` (`HOST:PORT`) and completes the TLS handshake
    /// with `connector`, which checks the server's certificate against
    /// the host of `addr` unless it has a server name of its own; waits
    /// at most `timeout` for both.
    pub async fn connect_tls(
        addr: &str,
        timeout: Duration,
        connector: &Connector,
    ) -> Result<Self, SquareError> {
        let host = addr
            .parse::<HostPort>()
            .map_err(|e| SquareError::Unreachable {
                addr: addr.to_string(),
                source: io::Error::new(io::ErrorKind::InvalidInput, e),
            })?
            .host;
        let start = tokio::time::Instant::now();
        let stream = within(addr, timeout, tcp(addr)).await?;
        let handshake = connector.connect(stream, &host);
        let left = timeout.saturating_sub(start.elapsed());
        let source = match tokio::time::timeout(left, handshake).await {
            Ok(Ok(stream)) => return Ok(Client::new(stream)),
            Ok(Err(e)) => e,
            Err(_) => io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the TLS handshake took more than {}; is it serving TLS?",
                    humantime::format_duration(timeout)
                ),
            ),
        };
        Err(SquareError::Handshake {
            addr: addr.to_string(),
            source,
        })
    }
}

/// A TCP connection to `addr`, for requests.
async fn tcp(addr: &str) -> Result<TcpStream, SquareError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|source| SquareError::Unreachable {
            addr: addr.to_string(),
            source,
        })?;
    // Requests are small and answered at once; Nagle would hold them.
    stream.set_nodelay(true).map_err(SquareError::Connection)?;
    Ok(stream)
}

/// `connect`, given at most `timeout`.
async fn within<T>(
    addr: &str,
    timeout: Duration,
    connect: impl std::future::Future<Output = Result<T, SquareError>>,
) -> Result<T, SquareError> {
    tokio::time::timeout(timeout, connect)
        .await
        .unwrap_or_else(|_| {
            Err(SquareError::Unreachable {
                addr: addr.to_string(),
                source: io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {}", humantime::format_duration(timeout)),
                ),
            })
        })
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// A client over an established stream (a TLS stream, say).
    pub fn new(stream: S) -> Self {
        Client {
            stream: BufReader::new(stream),
            line: Vec::new(),
            reply_timeout: DEFAULT_REPLY_TIMEOUT,
        }
    }

    /// Waits at most `timeout` for the server's next answer while requests
    /// are unanswered (and, at the end of [`Client::stream`], for it to
    /// close); [`DEFAULT_REPLY_TIMEOUT`] unless set.
    pub fn with_reply_timeout(mut self, timeout: Duration) -> Self {
        self.reply_timeout = timeout;
        self
    }

    /// The exact square of `number` (`"12"` gives `"144"`, `"1.5"` gives
    /// `"2.25"`). [`SquareError::Rejected`] carries the server's reason when
    /// it is not a number; the connection stays usable. After
    /// [`SquareError::NoAnswer`] it does not (a late answer would be taken
    /// for the next one): connect again.
    pub async fn square(&mut self, number: &str) -> Result<String, SquareError> {
        if number.contains(['\n', '\r']) {
            return Err(SquareError::InvalidRequest {
                input: number.to_string(),
            });
        }
        let mut request = Vec::with_capacity(number.len() + 1);
        request.extend_from_slice(number.as_bytes());
        request.push(b'\n');
        self.line.clear();
        let exchange = async {
            let stream = self.stream.get_mut();
            stream.write_all(&request).await?;
            stream.flush().await?;
            // One byte over the limit is enough to tell.
            (&mut self.stream)
                .take(MAX_ANSWER as u64 + 1)
                .read_until(b'\n', &mut self.line)
                .await
        };
        match tokio::time::timeout(self.reply_timeout, exchange).await {
            Ok(result) => result.map_err(SquareError::Connection)?,
            Err(_) => {
                return Err(SquareError::NoAnswer {
                    waited: self.reply_timeout,
                })
            }
        };
        let Some(answer) = self.line.strip_suffix(b"\n") else {
            if self.line.len() > MAX_ANSWER {
                return Err(SquareError::Connection(too_long_answer()));
            }
            return Err(SquareError::Connection(closed_early(1)));
        };
        let answer = String::from_utf8_lossy(answer.strip_suffix(b"\r").unwrap_or(answer));
        match answer.strip_prefix("ERR ") {
            Some(reason) => Err(SquareError::Rejected {
                input: number.to_string(),
                reason: reason.to_string(),
            }),
            None => Ok(answer.into_owned()),
        }
    }
}

/// How [`Client::stream`] batches and bounds its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamOptions {
    /// Requests are sent in batches of about this many bytes.
    pub batch_bytes: usize,
    /// Most batches sent and not yet answered: with `batch_bytes` this is
    /// the window, the most request bytes in flight.
    pub max_batches: usize,
    /// Skip input lines that hold only whitespace instead of sending them
    /// (the server would answer them with `ERR empty line`).
    pub skip_blank_lines: bool,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            batch_bytes: 64 * 1024,
            max_batches: 16,
            skip_blank_lines: true,
        }
    }
}

/// One answer of [`Client::stream`], with the request it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply<'a> {
    /// The request as sent, without surrounding whitespace; for a line
    /// longer than a batch, only its first bytes.
    pub input: &'a [u8],
    /// Whether `input` is only the start of the request.
    pub input_truncated: bool,
    /// The square, or the server's reason for `ERR`.
    pub answer: Result<&'a str, &'a str>,
}

/// What [`Client::stream`] got through.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Requests answered with a square.
    pub squared: u64,
    /// Requests answered with `ERR`.
    pub rejected: u64,
}

/// What the writer task hands the reader, in the order it sent it.
enum Sent {
    /// Request lines exactly as written to the socket, each ending in `\n`.
    Lines(Bytes),
    /// A request too long to keep, streamed through; its first bytes.
    Long(Bytes),
    /// Reading the input failed; nothing more was sent.
    InputFailed(io::Error),
    /// Everything was sent and the socket's sending side closed.
    End,
}

impl<S> Client<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Squares every line of `input`, pipelined, calling `on_reply` for each
    /// answer in order with a buffer that is written to `output` whenever
    /// the answers received so far are handled (so output is batched too).
    ///
    /// A writer task reads `input` and sends the requests in batches of
    /// [`StreamOptions::batch_bytes`]; at most
    /// [`StreamOptions::max_batches`] are unanswered at once, so memory is
    /// bounded whatever the size of the input. Returns when every request is
    /// answered; a connection lost before that is an error.
    pub async fn stream<R, W, F>(
        self,
        input: R,
        output: &mut W,
        options: StreamOptions,
        mut on_reply: F,
    ) -> Result<Summary, SquareError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin,
        F: FnMut(Reply<'_>, &mut Vec<u8>),
    {
        let reply_timeout = self.reply_timeout;
        let stream = self.stream.into_inner();
        let (socket_in, socket_out) = tokio::io::split(stream);
        let (tx, rx) = mpsc::channel(options.max_batches.max(1));
        let writer = tokio::spawn(send_requests(input, socket_out, tx, options));
        let replies = Replies {
            socket: socket_in,
            sent: rx,
            announced: VecDeque::new(),
            writer_gone: false,
            reply_timeout,
        };
        let result = replies.read(output, &mut on_reply).await;
        // On success the writer has finished; on failure it may be waiting
        // for input that no longer matters.
        writer.abort();
        result
    }
}

fn too_long_answer() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "the server sent a line of more than {} MiB, longer than any square; is it a square server?",
            MAX_ANSWER >> 20
        ),
    )
}

fn closed_early(unanswered: usize) -> io::Error {
    let message = match unanswered {
        0 => "the server closed the connection before the end of the input".to_string(),
        1 => "the server closed the connection without answering".to_string(),
        n => format!("the server closed the connection with {n} requests unanswered"),
    };
    io::Error::new(io::ErrorKind::UnexpectedEof, message)
}

/// The writer task: input lines to request batches, each batch announced to
/// the reader before it is written, so the reader always knows what an
/// answer answers.
async fn send_requests<R, W>(
    mut input: R,
    mut socket: WriteHalf<W>,
    tx: mpsc::Sender<Sent>,
    options: StreamOptions,
) where
    R: AsyncRead + Unpin,
    W: AsyncRead + AsyncWrite,
{
    let mut feeder = Feeder {
        socket: &mut socket,
        tx: &tx,
        batch: BytesMut::with_capacity(options.batch_bytes + READ_SIZE),
        options,
    };
    match feeder.run(&mut input).await {
        Ok(()) => {
            // Announce the end before closing, so that when the server's EOF
            // reaches the reader the end is already in the channel.
            let _ = tx.send(Sent::End).await;
            let _ = socket.shutdown().await;
        }
        Err(FeedError::Input(e)) => {
            let _ = tx.send(Sent::InputFailed(e)).await;
            let _ = socket.shutdown().await;
        }
        // The reader sees the connection fail or has gone away.
        Err(FeedError::Stopped) => {}
    }
}

enum FeedError {
    Input(io::Error),
    Stopped,
}

struct Feeder<'a, W> {
    socket: &'a mut WriteHalf<W>,
    tx: &'a mpsc::Sender<Sent>,
    batch: BytesMut,
    options: StreamOptions,
}

impl<W: AsyncRead + AsyncWrite> Feeder<'_, W> {
    async fn run<R: AsyncRead + Unpin>(&mut self, input: &mut R) -> Result<(), FeedError> {
        let mut buf: Vec<u8> = Vec::with_capacity(READ_SIZE);
        let mut searched = 0;
        // Streaming the rest of a line too long to batch.
        let mut in_long_line = false;
        loop {
            buf.reserve(READ_SIZE);
            let eof = input.read_buf(&mut buf).await.map_err(FeedError::Input)? == 0;
            let mut start = 0;
            while let Some(at) = memchr::memchr(b'\n', &buf[searched..]) {
                let end = searched + at;
                if in_long_line {
                    self.write(&buf[start..=end]).await?;
                    in_long_line = false;
                } else if end - start > self.options.batch_bytes {
                    self.start_long_line(&buf[start..=end]).await?;
                } else {
                    self.push_line(&buf[start..end]);
                    if self.batch.len() >= self.options.batch_bytes {
                        self.send_batch().await?;
                    }
                }
                start = end + 1;
                searched = start;
            }
            let rest = &buf[start..];
            if in_long_line {
                self.write(rest).await?;
                start = buf.len();
            } else if rest.len() > self.options.batch_bytes {
                self.start_long_line(rest).await?;
                in_long_line = true;
                start = buf.len();
            }
            if eof {
                if in_long_line {
                    self.write(b"\n").await?;
                } else if start < buf.len() {
                    let last = buf[start..].to_vec();
                    self.push_line(&last);
                }
                self.send_batch().await?;
                return Ok(());
            }
            self.send_batch().await?;
            buf.drain(..start);
            searched = buf.len();
        }
    }

    /// Sends a line too long to batch (or its start) straight through,
    /// keeping only its first bytes to show with the answer.
    async fn start_long_line(&mut self, line: &[u8]) -> Result<(), FeedError> {
        self.send_batch().await?;
        let line = line.trim_ascii_start();
        let prefix = Bytes::copy_from_slice(&line[..line.len().min(LONG_LINE_PREFIX)]);
        self.tx
            .send(Sent::Long(prefix))
            .await
            .map_err(|_| FeedError::Stopped)?;
        self.write(line).await
    }

    fn push_line(&mut self, line: &[u8]) {
        let line = line.trim_ascii();
        if line.is_empty() && self.options.skip_blank_lines {
            return;
        }
        self.batch.extend_from_slice(line);
        self.batch.extend_from_slice(b"\n");
    }

    async fn send_batch(&mut self) -> Result<(), FeedError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = self.batch.split().freeze();
        // Waiting here for room in the channel is what bounds the window.
        self.tx
            .send(Sent::Lines(batch.clone()))
            .await
            .map_err(|_| FeedError::Stopped)?;
        self.write(&batch).await
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), FeedError> {
        self.socket
            .write_all(bytes)
            .await
            .map_err(|_| FeedError::Stopped)
    }
}

/// The reader: matches each answer line with the next request sent.
struct Replies<S> {
    socket: ReadHalf<S>,
    /// What the writer announces, in the order it sends it.
    sent: mpsc::Receiver<Sent>,
    /// Announcements taken from `sent` while waiting, not yet answered.
    announced: VecDeque<Sent>,
    /// The writer has gone without announcing the end: it could not send.
    writer_gone: bool,
    reply_timeout: Duration,
}

impl<S: AsyncRead + AsyncWrite> Replies<S> {
    async fn read<W, F>(mut self, output: &mut W, on_reply: &mut F) -> Result<Summary, SquareError>
    where
        W: AsyncWrite + Unpin,
        F: FnMut(Reply<'_>, &mut Vec<u8>),
    {
        let mut summary = Summary::default();
        let mut buf: Vec<u8> = Vec::with_capacity(READ_SIZE);
        let mut out: Vec<u8> = Vec::with_capacity(2 * READ_SIZE);
        let mut searched = 0;
        // The batch being answered and the offset of its next request.
        let mut current = Bytes::new();
        let mut next = 0;
        loop {
            let mut start = 0;
            while let Some(at) = memchr::memchr(b'\n', &buf[searched..]) {
                let end = searched + at;
                let line = &buf[start..end];
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let (input, input_truncated): (&[u8], bool) = loop {
                    if next < current.len() {
                        let len = memchr::memchr(b'\n', &current[next..])
                            .expect("every request in a batch ends in a newline");
                        let input = &current[next..next + len];
                        next += len + 1;
                        break (input, false);
                    }
                    match self.next_sent() {
                        Some(Sent::Lines(batch)) => {
                            current = batch;
                            next = 0;
                        }
                        Some(Sent::Long(prefix)) => {
                            current = prefix;
                            next = current.len();
                            break (&current[..], true);
                        }
                        Some(Sent::InputFailed(e)) => return Err(SquareError::Input(e)),
                        Some(Sent::End) | None => {
                            return Err(SquareError::Connection(io::Error::new(
                                io::ErrorKind::InvalidData,
                                "the server sent more answers than there were requests",
                            )))
                        }
                    }
                };
                let text = std::str::from_utf8(line).map_err(|_| {
                    SquareError::Connection(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the server sent an answer that is not text",
                    ))
                })?;
                let answer = match text.strip_prefix("ERR ") {
                    Some(reason) => {
                        summary.rejected += 1;
                        Err(reason)
                    }
                    None => {
                        summary.squared += 1;
                        Ok(text)
                    }
                };
                on_reply(
                    Reply {
                        input,
                        input_truncated,
                        answer,
                    },
                    &mut out,
                );
                start = end + 1;
                searched = start;
            }
            buf.drain(..start);
            searched = buf.len();
            if buf.len() > MAX_ANSWER {
                return Err(SquareError::Connection(too_long_answer()));
            }
            if !out.is_empty() {
                output.write_all(&out).await.map_err(SquareError::Output)?;
                // Flushed per batch so an interactive user sees each answer.
                output.flush().await.map_err(SquareError::Output)?;
                out.clear();
            }
            buf.reserve(READ_SIZE);
            let awaited = next < current.len()
                || !self.announced.is_empty()
                || !self.sent.is_empty()
                || self.writer_gone;
            let read = if awaited {
                // Requests are unanswered, or everything is sent and the
                // server is to close: that wait is bounded.
                match tokio::time::timeout(self.reply_timeout, self.socket.read_buf(&mut buf)).await
                {
                    Ok(read) => read,
                    Err(_) => {
                        return Err(SquareError::NoAnswer {
                            waited: self.reply_timeout,
                        })
                    }
                }
            } else {
                // Everything sent is answered: wait for more input (as long
                // as it takes), watching the connection meanwhile.
                tokio::select! {
                    sent = self.sent.recv() => {
                        match sent {
                            Some(sent) => self.announced.push_back(sent),
                            None => self.writer_gone = true,
                        }
                        continue;
                    }
                    read = self.socket.read_buf(&mut buf) => read,
                }
            };
            if read.map_err(SquareError::Connection)? == 0 {
                return self.finish(summary, &buf, &current[next..]);
            }
        }
    }

    /// The next thing the writer announced. An answer is read only after
    /// its request was announced and sent, so there is none when the
    /// server answers what was not asked.
    fn next_sent(&mut self) -> Option<Sent> {
        self.announced
            .pop_front()
            .or_else(|| self.sent.try_recv().ok())
    }

    /// At the server's EOF: fine when everything sent was answered and the
    /// writer had already announced the end.
    fn finish(
        mut self,
        summary: Summary,
        partial: &[u8],
        unanswered: &[u8],
    ) -> Result<Summary, SquareError> {
        let mut missing = memchr::memchr_iter(b'\n', unanswered).count();
        if !partial.is_empty() {
            missing += 1;
        }
        loop {
            match self.next_sent() {
                Some(Sent::Lines(batch)) => missing += memchr::memchr_iter(b'\n', &batch).count(),
                Some(Sent::Long(_)) => missing += 1,
                Some(Sent::InputFailed(e)) => return Err(SquareError::Input(e)),
                Some(Sent::End) if missing == 0 => return Ok(summary),
                // Closed by the server before our end of input reached it.
                Some(Sent::End) | None => {
                    return Err(SquareError::Connection(closed_early(missing)))
                }
            }
        }
    }
}
