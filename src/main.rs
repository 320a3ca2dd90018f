//! portrelay: command line → settings → logging → run; errors → exit codes.

use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR2};
use signal_hook::iterator::Signals;

use portrelay::admin::{self, protocol::Selector};
use portrelay::cli::{CheckFormat, Cli, Command, IoBackend, LogFormat, RunArgs};
use portrelay::control;
use portrelay::relay::{self, Relay};
use portrelay::upgrade;

fn main() -> ExitCode {
    // The upgrade's preflight asks a binary which state versions it reads.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "--handoff-info")
    {
        println!("{}", portrelay::upgrade::handoff_info());
        return ExitCode::SUCCESS;
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Upgrade {
            admin_socket,
            binary,
        } => {
            let binary = binary.map(|b| b.display().to_string());
            match admin::client::upgrade(&admin_socket, binary) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("portrelay upgrade: {e}");
                    ExitCode::FAILURE
                }
            }
        }
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
    Upgrade(upgrade::Ask),
}

/// The control file and its text (the text goes into an upgrade's state).
fn load(path: &Path) -> Result<(control::Config, String), control::ConfigErrors> {
    match std::fs::read_to_string(path) {
        Ok(text) => control::parse_str(&path.display().to_string(), &text).map(|c| (c, text)),
        Err(_) => control::load(path).map(|c| (c, String::new())),
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    // Started by an upgrade: what the old process hands over.
    let mut handoff = match upgrade::Handoff::from_env() {
        None => None,
        Some(Ok(h)) => Some(h),
        Some(Err(e)) => anyhow::bail!("cannot take over from the old process: {e}"),
    };
    if let Some(h) = &handoff {
        // systemd's watchdog names the main process; this one is it now (the old one sends
        // MAINPID for it). Set before any thread starts.
        if std::env::var("WATCHDOG_PID").is_ok_and(|p| p == h.state.from_pid.to_string()) {
            std::env::set_var("WATCHDOG_PID", std::process::id().to_string());
        }
    }
    #[cfg(debug_assertions)]
    if handoff.is_some() && std::env::var("PORTRELAY_TEST_FAIL_ADOPT").as_deref() == Ok("1") {
        anyhow::bail!("PORTRELAY_TEST_FAIL_ADOPT=1: exiting before adopting, as asked");
    }
    let (config, mut config_text) = match (load(&args.config), &handoff) {
        (Ok(c), _) => c,
        (Err(errors), Some(h)) => {
            // A broken file on disk does not stop an upgrade: the old process's file in
            // force goes on, as a failed reload would keep it.
            for e in errors.render().lines() {
                tracing::error!(error = e, "control file error");
            }
            tracing::error!("the control file on disk is invalid; keeping the one in force");
            let text = h.state.config_text.clone();
            let c = control::parse_str(&args.config.display().to_string(), &text)
                .map_err(|e| anyhow::anyhow!("the control file in force does not load: {e}"))?;
            (c, text)
        }
        (Err(errors), None) => {
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
        Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR2]).context("installing signal handlers")?;
    // An upgrade may change the backend (PORTRELAY_IO_BACKEND overrides the argument).
    let io_backend = match std::env::var("PORTRELAY_IO_BACKEND").as_deref() {
        Ok("uring") => IoBackend::Uring,
        Ok("epoll") => IoBackend::Epoll,
        Ok("auto") => IoBackend::Auto,
        _ => args.io_backend,
    };
    let backend = relay::choose_backend(match io_backend {
        IoBackend::Auto => relay::BackendChoice::Auto,
        IoBackend::Uring => relay::BackendChoice::Uring,
        IoBackend::Epoll => relay::BackendChoice::Epoll,
    })?;
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let metrics = portrelay::metrics::install()?;
    portrelay::metrics::set_backend(backend.name());
    if let Some(h) = &handoff {
        relay::continue_ids_from(h.state.next_id);
    }
    let metrics_addr = config.relay.metrics;
    let admin_socket = config.relay.admin_socket.clone();
    let watch = Arc::new(AtomicBool::new(config.relay.watch));
    let mappings = config.mappings.len();
    let wanted_listeners = config.mappings.len() + config.tls.len();
    let live = portrelay::metrics::live(&config);
    let mut inherited = HashMap::new();
    for (addr, fd) in handoff.as_mut().map(|h| h.listeners()).unwrap_or_default() {
        let l = relay::Listener::from_fd(addr, fd)
            .map_err(|e| anyhow::anyhow!("an inherited listener: {e}"))?;
        inherited.insert(addr, l);
    }
    let mut relay = if handoff.is_some() {
        Relay::start_adopting(config, backend, threads, inherited)?
    } else {
        Relay::start(config, backend, threads)?
    };
    portrelay::metrics::set_live(live);
    if let Some(h) = &handoff {
        // After `set_live`: a restored series of a mapping not in force would be dropped.
        portrelay::metrics::restore_state(&h.state.counters);
    }
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
    // An upgrade goes on with the old process's generation; a file changed on disk since
    // its last reload is a new one.
    let mut generation = handoff.as_ref().map_or(1, |h| {
        h.state.generation + u64::from(h.state.config_text != config_text)
    });
    portrelay::metrics::set_generation(generation, mappings);
    if let Some(addr) = metrics_addr {
        let inherited = handoff.as_mut().and_then(|h| h.metrics_listener());
        let local = match inherited
            .filter(|l| l.local_addr().is_ok_and(|a| a == addr || addr.port() == 0))
        {
            Some(l) => portrelay::metrics::serve_on(l, metrics.clone()),
            None => portrelay::metrics::serve(addr, metrics.clone()),
        }
        .with_context(|| format!("metrics: cannot listen on {addr}"))?;
        tracing::info!(listen = %local, "metrics endpoint at /metrics");
    }
    if let Some(h) = handoff.take() {
        adopt(&relay, h, backend)?;
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
    let upgrade_tx = Mutex::new(tx.clone());
    upgrade::on_ask(move |ask| {
        upgrade_tx
            .lock()
            .expect("upgrade sender")
            .send(ControlEvent::Upgrade(ask))
            .is_ok()
    });
    drop(tx);

    tracing::info!(
        backend = backend.name(),
        threads,
        listeners = relay.listener_count(),
        mappings,
        "ready"
    );
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let mut handed_over = None;
    for event in &rx {
        match event {
            ControlEvent::Signal(SIGHUP) | ControlEvent::FileChanged => {
                if let Some((wanted, text)) =
                    reload(&mut relay, &args.config, &mut generation, &watch)
                {
                    admin::Server::follow(&mut admin, wanted.as_deref(), &sessions);
                    config_text = text;
                }
            }
            ControlEvent::Signal(SIGUSR2) => {
                let ctx = upgrade_context(&config_text, generation);
                let binary = upgrade::default_binary();
                if let Ok(o) = upgrade(&mut relay, &mut admin, &sessions, &binary, &ctx) {
                    handed_over = Some(o);
                    break;
                }
            }
            ControlEvent::Upgrade(ask) => {
                let ctx = upgrade_context(&config_text, generation);
                let binary = ask.binary.clone().unwrap_or_else(upgrade::default_binary);
                match upgrade(&mut relay, &mut admin, &sessions, &binary, &ctx) {
                    Ok(o) => {
                        let _ = ask.answer.send(Ok(upgrade::Report {
                            pid: o.pid,
                            moved: o.moved,
                            stayed: o.stayed,
                            ms: o.ms,
                        }));
                        handed_over = Some(o);
                        upgrade::wait_delivered(&ask.delivered);
                        break;
                    }
                    Err(e) => {
                        let _ = ask.answer.send(Err(e));
                    }
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
    if let Some(outcome) = handed_over {
        return after_hand_over(relay, outcome, &rx);
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    // The socket file goes first: nothing asks a relay that is draining.
    drop(admin);
    relay.shutdown()?;
    tracing::info!("stopped");
    Ok(())
}

fn upgrade_context(config_text: &str, generation: u64) -> upgrade::Context {
    upgrade::Context {
        config_text: config_text.to_string(),
        generation,
        args: std::env::args_os().skip(1).collect(),
    }
}

/// The old process's side of an upgrade, with the admin socket given up for its duration
/// (the new process opens it at the same path) and taken up again on a rollback.
fn upgrade(
    relay: &mut Relay,
    admin: &mut Option<admin::Server>,
    sessions: &relay::Sessions,
    binary: &Path,
    ctx: &upgrade::Context,
) -> Result<upgrade::Outcome, String> {
    tracing::info!(binary = %binary.display(), "upgrade started");
    // The upgrade may keep this thread for up to ~20 s (preflight, freeze, adoption, each
    // bounded): a watchdog ping now keeps systemd's WatchdogSec from running out meanwhile.
    if relay.ping(Duration::from_secs(1)) {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
    }
    let admin_path = admin.as_ref().map(|a| a.path().to_owned());
    *admin = None;
    match upgrade::hand_over(relay, binary, ctx) {
        Ok(o) => {
            tracing::info!(
                pid = o.pid,
                moved = o.moved,
                stayed = o.stayed,
                ms = o.ms,
                "upgrade done"
            );
            Ok(o)
        }
        Err(e) => {
            portrelay::metrics::upgrade_done(false);
            tracing::error!(error = %e, "upgrade rolled back");
            admin::Server::follow(admin, admin_path.as_deref(), sessions);
            Err(e)
        }
    }
}

/// The old process after a successful upgrade: it serves what stayed (TLS sessions) until
/// the last one ends, or drains them with `shutdown_grace` on SIGTERM, then exits 0.
fn after_hand_over(
    relay: Relay,
    outcome: upgrade::Outcome,
    rx: &mpsc::Receiver<ControlEvent>,
) -> anyhow::Result<()> {
    if outcome.stayed > 0 {
        // TLS sessions cannot move: they stay here until they end.
        tracing::info!(connections = outcome.stayed, "draining after upgrade");
    }
    while !relay.loops_done() {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(ControlEvent::Signal(SIGTERM | SIGINT)) => break,
            Ok(ControlEvent::Upgrade(ask)) => {
                let _ = ask
                    .answer
                    .send(Err("this process has been upgraded already".into()));
            }
            _ => {}
        }
    }
    relay.shutdown()?;
    drop(outcome.child);
    tracing::info!("stopped");
    Ok(())
}

/// The new process's side: adopts what the old one handed over, tells it so, then lets
/// every connection move.
fn adopt(relay: &Relay, mut h: upgrade::Handoff, backend: relay::Backend) -> anyhow::Result<()> {
    let from_pid = h.state.from_pid;
    let records = std::mem::take(&mut h.state.connections);
    let fds = std::mem::take(&mut h.fds);
    let n = relay
        .adopt(records, fds)
        .map_err(|e| anyhow::anyhow!("adopting the old process's connections: {e}"))?;
    h.report_adopted().map_err(anyhow::Error::msg)?;
    relay.kick();
    portrelay::metrics::upgrade_done(true);
    tracing::info!(
        from_pid,
        pid = std::process::id(),
        connections = n,
        listeners = relay.listener_count(),
        backend = backend.name(),
        version = portrelay::cli::version_text(),
        "adopted"
    );
    Ok(())
}

/// Loads the control file again and applies it; a file that fails keeps what runs.
/// Returns the admin socket the applied file asks for and the file's text (`None`: it was
/// not applied).
fn reload(
    relay: &mut Relay,
    path: &Path,
    generation: &mut u64,
    watch: &AtomicBool,
) -> Option<(Option<std::path::PathBuf>, String)> {
    let mut admin_socket = None;
    let mut reloading = vec![sd_notify::NotifyState::Reloading];
    if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
        reloading.push(now);
    }
    let _ = sd_notify::notify(&reloading);
    let started = Instant::now();
    match load(path) {
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
        Ok((config, text)) => {
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
            admin_socket = Some((wanted, text));
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
