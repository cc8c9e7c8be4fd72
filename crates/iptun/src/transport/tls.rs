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
            let trusted = certs.iter().map(|c| sha256(c)).collect();
            let (added, _) = roots.add_parsable_certificates(certs);
            anyhow::ensure!(
                added > 0,
                "no usable CA certificate (give --tls-ca FILE or --tls-pin)"
            );
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .context("the TLS trust store")?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(StoreVerifier { webpki, trusted }))
                .with_no_client_auth()
        }
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

fn sha256(der: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest.as_ref().try_into().expect("32 bytes")
}

/// Checks the server's certificate against the trust store (webpki), and
/// also accepts a certificate that is itself in the store, byte for byte,
/// as curl and browsers do: `openssl req -x509` makes certificates that are
/// a CA and their own leaf at once, which webpki refuses as a leaf. Any
/// other refusal says what failed and how to get past it.
#[derive(Debug)]
struct StoreVerifier {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    /// SHA-256 of every certificate in the store.
    trusted: Vec<[u8; 32]>,
}

impl ServerCertVerifier for StoreVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verdict = self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        match verdict {
            Ok(v) => Ok(v),
            Err(_) if self.trusted.contains(&sha256(end_entity)) => {
                Ok(ServerCertVerified::assertion())
            }
            Err(rustls::Error::InvalidCertificate(why)) => Err(rustls::Error::General(format!(
                "the server's certificate ({}) is not trusted: {}; give --tls-ca FILE with the CA \
                 that signed it, or --tls-pin {} to accept exactly this certificate",
                pin_of(end_entity),
                explain_certificate(&why),
                pin_of(end_entity),
            ))),
            Err(e) => Err(e),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// Why a certificate was refused, in words.
fn explain_certificate(why: &rustls::CertificateError) -> String {
    use rustls::CertificateError as E;
    match why {
        E::UnknownIssuer => "no trusted CA signed it".into(),
        E::Expired | E::ExpiredContext { .. } => "it has expired".into(),
        E::NotValidYet | E::NotValidYetContext { .. } => "it is not valid yet".into(),
        E::NotValidForName | E::NotValidForNameContext { .. } => {
            "it is not for the host name in the URL".into()
        }
        E::Revoked => "it was revoked".into(),
        E::BadSignature => "its signature does not verify".into(),
        // webpki's own reasons come as `Other`, named only by their Debug form.
        other if format!("{other:?}").contains("CaUsedAsEndEntity") => {
            "it is a CA's certificate, not a server's, and not itself in the trust store".into()
        }
        other => format!("{other:?}"),
    }
}

/// A TLS handshake's failure as one sentence: the verifiers' own words, or
/// what the server said.
pub fn explain(e: &std::io::Error) -> String {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::General(why)) => why.clone(),
        Some(rustls::Error::InvalidCertificate(why)) => {
            format!(
                "the server's certificate is not trusted: {}",
                explain_certificate(why)
            )
        }
        Some(rustls::Error::AlertReceived(alert)) => {
            format!("the server refused the TLS handshake ({alert:?})")
        }
        Some(other) => format!("TLS failed: {other}"),
        None => format!("TLS failed: {e}"),
    }
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

    /// A certificate made as `openssl req -x509` makes them: a CA that is
    /// its own leaf, for 127.0.0.1 (or a plain self-signed leaf).
    fn self_signed(ca: bool) -> CertificateDer<'static> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::IpAddress([127, 0, 0, 1].into())];
        if ca {
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        }
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    fn verify(
        trust: CertificateDer<'static>,
        presented: &CertificateDer<'_>,
    ) -> Result<(), String> {
        let mut roots = rustls::RootCertStore::empty();
        let trusted = vec![sha256(&trust)];
        roots.add(trust).unwrap();
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .unwrap();
        let v = StoreVerifier { webpki, trusted };
        let name = ServerName::try_from("127.0.0.1").unwrap();
        v.verify_server_cert(presented, &[], &name, &[], UnixTime::now())
            .map(drop)
            .map_err(|e| match e {
                rustls::Error::General(why) => why,
                other => format!("{other:?}"),
            })
    }

    #[test]
    fn a_trusted_self_signed_ca_certificate_is_accepted_as_the_leaf() {
        let cert = self_signed(true);
        assert_eq!(verify(cert.clone(), &cert), Ok(()));
    }

    #[test]
    fn an_untrusted_certificate_is_refused_with_its_pin_and_what_to_do() {
        let cert = self_signed(false);
        let why = verify(self_signed(true), &cert).unwrap_err();
        assert!(why.contains(&pin_of(&cert)), "{why}");
        assert!(
            why.contains("--tls-ca") && why.contains("--tls-pin"),
            "{why}"
        );
        assert!(why.contains("is not trusted: "), "{why}");
        let ca = self_signed(true);
        let why = verify(self_signed(true), &ca).unwrap_err();
        assert!(why.contains("a CA's certificate, not a server's"), "{why}");
    }

    #[test]
    fn cert_without_key_is_an_error() {
        let e = server(Some(Path::new("/x")), None, &PrivateKey::generate());
        assert!(e.err().unwrap().to_string().contains("go together"));
    }
}
