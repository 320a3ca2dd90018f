//! A TOML document as a tree that keeps the byte span of every key and value, and a
//! byte-offset → line:column index.
//!
//! The tree is read with `toml::de::DeTable::parse` (toml 0.9), which gives every key and
//! value with its span through the public `Spanned` API. It checks the syntax, the
//! structure (duplicate keys, tables defined twice) and datetimes, but keeps integers and
//! floats as text: turning them into numbers, and rejecting those that do not fit, is done
//! here.

use std::borrow::Cow;
use std::ops::Range;

use toml::de::{DeArray, DeFloat, DeInteger, DeTable, DeValue};
use toml::Spanned;

/// A key of a table, with its span in the text when the parser knows it.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Key {
    pub name: String,
    pub span: Option<Range<usize>>,
}

/// A table's entries, in file order (the order of the first appearance of each key).
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

/// Why a text is not a TOML document: the first problem, at a byte offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SyntaxError {
    pub offset: usize,
    /// One line, as the parser words it.
    pub message: String,
}

/// Parses `text` into its root table; a TOML syntax error is the only error there can be.
pub(super) fn parse(text: &str) -> Result<Table, SyntaxError> {
    let root = DeTable::parse(text).map_err(|e| SyntaxError {
        offset: e.span().map_or(0, |s| s.start),
        message: e.message().trim().replace('\n', "; "),
    })?;
    Tree { text }.table(root.into_inner())
}

/// Turns the parser's tree into ours; `text` is the document, for telling implicit tables.
struct Tree<'t> {
    text: &'t str,
}

impl Tree<'_> {
    fn table(&self, table: DeTable<'_>) -> Result<Table, SyntaxError> {
        let mut entries = Vec::with_capacity(table.len());
        for (key, value) in table {
            let key = Key {
                span: Some(key.span()),
                name: key.into_inner().into_owned(),
            };
            entries.push((key, self.item(value)?));
        }
        // The parser's map is sorted by name; keys come in the file's order by their spans.
        entries.sort_unstable_by_key(|(key, _)| key.start(0));
        Ok(entries)
    }

    fn array(&self, array: DeArray<'_>) -> Result<Vec<Item>, SyntaxError> {
        array.into_iter().map(|item| self.item(item)).collect()
    }

    fn item(&self, item: Spanned<DeValue<'_>>) -> Result<Item, SyntaxError> {
        let span = item.span();
        let value = match item.into_inner() {
            DeValue::String(s) => Value::String(Cow::into_owned(s)),
            DeValue::Integer(n) => Value::Integer(integer(&n, span.start)?),
            DeValue::Float(f) => Value::Float(float(&f, span.start)?),
            DeValue::Boolean(b) => Value::Boolean(b),
            DeValue::Datetime(d) => Value::Datetime(d.to_string()),
            DeValue::Array(a) => Value::Array(self.array(a)?),
            DeValue::Table(t) => {
                // A table written out starts with its `[header]`, `[[header]]` or `{`; one
                // made implicitly by a dotted key or header (`a` of `a.b = 1` or `[a.b]`)
                // has no text of its own, and no span here.
                let written = self
                    .text
                    .get(span.clone())
                    .is_some_and(|s| s.starts_with(['[', '{']));
                return Ok(Item {
                    span: written.then_some(span),
                    value: Value::Table(self.table(t)?),
                });
            }
        };
        Ok(Item {
            span: Some(span),
            value,
        })
    }
}

/// The value of an integer the parser kept as text (sign and digits, in its radix).
fn integer(n: &DeInteger<'_>, offset: usize) -> Result<i64, SyntaxError> {
    i64::from_str_radix(n.as_str(), n.radix()).map_err(|e| {
        use std::num::IntErrorKind::{NegOverflow, PosOverflow};
        let message = match e.kind() {
            PosOverflow | NegOverflow => format!(
                "integer `{n}` is out of range ({} to {})",
                i64::MIN,
                i64::MAX
            ),
            _ => format!("invalid integer `{n}`"),
        };
        SyntaxError { offset, message }
    })
}

/// The value of a float the parser kept as text; one too large for an `f64` is an error
/// (`inf` is written as such; `nan` is a float too).
fn float(f: &DeFloat<'_>, offset: usize) -> Result<f64, SyntaxError> {
    match f.as_str().parse::<f64>() {
        Ok(x) if !x.is_infinite() || f.as_str().contains("inf") => Ok(x),
        Ok(_) => Err(SyntaxError {
            offset,
            message: format!("float `{f}` is out of range"),
        }),
        Err(_) => Err(SyntaxError {
            offset,
            message: format!("invalid float `{f}`"),
        }),
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
    fn numbers_and_their_errors() {
        let text = "a = +1_000\nb = 0x7f\nc = -9223372036854775808\nd = 1.5e3\ne = -inf\nf = nan\n";
        let root = parse(text).unwrap();
        let values: Vec<&Value> = root.iter().map(|(_, item)| &item.value).collect();
        assert_eq!(
            values[..4],
            [
                &Value::Integer(1000),
                &Value::Integer(127),
                &Value::Integer(i64::MIN),
                &Value::Float(1500.0)
            ]
        );
        assert_eq!(*values[4], Value::Float(f64::NEG_INFINITY));
        assert!(matches!(values[5], Value::Float(x) if x.is_nan()));
        assert_eq!(root[1].1.span, Some(15..19));

        let overflow = parse("a = 1\nb = 9223372036854775808\n").unwrap_err();
        assert_eq!(overflow.offset, 10);
        assert_eq!(
            overflow.message,
            "integer `9223372036854775808` is out of range (-9223372036854775808 to 9223372036854775807)"
        );
        let empty = parse("[t]\nb = [0x]\n").unwrap_err();
        assert_eq!(
            (empty.offset, empty.message.as_str()),
            (9, "invalid integer `0x`")
        );
        let huge = parse("b = 1e400\n").unwrap_err();
        assert_eq!(
            (huge.offset, huge.message.as_str()),
            (4, "float `1e400` is out of range")
        );
    }

    #[test]
    fn syntax_error_offsets() {
        // Where toml points: the wording is toml's own.
        for (text, offset) in [
            ("[relay]\nbind = [\"::\"\nwatch = true\n", 21),
            ("[relay]\nwatch = true\nwatch = false\n", 21),
            ("[[map]]\n[map]\n", 9),
            ("a = \"x\nb = 1\n", 6),
            ("a = 1979-13-01\n", 4),
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!(e.offset, offset, "{text:?}: {e:?}");
            assert!(!e.message.is_empty() && !e.message.contains('\n'), "{e:?}");
        }
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
