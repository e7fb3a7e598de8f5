//! The real `echo-server` binary with real clients: Debian's `telnet` under
//! `expect`, and `nc`.

use std::net::SocketAddr;
use std::process::{Command, Stdio};

use tests::{binary, require, spawn_reporting, wait_for, Running};

fn start(extra: &[&str]) -> Running {
    let mut command = Command::new(binary("echo-server"));
    command.args(["--listen", "127.0.0.1:0"]).args(extra);
    Running::start_reporting(command, "listen")
}

/// Drives telnet through the menu the way a person would, and prints the
/// answers it saw between markers.
const TELNET_SESSION: &str = r#"
set timeout 10
log_user 1
spawn telnet [lindex $argv 0] [lindex $argv 1]
expect {
    "Your choice: " {}
    timeout { puts "\nFAIL no menu"; exit 1 }
}
send "1\r"
expect {
    -re {Current date: ([0-9]{4}-[0-9]{2}-[0-9]{2})\r\n} { puts "\nDATE=$expect_out(1,string)" }
    timeout { puts "\nFAIL no date"; exit 1 }
}
expect "Your choice: "
send "2\r"
expect {
    -re {Current time: ([0-9]{2}:[0-9]{2}:[0-9]{2})\r\n} { puts "\nTIME=$expect_out(1,string)" }
    timeout { puts "\nFAIL no time"; exit 1 }
}
expect "Your choice: "
send "what\r"
expect {
    -re {"what" is not on the menu[^\r]*\r\n} { puts "\nWRONG=ok" }
    timeout { puts "\nFAIL no explanation"; exit 1 }
}
expect "Your choice: "
send "9\r"
expect {
    "Goodbye." {}
    timeout { puts "\nFAIL no goodbye"; exit 1 }
}
expect {
    "Connection closed by foreign host." { puts "\nCLOSED=ok" }
    timeout { puts "\nFAIL not closed"; exit 1 }
}
expect eof
"#;

fn answer<'a>(output: &'a str, key: &str) -> &'a str {
    output
        .lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in the telnet session:\n{output}"))
}

#[test]
fn the_real_telnet_client_walks_the_menu() {
    require("telnet");
    let expect = require("expect");
    let server = start(&["--utc", "--instance", "echo-server_IN_3"]);
    let before = Command::new("date")
        .args(["-u", "+%F %T"])
        .output()
        .unwrap();
    let script = std::env::temp_dir().join(format!("telnet-session-{}.exp", std::process::id()));
    std::fs::write(&script, TELNET_SESSION).unwrap();
    let out = Command::new(expect)
        .arg(&script)
        .args(["127.0.0.1", &server.addr.port().to_string()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let after = Command::new("date")
        .args(["-u", "+%F %T"])
        .output()
        .unwrap();
    std::fs::remove_file(&script).unwrap();
    let output = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "telnet session failed:\n{output}");
    assert!(output.contains("instance echo-server_IN_3"), "{output}");

    let before = String::from_utf8(before.stdout).unwrap();
    let after = String::from_utf8(after.stdout).unwrap();
    let (day0, time0) = before.trim().split_once(' ').unwrap();
    let (day1, time1) = after.trim().split_once(' ').unwrap();
    let date = answer(&output, "DATE");
    assert!(
        date == day0 || date == day1,
        "date {date}, machine says {day0}..{day1}"
    );
    let time = answer(&output, "TIME");
    if day0 == day1 {
        assert!(
            time0 <= time && time <= time1,
            "time {time} not within {time0}..{time1}"
        );
    }
    answer(&output, "WRONG");
    answer(&output, "CLOSED");
    // Nothing but text reached the terminal: no negotiation bytes as garbage.
    assert!(
        !output.contains('\u{fffd}'),
        "garbage on the terminal:\n{output}"
    );
    let (code, _) = server.stop();
    assert_eq!(code, Some(0));
}

#[test]
fn nc_with_plain_line_feeds() {
    let nc = require("nc");
    let server = start(&["--utc"]);
    let mut child = Command::new(nc)
        .args(["-N", "127.0.0.1", &server.addr.port().to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"1\n2\n9\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("\r\nYour choice: Current date: "), "{text}");
    assert!(text.contains("Your choice: Current time: "), "{text}");
    assert!(text.ends_with("Your choice: Goodbye.\r\n"), "{text}");
}

#[test]
fn sigterm_tells_connected_users_and_exits_cleanly() {
    use std::io::{Read, Write};
    let server = start(&[]);
    let mut client = std::net::TcpStream::connect(server.addr).unwrap();
    client
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut greeting = [0u8; 64];
    let n = client.read(&mut greeting).unwrap();
    assert!(n > 0);
    // Make sure the whole menu is in before stopping.
    client.write_all(b"\n").unwrap();
    let (code, stderr) = server.stop();
    assert_eq!(code, Some(0), "{stderr}");
    let mut rest = String::new();
    client.read_to_string(&mut rest).unwrap();
    assert!(
        rest.ends_with("The service is going down now; goodbye.\r\n"),
        "{rest:?}"
    );
    assert!(stderr.contains("SIGTERM"), "{stderr}");
}

#[test]
fn bad_configuration_is_reported_whole_with_status_64() {
    let dir = std::env::temp_dir().join(format!("echo-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("echo.yaml");
    std::fs::write(
        &file,
        "utc: true\nmax_connections: -3\nidle_timeout: forever\n",
    )
    .unwrap();
    let out = Command::new(binary("echo-server"))
        .arg("--config")
        .arg(&file)
        .args(["--time-zone", "Nowhere/Special"])
        .env("ECHO_SERVER_LISTEN", "0.0.0.0:99999")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    let shown = file.display().to_string();
    assert!(err.contains("4 problems"), "{err}");
    assert!(
        err.contains(&format!("max_connections = -3 (from {shown}:2:1)")),
        "{err}"
    );
    assert!(
        err.contains(&format!("idle_timeout = \"forever\" (from {shown}:3:1)")),
        "{err}"
    );
    assert!(
        err.contains("(from environment variable ECHO_SERVER_LISTEN)"),
        "{err}"
    );
    assert!(
        err.contains("time_zone = \"Nowhere/Special\" (from flag --time-zone)"),
        "{err}"
    );

    let out = Command::new(binary("echo-server"))
        .args(["--config", "/does/not/exist.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/does/not/exist.yaml does not exist"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn print_config_shows_each_value_and_its_origin() {
    let out = Command::new(binary("echo-server"))
        .args(["--print-config", "--utc"])
        .env("ECHO_SERVER_IDLE_TIMEOUT", "90s")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let line = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("no {key} in\n{text}"))
            .to_string()
    };
    assert!(line("utc").ends_with("# flag --utc"), "{text}");
    assert!(line("idle_timeout").contains("\"90s\""), "{text}");
    assert!(line("idle_timeout").ends_with("# environment variable ECHO_SERVER_IDLE_TIMEOUT"));
    assert!(line("listen").contains("\"0.0.0.0:1234\""));
    assert!(line("listen").ends_with("# built-in default"));
}

#[test]
fn a_taken_address_names_the_flag_and_variable() {
    let server = start(&[]);
    let out = Command::new(binary("echo-server"))
        .args(["--listen", &server.addr.to_string()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{} is already in use; pass --listen or set ECHO_SERVER_LISTEN",
            server.addr
        )),
        "{err}"
    );
}

#[test]
fn json_logs_carry_the_connection_span() {
    let mut server = start(&["--log-format", "json", "--log-level", "debug"]);
    {
        use std::io::Read;
        let mut c = std::net::TcpStream::connect(server.addr).unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 16];
        let _ = c.read(&mut buf).unwrap();
    }
    let accepted = server.wait_line("\"accepted\"");
    assert!(accepted.starts_with('{'), "{accepted}");
    assert!(accepted.contains("\"peer\":\"127.0.0.1:"), "{accepted}");
    assert!(accepted.contains("\"id\":"), "{accepted}");
}

/// Runs the binary with `args` and `env` for at most 10 s: its exit status
/// (none if it was still running and was killed) and its stderr.
fn run_briefly(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    use std::io::Read;
    let mut child = Command::new(binary("echo-server"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if std::time::Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (code, err)
}

#[test]
fn settings_that_cannot_work_are_refused_with_status_64() {
    let listen = ["--listen", "127.0.0.1:0"];
    // Flags, environment, and what the refusal says.
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 5] = [
        (
            &[],
            &[("ECHO_SERVER_MAX_LINE", "0")],
            "max_line = 0 (from environment variable ECHO_SERVER_MAX_LINE): the line limit must be 1 to 65536 bytes",
        ),
        (
            &[],
            &[("ECHO_SERVER_MAX_LINE", "99999999999999")],
            "max_line = 99999999999999 (from environment variable ECHO_SERVER_MAX_LINE): the line limit must be 1 to 65536 bytes",
        ),
        (
            &["--instance", "a\u{1b}[2Jb"],
            &[],
            "instance = \"a\\u{1b}[2Jb\" (from flag --instance): the instance id has control characters",
        ),
        (
            &["--instance", ""],
            &[],
            "(from flag --instance): the instance id is empty",
        ),
        (
            &["--utc"],
            &[("ECHO_SERVER_TIME_ZONE", "Asia/Kolkata")],
            "time_zone = \"Asia/Kolkata\" (from environment variable ECHO_SERVER_TIME_ZONE): utc = true (from flag --utc) chooses a zone too; keep one of the two settings",
        ),
    ];
    for (args, env, expected) in cases {
        let args: Vec<&str> = listen.iter().chain(args).copied().collect();
        let (code, err) = run_briefly(&args, env);
        assert_eq!(code, Some(64), "{args:?} {env:?} was not refused:\n{err}");
        assert!(err.contains(expected), "{args:?} {env:?}:\n{err}");
    }
}

#[test]
fn a_closed_stderr_changes_nothing() {
    use std::io::{Read, Write};
    use std::time::Duration;
    let mut command = Command::new(binary("echo-server"));
    command
        .args(["--listen", "127.0.0.1:0"])
        .env("ECHO_SERVER_DENY", "127.0.0.2")
        .stdout(Stdio::null());
    let (mut child, addrs, stderr) = spawn_reporting(command, &["listen"]);
    let _kill = KillOnDrop(child.id());
    let addr = addrs[0];
    // Nobody reads the log any more: every write to it fails (EPIPE).
    drop(stderr);

    // Refused clients: each refusal is logged, and the log is gone.
    for _ in 0..3 {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket
            .bind(&SocketAddr::from(([127, 0, 0, 2], 0)).into())
            .unwrap();
        if let Err(e) = socket.connect(&addr.into()) {
            panic!(
                "cannot connect ({e}): the server exited ({:?}) after refusing a client with its stderr closed",
                child.try_wait()
            );
        }
        let mut denied: std::net::TcpStream = socket.into();
        denied
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = Vec::new();
        let _ = denied.read_to_end(&mut buf);
        assert!(buf.is_empty(), "a denied client was sent {buf:?}");
        // A duration: the refusal is written to the closed pipe by the
        // log's own thread, a moment after the client sees it, and a crash
        // that does not come is no event to wait for.
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            child.try_wait().unwrap(),
            None,
            "the server exited after refusing a client with its stderr closed"
        );
    }

    // Everyone else is served, and told when a line is too long.
    let connect = || {
        let c = std::net::TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c
    };
    let mut c = connect();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).ends_with("Your choice: ") {
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0, "closed before the menu");
        seen.extend_from_slice(&buf[..n]);
    }
    c.write_all(&[b'7'; 2000]).unwrap();
    let mut rest = String::new();
    c.read_to_string(&mut rest).unwrap();
    assert_eq!(
        rest,
        "\r\nLine too long (over 1024 bytes); closing the connection.\r\n"
    );
    let mut nc = connect();
    nc.write_all(b"9\n").unwrap();
    let mut all = String::new();
    nc.read_to_string(&mut all).unwrap();
    assert!(all.ends_with("Your choice: Goodbye.\r\n"), "{all:?}");

    // And it still stops cleanly on SIGTERM.
    let status = Command::new("kill")
        .args(["-s", "TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let end = std::time::Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        assert!(
            std::time::Instant::now() < end,
            "no exit 20 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code, Some(0));
}

/// Kills a process (by id) when a test ends, pass or fail.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-s", "KILL", &self.0.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

/// How many descriptors process `pid` has open.
fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// The resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in\n{status}"))
}

/// `count` clients that pour short wrong lines into the server and never
/// read its answers, each until the server takes no more (bounded: 60 s
/// for all of them).
fn clients_that_never_read(addr: SocketAddr, count: usize) -> Vec<std::net::TcpStream> {
    use std::io::{ErrorKind, Write};
    use std::time::{Duration, Instant};
    let clients: Vec<std::net::TcpStream> = (0..count)
        .map(|_| {
            let socket =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            // Small client-side buffers keep the kernel's share (not the
            // server's RSS, but this machine's memory) small.
            socket.set_send_buffer_size(16 * 1024).unwrap();
            socket.set_recv_buffer_size(16 * 1024).unwrap();
            socket.connect(&addr.into()).unwrap();
            socket.set_nonblocking(true).unwrap();
            socket.into()
        })
        .collect();
    let lines = b"x\n".repeat(32 * 1024);
    let mut offsets = vec![0usize; count];
    let end = Instant::now() + Duration::from_secs(60);
    let mut quiet_rounds = 0;
    while quiet_rounds < 2 {
        assert!(
            Instant::now() < end,
            "the clients could still send after 60 s"
        );
        let mut took = false;
        for (client, offset) in clients.iter().zip(&mut offsets) {
            let mut client = client;
            loop {
                match client.write(&lines[*offset % 2..]) {
                    Ok(n) => {
                        *offset += n;
                        took = true;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("a flooding client was cut off: {e}"),
                }
            }
        }
        if took {
            quiet_rounds = 0;
        } else {
            quiet_rounds += 1;
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    clients
}

#[test]
fn memory_per_connection_is_bounded_and_given_back() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    const CLIENTS: u64 = 400;
    let server = start(&[]);
    let pid = server.child.id();
    // Warm up: the code paths of a flood, a blocked client and its end are
    // loaded, so what follows measures memory, not code.
    let idle = open_descriptors(pid);
    drop(clients_that_never_read(server.addr, 20));
    wait_for(
        || open_descriptors(pid) <= idle,
        "the server to close the warm-up connections",
    );
    let baseline = rss_kib(pid);

    let clients = clients_that_never_read(server.addr, CLIENTS as usize);
    let full = rss_kib(pid);
    let per_connection = full.saturating_sub(baseline) / CLIENTS;
    assert!(
        per_connection < 200,
        "{per_connection} KiB per client that never reads ({baseline} KiB before {CLIENTS} of them, {full} KiB with them)"
    );
    // Meanwhile the service answers everyone else.
    let mut c = std::net::TcpStream::connect(server.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c.write_all(b"2\n9\n").unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    assert!(answer.contains("Current time: "), "{answer:?}");

    drop(clients);
    // Near the size at rest again: at most 4 KiB per departed client left,
    // within a minute (the allocator gives pages back after some seconds).
    let near = baseline + 4 * CLIENTS;
    let left = Instant::now();
    let end = left + Duration::from_secs(60);
    let mut now = rss_kib(pid);
    while now > near && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(500));
        now = rss_kib(pid);
    }
    assert!(
        now <= near,
        "{now} KiB a minute after the clients left; {baseline} KiB before they came, {full} KiB with them"
    );
    println!(
        "{baseline} KiB at rest, {full} KiB with {CLIENTS} clients that never read ({per_connection} KiB each), {now} KiB {:.1} s after they left",
        left.elapsed().as_secs_f64()
    );
    let (code, stderr) = server.stop();
    assert_eq!(code, Some(0), "{stderr}");
}
