//! The token file of a `[[ws]]` listener: which token opens which mapping.
//!
//! One line per mapping, `<mapping name> <token>`, separated by spaces or tabs. Blank
//! lines and lines whose first non-blank character is `#` are ignored; a `#` later in a
//! line is part of the token. Neither the name nor the token may hold whitespace. Every
//! problem is reported, each with its line number.
//!
//! Tokens are compared with [`matches()`], in time that does not depend on where they differ,
//! and never appear in `Debug` output.

use std::collections::HashMap;
use std::fmt;

/// A secret token. Its `Debug` shows `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// Whether `given` (from the request's `Authorization` header) is this token.
    pub fn matches(&self, given: &str) -> bool {
        matches(self.0.as_bytes(), given.as_bytes())
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(***)")
    }
}

/// The parsed file: a token per mapping name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tokens {
    by_name: HashMap<String, Token>,
}

impl Tokens {
    /// The token of a mapping; `None` if the file names no such mapping.
    pub fn get(&self, name: &str) -> Option<&Token> {
        self.by_name.get(name)
    }

    /// Whether a request for mapping `name` carrying `given` may pass: the file has a
    /// token for `name` and `given` is it. A mapping the file does not name is closed.
    pub fn allows(&self, name: &str, given: Option<&str>) -> bool {
        match (self.get(name), given) {
            (Some(token), Some(given)) => token.matches(given),
            _ => false,
        }
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The mapping names, in no particular order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }
}

/// One bad line of a token file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {kind}")]
pub struct TokenLineError {
    /// Counts from 1.
    pub line: usize,
    pub kind: TokenLineErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenLineErrorKind {
    #[error("mapping {0:?} has no token, expected \"<mapping name> <token>\"")]
    MissingToken(String),
    /// More than two fields.
    #[error("mapping {0:?}: whitespace inside the token, expected \"<mapping name> <token>\"")]
    Whitespace(String),
    #[error("mapping {name:?} already has a token at line {first}")]
    Duplicate { name: String, first: usize },
}

/// Every bad line of a token file, in file order; `Display` puts one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenFileError(pub Vec<TokenLineError>);

impl fmt::Display for TokenFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for TokenFileError {}

/// Parses the text of a token file: see the module docs.
pub fn parse(text: &str) -> Result<Tokens, TokenFileError> {
    let mut by_name = HashMap::new();
    let mut first_line = HashMap::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let mut fields = line.split_whitespace();
        let Some(name) = fields.next().filter(|f| !f.starts_with('#')) else {
            continue;
        };
        let kind = match (fields.next(), fields.next()) {
            (None, _) => TokenLineErrorKind::MissingToken(name.to_string()),
            (Some(_), Some(_)) => TokenLineErrorKind::Whitespace(name.to_string()),
            (Some(token), None) => match first_line.get(name) {
                Some(&first) => TokenLineErrorKind::Duplicate {
                    name: name.to_string(),
                    first,
                },
                None => {
                    first_line.insert(name, line_no);
                    by_name.insert(name.to_string(), Token(token.to_string()));
                    continue;
                }
            },
        };
        errors.push(TokenLineError {
            line: line_no,
            kind,
        });
    }
    if errors.is_empty() {
        Ok(Tokens { by_name })
    } else {
        Err(TokenFileError(errors))
    }
}

/// Whether `given` equals `expected`, in time that depends only on `given.len()`: an
/// attacker learns no prefix of the token from how long a rejection takes.
pub fn matches(expected: &[u8], given: &[u8]) -> bool {
    let mut diff = u8::from(expected.len() != given.len());
    for (i, &g) in given.iter().enumerate() {
        // Past the end of `expected`, compare with its bytes again: the lengths already
        // differ, and the loop does the same work.
        let e = expected
            .get(i % expected.len().max(1))
            .copied()
            .unwrap_or(0);
        diff |= std::hint::black_box(e ^ g);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_file() {
        let tokens = parse(
            "# name token\n\nC.123456 abc#def\n  C.2\t\tt2  \n   # indented comment\nalice s3cret",
        )
        .unwrap();
        assert_eq!(tokens.len(), 3);
        assert!(tokens.allows("C.123456", Some("abc#def")));
        assert!(tokens.allows("C.2", Some("t2")));
        assert!(tokens.allows("alice", Some("s3cret")));
        assert!(!tokens.allows("alice", Some("s3cre")));
        assert!(!tokens.allows("alice", Some("s3cret!")));
        assert!(!tokens.allows("alice", None));
        assert!(!tokens.allows("bob", Some("s3cret")));
        let debug = format!("{tokens:?}");
        assert!(
            !debug.contains("s3cret") && debug.contains("Token(***)"),
            "{debug}"
        );
        assert!(parse("").unwrap().is_empty());
        assert!(parse("# only comments\n\n").unwrap().is_empty());
    }

    #[test]
    fn every_error_with_its_line() {
        let text = "a t1\nb\n# c\nc t 2\na t3\nd t4\nd t5\n";
        assert_eq!(
            parse(text).unwrap_err().to_string(),
            "line 2: mapping \"b\" has no token, expected \"<mapping name> <token>\"\n\
             line 4: mapping \"c\": whitespace inside the token, expected \"<mapping name> <token>\"\n\
             line 5: mapping \"a\" already has a token at line 1\n\
             line 7: mapping \"d\" already has a token at line 6"
        );
    }

    #[test]
    fn constant_time_comparison() {
        assert!(matches(b"abc", b"abc"));
        assert!(matches(b"", b""));
        for (expected, given) in [
            (&b"abc"[..], &b"abd"[..]),
            (b"abc", b"ab"),
            (b"abc", b"abcabc"),
            (b"abc", b""),
            (b"", b"a"),
            (b"a", b"\0"),
        ] {
            assert!(!matches(expected, given), "{expected:?} {given:?}");
        }
    }
}
