//! Running tollgate as operators do: the real binary reloading on SIGHUP and
//! on file change, draining on SIGTERM with a Check in flight, and a
//! Prometheus scrape that parses.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use tollgate::reload::Reloader;
use tollgate_testkit::process::TollgateProcess;
use tollgate_testkit::redis::RedisServer;
use tollgate_testkit::{Answer, TestServer, eventually, http_check, http_get, spec_config};

/// The tollgate binary on a config file that tests rewrite; killed on drop.
struct Binary(TollgateProcess);

impl std::ops::Deref for Binary {
    type Target = TollgateProcess;
    fn deref(&self) -> &TollgateProcess {
        &self.0
    }
}

impl std::ops::DerefMut for Binary {
    fn deref_mut(&mut self) -> &mut TollgateProcess {
        &mut self.0
    }
}

impl Binary {
    fn config(grpc: SocketAddr, http: SocketAddr, body: &str) -> String {
        format!(
            "server: {{ grpc_listen: \"{grpc}\", http_listen: \"{http}\", drain_delay: 1s, drain_timeout: 10s, watch_config: true }}\n{body}"
        )
    }

    async fn start(body: &str) -> Self {
        let bin = env!("CARGO_BIN_EXE_tollgate");
        Self(TollgateProcess::start(bin, &["--log-format", "json"], |g, h| Self::config(g, h, body)).await)
    }

    fn rewrite(&self, body: &str) {
        std::fs::write(&self.file, Self::config(self.grpc, self.http, body)).unwrap();
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill {sig}");
    }

    async fn check(&self, key: &str) -> Answer {
        let mut c = AuthorizationClient::connect(format!("http://{}", self.grpc)).await.unwrap();
        Answer::of(c.check(http_check("GET", "/v1/search", &[("x-api-key", key)])).await.unwrap().get_ref())
    }

    async fn metric(&self, line_start: &str) -> Option<f64> {
        let (_, _, body) = http_get(self.http, "/metrics").await.ok()?;
        body.lines().find(|l| l.starts_with(line_start)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }
}

#[tokio::test]
async fn sighup_swaps_in_a_valid_config_and_keeps_the_old_on_error() {
    let b = Binary::start(&spec_config()).await;
    assert_eq!(b.check("pro-key").await.upstream_headers["x-tollgate-plan"], "pro");

    // The route table changes: /v1/search is gone, so it is unmatched (403).
    let without_search = spec_config().replace(
        "  - { match: { path_prefix: /v1/search, methods: [GET] }, feature: search, meter: requests, cost: 1 }\n",
        "",
    );
    b.rewrite(&without_search);
    b.signal("-HUP");
    eventually("the reload", Duration::from_secs(10), async || {
        b.metric("tollgate_config_reloads_total{result=\"ok\"}").await >= Some(1.0)
    })
    .await;
    assert_eq!(b.check("pro-key").await.code(), "route_not_allowed");

    b.rewrite("plans: { free: { quotas: [ { meter: requests, limit: 0, period: month } ] } }\n");
    b.signal("-HUP");
    eventually("the rejected reload", Duration::from_secs(10), async || {
        b.metric("tollgate_config_reloads_total{result=\"error\"}").await >= Some(1.0)
    })
    .await;
    assert_eq!(b.check("pro-key").await.code(), "route_not_allowed", "the previous config stays in force");
}

#[tokio::test]
async fn a_watched_config_file_reloads_when_it_changes() {
    let b = Binary::start(&spec_config()).await;
    b.rewrite(&spec_config().replace(
        "{ id: acct_banned, plan: pro, api_keys: [banned-key], blocked: true }",
        "{ id: acct_banned, plan: pro, api_keys: [banned-key] }",
    ));
    eventually("the file watch reload", Duration::from_secs(10), async || {
        b.metric("tollgate_config_reloads_total{result=\"ok\"}").await >= Some(1.0)
    })
    .await;
}

#[tokio::test]
async fn sigterm_drains_an_in_flight_check_and_exits_zero() {
    let redis = RedisServer::start();
    let yaml = spec_config() + &format!("store: {{ backend: redis, url: \"{}\", timeout: 5s }}\n", redis.url());
    let seed = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["seed", "--redis-url", &redis.url()])
        .arg("--config")
        .arg({
            let f = std::env::temp_dir().join(format!("tollgate-seed-drain-{}.yaml", std::process::id()));
            std::fs::write(&f, &yaml).unwrap();
            f
        })
        .output()
        .unwrap();
    assert!(seed.status.success(), "{}", String::from_utf8_lossy(&seed.stderr));
    let mut b = Binary::start(&yaml).await;
    assert!(b.check("pro-key").await.allowed, "warm: key and account cached");

    // Redis stalls for 2 s: the next Check's spend waits on it, in flight.
    let mut sleep = redis.cli_command();
    sleep.args(["DEBUG", "SLEEP", "2"]);
    let stall = std::thread::spawn(move || sleep.output().unwrap());
    std::thread::sleep(Duration::from_millis(200));
    let grpc = b.grpc;
    let in_flight = tokio::spawn(async move {
        let mut c = AuthorizationClient::connect(format!("http://{grpc}")).await.unwrap();
        c.check(http_check("GET", "/v1/search", &[("x-api-key", "pro-key")])).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    b.signal("-TERM");
    // Not ready during the drain delay, while the Check is still waiting.
    eventually("readiness to drop", Duration::from_secs(10), async || {
        http_get(b.http, "/readyz").await.map(|r| r.0).unwrap_or(503) == 503
    })
    .await;
    let answer = in_flight.await.unwrap().expect("the in-flight Check is answered");
    assert!(Answer::of(answer.get_ref()).allowed);
    let status = loop {
        if let Some(s) = b.child.try_wait().unwrap() {
            break s;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "did not exit within the drain deadline");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
    stall.join().unwrap();
}

#[tokio::test]
async fn metrics_scrape_parses_as_openmetrics() {
    let s = TestServer::start(&spec_config()).await;
    s.check(http_check("GET", "/v1/search", &[("x-api-key", "pro-key")])).await;
    s.check(http_check("GET", "/v1/search", &[])).await;
    let reloader = Reloader::new(None, None, s.handle.authorizer.clone());
    reloader.reload().unwrap();
    let (status, head, body) = http_get(s.http, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    assert!(head.to_ascii_lowercase().contains("application/openmetrics-text; version=1.0.0"), "{head}");
    assert_eq!(body.lines().last(), Some("# EOF"));
    let mut types = std::collections::HashMap::new();
    let mut samples = Vec::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            types.insert(name.to_owned(), kind.to_owned());
        } else if line.starts_with("# HELP ") || line == "# EOF" {
        } else {
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line {line:?}"));
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
            let name = series.split('{').next().unwrap();
            if let Some(labels) = series.strip_prefix(name) {
                assert!(labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')), "{line}");
            }
            samples.push((name.to_owned(), series.to_owned(), value));
        }
    }
    for (name, kind) in [
        ("tollgate_decisions", "counter"),
        ("tollgate_check_duration_seconds", "histogram"),
        ("tollgate_cache_requests", "counter"),
        ("tollgate_cache_hit_ratio", "gauge"),
        ("tollgate_store_duration_seconds", "histogram"),
        ("tollgate_store_errors", "counter"),
        ("tollgate_config_reloads", "counter"),
    ] {
        assert_eq!(types.get(name).map(String::as_str), Some(kind), "{name}");
    }
    let value = |series: &str| samples.iter().find(|(_, s, _)| s == series).map(|(_, _, v)| *v);
    assert_eq!(value("tollgate_decisions_total{status=\"200\",code=\"allowed\"}"), Some(1.0));
    assert_eq!(value("tollgate_decisions_total{status=\"401\",code=\"credentials_missing\"}"), Some(1.0));
    assert_eq!(value("tollgate_check_duration_seconds_count"), Some(2.0));
    assert_eq!(value("tollgate_config_reloads_total{result=\"ok\"}"), Some(1.0));
    assert!(value("tollgate_store_duration_seconds_count").is_some_and(|n| n >= 2.0));
    s.stop().await;
}
