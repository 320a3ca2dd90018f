//! A real HAProxy (Debian's `/usr/sbin/haproxy`) as the trusted upstream proxy: tcp mode,
//! listening on 127.0.0.1, connecting to the relay from source address 127.0.0.2 with a
//! PROXY v1 or v2 header.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use super::net::free_ports_in_a_row;
use super::poll;
use super::process::KillOnDrop;

/// The source address HAProxy connects to the relay from: the trusted proxy.
pub const PROXY_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// How long HAProxy has to open its listener.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// The PROXY header HAProxy sends to the relay (`send-proxy` or `send-proxy-v2`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendProxy {
    V1,
    V2,
}

impl SendProxy {
    fn keyword(self) -> &'static str {
        match self {
            SendProxy::V1 => "send-proxy",
            SendProxy::V2 => "send-proxy-v2",
        }
    }
}

/// The HAProxy binary: `$PORTRELAY_TEST_HAPROXY`, else Debian's place.
fn haproxy_binary() -> PathBuf {
    std::env::var_os("PORTRELAY_TEST_HAPROXY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/haproxy"))
}

/// A running HAProxy in the foreground (`-db`), killed on drop.
pub struct Haproxy {
    child: KillOnDrop,
    _dir: TempDir,
    port: u16,
}

impl Haproxy {
    /// Starts HAProxy on 127.0.0.1:`listen_port`, forwarding to 127.0.0.1:`relay_port` from
    /// 127.0.0.2 with `send_proxy`, and returns once its listener is open. Panics (with
    /// what HAProxy said) when it is not.
    pub fn start(listen_port: u16, relay_port: u16, send_proxy: SendProxy) -> Haproxy {
        Self::try_start(listen_port, relay_port, send_proxy).unwrap_or_else(|why| panic!("{why}"))
    }

    /// [`Haproxy::start`] on a free port, trying another port when HAProxy cannot bind
    /// the first (someone took it meanwhile).
    pub fn start_on_free_port(relay_port: u16, send_proxy: SendProxy) -> Haproxy {
        let mut failures = Vec::new();
        for _ in 0..3 {
            match Self::try_start(free_ports_in_a_row(1), relay_port, send_proxy) {
                Ok(haproxy) => return haproxy,
                Err(why) => failures.push(why),
            }
        }
        panic!("HAProxy did not start:\n{}", failures.join("\n---\n"));
    }

    /// [`Haproxy::start`], returning why it failed.
    pub fn try_start(
        listen_port: u16,
        relay_port: u16,
        send_proxy: SendProxy,
    ) -> Result<Haproxy, String> {
        let binary = haproxy_binary();
        assert!(
            binary.exists(),
            "{} is missing: install haproxy (scripts/test does)",
            binary.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("portrelay-haproxy-")
            .tempdir()
            .expect("tempdir");
        let config = dir.path().join("haproxy.cfg");
        // Small maxconn: HAProxy sizes its fd table from it, and this machine's open-file
        // limit is shared by every test. No health checks: they would be connections of
        // their own to the relay.
        std::fs::write(
            &config,
            format!(
                "global\n\
                 \x20   maxconn 200\n\
                 \x20   nbthread 2\n\
                 defaults\n\
                 \x20   mode tcp\n\
                 \x20   timeout connect 10s\n\
                 \x20   timeout client 10m\n\
                 \x20   timeout server 10m\n\
                 frontend in\n\
                 \x20   bind 127.0.0.1:{listen_port}\n\
                 \x20   default_backend relay\n\
                 backend relay\n\
                 \x20   server s 127.0.0.1:{relay_port} source {PROXY_SOURCE} {keyword}\n",
                keyword = send_proxy.keyword(),
            ),
        )
        .expect("write haproxy.cfg");
        let mut child = KillOnDrop::spawn(
            Command::new(&binary).arg("-db").arg("-f").arg(&config),
            "[haproxy]",
        );
        let pid = child.child.id();
        let listening = poll(READY_TIMEOUT, Duration::from_millis(10), || {
            if let Some(status) = child.exited() {
                return Some(Err(format!("exited with {status}")));
            }
            listens(pid, listen_port).then_some(Ok(()))
        });
        match listening {
            Some(Ok(())) => Ok(Haproxy {
                child,
                _dir: dir,
                port: listen_port,
            }),
            Some(Err(why)) => Err(format!(
                "HAProxy on port {listen_port}: {why}: {}",
                child.stderr()
            )),
            None => Err(format!(
                "HAProxy not listening on 127.0.0.1:{listen_port} within {READY_TIMEOUT:?}: {}",
                child.stderr()
            )),
        }
    }

    /// The port on 127.0.0.1 where clients connect.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// What HAProxy wrote on stderr so far.
    pub fn stderr(&self) -> String {
        self.child.stderr()
    }
}

/// Whether process `pid` holds a socket listening on 127.0.0.1:`port`: a LISTEN row of
/// /proc/net/tcp whose inode is one of the process's fds. Asks the kernel instead of
/// connecting, since a probe connection through HAProxy would reach the relay.
fn listens(pid: u32, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let local = format!("0100007F:{port:04X}");
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|row| {
            let f: Vec<&str> = row.split_whitespace().collect();
            (f.len() > 9 && f[1] == local && f[3] == "0A").then(|| f[9].to_string())
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(Result::ok).any(|fd| {
        std::fs::read_link(fd.path())
            .map(|target| {
                let target = target.to_string_lossy();
                inodes.iter().any(|i| target == format!("socket:[{i}]"))
            })
            .unwrap_or(false)
    })
}
