//! The real `echo-server` binary with real clients: Debian's `telnet` under
//! `expect`, and `nc`.

use std::net::SocketAddr;
use std::process::{Command, Stdio};

use tests::{binary, free_port, require, Running};

fn start(extra: &[&str]) -> Running {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut command = Command::new(binary("echo-server"));
    command.arg("--listen").arg(addr.to_string()).args(extra);
    Running::start(command, addr)
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
        err.contains(&format!("max_connections = -3 (from {shown} line 2)")),
        "{err}"
    );
    assert!(
        err.contains(&format!("idle_timeout = \"forever\" (from {shown} line 3)")),
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
    let server = start(&["--log-format", "json", "--log-level", "debug"]);
    {
        use std::io::Read;
        let mut c = std::net::TcpStream::connect(server.addr).unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 16];
        let _ = c.read(&mut buf).unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (_, stderr) = server.stop();
    let accepted = stderr
        .lines()
        .find(|l| l.contains("\"accepted\""))
        .unwrap_or_else(|| panic!("no accepted line in\n{stderr}"));
    assert!(accepted.starts_with('{'), "{accepted}");
    assert!(accepted.contains("\"peer\":\"127.0.0.1:"), "{accepted}");
    assert!(accepted.contains("\"id\":"), "{accepted}");
}
