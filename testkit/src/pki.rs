//! Certificates made by the test: a CA and the leaf certificates the shipped
//! mTLS configs and tollgate's TLS tests need, written to a temporary folder.

use std::path::PathBuf;

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// Where `deploy/envoy/envoy-mtls.yaml` reads its certificates from.
pub const MTLS_DIR: &str = "/etc/envoy/tollgate-tls/";

/// The DNS name the shipped mTLS config requires in tollgate's certificate.
pub const TOLLGATE_SAN: &str = "tollgate.tollgate.svc.cluster.local";

/// A CA, a tollgate server certificate for [`TOLLGATE_SAN`] (`server.crt`),
/// an Envoy client certificate (`tls.crt`) and a server certificate for
/// `localhost` (`localhost.crt`), written with their keys and the CA
/// (`ca.crt`) to a temporary directory (removed on drop) under the file names
/// the shipped configs use.
pub struct Pki {
    /// The folder holding the files.
    pub dir: PathBuf,
}

impl Pki {
    /// Makes the certificates; `name` tells the folders of one test apart.
    pub fn new(name: &str) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let dir = crate::process::temp_dir(&format!("pki-{name}"));
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Distinct subject names: BoringSSL (Envoy) rejects a leaf whose
        // subject equals its issuer's, which rcgen's default names produce.
        ca_params.distinguished_name.push(DnType::CommonName, "tollgate test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |san: &str| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(vec![san.to_owned()]).unwrap();
            params.distinguished_name.push(DnType::CommonName, san);
            let cert = params.signed_by(&key, &issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(TOLLGATE_SAN);
        let (client_cert, client_key) = leaf("envoy");
        let (local_cert, local_key) = leaf("localhost");
        for (file, pem) in [
            ("ca.crt", &ca),
            ("tls.crt", &client_cert),
            ("tls.key", &client_key),
            ("server.crt", &server_cert),
            ("server.key", &server_key),
            ("localhost.crt", &local_cert),
            ("localhost.key", &local_key),
        ] {
            std::fs::write(dir.join(file), pem).unwrap();
        }
        Self { dir }
    }

    /// The path of one of the files, e.g. `ca.crt`.
    pub fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file)).unwrap()
    }

    /// An Envoy config with [`MTLS_DIR`] pointed at these files.
    pub fn envoy_config(&self, config: &str) -> String {
        config.replace(MTLS_DIR, &format!("{}/", self.dir.display()))
    }

    /// The `server.tls` block for a tollgate that requires this CA's client certificates.
    pub fn tollgate_tls(&self) -> String {
        format!(
            "server: {{ tls: {{ cert: \"{}\", key: \"{}\", client_ca: \"{}\" }} }}\n",
            self.path("server.crt"),
            self.path("server.key"),
            self.path("ca.crt")
        )
    }

    /// A gRPC client's TLS settings for a server with the `localhost`
    /// certificate: trusting this CA, presenting the client certificate
    /// (`tls.crt`) when `with_client_cert` is set.
    pub fn client_tls(&self, with_client_cert: bool) -> ClientTlsConfig {
        let tls =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(self.read("ca.crt"))).domain_name("localhost");
        if with_client_cert {
            tls.identity(Identity::from_pem(self.read("tls.crt"), self.read("tls.key")))
        } else {
            tls
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
