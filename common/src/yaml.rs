//! YAML that knows where everything is: a document read into a tree whose
//! every node and key carries its line and column, so a check can report
//! each problem it finds at its place, however the file is written (block
//! or flow style, anchors and aliases).
//!
//! The parser is serde-saphyr's: maintained, fuzzed, panic-free, with
//! budgets against pathological input, and duplicate keys refused.

use std::fmt;

use serde::de::{self, Deserialize, DeserializeOwned, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value as Json;
use serde_saphyr::{MessageFormatter, Spanned, UserMessageFormatter};

/// A place in a YAML text: 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pos {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// A value of the document.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `~`, `null` or nothing.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// An integer.
    Int(i128),
    /// A floating-point number.
    Float(f64),
    /// A string.
    Str(String),
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, in the order written (keys are unique: the parser
    /// refuses a duplicate).
    Map(Vec<(Key, Node)>),
}

/// A mapping key and where it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    /// The key as text (`123: x` has the key "123").
    pub name: String,
    /// Where it is written.
    pub pos: Pos,
}

/// A value and where it is written.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// The value.
    pub value: Value,
    /// Where it starts.
    pub pos: Pos,
}

/// A document that is not YAML: the parser's message and its place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    /// Where, when the parser knows.
    pub pos: Option<Pos>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pos {
            Some(pos) => write!(f, "{pos}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for SyntaxError {}

/// The deepest nesting a document may have. Configuration nests a few
/// levels; a bound keeps a hostile file from exhausting the stack.
pub const MAX_DEPTH: usize = 24;

/// Reads `text` as one YAML document. An empty document is `Null`.
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    let mut budget = serde_saphyr::budget::Budget::default();
    budget.max_depth = MAX_DEPTH;
    let options = serde_saphyr::options! { with_snippet: false, budget: Some(budget) };
    serde_saphyr::from_str_with_options::<Spanned<Raw>>(text, options)
        .map(Node::from)
        .map_err(|e| SyntaxError {
            pos: e.location().and_then(|l| place(&l)),
            message: UserMessageFormatter.format_message(&e).into_owned(),
        })
}

fn place(location: &serde_saphyr::Location) -> Option<Pos> {
    (location.line() > 0).then(|| Pos {
        line: location.line() as usize,
        column: location.column().max(1) as usize,
    })
}

impl Node {
    /// The value under `key`, when this is a mapping that has it.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.entry(key).map(|(_, node)| node)
    }

    /// The key and value under `key`, when this is a mapping that has it.
    pub fn entry(&self, key: &str) -> Option<(&Key, &Node)> {
        match &self.value {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.name == key)
                .map(|(k, v)| (k, v)),
            _ => None,
        }
    }

    /// The node at a path of mapping keys and sequence indices
    /// (`["roles", "2", "settings"]`).
    pub fn at<S: AsRef<str>>(&self, path: &[S]) -> Option<&Node> {
        let mut node = self;
        for step in path {
            let step = step.as_ref();
            node = match &node.value {
                Value::Map(_) => node.get(step)?,
                Value::Seq(items) => items.get(step.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        Some(node)
    }

    /// Where the entry at `path` is: its key for a mapping entry, the item
    /// for a sequence element.
    pub fn pos_of<S: AsRef<str>>(&self, path: &[S]) -> Option<Pos> {
        let (last, parent) = path.split_last()?;
        let parent = self.at(parent)?;
        match &parent.value {
            Value::Map(_) => parent.entry(last.as_ref()).map(|(k, _)| k.pos),
            Value::Seq(items) => last
                .as_ref()
                .parse::<usize>()
                .ok()
                .and_then(|i| items.get(i))
                .map(|n| n.pos),
            _ => None,
        }
    }

    /// The entries of a mapping, or `None` for anything else.
    pub fn entries(&self) -> Option<&[(Key, Node)]> {
        match &self.value {
            Value::Map(entries) => Some(entries),
            _ => None,
        }
    }

    /// The items of a sequence, or `None` for anything else.
    pub fn items(&self) -> Option<&[Node]> {
        match &self.value {
            Value::Seq(items) => Some(items),
            _ => None,
        }
    }

    /// What kind of value this is, for messages (`a mapping`).
    pub fn kind(&self) -> &'static str {
        match self.value {
            Value::Null => "nothing",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    /// The value as JSON (integers out of JSON's range become strings).
    pub fn to_json(&self) -> Json {
        match &self.value {
            Value::Null => Json::Null,
            Value::Bool(b) => Json::Bool(*b),
            Value::Int(i) => i64::try_from(*i)
                .map(Json::from)
                .or_else(|_| u64::try_from(*i).map(Json::from))
                .unwrap_or_else(|_| Json::String(i.to_string())),
            Value::Float(f) => serde_json::Number::from_f64(*f)
                .map(Json::Number)
                .unwrap_or_else(|| Json::String(f.to_string())),
            Value::Str(s) => Json::String(s.clone()),
            Value::Seq(items) => Json::Array(items.iter().map(Node::to_json).collect()),
            Value::Map(entries) => Json::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.name.clone(), v.to_json()))
                    .collect(),
            ),
        }
    }

    /// The value as a `T`; the error says what was expected.
    pub fn typed<T: DeserializeOwned>(&self) -> Result<T, String> {
        serde_json::from_value(self.to_json()).map_err(|e| e.to_string())
    }
}

/// `text` read as a `T` (no places kept: for values written by
/// [`to_string`] or otherwise known good).
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    serde_saphyr::from_str(text).map_err(|e| UserMessageFormatter.format_message(&e).into_owned())
}

/// `value` written as a YAML document.
pub fn to_string<T: serde::Serialize>(value: &T) -> Result<String, String> {
    serde_saphyr::to_string(value).map_err(|e| e.to_string())
}

/// `value` written as a YAML document without the keys whose values are
/// empty (null, an empty list or mapping), at any depth: what a person
/// would write.
pub fn to_string_pruned<T: serde::Serialize>(value: &T) -> Result<String, String> {
    let mut json = serde_json::to_value(value).map_err(|e| e.to_string())?;
    prune(&mut json);
    to_string(&json)
}

fn prune(value: &mut Json) {
    let empty = |v: &Json| match v {
        Json::Null => true,
        Json::Array(items) => items.is_empty(),
        Json::Object(map) => map.is_empty(),
        _ => false,
    };
    match value {
        Json::Object(map) => {
            for v in map.values_mut() {
                prune(v);
            }
            map.retain(|_, v| !empty(v));
        }
        Json::Array(items) => items.iter_mut().for_each(prune),
        _ => {}
    }
}

/// The tree as the parser hands it over, spans attached by serde-saphyr.
enum Raw {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Spanned<Raw>>),
    Map(Vec<(Spanned<String>, Spanned<Raw>)>),
}

impl From<Spanned<Raw>> for Node {
    fn from(spanned: Spanned<Raw>) -> Node {
        let pos = place(&spanned.referenced).unwrap_or(Pos { line: 1, column: 1 });
        let value = match spanned.value {
            Raw::Null => Value::Null,
            Raw::Bool(b) => Value::Bool(b),
            Raw::Int(i) => Value::Int(i),
            Raw::Float(f) => Value::Float(f),
            Raw::Str(s) => Value::Str(s),
            Raw::Seq(items) => Value::Seq(items.into_iter().map(Node::from).collect()),
            Raw::Map(entries) => Value::Map(
                entries
                    .into_iter()
                    .map(|(k, v)| {
                        let key = Key {
                            pos: place(&k.referenced).unwrap_or(Pos { line: 1, column: 1 }),
                            name: k.value,
                        };
                        (key, Node::from(v))
                    })
                    .collect(),
            ),
        };
        Node { value, pos }
    }
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Any;
        impl<'de> Visitor<'de> for Any {
            type Value = Raw;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a YAML value")
            }
            fn visit_unit<E>(self) -> Result<Raw, E> {
                Ok(Raw::Null)
            }
            fn visit_none<E>(self) -> Result<Raw, E> {
                Ok(Raw::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Raw, D::Error> {
                Raw::deserialize(d)
            }
            fn visit_bool<E>(self, v: bool) -> Result<Raw, E> {
                Ok(Raw::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Raw, E> {
                Ok(Raw::Int(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Raw, E> {
                Ok(Raw::Int(v.into()))
            }
            fn visit_i128<E>(self, v: i128) -> Result<Raw, E> {
                Ok(Raw::Int(v))
            }
            fn visit_u128<E: de::Error>(self, v: u128) -> Result<Raw, E> {
                i128::try_from(v)
                    .map(Raw::Int)
                    .map_err(|_| E::custom("integer too large"))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Raw, E> {
                Ok(Raw::Float(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Raw, E> {
                Ok(Raw::Str(v.to_string()))
            }
            fn visit_string<E>(self, v: String) -> Result<Raw, E> {
                Ok(Raw::Str(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Raw, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<Spanned<Raw>>()? {
                    items.push(item);
                }
                Ok(Raw::Seq(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Raw, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<Spanned<String>>()? {
                    let value = map.next_value::<Spanned<Raw>>()?;
                    entries.push((key, value));
                }
                Ok(Raw::Map(entries))
            }
        }
        d.deserialize_any(Any)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_node_and_key_knows_its_place() {
        let doc = parse(
            "name: demo\nroles:\n  - name: echo\n    port: 70000\n  - {name: a, port: [1, 2]}\n",
        )
        .unwrap();
        assert_eq!(doc.pos_of(&["roles"]), Some(Pos { line: 2, column: 1 }));
        assert_eq!(
            doc.pos_of(&["roles", "0", "port"]),
            Some(Pos { line: 4, column: 5 })
        );
        assert_eq!(
            doc.at(&["roles", "0", "port"]).unwrap().pos,
            Pos {
                line: 4,
                column: 11
            }
        );
        // Flow style too.
        assert_eq!(
            doc.pos_of(&["roles", "1", "port"]),
            Some(Pos {
                line: 5,
                column: 15
            })
        );
        assert_eq!(
            doc.at(&["roles", "1", "port", "1"]).unwrap().pos,
            Pos {
                line: 5,
                column: 25
            }
        );
        assert_eq!(doc.pos_of(&["roles", "2"]), None);
        assert_eq!(
            doc.at(&["roles", "0", "port"]).unwrap().typed::<u32>(),
            Ok(70000)
        );
        assert!(doc
            .at(&["roles", "0", "port"])
            .unwrap()
            .typed::<u16>()
            .is_err());
    }

    #[test]
    fn values_convert_to_json() {
        let doc = parse("a: ~\nb: true\nc: 0x10\nd: 1.5\ne: [x, 2]\nf: {g: h}\n").unwrap();
        assert_eq!(
            doc.to_json(),
            serde_json::json!({"a": null, "b": true, "c": 16, "d": 1.5, "e": ["x", 2], "f": {"g": "h"}})
        );
        assert_eq!(parse("").unwrap().value, Value::Null);
    }

    #[test]
    fn values_are_written_back_as_they_read() {
        let value = serde_json::json!({"port": "5432", "tag": "0.10", "on": "yes", "cpu": "1", "n": 1, "list": [], "none": null, "nested": {"empty": {}, "keep": ["a"]}});
        let text = to_string(&value).unwrap();
        assert_eq!(parse(&text).unwrap().to_json(), value, "{text}");
        let pruned = to_string_pruned(&value).unwrap();
        let back = parse(&pruned).unwrap().to_json();
        assert_eq!(
            back,
            serde_json::json!({"port": "5432", "tag": "0.10", "on": "yes", "cpu": "1", "n": 1, "nested": {"keep": ["a"]}}),
            "{pruned}"
        );
    }

    #[test]
    fn bad_yaml_says_where() {
        let e = parse("a: 1\na: 2\n").unwrap_err();
        assert_eq!(e.pos, Some(Pos { line: 2, column: 1 }), "{e}");
        assert!(e.message.contains("duplicate"), "{e}");
        let e = parse("a: [1,\n").unwrap_err();
        assert_eq!(e.pos.map(|p| p.line), Some(1), "{e}");
        let e = parse("a:\n  b: 1\n c: 2\n").unwrap_err();
        assert!(e.pos.is_some(), "{e}");
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert!(parse(&deep).is_err());
        let fine = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(parse(&fine).is_ok());
    }
}
