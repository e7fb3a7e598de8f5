//! The square protocol over real TCP: a server from `square_server::run` on
//! port 0, a plain socket as the client, and every kind of refusal followed
//! by a request that must still be answered.

use std::time::Duration;

use common::settings::Period;
use square_server::Settings;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(10);

struct Server {
    addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

async fn start(settings: Settings) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(square_server::run(listener, settings, async {
        let _ = stopped.await;
    }));
    Server {
        addr,
        stop: Some(stop),
        task,
    }
}

fn small_limits() -> Settings {
    Settings {
        max_digits: 50,
        max_line: 100,
        ..Settings::default()
    }
}

struct Peer {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Peer {
    async fn connect(server: &Server) -> Peer {
        let (reader, writer) = TcpStream::connect(server.addr).await.unwrap().into_split();
        Peer {
            reader: BufReader::new(reader),
            writer,
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.unwrap();
    }

    async fn line(&mut self) -> String {
        let mut line = String::new();
        let n = tokio::time::timeout(WAIT, self.reader.read_line(&mut line))
            .await
            .expect("an answer in time")
            .unwrap();
        assert!(
            n > 0,
            "the server closed the connection instead of answering"
        );
        assert!(line.ends_with('\n'), "{line:?}");
        line.trim_end_matches('\n').to_string()
    }

    async fn ask(&mut self, request: &str) -> String {
        self.send(format!("{request}\n").as_bytes()).await;
        self.line().await
    }

    /// Waits for the server to close the connection.
    async fn closed(&mut self) {
        let mut rest = Vec::new();
        tokio::time::timeout(WAIT, self.reader.read_to_end(&mut rest))
            .await
            .expect("the server closes in time")
            .unwrap();
        assert!(rest.is_empty(), "unexpected bytes: {rest:?}");
    }
}

#[tokio::test]
async fn squares_integers_and_decimals() {
    let server = start(Settings::default()).await;
    let mut peer = Peer::connect(&server).await;
    assert_eq!(peer.ask("12").await, "144");
    assert_eq!(peer.ask("-0.1").await, "0.01");
    assert_eq!(peer.ask("  +2.50\t").await, "6.25");
    assert_eq!(
        peer.ask("123456789012345678901234567890").await,
        "15241578753238836750495351562536198787501905199875019052100"
    );
}

#[tokio::test]
async fn not_a_number_then_still_usable() {
    let server = start(small_limits()).await;
    let mut peer = Peer::connect(&server).await;
    let answer = peer.ask("12abc").await;
    assert_eq!(
        answer,
        r#"ERR "12abc" is not a number; send an integer or a decimal such as -12 or 1.5"#
    );
    assert_eq!(
        peer.ask("").await,
        "ERR empty line; send one number per line, such as 12"
    );
    let answer = peer.ask("\u{1b}[31m\"x\"").await;
    assert!(
        answer.starts_with(r#"ERR "\x1b[31m\"x\"" is not"#),
        "{answer}"
    );
    assert_eq!(peer.ask("7").await, "49");
}

#[tokio::test]
async fn too_many_digits_then_still_usable() {
    let server = start(small_limits()).await;
    let mut peer = Peer::connect(&server).await;
    let answer = peer.ask(&"1".repeat(51)).await;
    assert_eq!(
        answer,
        format!(
            "ERR \"{}...\" has too many digits: 51, at most 50 are allowed",
            "1".repeat(40)
        )
    );
    assert_eq!(peer.ask("0.").await, "0");
    assert_eq!(peer.ask(&"3".repeat(50)).await.len(), 100);
}

#[tokio::test]
async fn a_long_line_gets_one_error_and_the_connection_goes_on() {
    let server = start(small_limits()).await;
    let mut peer = Peer::connect(&server).await;
    // Whole in one write.
    let answer = peer.ask(&"9".repeat(150)).await;
    assert_eq!(
        answer,
        format!(
            "ERR line too long: \"{}...\" is over 100 bytes",
            "9".repeat(40)
        )
    );
    assert_eq!(peer.ask("5").await, "25");
    // In pieces, so the server sees it grow past the limit before its end.
    for _ in 0..5 {
        peer.send(&[b'8'; 90]).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    peer.send(b"888\n6\n").await;
    assert!(peer.line().await.starts_with("ERR line too long: \"888"));
    assert_eq!(peer.line().await, "36");
    // Far longer than one read.
    let mut huge = vec![b'7'; 300_000];
    huge.extend_from_slice(b"\n4\n");
    peer.send(&huge).await;
    assert!(peer.line().await.starts_with("ERR line too long"));
    assert_eq!(peer.line().await, "16");
}

#[tokio::test]
async fn pipelined_answers_come_in_order() {
    let server = start(small_limits()).await;
    let peer = Peer::connect(&server).await;
    let mut requests = String::new();
    let mut expected = Vec::new();
    for i in 0..20_000u64 {
        if i % 1000 == 7 {
            requests.push_str("nope\r\n");
            expected.push(None);
        } else {
            requests.push_str(&format!("-{i}\r\n"));
            expected.push(Some((i * i).to_string()));
        }
    }
    let (mut reader, mut writer) = (peer.reader, peer.writer);
    // Write while reading, as a pipelining client must.
    let writing = tokio::spawn(async move {
        writer.write_all(requests.as_bytes()).await.unwrap();
        writer
    });
    let mut line = String::new();
    for want in expected {
        line.clear();
        tokio::time::timeout(WAIT, reader.read_line(&mut line))
            .await
            .unwrap()
            .unwrap();
        match want {
            Some(square) => assert_eq!(line.trim_end(), square),
            None => assert!(line.starts_with("ERR \"nope\""), "{line}"),
        }
    }
    writing.await.unwrap();
}

#[tokio::test]
async fn a_last_line_without_newline_is_answered_at_eof() {
    let server = start(small_limits()).await;
    let mut peer = Peer::connect(&server).await;
    peer.send(b"3\n4").await;
    peer.writer.shutdown().await.unwrap();
    assert_eq!(peer.line().await, "9");
    assert_eq!(peer.line().await, "16");
    peer.closed().await;
}

#[tokio::test]
async fn an_idle_connection_is_closed() {
    let mut settings = small_limits();
    settings.serve.idle_timeout = Period::from_millis(200);
    let server = start(settings).await;
    let mut peer = Peer::connect(&server).await;
    assert_eq!(peer.ask("2").await, "4");
    peer.closed().await;
}

#[tokio::test]
async fn shutdown_closes_live_connections_and_stops() {
    let mut settings = small_limits();
    settings.serve.shutdown_grace = Period::from_secs(5);
    let mut server = start(settings).await;
    let mut peer = Peer::connect(&server).await;
    assert_eq!(peer.ask("11").await, "121");
    server.stop.take().unwrap().send(()).unwrap();
    peer.closed().await;
    tokio::time::timeout(WAIT, server.task)
        .await
        .expect("the server stops within the grace period")
        .unwrap();
    assert!(TcpStream::connect(server.addr).await.is_err());
}
