//! TLS for both source connections, following libpq's `sslmode` rules and failing closed.
//!
//! `require` encrypts without checking the certificate (as libpq does when no root
//! certificate is configured); `verify-ca` checks the chain; `verify-full` checks the chain
//! and the host name. A root certificate that cannot be read stops start-up: it never
//! quietly turns into an unverified or plaintext connection.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::dsn::{ConnParams, SslMode};

/// The TLS configuration could not be built. Nothing falls back to plaintext.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read sslrootcert {path}: {message}; fix the path or use sslmode=require")]
    RootCert { path: String, message: String },
    #[error("sslrootcert {path} holds no usable certificate")]
    EmptyRootCert { path: String },
    #[error(
        "the platform certificate store could not be loaded ({0}); set sslrootcert to a CA file"
    )]
    SystemStore(String),
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the rustls client configuration for `params.sslmode`; `None` for `disable`.
pub fn client_config(params: &ConnParams) -> Result<Option<Arc<ClientConfig>>, TlsError> {
    let builder =
        ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let config = match params.sslmode {
        SslMode::Disable => return Ok(None),
        SslMode::Prefer | SslMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(LibpqVerifier {
                chain: None,
                provider: provider(),
            }))
            .with_no_client_auth(),
        SslMode::VerifyCa => {
            let roots = Arc::new(root_store(params.sslrootcert.as_deref())?);
            let chain =
                rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
                    .build()
                    .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(LibpqVerifier {
                    chain: Some(chain),
                    provider: provider(),
                }))
                .with_no_client_auth()
        }
        SslMode::VerifyFull => builder
            .with_root_certificates(root_store(params.sslrootcert.as_deref())?)
            .with_no_client_auth(),
    };
    Ok(Some(Arc::new(config)))
}

fn root_store(sslrootcert: Option<&str>) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    match sslrootcert {
        None | Some("system") => {
            let loaded = rustls_native_certs::load_native_certs();
            if loaded.certs.is_empty() {
                let why = loaded
                    .errors
                    .first()
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "it is empty".into());
                return Err(TlsError::SystemStore(why));
            }
            store.add_parsable_certificates(loaded.certs);
        }
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| TlsError::RootCert {
                    path: path.into(),
                    message: e.to_string(),
                })?;
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(TlsError::EmptyRootCert { path: path.into() });
            }
        }
    }
    Ok(store)
}

/// The server name to present (SNI) and, for verify-full, to check.
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(host.to_string()).map_err(|e| {
        TlsError::Rustls(rustls::Error::General(format!(
            "bad host name `{host}`: {e}"
        )))
    })
}

/// The libpq modes rustls has no built-in verifier for. Without `chain` (`require`,
/// `prefer`): encryption without certificate checks, as libpq does. With `chain`
/// (`verify-ca`): the chain is verified, the host name is not. Handshake signatures are
/// verified in both cases.
#[derive(Debug)]
struct LibpqVerifier {
    chain: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for LibpqVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
