//! The command line's side of the admin socket: `portrelay sessions` and `portrelay kill`.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::protocol::{self, Reply, Request, Selector, Session};

/// How long the command waits for the relay's reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no relay admin socket at {} (is admin_socket set in the control file?)", .0.display())]
    NoSocket(PathBuf),
    #[error("cannot connect to the admin socket {}: {source} (it is mode 0600: run as the relay's user or root)", path.display())]
    Denied {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("admin socket {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the relay's reply is not understood: {0}")]
    BadReply(String),
    #[error("the relay refused the request: {0}")]
    Refused(String),
}

/// Sends one request and reads its reply.
pub fn ask(path: &Path, request: &Request) -> Result<Reply, ClientError> {
    ask_within(path, request, REPLY_TIMEOUT)
}

/// `portrelay upgrade`: the line to print once the new process has taken over.
pub fn upgrade(path: &Path, binary: Option<String>) -> Result<String, ClientError> {
    match ask_within(path, &Request::Upgrade { binary }, UPGRADE_TIMEOUT)? {
        Reply::Upgraded {
            pid,
            moved,
            stayed,
            ms,
            ..
        } => Ok(format!(
            "upgraded: pid {pid}, {moved} connections moved, {stayed} stayed (TLS), {ms} ms\n"
        )),
        other => Err(ClientError::BadReply(format!("{other:?}"))),
    }
}

/// How long `portrelay upgrade` waits for the relay's answer (its own steps are bounded
/// by less).
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(60);

fn ask_within(path: &Path, request: &Request, timeout: Duration) -> Result<Reply, ClientError> {
    let io_err = |source| ClientError::Io {
        path: path.to_owned(),
        source,
    };
    let stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) => {
            return Err(match e.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ECONNREFUSED) | Some(libc::ENOTDIR) => {
                    ClientError::NoSocket(path.to_owned())
                }
                Some(libc::EACCES) | Some(libc::EPERM) => ClientError::Denied {
                    path: path.to_owned(),
                    source: e,
                },
                _ => io_err(e),
            })
        }
    };
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream
        .set_write_timeout(Some(REPLY_TIMEOUT))
        .map_err(io_err)?;
    (&stream)
        .write_all(protocol::encode(request).as_bytes())
        .map_err(io_err)?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(io_err)?;
    match serde_json::from_str::<Reply>(&line) {
        Ok(Reply::Error { error, .. }) => Err(ClientError::Refused(error)),
        Ok(reply) => Ok(reply),
        Err(e) => Err(ClientError::BadReply(format!("{e}: {:?}", line.trim_end()))),
    }
}

/// `portrelay sessions`: the text to print (a table, or with `json` one JSON array).
pub fn sessions(path: &Path, map: Option<String>, json: bool) -> Result<String, ClientError> {
    let sessions = match ask(path, &Request::Sessions { map })? {
        Reply::Sessions { sessions, .. } => sessions,
        other => return Err(ClientError::BadReply(format!("{other:?}"))),
    };
    Ok(if json {
        format!(
            "{}\n",
            serde_json::to_string(&sessions).expect("plain values serialize")
        )
    } else {
        table(&sessions)
    })
}

/// `portrelay kill`: the text to print, and whether every id named was found (always true
/// for `--map` and `--client`, which may match none).
pub fn kill(path: &Path, selector: Selector) -> Result<(String, bool), ClientError> {
    let asked = match &selector {
        Selector::Ids(ids) => Some(ids.clone()),
        _ => None,
    };
    let killed = match ask(path, &Request::Kill(selector))? {
        Reply::Killed { killed, .. } => killed,
        other => return Err(ClientError::BadReply(format!("{other:?}"))),
    };
    let n = killed.len();
    let mut text = format!("killed {n} connection{}\n", if n == 1 { "" } else { "s" });
    let missing: Vec<String> = asked
        .unwrap_or_default()
        .into_iter()
        .filter(|id| !killed.contains(id))
        .map(|id| id.to_string())
        .collect();
    if !missing.is_empty() {
        text.push_str(&format!(
            "no live connection with id {}\n",
            missing.join(", ")
        ));
    }
    Ok((text, missing.is_empty()))
}

/// Aligned columns under a header, one line per connection.
pub fn table(sessions: &[Session]) -> String {
    let header = [
        "ID",
        "CLIENT",
        "VIA",
        "PORT",
        "MAP",
        "UPSTREAM",
        "RELAY_LOCAL",
        "STATE",
        "TO_UPSTREAM",
        "TO_CLIENT",
        "AGE",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for s in sessions {
        rows.push(vec![
            s.id.to_string(),
            s.client.to_string(),
            s.via.clone(),
            s.port.to_string(),
            s.map.clone(),
            s.upstream.to_string(),
            s.relay_local.map_or("-".to_string(), |a| a.to_string()),
            s.state.clone(),
            s.bytes_client_to_upstream.to_string(),
            s.bytes_upstream_to_client.to_string(),
            age(Duration::from_millis(s.age_ms)),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `42s`, `5m07s`, `3h02m`, `2d04h`.
fn age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_short() {
        for (secs, want) in [
            (0, "0s"),
            (59, "59s"),
            (60, "1m00s"),
            (307, "5m07s"),
            (3600 * 3 + 120, "3h02m"),
            (86400 * 2 + 3600 * 4, "2d04h"),
        ] {
            assert_eq!(age(Duration::from_secs(secs)), want);
        }
    }

    #[test]
    fn table_aligns_columns_under_the_header() {
        let s = Session {
            id: 12,
            client: "127.0.0.3:5000".parse().unwrap(),
            via: "proxy".into(),
            port: 2222,
            map: "C.1".into(),
            upstream: "127.0.0.1:22".parse().unwrap(),
            relay_local: None,
            state: "held".into(),
            bytes_client_to_upstream: 0,
            bytes_upstream_to_client: 123456,
            age_ms: 61_000,
        };
        let text = table(&[s]);
        assert_eq!(
            text,
            "ID  CLIENT          VIA    PORT  MAP  UPSTREAM      RELAY_LOCAL  STATE  TO_UPSTREAM  TO_CLIENT  AGE\n\
             12  127.0.0.3:5000  proxy  2222  C.1  127.0.0.1:22  -            held   0            123456     1m01s\n"
        );
    }
}
