//! Loading a control file: text → spanned tree → validated [`Config`], with every problem
//! located at its line and column.

use std::path::Path;

use super::spanned::{self, LineIndex};
use super::validate::{self, Dns, Problem};
use super::{code, Config, ConfigError, ConfigErrors};

/// Reads and validates the control file at `path`. Relative `cert`/`key` paths of
/// `[[tls]]` are taken relative to the file's directory. Messages name the file as given.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        file: file.clone(),
        errors: vec![ConfigError {
            line: 1,
            col: 1,
            code: code::UNREADABLE_FILE,
            message: format!("cannot read the control file: {e}"),
        }],
    })?;
    parse_str(&file, &text)
}

/// Validates the text of a control file named `file` (used in messages, and as the base of
/// relative `cert`/`key` paths). Every problem is reported, in file order; a TOML syntax
/// error is reported alone. No I/O but DNS look-ups of host-name upstreams and the check
/// that `[[tls]]` cert/key files are readable.
pub fn parse_str(file: &str, text: &str) -> Result<Config, ConfigErrors> {
    parse_str_with(file, text, Dns::Resolve)
}

/// [`parse_str`] choosing whether host-name upstreams are looked up in DNS.
pub fn parse_str_with(file: &str, text: &str, dns: Dns) -> Result<Config, ConfigErrors> {
    if text.trim().is_empty() {
        // What a host agent leaves behind when a write fails or the disk fills: never
        // "no mappings" (which would close every port). Only `[relay]` alone means that.
        return Err(ConfigErrors {
            file: file.to_owned(),
            errors: vec![ConfigError {
                line: 1,
                col: 1,
                code: code::EMPTY_FILE,
                message: "control file is empty".into(),
            }],
        });
    }
    let lines = LineIndex::new(text);
    let fail = |mut problems: Vec<Problem>| {
        // Stable: problems at one offset keep the order in which they were found.
        problems.sort_by_key(|p| p.offset);
        ConfigErrors {
            file: file.to_owned(),
            errors: problems
                .into_iter()
                .map(|p| {
                    let (line, col) = lines.line_col(p.offset);
                    ConfigError {
                        line,
                        col,
                        code: p.code,
                        message: p.message,
                    }
                })
                .collect(),
        }
    };
    let root = spanned::parse(text).map_err(|e| {
        fail(vec![Problem {
            offset: e.offset,
            code: code::SYNTAX,
            message: format!("TOML syntax error: {}", e.message),
        }])
    })?;
    let base_dir = Path::new(file).parent().unwrap_or(Path::new(""));
    validate::validate(&root, text, &lines, base_dir, dns).map_err(fail)
}
