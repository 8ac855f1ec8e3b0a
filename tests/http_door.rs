//! The HTTP authorization door (`server.authz_http_listen`), request by
//! request as each proxy sends them: Traefik's ForwardAuth (as its docs
//! describe: `X-Forwarded-Method`, `-Host`, `-Uri`, `-Proto` and the client's
//! headers; Traefik itself cannot be installed here) and Envoy's HTTP
//! ext_authz (`path_prefix: /envoy`; a real Envoy runs it in tests/envoy.rs)
//! and nginx's `auth_request` (`X-Original-Method`, `X-Original-URL`; a real
//! nginx runs it in tests/nginx.rs).
//! The decision rows, what the upstream and the client get, that a request
//! spends as much as over gRPC, and bad input answered 400, never allowed.

use tollgate_testkit::http::{Response, metric, request};
use tollgate_testkit::process::free_addr;
use tollgate_testkit::{TestServer, spec_config};

async fn door() -> (TestServer, std::net::SocketAddr) {
    let addr = free_addr();
    let s = TestServer::start(&format!("{}server: {{ authz_http_listen: \"{addr}\" }}\n", spec_config())).await;
    (s, addr)
}

/// What Traefik sends for a client's `GET https://api.example.com{uri}`.
async fn traefik(addr: std::net::SocketAddr, uri: &str, key: Option<&str>) -> Response {
    traefik_with(addr, uri, &key.map(|k| ("X-Api-Key", k)).into_iter().collect::<Vec<_>>()).await
}

/// [`traefik`] with the client's headers `client`.
async fn traefik_with(addr: std::net::SocketAddr, uri: &str, client: &[(&str, &str)]) -> Response {
    let mut h = vec![
        ("X-Forwarded-Method", "GET"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "api.example.com"),
        ("X-Forwarded-Uri", uri),
        ("X-Forwarded-For", "203.0.113.9"),
    ];
    h.extend_from_slice(client);
    request(addr, "GET", "/traefik", &h).await.unwrap()
}

/// Sends `raw` bytes as they are (a header that is not UTF-8) and reads the answer.
async fn raw_exchange(addr: std::net::SocketAddr, raw: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), c.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn problem(r: &Response, status: u16, code: &str) -> serde_json::Value {
    assert_eq!(r.status, status, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/problem+json"), "{r:?}");
    let body = r.json();
    assert_eq!(body["code"], code, "{body}");
    body
}

#[tokio::test]
async fn traefik_forward_auth_answers_every_row_as_the_client_should_see_it() {
    let (s, addr) = door().await;
    // Allowed: 200 with the headers Traefik copies upstream (authResponseHeaders).
    let r = traefik(addr, "/v1/search?q=rust", Some("pro-key")).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!((r.header("x-tollgate-account"), r.header("x-tollgate-plan")), (Some("acct_pro"), Some("pro")));
    assert!(r.header("ratelimit-policy").is_some_and(|p| p.contains("requests-month")), "{r:?}");
    assert!(r.header("x-envoy-auth-headers-to-remove").is_none(), "Envoy's header only on Envoy's door");

    let r = traefik(addr, "/v1/search", None).await;
    problem(&r, 401, "credentials_missing");
    assert!(r.header("www-authenticate").is_some_and(|c| c.contains("realm=\"tollgate\"")));
    problem(&traefik(addr, "/v1/search", Some("sk_live_nope")).await, 401, "credentials_invalid");
    problem(&traefik(addr, "/admin", Some("pro-key")).await, 403, "route_not_allowed");
    problem(&traefik(addr, "/v1/search", Some("banned-key")).await, 403, "account_blocked");
    let r = traefik(addr, "/v1/search", Some("canceled-key")).await;
    problem(&r, 402, "subscription_inactive");
    assert_eq!(r.header("link"), Some("<https://billing.example.com/accounts/acct_canceled/billing>; rel=\"payment\""));
    problem(&traefik(addr, "/v1/search", Some("late-key")).await, 402, "payment_overdue");
    problem(&traefik(addr, "/v1/export", Some("free-key")).await, 403, "route_not_allowed");
    problem(&traefik(addr, "/v1/ai/chat", Some("free-key")).await, 402, "feature_not_in_plan");
    // 15 credits, 10 a call: one passes.
    assert_eq!(traefik(addr, "/v1/ai/chat", Some("wallet-key")).await.status, 200);
    problem(&traefik(addr, "/v1/ai/chat", Some("wallet-key")).await, 402, "insufficient_credits");
    let r = traefik(addr, "/v1/search", Some("grace-key")).await;
    assert_eq!(r.status, 200);
    assert!(r.header("x-tollgate-billing-warning").is_some_and(|w| w.starts_with("payment_overdue")));

    // The free plan's 5 requests a month, spent as over gRPC: a mix of doors shares them.
    for i in 0..4 {
        assert_eq!(traefik(addr, "/v1/search", Some("free-key")).await.status, 200, "request {i}");
    }
    let grpc = tollgate_testkit::Answer::of(
        &s.check(tollgate_testkit::http_check("GET", "/v1/search", &[("x-api-key", "free-key")])).await,
    );
    assert!(grpc.allowed);
    let r = traefik(addr, "/v1/search", Some("free-key")).await;
    let body = problem(&r, 402, "quota_exhausted");
    assert_eq!(body["quota"]["used"], 5);
    assert!(r.header("retry-after").is_some());
    for _ in 0..2 {
        assert_eq!(traefik(addr, "/v1/search", Some("rate-key")).await.status, 200);
    }
    let r = traefik(addr, "/v1/search", Some("rate-key")).await;
    problem(&r, 429, "rate_limited");
    assert!(r.header("retry-after").is_some());

    assert!(metric(s.http, "tollgate_door_decisions_total{door=\"traefik\",status=\"200\"}").await >= 9.0);
    assert_eq!(metric(s.http, "tollgate_door_decisions_total{door=\"grpc\",status=\"200\"}").await, 1.0);
    s.stop().await;
}

#[tokio::test]
async fn envoy_http_ext_authz_gets_upstream_headers_and_what_to_remove() {
    let (s, addr) = door().await;
    let r = request(addr, "GET", "/envoy/v1/search?q=x", &[("x-api-key", "pro-key"), ("x-tollgate-plan", "forged")])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-tollgate-plan"), Some("pro"), "tollgate's own value, which Envoy overwrites with");
    let remove = r.header("x-envoy-auth-headers-to-remove").unwrap_or("");
    assert!(remove.split(',').any(|h| h == "x-api-key"), "{remove}");
    let r = request(addr, "POST", "/envoy/v1/search", &[("x-api-key", "pro-key")]).await.unwrap();
    problem(&r, 403, "route_not_allowed");
    let r = request(addr, "GET", "/envoy/v1/search", &[("x-api-key", "canceled-key")]).await.unwrap();
    problem(&r, 402, "subscription_inactive");
    assert!(r.header("link").is_some_and(|l| l.contains("rel=\"payment\"")));
    s.stop().await;
}

/// What nginx's `auth_request` sends (as `deploy/nginx/tollgate.conf` sets it)
/// for a client's `{method} https://api.example.com{uri}`, plus the client's headers.
async fn nginx(addr: std::net::SocketAddr, method: &str, uri: &str, client: &[(&str, &str)]) -> Response {
    let url = format!("https://api.example.com{uri}");
    let mut h = vec![("X-Original-Method", method), ("X-Original-URL", url.as_str())];
    h.extend_from_slice(client);
    request(addr, "GET", "/nginx", &h).await.unwrap()
}

/// nginx's contract: allowed is 200 with the headers; every deny is 401 (a
/// real 401) or 403, with the real status and the problem body in headers
/// and the client headers as they are.
#[tokio::test]
async fn nginx_auth_request_gets_every_deny_as_401_or_403_with_the_real_answer_in_headers() {
    let (s, addr) = door().await;
    let r = nginx(addr, "GET", "/v1/search?q=1", &[("X-Api-Key", "pro-key")]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!((r.header("x-tollgate-account"), r.header("x-tollgate-plan")), (Some("acct_pro"), Some("pro")));
    assert!(r.header("ratelimit").is_some() && r.header("x-tollgate-status").is_none(), "{r:?}");

    let rows = [
        ("GET", "/v1/search", None, 401, 401u16, "credentials_missing"),
        ("GET", "/v1/search", Some("sk_live_nope"), 401, 401, "credentials_invalid"),
        ("POST", "/v1/search", Some("pro-key"), 403, 403, "route_not_allowed"),
        ("GET", "/v1/search", Some("canceled-key"), 403, 402, "subscription_inactive"),
        ("POST", "/v1/ai/chat", Some("free-key"), 403, 402, "feature_not_in_plan"),
        ("GET", "/v1/search", Some("late-key"), 403, 402, "payment_overdue"),
    ];
    for (method, uri, key, nginx_status, real, code) in rows {
        let client: Vec<(&str, &str)> = key.map(|k| ("X-Api-Key", k)).into_iter().collect();
        let r = nginx(addr, method, uri, &client).await;
        assert_eq!(r.status, nginx_status, "{code}: {r:?}");
        assert_eq!(r.header("x-tollgate-status"), Some(real.to_string().as_str()), "{code}");
        let body: serde_json::Value = serde_json::from_str(r.header("x-tollgate-problem").unwrap_or("")).unwrap();
        assert_eq!((body["code"].as_str(), body["status"].as_u64()), (Some(code), Some(u64::from(real))), "{body}");
        assert_eq!(r.header("content-type"), None, "nginx sets the type: {r:?}");
        if real == 402 {
            assert!(r.header("link").is_some_and(|l| l.ends_with("rel=\"payment\"")), "{r:?}");
        }
        if real == 401 {
            assert!(r.header("www-authenticate").is_some(), "{r:?}");
        }
    }
    // The same problem as Traefik's body, word for word.
    let t = traefik(addr, "/v1/search", Some("canceled-key")).await;
    let n = nginx(addr, "GET", "/v1/search", &[("X-Api-Key", "canceled-key")]).await;
    assert_eq!(n.header("x-tollgate-problem"), Some(t.body.as_str()));

    // 429 keeps Retry-After and RateLimit.
    for _ in 0..2 {
        assert_eq!(nginx(addr, "GET", "/v1/search", &[("X-Api-Key", "rate-key")]).await.status, 200);
    }
    let r = nginx(addr, "GET", "/v1/search", &[("X-Api-Key", "rate-key")]).await;
    assert_eq!((r.status, r.header("x-tollgate-status")), (403, Some("429")), "{r:?}");
    assert!(r.header("retry-after").is_some() && r.header("ratelimit").is_some(), "{r:?}");
    assert_eq!(metric(s.http, "tollgate_door_decisions_total{door=\"nginx\",status=\"429\"}").await, 1.0);
    s.stop().await;
}

/// On the nginx door, bad input and any client `x-tollgate-*` header are
/// 400 `request_invalid` (in nginx's shape: 403 + the real status), never an allow.
#[tokio::test]
async fn the_nginx_door_refuses_what_it_cannot_read_and_forged_tollgate_headers() {
    let (s, addr) = door().await;
    let key = ("X-Api-Key", "pro-key");
    let refused = |r: &Response, what: &str| {
        assert_eq!((r.status, r.header("x-tollgate-status")), (403, Some("400")), "{what}: {r:?}");
        assert!(r.header("x-tollgate-problem").is_some_and(|p| p.contains("\"request_invalid\"")), "{what}");
    };
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("no original URL", vec![("X-Original-Method", "GET"), key]),
        ("no original method", vec![("X-Original-URL", "https://api.example.com/v1/search"), key]),
        ("a relative URL", vec![("X-Original-Method", "GET"), ("X-Original-URL", "/v1/search"), key]),
        ("no path", vec![("X-Original-Method", "GET"), ("X-Original-URL", "https://api.example.com"), key]),
        (
            "user info",
            vec![("X-Original-Method", "GET"), ("X-Original-URL", "https://u@api.example.com/v1/search"), key],
        ),
        (
            "another scheme",
            vec![("X-Original-Method", "GET"), ("X-Original-URL", "gopher://api.example.com/v1/search"), key],
        ),
        (
            "dot segments",
            vec![("X-Original-Method", "GET"), ("X-Original-URL", "https://api.example.com/public/../v1/search"), key],
        ),
        (
            "an empty method",
            vec![("X-Original-Method", ""), ("X-Original-URL", "https://api.example.com/v1/search"), key],
        ),
        (
            "the original URL twice",
            vec![
                ("X-Original-Method", "GET"),
                ("X-Original-URL", "https://api.example.com/healthz"),
                ("X-Original-URL", "https://api.example.com/v1/search"),
                key,
            ],
        ),
        (
            "the original method twice",
            vec![
                ("X-Original-Method", "GET"),
                ("X-Original-Method", "POST"),
                ("X-Original-URL", "https://api.example.com/v1/search"),
                key,
            ],
        ),
    ];
    for (what, headers) in cases {
        refused(&request(addr, "GET", "/nginx", &headers).await.unwrap(), what);
    }
    for forged in
        ["x-tollgate-account", "x-tollgate-degraded", "x-tollgate-whatever", "x-tollgate_account", "X_Tollgate_Plan"]
    {
        refused(&nginx(addr, "GET", "/v1/search", &[key, (forged, "acct_pro")]).await, forged);
        refused(&nginx(addr, "GET", "/public/docs", &[(forged, "1")]).await, forged);
    }
    // Not UTF-8: the URL cannot be read.
    let raw = b"GET /nginx HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Original-Method: GET\r\nX-Original-URL: https://api.example.com/v1/search\xff\r\nX-Api-Key: pro-key\r\n\r\n";
    let head = raw_exchange(addr, raw).await;
    assert!(head.starts_with("HTTP/1.1 403") && head.to_lowercase().contains("x-tollgate-status: 400"), "{head}");
    assert_eq!(metric(s.http, "tollgate_door_decisions_total{door=\"nginx\",status=\"200\"}").await, 0.0);
    // A header only another door reads may come twice: it is the upstream's.
    let r = nginx(addr, "GET", "/v1/search", &[key, ("X-Forwarded-Uri", "/a"), ("X-Forwarded-Uri", "/b")]).await;
    assert_eq!(r.status, 200, "{r:?}");
    s.stop().await;
}

#[tokio::test]
async fn what_the_door_cannot_read_is_400_never_an_allow() {
    let (s, addr) = door().await;
    let key = ("X-Api-Key", "pro-key");
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("no forwarded uri", vec![("X-Forwarded-Method", "GET"), key]),
        ("no forwarded method", vec![("X-Forwarded-Uri", "/v1/search"), key]),
        ("a relative uri", vec![("X-Forwarded-Method", "GET"), ("X-Forwarded-Uri", "v1/search"), key]),
        ("an absolute URL", vec![("X-Forwarded-Method", "GET"), ("X-Forwarded-Uri", "http://x/v1/search"), key]),
        ("dot segments", vec![("X-Forwarded-Method", "GET"), ("X-Forwarded-Uri", "/public/../v1/search"), key]),
        ("encoded slash", vec![("X-Forwarded-Method", "GET"), ("X-Forwarded-Uri", "/v1%2Fsearch"), key]),
        (
            "a forwarded uri twice",
            vec![
                ("X-Forwarded-Method", "GET"),
                ("X-Forwarded-Uri", "/healthz"),
                ("X-Forwarded-Uri", "/v1/search"),
                key,
            ],
        ),
        (
            "a forwarded method twice",
            vec![("X-Forwarded-Method", "GET"), ("X-Forwarded-Method", "POST"), ("X-Forwarded-Uri", "/v1/search"), key],
        ),
        (
            "a forwarded host twice",
            vec![
                ("X-Forwarded-Method", "GET"),
                ("X-Forwarded-Uri", "/v1/search"),
                ("X-Forwarded-Host", "api.example.com"),
                ("X-Forwarded-Host", "other.example.com"),
                key,
            ],
        ),
    ];
    for (what, headers) in cases {
        let r = request(addr, "GET", "/traefik", &headers).await.unwrap();
        assert_eq!(r.status, 400, "{what}: {r:?}");
        assert_eq!(r.json()["code"], "request_invalid", "{what}");
    }
    // Host is what Envoy's HTTP ext_authz says the request's host is.
    let raw = b"GET /envoy/v1/search HTTP/1.1\r\nHost: api.example.com\r\nHost: other.example.com\r\nConnection: close\r\nX-Api-Key: pro-key\r\n\r\n";
    let head = raw_exchange(addr, raw).await;
    assert!(head.starts_with("HTTP/1.1 400"), "Host twice: {head}");
    let once =
        b"GET /envoy/v1/search HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\nX-Api-Key: pro-key\r\n\r\n";
    assert!(raw_exchange(addr, once).await.starts_with("HTTP/1.1 200"), "Host once");
    // A header only another door reads may come twice: it is the upstream's.
    let r =
        traefik_with(addr, "/v1/search", &[key, ("X-Original-URL", "https://a/"), ("X-Original-URL", "https://b/")])
            .await;
    assert_eq!(r.status, 200, "{r:?}");
    // A header value that is not UTF-8: the URI cannot be read.
    let raw = b"GET /traefik HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Forwarded-Method: GET\r\nX-Forwarded-Uri: /v1/search\xff\r\nX-Api-Key: pro-key\r\n\r\n";
    let head = raw_exchange(addr, raw).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    // Oversized headers: refused by the HTTP layer (431), never decided.
    let big = "a".repeat(70_000);
    let r = request(
        addr,
        "GET",
        "/traefik",
        &[("X-Forwarded-Method", "GET"), ("X-Forwarded-Uri", "/v1/search"), ("X-Big", &big)],
    )
    .await;
    assert!(r.is_err() || r.as_ref().is_ok_and(|r| r.status == 431), "{r:?}");
    // Another path is not a door.
    assert_eq!(request(addr, "GET", "/v1/search", &[key]).await.unwrap().status, 404);
    let allowed = metric(s.http, "tollgate_door_decisions_total{door=\"traefik\",status=\"200\"}").await;
    assert_eq!(allowed, 1.0, "the one request above with a doubled header only nginx reads");
    s.stop().await;
}

/// A header sent twice reads as on Envoy's gRPC door (its copies joined by
/// `,`), not as its first copy: two keys are one key nobody has (401,
/// nothing spent), and an `authorization` that carries `Bearer` in any copy
/// is the client's credential, removed before the upstream.
#[tokio::test]
async fn a_credential_sent_twice_is_one_value_no_key_has() {
    let (s, addr) = door().await;
    let forwarded = [("X-Forwarded-Method", "GET"), ("X-Forwarded-Uri", "/v1/search")];
    for keys in [[("X-Api-Key", "pro-key"), ("X-Api-Key", "free-key")], [("Authorization", "Bearer pro-key"); 2]] {
        let r = request(addr, "GET", "/traefik", &[&forwarded[..], &keys].concat()).await.unwrap();
        problem(&r, 401, "credentials_invalid");
    }
    let both = [("x-api-key", "pro-key"), ("authorization", "Basic Zm9v"), ("authorization", "Bearer free-key")];
    let r = request(addr, "GET", "/envoy/v1/search", &both).await.unwrap();
    assert_eq!((r.status, r.header("x-tollgate-account")), (200, Some("acct_pro")), "{r:?}");
    let remove = r.header("x-envoy-auth-headers-to-remove").unwrap_or("");
    assert!(remove.split(',').any(|h| h == "authorization"), "{remove}");
    assert_eq!(metric(s.http, "tollgate_door_decisions_total{door=\"traefik\",status=\"200\"}").await, 0.0);
    s.stop().await;
}

/// Traefik cannot run here, so its shipped config is read: the regex it
/// strips client headers by (before copying tollgate's) matches every
/// spelling of tollgate's names as Go hands them to Traefik (canonicalised;
/// underscores kept, which CGI-style upstreams read as dashes) and nothing
/// else, and the middleware after tollgate blanks every credential header
/// the shipped identity reads and the x402 payment headers.
#[test]
fn the_shipped_traefik_config_strips_every_spelling_and_every_credential() {
    let file = format!("{}/deploy/traefik/dynamic.yaml", env!("CARGO_MANIFEST_DIR"));
    let doc: serde_json::Value = serde_yaml_ng::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let middlewares = &doc["http"]["middlewares"];
    let pattern = middlewares["tollgate"]["forwardAuth"]["authResponseHeadersRegex"].as_str().unwrap();
    let strips = regex::Regex::new(pattern).unwrap();
    for name in ["X-Tollgate-Account", "X-Tollgate-Plan", "X_tollgate_account", "X_tollgate-plan", "X-Tollgate_payer"] {
        assert!(strips.is_match(name), "{pattern} keeps {name}");
    }
    for name in ["X-Api-Key", "Authorization", "X-Tollgateaccount", "X-Forwarded-Tollgate-Plan", "Tollgate-Signature"] {
        assert!(!strips.is_match(name), "{pattern} strips {name}");
    }
    let blanked = middlewares["strip-credentials"]["headers"]["customRequestHeaders"].as_object().unwrap();
    let blanked: Vec<String> =
        blanked.iter().filter(|(_, v)| v.as_str() == Some("")).map(|(k, _)| k.to_ascii_lowercase()).collect();
    let configmap =
        std::fs::read_to_string(format!("{}/deploy/k8s/configmap.yaml", env!("CARGO_MANIFEST_DIR"))).unwrap();
    for header in ["x-api-key", "authorization", "payment-signature", "x-payment"] {
        assert!(blanked.contains(&header.to_owned()), "{header} reaches the upstream: {blanked:?}");
    }
    for line in
        configmap.lines().filter(|l| l.contains("api_key: { header: ") || l.contains("trusted_header: { header: "))
    {
        let header = line.split("header: ").nth(1).and_then(|h| h.split([',', ' ', '}']).next()).unwrap();
        assert!(blanked.contains(&header.to_owned()), "the shipped identity reads {header}, Traefik passes it on");
    }
}

/// Asserted identities are never honoured on the HTTP door: Traefik forwards
/// every client header, so a `trusted_header` there is the client's word,
/// even under `trusted_callers: any`.
#[tokio::test]
async fn a_client_cannot_assert_an_identity_through_the_http_door() {
    let addr = free_addr();
    let yaml = spec_config() + &format!("server: {{ authz_http_listen: \"{addr}\", trusted_callers: any }}\n");
    let s = TestServer::start(&yaml).await;
    let r = request(
        addr,
        "GET",
        "/traefik",
        &[("X-Forwarded-Method", "GET"), ("X-Forwarded-Uri", "/v1/search"), ("x-account-id", "acct_pro")],
    )
    .await
    .unwrap();
    problem(&r, 401, "credentials_missing");
    let r = request(addr, "GET", "/envoy/v1/search", &[("x-account-id", "acct_pro")]).await.unwrap();
    problem(&r, 401, "credentials_missing");
    // Over gRPC from a trusted caller the same header names the account (what the door must not do).
    let a = tollgate_testkit::Answer::of(
        &s.check(tollgate_testkit::http_check("GET", "/v1/search", &[("x-account-id", "acct_pro")])).await,
    );
    assert!(a.allowed, "{a:?}");
    s.stop().await;
}
