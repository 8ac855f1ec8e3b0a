//! Calls tollgate makes to other services (the events sink, an x402
//! facilitator): one kind of pooled HTTP(S) client, trusting the system's roots.
//!
//! May use: nothing of ours.

use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A pooled HTTP/1.1 client for http and https URLs.
pub type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// An HTTP(S) client trusting the system's roots (none found: https fails
/// at the handshake, http works); `None` if no TLS config can be made at all.
pub fn https_client() -> Option<HttpsClient> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = match hyper_rustls::HttpsConnectorBuilder::new().with_provider_and_native_roots(provider.clone()) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "no system TLS roots: https calls will fail");
            let tls = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| tracing::error!(error = %e, "no TLS config: outbound calls cannot be made"))
                .ok()?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls)
        }
    };
    Some(Client::builder(TokioExecutor::new()).build(builder.https_or_http().enable_http1().build()))
}
