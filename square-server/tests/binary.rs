//! The real `square-server` binary against clients that misbehave and an
//! operator's mistakes: clients that pipeline and never read their answers
//! (memory per connection, and memory given back when they leave), clients
//! that pipeline big numbers (what another client's small request waits),
//! a closed stderr while refusing clients, and settings that cannot work.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

const BINARY: &str = env!("CARGO_BIN_EXE_square-server");

/// Held by the tests that load a server and measure it, so that they do
/// not run at the same time.
static HEAVY: Mutex<()> = Mutex::new(());

/// A square-server process on a free loopback port, killed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    /// Starts square-server with `args` and `env`. With `keep_stderr`, its
    /// log is read as it comes; without, the read end of its stderr is
    /// closed as soon as it says where it listens.
    fn start(args: &[&str], env: &[(&str, &str)], keep_stderr: bool) -> Server {
        let mut command = Command::new(BINARY);
        command
            .args(["--listen", "127.0.0.1:0", "--log-level", "info"])
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("square-server starts");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (found, addr) = mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stderr).lines();
            for line in lines.by_ref() {
                let Ok(line) = line else { return };
                sink.lock().unwrap().push_str(&line);
                sink.lock().unwrap().push('\n');
                if let Some(at) = line.find("addr=") {
                    let addr = line[at + 5..].split_whitespace().next().unwrap();
                    let _ = found.send(addr.parse::<SocketAddr>().unwrap());
                    break;
                }
            }
            if keep_stderr {
                for line in lines.map_while(Result::ok) {
                    sink.lock().unwrap().push_str(&line);
                    sink.lock().unwrap().push('\n');
                }
            }
            // Otherwise the pipe's read end closes here.
        });
        let addr = match addr.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "square-server did not say where it listens: {}",
                    log.lock().unwrap()
                );
            }
        };
        Server { child, addr }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Asks one question on a new connection.
    fn ask(&self, request: &str) -> String {
        let mut stream = TcpStream::connect(self.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        stream.write_all(format!("{request}\n").as_bytes()).unwrap();
        let mut answer = String::new();
        BufReader::new(stream).read_line(&mut answer).unwrap();
        answer.trim_end().to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A field of `/proc/PID/status` in KiB (`VmRSS`, `RssAnon`).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// CPU time the process has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses; utime and
    // stime are the 14th and 15th fields of the line.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Waits until the process has used no CPU for a while: it has done all
/// the work its clients gave it and waits on them.
fn wait_until_idle(pid: u32) {
    let give_up = Instant::now() + Duration::from_secs(120);
    let mut ticks = cpu_ticks(pid);
    let mut still = 0;
    while still < 3 {
        assert!(
            Instant::now() < give_up,
            "square-server is still busy after 2 minutes"
        );
        std::thread::sleep(Duration::from_millis(200));
        let now = cpu_ticks(pid);
        still = if now == ticks { still + 1 } else { 0 };
        ticks = now;
    }
}

/// Requests that cost a server the most memory per byte read: a
/// 10,000-digit number (a 20,000-byte square), then empty lines (each a
/// 53-byte `ERR` for one byte), words and small numbers. One round is
/// answered with more than a loopback socket's send buffer takes (over a
/// MiB), so a client that never reads blocks the server within it.
fn costly_requests() -> Vec<u8> {
    let mut requests = Vec::new();
    requests.push(b'-');
    requests.extend(std::iter::repeat_n(b'7', 10_000));
    requests.push(b'\n');
    requests.extend(std::iter::repeat_n(b'\n', 30_000));
    for _ in 0..100 {
        requests.extend_from_slice(b"x\n12\n");
    }
    requests
}

/// A client that writes [`costly_requests`] over and over and never reads:
/// it returns once the server has stopped taking its input. Its receive
/// buffer is small, so that the answers pile up in the server rather than
/// in the kernel.
async fn never_reads(addr: SocketAddr, requests: Arc<Vec<u8>>) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.set_send_buffer_size(16 * 1024).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(1), stream.write_all(&requests)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("the server dropped a client that was still writing: {e}"),
            Err(_) => return stream,
        }
    }
}

#[test]
fn clients_that_never_read_cost_bounded_memory_given_back_when_they_leave() {
    const CLIENTS: usize = 300;
    let _alone = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let server = Server::start(&[], &[], true);
    let pid = server.pid();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let requests = Arc::new(costly_requests());

    // Every kind of answer once, read to the end, so that the code and the
    // threads they need are in place before the start is measured.
    let mut warm = TcpStream::connect(server.addr).unwrap();
    warm.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    warm.write_all(&requests).unwrap();
    warm.shutdown(Shutdown::Write).unwrap();
    let mut answers = Vec::new();
    warm.read_to_end(&mut answers).unwrap();
    assert_eq!(answers.iter().filter(|&&b| b == b'\n').count(), 30_201);
    drop(warm);
    wait_until_idle(pid);
    let descriptors = open_descriptors(pid);
    let start_kib = status_kib(pid, "VmRSS");
    let start_anon_kib = status_kib(pid, "RssAnon");

    let clients = runtime.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..CLIENTS {
            tasks.spawn(never_reads(server.addr, requests.clone()));
        }
        tasks.join_all().await
    });
    wait_until_idle(pid);
    assert_eq!(
        open_descriptors(pid),
        descriptors + CLIENTS,
        "every client is connected"
    );
    let loaded_kib = status_kib(pid, "VmRSS");
    let loaded_anon_kib = status_kib(pid, "RssAnon");

    drop(clients);
    let give_up = Instant::now() + Duration::from_secs(60);
    while open_descriptors(pid) > descriptors {
        assert!(
            Instant::now() < give_up,
            "square-server still has {} connections a minute after its clients left",
            open_descriptors(pid) - descriptors
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_until_idle(pid);
    let after_kib = status_kib(pid, "VmRSS");
    let after_anon_kib = status_kib(pid, "RssAnon");

    let per_client = loaded_kib.saturating_sub(start_kib) / CLIENTS as u64;
    eprintln!(
        "square-server VmRSS: {start_kib} KiB at the start, {loaded_kib} KiB with {CLIENTS} \
         clients that never read ({per_client} KiB each), {after_kib} KiB after they left \
         (RssAnon {start_anon_kib}, {loaded_anon_kib}, {after_anon_kib} KiB)"
    );
    assert!(
        per_client < 200,
        "each client that never reads costs {per_client} KiB"
    );
    // What may stay: the heap arenas of the threads that square big numbers
    // (a few hundred KiB each, about one per processor), the allocator's
    // cache of small per-connection objects and code pages run for the
    // first time. Keeping the connections' buffers would keep most of what
    // the clients took, which is several times more.
    let processors = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let margin_kib = 2 * 1024 + 1024 * processors;
    assert!(
        loaded_kib - start_kib > 2 * margin_kib,
        "the clients took too little memory ({} KiB) for the test to tell",
        loaded_kib - start_kib
    );
    assert!(
        after_kib <= start_kib + margin_kib,
        "after its clients left square-server still holds {after_kib} KiB, \
         against {start_kib} KiB at the start"
    );
}

/// A client that pipelines 10,000-digit numbers as fast as the server
/// answers them, and reads (and counts) the answers.
struct Hog {
    stream: TcpStream,
    answers: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Hog {
    fn start(addr: SocketAddr) -> Hog {
        let stream = TcpStream::connect(addr).unwrap();
        let answers = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut requests = Vec::new();
        for i in 0..20u8 {
            requests.extend(std::iter::repeat_n(b'1' + i % 9, 10_000));
            requests.push(b'\n');
        }
        let mut writer = stream.try_clone().unwrap();
        let stopped = stop.clone();
        let write = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) && writer.write_all(&requests).is_ok() {}
        });
        let mut reader = stream.try_clone().unwrap();
        let count = answers.clone();
        let read = std::thread::spawn(move || {
            let mut buf = vec![0; 256 * 1024];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let lines = buf[..n].iter().filter(|&&b| b == b'\n').count();
                count.fetch_add(lines as u64, Ordering::Relaxed);
            }
        });
        Hog {
            stream,
            answers,
            stop,
            threads: vec![write, read],
        }
    }

    fn answers(&self) -> u64 {
        self.answers.load(Ordering::Relaxed)
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.stream.shutdown(Shutdown::Both);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Milliseconds each of `count` `12`s takes to be answered, one at a time
/// on one connection, a few milliseconds apart.
fn probe(addr: SocketAddr, count: usize) -> Vec<f64> {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    (0..count)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(5));
            let sent = Instant::now();
            writer.write_all(b"12\n").unwrap();
            line.clear();
            match reader.read_line(&mut line) {
                Ok(_) => assert_eq!(line, "144\n"),
                Err(e) => panic!("no answer to 12 within 10 s: {e}"),
            }
            sent.elapsed().as_secs_f64() * 1000.0
        })
        .collect()
}

fn sorted(mut latencies: Vec<f64>) -> Vec<f64> {
    latencies.sort_by(f64::total_cmp);
    latencies
}

#[test]
fn clients_pipelining_big_numbers_do_not_hold_up_a_small_request() {
    const PROBES: usize = 200;
    let _alone = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let server = Server::start(&[], &[], true);
    let idle = sorted(probe(server.addr, PROBES));
    let typical = idle[PROBES / 2];

    let hogs = [Hog::start(server.addr), Hog::start(server.addr)];
    let give_up = Instant::now() + Duration::from_secs(60);
    while hogs.iter().any(|hog| hog.answers() < 2) {
        assert!(
            Instant::now() < give_up,
            "the big numbers are not being answered"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let before: Vec<u64> = hogs.iter().map(Hog::answers).collect();
    let busy = sorted(probe(server.addr, PROBES));
    let during: Vec<u64> = hogs
        .iter()
        .zip(&before)
        .map(|(hog, before)| hog.answers() - before)
        .collect();
    drop(hogs);

    let worst = busy[PROBES - 1];
    eprintln!(
        "a 12 took {:.2} ms (median), {:.2} ms (99th percentile), {:.2} ms (worst) on an idle \
         server; {:.2}, {:.2}, {:.2} ms beside two clients pipelining 10,000-digit numbers, \
         which got {during:?} squares meanwhile",
        typical,
        idle[PROBES * 99 / 100],
        idle[PROBES - 1],
        busy[PROBES / 2],
        busy[PROBES * 99 / 100],
        worst,
    );
    // The probes ran while the big numbers were being squared.
    assert!(
        during.iter().all(|&squares| squares >= 10),
        "the big-number clients got {during:?} squares while the probes ran"
    );
    assert!(
        worst - typical < 50.0,
        "beside two clients pipelining big numbers a 12 waited up to {worst:.1} ms, \
         against {typical:.1} ms on an idle server"
    );
}

#[test]
fn refusing_clients_with_stderr_closed_keeps_the_server_serving() {
    let mut server = Server::start(&[], &[("SQUARE_SERVER_DENY", "127.0.0.2")], false);
    // Each refusal is logged at info, to a stderr no one reads any more.
    for _ in 0..20 {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket
            .bind(&"127.0.0.2:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        if socket.connect(&server.addr.into()).is_err() {
            // Nothing listens any more: the check below says why.
            break;
        }
        let mut stream = TcpStream::from(socket);
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut rest = Vec::new();
        // Closed by the server at once; a reset is as good as an EOF.
        let _ = stream.read_to_end(&mut rest);
        assert!(rest.is_empty(), "a refused client got {rest:?}");
    }
    // A duration: the refusals are written to the closed pipe by the log's
    // own thread, a moment after the clients see them, and a crash that
    // does not come is no event to wait for.
    std::thread::sleep(Duration::from_millis(200));
    if let Some(status) = server.child.try_wait().unwrap() {
        panic!("square-server exited ({status}) after refusing clients with its stderr closed");
    }
    assert_eq!(server.ask("12"), "144");
    assert_eq!(server.ask("-1.5"), "2.25");
    // And it stops as asked, saying so to no one.
    let status = Command::new("kill")
        .args(["-s", "TERM", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let give_up = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < give_up,
            "square-server still runs 30 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        status.code(),
        Some(0),
        "square-server stopped with {status}"
    );
}

/// Runs square-server with `args` and `env` and checks that it refuses to
/// start, with status 64 and one line holding every one of `expected`. One
/// that is still running after 20 s was not refused.
fn assert_refused(args: &[&str], env: &[(&str, &str)], expected: &[&str]) {
    let mut command = Command::new(BINARY);
    command
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().unwrap();
    let give_up = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > give_up {
            let _ = child.kill();
            let _ = child.wait();
            panic!("square-server started with {args:?} {env:?} instead of refusing them");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{args:?} {env:?}: {stderr}");
    for part in expected {
        assert!(stderr.contains(part), "{args:?} {env:?}: {stderr}");
    }
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn settings_that_cannot_work_are_refused_at_start() {
    assert_refused(
        &["--max-digits", "0"],
        &[],
        &["max_digits = 0 (from flag --max-digits)", "at least 1"],
    );
    assert_refused(
        &[],
        &[("SQUARE_SERVER_MAX_LINE", "0")],
        &[
            "max_line = 0 (from environment variable SQUARE_SERVER_MAX_LINE)",
            "at least 1",
        ],
    );
    let file = std::env::temp_dir().join(format!("square-server-{}.yaml", std::process::id()));
    std::fs::write(&file, "instance: test\nmax_line: 100\n").unwrap();
    let config = file.to_str().unwrap();
    assert_refused(
        &["--config", config],
        &[],
        &[
            &format!("max_line = 100 (from {config}:2:1)"),
            "set max_line to at least 10002, or lower max_digits",
        ],
    );
    let _ = std::fs::remove_file(&file);
    assert_refused(
        &["--max-digits", "20000"],
        &[],
        &["max_line = 16384", "at least 20002"],
    );
    assert_refused(
        &["--max-digits", "2000000"],
        &[],
        &["max_digits = 2000000", "at most 1000000"],
    );
    assert_refused(
        &["--max-line", "4000000000"],
        &[],
        &["max_line = 4000000000", "at most 1048576"],
    );
}
