//! The TLS entry: SSH wrapped in TLS (`openssl s_client` as the ProxyCommand) on one port
//! for all mappings, routed by SNI `<name>.<sni_suffix>`. rustls in user space: kTLS would
//! let the decrypted side be spliced, but this kernel has no `CONFIG_TLS`.

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

use crate::control::TlsEntry;

/// A fatal `unrecognized_name` alert (RFC 8446 §6), as a plaintext record: sent when the
/// ClientHello names no mapping, before any key exists.
pub const UNRECOGNIZED_NAME_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70];

/// A fatal `access_denied` alert, likewise: sent when the mapping the SNI names does not
/// `allow` the client, before any handshake work (no key share, no certificate signature).
pub const ACCESS_DENIED_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x31];

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("{path}: cannot read certificate chain: {source}")]
    Cert {
        path: String,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path}: no certificate in file")]
    NoCert { path: String },
    #[error("{path}: cannot read private key: {source}")]
    Key {
        path: String,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("certificate and key rejected: {0}")]
    Config(#[source] rustls::Error),
}

/// A ready TLS entry: its server configuration and the suffix that SNI names end with.
#[derive(Debug)]
pub struct TlsEndpoint {
    pub config: Arc<ServerConfig>,
    pub sni_suffix: String,
}

impl TlsEndpoint {
    /// Loads the certificate chain and key of `entry`; TLS 1.2 and 1.3 only.
    pub fn load(entry: &TlsEntry) -> Result<TlsEndpoint, TlsSetupError> {
        let certs = load_certs(&entry.cert)?;
        let key =
            PrivateKeyDer::from_pem_file(&entry.key).map_err(|source| TlsSetupError::Key {
                path: entry.key.display().to_string(),
                source,
            })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(TlsSetupError::Config)?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(TlsSetupError::Config)?;
        // SSH runs inside: no ALPN, no session tickets needed for one long connection.
        config.send_tls13_tickets = 0;
        Ok(TlsEndpoint {
            config: Arc::new(config),
            sni_suffix: entry
                .sni_suffix
                .trim_start_matches('.')
                .to_ascii_lowercase(),
        })
    }

    /// The mapping name an SNI host name asks for: `<name>.<suffix>` → `name`, or `None`
    /// when the name does not end with the suffix.
    pub fn mapping_name<'a>(&self, sni: &'a str) -> Option<&'a str> {
        let lower_ok = sni.len() > self.sni_suffix.len() + 1
            && sni[sni.len() - self.sni_suffix.len()..].eq_ignore_ascii_case(&self.sni_suffix);
        if !lower_ok {
            return None;
        }
        let head = &sni[..sni.len() - self.sni_suffix.len()];
        head.strip_suffix('.').filter(|n| !n.is_empty())
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsSetupError::Cert {
            path: path.display().to_string(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsSetupError::NoCert {
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

/// The form a mapping name takes in a host name: "." may be sent as "-" (one DNS label).
pub fn sni_forms(name: &str) -> [String; 2] {
    [
        name.to_ascii_lowercase(),
        name.replace('.', "-").to_ascii_lowercase(),
    ]
}

/// Adapts a raw socket fd to `io::Read`/`io::Write` for rustls (non-blocking recv/send).
pub struct FdIo(pub std::os::fd::RawFd);

impl io::Read for FdIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        crate::sys::recv(self.0, buf)
    }
}

impl io::Write for FdIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        crate::sys::send(self.0, buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(suffix: &str) -> TlsEndpoint {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(rustls::server::ResolvesServerCertUsingSni::new()));
        TlsEndpoint {
            config: Arc::new(config),
            sni_suffix: suffix.to_string(),
        }
    }

    #[test]
    fn sni_names_map_to_mapping_names() {
        let e = endpoint("ssh.example.net");
        let cases = [
            ("C-123456.ssh.example.net", Some("C-123456")),
            ("c.1.ssh.example.net", Some("c.1")),
            ("C-1.SSH.Example.NET", Some("C-1")),
            ("ssh.example.net", None),
            (".ssh.example.net", None),
            ("C-1.other.net", None),
            ("C-1xssh.example.net", None),
        ];
        for (sni, want) in cases {
            assert_eq!(e.mapping_name(sni), want, "{sni}");
        }
        assert_eq!(
            sni_forms("C.123456"),
            ["c.123456".to_string(), "c-123456".to_string()]
        );
    }
}
