//! Charging on the response, end to end: a real Envoy with the shipped
//! access-log config streams each charged request's entry to tollgate, which
//! refunds responses outside `billing.charge_on` and charges what a route's
//! `cost_from_response` header reports, once per charge id — on the memory
//! store and on Redis, across a restart of tollgate, and against entries
//! replayed, forged or garbled by a caller of the gRPC port.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::data::accesslog::v3::{HttpAccessLogEntry, HttpRequestProperties};
use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_client::AccessLogServiceClient;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::{
    HttpAccessLogEntries, LogEntries, TcpAccessLogEntries,
};
use prost::Message as _;
use tollgate::entitlement::Period;
use tollgate::store::Store;
use tollgate_testkit::accesslog::{charge_of, entry, stream};
use tollgate_testkit::check::http_check;
use tollgate_testkit::envoy::{self, Options, Stack};
use tollgate_testkit::http::{http_get, metric};
use tollgate_testkit::process::temp_dir;
use tollgate_testkit::raw::{self, Raw};
use tollgate_testkit::redis::RedisServer;
use tollgate_testkit::{TestServer, eventually};

const CONFIG: &str = r#"
billing:
  portal_url: "https://billing.example.com/accounts/{account}/billing"
  charge_on: [2xx, 3xx, 4xx]
identity:
  - api_key: { header: x-api-key }
plans:
  metered:
    features: [search, ai]
    quotas:
      - { meter: requests, limit: 1000, period: month }
      - { meter: tokens, limit: 1000000, period: day }
  payg:
    features: [search]
    prepaid: true
routes:
  - { match: { path_prefix: /v1/search }, feature: search, meter: requests, cost: 1 }
  - { match: { path_prefix: /v1/ai }, feature: ai, meter: tokens, cost: 100, cost_from_response: x-usage-tokens }
default: deny
accounts:
  - { id: acct_m, plan: metered, api_keys: [m-key] }
  - { id: acct_w, plan: payg, api_keys: [w-key], credits: 1000 }
"#;

fn yaml(store: &str) -> String {
    format!("{CONFIG}store: {store}\n")
}

/// Envoy on the shipped config (over the HTTP door `door` when given: the
/// charge then rides in `x-tollgate-charge`), plus a file access log of each
/// request's status and charge (what the test replays later).
fn envoy_config(
    tollgate: std::net::SocketAddr,
    door: Option<std::net::SocketAddr>,
    upstream: std::net::SocketAddr,
    capture: &std::path::Path,
) -> String {
    let (c, key) = match door {
        Some(door) => (envoy::http_door_config(tollgate, door, upstream, Options::default()), "x-tollgate-charge"),
        None => (envoy::config(tollgate, upstream, Options::default()), "charge"),
    };
    assert!(c.contains("envoy.access_loggers.http_grpc"), "the shipped config streams access logs to tollgate");
    let file = format!(
        r#"                  - name: envoy.access_loggers.file
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
                      path: {}
                      log_format:
                        json_format:
                          code: "%RESPONSE_CODE%"
                          charge: "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:{key})%"
"#,
        capture.display()
    );
    c.replacen("                access_log:\n", &format!("                access_log:\n{file}"), 1)
}

struct Run {
    stack: Stack,
    capture: PathBuf,
    yaml: String,
    /// The memory store, kept across a restart; `None` on Redis.
    memory: Option<Arc<dyn Store>>,
    _redis: Option<RedisServer>,
}

async fn run(redis: bool) -> Run {
    run_through(redis, false).await
}

/// [`run`], with Envoy asking over gRPC or (`http_door`) over HTTP.
async fn run_through(redis: bool, http_door: bool) -> Run {
    let server = redis.then(RedisServer::start);
    let mut yaml = match &server {
        Some(r) => yaml(&format!("{{ backend: redis, url: \"{}\" }}", r.url())),
        None => yaml("{ backend: memory }"),
    };
    let door = http_door.then(tollgate_testkit::process::free_addr);
    if let Some(door) = door {
        yaml += &format!("server: {{ authz_http_listen: \"{door}\" }}\n");
    }
    let tollgate = TestServer::start_configured(&yaml, true).await;
    let memory = (!redis).then(|| tollgate.store.clone());
    let capture = temp_dir("capture").join("access.log");
    let path = capture.clone();
    let stack = Stack::around(tollgate, move |t, u| envoy_config(t, door, u, &path)).await;
    stack.envoy.wait_cluster_healthy("tollgate").await;
    Run { stack, capture, yaml, memory, _redis: server }
}

impl Run {
    /// Units used in the current window of `meter`'s `period` quota.
    async fn used(&self, account: &str, meter: &str, period: Period) -> u64 {
        tollgate_testkit::used(self.stack.tollgate.store.as_ref(), account, meter, period).await
    }

    async fn credits(&self, account: &str) -> u64 {
        self.stack.tollgate.store.credits(account).await.unwrap()
    }

    async fn wait_used(&self, account: &str, meter: &str, period: Period, want: u64) {
        let mut last = 0;
        let what = format!("{account} {meter} settles at {want}");
        eventually(&what, Duration::from_secs(15), async || {
            last = self.used(account, meter, period).await;
            last == want
        })
        .await;
    }

    async fn metric(&self, line_start: &str) -> f64 {
        metric(self.stack.tollgate.http, line_start).await
    }

    /// Every charge Envoy logged, as (status, the charge).
    fn captured(&self) -> Vec<(u32, String)> {
        let text = std::fs::read_to_string(&self.capture).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| Some((v["code"].as_u64()? as u32, v["charge"].as_str()?.to_owned())))
            .collect()
    }

    /// 100 requests of `account` to `path`, every one with `i % 10 < 3` answered 503 by the upstream.
    async fn hundred_with_thirty_failing(&self, key: &str, path: &str) {
        for i in 0..100 {
            let failing = i % 10 < 3;
            let mut h = vec![("x-api-key", key)];
            if failing {
                h.push(("x-test-status", "503"));
            }
            let r = self.stack.get(path, &h).await;
            assert_eq!(r.status, if failing { 503 } else { 200 }, "{r:?}");
        }
    }
}

async fn failed_requests_are_refunded(redis: bool) {
    refunded(run(redis).await).await;
}

async fn refunded(r: Run) {
    r.hundred_with_thirty_failing("m-key", "/v1/search").await;
    r.hundred_with_thirty_failing("w-key", "/v1/search").await;
    r.wait_used("acct_m", "requests", Period::Month, 70).await;
    let what = "acct_w's 30 failed requests are refunded";
    eventually(what, Duration::from_secs(15), async || r.credits("acct_w").await == 930).await;
    let what = "all 200 entries are settled";
    eventually(what, Duration::from_secs(10), async || {
        r.metric("tollgate_settlements_total{result=\"unchanged\"}").await == 140.0
    })
    .await;
    assert_eq!(r.metric("tollgate_settlements_total{result=\"applied\"}").await, 60.0);
    assert_eq!(r.metric("tollgate_settlement_units_total{kind=\"refunded\"}").await, 60.0);
    r.stack.stop().await;
}

#[tokio::test]
async fn failed_requests_are_refunded_through_envoy_on_memory() {
    failed_requests_are_refunded(false).await;
}

#[tokio::test]
async fn failed_requests_are_refunded_through_envoy_on_redis() {
    failed_requests_are_refunded(true).await;
}

async fn reported_tokens_are_charged(redis: bool) {
    charged(run(redis).await).await;
}

async fn charged(r: Run) {
    let mut want = 0;
    for i in 0..20u64 {
        // Some below the reservation of 100, some above it (an overage).
        let tokens = (i * 37).to_string();
        let resp = r.stack.get("/v1/ai/complete", &[("x-api-key", "m-key"), ("x-test-usage-tokens", &tokens)]).await;
        assert_eq!((resp.status, resp.header("x-usage-tokens")), (200, Some(tokens.as_str())), "{resp:?}");
        want += i * 37;
    }
    // No header: the reservation stands. A failed response costs nothing, whatever it reports.
    assert_eq!(r.stack.get("/v1/ai/complete", &[("x-api-key", "m-key")]).await.status, 200);
    let failed = [("x-api-key", "m-key"), ("x-test-usage-tokens", "999"), ("x-test-status", "503")];
    assert_eq!(r.stack.get("/v1/ai/complete", &failed).await.status, 503);
    want += 100;
    // Garbage and negative counts are refused (counted, not applied): the reservation stands.
    for bad in ["lots", "-5"] {
        assert_eq!(
            r.stack.get("/v1/ai/complete", &[("x-api-key", "m-key"), ("x-test-usage-tokens", bad)]).await.status,
            200
        );
        want += 100;
    }
    r.wait_used("acct_m", "tokens", Period::Day, want).await;
    assert_eq!(r.metric("tollgate_settlement_bad_entries_total{reason=\"cost_header\"}").await, 2.0);
    assert!(r.metric("tollgate_settlement_units_total{kind=\"overage\"}").await > 0.0);
    r.stack.stop().await;
}

/// Over Envoy's HTTP ext_authz and the HTTP door the same charge rides in
/// `x-tollgate-charge`, which Envoy makes metadata (never an upstream header):
/// a Check spends the same whichever door it came through.
#[tokio::test]
async fn over_envoy_s_http_ext_authz_failed_requests_are_refunded_and_tokens_charged() {
    refunded(run_through(true, true).await).await;
    let r = run_through(false, true).await;
    let seen = r.stack.get("/v1/search", &[("x-api-key", "m-key")]).await;
    assert!(seen.json()["headers"].get("x-tollgate-charge").is_none(), "{seen:?}");
    assert!(seen.header("x-tollgate-charge").is_none(), "{seen:?}");
    charged(r).await;
}

#[tokio::test]
async fn reported_tokens_are_charged_exactly_on_memory() {
    reported_tokens_are_charged(false).await;
}

#[tokio::test]
async fn reported_tokens_are_charged_exactly_on_redis() {
    reported_tokens_are_charged(true).await;
}

async fn restart_and_replays_refund_nothing_twice(redis: bool) {
    let mut r = run(redis).await;
    let batch = async |r: &Run| {
        for i in 0..20 {
            let mut h = vec![("x-api-key", "m-key")];
            if i % 10 < 3 {
                h.push(("x-test-status", "503"));
            }
            r.stack.get("/v1/search", &h).await;
        }
    };
    batch(&r).await;
    r.wait_used("acct_m", "requests", Period::Month, 14).await;
    // tollgate restarts; Envoy reconnects its access-log stream to the new one.
    let Stack { tollgate, envoy } = r.stack;
    let tollgate = tollgate.restart(&r.yaml, r.memory.clone()).await;
    r.stack = Stack { tollgate, envoy };
    r.stack.envoy.wait_cluster_healthy("tollgate").await;
    batch(&r).await;
    r.wait_used("acct_m", "requests", Period::Month, 28).await;
    // Every entry Envoy logged, replayed twice, each now claiming a failure.
    // (Envoy flushes its file log every second.)
    eventually("Envoy logs every charged request", Duration::from_secs(10), async || r.captured().len() == 40).await;
    let captured = r.captured();
    assert_eq!(captured.iter().filter(|(code, _)| *code == 503).count(), 12);
    let replay: Vec<_> = captured.iter().map(|(_, c)| entry(503, c, &[])).collect();
    stream(r.stack.tollgate.grpc, replay.clone()).await;
    stream(r.stack.tollgate.grpc, replay).await;
    let what = "the replays are seen as duplicates";
    eventually(what, Duration::from_secs(10), async || {
        r.metric("tollgate_settlements_total{result=\"duplicate\"}").await == 80.0
    })
    .await;
    assert_eq!(r.used("acct_m", "requests", Period::Month).await, 28, "nothing was refunded twice");
    r.stack.stop().await;
}

#[tokio::test]
async fn a_restart_and_replayed_entries_refund_nothing_twice_on_memory() {
    restart_and_replays_refund_nothing_twice(false).await;
}

#[tokio::test]
async fn a_restart_and_replayed_entries_refund_nothing_twice_on_redis() {
    restart_and_replays_refund_nothing_twice(true).await;
}

/// A caller of the gRPC port cannot refund what tollgate did not charge:
/// forged, altered and garbled entries are counted and never applied.
#[tokio::test]
async fn forged_and_garbled_entries_are_counted_never_applied() {
    let server = TestServer::start(CONFIG).await;
    let charge_of =
        async |path: &str| charge_of(&server.check(http_check("GET", path, &[("x-api-key", "m-key")])).await);
    let search = charge_of("/v1/search").await;
    let ai = charge_of("/v1/ai").await;
    let used = async |meter: &str, period| tollgate_testkit::used(server.store.as_ref(), "acct_m", meter, period).await;
    assert_eq!((used("requests", Period::Month).await, used("tokens", Period::Day).await), (1, 100));

    // Fields: 1|id|account|issued|meter|periods|cost|credits|header|sig.
    let altered = |field: usize, value: &str| {
        let mut f: Vec<&str> = search.split('|').collect();
        f[field] = value;
        f.join("|")
    };
    let unsigned = search.rsplit_once('|').unwrap().0.to_owned();
    let mut entries = vec![
        // A bigger refund, another account, another meter: the signature no longer verifies.
        entry(503, &altered(6, "1000"), &[]),
        entry(503, &altered(2, "acct_w"), &[]),
        entry(503, &altered(4, "tokens"), &[]),
        entry(503, &altered(1, "ffff-1"), &[]),
        entry(503, &altered(9, &"0".repeat(32)), &[]),
        entry(503, "not a charge", &[]),
        entry(503, &unsigned, &[]),
        // Garbled costs on the token route.
        entry(200, &ai, &[("x-usage-tokens", "-5")]),
        entry(200, &ai, &[("x-usage-tokens", "1e9")]),
        entry(200, &ai, &[("x-usage-tokens", "99999999999")]),
    ];
    // No charge at all (a public route, a denial): skipped, not counted.
    entries.push(HttpAccessLogEntry::default());
    stream(server.grpc, entries).await;
    // A TCP entry on its own message: skipped.
    let mut client = AccessLogServiceClient::new(server.channel().await);
    let tcp = StreamAccessLogsMessage {
        identifier: None,
        log_entries: Some(LogEntries::TcpLogs(TcpAccessLogEntries { log_entry: vec![Default::default()] })),
    };
    client.stream_access_logs(tokio_stream::iter([tcp])).await.unwrap();

    let metrics = async || http_get(server.http, "/metrics").await.unwrap().2;
    let m = metrics().await;
    for line in [
        "tollgate_settlement_bad_entries_total{reason=\"signature\"} 6",
        "tollgate_settlement_bad_entries_total{reason=\"malformed\"} 1",
        "tollgate_settlement_bad_entries_total{reason=\"cost_header\"} 3",
        "tollgate_settlements_total{result=\"bad\"} 10",
        "tollgate_settlements_total{result=\"applied\"} 0",
    ] {
        assert!(m.contains(line), "missing {line} in\n{m}");
    }
    assert_eq!((used("requests", Period::Month).await, used("tokens", Period::Day).await), (1, 100), "nothing applied");

    // The real entry refunds, once.
    stream(server.grpc, vec![entry(503, &search, &[]), entry(503, &search, &[])]).await;
    assert_eq!(used("requests", Period::Month).await, 0);
    let m = metrics().await;
    assert!(m.contains("tollgate_settlements_total{result=\"applied\"} 1"), "{m}");
    assert!(m.contains("tollgate_settlements_total{result=\"duplicate\"} 1"), "{m}");
    server.stop().await;
}

/// An entry settles whatever else its message holds: a string that is not
/// UTF-8 where settlement does not read (prost's type refused the whole
/// message for it, ending the stream and losing every entry on it) and
/// 100,000 empty entries (which prost's type took ~185 MB to decode); the
/// stream goes on to the next message.
#[tokio::test]
async fn an_entry_settles_whatever_else_its_message_holds() {
    let server = TestServer::start(CONFIG).await;
    let check = async || charge_of(&server.check(http_check("GET", "/v1/search", &[("x-api-key", "m-key")])).await);
    let (first, second) = (check().await, check().await);
    let used = async || tollgate_testkit::used(server.store.as_ref(), "acct_m", "requests", Period::Month).await;
    assert_eq!(used().await, 2);
    let message = |entries| {
        let http = HttpAccessLogEntries { log_entry: entries };
        StreamAccessLogsMessage { identifier: None, log_entries: Some(LogEntries::HttpLogs(http)) }.encode_to_vec()
    };
    let mut real = entry(503, &first, &[]);
    real.request = Some(HttpRequestProperties { path: "/v1/search".into(), ..Default::default() });
    let mut entries = vec![HttpAccessLogEntry::default(); 100_000];
    entries.push(real);
    let mut garbled = message(entries);
    let at = garbled.windows(10).position(|w| w == b"/v1/search").unwrap();
    garbled[at + 6] = 0xff;
    assert!(StreamAccessLogsMessage::decode(&*garbled).is_err(), "not a message prost reads");

    let path = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs";
    let messages = vec![Raw(garbled), Raw(message(vec![entry(503, &second, &[])]))];
    raw::client_streaming(server.channel().await, path, messages).await.expect("the stream ends OK");
    assert_eq!(used().await, 0, "both refunded");
    let m = http_get(server.http, "/metrics").await.unwrap().2;
    assert!(m.contains("tollgate_settlements_total{result=\"applied\"} 2"), "{m}");
    server.stop().await;
}

/// Access-log streams live as long as Envoy keeps them, in a pool of their
/// own: however many proxies stream to a replica, Checks still get their
/// slots; streams beyond the pool are refused at once.
#[tokio::test]
async fn access_log_streams_never_take_the_slots_checks_need() {
    let yaml = format!("{CONFIG}server: {{ limits: {{ max_inflight_requests: 4, request_timeout: 1s }} }}\n");
    let server = TestServer::start(&yaml).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut client = AccessLogServiceClient::new(server.channel().await);
        held.push(tokio::spawn(async move {
            client.stream_access_logs(tokio_stream::pending::<StreamAccessLogsMessage>()).await
        }));
    }
    // Past request_timeout: the streams are not cut by it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(held.iter().all(|h| !h.is_finished()), "the streams live on");
    let mut client = AccessLogServiceClient::new(server.channel().await);
    let refused = client.stream_access_logs(tokio_stream::pending::<StreamAccessLogsMessage>()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    let r = server.check(http_check("GET", "/v1/search", &[("x-api-key", "m-key")])).await;
    assert_eq!(r.status.map(|s| s.code), Some(0), "a Check is served while every stream slot is taken");
    for h in held {
        h.abort();
    }
    server.stop().await;
}

/// The signing key lost from Redis (a failover before it replicated, a
/// flush): a replica that starts afterwards makes a new one; charges signed
/// with the old key are refused there (counted, never applied), the old
/// replica takes the new key when it reads it again and still verifies its
/// old charges with the previous one.
#[tokio::test]
async fn a_lost_signing_key_is_replaced_and_old_charges_still_settle_where_they_were_made() {
    let redis = RedisServer::start();
    let yaml = yaml(&format!("{{ backend: redis, url: \"{}\" }}", redis.url()));
    let r1 = TestServer::start_configured(&yaml, true).await;
    let charge =
        async |s: &TestServer| charge_of(&s.check(http_check("GET", "/v1/search", &[("x-api-key", "m-key")])).await);
    let old = charge(&r1).await;
    assert!(redis.cli(&["DEL", "tollgate:charge-key"]).is_some());
    let r2 = TestServer::start_configured(&yaml, false).await;
    stream(r2.grpc, vec![entry(503, &old, &[])]).await;
    assert_eq!(metric(r2.http, "tollgate_settlement_bad_entries_total{reason=\"signature\"}").await, 1.0);
    // r1 reads the key again (every minute; here at once): new charges verify on r2 ...
    r1.handle.authorizer.refresh_charge_key(Duration::from_secs(1)).await.unwrap();
    let new = charge(&r1).await;
    stream(r2.grpc, vec![entry(503, &new, &[])]).await;
    assert_eq!(metric(r2.http, "tollgate_settlements_total{result=\"applied\"}").await, 1.0);
    // ... and r1 still settles what it signed with the old key.
    stream(r1.grpc, vec![entry(503, &old, &[])]).await;
    assert_eq!(metric(r1.http, "tollgate_settlements_total{result=\"applied\"}").await, 1.0);
    r1.stop().await;
    r2.stop().await;
}

/// A shadowed Check on a prepaid plan takes no credits, so settling it must
/// move none: a refunded (5xx) or costlier response changes quota units only,
/// never the balance (no credits minted from a dry run).
#[tokio::test]
async fn settling_a_shadowed_charge_never_moves_credits() {
    let yaml = CONFIG.replace("    prepaid: true\n", "    prepaid: true\n    shadow: true\n").replace(
        "{ meter: requests, limit: 1000, period: month }\n",
        "{ meter: requests, limit: 1000, period: month }\n  payg_q:\n    features: [search]\n    prepaid: true\n    shadow: true\n    quotas:\n      - { meter: requests, limit: 1000, period: month }\n",
    ) + "  - { id: acct_q, plan: payg_q, api_keys: [q-key], credits: 1000 }\n";
    let server = TestServer::start(&yaml).await;
    let check = async |key: &str| server.check(http_check("GET", "/v1/search", &[("x-api-key", key)])).await;
    let credits = async |id: &str| server.store.credits(id).await.unwrap();
    let (w, q) = (charge_of(&check("w-key").await), charge_of(&check("q-key").await));
    assert_eq!((credits("acct_w").await, credits("acct_q").await), (1000, 1000), "shadow mode took no credits");
    let fields = |c: &str| c.split('|').nth(7).map(str::to_owned);
    assert_eq!((fields(&w).as_deref(), fields(&q).as_deref()), (Some("0"), Some("0")), "charges carry no credits");
    stream(server.grpc, vec![entry(503, &w, &[]), entry(503, &q, &[])]).await;
    eventually("both settled", Duration::from_secs(5), async || {
        metric(server.http, "tollgate_settlements_total{result=\"applied\"}").await >= 1.0
            && metric(server.http, "tollgate_settlements_total{result=\"applied\"}").await
                + metric(server.http, "tollgate_settlements_total{result=\"unchanged\"}").await
                >= 2.0
    })
    .await;
    assert_eq!((credits("acct_w").await, credits("acct_q").await), (1000, 1000), "a refund minted no credits");
    let used = tollgate_testkit::used(server.store.as_ref(), "acct_q", "requests", Period::Month).await;
    assert_eq!(used, 0, "the quota unit was refunded");
    server.stop().await;
}
