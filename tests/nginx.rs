//! End to end with a real nginx (Debian's package, `auth_request`) running the
//! shipped `deploy/nginx/tollgate.conf` in front of tollgate's HTTP door and
//! an echo upstream: every decision row as a plain HTTP client sees it (the
//! real 402 with its problem body and `Link`, 429 with `Retry-After`, 503
//! with the store down), what the upstream receives, forged headers, and
//! tollgate down.

use std::net::SocketAddr;

use tollgate_testkit::TestServer;
use tollgate_testkit::envoy::echo_upstream;
use tollgate_testkit::front::{Front, assert_problem, deny_rows, store_down_row};
use tollgate_testkit::http::{metric_in, request};
use tollgate_testkit::nginx::{self, Nginx};
use tollgate_testkit::process::free_addr;
use tollgate_testkit::redis::RedisServer;

/// tollgate (spec config on `redis`, seeded) with its HTTP door, and nginx in front.
async fn stack(redis: &RedisServer) -> (TestServer, SocketAddr, Nginx) {
    let (tollgate, door) = tollgate_testkit::spec_door_on(redis).await;
    let upstream = echo_upstream().await;
    let nginx = Nginx::start(|listen| nginx::config(door, upstream, listen)).await;
    (tollgate, door, nginx)
}

#[test]
fn the_shipped_config_passes_nginx_t() {
    let c = nginx::config(free_addr(), free_addr(), free_addr());
    nginx::validate(&c).unwrap_or_else(|e| panic!("nginx -t:\n{e}"));
}

#[tokio::test]
async fn every_row_through_nginx_reaches_the_client_with_its_real_status_body_and_headers() {
    let mut redis = RedisServer::start();
    let (tollgate, door, nginx) = stack(&redis).await;

    // Allowed: identity to the upstream, the key not; RateLimit to the client.
    let r = nginx.get("/v1/search?q=nginx", &[("x-api-key", "pro-key"), ("authorization", "Bearer pro-key")]).await;
    assert_eq!(r.status, 200, "{r:?}\n{}", nginx.log());
    let seen = &r.json()["headers"];
    assert_eq!(
        (seen["x-tollgate-account"].as_str(), seen["x-tollgate-plan"].as_str()),
        (Some("acct_pro"), Some("pro")),
        "{seen}"
    );
    assert!(seen.get("x-api-key").is_none() && seen.get("authorization").is_none(), "no credential upstream: {seen}");
    assert_eq!(r.json()["path"], "/v1/search?q=nginx");
    assert!(r.header("ratelimit-policy").is_some_and(|p| p.starts_with("\"requests-month\";q=1000000;w=")), "{r:?}");
    assert!(r.header("ratelimit").is_some_and(|p| p.starts_with("\"requests-month\";r=999999;t=")), "{r:?}");
    assert!(r.header("x-tollgate-status").is_none() && r.header("x-tollgate-problem").is_none(), "{r:?}");

    // In grace: the warning reaches client and upstream, with the link to pay.
    let r = nginx.get("/v1/search", &[("x-api-key", "grace-key")]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.header("x-tollgate-billing-warning").is_some_and(|w| w.starts_with("payment_overdue; ")), "{r:?}");
    assert!(r.header("link").is_some_and(|l| l.ends_with("rel=\"payment\"")), "{r:?}");
    assert!(r.json()["headers"]["x-tollgate-billing-warning"].is_string());

    // A public route: no key needed, none of tollgate's headers.
    let r = nginx.get("/public/docs", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.json()["headers"].get("x-tollgate-account").is_none());

    // 401 carries the challenge once, as tollgate gave it (nginx copies it too).
    let r = nginx.get("/v1/search", &[]).await;
    let direct = request(door, "GET", "/traefik", &[("X-Forwarded-Method", "GET"), ("X-Forwarded-Uri", "/v1/search")]);
    assert_eq!(r.header("www-authenticate"), direct.await.unwrap().header("www-authenticate"), "{r:?}");
    assert_eq!(r.header("cache-control"), Some("no-store"), "{r:?}");

    deny_rows(&nginx).await;
    // The store down: the real 503 and its problem body, not nginx's 500.
    redis.kill();
    let r = store_down_row(&nginx).await;
    assert_problem(&r, 503, "store_unavailable");

    let scrape = tollgate_testkit::http::http_get(tollgate.http, "/metrics").await.unwrap().2;
    let door_metric = |status: &str| {
        metric_in(&scrape, &format!("tollgate_door_decisions_total{{door=\"nginx\",status=\"{status}\"}}"))
    };
    assert_eq!(door_metric("402"), 5.0, "the five 402 rows");
    assert_eq!(door_metric("503"), 1.0);
    drop(nginx);
    tollgate.stop().await;
}

/// nginx cannot strip headers by prefix, so tollgate refuses (400) a request
/// carrying any `x-tollgate-*` header on the nginx door: a forged one never
/// reaches the upstream, and the request is not spent.
#[tokio::test]
async fn forged_tollgate_headers_are_refused_and_never_reach_the_upstream() {
    let redis = RedisServer::start();
    let (tollgate, door, nginx) = stack(&redis).await;
    for forged in ["x-tollgate-account", "x-tollgate-plan", "x-tollgate-shadow", "X-Tollgate-Anything-Else"] {
        let r = nginx.get("/v1/search", &[("x-api-key", "free-key"), (forged, "acct_pro")]).await;
        let body = assert_problem(&r, 400, "request_invalid");
        assert!(!r.body.contains("acct_pro") && body.get("account").is_none(), "{r:?}");
    }
    // A public route too: the upstream trusts these names whatever the route.
    assert_problem(&nginx.get("/public/docs", &[("x-tollgate-account", "acct_pro")]).await, 400, "request_invalid");
    // Underscore spellings (CGI-style upstreams read them as these names) never get that far: the
    // shipped server drops them, even under an `underscores_in_headers on` in http{} (without the
    // server's own `off`, the door would see them and refuse the request).
    let upstream = echo_upstream().await;
    let lax =
        Nginx::start(|listen| format!("underscores_in_headers on;\n{}", nginx::config(door, upstream, listen))).await;
    for forged in ["x_tollgate_account", "x-tollgate_account", "X_Tollgate-Plan"] {
        for n in [&nginx, &lax] {
            let r = n.get("/public/docs", &[(forged, "acct_pro")]).await;
            assert_eq!(r.status, 200, "{forged}: {r:?}");
            let seen: Vec<String> =
                r.json()["headers"].as_object().unwrap().keys().map(|k| k.replace('_', "-")).collect();
            assert!(!seen.iter().any(|k| k.starts_with("x-tollgate-")), "{forged}: {seen:?}");
        }
    }
    drop(lax);
    // None of them spent: free's 5 requests are all there.
    for n in 1..=5 {
        assert_eq!(nginx.get("/v1/search", &[("x-api-key", "free-key")]).await.status, 200, "request {n}");
    }
    assert_problem(&nginx.get("/v1/search", &[("x-api-key", "free-key")]).await, 402, "quota_exhausted");
    drop(nginx);
    tollgate.stop().await;
}

/// tollgate unreachable: nginx's auth_request fails, and the shipped config
/// answers 503 with a problem body, never the upstream.
#[tokio::test]
async fn tollgate_down_through_nginx_is_503_never_a_pass() {
    let dead = free_addr();
    let upstream = echo_upstream().await;
    let nginx = Nginx::start(|listen| nginx::config(dead, upstream, listen)).await;
    let r = nginx.get("/v1/search", &[("x-api-key", "pro-key")]).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/problem+json"), "{r:?}");
    assert_eq!(r.json()["status"], 503);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(!r.body.contains("\"upstream\""), "{r:?}");
}
