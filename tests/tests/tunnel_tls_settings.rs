//! The tunnel's TLS settings at the command line: the quick-form flags and
//! variables, routes sharing an address by server name (SNI), and every
//! mistake refused at start (status 64) with the key it concerns and where
//! it was written. Only the settings are read: no file is opened and no
//! port is bound.

use std::path::Path;
use std::process::Command;

use tests::binary;

/// Runs the tunnel with `args` and the `env` given (and no other TUNNEL_
/// variable that names a target): (status, stdout, stderr).
fn tunnel(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut command = Command::new(binary("tunnel"));
    for (var, _) in std::env::vars() {
        if var.starts_with("TUNNEL_") {
            command.env_remove(var);
        }
    }
    let out = command
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// The `--print-config` line of `key`, which must be there.
fn line<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(&format!("{key} = ")))
        .unwrap_or_else(|| panic!("no {key} in\n{out}"))
}

#[test]
fn the_secure_pairs_flags_and_variables_are_settings() {
    // The client's side of the pair: plain in, mutual TLS out.
    let (code, out, err) = tunnel(
        &[
            "--listen",
            "127.0.0.1:5432",
            "--target",
            "gateway.example.com:6432",
            "--target-tls",
            "--target-ca",
            "ca.pem",
            "--target-cert",
            "me.pem",
            "--target-key",
            "me.key",
            "--target-server-name",
            "Gateway.Example.com",
            "--print-config",
        ],
        &[],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        line(&out, "target_tls").contains("= true")
            && line(&out, "target_tls").contains("# flag --target-tls"),
        "{out}"
    );
    for (key, value, flag) in [
        ("target_ca", "\"ca.pem\"", "--target-ca"),
        ("target_cert", "\"me.pem\"", "--target-cert"),
        ("target_key", "\"me.key\"", "--target-key"),
        (
            "target_server_name",
            "\"Gateway.Example.com\"",
            "--target-server-name",
        ),
    ] {
        let l = line(&out, key);
        assert!(
            l.contains(&format!("= {value}")) && l.contains(&format!("# flag {flag}")),
            "{l}"
        );
    }
    settings_hold(&out);

    // The gateway's side: mutual TLS in, some of it from the environment.
    let (code, out, err) = tunnel(
        &[
            "--listen",
            "0.0.0.0:6432",
            "--target",
            "db.internal:5432",
            "--tls-cert",
            "gw.pem",
            "--tls-client-names",
            "client.example.com,*.clients.example.com",
            "--print-config",
        ],
        &[
            ("TUNNEL_TLS_KEY", "gw.key"),
            ("TUNNEL_TLS_CLIENT_CA", "ca.pem"),
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        line(&out, "tls_cert").contains("# flag --tls-cert"),
        "{out}"
    );
    assert!(
        line(&out, "tls_key").contains("# environment variable TUNNEL_TLS_KEY"),
        "{out}"
    );
    assert!(
        line(&out, "tls_client_names")
            .contains("[\"client.example.com\", \"*.clients.example.com\"]"),
        "{out}"
    );
    assert!(line(&out, "target_tls").contains("= false"), "{out}");
    settings_hold(&out);

    // A target CA alone turns TLS to the target on, and says so.
    let (code, out, _) = tunnel(
        &[
            "--target",
            "db:5432",
            "--target-ca",
            "ca.pem",
            "--print-config",
        ],
        &[],
    );
    assert_eq!(code, Some(0));
    assert!(
        line(&out, "target_tls").contains("implied by target_ca"),
        "{out}"
    );
}

#[test]
fn routes_share_an_address_by_server_name() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "tunnel.yaml",
        "routes:
  - name: mail
    listen: 127.0.0.1:8443
    sni: [mail.example.com]
    target: 10.0.0.5:443
  - name: web
    listen: 127.0.0.1:8443
    sni: [www.example.com, '*.web.example.com']
    tls: {cert: web.pem, key: web.key}
    target: 10.0.0.6:8080
    target_tls: true
",
    );
    let (code, out, err) = tunnel(&["--config", &config, "--print-config"], &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        line(&out, "routes.1.sni").contains("[\"www.example.com\", \"*.web.example.com\"]"),
        "{out}"
    );
    assert!(
        line(&out, "routes.1.tls.cert").contains(&format!("{config}:9:")),
        "{out}"
    );
    assert!(
        line(&out, "routes.1.target_tls").contains("= true"),
        "{out}"
    );
    settings_hold(&out);
    // Routes configured: the quick form's TLS keys are not shown.
    assert!(!out.lines().any(|l| l.starts_with("tls_cert =")), "{out}");
}

#[test]
fn a_server_name_on_two_routes_of_one_address_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "tunnel.yaml",
        "routes:
  - name: old
    listen: 127.0.0.1:8443
    sni: [www.example.com]
    target: 10.0.0.5:443
  - name: new
    listen: 127.0.0.1:8443
    sni: [WWW.example.com, api.example.com]
    target: 10.0.0.6:443
",
    );
    let (code, _, err) = tunnel(&["--config", &config], &[]);
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains(&format!("routes.1.sni (from {config}:8:5): www.example.com on 127.0.0.1:8443 is claimed by routes old and new")),
        "{err}"
    );
}

#[test]
fn a_shared_address_without_server_names_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "tunnel.yaml",
        "routes:
  - name: web
    listen: 127.0.0.1:8443
    sni: www.example.com
    target: 10.0.0.5:443
  - name: plain
    listen: 127.0.0.1:8443
    target: 10.0.0.6:443
",
    );
    let (code, _, err) = tunnel(&["--config", &config], &[]);
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains(&format!("routes.1.listen (from {config}:7:5): 127.0.0.1:8443 is claimed by routes web and plain")),
        "{err}"
    );
    assert!(err.contains("and route plain has none"), "{err}");
}

#[test]
fn a_key_without_its_certificate_is_refused_with_its_key() {
    let (code, _, err) = tunnel(&["--target", "127.0.0.1:9", "--tls-key", "k.pem"], &[]);
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("tls_cert (from built-in default): is missing: tls_key needs its certificate chain in tls_cert"),
        "{err}"
    );

    let (code, _, err) = tunnel(&["--target", "127.0.0.1:9", "--target-cert", "me.pem"], &[]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("target_key"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "tunnel.yaml",
        "routes:
  - name: db
    listen: 127.0.0.1:6432
    target: 127.0.0.1:5432
    tls:
      key: gw.key
",
    );
    let (code, _, err) = tunnel(&["--config", &config], &[]);
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains(&format!("routes.0.tls.cert (from {config}:5:5): is missing: tls.key needs its certificate chain in tls.cert")),
        "{err}"
    );

    // Quick-form TLS beside routes is reported like the quick form's
    // listen address.
    let (code, _, err) = tunnel(&["--config", &config, "--tls-cert", "a.pem"], &[]);
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("tls_cert (from flag --tls-cert): is a setting of the quick form's route, and routes are configured"),
        "{err}"
    );

    // target_tls written false beside what needs it.
    let (code, _, err) = tunnel(
        &["--target", "127.0.0.1:9", "--target-ca", "ca.pem"],
        &[("TUNNEL_TARGET_TLS", "false")],
    );
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("target_tls = false (from environment variable TUNNEL_TARGET_TLS): turns TLS to the target off, but target_ca is set"),
        "{err}"
    );
}

/// The settings hold together: the only reasons `--print-config` gives
/// for not starting are the made-up file names, which are read only when
/// the shape is right.
fn settings_hold(out: &str) {
    for line in out.lines().filter(|l| l.contains("would not start")) {
        assert!(line.ends_with("does not exist"), "{line}\n{out}");
    }
    assert!(out.contains("does not exist"), "{out}");
}
