//! portrelay: command line → settings → logging → run; errors → exit codes.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use portrelay::cli::{Cli, Command, LogFormat, RunArgs};
use portrelay::control;
use portrelay::relay::{self, Relay};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match control::load(&config) {
            Ok(c) => {
                let ports: usize = c.mappings.iter().map(|m| m.ports.len()).sum();
                println!(
                    "{}: ok ({} mappings, {} ports)",
                    config.display(),
                    c.mappings.len(),
                    ports
                );
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::FAILURE
            }
        },
        Command::Run(args) => {
            init_logging(args.log_format);
            match run(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PORTRELAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = match control::load(&args.config) {
        Ok(c) => c,
        Err(errors) => {
            // The same lines as `check`, on stderr, and exit 1.
            eprintln!("{errors}");
            anyhow::bail!(
                "{}: invalid control file; not starting",
                args.config.display()
            );
        }
    };
    // Block the signals before any thread starts, so that only this thread takes them.
    let mut signals =
        Signals::new([SIGTERM, SIGINT, SIGHUP]).context("installing signal handlers")?;
    let backend = relay::choose_backend(args.io_backend)?;
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let metrics = portrelay::metrics::install()?;
    portrelay::metrics::set_backend(backend.name());
    let relay = Relay::start(&config, backend, threads)?;
    portrelay::metrics::set_generation(1, config.mappings.len());
    if let Some(addr) = config.relay.metrics {
        let local = portrelay::metrics::serve(addr, metrics)
            .with_context(|| format!("metrics: cannot listen on {addr}"))?;
        tracing::info!(listen = %local, "metrics endpoint at /metrics");
    }
    tracing::info!(
        backend = backend.name(),
        threads,
        listeners = relay.listener_count(),
        mappings = config.mappings.len(),
        "ready"
    );
    for sig in signals.forever() {
        match sig {
            SIGHUP => tracing::warn!(
                "SIGHUP: live reload is not implemented yet; restart to apply changes"
            ),
            _ => {
                tracing::info!(signal = sig, "shutting down: no new connections, draining");
                break;
            }
        }
    }
    relay.shutdown()?;
    tracing::info!("stopped");
    Ok(())
}
