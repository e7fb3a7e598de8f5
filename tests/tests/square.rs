//! End-to-end: the real `square-server` and `square-client` binaries, as a
//! user runs them: numbers as arguments, a stream on stdin, bad input in the
//! middle, `--json`, an unreachable server, and the exit statuses.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Output, Stdio};

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
