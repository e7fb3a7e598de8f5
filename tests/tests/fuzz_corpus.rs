//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`) through the
//! very checks the fuzz targets run, on the stable toolchain, so an input
//! that once crashed a parser, or reached code no other input reached,
//! is checked on every test run. Grow the corpora with `fuzz/run.sh`.

use std::collections::BTreeSet;
use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

#[path = "../../fuzz/src/lib.rs"]
mod fuzz;

/// What a fuzz target checks of one input; it panics when a check fails.
type Check = fn(&[u8]);

/// Every fuzz target and the check it runs.
const TARGETS: [(&str, Check); 8] = [
    ("square", fuzz::square),
    ("telnet", fuzz::telnet),
    ("rinetd", fuzz::rinetd),
    ("config", fuzz::config),
    ("definition", fuzz::definition),
    ("admin", fuzz::admin),
    ("client_hello", fuzz::client_hello),
    ("proxy_header", fuzz::proxy_header),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// Runs `check` on every file of the target's corpus, which must exist and
/// hold at least one file; names every file that fails.
fn replay(target: &str) {
    let check = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|(_, check)| *check)
        .expect("a known target");
    let dir = fuzz_dir().join("corpus").join(target);
    let entries = fs::read_dir(&dir).unwrap_or_else(|e| {
        panic!(
            "the corpus of fuzz target {target}, {}, cannot be read ({e}); \
             restore it from git or run fuzz/run.sh",
            dir.display()
        )
    });
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("a corpus entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "the corpus of fuzz target {target}, {}, is empty; restore it from git or run fuzz/run.sh",
        dir.display()
    );
    let failed: Vec<String> = files
        .iter()
        .filter(|file| {
            let data = fs::read(file).expect("a readable corpus file");
            catch_unwind(AssertUnwindSafe(|| check(&data))).is_err()
        })
        .map(|file| file.display().to_string())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} inputs of fuzz target {target} fail (reproduce one with \
         `cargo +nightly fuzz run {target} FILE` in fuzz/):\n  {}",
        failed.len(),
        files.len(),
        failed.join("\n  ")
    );
}

#[test]
fn square_number_parser_corpus() {
    replay("square");
}

#[test]
fn telnet_decoder_corpus() {
    replay("telnet");
}

#[test]
fn rinetd_conf_parser_corpus() {
    replay("rinetd");
}

#[test]
fn yaml_configuration_corpus() {
    replay("config");
}

#[test]
fn service_definition_corpus() {
    replay("definition");
}

#[test]
fn admin_request_head_corpus() {
    replay("admin");
}

#[test]
fn tls_client_hello_corpus() {
    replay("client_hello");
}

#[test]
fn proxy_header_corpus() {
    replay("proxy_header");
}

#[test]
fn every_fuzz_target_is_replayed() {
    let dir = fuzz_dir().join("fuzz_targets");
    let found: BTreeSet<String> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{} cannot be read ({e})", dir.display()))
        .filter_map(|entry| {
            let path = entry.expect("a target entry").path();
            (path.extension()? == "rs").then(|| path.file_stem()?.to_str().map(str::to_string))?
        })
        .collect();
    let replayed: BTreeSet<String> = TARGETS.iter().map(|(name, _)| name.to_string()).collect();
    assert_eq!(
        found, replayed,
        "every fuzz target needs its corpus replayed here"
    );
}
