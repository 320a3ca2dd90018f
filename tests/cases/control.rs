//! `portrelay check` and `portrelay run` on control files: every error reported as
//! `FILE:LINE:COL: message` with the right line, exit 1; a valid file passes.

use std::net::TcpListener;

use crate::util::net::LOCALHOST;
use crate::util::relay::run_check;
use crate::util::ControlFile;

/// One control file with six errors, one of each kind the contract names (besides
/// unreadable cert files). Each `# E:` marks where its error must be reported (see
/// [`expected`]).
const SIX_ERRORS: &str = r#"[relay]
bind = ["127.0.0.1"]
metrics = ""
connect_timeout = "soon"          # E:duration
colour = "blue"                   # E:unknown

[[map]]
port = 31001
to = "127.0.0.1:22"
name = "first"

[[map]]                           # E:duplicate
port = 31001
to = "127.0.0.1:22"
name = "duplicate"

[[map]]
port = "31010-31019"
to = "127.0.0.1:2200"
name = "range"

[[map]]                           # E:overlap
port = "31015-31024"
to = "127.0.0.1:2300"
name = "overlap"

[[map]]                           # E:past65535
port = "31100-31109"
to = "127.0.0.1:65530"
name = "past-65535"

[[map]]
port = 31200
to = "127.0.0.1:22"
name = "bad-cidr"
allow = ["10.0.0.0/33"]           # E:cidr
"#;

/// Where an error may be reported: a single line, or any line of one `[[map]]` entry (for
/// errors about a whole entry, which may point at its `port` or its `to`).
#[derive(Debug)]
struct Expected {
    kind: String,
    lines: std::ops::RangeInclusive<usize>,
}

/// The expected errors of `text`, in file order, from its `# E:kind` markers: on a
/// `[[map]]` line the marker covers that entry up to the next blank line.
fn expected(text: &str) -> Vec<Expected> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some((_, kind)) = line.split_once("# E:") else {
            continue;
        };
        let kind = kind.trim().to_string();
        let first = i + 1;
        let last = if line.starts_with("[[map]]") {
            (i..lines.len())
                .find(|&j| lines[j].trim().is_empty())
                .unwrap_or(lines.len())
        } else {
            first
        };
        out.push(Expected {
            kind,
            lines: first..=last,
        });
    }
    out
}

/// An error line `FILE:LINE:COL: message`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ErrorLine {
    line: usize,
    col: usize,
    message: String,
}

/// The `FILE:LINE:COL: message` lines of `stderr` for `file`.
fn error_lines(stderr: &str, file: &str) -> Vec<ErrorLine> {
    stderr
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(file)?.strip_prefix(':')?;
            let (line, rest) = rest.split_once(':')?;
            let (col, message) = rest.split_once(':')?;
            Some(ErrorLine {
                line: line.parse().ok()?,
                col: col.parse().ok()?,
                message: message.strip_prefix(' ')?.to_string(),
            })
        })
        .collect()
}

/// Checks that `errors` are exactly the `expected` ones: one per expected place, in file
/// order, each with a column and a message.
fn assert_errors_match(errors: &[ErrorLine], expected: &[Expected], stderr: &str) {
    assert_eq!(
        errors.len(),
        expected.len(),
        "wanted {} errors ({:?}), got:\n{stderr}",
        expected.len(),
        expected.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>()
    );
    for (error, want) in errors.iter().zip(expected) {
        assert!(
            want.lines.contains(&error.line),
            "the {} error should be on line(s) {:?}, got {error:?}; stderr:\n{stderr}",
            want.kind,
            want.lines
        );
        assert!(error.col >= 1, "column of {error:?}");
        assert!(!error.message.trim().is_empty(), "message of {error:?}");
    }
}

#[test]
fn check_reports_every_error_with_its_line() {
    let file = ControlFile::new(SIX_ERRORS);
    let path = file.path().display().to_string();
    let want = expected(SIX_ERRORS);
    assert_eq!(want.len(), 6, "the test file marks six errors");

    let (status, stderr) = file.check();
    assert_eq!(
        status.code(),
        Some(1),
        "check exit status; stderr:\n{stderr}"
    );
    let errors = error_lines(&stderr, &path);
    assert_errors_match(&errors, &want, &stderr);
    let unknown = &errors[want.iter().position(|e| e.kind == "unknown").unwrap()];
    assert!(
        unknown.message.contains("colour"),
        "the unknown-key error names the key: {unknown:?}"
    );

    // `run` refuses the same file with the same lines, before opening anything.
    let (status, run_stderr) = file.run_expecting_exit(&["--io-backend", "epoll"]);
    assert_eq!(
        status.code(),
        Some(1),
        "run exit status; stderr:\n{run_stderr}"
    );
    let run_errors = error_lines(&run_stderr, &path);
    assert_eq!(
        run_errors, errors,
        "run's errors vs check's; run stderr:\n{run_stderr}"
    );
}

/// Each kind of error alone in an otherwise valid file: exactly one error, on its line.
#[test]
fn check_reports_each_error_alone() {
    const VALID_MAP: &str = r#"[[map]]
port = 31500
to = "127.0.0.1:22"
name = "ok"
"#;
    let cases = [
        (
            "unknown",
            format!("[relay]\nbind = [\"127.0.0.1\"]\ncolour = \"blue\"   # E:unknown\n\n{VALID_MAP}"),
        ),
        (
            "duration",
            format!("[relay]\nidle_timeout = \"5 fortnights\"   # E:duration\n\n{VALID_MAP}"),
        ),
        (
            "duplicate",
            format!("{VALID_MAP}\n[[map]]   # E:duplicate\nport = 31500\nto = \"127.0.0.1:23\"\n"),
        ),
        (
            "overlap",
            format!("{VALID_MAP}\n[[map]]   # E:overlap\nport = \"31490-31510\"\nto = \"127.0.0.1:2000\"\n"),
        ),
        (
            "past65535",
            format!("{VALID_MAP}\n[[map]]   # E:past65535\nport = \"31600-31610\"\nto = \"127.0.0.1:65530\"\n"),
        ),
        (
            "cidr",
            VALID_MAP.to_string() + "allow = [\"127.0.0.1/32\", \"300.0.0.0/8\"]   # E:cidr\n",
        ),
    ];
    for (kind, text) in cases {
        let want = expected(&text);
        assert_eq!(want.len(), 1, "{kind}: one marker");
        let file = ControlFile::new(&text);
        let (status, stderr) = file.check();
        assert_eq!(
            status.code(),
            Some(1),
            "{kind}: check exit status; file:\n{text}\nstderr:\n{stderr}"
        );
        let errors = error_lines(&stderr, &file.path().display().to_string());
        assert_errors_match(&errors, &want, &stderr);
    }
}

/// The contract's example control file (without `[[tls]]`, whose cert files must exist)
/// is valid; `check` does not touch the network, so a mapped port in use does not matter.
#[test]
fn check_accepts_valid_file() {
    let busy = TcpListener::bind((LOCALHOST, 0)).unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    let text = format!(
        r#"[relay]
bind = ["0.0.0.0", "::"]
trusted_proxies = []
metrics = "127.0.0.1:9477"
connect_timeout = "5s"
proxy_header_timeout = "3s"
idle_timeout = "0s"
tcp_keepalive = "60s"
shutdown_grace = "10s"
max_connections = 100000
removed_mapping = "close"
watch = true

[[map]]
port = {busy_port}
to = "172.17.0.5:22"
name = "C.123456"
allow = ["0.0.0.0/0", "::/0"]
max_connections = 64

[[map]]
port = "40000-40009"
to = "[fd00::5]:8000"
name = "C.654321"
allow = ["10.0.0.0/8"]
"#
    );
    let (status, stderr) = run_check(&text);
    assert_eq!(
        status.code(),
        Some(0),
        "check of a valid file; stderr:\n{stderr}"
    );

    let (status, stderr) = run_check("[relay]\n");
    assert_eq!(
        status.code(),
        Some(0),
        "a file with only [relay] is valid (every key has a default); stderr:\n{stderr}"
    );

    // A zero-byte or blank file is what a failed write leaves: an error, never "no mappings".
    for blank in ["", " \n\t\n"] {
        let (status, stderr) = run_check(blank);
        assert_eq!(
            status.code(),
            Some(1),
            "check of {blank:?}; stderr:\n{stderr}"
        );
        assert!(
            stderr.contains(":1:1: control file is empty"),
            "check of {blank:?}; stderr:\n{stderr}"
        );
    }
}
