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
use figment::providers::{Env, Serialized};
use figment::value::{Dict, Map, Tag, Value};
use figment::{Figment, Metadata, Profile, Provider, Source};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::yaml::{self, Node};

mod links;

use links::service_links;
pub use links::{is_service_link, is_service_link_value};

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

/// One resolved value's place of origin, as a user would go and fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The program's built-in default.
    Default,
    /// A configuration file, with the place of the key when known.
    File {
        /// The file's path as given.
        path: PathBuf,
        /// 1-based line of the key, when known.
        line: Option<usize>,
        /// 1-based column of the key, when known.
        column: Option<usize>,
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
                column: Some(column),
            } => write!(f, "{}:{line}:{column}", path.display()),
            Origin::File {
                path,
                line: Some(line),
                column: None,
            } => write!(f, "{}:{line}", path.display()),
            Origin::File { path, .. } => write!(f, "{}", path.display()),
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
        write_problems(
            f,
            "invalid configuration: ",
            "invalid configuration, ",
            &self.0,
        )
    }
}

/// Writes one problem after `one`, or several after `many` as
/// `N problems:` and one indented line each: how every list of problems
/// reads.
pub fn write_problems<T: fmt::Display>(
    f: &mut fmt::Formatter<'_>,
    one: &str,
    many: &str,
    problems: &[T],
) -> fmt::Result {
    match problems {
        [single] => write!(f, "{one}{single}"),
        all => {
            write!(f, "{many}{} problems:", all.len())?;
            for p in all {
                write!(f, "\n  {p}")?;
            }
            Ok(())
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

/// What common needs to know of a program's settings beyond their shape:
/// problems that take more than one setting to see, and what is actually
/// used, for `--print-config`.
pub trait ProgramSettings {
    /// Problems between settings that are each fine alone (a zone given
    /// twice, a line too short for the longest number), each at a key;
    /// `origin` says where a key's value came from, for messages.
    fn problems(&self, _origin: &dyn Fn(&str) -> Option<Origin>) -> Vec<ConfigError> {
        Vec::new()
    }

    /// The value in force for the top-level `key` when the written one
    /// does not say it (a time zone found at start), with why.
    fn effective(&self, _key: &str) -> Option<(String, String)> {
        None
    }

    /// Whether the top-level `key` is not used with these settings (the
    /// quick form's keys when routes are given).
    fn unused(&self, _key: &str) -> bool {
        false
    }
}

/// `settings` as a value without the top-level keys they do not use, to
/// write them out as a configuration file would have them.
pub fn in_use<T: Serialize + ProgramSettings>(settings: &T) -> serde_json::Value {
    let mut value = serde_json::to_value(settings).unwrap_or_default();
    if let serde_json::Value::Object(map) = &mut value {
        map.retain(|key, _| !settings.unused(key));
    }
    value
}

/// A configuration that resolved cleanly, with the record of where each value
/// came from.
#[derive(Debug)]
pub struct Resolved<T> {
    /// The typed settings.
    pub settings: T,
    program: &'static str,
    figment: Figment,
    file: Option<(PathBuf, Node)>,
    service_links: Vec<String>,
}

/// One layer of configuration: its values and where they came from.
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
    fn new(metadata: Metadata, values: Dict) -> Layer {
        let mut data = Map::new();
        data.insert(Profile::Default, values);
        Layer { metadata, data }
    }

    fn read(provider: impl Provider) -> Result<Layer, ConfigErrors> {
        Ok(Layer {
            metadata: provider.metadata(),
            data: provider
                .data()
                .map_err(|e| ConfigErrors::single(None, e.to_string()))?,
        })
    }
}

/// The settings a YAML configuration file gives, and its tree, which
/// knows where each is written.
fn yaml_layer(path: &Path, text: &str) -> Result<Option<(Layer, Node)>, ConfigErrors> {
    let at = |pos: Option<yaml::Pos>| {
        Some(Origin::File {
            path: path.to_path_buf(),
            line: pos.map(|p| p.line),
            column: pos.map(|p| p.column),
        })
    };
    let node = yaml::parse(text)
        .map_err(|e| ConfigErrors::single(at(e.pos), format!("not valid YAML: {}", e.message)))?;
    match node.value {
        yaml::Value::Null => return Ok(None),
        yaml::Value::Map(_) => {}
        _ => {
            return Err(ConfigErrors::single(
                at(Some(node.pos)),
                format!(
                    "the file holds {}; it should be a mapping of settings (key: value)",
                    node.kind()
                ),
            ))
        }
    }
    let values = match Value::serialize(node.to_json()) {
        Ok(Value::Dict(_, dict)) => dict,
        Ok(_) => Dict::new(),
        Err(e) => return Err(ConfigErrors::single(at(None), e.to_string())),
    };
    let metadata = Metadata::from("YAML file", Source::File(path.to_path_buf()));
    Ok(Some((Layer::new(metadata, values), node)))
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

    let mut tree = None;
    if let Some((path, text)) = &file {
        if let Some((layer, node)) = yaml_layer(path, text)? {
            layers.push(layer);
            tree = Some((path.clone(), node));
        }
    }

    if let Some(converted) = &sources.converted {
        let mut metadata =
            Metadata::from("configuration file", Source::File(converted.path.clone()));
        metadata.name = converted.path.display().to_string().into();
        layers.push(Layer::new(metadata, converted.values.clone()));
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
    layers.push(Layer::read(env)?);
    let mut flags = Layer::read(Serialized::defaults(&sources.flags))?;
    flags.metadata = flags_metadata();
    layers.push(flags);

    let figment = layers.into_iter().fold(Figment::new(), Figment::merge);
    let resolved = Resolved {
        settings: (),
        program: sources.program,
        figment,
        file: tree,
        service_links,
    };
    let settings = resolved.check::<T>().map_err(ConfigErrors)?;
    Ok(Resolved {
        settings,
        program: resolved.program,
        figment: resolved.figment,
        file: resolved.file,
        service_links: resolved.service_links,
    })
}

/// Every problem with the settings in `merged`, each at its key path:
/// each top-level setting is checked on its own over the defaults (so a
/// problem inside a flattened struct, whose error carries no key, is
/// still found at its key), and within one, a bad value found is taken
/// out and the rest checked again, so every problem is reported at once;
/// last, the keys the settings do not have. `skip` names settings not to
/// check (those left at their defaults).
pub fn check_settings<T: Serialize + DeserializeOwned + Default>(
    merged: &Dict,
    skip: impl Fn(&str) -> bool,
) -> Vec<(Vec<String>, String)> {
    let known: Vec<String> = match Value::serialize(T::default()) {
        Ok(Value::Dict(_, dict)) => dict.keys().cloned().collect(),
        _ => Vec::new(),
    };
    let mut problems: Vec<(Vec<String>, String)> = Vec::new();
    for (key, value) in merged {
        if !known.contains(key) {
            problems.push((
                vec![key.clone()],
                format!("unknown setting; known here: {}", known.join(", ")),
            ));
            continue;
        }
        if skip(key) {
            continue;
        }
        let mut value = value.clone();
        // Each pass takes a bad value out, or stops; a bound keeps a
        // surprise from looping forever.
        for _ in 0..64 {
            let alone = Figment::from(Serialized::defaults(T::default()))
                .merge(Serialized::default(key, &value));
            let err = match alone.extract::<T>() {
                Ok(settings) => {
                    if let Ok(Value::Dict(_, shape)) = Value::serialize(&settings) {
                        if let Some(shape) = shape.get(key) {
                            let mut unknown = Vec::new();
                            unknown_keys(&value, shape, &mut vec![key.clone()], &mut unknown);
                            for (path, known) in unknown {
                                let message =
                                    format!("unknown setting; known here: {}", known.join(", "));
                                problems.push((path, message));
                            }
                        }
                    }
                    break;
                }
                Err(err) => err,
            };
            let mut progress = false;
            for e in err {
                let mut path = e.path.clone();
                if path.first() != Some(key) {
                    path = vec![key.clone()];
                }
                if let Kind::UnknownField(field, _) = &e.kind {
                    path.push(field.clone());
                }
                if let Kind::MissingField(field) = &e.kind {
                    // Missing only because its bad value was taken out.
                    let mut taken = path.clone();
                    taken.push(field.to_string());
                    if problems.iter().any(|(p, _)| *p == taken) {
                        continue;
                    }
                }
                progress |= remove_from_value(&mut value, &path[1..]);
                let problem = (path, kind_message(&e.kind));
                if !problems.contains(&problem) {
                    problems.push(problem);
                }
            }
            if !progress {
                break;
            }
        }
    }
    problems
}

/// Takes the value at `path` out of `value`; true when something was
/// removed. A list item is not removed (the others would move up), nor
/// the value itself (an empty path).
fn remove_from_value(value: &mut Value, path: &[String]) -> bool {
    match (value, path) {
        (_, []) => false,
        (Value::Dict(_, dict), [last]) => dict.remove(last).is_some(),
        (Value::Dict(_, dict), [first, rest @ ..]) => dict
            .get_mut(first)
            .is_some_and(|v| remove_from_value(v, rest)),
        (Value::Array(_, items), [index, rest @ ..]) if !rest.is_empty() => index
            .parse::<usize>()
            .ok()
            .and_then(|i| items.get_mut(i))
            .is_some_and(|v| remove_from_value(v, rest)),
        _ => false,
    }
}

impl Resolved<()> {
    /// The typed settings, or every problem found, each with its value and
    /// origin.
    fn check<T: Serialize + DeserializeOwned + Default>(&self) -> Result<T, Vec<ConfigError>> {
        let merged = match self.figment.find_value("") {
            Ok(Value::Dict(_, dict)) => dict,
            Ok(_) => Dict::new(),
            Err(e) => return Err(ConfigErrors::single(None, e.to_string()).0),
        };
        let whole = Value::Dict(Tag::Default, merged.clone());
        let error_at = |path: &[String], message: String| {
            let found = lookup(&whole, path);
            ConfigError {
                key: path.join("."),
                value: found.map(display_value),
                origin: found.and_then(|v| self.origin_at(v.tag(), path)),
                message,
            }
        };
        let problems = check_settings::<T>(&merged, |key| {
            merged
                .get(key)
                .and_then(|v| self.origin_at(v.tag(), &[key.to_string()]))
                == Some(Origin::Default)
        });
        let errors: Vec<ConfigError> = problems
            .into_iter()
            .map(|(path, message)| error_at(&path, message))
            .collect();
        if !errors.is_empty() {
            return Err(errors);
        }
        let settings = match self.figment.extract::<T>() {
            Ok(settings) => settings,
            Err(err) => {
                return Err(err
                    .into_iter()
                    .map(|e| error_at(&e.path, kind_message(&e.kind)))
                    .collect())
            }
        };
        Ok(settings)
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

impl<T> Resolved<T> {
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
        self.origin_at(value.tag(), &path)
    }

    /// Where the value tagged `tag`, at `path`, came from.
    fn origin_at(&self, tag: Tag, path: &[String]) -> Option<Origin> {
        let metadata = self.figment.get_metadata(tag)?;
        Some(match &metadata.source {
            // A program has a YAML file or a converted one, never both.
            Some(Source::File(source)) => {
                let pos = self
                    .file
                    .as_ref()
                    .filter(|(path, _)| path == source)
                    .and_then(|(_, node)| node.pos_of(path));
                Origin::File {
                    path: source.clone(),
                    line: pos.map(|p| p.line),
                    column: pos.map(|p| p.column),
                }
            }
            _ if metadata.name.starts_with("`") || metadata.name.contains("environment") => {
                Origin::Env(env_var(self.program, &path.join(".")))
            }
            _ if metadata.name == "command-line flags" => {
                Origin::Flag(flag_name(path.first().map(String::as_str).unwrap_or("")))
            }
            _ => Origin::Default,
        })
    }
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

impl<T: Serialize + ProgramSettings> Resolved<T> {
    /// The resolved configuration, one `key = value` line per setting in
    /// use with where it came from, as `--print-config` shows it; a value
    /// found at start is shown as found.
    pub fn print_config(&self) -> String {
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
        if path.len() == 1 && self.settings.unused(&path[0]) {
            return;
        }
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
                let key = path.first().map(String::as_str).unwrap_or("");
                if self.settings.unused(key) {
                    return;
                }
                let origin = self
                    .origin_at(value.tag(), path)
                    .map(|o| o.to_string())
                    .unwrap_or_else(|| "unknown".to_string());
                let (shown, origin) = match self.settings.effective(key).filter(|_| path.len() == 1)
                {
                    Some((value, why)) => (format!("{value:?}"), format!("{origin}: {why}")),
                    None => (display_value(value), origin),
                };
                out.push((format!("{} = {shown}", path.join(".")), origin));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::links::tests::kubelet;
    use super::*;
    use crate::settings::{ListenAddr, Period, ServeSettings};
    use figment::Jail;

    /// Runs `test` with environment variables set through `jail`: tests
    /// that set them run one at a time, and each leaves the environment
    /// as it found it.
    #[allow(clippy::result_large_err)] // figment's Error, which Jail returns
    fn jailed(test: impl FnOnce(&mut Jail)) {
        Jail::expect_with(|jail| {
            test(jail);
            Ok(())
        });
    }
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

    impl ProgramSettings for Settings {}

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Route {
        name: String,
        listen: ListenAddr,
        #[serde(default)]
        idle_timeout: Option<Period>,
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
        jailed(|jail| {
            let file = yaml("greeting: from file\nlisten: 127.0.0.1:1\nidle_timeout: 2m\n");
            jail.set_env("CFGTEST_LAYERS_LISTEN", "127.0.0.1:2");
            jail.set_env("CFGTEST_LAYERS_MAX_CONNECTIONS", "7");
            let flags = Flags {
                listen: Some("127.0.0.1:3".into()),
            };
            let resolved: Resolved<Settings> =
                resolve(&sources("cfgtest-layers", Some(file.path()), flags)).unwrap();
            let s = &resolved.settings;
            assert_eq!(s.listen.to_string(), "127.0.0.1:3");
            assert_eq!(s.greeting, "from file");
            assert_eq!(s.serve.idle_timeout, Period::from_secs(120));
            assert_eq!(s.serve.max_connections, 7);
            assert_eq!(s.serve.shutdown_grace, Period::from_secs(10));
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
                    line: Some(3),
                    column: Some(1),
                })
            );
            assert_eq!(resolved.origin("shutdown_grace"), Some(Origin::Default));
            let printed = resolved.print_config();
            assert!(printed.contains("listen = \"127.0.0.1:3\""), "{printed}");
            assert!(printed.contains("# flag --listen"), "{printed}");
            assert!(
                printed.contains("# environment variable CFGTEST_LAYERS_MAX_CONNECTIONS"),
                "{printed}"
            );
            assert!(printed.contains(":1:1"), "{printed}");
        });
    }

    #[test]
    fn every_bad_value_is_reported_at_once_with_key_value_and_origin() {
        jailed(|jail| {
            let file = yaml(
                "greeting: fine\nidle_timeout: soonish\nlistn: 1.2.3.4:5\nroutes:\n  - name: db\n    listen: nowhere\n  - name: ok\n    listen: 127.0.0.1:9\n",
            );
            jail.set_env("CFGTEST_MANY_MAX_CONNECTIONS", "lots");
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
                format!("{path}:2:1")
            );
            assert!(timeout.message.contains("30s"), "{}", timeout.message);
            let unknown = find("listn");
            assert_eq!(
                unknown.origin.as_ref().unwrap().to_string(),
                format!("{path}:3:1")
            );
            assert!(unknown.message.contains("listen"), "{}", unknown.message);
            let route = find("routes.0.listen");
            assert_eq!(
                route.origin.as_ref().unwrap().to_string(),
                format!("{path}:6:5")
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
        });
    }

    #[test]
    fn an_unknown_environment_variable_with_the_prefix_is_named() {
        jailed(|jail| {
            jail.set_env("CFGTEST_ENVTYPO_LISTN", "1.2.3.4:5");
            let errors =
                resolve::<Settings, _>(&sources("cfgtest-envtypo", None, Flags::default()))
                    .unwrap_err();
            assert_eq!(errors.0.len(), 1);
            assert_eq!(
                errors.0[0].origin,
                Some(Origin::Env("CFGTEST_ENVTYPO_LISTN".into()))
            );
        });
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
        assert!(
            errors.contains(":2:9: not valid YAML: unclosed bracket"),
            "{errors}"
        );
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
                line: Some(2),
                column: Some(1),
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
                line: Some(1),
                column: Some(1),
            })
        );
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

    impl ProgramSettings for Target {}

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(default)]
    struct Health {
        port: Option<u16>,
        interval: Option<Period>,
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
    fn set_links(jail: &mut Jail, program: &str) {
        for (i, service) in ["", "-balancer", "-health-"].iter().enumerate() {
            let ip = format!("10.96.1.{i}");
            for (name, value) in
                kubelet(&format!("{program}{service}"), &ip, 1001, "TCP", "incoming")
            {
                jail.set_env(name, value);
            }
        }
    }

    #[test]
    fn service_links_are_left_out_and_settings_beside_them_apply() {
        jailed(|jail| {
            set_links(jail, "cfgtest-links");
            jail.set_env("CFGTEST_LINKS_HOST", "db.internal");
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
            let printed = resolved.print_config();
            assert!(!printed.contains("SERVICE"), "{printed}");
            assert!(!printed.contains("10.96."), "{printed}");
            assert!(!printed.contains("balancer"), "{printed}");
        });
    }

    #[test]
    fn a_port_number_is_the_setting_beside_service_links() {
        jailed(|jail| {
            set_links(jail, "cfgtest-linkport");
            jail.set_env("CFGTEST_LINKPORT_HOST", "127.0.0.1");
            jail.set_env("CFGTEST_LINKPORT_PORT", "5433");
            jail.set_env("CFGTEST_LINKPORT_HEALTH__PORT", "8080");
            let resolved = target("cfgtest-linkport").unwrap();
            assert_eq!(resolved.settings.port, Some(5433));
            assert_eq!(resolved.settings.health.port, Some(8080));
            assert_eq!(
                resolved.origin("port"),
                Some(Origin::Env("CFGTEST_LINKPORT_PORT".into()))
            );
            assert_eq!(resolved.service_links().len(), 3 * 8 - 2);
        });
    }

    #[test]
    fn a_typo_beside_service_links_is_still_refused() {
        jailed(|jail| {
            set_links(jail, "cfgtest-linktypo");
            jail.set_env("CFGTEST_LINKTYPO_IDLE_TIMEOT", "5m");
            // `PORT_X` is not a Service link: a typo of some key.
            jail.set_env("CFGTEST_LINKTYPO_PORT_X", "1");
            let errors = target("cfgtest-linktypo").unwrap_err().0;
            let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
            assert_eq!(keys, ["idle_timeot", "port_x"], "{errors:#?}");
            assert_eq!(
                errors[0].origin,
                Some(Origin::Env("CFGTEST_LINKTYPO_IDLE_TIMEOT".into()))
            );
            assert!(errors[0].message.contains("unknown setting"), "{errors:#?}");
        });
    }

    #[test]
    fn a_port_that_is_not_a_port_number_nor_a_link_is_refused() {
        jailed(|jail| {
            jail.set_env("CFGTEST_LINKBAD_PORT", "TCP://10.96.0.12:1001");
            let errors = target("cfgtest-linkbad").unwrap_err().0;
            assert_eq!(errors.len(), 1, "{errors:#?}");
            assert_eq!(errors[0].key, "port");
            assert_eq!(
                errors[0].origin,
                Some(Origin::Env("CFGTEST_LINKBAD_PORT".into()))
            );
        });
    }

    #[test]
    fn flow_style_and_block_style_problems_name_line_and_column() {
        for (text, line, column) in [
            (
                "greeting: ok\nroutes:\n  - name: x\n    listen: nowhere\n",
                4,
                5,
            ),
            (
                "{greeting: ok, routes: [{name: x, listen: nowhere}]}\n",
                1,
                35,
            ),
        ] {
            let path = Path::new("/etc/flow.yaml");
            let errors = resolve_yaml::<Settings, _>(
                &sources("cfgtest-flow", None, Flags::default()),
                path,
                text,
            )
            .unwrap_err();
            assert_eq!(errors.0.len(), 1, "{errors}");
            assert_eq!(errors.0[0].key, "routes.0.listen", "{errors}");
            assert_eq!(
                errors.0[0].origin,
                Some(Origin::File {
                    path: path.to_path_buf(),
                    line: Some(line),
                    column: Some(column),
                }),
                "{text}"
            );
        }
    }

    #[test]
    fn a_file_that_is_not_a_mapping_is_refused_at_its_place() {
        let errors = resolve_yaml::<Settings, _>(
            &sources("cfgtest-list", None, Flags::default()),
            Path::new("/etc/list.yaml"),
            "- greeting\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            errors.contains("/etc/list.yaml:1:1: the file holds a list"),
            "{errors}"
        );
    }
}
