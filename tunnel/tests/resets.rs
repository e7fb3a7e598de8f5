//! Resets pass through the tunnel over real TCP on loopback: when the target
//! resets, the client reads a reset (never a clean end of stream that would
//! make a truncated reply look complete), and the other way round; for
//! small messages (copied through memory) and bulk transfers (spliced).

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::settings::{ListenAddr, Period};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tunnel::access_log::AccessLog;
use tunnel::{Route, Tunnel};

const WAIT: Duration = Duration::from_secs(30);
/// Enough bytes that every read fills the relay's buffer, so the
/// direction has switched to splicing well before the reset.
const BULK: usize = 4 * 1024 * 1024;

/// A tunnel with one route to `target`, where it listens, and its access log.
async fn tunnel_to(target: SocketAddr) -> (Tunnel, SocketAddr, tempfile::NamedTempFile) {
    let log_file = tempfile::NamedTempFile::new().unwrap();
    let tunnel = Tunnel::new(
        Duration::from_secs(2),
        AccessLog::to_file(log_file.path()).unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let route = Route {
        idle_timeout: Period::from_secs(60),
        max_connections: 100,
        ..Route::new(
            "test",
            vec![ListenAddr(addr)],
            vec![target.to_string().parse().unwrap()],
        )
    };
    tunnel
        .apply(vec![route], HashMap::from([(ListenAddr(addr), listener)]))
        .await
        .unwrap();
    (tunnel, addr, log_file)
}

/// The first access-log line, waiting for it.
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

/// Closes `stream` with a reset, as a crashing or aborting peer does.
fn reset(stream: TcpStream) {
    stream.set_zero_linger().unwrap();
    drop(stream);
}

/// Reads until the stream ends or fails, counting into `count`; the result
/// of the last read.
async fn read_until_end(stream: &mut TcpStream, count: &AtomicUsize) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => return Ok(()),
            Ok(n) => {
                count.fetch_add(n, Ordering::SeqCst);
            }
            Err(e) => return Err(e),
        }
    }
}

#[tokio::test]
async fn a_target_reset_mid_reply_resets_the_client() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut request = [0u8; 5];
        s.read_exact(&mut request).await.unwrap();
        s.write_all(b"the first half of a rep").await.unwrap();
        reset(s);
    });
    let (tunnel, addr, log) = tunnel_to(target).await;
    let mut client = TcpStream::connect(addr).await.unwrap();
    client.write_all(b"query").await.unwrap();
    let mut reply = Vec::new();
    let read = tokio::time::timeout(WAIT, client.read_to_end(&mut reply))
        .await
        .expect("the client was left hanging");
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(ErrorKind::ConnectionReset),
        "a truncated reply ({} bytes) must end in a reset",
        reply.len()
    );
    let line = log_line(&log).await;
    assert!(line.contains("end=\"reset by target\""), "{line}");
    tunnel.shutdown().await;
}

#[tokio::test]
async fn a_client_reset_resets_the_target() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    let (got_request, request_seen) = oneshot::channel();
    let (target_read, read_result) = oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut request = [0u8; 5];
        s.read_exact(&mut request).await.unwrap();
        got_request.send(()).unwrap();
        let mut rest = Vec::new();
        let read = s.read_to_end(&mut rest).await.map_err(|e| e.kind());
        target_read.send(read).unwrap();
    });
    let (tunnel, addr, log) = tunnel_to(target).await;
    let mut client = TcpStream::connect(addr).await.unwrap();
    client.write_all(b"begin").await.unwrap();
    tokio::time::timeout(WAIT, request_seen)
        .await
        .expect("the request did not reach the target")
        .unwrap();
    reset(client);
    let read = tokio::time::timeout(WAIT, read_result)
        .await
        .expect("the target was left hanging")
        .unwrap();
    assert_eq!(read, Err(ErrorKind::ConnectionReset));
    let line = log_line(&log).await;
    assert!(line.contains("end=\"reset by client\""), "{line}");
    tunnel.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_reset_during_a_bulk_reply_resets_the_client() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    let received = Arc::new(AtomicUsize::new(0));
    let seen = received.clone();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let chunk = vec![0x5au8; 64 * 1024];
        // Stream until the client has had plenty, then crash.
        while seen.load(Ordering::SeqCst) < BULK {
            if s.write_all(&chunk).await.is_err() {
                return;
            }
        }
        reset(s);
    });
    let (tunnel, addr, log) = tunnel_to(target).await;
    let mut client = TcpStream::connect(addr).await.unwrap();
    let read = tokio::time::timeout(WAIT, read_until_end(&mut client, &received))
        .await
        .expect("the client was left hanging");
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(ErrorKind::ConnectionReset),
        "a truncated bulk reply ({} bytes) must end in a reset",
        received.load(Ordering::SeqCst)
    );
    assert!(received.load(Ordering::SeqCst) >= BULK);
    let line = log_line(&log).await;
    assert!(line.contains("end=\"reset by target\""), "{line}");
    tunnel.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reset_during_a_bulk_upload_resets_the_target() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    let received = Arc::new(AtomicUsize::new(0));
    let counted = received.clone();
    let (target_read, read_result) = oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let read = read_until_end(&mut s, &counted).await.map_err(|e| e.kind());
        target_read.send(read).unwrap();
    });
    let (tunnel, addr, log) = tunnel_to(target).await;
    let mut client = TcpStream::connect(addr).await.unwrap();
    let chunk = vec![0xa5u8; 64 * 1024];
    tokio::time::timeout(WAIT, async {
        while received.load(Ordering::SeqCst) < BULK {
            client.write_all(&chunk).await.unwrap();
        }
    })
    .await
    .expect("the upload stalled");
    reset(client);
    let read = tokio::time::timeout(WAIT, read_result)
        .await
        .expect("the target was left hanging")
        .unwrap();
    assert_eq!(read, Err(ErrorKind::ConnectionReset));
    let line = log_line(&log).await;
    assert!(line.contains("end=\"reset by client\""), "{line}");
    tunnel.shutdown().await;
}
