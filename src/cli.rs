//! The command line. Self-contained (no other module of the crate), so that build.rs can
//! build the man page and shell completions from it.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

pub const DEFAULT_CONFIG: &str = "/etc/portrelay/portrelay.toml";

/// `--version`: the crate version and the git commit it was built from, with ", dirty"
/// when the tree had changes not in that commit (set by build.rs; "git unknown" without git).
pub const VERSION: &str = match option_env!("PORTRELAY_VERSION") {
    Some(version) => version,
    None => env!("CARGO_PKG_VERSION"),
};

#[derive(Parser, Debug)]
#[command(
    name = "portrelay",
    version = VERSION,
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
