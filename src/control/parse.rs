//! Placeholder; filled in by the control-file work.
use super::{Config, ConfigErrors};
use std::path::Path;

pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        file: path.display().to_string(),
        errors: vec![super::ConfigError {
            line: 1,
            col: 1,
            message: format!("cannot read: {e}"),
        }],
    })?;
    parse_str(&path.display().to_string(), &text)
}

pub fn parse_str(_file: &str, _text: &str) -> Result<Config, ConfigErrors> {
    unimplemented!()
}
