//! Usage and threshold events, end to end: charges settled from Envoy's
//! access log become CloudEvents batches POSTed to a real HTTP sink started
//! by the test, whose units sum exactly to the counters; events wait out a
//! sink outage, survive the replica that queued them being killed (Redis),
//! and threshold events arrive once each with two replicas.

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use tollgate::entitlement::Period;
use tollgate_testkit::accesslog::{charge_of, entry, stream};
use tollgate_testkit::check::http_check;
use tollgate_testkit::envoy::{self, Options, Stack};
use tollgate_testkit::process::TollgateProcess;
use tollgate_testkit::redis::RedisServer;
use tollgate_testkit::server::channel;
use tollgate_testkit::sink::Sink;
use tollgate_testkit::{TestServer, eventually, http_get, metric};

const TOKEN: &str = "sink-token-0123456789abcdef0123456789";
const SIGNING: &str = "signing-secret-0123456789abcdef0123456789";

fn config(store: &str, sink: &Sink, extra: &str) -> String {
    format!(
        r#"
billing:
  charge_on: [2xx, 3xx, 4xx]
identity:
  - api_key: {{ header: x-api-key }}
plans:
  metered:
    features: [search, ai]
    quotas:
      - {{ meter: requests, limit: 1000, period: month }}
      - {{ meter: tokens, limit: 1000000, period: day }}
  small:
    features: [search]
    quotas:
      - {{ meter: requests, limit: 10, period: month }}
  payg:
    features: [search]
    prepaid: true
  unlimited:
    features: [search]
routes:
  - {{ match: {{ path_prefix: /v1/search }}, feature: search, meter: requests, cost: 1 }}
  - {{ match: {{ path_prefix: /v1/ai }}, feature: ai, meter: tokens, cost: 100, cost_from_response: x-usage-tokens }}
default: deny
accounts:
  - {{ id: acct_m, plan: metered, api_keys: [m-key] }}
  - {{ id: acct_s, plan: small, api_keys: [s-key] }}
  - {{ id: acct_w, plan: payg, api_keys: [w-key], credits: 1000 }}
  - {{ id: acct_u, plan: unlimited, api_keys: [u-key] }}
store: {store}
events:
  sink: {{ url: "{}" {extra} }}
  reclaim_after: 2s
  thresholds: {{ quota: [0.5, 1.0], credits_below: 990 }}
"#,
        sink.url()
    )
}

/// Units per (account, meter) over the usage events, and credits per account.
fn sums(events: &[serde_json::Value]) -> (HashMap<(String, String), u64>, HashMap<String, u64>) {
    let (mut units, mut credits) = (HashMap::new(), HashMap::new());
    for e in events.iter().filter(|e| e["type"] == "com.tollgate.usage") {
        let account = e["subject"].as_str().unwrap().to_owned();
        let meter = e["data"]["meter"].as_str().unwrap().to_owned();
        *units.entry((account.clone(), meter)).or_default() += e["data"]["units"].as_u64().unwrap();
        *credits.entry(account).or_default() += e["data"]["credits"].as_u64().unwrap();
    }
    (units, credits)
}

async fn through_envoy(redis: bool) {
    let server = redis.then(RedisServer::start);
    let store = match &server {
        Some(r) => format!("{{ backend: redis, url: \"{}\" }}", r.url()),
        None => "{ backend: memory }".to_owned(),
    };
    let mut sink = Sink::start().await;
    let yaml = config(&store, &sink, "");
    let tollgate = TestServer::start_configured(&yaml, true).await;
    let s = Stack::around(tollgate, |t, u| envoy::config(t, u, Options::default())).await;
    s.envoy.wait_cluster_healthy("tollgate").await;
    let mut sent = 0;
    let mut tokens = 0;
    let round = async |sent: &mut usize, tokens: &mut u64| {
        for i in 0..10u64 {
            let fail = if i % 10 < 3 { Some(("x-test-status", "503")) } else { None };
            let mut h = vec![("x-api-key", "m-key")];
            h.extend(fail);
            s.get("/v1/search", &h).await;
            let mut h = vec![("x-api-key", "w-key")];
            h.extend(fail);
            s.get("/v1/search", &h).await;
            // A plan with no quota or credits on the meter: used all the same.
            let mut h = vec![("x-api-key", "u-key")];
            h.extend(fail);
            s.get("/v1/search", &h).await;
            let t = (i * 41).to_string();
            assert_eq!(s.get("/v1/ai", &[("x-api-key", "m-key"), ("x-test-usage-tokens", &t)]).await.status, 200);
            *tokens += i * 41;
            *sent += 4;
        }
    };
    round(&mut sent, &mut tokens).await;
    // The sink goes away: events wait in the outbox, then arrive when it is back.
    eventually("the first round is delivered", Duration::from_secs(15), async || sink.unique().len() >= 40).await;
    sink.stop();
    round(&mut sent, &mut tokens).await;
    eventually("deliveries fail while the sink is down", Duration::from_secs(15), async || {
        metric(s.tollgate.http, "tollgate_events_total{result=\"retried\"}").await > 0.0
    })
    .await;
    let before = sink.unique().len();
    sink.resume().await;
    let usage_events = |sink: &Sink| sink.unique().iter().filter(|e| e["type"] == "com.tollgate.usage").count();
    eventually("every charge's event arrives", Duration::from_secs(30), async || usage_events(&sink) == sent).await;
    assert!(before < sink.unique().len(), "events waited for the sink");
    let events = sink.unique();
    let (units, credits) = sums(&events);
    let store = &*s.tollgate.store;
    assert_eq!(
        units[&("acct_m".to_owned(), "requests".to_owned())],
        tollgate_testkit::used(store, "acct_m", "requests", Period::Month).await
    );
    assert_eq!(units[&("acct_m".to_owned(), "requests".to_owned())], 14, "6 of 20 failed");
    assert_eq!(
        units[&("acct_m".to_owned(), "tokens".to_owned())],
        tollgate_testkit::used(store, "acct_m", "tokens", Period::Day).await
    );
    assert_eq!(units[&("acct_m".to_owned(), "tokens".to_owned())], tokens);
    assert_eq!(credits["acct_w"], 1000 - store.credits("acct_w").await.unwrap());
    assert_eq!(credits["acct_w"], 14);
    assert_eq!(units[&("acct_u".to_owned(), "requests".to_owned())], 14, "an unmetered plan's use is an event too");
    // The low-credit level (990) fired once.
    let low: Vec<_> = events.iter().filter(|e| e["type"] == "com.tollgate.credits.low").collect();
    assert_eq!(low.len(), 1, "{low:?}");
    let all_batches =
        sink.received.lock().unwrap().headers.iter().all(|h| h["content-type"] == "application/cloudevents-batch+json");
    assert!(all_batches);
    s.stop().await;
}

#[tokio::test]
async fn usage_events_sum_to_the_counters_and_wait_out_a_sink_outage_on_memory() {
    through_envoy(false).await;
}

#[tokio::test]
async fn usage_events_sum_to_the_counters_and_wait_out_a_sink_outage_on_redis() {
    through_envoy(true).await;
}

/// The charge of an allowed Check of `key` at the replica at `grpc`.
async fn charge(grpc: std::net::SocketAddr, key: &str) -> String {
    let mut client = AuthorizationClient::new(channel(grpc).await);
    let resp = client.check(http_check("GET", "/v1/search", &[("x-api-key", key)])).await.unwrap().into_inner();
    assert_eq!(resp.status.as_ref().map(|s| s.code), Some(0), "{resp:?}");
    charge_of(&resp)
}

/// Sends Envoy-shaped entries (status 200) for `charges` to the replica at `grpc`.
async fn settle(grpc: std::net::SocketAddr, charges: &[String]) {
    stream(grpc, charges.iter().map(|c| entry(200, c, &[])).collect()).await;
}

/// The replica that queued events (and claimed them, failing to deliver
/// while the sink was down) is killed; another replica delivers them, with
/// the bearer token and a Stripe-style signature.
#[tokio::test]
async fn another_replica_delivers_what_a_killed_one_queued() {
    let redis = RedisServer::start();
    let mut sink = Sink::start().await;
    sink.stop();
    let store = format!("{{ backend: redis, url: \"{}\" }}", redis.url());
    let extra = ", token_env: TEST_SINK_TOKEN, signing_secret_env: TEST_SINK_SIGNING";
    let body = config(&store, &sink, extra);
    let bin = env!("CARGO_BIN_EXE_tollgate");
    let env = [("TEST_SINK_TOKEN", TOKEN), ("TEST_SINK_SIGNING", SIGNING)];
    let yaml = |grpc: std::net::SocketAddr, http: std::net::SocketAddr| {
        format!("server: {{ grpc_listen: \"{grpc}\", http_listen: \"{http}\" }}\n{body}")
    };
    // Seeded from the same config (without the secrets, which only the processes get).
    let plain = tollgate::config::Config::parse(&config(&store, &sink, ""), "t").unwrap();
    let seeding = tollgate::store::open(&plain.store, &plain.cache, std::sync::Arc::new(|_| {})).unwrap();
    tollgate::accounts::Accounts::seed(seeding.as_ref(), &plain.accounts, &plain.policy.plans).await.unwrap();
    let mut a = TollgateProcess::start_env(bin, &[], &env, yaml).await;
    let mut charges = Vec::new();
    for _ in 0..20 {
        charges.push(charge(a.grpc, "m-key").await);
    }
    settle(a.grpc, &charges).await;
    // A claims them and fails to deliver.
    eventually("A tries to deliver", Duration::from_secs(15), async || {
        metric(a.http, "tollgate_events_total{result=\"retried\"}").await >= 20.0
    })
    .await;
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    // B takes over once A's claim has sat for reclaim_after (2 s).
    let b = TollgateProcess::start_env(bin, &[], &env, yaml).await;
    sink.resume().await;
    let usage = |sink: &Sink| sink.unique().into_iter().filter(|e| e["type"] == "com.tollgate.usage").count();
    eventually("B delivers A's events", Duration::from_secs(30), async || usage(&sink) == 20).await;
    let events = sink.unique();
    let ids: std::collections::HashSet<&str> =
        events.iter().filter(|e| e["type"] == "com.tollgate.usage").map(|e| e["id"].as_str().unwrap()).collect();
    for c in &charges {
        let id = c.split('|').nth(1).unwrap();
        assert!(ids.contains(id), "the event of charge {id} arrived, named by it");
    }
    // B counts a delivery once the sink has answered: the sink can hold all
    // 20 a moment before the counter does.
    eventually("B counts them delivered", Duration::from_secs(10), async || {
        metric(b.http, "tollgate_events_total{result=\"delivered\"}").await >= 20.0
    })
    .await;
    let r = sink.received.lock().unwrap();
    for (h, body) in r.headers.iter().zip(&r.bodies) {
        assert_eq!(h["authorization"], format!("Bearer {TOKEN}"));
        let sig = h["tollgate-signature"].to_str().unwrap();
        let t: i64 = sig.strip_prefix("t=").and_then(|s| s.split(',').next()).unwrap().parse().unwrap();
        assert_eq!(sig, tollgate::events::signature(SIGNING, t, body), "the signature verifies");
        assert!((Utc::now().timestamp() - t).abs() < 120, "and is fresh");
    }
}

/// Two replicas settle one account's charges alternately: each threshold
/// (50 % and 100 % of the month's 10 requests) arrives exactly once.
#[tokio::test]
async fn threshold_events_arrive_once_each_with_two_replicas() {
    let redis = RedisServer::start();
    let sink = Sink::start().await;
    let store = format!("{{ backend: redis, url: \"{}\" }}", redis.url());
    let yaml = config(&store, &sink, "");
    let r1 = TestServer::start_configured(&yaml, true).await;
    let r2 = TestServer::start_configured(&yaml, false).await;
    let replicas = [r1.grpc, r2.grpc];
    for i in 0..10 {
        let c = charge(replicas[i % 2], "s-key").await;
        // The other replica settles it.
        settle(replicas[(i + 1) % 2], &[c]).await;
    }
    eventually("all usage events arrive", Duration::from_secs(15), async || {
        sink.unique().iter().filter(|e| e["type"] == "com.tollgate.usage").count() == 10
    })
    .await;
    // Let any duplicate show up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let events = sink.received.lock().unwrap().events.clone();
    let thresholds: Vec<&serde_json::Value> =
        events.iter().filter(|e| e["type"] == "com.tollgate.quota.threshold").collect();
    let mut fractions: Vec<f64> = thresholds.iter().map(|e| e["data"]["fraction"].as_f64().unwrap()).collect();
    fractions.sort_by(f64::total_cmp);
    assert_eq!(fractions, [0.5, 1.0], "{thresholds:#?}");
    assert!(thresholds.iter().all(|e| e["subject"] == "acct_s" && e["data"]["limit"] == 10));
    assert_eq!(events.iter().filter(|e| e["type"] == "com.tollgate.usage").count(), 10, "each event delivered once");
    r1.stop().await;
    r2.stop().await;
}

/// An event the sink refuses for good (400) is set aside, counted as
/// dropped; the events batched with it are delivered, not held up.
#[tokio::test]
async fn an_event_the_sink_refuses_for_good_does_not_hold_up_the_others() {
    let sink = Sink::start().await;
    *sink.refuse_subject.lock().unwrap() = Some("acct_s".to_owned());
    let server = TestServer::start(&config("{ backend: memory }", &sink, "")).await;
    let mut charges = Vec::new();
    for key in ["m-key", "m-key", "s-key", "m-key"] {
        charges.push(charge(server.grpc, key).await);
    }
    settle(server.grpc, &charges).await;
    let usage = |sink: &Sink| sink.unique().into_iter().filter(|e| e["type"] == "com.tollgate.usage").count();
    eventually("the good events arrive", Duration::from_secs(15), async || usage(&sink) == 3).await;
    assert!(sink.unique().iter().all(|e| e["subject"] != "acct_s"));
    // The deliverer counts a batch once the sink has answered it: the sink
    // may hold the events a moment before the counters move.
    let dropped = "tollgate_events_total{result=\"dropped\"} 1";
    eventually("the refused event is counted dropped", Duration::from_secs(15), async || {
        http_get(server.http, "/metrics").await.is_ok_and(|(_, _, m)| m.contains(dropped))
    })
    .await;
    server.stop().await;
}
