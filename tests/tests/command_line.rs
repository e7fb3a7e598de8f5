//! What the command line shows: `--help` in each program's own words, and
//! `--print-config` showing what a program actually uses (values found at
//! start as found, settings the configuration does not use left out, and
//! a configuration that would not start shown with why).

use std::process::Command;

use tests::binary;

fn print_config(program: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(binary(program))
        .args(args)
        .arg("--print-config")
        .env_remove("TUNNEL_HOST")
        .env_remove("TUNNEL_PORT")
        .env_remove("TUNNEL_TARGET")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_zone_the_clock_reads_is_shown_not_null() {
    let (code, out, err) = print_config("echo-server", &[]);
    assert_eq!(code, Some(0), "{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("time_zone = "))
        .unwrap_or_else(|| panic!("no time_zone in\n{out}"));
    assert!(!line.contains("null"), "{line}");
    assert!(
        line.contains("# built-in default: the system's zone"),
        "{line}"
    );
    let (_, out, _) = print_config("echo-server", &["--utc"]);
    assert!(
        out.contains("time_zone = \"UTC\"") && out.contains("built-in default: utc = true"),
        "{out}"
    );
    // Settings that clash are printed, and said to clash.
    let (code, out, _) = print_config("echo-server", &["--utc", "--time-zone", "Asia/Tokyo"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("# would not start: time_zone = \"Asia/Tokyo\" (from flag --time-zone): utc = true (from flag --utc) chooses a zone too"),
        "{out}"
    );
    let (_, out, _) = print_config("echo-server", &["--time-zone", "Asia/Tokyo"]);
    assert!(out.contains("time_zone = \"Asia/Tokyo\""), "{out}");
    assert!(out.contains("# flag --time-zone"), "{out}");
}

#[test]
fn a_tunnel_without_a_target_prints_its_configuration_and_why_it_would_not_start() {
    let (code, out, err) = print_config("tunnel", &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("connect_timeout = \"5s\""), "{out}");
    assert!(
        out.contains("# would not start: target (from built-in default): nothing to forward to"),
        "{out}"
    );
    // The quick form in use: no `routes` line.
    assert!(!out.contains("routes ="), "{out}");
}

#[test]
fn a_tunnel_with_routes_does_not_show_the_quick_form() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tunnel.yaml");
    std::fs::write(
        &config,
        "routes:\n  - name: db\n    listen: 127.0.0.1:15432\n    target: db.internal:5432\n",
    )
    .unwrap();
    let (code, out, err) = print_config("tunnel", &["--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("routes.0.listen = \"127.0.0.1:15432\""),
        "{out}"
    );
    for quick in ["listen =", "target =", "host =", "port ="] {
        assert!(
            !out.lines().any(|l| l.starts_with(quick)),
            "{quick} shown beside routes:\n{out}"
        );
    }
    assert!(!out.contains("would not start"), "{out}");
}

#[test]
fn every_help_names_the_programs_own_variables() {
    for (program, prefix) in [
        ("echo-server", "ECHO_SERVER"),
        ("square-server", "SQUARE_SERVER"),
        ("square-client", "SQUARE_CLIENT"),
        ("tunnel", "TUNNEL"),
    ] {
        let out = Command::new(binary(program))
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success(), "{program}");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(!help.contains("<PREFIX>"), "{program}:\n{help}");
        assert!(
            help.contains(&format!("YAML configuration file (also {prefix}_CONFIG)")),
            "{program}:\n{help}"
        );
        let target = program.replace('-', "_");
        assert!(
            help.contains(&format!("or {target}=debug")),
            "{program}:\n{help}"
        );
        // The program's own options first, the shared ones last.
        let first_option = help
            .lines()
            .find(|l| l.trim_start().starts_with("--"))
            .unwrap();
        assert!(
            !first_option.contains("--config"),
            "{program}: the shared options come after the program's:\n{help}"
        );
    }
    let out = Command::new(binary("deploy"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for says in [
        "Check a service definition",
        "development fabric",
        "Kubernetes",
    ] {
        assert!(help.contains(says), "{help}");
    }
}
