//! The real `tunnel` binary in front of a real PostgreSQL server that only
//! the tunnel's host can reach: the database listens on 127.0.0.1, and the
//! clients (`psql`, `pgbench`) run in a network namespace of their own that
//! reaches the host only over a veth link. Through the tunnel they work;
//! aimed at the database directly they are refused.

use std::process::Command;

use tests::netns::Netns;
use tests::postgres::{Client, Postgres};
use tests::{binary, require, Running};

/// The database, a namespace for the clients, and the tunnel between them.
struct Setup {
    // Dropped in this order: the tunnel, then the namespace, then the
    // database.
    tunnel: Running,
    ns: Netns,
    db: Postgres,
}

impl Setup {
    fn new(tag: &str) -> Setup {
        require("ip");
        require("psql");
        require("pgbench");
        let db = Postgres::start();
        let ns = Netns::create(tag);
        let mut command = Command::new(binary("tunnel"));
        command
            .args(["--listen", &format!("{}:0", ns.host_addr)])
            .args(["--target", &format!("127.0.0.1:{}", db.port)])
            // The start-up lines, without a line per connection.
            .env("RUST_LOG", "info,access=warn");
        let tunnel = Running::start_reporting(command, "listen");
        Setup { tunnel, ns, db }
    }

    /// A client in the namespace aimed at the tunnel.
    fn through_tunnel(&self) -> Client {
        Client::new(self.ns.host_addr, self.tunnel.addr.port()).within(self.ns.prefix())
    }

    /// Stops the tunnel with SIGTERM and checks it exits cleanly.
    fn finish(self) {
        let Setup { tunnel, ns, db } = self;
        let (code, log) = tunnel.stop();
        assert_eq!(
            code,
            Some(0),
            "the tunnel's exit on SIGTERM; its log:\n{log}"
        );
        drop(ns);
        drop(db);
    }
}

#[test]
fn psql_reaches_the_loopback_only_database_through_the_tunnel_only() {
    let setup = Setup::new("psql");
    let tunnel = setup.through_tunnel();

    assert_eq!(tunnel.psql("select 42").unwrap(), "42");

    // Aimed at the database itself, the same client is refused: the
    // database listens on the host's loopback, which the namespace cannot
    // see, and not on the address the namespace reaches.
    for direct in [
        tunnel.clone().at_port(setup.db.port),
        Client::new("127.0.0.1", setup.db.port).within(setup.ns.prefix()),
    ] {
        let err = direct
            .psql("select 42")
            .expect_err("the database answered the namespace directly");
        assert!(err.stderr.contains("Connection refused"), "{err}");
    }

    // The server sees the tunnel's loopback connection, not the client.
    assert_eq!(
        tunnel
            .psql("select client_addr, inet_server_addr() from pg_stat_activity where pid = pg_backend_pid()")
            .unwrap(),
        "127.0.0.1|127.0.0.1"
    );

    // A large result (about 6.4 MB) arrives whole: the same bytes as over
    // loopback.
    let big = "select string_agg(md5(i::text), ',' order by i) from generate_series(1, 190000) i";
    let through = tunnel.psql(big).unwrap();
    assert!(through.len() > 6_000_000, "{} bytes", through.len());
    assert!(through == setup.db.client().psql(big).unwrap());

    // Large statements go the other way: 4 MiB in one INSERT, and a
    // transaction of many rows.
    let payload = "0123456789abcdef".repeat(1 << 18);
    let upload = format!(
        "create table blob (b text);\n\
         insert into blob values ('{payload}');\n\
         select length(b), b = repeat('0123456789abcdef', 262144) from blob;"
    );
    assert_eq!(tunnel.psql(&upload).unwrap(), "4194304|t");
    let rows = "begin;\n\
                create table t (id int primary key, name text);\n\
                insert into t select i, 'row ' || i from generate_series(1, 50000) i;\n\
                commit;\n\
                select count(*), sum(id) from t;";
    assert_eq!(tunnel.psql(rows).unwrap(), "50000|1250025000");
    // What the tunnel's client wrote is in the database.
    assert_eq!(
        setup
            .db
            .client()
            .psql("select count(*) from t where name = 'row 7'")
            .unwrap(),
        "1"
    );

    // An error from the server comes back through the tunnel as an error.
    let err = tunnel.psql("select * from no_such_table").unwrap_err();
    assert!(
        err.stderr
            .contains("relation \"no_such_table\" does not exist"),
        "{err}"
    );

    setup.finish();
}

#[test]
fn pgbench_runs_through_the_tunnel() {
    let setup = Setup::new("bench");
    setup.db.pgbench_init(1);
    let tunnel = setup.through_tunnel();

    // Four sessions at once for three seconds.
    let report = tunnel
        .pgbench(&["-c", "4", "-j", "2", "-T", "3"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(report.processed > 0, "{}", report.output);
    assert_eq!(report.failed, 0, "{}", report.output);
    assert!(report.tps > 0.0, "{}", report.output);

    // A new connection for every transaction, for two seconds: the tunnel
    // opens and closes hundreds of relays.
    let report = tunnel
        .pgbench(&["-C", "-c", "2", "-j", "2", "-T", "2"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(report.processed > 0, "{}", report.output);
    assert_eq!(report.failed, 0, "{}", report.output);
    assert!(report.tps > 0.0, "{}", report.output);

    // Directly, the benchmark cannot even connect.
    let err = tunnel
        .clone()
        .at_port(setup.db.port)
        .pgbench(&["-c", "1", "-t", "1"])
        .expect_err("pgbench reached the database directly");
    assert!(err.stderr.contains("Connection refused"), "{err}");

    setup.finish();
}

/// The secure pair of the README: on the client's machine (a namespace) a
/// tunnel that originates mutual TLS; on the gateway (the host) a tunnel
/// that terminates it in front of a database only the gateway can reach.
#[test]
fn psql_and_pgbench_cross_a_secure_tunnel_pair() {
    require("ip");
    require("psql");
    let pki = tests::pki::Pki::new();
    pki.issue("gateway", "ca");
    let db = Postgres::start();
    db.pgbench_init(1);
    let ns = Netns::create("pair");
    let mut command = Command::new(binary("tunnel"));
    command
        .args(["--listen", &format!("{}:0", ns.host_addr)])
        .args(["--target", &format!("127.0.0.1:{}", db.port)])
        .args(["--tls-cert", &pki.arg("gateway.pem")])
        .args(["--tls-key", &pki.arg("gateway.key")])
        .args(["--tls-client-ca", &pki.arg("ca.pem")])
        .args(["--tls-client-names", "client.test"])
        .env("RUST_LOG", "info,access=warn");
    let gateway = Running::start_reporting(command, "listen");
    let near = |who: &str| {
        let mut command = ns.exec(
            binary("tunnel"),
            [
                "--listen".to_string(),
                "127.0.0.1:0".to_string(),
                "--target".to_string(),
                gateway.addr.to_string(),
                "--target-ca".to_string(),
                pki.arg("ca.pem"),
                "--target-cert".to_string(),
                pki.arg(&format!("{who}.pem")),
                "--target-key".to_string(),
                pki.arg(&format!("{who}.key")),
                "--target-server-name".to_string(),
                "gateway.test".to_string(),
            ],
        );
        command.env("RUST_LOG", "info,access=warn");
        Running::start_reporting(command, "listen")
    };
    let mine = near("client");
    let through = Client::new("127.0.0.1", mine.addr.port()).within(ns.prefix());
    assert_eq!(through.psql("select 42").unwrap(), "42");
    let big = "select string_agg(md5(i::text), ',' order by i) from generate_series(1, 100000) i";
    assert!(through.psql(big).unwrap() == db.client().psql(big).unwrap());
    let report = through
        .pgbench(&["-c", "2", "-j", "2", "-T", "2"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        report.processed > 0 && report.failed == 0,
        "{}",
        report.output
    );
    let report = through
        .pgbench(&["-C", "-c", "2", "-j", "2", "-T", "2"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        report.processed > 0 && report.failed == 0,
        "{}",
        report.output
    );

    // Without the pair: plain to the gateway (psql's own TLS is not the
    // tunnel's mutual TLS), or straight at the database, nothing works.
    for direct in [
        Client::new(ns.host_addr, gateway.addr.port()).within(ns.prefix()),
        Client::new(ns.host_addr, db.port).within(ns.prefix()),
    ] {
        direct
            .psql("select 42")
            .expect_err("the database answered without the pair");
    }
    // A near tunnel whose certificate is another CA's gets nowhere.
    let stranger = near("stranger");
    Client::new("127.0.0.1", stranger.addr.port())
        .within(ns.prefix())
        .psql("select 42")
        .expect_err("a stranger's certificate crossed the gateway");
    let (code, log) = gateway.stop();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("UnknownIssuer"), "{log}");
    for near in [mine, stranger] {
        let (code, log) = near.stop();
        assert_eq!(code, Some(0), "{log}");
    }
}
