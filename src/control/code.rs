//! The kinds of control-file problem, by the names `check --format json` reports. A name
//! never changes meaning; new kinds may be added. Self-contained, so that build.rs can list
//! them in the man page.

/// The file cannot be read (missing, a directory, no permission, not UTF-8).
pub const UNREADABLE_FILE: &str = "unreadable_file";
/// A zero-byte or whitespace-only file.
pub const EMPTY_FILE: &str = "empty_file";
/// Not TOML (including a key given twice in one table); reported alone.
pub const SYNTAX: &str = "syntax";
/// A key the relay does not know, or one in the wrong table.
pub const UNKNOWN_KEY: &str = "unknown_key";
/// A table or array of tables other than `[relay]`, `[[map]]`, `[[tls]]`, `[[ws]]`.
pub const UNKNOWN_TABLE: &str = "unknown_table";
/// A `[[map]]`, `[[tls]]` or `[[ws]]` without a key it needs.
pub const MISSING_KEY: &str = "missing_key";
/// A value of the wrong TOML type (a number for a string, a table for an array…).
pub const WRONG_TYPE: &str = "wrong_type";
/// An empty value where one is needed (`name`, `sni_suffix`, `cert`, `key`, `wake`).
pub const EMPTY_VALUE: &str = "empty_value";
/// A string that is not one of the forms its key accepts (`removed_mapping`, `source`, a `[[ws]]`
/// `path` without `{name}`, an unknown placeholder in `wake`).
pub const BAD_VALUE: &str = "bad_value";
/// A duration string that does not parse.
pub const BAD_DURATION: &str = "bad_duration";
/// A number or duration outside what its key accepts (including durations past 10
/// years).
pub const OUT_OF_RANGE: &str = "out_of_range";
/// A host port outside 1-65535, or a malformed port range.
pub const BAD_PORT: &str = "bad_port";
/// A port mapped twice (or a `[[tls]]` listen port that a mapping opens too).
pub const DUPLICATE_PORT: &str = "duplicate_port";
/// A port range that overlaps another mapping's ports.
pub const OVERLAPPING_PORTS: &str = "overlapping_ports";
/// A range whose upstream ports would pass 65535.
pub const UPSTREAM_PORT_OVERFLOW: &str = "upstream_port_overflow";
/// A malformed `to`.
pub const BAD_UPSTREAM: &str = "bad_upstream";
/// A host-name `to` whose name does not resolve.
pub const UNRESOLVABLE_UPSTREAM: &str = "unresolvable_upstream";
/// A malformed IP address or `IP:PORT` (`bind`, `metrics`, `listen`).
pub const BAD_ADDRESS: &str = "bad_address";
/// An address given twice (`bind`, the `listen` of `[[tls]]` and `[[ws]]`).
pub const DUPLICATE_ADDRESS: &str = "duplicate_address";
/// A malformed CIDR (`allow`, `trusted_proxies`).
pub const BAD_CIDR: &str = "bad_cidr";
/// A file the control file names (`cert`, `key`, `tokens`) that cannot be read.
pub const UNREADABLE_PATH: &str = "unreadable_path";
/// A `[[ws]]` tokens file with a malformed line.
pub const BAD_TOKENS_FILE: &str = "bad_tokens_file";

/// Every code above.
pub const ALL: &[&str] = &[
    UNREADABLE_FILE,
    EMPTY_FILE,
    SYNTAX,
    UNKNOWN_KEY,
    UNKNOWN_TABLE,
    MISSING_KEY,
    WRONG_TYPE,
    EMPTY_VALUE,
    BAD_VALUE,
    BAD_DURATION,
    OUT_OF_RANGE,
    BAD_PORT,
    DUPLICATE_PORT,
    OVERLAPPING_PORTS,
    UPSTREAM_PORT_OVERFLOW,
    BAD_UPSTREAM,
    UNRESOLVABLE_UPSTREAM,
    BAD_ADDRESS,
    DUPLICATE_ADDRESS,
    BAD_CIDR,
    UNREADABLE_PATH,
    BAD_TOKENS_FILE,
];
