//! What a plain HTTP client sees through a proxy in front of tollgate,
//! whichever proxy it is ([`Front`]: Envoy over gRPC or HTTP, nginx), and the
//! decision-table rows every front must answer alike ([`deny_rows`]).

use std::future::Future;

use crate::envoy::Envoy;
use crate::http::Response;
use crate::nginx::Nginx;

/// A proxy clients send requests through.
pub trait Front {
    /// Sends a request through the proxy.
    fn send(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> impl Future<Output = Response>;

    /// Sends a GET through the proxy.
    fn get(&self, path: &str, headers: &[(&str, &str)]) -> impl Future<Output = Response> {
        self.send("GET", path, headers)
    }
}

impl Front for Envoy {
    fn send(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> impl Future<Output = Response> {
        Envoy::send(self, method, path, headers)
    }
}

impl Front for Nginx {
    fn send(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> impl Future<Output = Response> {
        Nginx::send(self, method, path, headers)
    }
}

/// Asserts `r` is the problem answer for `code` (status, `application/problem+json`,
/// the spec config's problem type); returns the body.
pub fn assert_problem(r: &Response, status: u16, code: &str) -> serde_json::Value {
    assert_eq!(r.status, status, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/problem+json"), "{r:?}");
    let body = r.json();
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status);
    assert_eq!(body["type"], format!("https://docs.example.com/problems/{}", code.replace('_', "-")));
    body
}

/// Every deny row of the decision table as a plain HTTP client sees it.
pub async fn deny_rows(f: &impl Front) {
    let r = f.get("/v1/search", &[]).await;
    assert_problem(&r, 401, "credentials_missing");
    assert!(r.header("www-authenticate").is_some_and(|w| w.contains("Bearer realm=\"tollgate\"")), "{r:?}");

    let r = f.get("/v1/search", &[("authorization", "Bearer not-a-key")]).await;
    assert_problem(&r, 401, "credentials_invalid");
    assert!(!r.body.contains("not-a-key"));
    assert!(r.header("www-authenticate").is_some());

    assert_problem(&f.get("/admin", &[("x-api-key", "pro-key")]).await, 403, "route_not_allowed");
    assert_problem(&f.get("/v1/search", &[("x-api-key", "banned-key")]).await, 403, "account_blocked");

    let r = f.get("/v1/search", &[("x-api-key", "canceled-key")]).await;
    let body = assert_problem(&r, 402, "subscription_inactive");
    assert_eq!(body["link"], "https://billing.example.com/accounts/acct_canceled/billing");
    assert_eq!(r.header("link"), Some("<https://billing.example.com/accounts/acct_canceled/billing>; rel=\"payment\""));
    assert!(r.header("retry-after").is_none());

    let r = f.get("/v1/search", &[("x-api-key", "late-key")]).await;
    assert_problem(&r, 402, "payment_overdue");
    assert!(r.header("link").is_some_and(|l| l.ends_with("rel=\"payment\"")));

    let r = f.send("POST", "/v1/ai/chat", &[("x-api-key", "free-key")]).await;
    assert_eq!(assert_problem(&r, 402, "feature_not_in_plan")["feature"], "ai");

    for _ in 0..5 {
        assert_eq!(f.get("/v1/search", &[("x-api-key", "free-key")]).await.status, 200);
    }
    let r = f.get("/v1/search", &[("x-api-key", "free-key")]).await;
    let body = assert_problem(&r, 402, "quota_exhausted");
    assert_eq!(body["detail"], "Plan free includes 5 requests per month; all are used.");
    assert_eq!((body["quota"]["limit"].as_u64(), body["quota"]["remaining"].as_u64()), (Some(5), Some(0)));
    assert!(r.header("retry-after").is_some_and(|v| v.parse::<u64>().is_ok()), "{r:?}");
    assert!(r.header("ratelimit").is_some_and(|v| v.starts_with("\"requests-month\";r=0;t=")), "{r:?}");
    assert!(r.header("ratelimit-policy").is_some(), "{r:?}");
    assert!(r.header("link").is_some());

    assert_eq!(f.get("/v1/search", &[("x-api-key", "rate-key")]).await.status, 200);
    assert_eq!(f.get("/v1/search", &[("x-api-key", "rate-key")]).await.status, 200);
    let r = f.get("/v1/search", &[("x-api-key", "rate-key")]).await;
    assert_problem(&r, 429, "rate_limited");
    assert!(r.header("retry-after").is_some_and(|v| v.parse::<u64>().unwrap() > 3500), "{r:?}");
    assert!(r.header("ratelimit").is_some_and(|v| v.starts_with("\"requests-1h\";r=0;")), "{r:?}");

    assert_eq!(f.send("POST", "/v1/ai/x", &[("x-api-key", "wallet-key")]).await.status, 200);
    let r = f.send("POST", "/v1/ai/x", &[("x-api-key", "wallet-key")]).await;
    assert_eq!(assert_problem(&r, 402, "insufficient_credits")["credits"]["balance"], 5);
}

/// With the store down (`on_error: deny`, the default): 503, the upstream
/// never reached; returns the answer for the caller to check the body
/// (Envoy's HTTP ext_authz drops it: it takes any 5xx as a failed call).
pub async fn store_down_row(f: &impl Front) -> Response {
    let r = f.get("/v1/search", &[("x-api-key", "pro-key")]).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(!r.body.contains("\"upstream\""), "{r:?}");
    r
}
