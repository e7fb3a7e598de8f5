//! Settings written as text, and lists of them.
//!
//! A value such as an address is read from the text a person writes
//! ([`FromStr`]) and written back the same way ([`fmt::Display`]);
//! [`text_serde!`] gives such a type its serde forms. A [`List`] of them
//! reads every form a list takes in this project's configuration: a YAML
//! sequence, one value, or one string with commas or spaces between the
//! values, as an environment variable carries a list.

use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// A setting value read from its text and written back as text.
pub trait TextValue: FromStr<Err = String> + fmt::Display {
    /// What a value looks like, for the message about a value of the wrong
    /// type (`a listen address IP:PORT`).
    const EXPECTING: &'static str;
}

/// Implements [`TextValue`], `Serialize` (as the value's text) and
/// `Deserialize` (from a string, or from a number taken as its digits) for
/// types that are `FromStr<Err = String>` and `Display`:
/// `text_serde!(ListenAddr: "a listen address IP:PORT");`.
macro_rules! text_serde {
    ($($ty:ty: $expecting:literal),+ $(,)?) => {$(
        impl $crate::settings::TextValue for $ty {
            const EXPECTING: &'static str = $expecting;
        }

        impl ::serde::Serialize for $ty {
            fn serialize<S: ::serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $ty {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                $crate::settings::deserialize_text(d)
            }
        }
    )+};
}
pub(crate) use text_serde;

/// Deserializes a [`TextValue`] from a string, or from a number taken as
/// its digits (YAML and environment variables make `1234` a number).
pub fn deserialize_text<'de, D: Deserializer<'de>, T: TextValue>(d: D) -> Result<T, D::Error> {
    d.deserialize_any(TextVisitor(PhantomData))
}

struct TextVisitor<T>(PhantomData<T>);

impl<T: TextValue> Visitor<'_> for TextVisitor<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(T::EXPECTING)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        v.parse().map_err(E::custom)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        self.visit_str(&v.to_string())
    }
}

/// One or more values: a YAML sequence, a single value, or one string with
/// commas or spaces between the values (`10.0.0.0/8, ::1`). Every value
/// that cannot be read is an error naming it; an empty string is an empty
/// list. Written back as a sequence of the values' text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct List<T>(pub Vec<T>);

impl<T> Default for List<T> {
    fn default() -> Self {
        List(Vec::new())
    }
}

impl<T> From<Vec<T>> for List<T> {
    fn from(values: Vec<T>) -> Self {
        List(values)
    }
}

impl<T> List<T> {
    /// Whether the list has no values.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<T: FromStr<Err = String>> FromStr for List<T> {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.split(|c: char| c == ',' || c.is_whitespace())
            .filter(|item| !item.is_empty())
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map(List)
    }
}

/// The values' text, separated by commas (the environment form).
impl<T: fmt::Display> fmt::Display for List<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, value) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            value.fmt(f)?;
        }
        Ok(())
    }
}

impl<T: fmt::Display> Serialize for List<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct AsText<'a, T>(&'a T);
        impl<T: fmt::Display> Serialize for AsText<'_, T> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self.0)
            }
        }
        s.collect_seq(self.0.iter().map(AsText))
    }
}

impl<'de, T: TextValue> Deserialize<'de> for List<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ListVisitor(PhantomData))
    }
}

struct ListVisitor<T>(PhantomData<T>);

impl<'de, T: TextValue> Visitor<'de> for ListVisitor<T> {
    type Value = List<T>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}, or a list of them", T::EXPECTING)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<List<T>, E> {
        v.parse().map_err(E::custom)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<List<T>, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<List<T>, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<List<T>, A::Error> {
        /// One element of the sequence, read as a single value.
        struct Element<T>(T);
        impl<'de, T: TextValue> Deserialize<'de> for Element<T> {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                deserialize_text(d).map(Element)
            }
        }
        let mut values = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(Element(value)) = seq.next_element::<Element<T>>()? {
            values.push(value);
        }
        Ok(List(values))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::{CidrList, HostPort, ListenAddr};

    /// Reads `yaml` as the value of one setting.
    fn yaml<T: serde::de::DeserializeOwned>(yaml: &str) -> Result<T, String> {
        crate::yaml::from_str(yaml)
    }

    #[test]
    fn every_form_of_a_list() {
        let expected = List(vec![
            "127.0.0.1:1".parse::<ListenAddr>().unwrap(),
            "[::]:2".parse().unwrap(),
        ]);
        for form in [
            "[127.0.0.1:1, '[::]:2']",
            "127.0.0.1:1,[::]:2",
            "'127.0.0.1:1, [::]:2'",
            "127.0.0.1:1 [::]:2",
        ] {
            assert_eq!(
                yaml::<List<ListenAddr>>(form),
                Ok(expected.clone()),
                "{form}"
            );
        }
        let one: List<ListenAddr> = yaml("'127.0.0.1:1'").unwrap();
        assert_eq!(one.0, expected.0[..1]);
        let port: List<ListenAddr> = yaml("1234").unwrap();
        assert_eq!(port.to_string(), "0.0.0.0:1234");
        assert_eq!(yaml::<List<ListenAddr>>("[1234]").unwrap(), port);
        assert!(yaml::<List<ListenAddr>>("''").unwrap().is_empty());
        assert!(yaml::<List<ListenAddr>>("[]").unwrap().is_empty());
    }

    #[test]
    fn a_bad_value_is_named_in_every_form() {
        for form in ["'db:5432, db'", "[db:5432, db]", "db"] {
            let err = yaml::<List<HostPort>>(form).unwrap_err();
            assert!(err.contains("\"db\" has no port"), "{form}: {err}");
        }
        let err = yaml::<List<HostPort>>("{a: 1}").unwrap_err();
        assert!(
            err.contains("expected HOST:PORT, or a list of them"),
            "{err}"
        );
        let err = yaml::<List<HostPort>>("[[db:1]]").unwrap_err();
        assert!(err.contains("expected HOST:PORT"), "{err}");
    }

    #[test]
    fn written_back_as_text() {
        let list: CidrList = "10.0.0.0/8 ::1".parse().unwrap();
        assert_eq!(list.to_string(), "10.0.0.0/8,::1/128");
        assert_eq!(
            crate::yaml::to_string(&list).unwrap(),
            "- 10.0.0.0/8\n- \"::1/128\"\n"
        );
        let back: CidrList = yaml(&crate::yaml::to_string(&list).unwrap()).unwrap();
        assert_eq!(back, list);
    }
}
