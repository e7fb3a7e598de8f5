//! End-to-end: the real `square-client` talking TLS to the real
//! `square-server`, with a private CA made on the spot: squares over TLS
//! (by address and by server name), mutual TLS with and without a client
//! certificate, a server from another CA or a plain one refused with why,
//! and bad TLS settings refused as configuration errors before connecting.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tests::{binary, Running};

/// A CA with a server certificate (`server.test` and 127.0.0.1) and a
/// client certificate it signed, and another CA with its own client:
/// PEM files in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        for (ca_name, issued) in [
            (
                "ca",
                vec![
                    ("server", vec!["server.test", "127.0.0.1"]),
                    ("client", vec!["client.test"]),
                ],
            ),
            ("other-ca", vec![("stranger", vec!["stranger.test"])]),
        ] {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name.push(DnType::CommonName, ca_name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
            write(dir.path(), &format!("{ca_name}.pem"), &ca.pem());
            for (stem, names) in issued {
                let names: Vec<String> = names.into_iter().map(str::to_string).collect();
                let key = KeyPair::generate().unwrap();
                let cert = CertificateParams::new(names)
                    .unwrap()
                    .signed_by(&key, &ca)
                    .unwrap();
                write(dir.path(), &format!("{stem}.pem"), &cert.pem());
                write(dir.path(), &format!("{stem}.key"), &key.serialize_pem());
            }
        }
        Pki { dir }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    fn arg(&self, file: &str) -> String {
        self.path(file).to_str().unwrap().to_string()
    }

    /// square-server serving TLS with the server certificate, and `extra`.
    fn server(&self, extra: &[&str]) -> Running {
        let mut command = Command::new(binary("square-server"));
        command
            .args(["--listen", "127.0.0.1:0"])
            .args(["--tls-cert", &self.arg("server.pem")])
            .args(["--tls-key", &self.arg("server.key")])
            .args(extra);
        Running::start_reporting(command, "addr")
    }
}

fn write(dir: &Path, file: &str, text: &str) {
    std::fs::write(dir.join(file), text).unwrap();
}

/// square-client asking `server` with `args`, its settings only from
/// them (none from the test's environment).
fn client(server: &str, args: &[&str]) -> Command {
    let mut command = Command::new(binary("square-client"));
    command.args(["--server", server]).args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("SQUARE_CLIENT_") {
            command.env_remove(key);
        }
    }
    command
}

/// Runs `command` with `input` on stdin.
fn run(mut command: Command, input: &str) -> Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_string();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    out
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn squares_over_tls_with_a_private_ca() {
    let pki = Pki::new();
    let server = pki.server(&[]);
    let addr = server.addr.to_string();
    let ca = pki.arg("ca.pem");

    // By address: the certificate names 127.0.0.1.
    let out = run(client(&addr, &["--tls", "--ca", &ca, "12", "1.5"]), "");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "144\n2.25\n");

    // By server name, TLS on by itself, and a stream long enough to be
    // pipelined in several batches, to its end.
    let input: String = (1..=20_000).map(|n| format!("{n}\n")).collect();
    let out = run(
        client(&addr, &["--ca", &ca, "--server-name", "server.test"]),
        &input,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let squares: Vec<u64> = text(&out.stdout)
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(squares.len(), 20_000);
    assert!(squares.iter().zip(1u64..).all(|(s, n)| *s == n * n));

    // The same settings from the environment.
    let mut command = client(&addr, &["7"]);
    command
        .env("SQUARE_CLIENT_TLS", "true")
        .env("SQUARE_CLIENT_CA", &ca);
    let out = run(command, "");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "49\n");

    // Without TLS, the TLS server does not answer the client's squares.
    let out = run(client(&addr, &["--reply-timeout", "2s", "12"]), "");
    assert_ne!(out.status.code(), Some(0));
    assert!(!text(&out.stdout).contains("144"), "{}", text(&out.stdout));
}

#[test]
fn mutual_tls_needs_a_client_certificate_of_the_ca() {
    let pki = Pki::new();
    let server = pki.server(&["--tls-client-ca", &pki.arg("ca.pem")]);
    let addr = server.addr.to_string();
    let ca = pki.arg("ca.pem");

    let (cert, key) = (pki.arg("client.pem"), pki.arg("client.key"));
    let out = run(
        client(&addr, &["--ca", &ca, "--cert", &cert, "--key", &key, "12"]),
        "",
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "144\n");

    let out = run(client(&addr, &["--ca", &ca, "12"]), "");
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert_eq!(text(&out.stdout), "");
    assert!(err.contains("CertificateRequired"), "{err}");
    assert!(err.contains("with --cert and --key"), "{err}");

    let (cert, key) = (pki.arg("stranger.pem"), pki.arg("stranger.key"));
    let out = run(
        client(&addr, &["--ca", &ca, "--cert", &cert, "--key", &key, "12"]),
        "",
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert_eq!(text(&out.stdout), "");
    assert!(err.contains("refused the client certificate"), "{err}");

    let (_, log) = server.stop();
    assert!(log.contains("TLS handshake failed"), "{log}");
}

#[test]
fn a_server_the_client_cannot_trust_is_refused_with_why() {
    let pki = Pki::new();
    let server = pki.server(&[]);
    let addr = server.addr.to_string();

    let out = run(client(&addr, &["--ca", &pki.arg("other-ca.pem"), "12"]), "");
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert_eq!(text(&out.stdout), "");
    assert!(
        err.starts_with(&format!(
            "square-client: cannot talk TLS to the square server at {addr}: \
             TLS handshake with 127.0.0.1 failed: invalid peer certificate: UnknownIssuer"
        )),
        "{err}"
    );
    assert!(err.contains("with --ca"), "{err}");

    let ca = pki.arg("ca.pem");
    let out = run(
        client(&addr, &["--ca", &ca, "--server-name", "db.test", "12"]),
        "",
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(err.contains("TLS handshake with db.test failed"), "{err}");
    assert!(err.contains("not valid for name"), "{err}");
    assert!(err.contains("with --server-name"), "{err}");
}

#[test]
fn a_plain_server_is_told_apart() {
    let plain = Running::start_reporting(
        {
            let mut command = Command::new(binary("square-server"));
            command.args(["--listen", "127.0.0.1:0"]);
            command
        },
        "addr",
    );
    let pki = Pki::new();
    let out = run(
        client(
            &plain.addr.to_string(),
            &["--ca", &pki.arg("ca.pem"), "--connect-timeout", "5s", "12"],
        ),
        "",
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(err.contains("does not talk TLS"), "{err}");
}

#[test]
fn bad_tls_settings_are_configuration_errors_before_connecting() {
    let pki = Pki::new();
    let empty_dir = tempfile::tempdir().unwrap();
    let empty_file = pki.path("empty.pem");
    std::fs::write(&empty_file, "").unwrap();
    // Nothing listens there: a configuration error must come first.
    let nowhere = "127.0.0.1:1";
    let (ca, cert, key) = (
        pki.arg("ca.pem"),
        pki.arg("client.pem"),
        pki.arg("client.key"),
    );
    let other_key = pki.arg("server.key");
    let missing = pki.arg("missing.pem");
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["--ca", &ca, "--cert", &cert],
            "cert (from flag --cert): is set, but key is not".to_string(),
        ),
        (
            vec!["--key", &key],
            "key (from flag --key): is set, but cert is not".to_string(),
        ),
        (
            vec!["--ca", &ca, "--cert", &cert, "--key", &other_key],
            format!("cert (from flag --cert): {cert}: does not match the key in {other_key}"),
        ),
        (
            vec!["--ca", &missing],
            format!("ca (from flag --ca): {missing}: does not exist"),
        ),
        (
            vec!["--ca", &key],
            format!("ca (from flag --ca): {key}: holds no certificate"),
        ),
        (
            vec!["--ca", &ca, "--server-name", "not a name"],
            "server_name (from flag --server-name): not a name: is not a DNS name".to_string(),
        ),
    ];
    for (args, says) in cases {
        let mut all = args.clone();
        all.push("12");
        let out = run(client(nowhere, &all), "");
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert!(err.contains(&says), "{args:?}: {says}\nin\n{err}");
        assert!(!err.contains("cannot reach"), "{args:?}: {err}");
    }

    // No CA file, and a system without trusted CAs.
    let mut command = client(nowhere, &["--tls", "12"]);
    command
        .env("SSL_CERT_FILE", &empty_file)
        .env("SSL_CERT_DIR", empty_dir.path());
    let out = run(command, "");
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("ca (from built-in default): is not set, and this system has no trusted CAs"),
        "{err}"
    );
    assert!(err.contains("with --ca or SQUARE_CLIENT_CA"), "{err}");

    // TLS turned off, and a setting only TLS uses.
    let mut command = client(nowhere, &["--ca", &ca, "12"]);
    command.env("SQUARE_CLIENT_TLS", "false");
    let out = run(command, "");
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("tls = false (from environment variable SQUARE_CLIENT_TLS): turns TLS off, but ca is set"),
        "{err}"
    );

    // --print-config says TLS is on, and why.
    let out = run(client(nowhere, &["--ca", &ca, "--print-config"]), "");
    let shown = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let line = shown.lines().find(|l| l.starts_with("tls =")).unwrap();
    assert!(line.contains("on, as ca is set"), "{shown}");
}
