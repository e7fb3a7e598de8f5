//! TLS on the servers' endpoints, against the real `openssl s_client`:
//! the date/time menu and squares over TLS, plain clients turned away, a
//! bad certificate file refused at start with its name, and mutual TLS.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tests::{binary, require, Running};

/// Runs `openssl` with `args` in `dir`; it must succeed.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new(require("openssl"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, and a server and a client certificate it signed, made with the
/// real openssl as the README shows; plus a second CA's client.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        for ca in ["ca", "other-ca"] {
            let mut args = vec!["req", "-x509"];
            args.extend(ec);
            let (key, cert, subj) = (
                format!("{ca}.key"),
                format!("{ca}.pem"),
                format!("/CN={ca}"),
            );
            args.extend(["-keyout", &key, "-out", &cert, "-days", "2", "-subj", &subj]);
            openssl(d, &args);
        }
        for (name, ca) in [("server", "ca"), ("client", "ca"), ("stranger", "other-ca")] {
            let mut args = vec!["req"];
            args.extend(ec);
            let key = format!("{name}.key");
            let csr = format!("{name}.csr");
            let subj = format!("/CN={name}.test");
            args.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
            openssl(d, &args);
            let ext = d.join(format!("{name}.ext"));
            std::fs::write(&ext, format!("subjectAltName=DNS:{name}.test\n")).unwrap();
            openssl(
                d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    &format!("{ca}.pem"),
                    "-CAkey",
                    &format!("{ca}.key"),
                    "-CAcreateserial",
                    "-out",
                    &format!("{name}.pem"),
                    "-days",
                    "2",
                    "-extfile",
                    ext.to_str().unwrap(),
                ],
            );
        }
        Pki { dir }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    fn arg(&self, file: &str) -> String {
        self.path(file).to_str().unwrap().to_string()
    }
}

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
/// `running` (trusting the test CA, with `extra` arguments), read until
/// the server closes or `until` has come; and whether it succeeded.
fn s_client(
    pki: &Pki,
    running: &Running,
    input: &str,
    until: &str,
    extra: &[&str],
) -> (bool, String) {
    let mut child = Command::new(require("openssl"))
        .args(["s_client", "-quiet", "-verify_return_error"])
        .args(["-connect", &running.addr.to_string()])
        .args(["-servername", "server.test", "-CAfile", &pki.arg("ca.pem")])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // -quiet keeps the connection after the end of its input, until the
    // server closes it.
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let seen = Arc::new(Mutex::new(String::new()));
    let readers: Vec<_> = [
        Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ]
    .into_iter()
    .map(|mut pipe| {
        let seen = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                seen.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    })
    .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if seen.lock().unwrap().contains(until) || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    for reader in readers {
        let _ = reader.join();
    }
    let text = seen.lock().unwrap().clone();
    // Stopped once `until` came, or the server closed after a good session.
    let ok = status.is_none_or(|s| s.success()) && text.contains(until);
    (ok, text)
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
        &[
            "-cert",
            &pki.arg("client.pem"),
            "-key",
            &pki.arg("client.key"),
        ],
    );
    assert!(ok && text.contains("Welcome"), "{text}");
    for extra in [
        vec![],
        vec![
            "-cert".to_string(),
            pki.arg("stranger.pem"),
            "-key".to_string(),
            pki.arg("stranger.key"),
        ],
    ] {
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
