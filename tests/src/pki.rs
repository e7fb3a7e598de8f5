//! A private certificate authority for the TLS tests, made with the real
//! `openssl` as the README shows: a CA, a second CA, and certificates
//! they signed; plus an expired one, which openssl 3.0 cannot back-date.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::require;

/// Runs `openssl` with `args` in `dir`; it must succeed.
pub fn openssl(dir: &Path, args: &[&str]) {
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
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Default for Pki {
    fn default() -> Pki {
        Pki::new()
    }
}

impl Pki {
    /// Makes the CAs and the certificates in a temporary directory.
    pub fn new() -> Pki {
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
            args.extend([
                "-keyout", &key, "-out", &cert, "-days", "30", "-subj", &subj,
            ]);
            openssl(d, &args);
        }
        let pki = Pki { dir };
        for (name, ca) in [
            ("server", "ca"),
            ("server2", "ca"),
            ("client", "ca"),
            ("other", "ca"),
            ("stranger", "other-ca"),
        ] {
            pki.issue(name, ca);
        }
        let d = pki.dir.path();
        // An expired client of the CA (openssl 3.0 cannot back-date one).
        let ca_key =
            rcgen::KeyPair::from_pem(&std::fs::read_to_string(d.join("ca.key")).unwrap()).unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_pem(
            &std::fs::read_to_string(d.join("ca.pem")).unwrap(),
            ca_key,
        )
        .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["client.test".to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 1, 2);
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(d.join("expired.pem"), cert.pem()).unwrap();
        std::fs::write(d.join("expired.key"), key.serialize_pem()).unwrap();
        pki
    }

    /// Makes `NAME.pem` and `NAME.key`: a certificate for `NAME.test`
    /// (its subject alternative name and common name) signed by `ca`.
    pub fn issue(&self, name: &str, ca: &str) {
        let d = self.dir.path();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
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
                "30",
                "-extfile",
                ext.to_str().unwrap(),
            ],
        );
    }

    /// The path of `file` in the directory.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// `openssl s_client`'s arguments to present `NAME.pem` and its key.
    pub fn presenting(&self, name: &str) -> Vec<String> {
        vec![
            "-cert".to_string(),
            self.arg(&format!("{name}.pem")),
            "-key".to_string(),
            self.arg(&format!("{name}.key")),
        ]
    }

    /// Copies `files` of the authority into `dir` (made if missing).
    pub fn copy_to(&self, dir: &Path, files: &[&str]) {
        std::fs::create_dir_all(dir).unwrap();
        for file in files {
            std::fs::copy(self.path(file), dir.join(file)).unwrap();
        }
    }

    /// [`Pki::path`] as a command-line argument.
    pub fn arg(&self, file: &str) -> String {
        self.path(file).to_str().unwrap().to_string()
    }
}

/// What `openssl s_client` prints after sending `input` over TLS to
/// `addr` (asking for `server_name`, trusting `ca`, with `extra`
/// arguments), read until the server closes or `until` has come; and
/// whether it succeeded (`until` came, and no error).
pub fn s_client(
    addr: SocketAddr,
    ca: &Path,
    server_name: &str,
    extra: &[&str],
    input: &str,
    until: &str,
) -> (bool, String) {
    let mut child = Command::new(require("openssl"))
        .args(["s_client", "-quiet", "-verify_return_error"])
        .args(["-connect", &addr.to_string()])
        .args(["-servername", server_name, "-CAfile"])
        .arg(ca)
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

/// The subject of the certificate a new TLS session to `addr` gets
/// (`CN = server.test`), verified against `ca`.
pub fn served_subject(addr: SocketAddr, ca: &Path) -> String {
    let out = Command::new(require("openssl"))
        .args(["s_client", "-connect", &addr.to_string()])
        .arg("-CAfile")
        .arg(ca)
        .arg("-verify_return_error")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("subject="))
        .unwrap_or_else(|| panic!("no subject in {text}"))
        .to_string()
}
