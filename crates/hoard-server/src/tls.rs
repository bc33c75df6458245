//! TLS for both listeners (rustls): `tls_cert_file` + `tls_key_file` serve
//! HTTPS and gRPC over TLS on the same addresses; `tls_ca_file` requires a
//! client certificate signed by that CA (mTLS). [`Tls::reload`] (SIGHUP)
//! reads the files again: new handshakes use the new certificate, open
//! connections keep theirs, and a reload that fails keeps the old one.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Where the certificate, key and (for mTLS) client CA are.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: Option<PathBuf>,
}

/// The server configurations in use, one per protocol (they differ in
/// ALPN: none for the HTTP listener, `h2` for gRPC).
pub struct Tls {
    files: TlsFiles,
    current: parking_lot::RwLock<(Arc<ServerConfig>, Arc<ServerConfig>)>,
}

/// Which listener a handshake is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Grpc,
}

impl Tls {
    /// Reads and checks the files; the error names the file and what is
    /// wrong with it.
    pub fn load(files: TlsFiles) -> Result<Tls, String> {
        let configs = build(&files)?;
        Ok(Tls {
            files,
            current: parking_lot::RwLock::new(configs),
        })
    }

    /// Reads the files again. On error the configuration in use stays.
    pub fn reload(&self) -> Result<(), String> {
        let configs = build(&self.files)?;
        *self.current.write() = configs;
        Ok(())
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.files.ca.is_some()
    }

    /// An acceptor with the configuration in use now.
    pub fn acceptor(&self, p: Protocol) -> tokio_rustls::TlsAcceptor {
        let c = self.current.read();
        tokio_rustls::TlsAcceptor::from(Arc::clone(match p {
            Protocol::Http => &c.0,
            Protocol::Grpc => &c.1,
        }))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn build(files: &TlsFiles) -> Result<(Arc<ServerConfig>, Arc<ServerConfig>), String> {
    let show = |p: &PathBuf| p.display().to_string();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| format!("tls_cert_file {}: {e}", show(&files.cert)))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls_cert_file {}: {e}", show(&files.cert)))?;
    if certs.is_empty() {
        return Err(format!(
            "tls_cert_file {}: no PEM certificate in it",
            show(&files.cert)
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("tls_key_file {}: {e}", show(&files.key)))?;
    let one = |alpn: &[&[u8]]| -> Result<Arc<ServerConfig>, String> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?;
        let builder = match &files.ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                let cas = CertificateDer::pem_file_iter(ca)
                    .map_err(|e| format!("tls_ca_file {}: {e}", show(ca)))?;
                for c in cas {
                    let c = c.map_err(|e| format!("tls_ca_file {}: {e}", show(ca)))?;
                    roots
                        .add(c)
                        .map_err(|e| format!("tls_ca_file {}: {e}", show(ca)))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider(),
                )
                .build()
                .map_err(|e| format!("tls_ca_file {}: {e}", show(ca)))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut c = builder
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(|e| {
                format!(
                    "tls_cert_file {} / tls_key_file {}: {e}",
                    show(&files.cert),
                    show(&files.key)
                )
            })?;
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(c))
    };
    // HTTP offers no ALPN: a client that offers protocols (h2 first, as
    // curl and Java do) falls back to HTTP/1.1 instead of being refused.
    // gRPC needs h2.
    Ok((one(&[])?, one(&[b"h2"])?))
}
