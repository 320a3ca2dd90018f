//! The command line. Self-contained (no other module of the crate), so that build.rs can
//! build the man page and shell completions from it.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

pub const DEFAULT_CONFIG: &str = "/etc/portrelay/portrelay.toml";
/// Where `sessions` and `kill` look for the relay (what the packaged control file sets).
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/portrelay/admin.sock";

/// `--version`: the crate version and the git commit it was built from, with ", dirty"
/// when the tree had changes not in that commit (set by build.rs; "git unknown" without git).
pub const VERSION: &str = match option_env!("PORTRELAY_VERSION") {
    Some(version) => version,
    None => env!("CARGO_PKG_VERSION"),
};

/// The build tag: 16 bytes after a marker, `.`-padded, that a packager (or a test making a
/// "different" copy of a binary) may overwrite in the file without rebuilding.
#[used]
static BUILD_TAG: [u8; 39] = *b"@@portrelay-build-tag@@dev.............";

/// `--version`'s text: the version, and the build tag unless it is the default `dev`, e.g.
/// `0.3.0 (git 1a2b3c4d5e6f)` or `0.3.0 (git 1a2b3c4d5e6f) (build next)`.
pub fn version_text() -> &'static str {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| {
        // Read through an opaque reference: from the file's image at run time, never
        // folded into the code at build time.
        let tag: [u8; 39] = *std::hint::black_box(&BUILD_TAG);
        let tag = String::from_utf8_lossy(&tag[23..]);
        match tag.trim_end_matches('.') {
            "dev" => VERSION.to_string(),
            tag => format!("{VERSION} (build {tag})"),
        }
    })
}

#[derive(Parser, Debug)]
#[command(
    name = "portrelay",
    version = version_text(),
    about = "Kernel-assisted TCP relay for SSH on multi-instance hosts"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the relay on a control file.
    Run(RunArgs),
    /// Validate a control file without touching the network; exit 1 with every error.
    Check {
        /// The control file.
        #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// text: errors on stderr as FILE:LINE:COL: message. json: one JSON object a line
        /// on stdout, one per error, or a summary when the file is valid.
        #[arg(long, value_enum, default_value = "text")]
        format: CheckFormat,
    },
    /// List the running relay's live connections (through its admin socket).
    Sessions {
        /// The relay's admin socket (its control file's admin_socket).
        #[arg(long, value_name = "PATH", default_value = DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
        /// Only the connections of this mapping.
        #[arg(long, value_name = "NAME")]
        map: Option<String>,
        /// One JSON array of objects instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// End live connections of the running relay (both peers are reset; the close log line
    /// says reason killed) and print how many it ended.
    #[command(group(clap::ArgGroup::new("selector").required(true).multiple(false)))]
    Kill {
        /// The relay's admin socket (its control file's admin_socket).
        #[arg(long, value_name = "PATH", default_value = DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
        /// Connection ids, as `portrelay sessions` shows them.
        #[arg(value_name = "ID", group = "selector")]
        ids: Vec<u64>,
        /// Every connection of this mapping.
        #[arg(long, value_name = "NAME", group = "selector")]
        map: Option<String>,
        /// Every connection whose real client is in ADDR[/PREFIX].
        #[arg(long, value_name = "ADDR[/PREFIX]", group = "selector")]
        client: Option<String>,
    },
    /// Replace the running relay with a new binary without cutting a connection: the new
    /// process takes over every listener and connection (TLS sessions stay with the old
    /// one until they end); on any failure the old one goes on serving.
    Upgrade {
        /// The relay's admin socket (its control file's admin_socket).
        #[arg(long, value_name = "PATH", default_value = DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
        /// The binary to start (default: the path the running relay was started from).
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
    },
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The control file.
    #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// io backend: auto uses io_uring when the kernel and seccomp allow it.
    #[arg(long, value_enum, default_value = "auto")]
    pub io_backend: IoBackend,
    /// Event loops (default: one per core).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Log lines (on stderr) as text, or as one JSON object a line.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum IoBackend {
    Auto,
    Uring,
    Epoll,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CheckFormat {
    Text,
    Json,
}
