//! OpenTelemetry traces end to end: a real Envoy with its OpenTelemetry
//! tracer in front of the tollgate binary, both exporting to a small real
//! OTLP/gRPC collector. A client's `traceparent` reaches tollgate through
//! Envoy's ext_authz call, so the Check's span joins the client's trace
//! under Envoy's span, with its attributes and never a key; log lines inside
//! a Check carry the trace id; with the collector down, Checks go on.

use std::time::Duration;

use tollgate_testkit::envoy::{self, Envoy, Options, echo_upstream};
use tollgate_testkit::otlp::Collector;
use tollgate_testkit::process::{TollgateProcess, free_addr};
use tollgate_testkit::{eventually, metric, spec_config};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

fn yaml(grpc: std::net::SocketAddr, http: std::net::SocketAddr, collector: std::net::SocketAddr) -> String {
    format!(
        "server: {{ grpc_listen: \"{grpc}\", http_listen: \"{http}\" }}\ntracing: {{ otlp_endpoint: \"http://{collector}\", sample_ratio: 1.0 }}\n{}",
        spec_config()
    )
}

async fn tollgate(collector: std::net::SocketAddr) -> TollgateProcess {
    let env = [("TOLLGATE_LOG", "info")];
    TollgateProcess::start_env(env!("CARGO_BIN_EXE_tollgate"), &[], &env, |g, h| yaml(g, h, collector)).await
}

#[tokio::test]
async fn a_check_joins_the_client_s_trace_under_envoy_s_span() {
    let collector = Collector::start().await;
    let t = tollgate(collector.addr).await;
    let opts = Options { tracing: Some(collector.addr), ..Options::default() };
    let envoy = Envoy::start(&envoy::config(t.grpc, echo_upstream().await, opts)).await;
    envoy.wait_cluster_healthy("tollgate").await;

    let traceparent = format!("00-{TRACE_ID}-00f067aa0ba902b7-01");
    let r = envoy.send("GET", "/v1/search", &[("x-api-key", "pro-key"), ("traceparent", &traceparent)]).await;
    assert_eq!(r.status, 200, "{r:?}");
    let denied = format!("00-{TRACE_ID}-00f067aa0ba902b8-01");
    let r = envoy.send("GET", "/v1/search", &[("x-api-key", "sk_live_not_a_key"), ("traceparent", &denied)]).await;
    assert_eq!(r.status, 401, "{r:?}");

    let checks = |c: &Collector| {
        c.spans().into_iter().filter(|s| s.service == "tollgate" && s.trace_id == TRACE_ID).collect::<Vec<_>>()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !(checks(&collector).len() >= 2 && collector.spans().iter().any(|s| s.service == "envoy")) {
        let summary: Vec<(String, String, String)> =
            collector.spans().into_iter().map(|s| (s.service, s.name, s.trace_id)).collect();
        assert!(std::time::Instant::now() < deadline, "spans: {summary:#?}\nlog:\n{}", t.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let spans = collector.spans();
    let mine = checks(&collector);
    let allowed = mine.iter().find(|s| s.attributes.get("tollgate.decision").map(String::as_str) == Some("allowed"));
    let allowed = allowed.unwrap_or_else(|| panic!("no allowed Check span in {mine:#?}"));
    assert_eq!(allowed.name, "envoy.service.auth.v3.Authorization/Check");
    for (k, v) in [
        ("tollgate.account", "acct_pro"),
        ("tollgate.plan", "pro"),
        ("tollgate.status", "200"),
        ("tollgate.route", "/v1/search*"),
        ("rpc.system", "grpc"),
    ] {
        assert_eq!(allowed.attributes.get(k).map(String::as_str), Some(v), "{k} in {:?}", allowed.attributes);
    }
    for k in ["tollgate.store_ms", "tollgate.store_calls", "tollgate.cache_hits", "tollgate.cache_misses"] {
        assert!(allowed.attributes.contains_key(k), "{k} in {:?}", allowed.attributes);
    }
    // Its parent is a span Envoy made in the same trace (the ext_authz call).
    let parent = spans.iter().find(|s| s.span_id == allowed.parent_span_id);
    let parent = parent.unwrap_or_else(|| panic!("parent {} not among {spans:#?}", allowed.parent_span_id));
    assert_eq!((parent.service.as_str(), parent.trace_id.as_str()), ("envoy", TRACE_ID));
    let denied =
        mine.iter().find(|s| s.attributes.get("tollgate.decision").map(String::as_str) == Some("credentials_invalid"));
    assert!(denied.is_some_and(|s| s.attributes.get("tollgate.status").map(String::as_str) == Some("401")));

    // No key anywhere: not in a span of anyone's, not in tollgate's log.
    let everything = format!("{spans:?}");
    for key in ["pro-key", "sk_live_not_a_key"] {
        assert!(!everything.contains(key), "{key} in a span");
        assert!(!t.log().contains(key), "{key} in the log");
    }
    // The denied Check's log line carries the trace id.
    let log = t.log();
    let line = log.lines().find(|l| l.contains("check denied")).unwrap_or_else(|| panic!("no denial logged:\n{log}"));
    assert!(line.contains(TRACE_ID), "{line}");
    assert!(metric(t.http, "tollgate_trace_spans_total{result=\"exported\"}").await >= 2.0);
}

#[tokio::test]
async fn with_the_collector_down_checks_go_on_and_lost_spans_are_counted() {
    // A port nothing listens on.
    let t = TollgateProcess::start_env(env!("CARGO_BIN_EXE_tollgate"), &[], &[], |g, h| {
        format!(
            "server: {{ grpc_listen: \"{g}\", http_listen: \"{h}\" }}\ntracing: {{ otlp_endpoint: \"http://{}\", sample_ratio: 1.0, export_timeout: 200ms, queue_size: 8 }}\n{}",
            free_addr(),
            spec_config()
        )
    })
    .await;
    let mut client = envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient::new(
        tollgate_testkit::server::channel(t.grpc).await,
    );
    for i in 0..200 {
        let req = tollgate_testkit::http_check("GET", "/v1/search", &[("x-api-key", "pro-key")]);
        let a = tollgate_testkit::Answer::of(&client.check(req).await.unwrap().into_inner());
        assert!(a.allowed, "Check {i}: {a:?}");
    }
    eventually("spans counted as lost", Duration::from_secs(10), async || {
        let lost = metric(t.http, "tollgate_trace_spans_total{result=\"failed\"}").await
            + metric(t.http, "tollgate_trace_spans_total{result=\"dropped\"}").await;
        lost >= 200.0
    })
    .await;
    assert_eq!(metric(t.http, "tollgate_trace_spans_total{result=\"exported\"}").await, 0.0);
}
