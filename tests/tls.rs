//! TLS and mTLS on the gRPC port, with certificates made by the test.

use std::path::PathBuf;

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tollgate_testkit::{Answer, TestServer, http_check, spec_config, with_jwt};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

struct Pki {
    dir: PathBuf,
    ca: String,
    client_cert: String,
    client_key: String,
}

impl Pki {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("tollgate-tls-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |san: &str| {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(vec![san.to_owned()]).unwrap().signed_by(&key, &issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf("localhost");
        let (client_cert, client_key) = leaf("billing-service");
        for (file, pem) in [("ca.pem", &ca), ("server.pem", &server_cert), ("server.key", &server_key)] {
            std::fs::write(dir.join(file), pem).unwrap();
        }
        Self { dir, ca, client_cert, client_key }
    }

    fn config(&self, mtls: bool) -> String {
        let p = |f: &str| self.dir.join(f).display().to_string();
        let ca = if mtls { format!(", client_ca: \"{}\"", p("ca.pem")) } else { String::new() };
        spec_config()
            + &format!("server: {{ tls: {{ cert: \"{}\", key: \"{}\"{ca} }} }}\n", p("server.pem"), p("server.key"))
    }

    async fn channel(&self, s: &TestServer, with_client_cert: bool) -> Result<Channel, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca)).domain_name("localhost");
        if with_client_cert {
            tls = tls.identity(Identity::from_pem(&self.client_cert, &self.client_key));
        }
        Channel::from_shared(format!("https://{}", s.grpc)).unwrap().tls_config(tls)?.connect().await
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn check(channel: Channel) -> Result<Answer, tonic::Status> {
    let r =
        AuthorizationClient::new(channel).check(http_check("GET", "/v1/search", &[("x-api-key", "pro-key")])).await?;
    Ok(Answer::of(r.get_ref()))
}

#[tokio::test]
async fn tls_serves_checks_to_clients_that_trust_the_ca() {
    let pki = Pki::new("tls");
    let s = TestServer::start(&pki.config(false)).await;
    assert!(check(pki.channel(&s, false).await.unwrap()).await.unwrap().allowed);
    let plain = Channel::from_shared(format!("http://{}", s.grpc)).unwrap().connect().await;
    let plain_failed = match plain {
        Err(_) => true,
        Ok(ch) => check(ch).await.is_err(),
    };
    assert!(plain_failed, "plaintext is refused on a TLS port");
    s.stop().await;
}

#[tokio::test]
async fn mtls_requires_a_client_certificate_from_the_ca() {
    let pki = Pki::new("mtls");
    let s = TestServer::start(&pki.config(true)).await;
    assert!(check(pki.channel(&s, true).await.unwrap()).await.unwrap().allowed);
    let without = match pki.channel(&s, false).await {
        Err(_) => true,
        Ok(ch) => check(ch).await.is_err(),
    };
    assert!(without, "no client certificate, no Check");
    s.stop().await;
}

/// With `trusted_callers: mtls` (the default), a JWT claim in the Check's
/// metadata names the account only when the caller proved itself with a
/// client certificate; over plain TLS the same Check is anonymous.
#[tokio::test]
async fn asserted_identity_is_honoured_only_from_mtls_callers() {
    let forged = || with_jwt(http_check("GET", "/v1/search", &[]), &[("org_id", "acct_pro")]);
    let pki = Pki::new("trust-mtls");
    let s = TestServer::start(&pki.config(true)).await;
    let mut c = AuthorizationClient::new(pki.channel(&s, true).await.unwrap());
    let a = Answer::of(c.check(forged()).await.unwrap().get_ref());
    assert!(a.allowed, "an mTLS peer (the proxy) may assert identity");
    assert_eq!(a.upstream_headers["x-tollgate-account"], "acct_pro");
    s.stop().await;

    let pki = Pki::new("trust-tls");
    let s = TestServer::start(&pki.config(false)).await;
    let mut c = AuthorizationClient::new(pki.channel(&s, false).await.unwrap());
    let a = Answer::of(c.check(forged()).await.unwrap().get_ref());
    assert_eq!((a.http_status, a.code()), (401, "credentials_missing"), "a TLS peer without a certificate may not");
    s.stop().await;
}

#[test]
fn a_missing_certificate_file_is_a_config_error() {
    let yaml = spec_config() + "server: { tls: { cert: /nonexistent/cert.pem, key: /nonexistent/key.pem } }\n";
    let err = tollgate::config::Config::parse(&yaml, "tls.yaml").unwrap_err().to_string();
    assert!(err.contains("server.tls.cert: cannot read \"/nonexistent/cert.pem\""), "{err}");
}
