//! Build script: the git commit that `--version` names, and the man page and shell
//! completions built from the clap definitions in src/cli.rs, written to OUT_DIR as
//! `portrelay.1`, `portrelay.bash` and `_portrelay` (scripts/package ships them).

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command as Process;

use clap::{Arg, Command, CommandFactory};
use clap_complete::Shell;

#[allow(dead_code)]
#[path = "src/cli.rs"]
mod cli;
#[allow(dead_code)]
#[path = "src/control/code.rs"]
mod code;

/// The hand-written sections of the man page: the control file, signals, files, exit status.
const MAN_SECTIONS: &str = "docs/portrelay.1.roff";
/// The line of [`MAN_SECTIONS`] that the list of error codes replaces.
const CODES_LINE: &str = ".\\\" CODES (build.rs lists them here)";

fn main() {
    let root = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let version = format!("{} ({})", env!("CARGO_PKG_VERSION"), git_version(&root));
    println!("cargo:rustc-env=PORTRELAY_VERSION={version}");
    for path in ["src/cli.rs", "src/control/code.rs", MAN_SECTIONS] {
        println!("cargo:rerun-if-changed={path}");
    }

    // A build script runs once: leaking the string is how clap takes it without its "string" feature.
    let mut cmd = cli::Cli::command().version(&*version.leak());
    fs::write(out.join("portrelay.1"), man_page(&cmd, &root)).expect("write portrelay.1");
    for (shell, file) in [(Shell::Bash, "portrelay.bash"), (Shell::Zsh, "_portrelay")] {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut cmd, "portrelay", &mut script);
        fs::write(out.join(file), script).expect("write a completion script");
    }
}

/// `git 0123456789ab`, `git 0123456789ab, dirty`, or `git unknown` when this source tree
/// is not a git checkout (a tarball; or git missing). Asks cargo to run this again when
/// HEAD, the branch it names, the index or a source file changes.
fn git_version(root: &Path) -> String {
    let git = |args: &[&str]| -> Option<String> {
        let out = Process::new("git")
            .arg("-C")
            .arg(root)
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    // Only this package's own repository: not one that merely contains the tree.
    let top = git(&["rev-parse", "--show-toplevel"]).map(PathBuf::from);
    let same = |top: &Path| top.canonicalize().ok() == root.canonicalize().ok();
    let Some(commit) = top
        .filter(|t| same(t))
        .and_then(|_| git(&["rev-parse", "--short=12", "HEAD"]))
    else {
        return "git unknown".to_owned();
    };
    let mut watched = vec!["HEAD".to_owned(), "index".to_owned(), "packed-refs".into()];
    watched.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for name in watched {
        if let Some(path) = git(&["rev-parse", "--git-path", &name]) {
            let path = root.join(path);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    for path in ["src", "build.rs", "Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={path}");
    }
    match git(&["status", "--porcelain"]) {
        Some(status) if status.is_empty() => format!("git {commit}"),
        Some(_) => format!("git {commit}, dirty"),
        None => format!("git {commit}, status unknown"),
    }
}

/// portrelay(1): clap's title, name, synopsis and description; every subcommand with its
/// options; then the hand-written sections.
fn man_page(cmd: &Command, root: &Path) -> Vec<u8> {
    let man = clap_mangen::Man::new(cmd.clone()).date("");
    let mut page = Vec::new();
    man.render_title(&mut page).expect("render");
    man.render_name_section(&mut page).expect("render");
    man.render_synopsis_section(&mut page).expect("render");
    man.render_description_section(&mut page).expect("render");

    let mut text = String::from(".SH COMMANDS\n");
    for sub in cmd.get_subcommands() {
        let name = sub.get_name();
        let usage: Vec<String> = options(sub).map(|a| format!("[{}]", option(a))).collect();
        let _ = writeln!(text, ".TP\n\\fBportrelay {name}\\fR {}", usage.join(" "));
        let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
        let _ = writeln!(text, "{}\n.RS", escape(&about));
        for arg in options(sub) {
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            let default = match arg.get_default_values() {
                [default] => format!(" (default {})", default.to_string_lossy()),
                _ => String::new(),
            };
            let _ = writeln!(text, ".TP\n{}\n{}", option(arg), escape(&(help + &default)));
        }
        text.push_str(".RE\n");
    }
    page.extend_from_slice(text.as_bytes());
    let sections = fs::read_to_string(root.join(MAN_SECTIONS)).expect("read the man sections");
    assert!(
        sections.contains(CODES_LINE),
        "{MAN_SECTIONS} has no {CODES_LINE:?}"
    );
    let codes = format!(".nh\n{}\n.hy", escape(&code::ALL.join(", ")));
    let sections = sections.replace(CODES_LINE, &codes);
    page.extend_from_slice(sections.as_bytes());
    man.render_version_section(&mut page).expect("render");
    page
}

/// The options of a subcommand, without `--help`.
fn options(cmd: &Command) -> impl Iterator<Item = &Arg> {
    cmd.get_arguments().filter(|a| a.get_id() != "help")
}

/// `\fB\-\-config\fR \fIFILE\fR`, `\fB\-\-json\fR` (a flag), `\fIID\fR...` (a positional).
fn option(arg: &Arg) -> String {
    let Some(long) = arg.get_long() else {
        let name = match arg.get_value_names() {
            Some([name]) => name.to_string(),
            _ => arg.get_id().to_string().to_uppercase(),
        };
        return format!("\\fI{}\\fR...", escape(&name));
    };
    if !arg.get_action().takes_values() {
        return format!("\\fB\\-\\-{}\\fR", escape(long));
    }
    let values: Vec<String> = arg
        .get_possible_values()
        .iter()
        .map(|v| v.get_name().to_owned())
        .collect();
    let value = match arg.get_value_names() {
        _ if !values.is_empty() => values.join("|"),
        Some([name]) => name.to_string(),
        _ => arg.get_id().to_string().to_uppercase(),
    };
    format!("\\fB\\-\\-{}\\fR \\fI{}\\fR", escape(long), escape(&value))
}

/// Text for roff: backslashes and hyphens escaped, no line starting with a control character.
fn escape(text: &str) -> String {
    let text = text.replace('\\', "\\e").replace('-', "\\-");
    match text.chars().next() {
        Some('.' | '\'') => format!("\\&{text}"),
        _ => text,
    }
}
