//! End-to-end: the real `square-server` and `square-client` binaries, as a
//! user runs them: numbers as arguments, a stream on stdin (in constant
//! memory however long), bad input in the middle, `--json`, an unreachable
//! server, a server that never answers, closed output streams, and the exit
//! statuses.

use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tests::binary;

/// A running square-server on a free loopback port, stopped on drop.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start() -> Server {
        let mut child = Command::new(binary("square-server"))
            .args(["--listen", "127.0.0.1:0", "--log-level", "info"])
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("square-server starts");
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let mut addr = None;
        for line in stderr.lines() {
            let line = line.unwrap();
            if line.contains("listening") {
                let at = line.find("addr=").expect("the address is logged") + 5;
                addr = Some(line[at..].split_whitespace().next().unwrap().to_string());
                break;
            }
        }
        Server {
            child,
            addr: addr.expect("square-server logs where it listens"),
        }
    }

    /// Sends `signal` (by name, as `kill -s` takes it): STOP pauses the
    /// server, CONT resumes it.
    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args(["-s", signal, &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -s {signal} failed");
    }

    fn client(&self) -> Command {
        let mut command = Command::new(binary("square-client"));
        command
            .args(["--server", &self.addr])
            .env_remove("SQUARE_CLIENT_SERVER");
        command
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn with_stdin(mut command: Command, input: &[u8]) -> Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    // Written from a thread so a full stdout pipe cannot block us both.
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    output
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[test]
fn squares_a_number_given_as_an_argument() {
    let server = Server::start();
    let out = server.client().arg("12").output().unwrap();
    assert_eq!(text(&out.stdout), "144\n");
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn squares_several_arguments_in_order() {
    let server = Server::start();
    let out = server
        .client()
        .args(["-3", "1.5", ".5", "2.50", "12345678901234567890"])
        .output()
        .unwrap();
    assert_eq!(
        text(&out.stdout),
        "9\n2.25\n0.25\n6.25\n152415787532388367501905199875019052100\n"
    );
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn streams_standard_input() {
    let server = Server::start();
    let input: String = (0..50_000u64).map(|i| format!("{i}\n")).collect();
    let out = with_stdin(server.client(), input.as_bytes());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let squares: Vec<u64> = text(&out.stdout)
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(squares, (0..50_000u64).map(|i| i * i).collect::<Vec<_>>());
}

/// The `i`th number of [`stream_peak_rss`]: 50 digits, every other one
/// negative, so that the input and output are large next to the client's
/// own footprint.
fn big_number(i: u64) -> String {
    let sign = if i % 2 == 1 { "-" } else { "" };
    format!("{sign}1{:049}", i * 7919)
}

/// The square of [`big_number`]`(i)`: (10^49 + k)^2 = 10^98 + 2k 10^49 + k^2,
/// where 2k and k^2 are both below 10^49.
fn big_square(i: u64) -> String {
    let k = u128::from(i * 7919);
    format!("1{:049}{:049}", 2 * k, k * k)
}

/// The peak resident set (`VmHWM`) of a running process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/status: {e}"));
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no VmHWM in /proc/{pid}/status:\n{status}"));
    assert!(kib > 0, "VmHWM of {pid} is 0");
    kib
}

/// What [`stream_peak_rss`] saw.
struct Streamed {
    /// The client's peak resident set, KiB.
    peak_kib: u64,
    /// Bytes of input.
    input_bytes: u64,
    /// Bytes of input the client had taken when it stopped reading, with
    /// the server paused.
    taken_while_paused: u64,
}

/// Streams `count` [`big_number`]s through a square-client on stdin, checks
/// every answer, and returns the client's peak RSS and how much input it
/// took with the server paused.
///
/// The server is stopped (SIGSTOP) until the client stops taking input, so
/// a client that reads its input ahead of what the server takes would hold
/// the whole of it; then it is resumed. The peak is read once every answer is in but
/// while stdin is still open, so the client is alive and has done all its
/// work.
fn stream_peak_rss(server: &Server, count: u64) -> Streamed {
    server.signal("STOP");
    let mut child = server
        .client()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    // Generated and written from a thread, which hands stdin back open.
    let written = Arc::new(AtomicU64::new(0));
    let progress = written.clone();
    let writer = std::thread::spawn(move || -> std::io::Result<_> {
        let mut input = BufWriter::with_capacity(16 * 1024, stdin);
        let mut bytes = 0;
        for i in 0..count {
            let line = big_number(i);
            input.write_all(line.as_bytes())?;
            input.write_all(b"\n")?;
            bytes += line.len() as u64 + 1;
            progress.store(bytes, Ordering::Relaxed);
        }
        Ok((input.into_inner().map_err(|e| e.into_error())?, bytes))
    });
    // Read as it comes, so a full stderr pipe cannot stall the client.
    let mut stderr_pipe = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut stderr = String::new();
        let _ = stderr_pipe.read_to_string(&mut stderr);
        stderr
    });

    // Resume the server once the input has stopped moving (or is all in).
    let mut taken_while_paused = 0;
    let mut still = 0;
    let give_up = Instant::now() + Duration::from_secs(20);
    while still < 5 && !writer.is_finished() && Instant::now() < give_up {
        std::thread::sleep(Duration::from_millis(100));
        let now = written.load(Ordering::Relaxed);
        still = if now == taken_while_paused {
            still + 1
        } else {
            0
        };
        taken_while_paused = now;
    }
    let taken_while_paused = written.load(Ordering::Relaxed);
    server.signal("CONT");

    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    for i in 0..count {
        line.clear();
        let read = stdout.read_line(&mut line).unwrap();
        if read == 0 {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "square-client stopped after {i} of {count} answers: {}",
                stderr.join().unwrap()
            );
        }
        assert_eq!(line.trim_end(), big_square(i), "answer {i} of {count}");
    }
    let peak = peak_rss_kib(child.id());

    let (stdin, bytes) = writer.join().unwrap().expect("the input is written");
    drop(stdin);
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "", "answers beyond the {count} requests");
    let status = child.wait().unwrap();
    let stderr = stderr.join().unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_eq!(stderr, "");
    Streamed {
        peak_kib: peak,
        input_bytes: bytes,
        taken_while_paused,
    }
}

#[test]
fn streams_standard_input_in_constant_memory() {
    let server = Server::start();
    let small = stream_peak_rss(&server, 30_000);
    let large = stream_peak_rss(&server, 300_000);
    eprintln!(
        "square-client peak RSS: {} KiB for 30,000 lines ({} bytes), \
         {} KiB for 300,000 lines ({} bytes, {} taken with the server paused)",
        small.peak_kib,
        small.input_bytes,
        large.peak_kib,
        large.input_bytes,
        large.taken_while_paused
    );
    // Backpressure reaches stdin: with the server paused the client stops
    // reading once its window and the socket buffers are full.
    assert!(
        large.taken_while_paused < large.input_bytes / 2,
        "with the server paused square-client read {} of {} bytes of input",
        large.taken_while_paused,
        large.input_bytes
    );
    let allowed_growth = small.peak_kib / 2 + 4 * 1024;
    assert!(
        large.peak_kib <= small.peak_kib + allowed_growth,
        "10 times the input took {} KiB at peak against {} KiB: memory grows with the input",
        large.peak_kib,
        small.peak_kib
    );
    // The test can tell: a client that kept its input would be over.
    assert!(
        (large.input_bytes - small.input_bytes) / 1024 > allowed_growth,
        "the inputs differ by too little to show growth"
    );
}

#[test]
fn bad_input_in_a_stream_fails_at_the_end_and_the_rest_is_answered() {
    let server = Server::start();
    let out = with_stdin(server.client(), b"2\nseven\n3\r\n\n4");
    assert_eq!(text(&out.stdout), "4\n9\n16\n");
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("square-client: \"seven\" is not a number"),
        "{stderr}"
    );
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn json_output_for_scripts() {
    let server = Server::start();
    let out = server
        .client()
        .args(["--json", "12", "x"])
        .output()
        .unwrap();
    let lines: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines[0],
        serde_json::json!({"input": "12", "square": "144"})
    );
    assert_eq!(lines[1]["input"], "x");
    assert!(lines[1]["error"]
        .as_str()
        .unwrap()
        .contains("is not a number"));
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn the_server_address_comes_from_the_environment() {
    let server = Server::start();
    let out = Command::new(binary("square-client"))
        .env("SQUARE_CLIENT_SERVER", &server.addr)
        .arg("-4")
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout), "16\n");
}

#[test]
fn an_unreachable_server_exits_69_with_one_line() {
    // A port that was just free: bind, note it, release it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(binary("square-client"))
        .args(["--server", &format!("127.0.0.1:{port}"), "12"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
    assert!(out.stdout.is_empty());
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot reach the square server at 127.0.0.1:{port}"
        )),
        "{stderr}"
    );
}

#[test]
fn usage_and_configuration_errors_exit_64() {
    let out = Command::new(binary("square-client"))
        .args(["--server", "no-port-here", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(
        text(&out.stderr).contains("--server"),
        "{}",
        text(&out.stderr)
    );

    let out = Command::new(binary("square-client"))
        .arg("--no-such-flag")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));

    let out = Command::new(binary("square-server"))
        .args(["--listen", "nowhere"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn a_busy_port_names_the_flag_to_change() {
    let server = Server::start();
    let out = Command::new(binary("square-server"))
        .args(["--listen", &server.addr])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("already in use"), "{stderr}");
    assert!(stderr.contains("SQUARE_SERVER_LISTEN"), "{stderr}");
}

/// A listener that accepts connections and never answers them (nor reads
/// them): the server that hangs, for the client's timeouts.
struct Silent {
    addr: String,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Silent {
    fn start() -> Silent {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => held.push(stream),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Silent {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Runs `command` with `input` on stdin, killing it (and failing) if it is
/// still running after `limit`.
fn run_within(mut command: Command, input: &[u8], limit: Duration) -> (Output, Duration) {
    let started = Instant::now();
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} is still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = started.elapsed();
    (child.wait_with_output().unwrap(), took)
}

#[test]
fn a_server_that_never_answers_is_given_up_after_the_reply_timeout() {
    let silent = Silent::start();
    let client = || {
        let mut command = Command::new(binary("square-client"));
        command
            .args(["--server", &silent.addr])
            .env_remove("SQUARE_CLIENT_SERVER")
            .env_remove("SQUARE_CLIENT_REPLY_TIMEOUT");
        command
    };
    // The default timeout, 30 s: started first, checked last.
    let default_started = Instant::now();
    let mut by_default = client()
        .arg("12")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A number as an argument, with the flag.
    let mut with_flag = client();
    with_flag.args(["--reply-timeout", "1s", "12"]);
    // Numbers on stdin, with the environment variable.
    let mut with_env = client();
    with_env.env("SQUARE_CLIENT_REPLY_TIMEOUT", "500ms");
    for (command, input, timeout, shown) in [
        (with_flag, &b""[..], Duration::from_secs(1), "1s"),
        (
            with_env,
            &b"12\n13\n"[..],
            Duration::from_millis(500),
            "500ms",
        ),
    ] {
        let (out, took) = run_within(command, input, Duration::from_secs(20));
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(69), "{stderr}");
        assert!(out.stdout.is_empty());
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        for part in [
            format!(
                "the square server at {} sent no answer for {shown}",
                silent.addr
            ),
            "--reply-timeout or SQUARE_CLIENT_REPLY_TIMEOUT".to_string(),
        ] {
            assert!(stderr.contains(&part), "{stderr}");
        }
        assert!(
            took >= timeout,
            "gave up after {took:?}, before {timeout:?}"
        );
    }
    // Numbers on a stdin that stays open: the exit does not wait for it.
    let mut typing = client()
        .args(["--reply-timeout", "1s"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = typing.stdin.take().unwrap();
    stdin.write_all(b"12\n").unwrap();
    let typed = Instant::now();
    while typing.try_wait().unwrap().is_none() {
        if typed.elapsed() > Duration::from_secs(20) {
            let _ = typing.kill();
            let _ = typing.wait();
            panic!("square-client still runs 20 s after a 1s reply timeout, stdin open");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = typing.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(69), "{}", text(&out.stderr));
    drop(stdin);

    while by_default.try_wait().unwrap().is_none() {
        if default_started.elapsed() > Duration::from_secs(90) {
            let _ = by_default.kill();
            let _ = by_default.wait();
            panic!("square-client still waits for an answer after 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = default_started.elapsed();
    let out = by_default.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(stderr.contains("sent no answer for 30s"), "{stderr}");
    assert!(took >= Duration::from_secs(30), "gave up after {took:?}");
}

#[test]
fn waiting_for_input_is_not_bounded_by_the_reply_timeout() {
    let server = Server::start();
    let mut child = server
        .client()
        .args(["--reply-timeout", "300ms"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdin.write_all(b"3\n").unwrap();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "9\n");
    // Everything sent is answered: a user who types slowly is no timeout.
    // A duration by design: a pause longer than the 300 ms reply timeout.
    std::thread::sleep(Duration::from_secs(1));
    stdin.write_all(b"4\n").unwrap();
    line.clear();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "16\n");
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

/// The write end of a pipe whose read end is already closed: writing to it
/// fails (EPIPE), as for `square-client ... | true`.
fn closed_pipe() -> Stdio {
    let (read, write) = nix::unistd::pipe().unwrap();
    drop(read);
    Stdio::from(write)
}

#[test]
fn a_closed_stdout_or_stderr_is_no_crash() {
    let server = Server::start();
    // The exit status, and stderr when it is not the closed pipe.
    let run = |mut command: Command, stdout: Stdio, closed_stderr: bool| {
        let stderr = if closed_stderr {
            closed_pipe()
        } else {
            Stdio::piped()
        };
        let mut child = command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap();
        let give_up = Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > give_up {
                let _ = child.kill();
                panic!("{command:?} is still running after 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        (out.status.code(), text(&out.stderr))
    };
    // `square-client 3 | true`: the answer has nowhere to go; nothing to say.
    let mut squares = server.client();
    squares.arg("3");
    assert_eq!(run(squares, closed_pipe(), false), (Some(1), String::new()));

    let mut print_config = server.client();
    print_config.arg("--print-config");
    assert_eq!(
        run(print_config, closed_pipe(), false),
        (Some(0), String::new())
    );

    // Refusals and failures are reported on stderr, which is closed.
    let mut refused = server.client();
    refused.arg("x");
    assert_eq!(run(refused, Stdio::null(), true).0, Some(1));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut unreachable = Command::new(binary("square-client"));
    unreachable.args(["--server", &format!("127.0.0.1:{port}"), "12"]);
    assert_eq!(run(unreachable, Stdio::null(), true).0, Some(69));
}
