//! A test CA and a server certificate for `*.ssh.test` and `ssh.test` (the bare suffix,
//! which `wss://` clients may name), made with the openssl CLI (EC P-256), for the relay's
//! `[[tls]]` entry and for `openssl s_client -CAfile`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::process;

/// The `sni_suffix` the test certificate covers: its SAN is `*.ssh.test` and `ssh.test`.
pub const SNI_SUFFIX: &str = "ssh.test";

/// A CA, and a server certificate it signed for `*.ssh.test`.
pub struct TestCa {
    /// The CA certificate (PEM), for clients (`-CAfile`).
    pub ca: PathBuf,
    /// The server's chain (PEM): its certificate, then the CA's. The relay's `cert`.
    pub chain: PathBuf,
    /// The server's private key (PEM, PKCS#8). The relay's `key`.
    pub key: PathBuf,
}

impl TestCa {
    /// Makes the CA, the server key and certificate, and the chain, as files in `dir`.
    pub fn new(dir: &Path) -> TestCa {
        let path = |name: &str| dir.join(name);
        let (ca_key, ca) = (path("ca.key"), path("ca.crt"));
        let (key, csr, cert) = (path("server.key"), path("server.csr"), path("server.crt"));
        let (ext, chain) = (path("server.ext"), path("chain.pem"));

        genkey(&ca_key);
        openssl(
            Command::new("openssl")
                .args(["req", "-x509", "-new", "-sha256", "-days", "2"])
                .args(["-subj", "/CN=portrelay test CA"])
                .args(["-addext", "basicConstraints=critical,CA:TRUE"])
                .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
                .arg("-key")
                .arg(&ca_key)
                .arg("-out")
                .arg(&ca),
        );

        genkey(&key);
        openssl(
            Command::new("openssl")
                .args(["req", "-new", "-sha256"])
                .args(["-subj", &format!("/CN=*.{SNI_SUFFIX}")])
                .arg("-key")
                .arg(&key)
                .arg("-out")
                .arg(&csr),
        );
        std::fs::write(
            &ext,
            format!(
                "subjectAltName = DNS:*.{SNI_SUFFIX}, DNS:{SNI_SUFFIX}\n\
                 basicConstraints = critical,CA:FALSE\n\
                 keyUsage = critical,digitalSignature\n\
                 extendedKeyUsage = serverAuth\n"
            ),
        )
        .expect("write server.ext");
        let serial = format!("0x{}", super::files::hex(&super::files::random_bytes(8)));
        openssl(
            Command::new("openssl")
                .args(["x509", "-req", "-sha256", "-days", "2"])
                .args(["-set_serial", &serial])
                .arg("-in")
                .arg(&csr)
                .arg("-CA")
                .arg(&ca)
                .arg("-CAkey")
                .arg(&ca_key)
                .arg("-extfile")
                .arg(&ext)
                .arg("-out")
                .arg(&cert),
        );

        let mut pem = std::fs::read(&cert).expect("read server.crt");
        pem.extend(std::fs::read(&ca).expect("read ca.crt"));
        std::fs::write(&chain, pem).expect("write chain.pem");
        TestCa { ca, chain, key }
    }
}

/// An EC P-256 private key (PKCS#8 PEM) at `path`.
fn genkey(path: &Path) {
    openssl(
        Command::new("openssl")
            .args(["genpkey", "-algorithm", "EC"])
            .args(["-pkeyopt", "ec_paramgen_curve:P-256"])
            .arg("-out")
            .arg(path),
    );
}

fn openssl(cmd: &mut Command) {
    let what = format!("{cmd:?}");
    let out = process::run(cmd, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        out.status,
        out.stderr
    );
}
