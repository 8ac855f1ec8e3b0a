//! TLS and mTLS on the gRPC port, with certificates made by the test.

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use tollgate_testkit::pki::Pki;
use tollgate_testkit::{Answer, TestServer, http_check, spec_config, with_jwt};
use tonic::transport::Channel;

/// tollgate on the spec config with TLS on the gRPC port (the `localhost`
/// certificate), requiring client certificates from the CA when `mtls` is set.
fn config(pki: &Pki, mtls: bool) -> String {
    let ca = if mtls { format!(", client_ca: \"{}\"", pki.path("ca.crt")) } else { String::new() };
    let (cert, key) = (pki.path("localhost.crt"), pki.path("localhost.key"));
    spec_config() + &format!("server: {{ tls: {{ cert: \"{cert}\", key: \"{key}\"{ca} }} }}\n")
}

/// A TLS channel to `s` trusting the CA, with the client certificate when asked.
async fn channel(pki: &Pki, s: &TestServer, with_client_cert: bool) -> Result<Channel, tonic::transport::Error> {
    Channel::from_shared(format!("https://{}", s.grpc))
        .unwrap()
        .tls_config(pki.client_tls(with_client_cert))?
        .connect()
        .await
}

async fn check(channel: Channel) -> Result<Answer, tonic::Status> {
    let r =
        AuthorizationClient::new(channel).check(http_check("GET", "/v1/search", &[("x-api-key", "pro-key")])).await?;
    Ok(Answer::of(r.get_ref()))
}

#[tokio::test]
async fn tls_serves_checks_to_clients_that_trust_the_ca() {
    let pki = Pki::new("tls");
    let s = TestServer::start(&config(&pki, false)).await;
    assert!(check(channel(&pki, &s, false).await.unwrap()).await.unwrap().allowed);
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
    let s = TestServer::start(&config(&pki, true)).await;
    assert!(check(channel(&pki, &s, true).await.unwrap()).await.unwrap().allowed);
    let without = match channel(&pki, &s, false).await {
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
    let s = TestServer::start(&config(&pki, true)).await;
    let mut c = AuthorizationClient::new(channel(&pki, &s, true).await.unwrap());
    let a = Answer::of(c.check(forged()).await.unwrap().get_ref());
    assert!(a.allowed, "an mTLS peer (the proxy) may assert identity");
    assert_eq!(a.upstream_headers["x-tollgate-account"], "acct_pro");
    s.stop().await;

    let pki = Pki::new("trust-tls");
    let s = TestServer::start(&config(&pki, false)).await;
    let mut c = AuthorizationClient::new(channel(&pki, &s, false).await.unwrap());
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
