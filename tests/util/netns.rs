//! Network namespaces a test makes for itself (`ip netns add`), deleted on drop (also when
//! the test panics), and a way to run code, and the processes it starts, inside one.
//!
//! [`Lab`] is the transparent-source topology: a client namespace, a host namespace (where
//! the relay runs, so that the test never touches this machine's own routing) and an
//! instance namespace, linked by veth pairs, with the host forwarding between them like a
//! Docker host:
//!
//! ```text
//!   client 10.10.0.2/24      host 10.10.0.1/24   172.31.0.1/24   instance 172.31.0.2/24
//!          fd00:10::2/64          fd00:10::1/64   fd00:31::1/64            fd00:31::2/64
//! ```

use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::process;
use super::relay::{in_ci, ALLOW_SKIP};

/// One network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// A new namespace named `portrelay-<pid>-<n>-<role>` (unique over concurrent tests),
    /// with its loopback up.
    pub fn new(role: &str) -> Netns {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "portrelay-{}-{}-{role}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NAME ARGS…`, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// `ip netns exec NAME ARGV…`, to run a command in this namespace.
    pub fn command(&self, argv: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(argv);
        cmd
    }

    /// Runs `argv` in this namespace; panics unless it succeeds. Its stdout.
    pub fn run(&self, argv: &[&str]) -> String {
        let out = process::run(&mut self.command(argv), Duration::from_secs(30));
        assert!(
            out.status.success(),
            "{argv:?} in {} failed ({}): {}{}",
            self.name,
            out.status,
            out.stdout,
            out.stderr
        );
        out.stdout
    }

    /// Runs `f` on a thread that has entered this namespace: its sockets, and the
    /// processes it starts, are in the namespace.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file =
                    std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                // SAFETY: setns(2) takes a descriptor that `file` keeps open for the call,
                // and moves only this thread (a network namespace is per thread).
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth ends (and their peers).
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn ip(args: &[&str]) {
    let out = process::run(Command::new("ip").args(args), Duration::from_secs(30));
    assert!(
        out.status.success(),
        "ip {args:?} failed ({}): {}",
        out.status,
        out.stderr
    );
}

/// Why this machine cannot make network namespaces, if it cannot.
fn unavailable() -> Option<String> {
    let name = format!("portrelay-probe-{}", std::process::id());
    match Command::new("ip").args(["netns", "add", &name]).output() {
        Ok(out) if out.status.success() => {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
            None
        }
        Ok(out) => Some(format!(
            "ip netns add failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run ip (iproute2): {e}")),
    }
}

/// Whether a test that needs network namespaces may run. Where they cannot be made it
/// fails, unless [`ALLOW_SKIP`]`=1` outside CI makes it a printed skip (`false`).
pub fn available(test: &str) -> bool {
    let Some(reason) = unavailable() else {
        return true;
    };
    let allowed = std::env::var(ALLOW_SKIP).is_ok_and(|v| v == "1");
    if allowed && !in_ci() {
        eprintln!("SKIPPED {test} ({ALLOW_SKIP}=1): no network namespaces: {reason}");
        return false;
    }
    let why = if allowed {
        format!("{ALLOW_SKIP}=1 is refused in CI (CI is set)")
    } else {
        format!("set {ALLOW_SKIP}=1 to skip such tests outside CI")
    };
    panic!("{test} needs network namespaces (run as root): {reason}; {why}");
}

/// The client, host and instance namespaces (see the module's doc).
pub struct Lab {
    pub client: Netns,
    pub host: Netns,
    pub instance: Netns,
}

pub const CLIENT_V4: &str = "10.10.0.2";
pub const HOST_CLIENT_SIDE_V4: &str = "10.10.0.1";
pub const HOST_CLIENT_SIDE_V6: &str = "fd00:10::1";
pub const CLIENT_V6: &str = "fd00:10::2";
pub const HOST_INSTANCE_SIDE_V4: &str = "172.31.0.1";
pub const INSTANCE_V4: &str = "172.31.0.2";
pub const INSTANCE_V6: &str = "fd00:31::2";

impl Lab {
    pub fn new() -> Lab {
        let lab = Lab {
            client: Netns::new("cli"),
            host: Netns::new("host"),
            instance: Netns::new("inst"),
        };
        // No duplicate address detection on the links to come: their link-local addresses
        // would stay tentative for a second or more, and IPv6 neighbour discovery with them.
        for ns in [&lab.client, &lab.host, &lab.instance] {
            for key in [
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ] {
                ns.run(&["sysctl", "-q", "-w", key]);
            }
        }
        lab.link(&lab.client, "to-client", "10.10.0", "fd00:10:");
        lab.link(&lab.instance, "to-instance", "172.31.0", "fd00:31:");
        for key in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            lab.host.run(&["sysctl", "-q", "-w", key]);
        }
        lab
    }

    /// A veth pair between the host (`here`, `.1`) and `other` (`eth0`, `.2`, its default
    /// routes via the host), on `v4.0/24` and `v6:/64`.
    fn link(&self, other: &Netns, here: &str, v4: &str, v6: &str) {
        let peer = "eth0";
        self.host.ip(&[
            "link",
            "add",
            here,
            "type",
            "veth",
            "peer",
            "name",
            peer,
            "netns",
            &other.name,
        ]);
        self.host
            .ip(&["addr", "add", &format!("{v4}.1/24"), "dev", here]);
        self.host
            .ip(&["addr", "add", &format!("{v6}:1/64"), "dev", here, "nodad"]);
        self.host.ip(&["link", "set", here, "up"]);
        other.ip(&["addr", "add", &format!("{v4}.2/24"), "dev", peer]);
        other.ip(&["addr", "add", &format!("{v6}:2/64"), "dev", peer, "nodad"]);
        other.ip(&["link", "set", peer, "up"]);
        other.ip(&["route", "add", "default", "via", &format!("{v4}.1")]);
        other.ip(&["-6", "route", "add", "default", "via", &format!("{v6}:1")]);
    }
}

pub fn addr(s: &str) -> IpAddr {
    s.parse().unwrap()
}
