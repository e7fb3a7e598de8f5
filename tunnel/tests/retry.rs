//! Retry before the first byte over real sockets on loopback: a target that
//! accepts and then closes or resets before answering is skipped without
//! the client noticing; one that answered is never replayed; more than the
//! held limit before an answer turns the replay off; with the setting off
//! nothing changes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::settings::{ListenAddr, Period};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tunnel::access_log::AccessLog;
use tunnel::settings::Policy;
use tunnel::{Route, Tunnel};

const WAIT: Duration = Duration::from_secs(20);
const REQUEST: &[u8] = b"GET /thing\n";

/// What a target does with each connection.
#[derive(Debug, Clone, Copy)]
enum Does {
    /// Closes at once.
    Close,
    /// Resets at once.
    Reset,
    /// Reads this many bytes, then closes without a byte.
    ReadThenClose(usize),
    /// Reads to the client's end of stream, then resets.
    ReadAllThenReset,
    /// Reads the request line, answers part of it, then closes.
    AnswerThenClose,
    /// Reads the request line and answers `ok: ` and it.
    Answer,
    /// Reads to the client's end of stream and answers with what it read.
    AnswerAtEnd,
}

/// A target on loopback, and what it saw.
struct Target {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    received: Arc<AtomicUsize>,
}

async fn target(does: Does) -> Target {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let received = Arc::new(AtomicUsize::new(0));
    let (a, r) = (accepted.clone(), received.clone());
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            a.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(s, does, r.clone()));
        }
    });
    Target {
        addr,
        accepted,
        received,
    }
}

/// Reads until `done` says so or the client's end of stream; counts and
/// returns what came.
async fn read_until(s: &mut TcpStream, received: &AtomicUsize, done: fn(&[u8]) -> bool) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !done(&got) {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                received.fetch_add(n, Ordering::SeqCst);
                got.extend_from_slice(&buf[..n]);
            }
        }
    }
    got
}

async fn serve(mut s: TcpStream, does: Does, received: Arc<AtomicUsize>) {
    let mut buf = [0u8; 4096];
    match does {
        Does::Close => {}
        Does::Reset => s.set_zero_linger().unwrap(),
        Does::ReadThenClose(n) => {
            let mut left = n;
            while left > 0 {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => {
                        received.fetch_add(k, Ordering::SeqCst);
                        left = left.saturating_sub(k);
                    }
                }
            }
        }
        Does::ReadAllThenReset => {
            read_until(&mut s, &received, |_| false).await;
            s.set_zero_linger().unwrap();
        }
        Does::AnswerThenClose => {
            read_until(&mut s, &received, |g| g.ends_with(b"\n")).await;
            let _ = s.write_all(b"partial").await;
        }
        Does::Answer => {
            let line = read_until(&mut s, &received, |g| g.ends_with(b"\n")).await;
            let _ = s.write_all(&[b"ok: ", &line[..]].concat()).await;
            let _ = s.shutdown().await;
            // Until the client closes.
            let _ = s.read(&mut [0u8; 16]).await;
        }
        Does::AnswerAtEnd => {
            let all = read_until(&mut s, &received, |_| false).await;
            let _ = s.write_all(&[b"ok: ", &all[..]].concat()).await;
        }
    }
}

/// A tunnel with one route over `targets` (the first one first), its
/// address and its access log.
async fn tunnel_over(
    targets: &[&Target],
    retry: bool,
) -> (Tunnel, SocketAddr, tempfile::NamedTempFile) {
    let log_file = tempfile::NamedTempFile::new().unwrap();
    let tunnel = Tunnel::new(
        Duration::from_secs(1),
        AccessLog::to_file(log_file.path()).unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let route = Route {
        balance: Policy::FirstAvailable,
        checks: false,
        connect_timeout: Period::from_secs(5),
        idle_timeout: Period::from_secs(60),
        retry_before_first_byte: retry,
        ..Route::new(
            "pool",
            vec![ListenAddr(addr)],
            targets
                .iter()
                .map(|t| t.addr.to_string().parse().unwrap())
                .collect(),
        )
    };
    tunnel
        .apply(vec![route], HashMap::from([(ListenAddr(addr), listener)]))
        .await
        .unwrap();
    (tunnel, addr, log_file)
}

/// Sends `request` (then the end of stream when `finish`), and reads
/// until the tunnel closes: what came, and whether it ended in a reset.
async fn ask(addr: SocketAddr, request: &[u8], finish: bool) -> (Vec<u8>, bool) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    if finish {
        s.shutdown().await.unwrap();
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(WAIT, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return (got, false),
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    if got.ends_with(b"\n") && !finish {
                        return (got, false);
                    }
                }
                Err(_) => return (got, true),
            }
        }
    })
    .await
    .expect("the tunnel answered or closed in time")
}

/// The access log's first line, waiting for it.
async fn log_line(file: &tempfile::NamedTempFile) -> String {
    let end = tokio::time::Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(file.path()).unwrap();
        if let Some(line) = text.lines().next() {
            return line.to_string();
        }
        assert!(tokio::time::Instant::now() < end, "no access-log line");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of a metric line that starts with `name`.
fn metric(tunnel: &Tunnel, name: &str) -> String {
    let text = tunnel.metrics().render();
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .trim()
        .to_string()
}

#[tokio::test]
async fn a_target_that_closes_at_once_is_skipped_and_counted() {
    let bad = target(Does::Close).await;
    let good = target(Does::Answer).await;
    let (tunnel, addr, log) = tunnel_over(&[&bad, &good], true).await;
    let (answer, reset) = ask(addr, REQUEST, false).await;
    assert_eq!(answer, [b"ok: ", REQUEST].concat());
    assert!(!reset);
    assert_eq!(
        bad.accepted.load(Ordering::SeqCst),
        1,
        "the bad one was tried"
    );
    assert_eq!(good.received.load(Ordering::SeqCst), REQUEST.len());
    let line = log_line(&log).await;
    assert!(line.contains(&format!("target={}", good.addr)), "{line}");
    // Closed, or reset when the request reached it after its close.
    assert!(
        line.contains(&format!("retried=1: {} ", bad.addr))
            && line.contains("the connection before answering"),
        "{line}"
    );
    assert_eq!(
        metric(
            &tunnel,
            &format!(
                "tunnel_retries_total{{route=\"pool\",target=\"{}\"}}",
                bad.addr
            )
        ),
        "1"
    );
    assert_eq!(
        metric(
            &tunnel,
            &format!(
                "tunnel_retries_total{{route=\"pool\",target=\"{}\"}}",
                good.addr
            )
        ),
        "0"
    );
}

#[tokio::test]
async fn a_target_that_resets_at_once_is_skipped() {
    let bad = target(Does::Reset).await;
    let good = target(Does::Answer).await;
    let (_tunnel, addr, log) = tunnel_over(&[&bad, &good], true).await;
    let (answer, reset) = ask(addr, REQUEST, false).await;
    assert_eq!(answer, [b"ok: ", REQUEST].concat());
    assert!(!reset);
    assert_eq!(bad.accepted.load(Ordering::SeqCst), 1);
    let line = log_line(&log).await;
    assert!(line.contains("retried=1: "), "{line}");
}

/// The request reached a target that read it and died: it is replayed, in
/// full, to the next.
#[tokio::test]
async fn a_request_read_by_a_dying_target_is_replayed() {
    let bad = target(Does::ReadThenClose(REQUEST.len())).await;
    let worse = target(Does::ReadThenClose(REQUEST.len())).await;
    let good = target(Does::Answer).await;
    let (_tunnel, addr, log) = tunnel_over(&[&bad, &worse, &good], true).await;
    let (answer, _) = ask(addr, REQUEST, false).await;
    assert_eq!(answer, [b"ok: ", REQUEST].concat());
    assert_eq!(bad.received.load(Ordering::SeqCst), REQUEST.len());
    assert_eq!(worse.received.load(Ordering::SeqCst), REQUEST.len());
    assert_eq!(good.received.load(Ordering::SeqCst), REQUEST.len());
    let line = log_line(&log).await;
    assert!(line.contains("retried=2: "), "{line}");
    assert!(line.contains(&format!("sent={} ", REQUEST.len())), "{line}");
}

/// A client that sent its end of stream is replayed with it; a target that
/// closes in good order after it has answered with nothing, which is not
/// retried.
#[tokio::test]
async fn the_clients_end_of_stream_is_replayed_and_an_empty_answer_kept() {
    let bad = target(Does::ReadAllThenReset).await;
    let good = target(Does::AnswerAtEnd).await;
    let (_tunnel, addr, _log) = tunnel_over(&[&bad, &good], true).await;
    let (answer, reset) = ask(addr, REQUEST, true).await;
    assert_eq!(answer, [b"ok: ", REQUEST].concat());
    assert!(!reset);

    let quiet = target(Does::ReadThenClose(usize::MAX)).await;
    let good = target(Does::AnswerAtEnd).await;
    let (_tunnel, addr, log) = tunnel_over(&[&quiet, &good], true).await;
    let (answer, reset) = ask(addr, REQUEST, true).await;
    assert_eq!((answer, reset), (Vec::new(), false));
    assert_eq!(quiet.received.load(Ordering::SeqCst), REQUEST.len());
    let line = log_line(&log).await;
    assert!(line.contains(&format!("target={}", quiet.addr)), "{line}");
    assert!(!line.contains("retried"), "{line}");
    assert_eq!(good.accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_target_that_answered_is_never_replayed() {
    let first = target(Does::AnswerThenClose).await;
    let second = target(Does::Answer).await;
    let (_tunnel, addr, log) = tunnel_over(&[&first, &second], true).await;
    let (answer, _) = ask(addr, REQUEST, false).await;
    assert_eq!(answer, b"partial");
    let line = log_line(&log).await;
    assert!(line.contains(&format!("target={}", first.addr)), "{line}");
    assert!(line.contains("closed by target"), "{line}");
    assert!(!line.contains("retried"), "{line}");
    assert_eq!(second.accepted.load(Ordering::SeqCst), 0);
    assert_eq!(second.received.load(Ordering::SeqCst), 0);
}

/// More than 16 KiB from the client before an answer: nothing is held any
/// more, and the target's close reaches the client.
#[tokio::test]
async fn more_than_the_held_limit_turns_the_replay_off() {
    let big = vec![b'x'; tunnel::retry::HOLD_MAX + 4096];
    let first = target(Does::ReadThenClose(big.len())).await;
    let second = target(Does::Answer).await;
    let (_tunnel, addr, log) = tunnel_over(&[&first, &second], true).await;
    let (answer, _) = ask(addr, &big, false).await;
    assert!(answer.is_empty());
    assert_eq!(first.received.load(Ordering::SeqCst), big.len());
    let line = log_line(&log).await;
    assert!(line.contains(&format!("target={}", first.addr)), "{line}");
    assert_eq!(second.accepted.load(Ordering::SeqCst), 0);

    // At the limit, the replay still happens.
    let exact = vec![b'y'; tunnel::retry::HOLD_MAX - 1];
    let request = [&exact[..], b"\n"].concat();
    let first = target(Does::ReadThenClose(request.len())).await;
    let second = target(Does::Answer).await;
    let (_tunnel, addr, _log) = tunnel_over(&[&first, &second], true).await;
    let (answer, _) = ask(addr, &request, false).await;
    assert_eq!(answer, [b"ok: ", &request[..]].concat());
}

#[tokio::test]
async fn with_the_setting_off_the_client_sees_the_close() {
    let bad = target(Does::ReadThenClose(REQUEST.len())).await;
    let good = target(Does::Answer).await;
    let (_tunnel, addr, log) = tunnel_over(&[&bad, &good], false).await;
    let (answer, _) = ask(addr, REQUEST, false).await;
    assert!(answer.is_empty());
    let line = log_line(&log).await;
    assert!(line.contains(&format!("target={}", bad.addr)), "{line}");
    assert!(line.contains("closed by target"), "{line}");
    assert_eq!(good.accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn when_every_target_fails_the_log_names_each_attempt() {
    let one = target(Does::Close).await;
    let two = target(Does::Reset).await;
    let (tunnel, addr, log) = tunnel_over(&[&one, &two], true).await;
    let (answer, _) = ask(addr, REQUEST, false).await;
    assert!(answer.is_empty());
    let line = log_line(&log).await;
    assert!(line.contains("end=\"target unreachable\""), "{line}");
    for t in [&one, &two] {
        assert!(
            line.contains(&format!("{} ", t.addr)),
            "{} not named: {line}",
            t.addr
        );
    }
    assert!(line.contains("no other target to try"), "{line}");
    assert_eq!(
        metric(
            &tunnel,
            "tunnel_connections_unavailable_total{route=\"pool\"}"
        ),
        "1"
    );
}

#[tokio::test]
async fn a_retry_sends_the_proxy_header_again_before_the_held_bytes() {
    let (closes, answers) = (target(Does::Close).await, target(Does::AnswerAtEnd).await);
    let log_file = tempfile::NamedTempFile::new().unwrap();
    let tunnel = Tunnel::new(
        Duration::from_secs(1),
        AccessLog::to_file(log_file.path()).unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let route = Route {
        balance: Policy::FirstAvailable,
        checks: false,
        retry_before_first_byte: true,
        send_proxy: Some(common::proxy::Version::V1),
        ..Route::new(
            "pool",
            vec![ListenAddr(addr)],
            vec![
                closes.addr.to_string().parse().unwrap(),
                answers.addr.to_string().parse().unwrap(),
            ],
        )
    };
    tunnel
        .apply(vec![route], HashMap::from([(ListenAddr(addr), listener)]))
        .await
        .unwrap();
    let (got, reset) = ask(addr, REQUEST, true).await;
    assert!(!reset);
    let got = String::from_utf8(got).unwrap();
    // The second target got a header of its own, then the held request.
    assert!(
        got.starts_with("ok: PROXY TCP4 127.0.0.1 127.0.0.1 "),
        "{got:?}"
    );
    assert!(
        got.ends_with(&format!(
            " {}\r\n{}",
            addr.port(),
            String::from_utf8_lossy(REQUEST)
        )),
        "{got:?}"
    );
    assert_eq!(closes.accepted.load(Ordering::SeqCst), 1);
    assert!(log_line(&log_file).await.contains("retried=1"));
    tunnel.shutdown().await;
}
