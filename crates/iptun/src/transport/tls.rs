//! TLS for the HTTPS transport and for DNS over TLS or HTTPS to a resolver
//! (rustls with ring, the tree's one crypto backend).
//!
//! Server: a certificate and key from PEM files, or a self-signed Ed25519
//! certificate derived from the server's private key — the same bytes on
//! every start, so the pin clients give (`sha256:` of the certificate) stays
//! valid across restarts. Client: the system's CAs, a CA file, or a pin.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use iptun_proto::crypto::PrivateKey;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

const ALPN_HTTP1: &[u8] = b"http/1.1";
/// HTTP/2, which DNS over HTTPS uses.
pub const ALPN_H2: &[u8] = b"h2";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// `sha256:<hex>` of a DER certificate: what `--tls-pin` takes.
pub fn pin_of(cert: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert);
    format!("sha256:{}", data_encoding::HEXLOWER.encode(digest.as_ref()))
}

/// Parse `sha256:<64 hex digits>`.
pub fn parse_pin(text: &str) -> anyhow::Result<[u8; 32]> {
    text.trim()
        .strip_prefix("sha256:")
        .and_then(|hex| {
            data_encoding::HEXLOWER_PERMISSIVE
                .decode(hex.as_bytes())
                .ok()
        })
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
        .with_context(|| format!("--tls-pin `{text}`: expected sha256:<64 hex digits>"))
}

/// The server's TLS settings and the pin of its certificate.
pub struct ServerTls {
    pub config: Arc<rustls::ServerConfig>,
    pub pin: String,
    pub self_signed: bool,
}

/// TLS for the server: from `cert` and `key` (PEM), or self-signed from
/// `identity` when neither is given.
pub fn server(
    cert: Option<&Path>,
    key: Option<&Path>,
    identity: &PrivateKey,
) -> anyhow::Result<ServerTls> {
    let (chain, key, self_signed) = match (cert, key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                .with_context(|| format!("reading --tls-cert {}", cert.display()))?;
            anyhow::ensure!(
                !chain.is_empty(),
                "--tls-cert {}: no certificate in it",
                cert.display()
            );
            let key = PrivateKeyDer::from_pem_file(key)
                .with_context(|| format!("reading --tls-key {}", key.display()))?;
            (chain, key, false)
        }
        (None, None) => {
            let (cert, key) = self_signed_from(identity)?;
            (vec![cert], key, true)
        }
        _ => anyhow::bail!("--tls-cert and --tls-key go together"),
    };
    let pin = pin_of(&chain[0]);
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the TLS certificate and key do not fit together")?;
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(ServerTls {
        config: Arc::new(config),
        pin,
        self_signed,
    })
}

/// A self-signed Ed25519 certificate whose key is derived from the server's
/// private key; Ed25519 signatures are deterministic, so is the certificate.
fn self_signed_from(
    identity: &PrivateKey,
) -> anyhow::Result<(CertificateDer<'static>, PrivateKeyDer<'static>)> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"iptun tls certificate key v1");
    ctx.update(identity.as_bytes());
    let seed = ctx.finish();
    // PKCS#8 v1 for an Ed25519 seed (RFC 8410): a fixed prefix, the seed.
    let mut pkcs8 = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    pkcs8.extend_from_slice(seed.as_ref());
    let pkcs8 = PrivatePkcs8KeyDer::from(pkcs8);
    let key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_ED25519)
        .context("deriving the TLS key")?;
    let mut params = rcgen::CertificateParams::new(vec!["iptun".to_owned()])
        .context("self-signed certificate")?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "iptun");
    let cert = params
        .self_signed(&key)
        .context("signing the self-signed certificate")?;
    Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(pkcs8)))
}

/// How the client checks the server's certificate.
#[derive(Clone, Debug)]
pub enum Trust {
    /// The system's CA store.
    System,
    /// The CAs in this PEM file.
    CaFile(std::path::PathBuf),
    /// Exactly this certificate (SHA-256 of its DER); no CA, name or date check.
    Pin([u8; 32]),
}

/// The client's TLS settings for the HTTPS transport (HTTP/1.1).
pub fn client(trust: &Trust) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    client_with_alpn(trust, &[ALPN_HTTP1])
}

/// The client's TLS settings offering the protocols `alpn` (none: no ALPN,
/// as DNS over TLS goes).
pub fn client_with_alpn(
    trust: &Trust,
    alpn: &[&[u8]],
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let mut config = match trust {
        Trust::Pin(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier {
                pin: *pin,
                algorithms: provider().signature_verification_algorithms,
            }))
            .with_no_client_auth(),
        Trust::System | Trust::CaFile(_) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = match trust {
                Trust::CaFile(path) => CertificateDer::pem_file_iter(path)
                    .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                    .with_context(|| format!("reading --tls-ca {}", path.display()))?,
                _ => {
                    let found = rustls_native_certs::load_native_certs();
                    if let Some(e) = found.errors.first() {
                        tracing::warn!("system CA store: {e}");
                    }
                    found.certs
                }
            };
            let (added, _) = roots.add_parsable_certificates(certs);
            anyhow::ensure!(
                added > 0,
                "no usable CA certificate (give --tls-ca FILE or --tls-pin)"
            );
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Accepts exactly the pinned certificate, and checks the handshake's
/// signatures with its key.
#[derive(Debug)]
struct PinVerifier {
    pin: [u8; 32],
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let digest = ring::digest::digest(&ring::digest::SHA256, end_entity);
        if digest.as_ref() == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the server's certificate is {}, not the one --tls-pin names",
                pin_of(end_entity)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_certificate_is_stable_per_key() {
        let k = PrivateKey::generate();
        let a = server(None, None, &k).unwrap();
        let b = server(None, None, &k).unwrap();
        assert_eq!(a.pin, b.pin);
        assert!(a.self_signed);
        let other = server(None, None, &PrivateKey::generate()).unwrap();
        assert_ne!(a.pin, other.pin);
        assert_eq!(parse_pin(&a.pin).unwrap().len(), 32);
    }

    #[test]
    fn pins_parse_strictly() {
        assert!(parse_pin(&format!("sha256:{}", "ab".repeat(32))).is_ok());
        for bad in ["", "sha256:", "ab", &format!("sha1:{}", "ab".repeat(32))] {
            assert!(parse_pin(bad).is_err(), "{bad}");
        }
        assert!(parse_pin(&format!("sha256:{}", "zz".repeat(32))).is_err());
    }

    #[test]
    fn cert_without_key_is_an_error() {
        let e = server(Some(Path::new("/x")), None, &PrivateKey::generate());
        assert!(e.err().unwrap().to_string().contains("go together"));
    }
}
