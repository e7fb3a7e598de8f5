//! Settings that name files: the TLS certificates, keys and CA bundles the
//! programs read at start, and the files the tunnel writes (`access_log`,
//! `pid_file`).
//!
//! On this machine (`deploy run`) a relative path is taken from the
//! directory of the definition, the way compose and Kustomize take theirs,
//! so a definition and its certificates move together and `deploy run`
//! works from any directory; `deploy check` reports a TLS file that is not
//! there. In Kubernetes the files come from Secrets the role mounts
//! (`environments.kubernetes.roles.<role>.secrets`), and a TLS setting that
//! points anywhere else is warned about: the image holds only the program.

use std::path::Path;

use serde_json::Value;

use super::{Environment, Finding, Role, SecretMount, Severity};
use crate::programs::SettingsMap;

/// A setting that names a file, as its path of keys (`*`: each item of a
/// list), and whether the program reads it at start (TLS material).
const FILE_SETTINGS: [(&[&str], bool); 14] = [
    (&["tls_cert"], true),
    (&["tls_key"], true),
    (&["tls_client_ca"], true),
    (&["target_ca"], true),
    (&["target_cert"], true),
    (&["target_key"], true),
    (&["routes", "*", "tls", "cert"], true),
    (&["routes", "*", "tls", "key"], true),
    (&["routes", "*", "tls", "client_ca"], true),
    (&["routes", "*", "target_tls", "ca"], true),
    (&["routes", "*", "target_tls", "cert"], true),
    (&["routes", "*", "target_tls", "key"], true),
    (&["access_log"], false),
    (&["pid_file"], false),
];

/// One file a role's settings name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSetting {
    /// The top-level setting it is in (`routes`), for its place.
    pub key: String,
    /// The setting itself (`tls_cert`, `routes.0.tls.cert`).
    pub name: String,
    /// The path as given.
    pub path: String,
    /// Whether the program reads it at start (a certificate, key or CA).
    pub read: bool,
}

/// Every file `settings` name, in the order of [`FILE_SETTINGS`].
pub fn file_settings(settings: &SettingsMap) -> Vec<FileSetting> {
    let mut found = Vec::new();
    for (keys, read) in FILE_SETTINGS {
        if let Some(value) = settings.get(keys[0]) {
            let mut trail = vec![keys[0].to_string()];
            walk(value, &keys[1..], &mut trail, &mut |trail, path| {
                found.push(FileSetting {
                    key: keys[0].to_string(),
                    name: trail.join("."),
                    path: path.to_string(),
                    read,
                });
            });
        }
    }
    found
}

/// Calls `f` with each string at `keys` below `value`, and its trail of
/// keys and list indexes.
fn walk(
    value: &Value,
    keys: &[&str],
    trail: &mut Vec<String>,
    f: &mut impl FnMut(&[String], &str),
) {
    match (keys.split_first(), value) {
        (None, Value::String(path)) => f(trail, path),
        (Some((&"*", rest)), Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                trail.push(i.to_string());
                walk(item, rest, trail, f);
                trail.pop();
            }
        }
        (Some((key, rest)), Value::Object(map)) => {
            if let Some(child) = map.get(*key) {
                trail.push(key.to_string());
                walk(child, rest, trail, f);
                trail.pop();
            }
        }
        _ => {}
    }
}

/// `settings` with each relative file path taken from `base` (the
/// definition's directory).
pub fn resolve(settings: &mut SettingsMap, base: &Path) {
    if base.as_os_str().is_empty() {
        return;
    }
    for (keys, _) in FILE_SETTINGS {
        if let Some(value) = settings.get_mut(keys[0]) {
            resolve_in(value, &keys[1..], base);
        }
    }
}

fn resolve_in(value: &mut Value, keys: &[&str], base: &Path) {
    match (keys.split_first(), value) {
        (None, Value::String(path))
            if !path.is_empty() && Path::new(path.as_str()).is_relative() =>
        {
            *path = base.join(path.as_str()).to_string_lossy().into_owned();
        }
        (Some((&"*", rest)), Value::Array(items)) => {
            for item in items {
                resolve_in(item, rest, base);
            }
        }
        (Some((key, rest)), Value::Object(map)) => {
            if let Some(child) = map.get_mut(*key) {
                resolve_in(child, rest, base);
            }
        }
        _ => {}
    }
}

/// What is wrong with the files `role` names in `environment` (`role`
/// as it runs there, [`super::Definition::in_environment`]).
pub fn findings(role: &Role, environment: Environment) -> Vec<Finding> {
    let read: Vec<FileSetting> = file_settings(&role.settings)
        .into_iter()
        .filter(|f| f.read)
        .collect();
    let place = |file: &FileSetting| role.place(&format!("settings.{}", file.key));
    let mut found = Vec::new();
    match environment {
        Environment::Local => {
            for file in &read {
                if let Some(why) = local_problem(file) {
                    found.push((
                        place(file),
                        Severity::Error,
                        format!("role {}: {why}", role.name),
                    ));
                }
            }
        }
        Environment::Kubernetes => {
            for file in &read {
                if let Some(why) = mount_problem(role, file) {
                    found.push((
                        place(file),
                        Severity::Warning,
                        format!("role {}: {why}", role.name),
                    ));
                }
            }
        }
        Environment::Compose => {
            // The same for every file: said once, at the first.
            if let Some(first) = read.first() {
                let names: Vec<&str> = read.iter().map(|f| f.name.as_str()).collect();
                found.push((
                    place(first),
                    Severity::Warning,
                    format!(
                        "role {}: {} name files, and the compose rendering mounts none, so its containers would not start; mount them yourself, or set them to ~ in environments.compose.roles.{}.settings",
                        role.name,
                        names.join(", "),
                        role.name
                    ),
                ));
            }
        }
    }
    found
}

/// Why a file an instance reads at start cannot be read on this machine.
fn local_problem(file: &FileSetting) -> Option<String> {
    let at = format!("{} {}", file.name, file.path);
    let path = Path::new(&file.path);
    let why = match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => format!(
            "{at} does not exist (a relative path is taken from the definition's directory); create it or correct the path"
        ),
        Err(e) => format!("{at} cannot be read: {e}"),
        Ok(meta) if meta.is_dir() => format!("{at} is a directory; name the PEM file in it"),
        // Opening a pipe would wait for a writer.
        Ok(meta) if !meta.is_file() => format!("{at} is not a regular file; name a PEM file"),
        Ok(_) => match std::fs::File::open(path) {
            Ok(_) => return None,
            Err(e) => format!("{at} cannot be read: {e}; let the user that runs deploy read it"),
        },
    };
    Some(why)
}

/// Why a file a pod reads at start would not be there: it is not in a
/// Secret the role mounts.
fn mount_problem(role: &Role, file: &FileSetting) -> Option<String> {
    let at = format!("{} {}", file.name, file.path);
    if let Some(secret) = role
        .secrets
        .iter()
        .find(|s| s.dir() == file.path.trim_end_matches('/'))
    {
        return Some(format!(
            "{at} is the directory Secret {} is mounted at; point it at a file in it, such as {}/{}",
            secret.name,
            secret.dir(),
            secret_key(&file.name)
        ));
    }
    if role
        .secrets
        .iter()
        .any(|s| file.path.starts_with(&format!("{}/", s.dir())))
    {
        return None;
    }
    let mounted = match role.secrets.as_slice() {
        [] => "the role mounts no Secret".to_string(),
        secrets => format!(
            "the role mounts {}",
            secrets
                .iter()
                .map(|s| format!("{} at {}", s.name, s.dir()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    Some(format!(
        "{at} is not in a mounted Secret ({mounted}), and the image holds only the program; mount the Secret that holds it under environments.kubernetes.roles.{}.secrets (NAME: DIRECTORY) and point {} at its file there (DIRECTORY/{})",
        role.name,
        file.name,
        secret_key(&file.name)
    ))
}

/// The key a Secret made by `kubectl create secret tls` (and a CA added
/// as `ca.crt`) holds the file of setting `name` under.
fn secret_key(name: &str) -> &'static str {
    if name.ends_with("key") {
        "tls.key"
    } else if name.ends_with("ca") {
        "ca.crt"
    } else {
        "tls.crt"
    }
}

impl SecretMount {
    /// Where it is mounted, without a trailing '/'.
    pub fn dir(&self) -> &str {
        self.path.trim_end_matches('/')
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn settings(value: Value) -> SettingsMap {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn files_are_found_at_the_top_and_in_routes() {
        let s = settings(json!({
            "tls_cert": "a.pem",
            "tls_key": "a.key",
            "idle_timeout": "5m",
            "routes": [
                {"name": "x", "tls": {"cert": "x.pem", "key": "x.key"}},
                {"name": "y", "target_tls": {"ca": "/etc/ca.pem"}},
            ],
            "access_log": "access.log",
        }));
        let names: Vec<(String, String, bool)> = file_settings(&s)
            .into_iter()
            .map(|f| (f.name, f.path, f.read))
            .collect();
        assert_eq!(
            names,
            [
                ("tls_cert".into(), "a.pem".into(), true),
                ("tls_key".into(), "a.key".into(), true),
                ("routes.0.tls.cert".into(), "x.pem".into(), true),
                ("routes.0.tls.key".into(), "x.key".into(), true),
                ("routes.1.target_tls.ca".into(), "/etc/ca.pem".into(), true),
                ("access_log".into(), "access.log".into(), false),
            ]
        );
    }

    #[test]
    fn relative_paths_are_taken_from_the_definition() {
        let mut s = settings(json!({
            "tls_cert": "certs/a.pem",
            "tls_key": "/abs/a.key",
            "pid_file": "run/t.pid",
            "host": "db",
            "routes": [{"tls": {"client_ca": "ca.pem"}}],
        }));
        resolve(&mut s, Path::new("deploy"));
        assert_eq!(s["tls_cert"], "deploy/certs/a.pem");
        assert_eq!(s["tls_key"], "/abs/a.key");
        assert_eq!(s["pid_file"], "deploy/run/t.pid");
        assert_eq!(s["host"], "db");
        assert_eq!(s["routes"][0]["tls"]["client_ca"], "deploy/ca.pem");
        // A definition in the working directory leaves them as they are.
        let mut same = settings(json!({"tls_cert": "a.pem"}));
        resolve(&mut same, Path::new(""));
        assert_eq!(same["tls_cert"], "a.pem");
    }
}
