//! Layered configuration: built-in defaults < YAML file < `<PREFIX>_*`
//! environment < command-line flags, resolved through figment.
//!
//! Every value remembers where it came from, so `--print-config` can show the
//! origin of each setting and every bad value is reported with its key, its
//! value and its origin (file and line, environment variable or flag). All
//! problems are collected before giving up: a bad key is reported, taken out
//! of every layer, and the rest is checked again, so one run shows them all.
//!
//! Kubernetes' Service-link variables that happen to share a program's
//! prefix (`TUNNEL_SERVICE_HOST` for a Service named `tunnel`) are not
//! settings and are left out of the environment layer: see
//! [`is_service_link`].

use std::fmt;
use std::path::{Path, PathBuf};

use figment::error::Kind;
use figment::providers::{Env, Format, Serialized, Yaml};
use figment::value::{Dict, Map, Tag, Value};
use figment::{Figment, Metadata, Profile, Provider, Source};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The exit status for a usage or configuration error (`EX_USAGE`).
pub const EXIT_USAGE: i32 = 64;

/// The environment variable prefix of a program: its name in upper case with
/// `-` as `_`, followed by `_` (`echo-server` gives `ECHO_SERVER_`).
pub fn env_prefix(program: &str) -> String {
    let mut prefix: String = program
        .chars()
        .map(|c| {
            if c == '-' {
                '_'
            } else {
                c.to_ascii_uppercase()
            }
        })
        .collect();
    prefix.push('_');
    prefix
}

/// The environment variable that sets `key` for `program` (`listen` of
/// `echo-server` is `ECHO_SERVER_LISTEN`).
pub fn env_var(program: &str, key: &str) -> String {
    format!(
        "{}{}",
        env_prefix(program),
        key.replace('.', "__").to_ascii_uppercase()
    )
}

/// The command-line flag that sets a top-level `key` (`idle_timeout` is
/// `--idle-timeout`).
pub fn flag_name(key: &str) -> String {
    format!("--{}", key.replace('_', "-"))
}

/// Whether the environment variable `name=value` is one of the Service-link
/// variables the kubelet gives every pod for every Service in its namespace
/// (unless the pod has `enableServiceLinks: false`). For a Service `tunnel`
/// with cluster IP 10.96.0.12 and TCP port 1001 named `incoming`:
///
/// ```text
/// TUNNEL_SERVICE_HOST=10.96.0.12
/// TUNNEL_SERVICE_PORT=1001
/// TUNNEL_SERVICE_PORT_INCOMING=1001
/// TUNNEL_PORT=tcp://10.96.0.12:1001
/// TUNNEL_PORT_1001_TCP=tcp://10.96.0.12:1001
/// TUNNEL_PORT_1001_TCP_PROTO=tcp
/// TUNNEL_PORT_1001_TCP_PORT=1001
/// TUNNEL_PORT_1001_TCP_ADDR=10.96.0.12
/// ```
///
/// The Service's name is upper-cased with `-` as `_`, and may be longer
/// than a program's prefix (`ECHO_SERVER_BALANCER_SERVICE_HOST` is under
/// `ECHO_SERVER_`). All but one of these forms are recognised by the name
/// alone. `<SERVICE>_PORT` is the exception: it would also be the
/// environment variable of a setting ending in `port` (the tunnel's own
/// `port`, `TUNNEL_PORT`), so it counts as a Service link only when its
/// value has the link form `tcp://ADDRESS:PORT` (or `udp://`, `sctp://`;
/// the address as written, IPv6 in brackets or not). A port number is
/// never a Service link, and a link-form value never a setting.
pub fn is_service_link(name: &str, value: &str) -> bool {
    if !name
        .bytes()
        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    {
        return false;
    }
    // Every `_` after the first character may end the Service's name.
    name.match_indices('_')
        .filter(|&(at, _)| at > 0)
        .any(|(at, _)| is_link_suffix(&name[at + 1..], value))
}

/// Whether `rest`, what follows `<SERVICE>_` in a variable's name, is one of
/// the Service-link forms (with `value`, for `PORT`).
fn is_link_suffix(rest: &str, value: &str) -> bool {
    if rest == "SERVICE_HOST" || rest == "SERVICE_PORT" {
        return true;
    }
    if let Some(port_name) = rest.strip_prefix("SERVICE_PORT_") {
        // A named port: its name upper-cased, `-` as `_`.
        return !port_name.is_empty();
    }
    if rest == "PORT" {
        return is_service_link_value(value);
    }
    let Some(port) = rest.strip_prefix("PORT_") else {
        return false;
    };
    let mut parts = port.split('_');
    let number = parts.next().unwrap_or("");
    let protocol = parts.next().unwrap_or("");
    let detail = parts.next();
    is_port_number(number)
        && matches!(protocol, "TCP" | "UDP" | "SCTP")
        && matches!(detail, None | Some("PROTO" | "PORT" | "ADDR"))
        && parts.next().is_none()
}

/// Whether `value` has the form of a Service link's address:
/// `tcp://ADDRESS:PORT`, `udp://...` or `sctp://...`. The scheme is taken
/// exactly as the kubelet writes it; the address loosely (an IPv4 address,
/// an IPv6 one with or without brackets), the port as a port number.
pub fn is_service_link_value(value: &str) -> bool {
    let Some((scheme, rest)) = value.split_once("://") else {
        return false;
    };
    let Some((address, port)) = rest.rsplit_once(':') else {
        return false;
    };
    matches!(scheme, "tcp" | "udp" | "sctp")
        && !address.is_empty()
        && !address.contains(|c: char| c.is_whitespace() || c == '/')
        && is_port_number(port)
}

fn is_port_number(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) && text.parse::<u16>().is_ok()
}

/// The environment variables under `prefix` that are Service links (see
/// [`is_service_link`]), by name, sorted.
fn service_links(prefix: &str) -> Vec<String> {
    let mut links: Vec<String> = std::env::vars_os()
        .filter_map(|(name, value)| {
            let name = name.to_str()?;
            (name.starts_with(prefix) && is_service_link(name, &value.to_string_lossy()))
                .then(|| name.to_string())
        })
        .collect();
    links.sort();
    links
}

/// One resolved value's place of origin, as a user would go and fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The program's built-in default.
    Default,
    /// A YAML configuration file, with the line when it could be found.
    File {
        /// The file's path as given.
        path: PathBuf,
        /// 1-based line of the key, when found.
        line: Option<usize>,
    },
    /// An environment variable.
    Env(String),
    /// A command-line flag.
    Flag(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("built-in default"),
            Origin::File {
                path,
                line: Some(line),
            } => write!(f, "{} line {line}", path.display()),
            Origin::File { path, line: None } => write!(f, "{}", path.display()),
            Origin::Env(var) => write!(f, "environment variable {var}"),
            Origin::Flag(flag) => write!(f, "flag {flag}"),
        }
    }
}

/// One problem with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The dotted key (`routes.0.listen`); empty for a whole-file problem.
    pub key: String,
    /// The offending value as written, when there is one.
    pub value: Option<String>,
    /// Where the value came from.
    pub origin: Option<Origin>,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.key.is_empty() {
            write!(f, "{}", self.key)?;
            if let Some(value) = &self.value {
                write!(f, " = {value}")?;
            }
        }
        match (&self.origin, self.key.is_empty()) {
            (Some(origin), true) => write!(f, "{origin}: ")?,
            (Some(origin), false) => write!(f, " (from {origin}): ")?,
            (None, true) => {}
            (None, false) => f.write_str(": ")?,
        }
        f.write_str(&self.message)
    }
}

/// Every problem found in one configuration, reported together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [one] => write!(f, "invalid configuration: {one}"),
            many => {
                write!(f, "invalid configuration, {} problems:", many.len())?;
                for e in many {
                    write!(f, "\n  {e}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ConfigErrors {}

impl ConfigErrors {
    /// A single problem that has no key (a missing file, say).
    pub fn single(origin: Option<Origin>, message: impl Into<String>) -> Self {
        ConfigErrors(vec![ConfigError {
            key: String::new(),
            value: None,
            origin,
            message: message.into(),
        }])
    }
}

/// Where to look for configuration, besides the built-in defaults.
#[derive(Debug, Clone)]
pub struct Sources<F> {
    /// The program's name (`echo-server`); gives the environment prefix.
    pub program: &'static str,
    /// The YAML file from `--config` or `<PREFIX>_CONFIG`, if any.
    pub file: Option<PathBuf>,
    /// Values given as flags: a struct of `Option`s that skips `None`s.
    pub flags: F,
    /// Environment variables with the prefix that are not settings (they
    /// are read by the command line, such as `CONFIG`), lower case.
    pub env_ignore: &'static [&'static str],
    /// A configuration file in another format, already read into settings
    /// values (the tunnel's `--rinetd-conf`): a layer in place of the YAML
    /// file, so the environment and flags still apply over it.
    pub converted: Option<Converted>,
}

/// Settings read from a file that is not YAML, as one configuration layer.
#[derive(Debug, Clone)]
pub struct Converted {
    /// The file, for origins in messages and `--print-config`.
    pub path: PathBuf,
    /// The values the file sets, and only those (a value left at its
    /// default would otherwise claim the file as its origin).
    pub values: Dict,
}

impl Converted {
    /// The values of `settings` that differ from `T::default()`, top-level
    /// keys in `skip` left out, from the file at `path`.
    pub fn changed<T: Serialize + Default>(
        path: &Path,
        settings: &T,
        skip: &[&str],
    ) -> Result<Converted, ConfigErrors> {
        let dict = |value: &T| -> Result<Dict, ConfigErrors> {
            match Value::serialize(value) {
                Ok(Value::Dict(_, dict)) => Ok(dict),
                Ok(_) => Ok(Dict::new()),
                Err(e) => Err(ConfigErrors::single(None, e.to_string())),
            }
        };
        let defaults = dict(&T::default())?;
        let mut values = dict(settings)?;
        values
            .retain(|key, value| !skip.contains(&key.as_str()) && defaults.get(key) != Some(value));
        Ok(Converted {
            path: path.to_path_buf(),
            values,
        })
    }
}

/// A configuration that resolved cleanly, with the record of where each value
/// came from.
#[derive(Debug)]
pub struct Resolved<T> {
    /// The typed settings.
    pub settings: T,
    program: &'static str,
    figment: Figment,
    file: Option<(PathBuf, String)>,
    service_links: Vec<String>,
}

/// A layer of configuration whose keys can be taken out one by one; it keeps
/// the metadata of the provider it was read from.
struct Layer {
    metadata: Metadata,
    data: Map<Profile, Dict>,
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        self.metadata.clone()
    }

    fn data(&self) -> figment::Result<Map<Profile, Dict>> {
        Ok(self.data.clone())
    }
}

impl Layer {
    fn read(provider: impl Provider) -> Result<Layer, ConfigErrors> {
        Ok(Layer {
            metadata: provider.metadata(),
            data: provider
                .data()
                .map_err(|e| ConfigErrors::single(None, e.to_string()))?,
        })
    }

    /// Takes `path` out of this layer; true when something was removed.
    fn remove(&mut self, path: &[String]) -> bool {
        let mut removed = false;
        for dict in self.data.values_mut() {
            removed |= remove_from_dict(dict, path);
        }
        removed
    }
}

fn remove_from_dict(dict: &mut Dict, path: &[String]) -> bool {
    match path {
        [] => false,
        [last] => dict.remove(last).is_some(),
        [first, rest @ ..] => match dict.get_mut(first) {
            Some(value) => remove_from_value(value, rest),
            None => false,
        },
    }
}

fn remove_from_value(value: &mut Value, path: &[String]) -> bool {
    match value {
        Value::Dict(_, dict) => remove_from_dict(dict, path),
        Value::Array(_, items) => {
            let Some(index) = path.first().and_then(|i| i.parse::<usize>().ok()) else {
                return false;
            };
            if index >= items.len() {
                return false;
            }
            if path.len() == 1 {
                // Removing an element would shift the others' indices.
                false
            } else {
                remove_from_value(&mut items[index], &path[1..])
            }
        }
        _ => false,
    }
}

fn flags_metadata() -> Metadata {
    Metadata::named("command-line flags")
        .interpolater(|_: &Profile, keys: &[&str]| flag_name(keys.first().copied().unwrap_or("")))
}

/// Reads a configuration file whole. The error names the file and says
/// which flag or variable chose it (`check`).
pub fn read_file(path: &Path, what: &str, check: &str) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        let problem = if e.kind() == std::io::ErrorKind::NotFound {
            "does not exist".to_string()
        } else {
            format!("cannot be read ({e})")
        };
        ConfigErrors::single(
            None,
            format!("{what} {} {problem}; check {check}", path.display()),
        )
    })
}

/// Resolves the configuration of type `T` from its sources, reporting every
/// problem at once.
pub fn resolve<T, F>(sources: &Sources<F>) -> Result<Resolved<T>, ConfigErrors>
where
    T: Serialize + DeserializeOwned + Default,
    F: Serialize,
{
    let file = match &sources.file {
        Some(path) => {
            let check = format!("--config or {}", env_var(sources.program, "config"));
            Some((path.clone(), read_file(path, "configuration file", &check)?))
        }
        None => None,
    };
    resolve_with(sources, file)
}

/// Resolves like [`resolve`], with `text` as the content of the YAML file
/// `path` instead of reading `sources.file`: `path` only names the file in
/// errors. This checks configuration text without touching the file system.
pub fn resolve_yaml<T, F>(
    sources: &Sources<F>,
    path: &Path,
    text: &str,
) -> Result<Resolved<T>, ConfigErrors>
where
    T: Serialize + DeserializeOwned + Default,
    F: Serialize,
{
    resolve_with(sources, Some((path.to_path_buf(), text.to_string())))
}

fn resolve_with<T, F>(
    sources: &Sources<F>,
    file: Option<(PathBuf, String)>,
) -> Result<Resolved<T>, ConfigErrors>
where
    T: Serialize + DeserializeOwned + Default,
    F: Serialize,
{
    let mut defaults = Layer::read(Serialized::defaults(T::default()))?;
    defaults.metadata = Metadata::named("built-in default");
    let mut layers = vec![defaults];

    if let Some((path, text)) = &file {
        let origin = Some(Origin::File {
            path: path.clone(),
            line: None,
        });
        if !text.trim().is_empty() {
            // serde_yaml's own message carries the line and column.
            if let Err(e) = serde_yaml::from_str::<serde_yaml::Value>(text) {
                return Err(ConfigErrors::single(origin, format!("not valid YAML: {e}")));
            }
            let mut layer = Layer::read(Yaml::string(text))?;
            layer.metadata = Metadata::from("YAML file", Source::File(path.clone()));
            layers.push(layer);
        }
    }

    if let Some(converted) = &sources.converted {
        let mut data = Map::new();
        data.insert(Profile::Default, converted.values.clone());
        let mut metadata =
            Metadata::from("configuration file", Source::File(converted.path.clone()));
        metadata.name = converted.path.display().to_string().into();
        layers.push(Layer { metadata, data });
    }

    // Kubernetes' Service links are not settings. figment's filter sees
    // only a variable's name, so they are picked out by name and value
    // first, and their names (without the prefix) then left out.
    let prefix = env_prefix(sources.program);
    let service_links = service_links(&prefix);
    let ignored: Vec<String> = service_links
        .iter()
        .map(|name| name[prefix.len()..].to_string())
        .collect();
    let env = Env::prefixed(&prefix)
        .ignore(sources.env_ignore)
        .filter(move |key| !ignored.iter().any(|name| name == key.as_str()))
        .split("__");
    layers.push(Layer::read(env).map_err(|e| ConfigErrors::single(None, e.to_string()))?);
    let flags = Serialized::defaults(&sources.flags);
    let mut flag_layer =
        Layer::read(flags).map_err(|e| ConfigErrors::single(None, e.to_string()))?;
    flag_layer.metadata = flags_metadata();
    layers.push(flag_layer);

    let mut errors: Vec<ConfigError> = Vec::new();
    let mut removed: Vec<Vec<String>> = Vec::new();
    // Each pass removes at least one key; a bound keeps a surprise from
    // looping forever.
    for _ in 0..256 {
        let figment = layers
            .iter()
            .fold(Figment::new(), |fig, layer| fig.merge(LayerRef(layer)));
        let merged = figment.find_value("").ok();
        match figment.extract::<T>() {
            Ok(settings) => {
                if let Some(merged) = &merged {
                    if let Ok(shape) = Value::serialize(&settings) {
                        let mut unknown = Vec::new();
                        unknown_keys(merged, &shape, &mut Vec::new(), &mut unknown);
                        for (path, known) in unknown {
                            errors.push(describe(
                                sources.program,
                                &figment,
                                merged,
                                &file,
                                &path,
                                format!("unknown setting; known here: {}", known.join(", ")),
                            ));
                        }
                    }
                }
                if errors.is_empty() {
                    return Ok(Resolved {
                        settings,
                        program: sources.program,
                        figment,
                        file,
                        service_links,
                    });
                }
                return Err(ConfigErrors(errors));
            }
            Err(err) => {
                let mut progress = false;
                for e in err {
                    let mut path = e.path.clone();
                    if path.is_empty() {
                        // serde's `flatten` loses the key of an error inside
                        // a flattened struct; find it by elimination.
                        if let Some(key) = merged
                            .as_ref()
                            .and_then(|m| culprit::<T>(&layers, m, &e.kind))
                        {
                            path = vec![key];
                        }
                    }
                    if let Kind::UnknownField(field, _) = &e.kind {
                        path.push(field.clone());
                    }
                    if let Kind::MissingField(_) = &e.kind {
                        // A required field inside something we already took
                        // apart: drop the whole top-level setting rather than
                        // report a made-up problem.
                        if removed
                            .iter()
                            .any(|r| r.len() > 1 && path.starts_with(&r[..1]))
                        {
                            let top = path[..1].to_vec();
                            for layer in &mut layers {
                                progress |= layer.remove(&top);
                            }
                            continue;
                        }
                    }
                    let message = kind_message(&e.kind);
                    if errors
                        .iter()
                        .any(|known| known.key == path.join(".") && known.message == message)
                    {
                        continue;
                    }
                    if let Some(merged) = &merged {
                        errors.push(describe(
                            sources.program,
                            &figment,
                            merged,
                            &file,
                            &path,
                            message,
                        ));
                    } else {
                        errors.push(ConfigError {
                            key: path.join("."),
                            value: None,
                            origin: None,
                            message,
                        });
                    }
                    for layer in &mut layers {
                        progress |= layer.remove(&path);
                    }
                    removed.push(path);
                }
                if !progress {
                    return Err(ConfigErrors(errors));
                }
            }
        }
    }
    Err(ConfigErrors(errors))
}

/// The top-level key whose removal makes the error `kind` go away.
fn culprit<T: DeserializeOwned>(layers: &[Layer], merged: &Value, kind: &Kind) -> Option<String> {
    let Value::Dict(_, dict) = merged else {
        return None;
    };
    dict.keys()
        .find(|key| {
            let without = [key.to_string()];
            let figment = layers.iter().fold(Figment::new(), |fig, layer| {
                let mut data = layer.data.clone();
                for d in data.values_mut() {
                    remove_from_dict(d, &without);
                }
                fig.merge(Layer {
                    metadata: layer.metadata.clone(),
                    data,
                })
            });
            match figment.extract::<T>() {
                Ok(_) => true,
                Err(err) => err
                    .into_iter()
                    .all(|e| e.kind.to_string() != kind.to_string()),
            }
        })
        .cloned()
}

/// Lets a [`Layer`] be merged by reference, so the layers can be changed and
/// merged again.
struct LayerRef<'a>(&'a Layer);

impl Provider for LayerRef<'_> {
    fn metadata(&self) -> Metadata {
        self.0.metadata()
    }
    fn data(&self) -> figment::Result<Map<Profile, Dict>> {
        self.0.data()
    }
}

fn kind_message(kind: &Kind) -> String {
    match kind {
        Kind::Message(m) => m.clone(),
        Kind::InvalidType(actual, expected) => format!("expected {expected}, found {actual}"),
        Kind::InvalidValue(actual, expected) => format!("expected {expected}, found {actual}"),
        Kind::InvalidLength(len, expected) => format!("expected {expected}, found {len} items"),
        Kind::UnknownVariant(v, expected) => {
            format!(
                "unknown value \"{v}\"; expected one of: {}",
                expected.join(", ")
            )
        }
        Kind::UnknownField(_, expected) => {
            format!("unknown setting; known here: {}", expected.join(", "))
        }
        Kind::MissingField(field) => format!("required setting {field} is missing"),
        Kind::DuplicateField(field) => format!("setting {field} is given twice"),
        other => other.to_string(),
    }
}

/// Finds the value at `path` in `value`, with array indices as numbers.
fn lookup<'v>(value: &'v Value, path: &[String]) -> Option<&'v Value> {
    let mut current = value;
    for key in path {
        current = match current {
            Value::Dict(_, dict) => dict.get(key)?,
            Value::Array(_, items) => items.get(key.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(current)
}

fn describe(
    program: &str,
    figment: &Figment,
    merged: &Value,
    file: &Option<(PathBuf, String)>,
    path: &[String],
    message: String,
) -> ConfigError {
    let found = lookup(merged, path);
    ConfigError {
        key: path.join("."),
        value: found.map(display_value),
        origin: found.and_then(|v| origin_of(program, figment, file, v.tag(), path)),
        message,
    }
}

fn origin_of(
    program: &str,
    figment: &Figment,
    file: &Option<(PathBuf, String)>,
    tag: Tag,
    path: &[String],
) -> Option<Origin> {
    let metadata = figment.get_metadata(tag)?;
    Some(match &metadata.source {
        // A program has a YAML file or a converted one, never both.
        Some(Source::File(source)) => match file {
            Some((path_buf, text)) => Origin::File {
                path: path_buf.clone(),
                line: yaml_line(text, path),
            },
            None => Origin::File {
                path: source.clone(),
                line: None,
            },
        },
        _ if metadata.name.starts_with("`") || metadata.name.contains("environment") => {
            Origin::Env(env_var(program, &path.join(".")))
        }
        _ if metadata.name == "command-line flags" => {
            Origin::Flag(flag_name(path.first().map(String::as_str).unwrap_or("")))
        }
        _ => Origin::Default,
    })
}

/// A value as a user would write it: strings quoted, lists in brackets.
pub fn display_value(value: &Value) -> String {
    match value {
        Value::String(_, s) => format!("{s:?}"),
        Value::Char(_, c) => format!("{:?}", c.to_string()),
        Value::Bool(_, b) => b.to_string(),
        Value::Num(_, n) => match (n.to_u128(), n.to_i128(), n.to_f64()) {
            (Some(u), _, _) => u.to_string(),
            (None, Some(i), _) => i.to_string(),
            (None, None, Some(f)) => f.to_string(),
            _ => format!("{n:?}"),
        },
        Value::Empty(_, _) => "null".to_string(),
        Value::Array(_, items) => {
            let inner: Vec<String> = items.iter().map(display_value).collect();
            format!("[{}]", inner.join(", "))
        }
        Value::Dict(_, dict) => {
            let inner: Vec<String> = dict
                .iter()
                .map(|(k, v)| format!("{k}: {}", display_value(v)))
                .collect();
            format!("{{{}}}", inner.join(", "))
        }
    }
}

/// Collects the keys present in `given` that the typed settings do not have.
fn unknown_keys(
    given: &Value,
    shape: &Value,
    path: &mut Vec<String>,
    out: &mut Vec<(Vec<String>, Vec<String>)>,
) {
    match (given, shape) {
        (Value::Dict(_, given), Value::Dict(_, shape)) => {
            for (key, value) in given {
                path.push(key.clone());
                match shape.get(key) {
                    Some(known) => unknown_keys(value, known, path, out),
                    None => out.push((path.clone(), shape.keys().cloned().collect())),
                }
                path.pop();
            }
        }
        (Value::Array(_, given), Value::Array(_, shape)) => {
            for (i, (g, s)) in given.iter().zip(shape).enumerate() {
                path.push(i.to_string());
                unknown_keys(g, s, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

/// Finds the 1-based line of a key path in a YAML document, following
/// indentation; list indices count `- ` items.
pub fn yaml_line(text: &str, path: &[String]) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut start = 0;
    let mut min_indent: isize = -1;
    let mut found = None;
    for segment in path {
        let mut hit = None;
        if let Ok(index) = segment.parse::<usize>() {
            // The index-th list item at the first list indentation below.
            let mut count = 0;
            let mut item_indent = None;
            for (n, line) in lines.iter().enumerate().skip(start) {
                let body = line.trim_start();
                if body.is_empty() || body.starts_with('#') {
                    continue;
                }
                let indent = (line.len() - body.len()) as isize;
                if indent <= min_indent && !body.starts_with("- ") && !body.starts_with('-') {
                    break;
                }
                if body.starts_with('-') {
                    let expected = *item_indent.get_or_insert(indent);
                    if indent == expected {
                        if count == index {
                            hit = Some((n, indent));
                            break;
                        }
                        count += 1;
                    }
                }
            }
            let (n, indent) = hit?;
            found = Some(n);
            // Keys of the item start on its own line, after the dash.
            start = n;
            min_indent = indent;
            continue;
        }
        let mut child_indent = None;
        for (n, line) in lines.iter().enumerate().skip(start) {
            let body = line.trim_start();
            if body.is_empty() || body.starts_with('#') {
                continue;
            }
            let mut indent = (line.len() - body.len()) as isize;
            let mut key_part = body;
            if let Some(rest) = key_part.strip_prefix("- ") {
                indent += 2;
                key_part = rest.trim_start();
            }
            if indent <= min_indent && n != start {
                break;
            }
            // Only keys at the first indentation below the parent are its own.
            if indent != *child_indent.get_or_insert(indent) {
                continue;
            }
            let key_matches = key_part
                .strip_prefix(segment.as_str())
                .or_else(|| {
                    key_part
                        .strip_prefix('"')
                        .and_then(|k| k.strip_prefix(segment.as_str()))
                        .and_then(|k| k.strip_prefix('"'))
                })
                .is_some_and(|rest| rest.trim_start().starts_with(':'));
            if key_matches && indent > min_indent {
                hit = Some((n, indent));
                break;
            }
        }
        let (n, indent) = hit?;
        found = Some(n);
        start = n + 1;
        min_indent = indent;
    }
    found.map(|n| n + 1)
}

impl<T: Serialize> Resolved<T> {
    /// The resolved configuration, one `key = value` line per setting with
    /// where it came from, as `--print-config` shows it.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        if let Ok(merged) = self.figment.find_value("") {
            let mut lines = Vec::new();
            self.leaves(&merged, &mut Vec::new(), &mut lines);
            let width = lines.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
            for (line, origin) in lines {
                out.push_str(&format!("{line:width$}  # {origin}\n"));
            }
        }
        out
    }

    fn leaves(&self, value: &Value, path: &mut Vec<String>, out: &mut Vec<(String, String)>) {
        match value {
            Value::Dict(_, dict) if !dict.is_empty() => {
                for (key, v) in dict {
                    path.push(key.clone());
                    self.leaves(v, path, out);
                    path.pop();
                }
            }
            Value::Array(_, items) if items.iter().any(|i| matches!(i, Value::Dict(..))) => {
                for (i, v) in items.iter().enumerate() {
                    path.push(i.to_string());
                    self.leaves(v, path, out);
                    path.pop();
                }
            }
            _ => {
                let origin = origin_of(self.program, &self.figment, &self.file, value.tag(), path)
                    .map(|o| o.to_string())
                    .unwrap_or_else(|| "unknown".to_string());
                out.push((
                    format!("{} = {}", path.join("."), display_value(value)),
                    origin,
                ));
            }
        }
    }

    /// The environment variables under the program's prefix that were left
    /// out as Kubernetes Service links (see [`is_service_link`]), sorted.
    pub fn service_links(&self) -> &[String] {
        &self.service_links
    }

    /// Where the value of a top-level `key` came from.
    pub fn origin(&self, key: &str) -> Option<Origin> {
        let path: Vec<String> = key.split('.').map(str::to_string).collect();
        let merged = self.figment.find_value("").ok()?;
        let value = lookup(&merged, &path)?;
        origin_of(self.program, &self.figment, &self.file, value.tag(), &path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::{ListenAddr, Seconds, ServeSettings};
    use serde::Deserialize;
    use std::io::Write;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(default)]
    struct Settings {
        listen: ListenAddr,
        greeting: String,
        #[serde(flatten)]
        serve: ServeSettings,
        routes: Vec<Route>,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Route {
        name: String,
        listen: ListenAddr,
        #[serde(default)]
        idle_timeout: Option<Seconds>,
    }

    impl Default for Settings {
        fn default() -> Self {
            Settings {
                listen: "0.0.0.0:1234".parse().unwrap(),
                greeting: "hello".into(),
                serve: ServeSettings::default(),
                routes: Vec::new(),
            }
        }
    }

    #[derive(Serialize, Default)]
    struct Flags {
        #[serde(skip_serializing_if = "Option::is_none")]
        listen: Option<String>,
    }

    fn yaml(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    fn sources(program: &'static str, file: Option<&Path>, flags: Flags) -> Sources<Flags> {
        Sources {
            program,
            file: file.map(Path::to_path_buf),
            flags,
            env_ignore: &["config"],
            converted: None,
        }
    }

    #[test]
    fn layers_override_in_order_and_remember_their_origin() {
        let file = yaml("greeting: from file\nlisten: 127.0.0.1:1\nidle_timeout: 2m\n");
        std::env::set_var("CFGTEST_LAYERS_LISTEN", "127.0.0.1:2");
        std::env::set_var("CFGTEST_LAYERS_MAX_CONNECTIONS", "7");
        let flags = Flags {
            listen: Some("127.0.0.1:3".into()),
        };
        let resolved: Resolved<Settings> =
            resolve(&sources("cfgtest-layers", Some(file.path()), flags)).unwrap();
        let s = &resolved.settings;
        assert_eq!(s.listen.to_string(), "127.0.0.1:3");
        assert_eq!(s.greeting, "from file");
        assert_eq!(s.serve.idle_timeout, Seconds::from_secs(120));
        assert_eq!(s.serve.max_connections, 7);
        assert_eq!(s.serve.shutdown_grace, Seconds::from_secs(10));
        assert_eq!(
            resolved.origin("listen"),
            Some(Origin::Flag("--listen".into()))
        );
        assert_eq!(
            resolved.origin("max_connections"),
            Some(Origin::Env("CFGTEST_LAYERS_MAX_CONNECTIONS".into()))
        );
        assert_eq!(
            resolved.origin("idle_timeout"),
            Some(Origin::File {
                path: file.path().to_path_buf(),
                line: Some(3)
            })
        );
        assert_eq!(resolved.origin("shutdown_grace"), Some(Origin::Default));
        let printed = resolved.describe();
        assert!(printed.contains("listen = \"127.0.0.1:3\""), "{printed}");
        assert!(printed.contains("# flag --listen"), "{printed}");
        assert!(
            printed.contains("# environment variable CFGTEST_LAYERS_MAX_CONNECTIONS"),
            "{printed}"
        );
        assert!(printed.contains(" line 1"), "{printed}");
    }

    #[test]
    fn every_bad_value_is_reported_at_once_with_key_value_and_origin() {
        let file = yaml(
            "greeting: fine\nidle_timeout: soonish\nlistn: 1.2.3.4:5\nroutes:\n  - name: db\n    listen: nowhere\n  - name: ok\n    listen: 127.0.0.1:9\n",
        );
        std::env::set_var("CFGTEST_MANY_MAX_CONNECTIONS", "lots");
        let flags = Flags {
            listen: Some("127.0.0.1:99999".into()),
        };
        let errors = resolve::<Settings, _>(&sources("cfgtest-many", Some(file.path()), flags))
            .unwrap_err()
            .0;
        let path = file.path().display().to_string();
        let find = |key: &str| {
            errors
                .iter()
                .find(|e| e.key == key)
                .unwrap_or_else(|| panic!("no error for {key} in {errors:#?}"))
        };
        assert_eq!(errors.len(), 5, "{errors:#?}");
        let timeout = find("idle_timeout");
        assert_eq!(timeout.value.as_deref(), Some("\"soonish\""));
        assert_eq!(
            timeout.origin.as_ref().unwrap().to_string(),
            format!("{path} line 2")
        );
        assert!(timeout.message.contains("30s"), "{}", timeout.message);
        let unknown = find("listn");
        assert_eq!(
            unknown.origin.as_ref().unwrap().to_string(),
            format!("{path} line 3")
        );
        assert!(unknown.message.contains("listen"), "{}", unknown.message);
        let route = find("routes.0.listen");
        assert_eq!(
            route.origin.as_ref().unwrap().to_string(),
            format!("{path} line 6")
        );
        let env = find("max_connections");
        assert_eq!(
            env.origin,
            Some(Origin::Env("CFGTEST_MANY_MAX_CONNECTIONS".into()))
        );
        assert_eq!(env.value.as_deref(), Some("\"lots\""));
        let flag = find("listen");
        assert_eq!(flag.origin, Some(Origin::Flag("--listen".into())));
        assert!(flag.message.contains("port"), "{}", flag.message);
        let shown = ConfigErrors(errors.clone()).to_string();
        assert!(
            shown.starts_with("invalid configuration, 5 problems:"),
            "{shown}"
        );
    }

    #[test]
    fn an_unknown_environment_variable_with_the_prefix_is_named() {
        std::env::set_var("CFGTEST_ENVTYPO_LISTN", "1.2.3.4:5");
        let errors = resolve::<Settings, _>(&sources("cfgtest-envtypo", None, Flags::default()))
            .unwrap_err();
        assert_eq!(errors.0.len(), 1);
        assert_eq!(
            errors.0[0].origin,
            Some(Origin::Env("CFGTEST_ENVTYPO_LISTN".into()))
        );
    }

    #[test]
    fn a_missing_config_file_is_an_error() {
        let missing = Path::new("/nonexistent/config.yaml");
        let errors =
            resolve::<Settings, _>(&sources("cfgtest-missing", Some(missing), Flags::default()))
                .unwrap_err()
                .to_string();
        assert!(
            errors.contains("/nonexistent/config.yaml does not exist"),
            "{errors}"
        );
        assert!(errors.contains("CFGTEST_MISSING_CONFIG"), "{errors}");
    }

    #[test]
    fn a_yaml_syntax_error_names_the_line() {
        let file = yaml("greeting: ok\nlisten: [unclosed\n");
        let errors = resolve::<Settings, _>(&sources(
            "cfgtest-syntax",
            Some(file.path()),
            Flags::default(),
        ))
        .unwrap_err()
        .to_string();
        assert!(errors.contains("not valid YAML"), "{errors}");
        assert!(errors.contains("line"), "{errors}");
    }

    #[test]
    fn text_resolves_like_the_file_it_stands_for() {
        let text = "greeting: from text\nidle_timeout: soonish\n";
        let path = Path::new("/etc/never-read.yaml");
        let errors = resolve_yaml::<Settings, _>(
            &sources("cfgtest-text", None, Flags::default()),
            path,
            text,
        )
        .unwrap_err();
        assert_eq!(errors.0.len(), 1, "{errors}");
        assert_eq!(
            errors.0[0].origin,
            Some(Origin::File {
                path: path.to_path_buf(),
                line: Some(2)
            })
        );
        let resolved: Resolved<Settings> = resolve_yaml(
            &sources("cfgtest-text", None, Flags::default()),
            path,
            "greeting: from text\n",
        )
        .unwrap();
        assert_eq!(resolved.settings.greeting, "from text");
        assert_eq!(
            resolved.origin("greeting"),
            Some(Origin::File {
                path: path.to_path_buf(),
                line: Some(1)
            })
        );
    }

    /// The kubelet's variables for a Service `name` with `ip` and one port.
    fn kubelet(
        name: &str,
        ip: &str,
        port: u16,
        protocol: &str,
        port_name: &str,
    ) -> Vec<(String, String)> {
        let svc = name.to_ascii_uppercase().replace('-', "_");
        let proto = protocol.to_ascii_lowercase();
        let host_port = if ip.contains(':') {
            format!("[{ip}]:{port}")
        } else {
            format!("{ip}:{port}")
        };
        let link = format!("{proto}://{host_port}");
        let each = format!("{svc}_PORT_{port}_{}", protocol.to_ascii_uppercase());
        let mut vars = vec![
            (format!("{svc}_SERVICE_HOST"), ip.to_string()),
            (format!("{svc}_SERVICE_PORT"), port.to_string()),
            (format!("{svc}_PORT"), link.clone()),
            (each.clone(), link),
            (format!("{each}_PROTO"), proto),
            (format!("{each}_PORT"), port.to_string()),
            (format!("{each}_ADDR"), ip.to_string()),
        ];
        if !port_name.is_empty() {
            vars.push((
                format!(
                    "{svc}_SERVICE_PORT_{}",
                    port_name.to_ascii_uppercase().replace('-', "_")
                ),
                port.to_string(),
            ));
        }
        vars
    }

    #[test]
    fn every_service_link_form_is_recognised() {
        let services = [
            kubelet("tunnel", "10.96.0.12", 1001, "TCP", "incoming"),
            kubelet("echo-server", "10.96.0.13", 1234, "TCP", "echoendpoint"),
            kubelet("echo-server-balancer", "10.96.0.14", 1234, "TCP", ""),
            kubelet("square-server", "fd00::2345", 2345, "UDP", "square-alt"),
            kubelet("square-client", "10.96.0.16", 9, "SCTP", "discard"),
        ];
        for (name, value) in services.iter().flatten() {
            assert!(is_service_link(name, value), "{name}={value}");
        }
        // Eight variables for a named port, seven for an unnamed one.
        assert_eq!(services.iter().flatten().count(), 4 * 8 + 7);
        for (name, value) in [
            ("TUNNEL_PORT", "tcp://10.96.0.12:1001"),
            ("TUNNEL_PORT", "udp://10.96.0.12:53"),
            ("TUNNEL_PORT", "sctp://10.96.0.12:9"),
            ("TUNNEL_PORT", "tcp://[fd00::12]:1001"),
            ("TUNNEL_PORT", "tcp://fd00::12:1001"),
            ("TUNNEL_PORT", "tcp://tunnel.default.svc:1001"),
            ("SQUARE_SERVER_PORT_2345_TCP_ADDR", "10.96.0.15"),
            ("SQUARE_SERVER_SERVICE_PORT_HTTP_ALT", "8080"),
            // A Service name may itself hold the words.
            ("TUNNEL_SERVICE_SERVICE_HOST", "10.96.0.17"),
            ("TUNNEL_PORT_1_PORT_1_TCP", "tcp://10.96.0.18:1"),
            // The name-only forms do not look at the value.
            ("TUNNEL_SERVICE_HOST", ""),
            ("TUNNEL_PORT_1001_TCP_PORT", "1001"),
        ] {
            assert!(is_service_link(name, value), "{name}={value}");
        }
    }

    #[test]
    fn a_port_variable_is_a_service_link_only_with_a_link_value() {
        for value in [
            "5433",
            "",
            "tcp://10.96.0.12",
            "tcp://:1001",
            "tcp://10.96.0.12:",
            "tcp://10.96.0.12:99999",
            "tcp://10.96.0.12:+1",
            "tcp://10.96.0.12:1001/",
            "tcp://10.96.0.12/x:1001",
            "tcp://10.96. 0.12:1001",
            "TCP://10.96.0.12:1001",
            "http://10.96.0.12:1001",
            "tcp:/10.96.0.12:1001",
            " tcp://10.96.0.12:1001",
            "10.96.0.12:1001",
        ] {
            assert!(
                !is_service_link("TUNNEL_PORT", value),
                "TUNNEL_PORT={value:?}"
            );
            assert!(!is_service_link_value(value), "{value:?}");
        }
        // The same rule for any key that ends in `port`, nested or not.
        assert!(is_service_link(
            "TUNNEL_HEALTH_CHECK__PORT",
            "tcp://10.96.0.12:1001"
        ));
        assert!(!is_service_link("TUNNEL_HEALTH_CHECK__PORT", "8080"));
        assert!(is_service_link(
            "TUNNEL_ADMIN_PORT",
            "tcp://10.96.0.12:9090"
        ));
        assert!(!is_service_link("TUNNEL_ADMIN_PORT", "9090"));
    }

    #[test]
    fn near_misses_are_not_service_links() {
        for (name, value) in [
            ("TUNNEL_PORT_X", "1"),
            ("TUNNEL_PORTS", "tcp://10.96.0.12:1001"),
            ("TUNNEL_SERVICE_HOSTS", "10.96.0.12"),
            ("TUNNEL_SERVICE_HOST_", "10.96.0.12"),
            ("TUNNEL_SERVICE", "10.96.0.12"),
            ("TUNNEL_SERVICE_PORT_", "1001"),
            ("TUNNEL_SERVICEPORT", "1001"),
            ("TUNNEL_PORT_1001", "tcp://10.96.0.12:1001"),
            ("TUNNEL_PORT_1001_HTTP", "tcp://10.96.0.12:1001"),
            ("TUNNEL_PORT_1001_TCP_HOST", "10.96.0.12"),
            ("TUNNEL_PORT_1001_TCP_ADDR_X", "10.96.0.12"),
            ("TUNNEL_PORT_99999_TCP", "tcp://10.96.0.12:99999"),
            ("TUNNEL_PORT__TCP", "tcp://10.96.0.12:1001"),
            ("TUNNEL_PORT_1001_tcp", "tcp://10.96.0.12:1001"),
            ("tunnel_service_host", "10.96.0.12"),
            ("Tunnel_Service_Host", "10.96.0.12"),
            ("SERVICE_HOST", "10.96.0.12"),
            ("_SERVICE_HOST", "10.96.0.12"),
            ("PORT", "tcp://10.96.0.12:1001"),
            ("TUNNEL-X_SERVICE_HOST", "10.96.0.12"),
            ("ECHO_SERVER_PORT", "1234"),
            ("ECHO_SERVER_IDLE_TIMEOT", "5m"),
            ("TUNNEL_PORT", "5433"),
            ("TUNNEL_HOST", "10.96.0.12"),
        ] {
            assert!(!is_service_link(name, value), "{name}={value}");
        }
    }

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(default)]
    struct Target {
        host: Option<String>,
        port: Option<u16>,
        health: Health,
        #[serde(flatten)]
        serve: ServeSettings,
    }

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(default)]
    struct Health {
        port: Option<u16>,
        interval: Option<Seconds>,
    }

    fn target(program: &'static str) -> Result<Resolved<Target>, ConfigErrors> {
        resolve(&Sources {
            program,
            file: None,
            flags: Flags::default(),
            env_ignore: &["config"],
            converted: None,
        })
    }

    /// Sets the kubelet's variables for the Services `<program>`,
    /// `<program>-balancer` and `<program>-health-` (whose `_PORT` variable
    /// is the one of the nested key `health.port`).
    fn set_links(program: &str) {
        for (i, service) in ["", "-balancer", "-health-"].iter().enumerate() {
            let ip = format!("10.96.1.{i}");
            for (name, value) in
                kubelet(&format!("{program}{service}"), &ip, 1001, "TCP", "incoming")
            {
                std::env::set_var(name, value);
            }
        }
    }

    #[test]
    fn service_links_are_left_out_and_settings_beside_them_apply() {
        set_links("cfgtest-links");
        std::env::set_var("CFGTEST_LINKS_HOST", "db.internal");
        let resolved = target("cfgtest-links").unwrap();
        // CFGTEST_LINKS_PORT=tcp://10.96.1.0:1001 and
        // CFGTEST_LINKS_HEALTH__PORT=tcp://10.96.1.2:1001 are Kubernetes'.
        assert_eq!(resolved.settings.port, None);
        assert_eq!(resolved.settings.health.port, None);
        assert_eq!(resolved.settings.host.as_deref(), Some("db.internal"));
        let links = resolved.service_links();
        assert_eq!(links.len(), 3 * 8, "{links:?}");
        for name in [
            "CFGTEST_LINKS_PORT",
            "CFGTEST_LINKS_SERVICE_HOST",
            "CFGTEST_LINKS_SERVICE_PORT_INCOMING",
            "CFGTEST_LINKS_BALANCER_PORT_1001_TCP_ADDR",
            "CFGTEST_LINKS_HEALTH__PORT",
        ] {
            assert!(links.iter().any(|l| l == name), "{name} not in {links:?}");
        }
        assert!(
            !links.iter().any(|l| l == "CFGTEST_LINKS_HOST"),
            "{links:?}"
        );
        // --print-config shows settings only.
        let printed = resolved.describe();
        assert!(!printed.contains("SERVICE"), "{printed}");
        assert!(!printed.contains("10.96."), "{printed}");
        assert!(!printed.contains("balancer"), "{printed}");
    }

    #[test]
    fn a_port_number_is_the_setting_beside_service_links() {
        set_links("cfgtest-linkport");
        std::env::set_var("CFGTEST_LINKPORT_HOST", "127.0.0.1");
        std::env::set_var("CFGTEST_LINKPORT_PORT", "5433");
        std::env::set_var("CFGTEST_LINKPORT_HEALTH__PORT", "8080");
        let resolved = target("cfgtest-linkport").unwrap();
        assert_eq!(resolved.settings.port, Some(5433));
        assert_eq!(resolved.settings.health.port, Some(8080));
        assert_eq!(
            resolved.origin("port"),
            Some(Origin::Env("CFGTEST_LINKPORT_PORT".into()))
        );
        assert_eq!(resolved.service_links().len(), 3 * 8 - 2);
    }

    #[test]
    fn a_typo_beside_service_links_is_still_refused() {
        set_links("cfgtest-linktypo");
        std::env::set_var("CFGTEST_LINKTYPO_IDLE_TIMEOT", "5m");
        // `PORT_X` is not a Service link: a typo of some key.
        std::env::set_var("CFGTEST_LINKTYPO_PORT_X", "1");
        let errors = target("cfgtest-linktypo").unwrap_err().0;
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["idle_timeot", "port_x"], "{errors:#?}");
        assert_eq!(
            errors[0].origin,
            Some(Origin::Env("CFGTEST_LINKTYPO_IDLE_TIMEOT".into()))
        );
        assert!(errors[0].message.contains("unknown setting"), "{errors:#?}");
    }

    #[test]
    fn a_port_that_is_not_a_port_number_nor_a_link_is_refused() {
        std::env::set_var("CFGTEST_LINKBAD_PORT", "TCP://10.96.0.12:1001");
        let errors = target("cfgtest-linkbad").unwrap_err().0;
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert_eq!(errors[0].key, "port");
        assert_eq!(
            errors[0].origin,
            Some(Origin::Env("CFGTEST_LINKBAD_PORT".into()))
        );
    }

    #[test]
    fn yaml_lines_follow_nesting_and_list_items() {
        let text =
            "a: 1\nroutes:\n  - name: x\n    listen: 1\n  - name: y\n    listen: 2\nlisten: 3\n";
        let p = |s: &str| s.split('.').map(str::to_string).collect::<Vec<_>>();
        assert_eq!(yaml_line(text, &p("routes.1.listen")), Some(6));
        assert_eq!(yaml_line(text, &p("routes.0.name")), Some(3));
        assert_eq!(yaml_line(text, &p("listen")), Some(7));
        assert_eq!(yaml_line(text, &p("routes.2")), None);
    }
}
