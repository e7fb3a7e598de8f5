//! The real `tunnel` binary's readiness, `GET /readyz` on the admin
//! endpoint: ready while every route reaches a live target, not ready
//! (naming the route) when one does not, while shutting down, and after a
//! reload that adds a dead route; probes never flood a target however
//! often readiness is asked; an answer comes within the kubelet's 1 s even
//! when a target never answers.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tests::{binary, local, wait_for, Running};

/// A target that can be stopped and started again on the same address,
/// counting the connections it accepts; each is read until the peer
/// closes, then closed.
struct Target {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Target {
    fn on(addr: SocketAddr, accepted: Arc<AtomicUsize>) -> Target {
        let listener = TcpListener::bind(addr).unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopped) = (accepted.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        count.fetch_add(1, Ordering::SeqCst);
                        std::thread::spawn(move || {
                            let _ = stream.set_nonblocking(false);
                            let mut buf = [0u8; 1024];
                            while let Ok(n) = stream.read(&mut buf) {
                                if n == 0 || stream.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Target {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    fn start() -> Target {
        Target::on(local(0), Arc::default())
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    /// Stops listening: connects are refused.
    fn stop(mut self) -> (SocketAddr, Arc<AtomicUsize>) {
        self.halt();
        (self.addr, self.accepted.clone())
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Sends `method path` and returns the status code and the body.
fn request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {out:?}"));
    let body = out
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    request(addr, "GET", path)
}

/// Waits until `/readyz` answers `status`; returns that answer's body.
fn wait_ready(admin: SocketAddr, status: u16) -> String {
    let mut body = String::new();
    wait_for(
        || {
            let (got, text) = get(admin, "/readyz");
            body = text;
            got == status
        },
        &format!("/readyz to answer {status}"),
    );
    body
}

/// Where the routes listen, as configured: the tunnel chooses the ports,
/// and the readiness answer names a route by its configured addresses.
const LISTEN: &str = "127.0.0.1:0";

/// An address that refuses connections: a socket bound to a port the
/// kernel chose that does not listen, so the port is not free for another
/// program to take while the test runs.
fn refusing() -> (socket2::Socket, SocketAddr) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&local(0).into()).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    (socket, addr)
}

/// The tunnel in the quick form, `--target target`, on [`LISTEN`], with
/// the admin endpoint; `extra` arguments are added. Returns where the route
/// and the admin endpoint listen.
fn quick(target: &str, extra: &[&str]) -> (Running, SocketAddr, SocketAddr) {
    let mut command = Command::new(binary("tunnel"));
    command
        .args(["--listen", LISTEN, "--target", target])
        .args(["--admin", "127.0.0.1:0"])
        .args(extra);
    let mut tunnel = Running::start_reporting(command, "listen");
    let admin = tunnel.reported("", "admin");
    let listen = tunnel.addr;
    (tunnel, listen, admin)
}

fn write_config(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[test]
fn a_single_target_route_is_ready_while_its_target_listens() {
    let target = Target::start();
    let (_tunnel, _, admin) = quick(&target.addr.to_string(), &[]);
    assert_eq!(get(admin, "/readyz"), (200, "ready\n".into()));
    let (status, body) = request(admin, "HEAD", "/readyz");
    assert_eq!((status, body.as_str()), (200, ""));

    let (addr, accepted) = target.stop();
    let body = wait_ready(admin, 503);
    assert!(
        body.contains(&format!("route default (listen {LISTEN})")),
        "{body}"
    );
    assert!(body.contains("connection refused"), "{body}");
    let (status, body) = request(admin, "HEAD", "/readyz");
    assert_eq!((status, body.as_str()), (503, ""));
    // Liveness is the process, not its target.
    assert_eq!(get(admin, "/healthz"), (200, "ok\n".into()));

    let _target = Target::on(addr, accepted);
    assert_eq!(wait_ready(admin, 200), "ready\n");
}

#[test]
fn a_target_name_that_does_not_resolve_is_not_ready() {
    let (_tunnel, _, admin) = quick("no-such-host.invalid:5432", &["--connect-timeout", "2s"]);
    let body = wait_ready(admin, 503);
    assert!(
        body.contains(&format!("route default (listen {LISTEN})")),
        "{body}"
    );
    // Once the lookup has failed, the answer says so.
    wait_for(
        || get(admin, "/readyz").1.contains("no-such-host.invalid"),
        "the failed lookup in the answer",
    );
    assert_eq!(get(admin, "/healthz").0, 200);
}

#[test]
fn a_route_with_health_checks_is_ready_while_one_target_lives() {
    let (a, b) = (Target::start(), Target::start());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tunnel.yaml");
    write_config(
        &config,
        &format!(
            "admin: 127.0.0.1:0\nroutes:\n  - name: pool\n    listen: {LISTEN}\n    targets: [{}, {}]\n    health_check: {{interval: 100ms, timeout: 500ms, rise: 1, fall: 1}}\n",
            a.addr, b.addr
        ),
    );
    let mut command = Command::new(binary("tunnel"));
    command.arg("--config").arg(&config);
    let mut tunnel = Running::start_reporting(command, "admin");
    let admin = tunnel.addr;
    assert_eq!(wait_ready(admin, 200), "ready\n");

    let a_before = a.accepted();
    let (a_addr, _) = a.stop();
    // The checks eject a; b still lives.
    tunnel.wait_line(&format!("ejected route=\"pool\" target={a_addr} "));
    assert_eq!(get(admin, "/readyz"), (200, "ready\n".into()));
    assert!(a_before > 0, "the health checks never reached a");

    b.stop();
    let body = wait_ready(admin, 503);
    assert!(
        body.contains(&format!("route pool (listen {LISTEN})")),
        "{body}"
    );
    assert!(
        body.contains(&format!("{a_addr}: ejected by health checks")),
        "{body}"
    );
}

#[test]
fn many_readiness_requests_make_few_connections_to_the_target() {
    let target = Target::start();
    let (_tunnel, _listen, admin) = quick(&target.addr.to_string(), &[]);
    assert_eq!(wait_ready(admin, 200), "ready\n");
    let before = target.accepted();
    let started = Instant::now();
    let mut answers = Vec::new();
    for _wave in 0..4 {
        let wave: Vec<_> = (0..50)
            .map(|_| std::thread::spawn(move || get(admin, "/readyz").0))
            .collect();
        answers.extend(wave.into_iter().map(|t| t.join().unwrap()));
        // A duration: the waves are spread over more than one round's
        // freshness (1 s), as a kubelet's probes are.
        std::thread::sleep(Duration::from_millis(400));
    }
    let elapsed = started.elapsed();
    // A duration: the last round's connection may still wait for the
    // target's accept loop (it looks every 5 ms), and "no more to come" is
    // not an event.
    std::thread::sleep(Duration::from_millis(200));
    let made = target.accepted() - before;
    assert!(answers.iter().all(|s| *s == 200), "{answers:?}");
    // One round (one connection here) at most per second, plus the one
    // under way: 200 requests must not mean 200 connections.
    let bound = elapsed.as_secs() as usize + 2;
    assert!(
        made <= bound,
        "{made} connections to the target for 200 readiness requests in {elapsed:?} (at most {bound})"
    );
}

#[test]
fn a_target_that_never_answers_still_gets_an_answer_within_a_second() {
    // A listener with a backlog of 0 that never accepts: once its queue
    // holds a connection, further connects get no answer at all.
    let silent = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    silent.bind(&local(0).into()).unwrap();
    silent.listen(0).unwrap();
    let silent_addr = silent.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    loop {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        if socket
            .connect_timeout(&silent_addr.into(), Duration::from_millis(200))
            .is_err()
        {
            break;
        }
        fillers.push(socket);
        assert!(fillers.len() < 16, "the backlog never filled up");
    }
    let (_tunnel, _listen, admin) = quick(&silent_addr.to_string(), &["--connect-timeout", "5s"]);
    for _ in 0..3 {
        let started = Instant::now();
        let (status, body) = get(admin, "/readyz");
        let took = started.elapsed();
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("route default"), "{body}");
        // It waits about 0.8 s for the probe, far less than the 5 s
        // connect timeout; the bound is the rendered probe's timeout.
        assert!(
            took < Duration::from_secs(2),
            "/readyz took {took:?} with a target that never answers"
        );
    }
}

#[test]
fn a_draining_tunnel_is_not_ready() {
    let target = Target::start();
    let (mut tunnel, listen, admin) = quick(&target.addr.to_string(), &["--shutdown-grace", "60s"]);
    assert_eq!(wait_ready(admin, 200), "ready\n");
    let mut held = TcpStream::connect(listen).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    held.write_all(b"held").unwrap();
    let mut got = [0u8; 4];
    held.read_exact(&mut got).unwrap();

    tunnel.signal("TERM");
    wait_for(
        || tunnel.stderr().contains("draining"),
        "the drain to begin",
    );
    let (status, body) = get(admin, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("shutting down"), "{body}");
    // The target is fine: only the shutdown makes it unready.
    assert!(!body.contains("route default"), "{body}");
    assert!(tunnel.child.try_wait().unwrap().is_none());
    tunnel.signal("INT");
}

#[test]
fn a_reload_keeps_readiness_right_for_the_new_routes() {
    let target = Target::start();
    let (_held, dead) = refusing();
    // Two routes cannot both name 127.0.0.1:0: the second has an address
    // of its own.
    let second = "127.0.0.2:0";
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tunnel.yaml");
    let one = format!(
        "admin: 127.0.0.1:0\nroutes:\n  - name: first\n    listen: {LISTEN}\n    target: {}\n",
        target.addr
    );
    write_config(&config, &one);
    let mut command = Command::new(binary("tunnel"));
    command.arg("--config").arg(&config);
    let tunnel = Running::start_reporting(command, "admin");
    let admin = tunnel.addr;
    assert_eq!(wait_ready(admin, 200), "ready\n");

    write_config(
        &config,
        &format!("{one}  - name: second\n    listen: {second}\n    target: {dead}\n"),
    );
    tunnel.signal("HUP");
    wait_for(|| tunnel.stderr().contains("reloaded"), "the reload");
    let body = wait_ready(admin, 503);
    assert!(
        body.contains(&format!("route second (listen {second})")),
        "{body}"
    );
    assert!(!body.contains("route first"), "{body}");

    write_config(&config, &one);
    tunnel.signal("HUP");
    wait_for(
        || tunnel.stderr().matches("reloaded").count() == 2,
        "the second reload",
    );
    assert_eq!(wait_ready(admin, 200), "ready\n");
}
