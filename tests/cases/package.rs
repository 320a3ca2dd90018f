//! What the host agent and the package see: `check --format json`, `--version` naming the
//! git commit, and the man page and shell completions that build.rs makes (from OUT_DIR,
//! as scripts/package ships them). The package itself is checked by scripts/check-package.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::util::process;
use crate::util::relay::BIN;
use crate::util::ControlFile;

/// Five errors of five kinds: (line, column, code) of each, in file order.
const FIVE_ERRORS: &str = r#"[relay]
connect_timeout = "soon"
colour = "blue"

[[map]]
port = 31001
to = "127.0.0.1:22"

[[map]]
port = 31001
to = "127.0.0.1:22"
allow = ["10.0.0.0/33"]

[[map]]
port = "31100-31109"
to = "127.0.0.1:65530"
"#;
const FIVE_EXPECTED: [(u64, u64, &str); 5] = [
    (2, 19, "bad_duration"),
    (3, 1, "unknown_key"),
    (10, 8, "duplicate_port"),
    (12, 10, "bad_cidr"),
    (16, 6, "upstream_port_overflow"),
];

/// `portrelay ARGS…`: (exit code, stdout, stderr).
fn portrelay(args: &[&str]) -> (Option<i32>, String, String) {
    let out = process::run(Command::new(BIN).args(args), Duration::from_secs(20));
    (out.status.code(), out.stdout, out.stderr)
}

/// `check --format json` on `file`: exit code, each stdout line parsed, stderr.
fn check_json(file: &Path) -> (Option<i32>, Vec<Value>, String) {
    let path = file.to_str().unwrap();
    let (code, stdout, stderr) = portrelay(&["check", "--config", path, "--format", "json"]);
    let objects = stdout
        .lines()
        .map(|line| {
            serde_json::from_str::<Value>(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}\nstdout:\n{stdout}"))
        })
        .collect();
    (code, objects, stderr)
}

#[test]
fn check_json_gives_one_object_per_error() {
    let file = ControlFile::new(FIVE_ERRORS);
    let path = file.path().display().to_string();
    let (code, objects, stderr) = check_json(file.path());
    assert_eq!(code, Some(1), "exit code; stderr:\n{stderr}");
    assert_eq!(stderr, "", "JSON mode prints nothing on stderr");
    let got: Vec<(u64, u64, &str)> = objects
        .iter()
        .map(|o| {
            assert_eq!(o["kind"], "error", "{o}");
            assert_eq!(o["file"], path.as_str(), "{o}");
            (
                o["line"].as_u64().unwrap(),
                o["column"].as_u64().unwrap(),
                o["code"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, FIVE_EXPECTED, "objects:\n{objects:#?}");

    // The messages are those of the text format, which shows them as FILE:LINE:COL: message.
    let (_, text) = file.check();
    let from_json: Vec<String> = objects
        .iter()
        .map(|o| {
            format!(
                "{path}:{}:{}: {}",
                o["line"],
                o["column"],
                o["message"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(text.trim_end(), from_json.join("\n"));
}

#[test]
fn check_json_file_level_errors() {
    let empty = ControlFile::new(" \n\n");
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let syntax = ControlFile::new("[relay]\nbind = [\"::\"\n");
    for (path, want) in [
        (empty.path(), (1, 1, "empty_file")),
        (missing.as_path(), (1, 1, "unreadable_file")),
        (syntax.path(), (2, 13, "syntax")),
    ] {
        let (code, objects, stderr) = check_json(path);
        assert_eq!(code, Some(1), "{path:?}: stderr:\n{stderr}");
        let [o] = &objects[..] else {
            panic!("{path:?}: one object, got {objects:#?}");
        };
        let got = (o["line"].as_u64().unwrap(), o["column"].as_u64().unwrap());
        assert_eq!((got.0, got.1, o["code"].as_str().unwrap()), want, "{o}");
    }
}

#[test]
fn check_json_summary_of_a_valid_file() {
    let file = ControlFile::new(
        "[relay]\nbind = [\"127.0.0.1\"]\n\n[[map]]\nport = 31001\nto = \"127.0.0.1:22\"\n\n[[map]]\nport = \"40000-40009\"\nto = \"127.0.0.1:8000\"\n",
    );
    let (code, objects, stderr) = check_json(file.path());
    assert_eq!(code, Some(0), "stderr:\n{stderr}");
    let [summary] = &objects[..] else {
        panic!("one summary object, got {objects:#?}");
    };
    assert_eq!(summary["kind"], "summary");
    assert_eq!(summary["file"], file.path().to_str().unwrap());
    assert_eq!(summary["mappings"], 2);
    assert_eq!(summary["ports"], 11);
    assert_eq!(summary["tls"], 0);
    assert_eq!(summary["ws"], 0);
}

/// `git ARGS…` in the source tree, when git and the repository are there.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[test]
fn version_names_the_git_commit() {
    let (code, stdout, _) = portrelay(&["--version"]);
    assert_eq!(code, Some(0));
    let version = stdout.trim();
    let prefix = format!("portrelay {} (git ", env!("CARGO_PKG_VERSION"));
    assert!(version.starts_with(&prefix), "{version:?}");
    let Some(head) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        eprintln!("no git repository here: only the form of {version:?} is checked");
        return;
    };
    let clean = format!("{prefix}{head})");
    let dirty = format!("{prefix}{head}, dirty)");
    assert!(
        version == clean || version == dirty,
        "{version:?} should name HEAD {head}"
    );
    // A change to the sources always reaches the binary's version; the rest of the tree
    // (the README…) only when something else makes cargo run build.rs again.
    if git(&["status", "--porcelain"]).is_some_and(|s| s.is_empty()) {
        assert_eq!(version, clean);
    }
    if git(&["status", "--porcelain", "--", "src"]).is_some_and(|s| !s.is_empty()) {
        assert_eq!(version, dirty);
    }
}

/// A file that build.rs wrote into OUT_DIR.
fn built(name: &str) -> String {
    let path = Path::new(env!("OUT_DIR")).join(name);
    assert!(path.is_file(), "build.rs made no {path:?}");
    path.display().to_string()
}

#[test]
fn man_page_renders_with_commands_keys_and_signals() {
    let page = built("portrelay.1");
    let out = process::run(
        Command::new("man")
            .args(["--warnings", "-l", &page])
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100"),
        Duration::from_secs(20),
    );
    assert!(out.status.success(), "man -l failed: {}", out.stderr);
    assert_eq!(out.stderr, "", "man --warnings");
    // Justified text: words may be more than one space apart.
    let text = out.stdout.split_whitespace().collect::<Vec<_>>().join(" ");
    for want in [
        "portrelay run [--config FILE] [--io-backend auto|uring|epoll] [--threads N]",
        "portrelay check [--config FILE] [--format text|json]",
        "portrelay sessions [--admin-socket PATH] [--map NAME] [--json]",
        "portrelay kill [--admin-socket PATH] [ID...] [--map NAME] [--client ADDR[/PREFIX]]",
        "/run/portrelay/admin.sock",
        "CONTROL FILE",
        "max_pending_admissions = 1024",
        "removed_mapping",
        "SIGNALS SIGHUP Reload the control file.",
        "SIGTERM, SIGINT Stop accepting,",
        "duplicate_port",
        "EXIT STATUS",
    ] {
        assert!(text.contains(want), "the man page lacks {want:?}:\n{text}");
    }
}

#[test]
fn bash_completion_loads_and_completes() {
    let script = built("portrelay.bash");
    let out = process::run(
        Command::new("bash").args([
            "--norc",
            "-c",
            r#"source "$1" && complete -p portrelay &&
               COMP_WORDS=(portrelay ch) COMP_CWORD=1 && _portrelay portrelay ch portrelay &&
               echo "words: ${COMPREPLY[*]}" &&
               COMP_WORDS=(portrelay check --format "") COMP_CWORD=3 && _portrelay portrelay "" --format &&
               echo "formats: ${COMPREPLY[*]}""#,
            "bash",
            &script,
        ]),
        Duration::from_secs(20),
    );
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(
        lines[0].starts_with("complete ") && lines[0].ends_with(" portrelay"),
        "{lines:?}"
    );
    assert!(lines.contains(&"words: check"), "{lines:?}");
    assert!(lines.contains(&"formats: text json"), "{lines:?}");
}

#[test]
fn zsh_completion_loads() {
    let script = built("_portrelay");
    let dir = Path::new(&script).parent().unwrap().display().to_string();
    let out = process::run(
        Command::new("zsh").args([
            "-f",
            "-c",
            r#"fpath=("$1" $fpath) && autoload -Uz compinit && compinit -u -D &&
               echo "portrelay: $_comps[portrelay]""#,
            "zsh",
            &dir,
        ]),
        Duration::from_secs(20),
    );
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    assert_eq!(out.stdout.trim(), "portrelay: _portrelay");
}
