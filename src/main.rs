//! portrelay: command line → settings → logging → run; errors → exit codes.

use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use portrelay::admin::{self, protocol::Selector};
use portrelay::cli::{CheckFormat, Cli, Command, IoBackend, LogFormat, RunArgs};
use portrelay::control;
use portrelay::relay::{self, Relay};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config, format } => check(&config, format),
        Command::Sessions {
            admin_socket,
            map,
            json,
        } => print_or_fail(
            admin::client::sessions(&admin_socket, map, json).map(|text| (text, true)),
        ),
        Command::Kill {
            admin_socket,
            ids,
            map,
            client,
        } => {
            let selector = match (map, client) {
                (Some(map), _) => Selector::Map(map),
                (None, Some(client)) => match admin::protocol::parse_client(&client) {
                    Ok(net) => Selector::Client(net),
                    Err(e) => {
                        eprintln!("portrelay kill: --client: {e}");
                        return ExitCode::from(2);
                    }
                },
                (None, None) => Selector::Ids(ids),
            };
            print_or_fail(admin::client::kill(&admin_socket, selector))
        }
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

/// Prints what an admin command answered; exit 1 when it failed or found less than asked.
fn print_or_fail(result: Result<(String, bool), admin::client::ClientError>) -> ExitCode {
    match result {
        Ok((text, complete)) => {
            print!("{text}");
            if complete {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("portrelay: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One line of `check --format json`: an error, or the summary of a valid file.
#[derive(serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum CheckLine<'a> {
    Error {
        file: &'a str,
        line: usize,
        column: usize,
        code: &'a str,
        message: &'a str,
    },
    Summary {
        file: &'a str,
        mappings: usize,
        ports: usize,
        tls: usize,
        ws: usize,
    },
}

fn print_json(line: &CheckLine<'_>) {
    println!(
        "{}",
        serde_json::to_string(line).expect("plain values serialize")
    );
}

/// `portrelay check`: exit 0 when the file is valid, 1 with every error.
fn check(config: &Path, format: CheckFormat) -> ExitCode {
    let errors = match control::load(config) {
        Ok(c) => {
            let file = config.display().to_string();
            let ports: usize = c.mappings.iter().map(|m| m.ports.len()).sum();
            match format {
                CheckFormat::Text => {
                    println!("{file}: ok ({} mappings, {ports} ports)", c.mappings.len())
                }
                CheckFormat::Json => print_json(&CheckLine::Summary {
                    file: &file,
                    mappings: c.mappings.len(),
                    ports,
                    tls: c.tls.len(),
                    ws: c.ws.len(),
                }),
            }
            return ExitCode::SUCCESS;
        }
        Err(errors) => errors,
    };
    match format {
        CheckFormat::Text => eprintln!("{errors}"),
        CheckFormat::Json => {
            for e in &errors.errors {
                print_json(&CheckLine::Error {
                    file: &errors.file,
                    line: e.line,
                    column: e.col,
                    code: e.code,
                    message: &e.message,
                });
            }
        }
    }
    ExitCode::FAILURE
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PORTRELAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(portrelay::logging::Writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// What wakes the control thread.
enum ControlEvent {
    Signal(i32),
    FileChanged,
    WatchdogTick,
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
    // Block the signals before any thread starts, so that only the signal thread takes them.
    let mut signals =
        Signals::new([SIGTERM, SIGINT, SIGHUP]).context("installing signal handlers")?;
    let backend = relay::choose_backend(match args.io_backend {
        IoBackend::Auto => relay::BackendChoice::Auto,
        IoBackend::Uring => relay::BackendChoice::Uring,
        IoBackend::Epoll => relay::BackendChoice::Epoll,
    })?;
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let metrics = portrelay::metrics::install()?;
    portrelay::metrics::set_backend(backend.name());
    let metrics_addr = config.relay.metrics;
    let admin_socket = config.relay.admin_socket.clone();
    let watch = Arc::new(AtomicBool::new(config.relay.watch));
    let mappings = config.mappings.len();
    let wanted_listeners = config.mappings.len() + config.tls.len();
    let live = portrelay::metrics::live(&config);
    let mut relay = Relay::start(config, backend, threads)?;
    portrelay::metrics::set_live(live);
    if wanted_listeners > 0 && relay.listener_count() == 0 {
        // Some ports failing is reported and retried at each reload; none at all is a relay
        // that serves nothing, which a supervisor should see as a failed start.
        anyhow::bail!("no listener could be opened (see the errors above); not starting");
    }
    let sessions = relay.sessions();
    let mut admin = match &admin_socket {
        Some(path) => Some(admin::Server::start(path, sessions.clone())?),
        None => None,
    };
    let mut generation = 1u64;
    portrelay::metrics::set_generation(generation, mappings);
    if let Some(addr) = metrics_addr {
        let local = portrelay::metrics::serve(addr, metrics)
            .with_context(|| format!("metrics: cannot listen on {addr}"))?;
        tracing::info!(listen = %local, "metrics endpoint at /metrics");
    }

    let (tx, rx) = mpsc::channel();
    let signal_tx = tx.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if signal_tx.send(ControlEvent::Signal(sig)).is_err() {
                    return;
                }
            }
        })?;
    let watch_tx = Mutex::new(tx.clone());
    if let Err(e) = control::watch::spawn(&args.config, watch.clone(), move || {
        let _ = watch_tx
            .lock()
            .expect("watch sender")
            .send(ControlEvent::FileChanged);
    }) {
        tracing::warn!(error = %e, "cannot watch the control file; SIGHUP still reloads");
    }
    if let Some(interval) = sd_notify::watchdog_enabled() {
        let tick_tx = tx.clone();
        std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(interval / 2);
                if tick_tx.send(ControlEvent::WatchdogTick).is_err() {
                    return;
                }
            })?;
    }
    drop(tx);

    tracing::info!(
        backend = backend.name(),
        threads,
        listeners = relay.listener_count(),
        mappings,
        "ready"
    );
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    for event in rx {
        match event {
            ControlEvent::Signal(SIGHUP) | ControlEvent::FileChanged => {
                if let Some(wanted) = reload(&mut relay, &args.config, &mut generation, &watch) {
                    admin::Server::follow(&mut admin, wanted.as_deref(), &sessions);
                }
            }
            ControlEvent::WatchdogTick => {
                // Ping only while every loop answers: a stuck loop lets systemd restart us.
                if relay.ping(Duration::from_secs(1)) {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                }
            }
            ControlEvent::Signal(sig) => {
                tracing::info!(signal = sig, "shutting down: no new connections, draining");
                break;
            }
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    // The socket file goes first: nothing asks a relay that is draining.
    drop(admin);
    relay.shutdown()?;
    tracing::info!("stopped");
    Ok(())
}

/// Loads the control file again and applies it; a file that fails keeps what runs.
/// Returns the admin socket the applied file asks for (`None`: it was not applied).
fn reload(
    relay: &mut Relay,
    path: &Path,
    generation: &mut u64,
    watch: &AtomicBool,
) -> Option<Option<std::path::PathBuf>> {
    let mut admin_socket = None;
    let mut reloading = vec![sd_notify::NotifyState::Reloading];
    if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
        reloading.push(now);
    }
    let _ = sd_notify::notify(&reloading);
    let started = Instant::now();
    match control::load(path) {
        Err(errors) => {
            for e in errors.render().lines() {
                tracing::error!(error = e, "control file error");
            }
            portrelay::metrics::reload(false);
            tracing::error!(
                errors = errors.errors.len(),
                generation = *generation,
                "reload failed; the running mappings stay in force"
            );
        }
        Ok(config) => {
            let loaded_ms = started.elapsed().as_secs_f64() * 1000.0;
            let mappings = config.mappings.len();
            watch.store(config.relay.watch, Ordering::Relaxed);
            let wanted = config.relay.admin_socket.clone();
            let live = portrelay::metrics::live(&config);
            let applied = match relay.apply(config) {
                Ok(a) => a,
                Err(e) => {
                    portrelay::metrics::reload(false);
                    tracing::error!(error = %format!("{e:#}"), generation = *generation, "reload failed; the running mappings stay in force");
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
                    return None;
                }
            };
            admin_socket = Some(wanted);
            *generation += 1;
            portrelay::metrics::set_live(live);
            portrelay::metrics::reload(true);
            portrelay::metrics::set_generation(*generation, mappings);
            tracing::info!(
                generation = *generation,
                mappings,
                changed_ports = applied.changed_ports,
                listen_failures = applied.failed.len(),
                load_ms = loaded_ms,
                ms = started.elapsed().as_secs_f64() * 1000.0,
                "reloaded"
            );
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    admin_socket
}
