//! The date/time protocol over real TCP, against the library's `run` on a
//! listener bound to port 0.

use std::net::SocketAddr;
use std::time::Duration;

use common::settings::{CidrList, Period};
use echo_server::{run, text, Settings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(10);

struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Server {
    async fn start(settings: Settings) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run(listener, settings, async move {
            let _ = stopped.await;
        }));
        Server {
            addr,
            stop: Some(stop),
            task,
        }
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("server drains in time")
            .unwrap()
            .unwrap();
    }
}

fn utc() -> Settings {
    Settings {
        utc: true,
        ..Settings::default()
    }
}

struct Client {
    stream: TcpStream,
    seen: Vec<u8>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        Client {
            stream: TcpStream::connect(addr).await.unwrap(),
            seen: Vec::new(),
        }
    }

    /// Reads until `needle` has arrived; returns everything up to and
    /// including it.
    async fn until(&mut self, needle: &str) -> String {
        let needle = needle.as_bytes();
        tokio::time::timeout(WAIT, async {
            loop {
                if let Some(at) = self.seen.windows(needle.len()).position(|w| w == needle) {
                    let rest = self.seen.split_off(at + needle.len());
                    let got = std::mem::replace(&mut self.seen, rest);
                    return String::from_utf8_lossy(&got).into_owned();
                }
                let mut buf = [0u8; 4096];
                let n = self.stream.read(&mut buf).await.unwrap();
                assert!(
                    n > 0,
                    "closed before {:?}; got {:?}",
                    String::from_utf8_lossy(needle),
                    String::from_utf8_lossy(&self.seen)
                );
                self.seen.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "timed out waiting for {:?}; got {:?}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(&self.seen)
            )
        })
    }

    /// Reads to the end of the stream.
    async fn rest(&mut self) -> String {
        let mut buf = Vec::new();
        tokio::time::timeout(WAIT, self.stream.read_to_end(&mut buf))
            .await
            .expect("server closes")
            .unwrap();
        self.seen.extend_from_slice(&buf);
        String::from_utf8_lossy(&std::mem::take(&mut self.seen)).into_owned()
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }
}

#[tokio::test]
async fn greeting_menu_date_time_and_quit() {
    let server = Server::start(Settings {
        instance: "echo-server_IN_7".into(),
        ..utc()
    })
    .await;
    let mut c = Client::connect(server.addr).await;
    let greeting = c.until(text::PROMPT).await;
    assert!(
        greeting.starts_with("Welcome to the date/time service on "),
        "{greeting}"
    );
    assert!(greeting.contains("instance echo-server_IN_7"), "{greeting}");
    assert!(greeting.contains(text::MENU), "{greeting}");

    let before = jiff::Timestamp::now();
    c.send(b"1\r\n").await;
    let date = c.until(text::PROMPT).await;
    let after = jiff::Timestamp::now();
    let date = date
        .strip_prefix(text::DATE)
        .expect("date line")
        .trim_end_matches(text::PROMPT);
    let date = date.trim_end();
    let today = |t: jiff::Timestamp| t.strftime("%Y-%m-%d").to_string();
    assert!(date == today(before) || date == today(after), "{date:?}");

    c.send(b"2\n").await;
    let time = c.until(text::PROMPT).await;
    let time = time
        .strip_prefix(text::TIME)
        .expect("time line")
        .trim_end_matches(text::PROMPT)
        .trim_end();
    let shown = jiff::civil::Time::strptime("%H:%M:%S", time).expect("HH:MM:SS");
    let now = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .time();
    let skew = (now.duration_since(shown).as_secs()).abs();
    assert!(
        skew <= 2 || skew >= 86_398,
        "server said {time}, now is {now}"
    );

    c.send(b"9\r\n").await;
    assert_eq!(c.rest().await, text::GOODBYE);
    server.shutdown().await;
}

#[tokio::test]
async fn a_configured_zone_is_used() {
    let server = Server::start(Settings {
        time_zone: Some("Asia/Kolkata".parse().unwrap()),
        ..Settings::default()
    })
    .await;
    let mut c = Client::connect(server.addr).await;
    assert!(c
        .until(text::PROMPT)
        .await
        .contains("Times are in Asia/Kolkata."));
    c.send(b"2\n").await;
    let time = c.until(text::PROMPT).await;
    let time = time
        .strip_prefix(text::TIME)
        .unwrap()
        .trim_end_matches(text::PROMPT)
        .trim_end();
    let shown = jiff::civil::Time::strptime("%H:%M:%S", time).unwrap();
    let now = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::get("Asia/Kolkata").unwrap())
        .time();
    let skew = now.duration_since(shown).as_secs().abs();
    assert!(
        skew <= 2 || skew >= 86_398,
        "server said {time}, Kolkata is at {now}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn anything_else_gets_one_line_and_the_menu_again() {
    let server = Server::start(utc()).await;
    let mut c = Client::connect(server.addr).await;
    c.until(text::PROMPT).await;
    c.send(b"hello\r\n").await;
    let answer = c.until(text::PROMPT).await;
    assert_eq!(
        answer,
        format!(
            "\"hello\" is not on the menu; type 1, 2 or 9 and press Enter.\r\n{}{}",
            text::MENU,
            text::PROMPT
        )
    );
    // Control characters are shown escaped, never sent back raw.
    c.send(b"\x1b[2J\x01\n").await;
    let answer = c.until(text::PROMPT).await;
    assert!(
        answer.starts_with("\"\\u{1b}[2J\\u{1}\" is not on the menu"),
        "{answer:?}"
    );
    // An empty line is just a new prompt.
    c.send(b"\r\n").await;
    assert_eq!(c.until(text::PROMPT).await, text::PROMPT);
    server.shutdown().await;
}

#[tokio::test]
async fn telnet_negotiation_is_refused_and_never_shown() {
    let server = Server::start(utc()).await;
    let mut c = Client::connect(server.addr).await;
    c.until(text::PROMPT).await;
    // IAC DO ECHO, IAC WILL NAWS, IAC SB NAWS 0 80 0 24 IAC SE, then "1" CR NUL.
    c.send(&[
        255, 253, 1, 255, 251, 31, 255, 250, 31, 0, 80, 0, 24, 255, 240, b'1', b'\r', 0,
    ])
    .await;
    let answer = c.until(text::PROMPT).await;
    assert!(
        answer.starts_with("\u{fffd}\u{fffd}\u{1}\u{fffd}\u{fffd}\u{1f}Current date: "),
        "{answer:?}"
    );
    let raw = answer.as_bytes();
    assert!(!answer.contains("not on the menu"), "{answer:?}");
    assert!(raw.len() > 6);
    server.shutdown().await;
}

#[tokio::test]
async fn negotiation_replies_are_exact() {
    let server = Server::start(utc()).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let mut c = Client {
        stream,
        seen: Vec::new(),
    };
    c.until(text::PROMPT).await;
    c.send(&[255, 253, 3, 255, 251, 24, b'2', b'\n']).await;
    let mut head = [0u8; 6];
    stream = c.stream;
    tokio::time::timeout(WAIT, stream.read_exact(&mut head))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        head,
        [255, 252, 3, 255, 254, 24],
        "WONT SGA, DONT TERMINAL-TYPE"
    );
    let mut c = Client {
        stream,
        seen: Vec::new(),
    };
    assert!(c.until(text::PROMPT).await.starts_with(text::TIME));
    server.shutdown().await;
}

#[tokio::test]
async fn an_over_long_line_closes_that_session_only() {
    let server = Server::start(utc()).await;
    let mut other = Client::connect(server.addr).await;
    other.until(text::PROMPT).await;
    let mut c = Client::connect(server.addr).await;
    c.until(text::PROMPT).await;
    c.send(&vec![b'7'; 2000]).await;
    let end = c.rest().await;
    assert_eq!(
        end,
        "\r\nLine too long (over 1024 bytes); closing the connection.\r\n"
    );
    other.send(b"1\n").await;
    assert!(other.until(text::PROMPT).await.starts_with(text::DATE));
    server.shutdown().await;
}

#[tokio::test]
async fn a_flood_and_garbage_leave_other_sessions_answering() {
    let server = Server::start(utc()).await;
    // One client pours lines of binary garbage and never reads its answers.
    let mut flood = TcpStream::connect(server.addr).await.unwrap();
    let flooding = tokio::spawn(async move {
        let mut garbage = Vec::new();
        for i in 0..100_000u32 {
            garbage.extend_from_slice(&i.to_le_bytes());
            garbage.extend_from_slice(b"\xff\xfe\x00\x80\n");
        }
        // The server stops reading once its answers back up; that is fine.
        let _ = tokio::time::timeout(Duration::from_secs(3), flood.write_all(&garbage)).await;
        flood
    });
    for _ in 0..20 {
        let mut c = Client::connect(server.addr).await;
        c.until(text::PROMPT).await;
        c.send(b"2\n").await;
        assert!(c.until(text::PROMPT).await.starts_with(text::TIME));
    }
    drop(flooding.await.unwrap());
    server.shutdown().await;
}

#[tokio::test]
async fn idle_sessions_are_closed_with_a_reason() {
    let server = Server::start(Settings {
        serve: common::settings::ServeSettings {
            idle_timeout: Period::from_millis(300),
            ..Default::default()
        },
        ..utc()
    })
    .await;
    let mut c = Client::connect(server.addr).await;
    c.until(text::PROMPT).await;
    assert_eq!(
        c.rest().await,
        "\r\nNo input for 300 ms; closing the connection.\r\n"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn users_are_told_when_the_service_goes_down() {
    let server = Server::start(utc()).await;
    let mut a = Client::connect(server.addr).await;
    let mut b = Client::connect(server.addr).await;
    a.until(text::PROMPT).await;
    b.until(text::PROMPT).await;
    server.shutdown().await;
    for c in [&mut a, &mut b] {
        assert_eq!(c.rest().await, format!("\r\n{}", text::GOING_DOWN));
    }
}

#[tokio::test]
async fn denied_clients_get_nothing() {
    let server = Server::start(Settings {
        serve: common::settings::ServeSettings {
            deny: "127.0.0.0/8".parse::<CidrList>().unwrap(),
            ..Default::default()
        },
        ..utc()
    })
    .await;
    let mut c = Client::connect(server.addr).await;
    let mut buf = Vec::new();
    let n = tokio::time::timeout(WAIT, c.stream.read_to_end(&mut buf))
        .await
        .unwrap();
    assert!(
        n.is_err() || buf.is_empty(),
        "a denied client was sent {buf:?}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn the_connection_cap_holds_new_clients_back() {
    let server = Server::start(Settings {
        serve: common::settings::ServeSettings {
            max_connections: 1,
            ..Default::default()
        },
        ..utc()
    })
    .await;
    let mut first = Client::connect(server.addr).await;
    first.until(text::PROMPT).await;
    let mut second = Client::connect(server.addr).await;
    let mut buf = [0u8; 1];
    let early =
        tokio::time::timeout(Duration::from_millis(300), second.stream.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "the second client was served while the first held the only slot"
    );
    first.send(b"9\n").await;
    first.rest().await;
    assert!(second.until(text::PROMPT).await.starts_with("Welcome"));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_sessions() {
    let server = Server::start(utc()).await;
    let mut sessions = Vec::new();
    // Open them all before any answers, so they really are concurrent.
    for _ in 0..1000 {
        let mut c = Client::connect(server.addr).await;
        c.until(text::PROMPT).await;
        sessions.push(c);
    }
    let mut tasks = Vec::new();
    for mut c in sessions {
        tasks.push(tokio::spawn(async move {
            c.send(b"1\r\n").await;
            let date = c.until(text::PROMPT).await;
            assert!(date.starts_with(text::DATE), "{date}");
            c
        }));
    }
    let mut sessions = Vec::new();
    for t in tasks {
        sessions.push(t.await.unwrap());
    }
    assert_eq!(sessions.len(), 1000);
    for c in &mut sessions {
        c.send(b"9\n").await;
    }
    for mut c in sessions {
        assert_eq!(c.rest().await, text::GOODBYE);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn short_subnegotiations_are_skipped_and_9_still_quits() {
    let server = Server::start(utc()).await;
    let mut c = Client::connect(server.addr).await;
    c.until(text::PROMPT).await;
    // A window size (80x24) and a terminal type, each ended by IAC SE, the
    // way telnet clients send them unasked; then 9.
    let mut bytes = vec![255, 250, 31, 0, 80, 0, 24, 255, 240];
    bytes.extend_from_slice(&[255, 250, 24, 0]);
    bytes.extend_from_slice(b"XTERM-256COLOR");
    bytes.extend_from_slice(&[255, 240]);
    bytes.extend_from_slice(b"9\r\n");
    c.send(&bytes).await;
    assert_eq!(c.rest().await, text::GOODBYE);
    server.shutdown().await;
}

#[tokio::test]
async fn a_subnegotiation_that_never_ends_closes_the_session_with_a_reason() {
    let server = Server::start(utc()).await;
    let mut other = Client::connect(server.addr).await;
    other.until(text::PROMPT).await;
    let mut c = Client::connect(server.addr).await;
    c.until(text::PROMPT).await;
    // IAC SB, then menu choices and more, never IAC SE: the session must
    // not swallow input forever.
    c.send(&[255, 250, 24]).await;
    for _ in 0..100 {
        c.send(b"9\r\n1\r\n").await;
    }
    assert_eq!(
        c.rest().await,
        "\r\nTelnet subnegotiation over 512 bytes without its end (IAC SE); closing the connection.\r\n"
    );
    other.send(b"2\n").await;
    assert!(other.until(text::PROMPT).await.starts_with(text::TIME));
    server.shutdown().await;
}

#[tokio::test]
async fn a_command_inside_a_subnegotiation_ends_it() {
    let server = Server::start(utc()).await;
    let mut c = Client::connect(server.addr).await;
    c.until(text::PROMPT).await;
    // IAC SB NAWS 0, cut short by IAC DO ECHO (as BSD telnetd reads it: the
    // subnegotiation is over and the command is obeyed), then 9.
    c.send(&[255, 250, 31, 0, 255, 253, 1, b'9', b'\r', b'\n'])
        .await;
    let mut refusal = [0u8; 3];
    tokio::time::timeout(WAIT, c.stream.read_exact(&mut refusal))
        .await
        .expect("a reply to DO ECHO")
        .unwrap();
    assert_eq!(refusal, [255, 252, 1], "WONT ECHO");
    assert_eq!(c.rest().await, text::GOODBYE);
    server.shutdown().await;
}

/// Reads from `stream` until `count` prompts have arrived; returns how
/// many did before the server closed or `WAIT` passed.
async fn prompts(stream: &mut TcpStream, count: usize) -> usize {
    let needle = text::PROMPT.as_bytes();
    let mut seen = 0;
    let mut carry: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let _ = tokio::time::timeout(WAIT, async {
        while seen < count {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    carry.extend_from_slice(&buf[..n]);
                    seen += carry.windows(needle.len()).filter(|w| *w == needle).count();
                    let keep = carry.len().saturating_sub(needle.len() - 1);
                    carry.drain(..keep);
                }
            }
        }
    })
    .await;
    seen
}

#[tokio::test]
async fn a_client_that_never_reads_is_held_back_then_answered_in_full() {
    let server = Server::start(utc()).await;
    // Served before the flood begins, and after: the service is running.
    let mut other = Client::connect(server.addr).await;
    other.until(text::PROMPT).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    // Small buffers on the client's side: what it sends beyond them waits
    // in the server's kernel buffers and the session's own.
    socket.set_recv_buffer_size(4096).unwrap();
    socket.set_send_buffer_size(4096).unwrap();
    let mut flood = socket.connect(server.addr).await.unwrap();
    let mut greeting = Client {
        stream: flood,
        seen: Vec::new(),
    };
    greeting.until(text::PROMPT).await;
    flood = greeting.stream;
    // Short wrong lines: each gets an answer about 60 times its size.
    let lines = b"x\n".repeat(32 * 1024);
    let mut sent = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(2), flood.write(&lines[sent % 2..])).await {
            Ok(Ok(n)) => sent += n,
            Ok(Err(e)) => panic!("the server closed while being flooded: {e}"),
            // Nothing more is taken: the server stopped reading.
            Err(_) => break,
        }
        assert!(
            sent < 64 * 1024 * 1024,
            "the server read {sent} bytes from a client that reads nothing"
        );
    }
    // The server took little: its socket buffers for a client are small
    // (left to itself the kernel grows the send buffer to megabytes, and
    // the session fills them with answers).
    assert!(
        sent < 128 * 1024,
        "the server took {sent} bytes from a client that reads nothing"
    );
    other.send(b"1\n").await;
    assert!(other.until(text::PROMPT).await.starts_with(text::DATE));
    // Every line it took is answered once the client reads: the session
    // was held back, never cut off or answered in part.
    let lines_sent = sent / 2;
    assert_eq!(prompts(&mut flood, lines_sent).await, lines_sent);
    server.shutdown().await;
}

#[tokio::test]
async fn settings_that_cannot_work_are_refused() {
    for (settings, key) in [
        (
            Settings {
                max_line: 0,
                ..utc()
            },
            "max_line",
        ),
        (
            Settings {
                max_line: 1 << 40,
                ..utc()
            },
            "max_line",
        ),
        (
            Settings {
                instance: "a\r\nfake line".into(),
                ..utc()
            },
            "instance",
        ),
        (
            Settings {
                time_zone: Some("Asia/Kolkata".parse().unwrap()),
                ..utc()
            },
            "time_zone",
        ),
    ] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let result = tokio::time::timeout(WAIT, run(listener, settings, std::future::pending()))
            .await
            .expect("refused at once, not served");
        let err = format!("{:#}", result.unwrap_err());
        assert!(err.contains(key), "{err}");
    }
}
