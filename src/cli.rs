//! The command line, as in CONTRACT.md.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::relay::BackendChoice;

pub const DEFAULT_CONFIG: &str = "/etc/portrelay/portrelay.toml";

#[derive(Parser, Debug)]
#[command(
    name = "portrelay",
    version,
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
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[arg(long, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// io backend: auto uses io_uring when the kernel and seccomp allow it.
    #[arg(long, value_enum, default_value = "auto")]
    pub io_backend: BackendChoice,
    /// Event loops (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}
