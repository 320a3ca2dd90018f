//! A TOML document as a tree that keeps the byte span of every key and value, and a
//! byte-offset → line:column index.
//!
//! `toml` 0.8 hands out spans only through `toml::Spanned<T>`, which fails on a table that
//! has no span of its own (the implicit `a` of a dotted key `a.b = 1` or of a header
//! `[a.b]`) and on datetimes. So this tree speaks the serde protocol of `Spanned` itself
//! (the names below, from serde_spanned 0.6 / toml_datetime 0.6, which toml 0.8 uses) and
//! takes values with or without a span. The unit tests below catch a change of protocol.

use std::fmt;
use std::ops::Range;

use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// serde_spanned: a deserializer that sees a struct of this name and these fields hands
/// out the span of the value as a map `{start, end, value}`.
const SPANNED_NAME: &str = "$__serde_spanned_private_Spanned";
const SPANNED_START: &str = "$__serde_spanned_private_start";
const SPANNED_END: &str = "$__serde_spanned_private_end";
const SPANNED_VALUE: &str = "$__serde_spanned_private_value";
const SPANNED_FIELDS: &[&str] = &[SPANNED_START, SPANNED_END, SPANNED_VALUE];
/// toml_datetime: a datetime is given as a map with this single key and the text as value.
const DATETIME_FIELD: &str = "$__toml_private_datetime";

/// A key of a table, with its span in the text when the parser knows it.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Key {
    pub name: String,
    pub span: Option<Range<usize>>,
}

/// A table's entries, in the order the parser gives them (the file's, for the most part;
/// problems are sorted by offset afterwards anyway).
pub(super) type Table = Vec<(Key, Item)>;

#[derive(Clone, Debug, PartialEq)]
pub(super) enum Value {
    String(String),
    Integer(i64),
    Float(f64),
    Boolean(bool),
    Datetime(String),
    Array(Vec<Item>),
    Table(Table),
}

/// A value with its span in the text (`None` for implicit tables).
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Item {
    pub span: Option<Range<usize>>,
    pub value: Value,
}

impl Item {
    /// Byte offset of the value, or `fallback` when it has no span.
    pub fn start(&self, fallback: usize) -> usize {
        self.span.as_ref().map_or(fallback, |s| s.start)
    }
}

impl Key {
    /// Byte offset of the key, or `fallback` when it has no span.
    pub fn start(&self, fallback: usize) -> usize {
        self.span.as_ref().map_or(fallback, |s| s.start)
    }
}

/// Parses `text` into its root table; a TOML syntax error is the only error there can be.
pub(super) fn parse(text: &str) -> Result<Table, toml::de::Error> {
    let root: Item = toml::from_str(text)?;
    Ok(match root.value {
        Value::Table(t) => t,
        _ => Vec::new(),
    })
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_struct(SPANNED_NAME, SPANNED_FIELDS, KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a table key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
        Ok(Key {
            name: v.to_owned(),
            span: None,
        })
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Key, E> {
        Ok(Key {
            name: v,
            span: None,
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Key, A::Error> {
        let (mut start, mut end, mut name) = (None, None, None);
        while let Some(field) = map.next_key::<SpannedField>()? {
            match field {
                SpannedField::Start => start = Some(map.next_value::<usize>()?),
                SpannedField::End => end = Some(map.next_value::<usize>()?),
                SpannedField::Value => name = Some(map.next_value::<String>()?),
                SpannedField::Other => return Err(de::Error::custom("unexpected key span field")),
            }
        }
        let name = name.ok_or_else(|| de::Error::missing_field(SPANNED_VALUE))?;
        let span = match (start, end) {
            (Some(s), Some(e)) => Some(s..e),
            _ => None,
        };
        Ok(Key { name, span })
    }
}

/// One field of the span protocol, read without allocating.
enum SpannedField {
    Start,
    End,
    Value,
    Other,
}

impl<'de> Deserialize<'de> for SpannedField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct FieldVisitor;
        impl Visitor<'_> for FieldVisitor {
            type Value = SpannedField;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a span field")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SpannedField, E> {
                Ok(match v {
                    SPANNED_START => SpannedField::Start,
                    SPANNED_END => SpannedField::End,
                    SPANNED_VALUE => SpannedField::Value,
                    _ => SpannedField::Other,
                })
            }
        }
        d.deserialize_str(FieldVisitor)
    }
}

impl<'de> Deserialize<'de> for Item {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_struct(SPANNED_NAME, SPANNED_FIELDS, ItemVisitor)
    }
}

/// The value inside a span: deserialized as whatever it is.
struct AnyValue;

impl<'de> DeserializeSeed<'de> for AnyValue {
    type Value = Item;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Item, D::Error> {
        d.deserialize_any(ItemVisitor)
    }
}

struct ItemVisitor;

fn bare(value: Value) -> Item {
    Item { span: None, value }
}

impl<'de> Visitor<'de> for ItemVisitor {
    type Value = Item;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a TOML value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Item, E> {
        Ok(bare(Value::Boolean(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Item, E> {
        Ok(bare(Value::Integer(v)))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Item, E> {
        Ok(bare(Value::Integer(i64::try_from(v).unwrap_or(i64::MAX))))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Item, E> {
        Ok(bare(Value::Float(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Item, E> {
        Ok(bare(Value::String(v.to_owned())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Item, E> {
        Ok(bare(Value::String(v)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Item, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(item) = seq.next_element::<Item>()? {
            items.push(item);
        }
        Ok(bare(Value::Array(items)))
    }

    /// A table, a spanned value (`{start, end, value}`) or a datetime: told apart by the
    /// first key, which only in a real table carries a span of its own.
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Item, A::Error> {
        let Some(first) = map.next_key::<Key>()? else {
            return Ok(bare(Value::Table(Vec::new())));
        };
        if first.span.is_none() {
            if first.name == SPANNED_START {
                let start: usize = map.next_value()?;
                let (mut end, mut inner) = (None, None);
                while let Some(field) = map.next_key::<SpannedField>()? {
                    match field {
                        SpannedField::End => end = Some(map.next_value::<usize>()?),
                        SpannedField::Value => inner = Some(map.next_value_seed(AnyValue)?),
                        SpannedField::Start | SpannedField::Other => {
                            return Err(de::Error::custom("unexpected value span field"))
                        }
                    }
                }
                let inner: Item = inner.ok_or_else(|| de::Error::missing_field(SPANNED_VALUE))?;
                let end = end.ok_or_else(|| de::Error::missing_field(SPANNED_END))?;
                return Ok(Item {
                    span: Some(start..end),
                    value: inner.value,
                });
            }
            if first.name == DATETIME_FIELD {
                let text: String = map.next_value()?;
                return Ok(bare(Value::Datetime(text)));
            }
        }
        let mut table = Vec::with_capacity(map.size_hint().unwrap_or(0) + 1);
        let value = map.next_value::<Item>()?;
        table.push((first, value));
        while let Some(key) = map.next_key::<Key>()? {
            let value = map.next_value::<Item>()?;
            table.push((key, value));
        }
        Ok(bare(Value::Table(table)))
    }
}

/// Byte offsets → 1-based line and column (in characters).
pub(super) struct LineIndex<'a> {
    text: &'a str,
    /// Byte offset at which each line starts.
    starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    pub fn new(text: &'a str) -> Self {
        let mut starts = vec![0];
        starts.extend(
            text.bytes()
                .enumerate()
                .filter(|&(_, b)| b == b'\n')
                .map(|(i, _)| i + 1),
        );
        LineIndex { text, starts }
    }

    /// 1-based line of `offset`.
    pub fn line(&self, offset: usize) -> usize {
        self.starts
            .partition_point(|&s| s <= offset.min(self.text.len()))
    }

    /// 1-based line and column of `offset`; the column counts characters.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let line = self.line(offset);
        let start = self.starts[line - 1];
        (line, self.text[start..offset].chars().count() + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str, span: Range<usize>) -> Key {
        Key {
            name: name.into(),
            span: Some(span),
        }
    }

    #[test]
    fn keeps_spans_of_keys_values_and_tables() {
        let text = "[relay]\nbind = [\"::\"]\n[[map]]\nport = 1\n";
        let root = parse(text).unwrap();
        assert_eq!(root.len(), 2);
        let (relay_key, relay) = &root[0];
        assert_eq!(*relay_key, key("relay", 1..6));
        assert_eq!(relay.span.as_ref().unwrap().start, 0);
        let Value::Table(relay) = &relay.value else {
            panic!("relay: {relay:?}")
        };
        assert_eq!(relay[0].0, key("bind", 8..12));
        let Value::Array(bind) = &relay[0].1.value else {
            panic!()
        };
        assert_eq!(bind[0].span, Some(16..20));
        assert_eq!(bind[0].value, Value::String("::".into()));
        let (_, map) = &root[1];
        let Value::Array(entries) = &map.value else {
            panic!()
        };
        // An entry of an array of tables starts at its `[[` header.
        assert_eq!(entries[0].span.as_ref().unwrap().start, 22);
    }

    #[test]
    fn takes_implicit_tables_and_datetimes() {
        let text = "a.b = 1\n[c.d]\ne = 1979-05-27T07:32:00Z\n";
        let root = parse(text).unwrap();
        let (a, a_item) = &root[0];
        assert_eq!(*a, key("a", 0..1));
        assert_eq!(a_item.span, None);
        let Value::Table(a_table) = &a_item.value else {
            panic!()
        };
        assert_eq!(a_table[0].0, key("b", 2..3));
        assert_eq!(a_table[0].1.span, Some(6..7));
        let Value::Table(c) = &root[1].1.value else {
            panic!()
        };
        let Value::Table(d) = &c[0].1.value else {
            panic!()
        };
        assert_eq!(d[0].1.value, Value::Datetime("1979-05-27T07:32:00Z".into()));
        assert_eq!(d[0].1.span, Some(18..38));
    }

    #[test]
    fn line_col_counts_characters() {
        let text = "ab\né = 1\r\n\nx";
        let idx = LineIndex::new(text);
        assert_eq!(idx.line_col(0), (1, 1));
        assert_eq!(idx.line_col(3), (2, 1));
        assert_eq!(idx.line_col(6), (2, 3)); // after "é " (é is 2 bytes)
        assert_eq!(idx.line_col(11), (3, 1));
        assert_eq!(idx.line_col(12), (4, 1));
        assert_eq!(idx.line_col(100), (4, 2));
        assert_eq!(idx.line(12), 4);
    }
}
