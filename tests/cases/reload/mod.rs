//! Live reload of the control file: the relay applies a rewritten file by difference while
//! connections run, and a file that fails changes nothing. One module per scenario:
//!
//! - `scp`: an scp of 256 MiB through one mapping survives 50 reloads that rename it,
//!   change its `allow` and add and remove other mappings;
//! - `removed`: a removed mapping's live connection follows `removed_mapping`;
//! - `retarget`: a retargeted port reaches the new upstream without refusing anyone;
//! - `limits`: reloads of `allow` and `max_connections` take effect;
//! - `broken`: a broken file keeps what runs, logged as `FILE:LINE:COL: message`;
//! - `watch`: renames and in-place rewrites are seen, bursts coalesce;
//! - `ports`: a port held by another program is reported and retried;
//! - `scale`: one change in a file of 10,000 mappings is applied within 2 s, and the echo
//!   round trips of another mapping meanwhile keep a p99 under 50 ms.
//!
//! Every upstream here greets with its name (`NAME\n`) and then echoes, so a client knows
//! which upstream it reached.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::util::files::{assert_same_file, random_file};
use crate::util::log::LogLine;
use crate::util::metrics::Scrape;
use crate::util::net::echo_until_eof;
use crate::util::net::{
    assert_refused, connect, connect_expect_reset, connect_from, expect_closed,
    free_ports_in_a_row, listen, read_some, roundtrip, Upstream, LOCALHOST,
};
use crate::util::process;
use crate::util::relay::{
    allow_line, data_path_test, map_section, relay_section, run_on, Start, BIN,
};
use crate::util::{poll, Backend, Relay, Sshd};

/// How long a reload may take to be applied and logged (the watch waits 50 ms first).
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connection that a reload closes may take to end, from the client's side.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// Control files, upstreams, clients

/// An upstream that sends `NAME\n` as soon as it accepts, then echoes every byte; at end
/// of stream it shuts down its write side.
fn named_echo(name: &str) -> Upstream {
    let greeting = format!("{name}\n").into_bytes();
    let listener = listen((LOCALHOST, 0).into()).expect("bind 127.0.0.1:0");
    Upstream::serve(listener, move |mut conn, stats| {
        conn.write_all(&greeting)?;
        echo_until_eof(&mut conn, stats)
    })
}

/// Reads the greeting line of a [`named_echo`] upstream (without its newline).
fn read_greeting(conn: &mut TcpStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 64 {
        match read_some(conn, &mut byte)? {
            0 => return Err(ErrorKind::UnexpectedEof.into()),
            _ if byte[0] == b'\n' => return Ok(String::from_utf8_lossy(&line).into_owned()),
            _ => line.push(byte[0]),
        }
    }
    Err(std::io::Error::other("greeting longer than 64 bytes"))
}

/// A connection to 127.0.0.1:`port` through the relay, and the name of the upstream it
/// reached.
fn connect_named(port: u16) -> (TcpStream, String) {
    let mut conn = connect(port);
    let name = read_greeting(&mut conn)
        .unwrap_or_else(|e| panic!("greeting of the upstream behind port {port}: {e}"));
    (conn, name)
}

/// A new connection to `port` reaches the upstream named `name` and echoes.
fn assert_serves(port: u16, name: &str) {
    let (mut conn, reached) = connect_named(port);
    assert_eq!(reached, name, "upstream reached through port {port}");
    roundtrip(&mut conn, format!("through {port} to {name}").as_bytes());
}

/// Every `control file error` line so far: its `error` field.
fn control_file_errors(relay: &Relay) -> Vec<String> {
    relay
        .log_lines()
        .iter()
        .filter(|l| l.msg() == "control file error")
        .map(|l| l.text("error").to_string())
        .collect()
}

/// Whether `line` is a `reload failed…` line.
fn is_reload_failed(line: &LogLine) -> bool {
    line.msg().starts_with("reload failed")
}

/// Splits `FILE:LINE:COL: message` for the control file at `file`: (line, col, message).
fn split_error<'a>(error: &'a str, file: &str) -> (u64, u64, &'a str) {
    let rest = error
        .strip_prefix(file)
        .and_then(|r| r.strip_prefix(':'))
        .unwrap_or_else(|| panic!("error does not begin with `{file}:`: {error}"));
    let mut parts = rest.splitn(3, ':');
    let (line, col, message) = (parts.next(), parts.next(), parts.next());
    let number = |s: Option<&str>| s.and_then(|s| s.parse::<u64>().ok());
    match (number(line), number(col), message) {
        (Some(line), Some(col), Some(message)) if line >= 1 && col >= 1 => {
            (line, col, message.trim())
        }
        _ => panic!("error is not FILE:LINE:COL: message: {error}"),
    }
}

/// The 1-based number of the first line of `text` that `pred` holds for, after line
/// `after` (1-based; 0 for from the start).
fn line_number(text: &str, after: usize, pred: impl Fn(&str) -> bool) -> u64 {
    text.lines()
        .enumerate()
        .skip(after)
        .find(|(_, l)| pred(l))
        .map(|(i, _)| i as u64 + 1)
        .unwrap_or_else(|| panic!("no such line in:\n{text}"))
}

mod broken;
mod limits;
mod ports;
mod removed;
mod retarget;
mod scale;
mod scp;
mod watch;
