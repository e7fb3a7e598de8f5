//! TLS on the servers' endpoints, against the real `openssl s_client`:
//! the date/time menu and squares over TLS, plain clients turned away, a
//! bad certificate file refused at start with its name, and mutual TLS.

use std::io::{Read, Write};

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tests::pki::Pki;
use tests::{binary, require, Running};

/// Starts `program` serving TLS with the server certificate, and `extra`.
fn tls_server(pki: &Pki, program: &str, field: &str, extra: &[&str]) -> Running {
    let mut command = Command::new(binary(program));
    command
        .args(["--listen", "127.0.0.1:0"])
        .args(["--tls-cert", &pki.arg("server.pem")])
        .args(["--tls-key", &pki.arg("server.key")])
        .args(extra);
    Running::start_reporting(command, field)
}

/// What `openssl s_client` prints after sending `input` over TLS to
/// `running` as `server.test`, trusting the test CA (see
/// [`tests::pki::s_client`]).
fn s_client(
    pki: &Pki,
    running: &Running,
    input: &str,
    until: &str,
    extra: &[&str],
) -> (bool, String) {
    tests::pki::s_client(
        running.addr,
        &pki.path("ca.pem"),
        "server.test",
        extra,
        input,
        until,
    )
}

#[test]
fn openssl_reaches_the_date_time_menu_and_squares_over_tls() {
    let pki = Pki::new();
    let echo = tls_server(&pki, "echo-server", "listen", &[]);
    let (ok, text) = s_client(&pki, &echo, "1\r\n9\r\n", "Goodbye", &[]);
    assert!(ok, "{text}");
    assert!(text.contains("Welcome to the date/time service"), "{text}");
    assert!(text.contains("verify return:1"), "{text}");
    let (code, stderr) = echo.stop();
    assert_eq!(code, Some(0), "{stderr}");

    let square = tls_server(&pki, "square-server", "addr", &[]);
    let (ok, text) = s_client(&pki, &square, "12\n1.5\n", "2.25\n", &[]);
    assert!(
        text.contains("144\n") && text.contains("2.25\n"),
        "{ok} {text}"
    );
    let (code, stderr) = square.stop();
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn a_plain_client_is_turned_away_and_the_server_serves_on() {
    let pki = Pki::new();
    let echo = tls_server(&pki, "echo-server", "listen", &[]);
    let mut plain = std::net::TcpStream::connect(echo.addr).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    plain.write_all(b"1\r\n").unwrap();
    let mut got = Vec::new();
    let _ = std::io::Read::read_to_end(&mut plain, &mut got);
    assert!(
        !String::from_utf8_lossy(&got).contains("Welcome"),
        "a plain client got the menu: {got:?}"
    );
    let (ok, text) = s_client(&pki, &echo, "9\r\n", "Goodbye", &[]);
    assert!(ok && text.contains("Welcome"), "{text}");
    let (_, stderr) = echo.stop();
    assert!(stderr.contains("TLS handshake failed"), "{stderr}");
}

#[test]
fn mutual_tls_lets_in_only_clients_of_the_ca() {
    let pki = Pki::new();
    let ca = pki.arg("ca.pem");
    let echo = tls_server(&pki, "echo-server", "listen", &["--tls-client-ca", &ca]);
    let (ok, text) = s_client(
        &pki,
        &echo,
        "9\r\n",
        "Goodbye",
        &pki.presenting("client")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(ok && text.contains("Welcome"), "{text}");
    for extra in [vec![], pki.presenting("stranger")] {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let (_, text) = s_client(&pki, &echo, "9\r\n", "Goodbye", &extra);
        assert!(!text.contains("Welcome"), "{extra:?} got in: {text}");
    }
    let (_, stderr) = echo.stop();
    assert!(stderr.contains("TLS handshake failed"), "{stderr}");
}

#[test]
fn a_bad_certificate_file_is_named_at_start() {
    let pki = Pki::new();
    for (cert, key, setting, problem) in [
        (
            "server.pem",
            "client.key",
            "tls_cert",
            "does not match the key in",
        ),
        (
            "server.key",
            "server.key",
            "tls_cert",
            "holds no certificate",
        ),
        (
            "server.pem",
            "server.pem",
            "tls_key",
            "holds no private key",
        ),
        ("missing.pem", "server.key", "tls_cert", "does not exist"),
    ] {
        let file = if setting == "tls_cert" { cert } else { key };
        let says = format!(
            "{setting} (from flag --{}): {}: {problem}",
            setting.replace('_', "-"),
            pki.arg(file)
        );
        let out = Command::new(binary("echo-server"))
            .args(["--listen", "127.0.0.1:0"])
            .args(["--tls-cert", &pki.arg(cert), "--tls-key", &pki.arg(key)])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{err}");
        assert!(err.contains(&says), "{says}\nin\n{err}");
    }
    let out = Command::new(binary("square-server"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            &pki.arg("server.pem"),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("tls_key"), "{err}");
}

#[test]
fn client_names_and_expired_certificates_are_refused_with_the_reason() {
    let pki = Pki::new();
    let echo = tls_server(
        &pki,
        "echo-server",
        "listen",
        &[
            "--tls-client-ca",
            &pki.arg("ca.pem"),
            "--tls-client-names",
            "*.example.org,client.test",
        ],
    );
    let with = |name: &str| pki.presenting(name);
    let args = with("client");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, text) = s_client(&pki, &echo, "9\r\n", "Goodbye", &args);
    assert!(ok && text.contains("Welcome"), "{text}");
    for name in ["other", "expired", "stranger"] {
        let args = with(name);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (_, text) = s_client(&pki, &echo, "9\r\n", "Goodbye", &args);
        assert!(!text.contains("Welcome"), "{name} got in: {text}");
    }
    let (_, text) = s_client(&pki, &echo, "9\r\n", "Goodbye", &[]);
    assert!(!text.contains("Welcome"), "no certificate got in: {text}");
    let (_, stderr) = echo.stop();
    for reason in [
        "client certificate names other.test are not in tls_client_names",
        "the client's certificate expired on 2020-01-02T00:00:00Z",
        "UnknownIssuer",
        "peer sent no certificates",
    ] {
        assert!(stderr.contains(reason), "{reason} not logged:\n{stderr}");
    }
    assert_eq!(
        stderr.matches("TLS handshake failed").count(),
        4,
        "{stderr}"
    );
}

#[test]
fn an_expired_certificate_or_names_without_a_ca_stop_the_start() {
    let pki = Pki::new();
    let out = Command::new(binary("echo-server"))
        .args(["--listen", "127.0.0.1:0"])
        .args(["--tls-cert", &pki.arg("expired.pem")])
        .args(["--tls-key", &pki.arg("expired.key")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains(&format!(
            "{}: expired on 2020-01-02T00:00:00Z; renew it",
            pki.arg("expired.pem")
        )),
        "{err}"
    );
    let out = Command::new(binary("square-server"))
        .args(["--listen", "127.0.0.1:0"])
        .args(["--tls-cert", &pki.arg("server.pem")])
        .args(["--tls-key", &pki.arg("server.key")])
        .args(["--tls-client-names", "client.test"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("tls_client_names") && err.contains("needs tls_client_ca"),
        "{err}"
    );
    let out = Command::new(binary("square-server"))
        .args(["--listen", "127.0.0.1:0"])
        .args(["--tls-client-names", "a.*.test"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("\"a.*.test\" is not a name"), "{err}");
}

/// The subject of the certificate a new session to `running` gets.
fn served_subject(pki: &Pki, running: &Running) -> String {
    tests::pki::served_subject(running.addr, &pki.path("ca.pem"))
}

/// An interactive `openssl s_client` session: what it prints is kept.
struct Session {
    child: std::process::Child,
    seen: Arc<Mutex<String>>,
}

impl Session {
    fn open(pki: &Pki, running: &Running) -> Session {
        let mut child = Command::new(require("openssl"))
            .args(["s_client", "-quiet", "-connect", &running.addr.to_string()])
            .args(["-CAfile", &pki.arg("ca.pem"), "-verify_return_error"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let seen = Arc::new(Mutex::new(String::new()));
        let (mut out, kept) = (child.stdout.take().unwrap(), seen.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = out.read(&mut buf) {
                kept.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Session { child, seen }
    }

    fn send(&mut self, text: &str) {
        self.child
            .stdin
            .as_mut()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }

    fn wait_for(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.seen.lock().unwrap().contains(text) {
            assert!(
                Instant::now() < deadline,
                "{text:?} never came: {}",
                self.seen.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `running`'s log has `text` `count` times.
fn wait_logged(running: &Running, text: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while running.stderr().matches(text).count() < count {
        assert!(
            Instant::now() < deadline,
            "{text:?} not logged {count} times: {}",
            running.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_renewed_certificate_is_served_to_new_sessions_and_a_broken_one_is_not() {
    let pki = Pki::new();
    let (cert, key) = (pki.path("live.pem"), pki.path("live.key"));
    let install = |from: &str| {
        // As a renewal tool does: write beside, then rename over.
        for (ext, to) in [("pem", &cert), ("key", &key)] {
            let next = pki.path(&format!("next.{ext}"));
            std::fs::copy(pki.path(&format!("{from}.{ext}")), &next).unwrap();
            std::fs::rename(&next, to).unwrap();
        }
    };
    install("server");
    let mut command = Command::new(binary("echo-server"));
    command
        .args(["--listen", "127.0.0.1:0"])
        .args(["--tls-cert", cert.to_str().unwrap()])
        .args(["--tls-key", key.to_str().unwrap()]);
    let echo = Running::start_reporting(command, "listen");
    let mut open = Session::open(&pki, &echo);
    open.wait_for("Your choice");
    assert!(served_subject(&pki, &echo).contains("server.test"));

    install("server2");
    wait_logged(&echo, "TLS certificate re-read (the files changed)", 1);
    assert!(served_subject(&pki, &echo).contains("server2.test"));
    // The session made before goes on, on the old certificate.
    open.send("1\r\n");
    open.wait_for("Current date");

    // A broken renewal: reported, and the certificate in force stays.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nbroken\n").unwrap();
    wait_logged(&echo, "TLS files not re-read (the files changed)", 1);
    assert!(served_subject(&pki, &echo).contains("server2.test"));
    // A certificate that does not match the key in force.
    std::fs::copy(pki.path("server.pem"), &cert).unwrap();
    std::fs::copy(pki.path("server2.key"), &key).unwrap();
    echo.signal("HUP");
    wait_logged(&echo, "TLS files not re-read (SIGHUP)", 1);
    assert!(served_subject(&pki, &echo).contains("server2.test"));
    install("server");
    echo.signal("HUP");
    wait_logged(&echo, "TLS certificate re-read (SIGHUP)", 1);
    assert!(served_subject(&pki, &echo).contains("server.test"));
    open.send("9\r\n");
    open.wait_for("Goodbye");
    let (code, stderr) = echo.stop();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("does not match the key in"), "{stderr}");
}

#[test]
fn telnet_ssl_reaches_the_date_time_menu() {
    let pki = Pki::new();
    let echo = tls_server(&pki, "echo-server", "listen", &[]);
    let mut telnet = Command::new(require("telnet-ssl"))
        .args(["-z", "ssl", "-z", "secure", "-z", "verify=1"])
        .arg("-z")
        .arg(format!("cacert={}", pki.arg("ca.pem")))
        .arg("127.0.0.1")
        .arg(echo.addr.port().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = telnet.stdin.take().unwrap();
    let typing = std::thread::spawn(move || {
        for line in ["1\r\n", "9\r\n"] {
            std::thread::sleep(Duration::from_millis(700));
            let _ = input.write_all(line.as_bytes());
        }
        // Kept open until telnet has read the goodbye.
        std::thread::sleep(Duration::from_secs(2));
    });
    let mut out = String::new();
    telnet
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let _ = telnet.wait();
    typing.join().unwrap();
    assert!(out.contains("Welcome to the date/time service"), "{out}");
    assert!(out.contains("Current date"), "{out}");
    assert!(out.contains("Goodbye"), "{out}");
    let (code, stderr) = echo.stop();
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn a_client_that_never_says_hello_is_closed_after_the_handshake_timeout() {
    let pki = Pki::new();
    let echo = tls_server(&pki, "echo-server", "listen", &[]);
    let started = Instant::now();
    let mut silent = std::net::TcpStream::connect(echo.addr).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = [0u8; 16];
    let n = silent.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(20),
        "{waited:?}"
    );
    let (_, stderr) = echo.stop();
    assert!(stderr.contains("no handshake within 10s"), "{stderr}");
}
