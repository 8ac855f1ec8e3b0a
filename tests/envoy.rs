//! End to end with a real Envoy (the ext_authz filter configured as in
//! `deploy/envoy/envoy.yaml`) in front of tollgate and an echo upstream: what
//! a plain HTTP client sees for every decision row, what the upstream
//! receives, JWT identity through `jwt_authn`, and Envoy's failure modes.

use std::net::SocketAddr;

use tollgate_testkit::envoy::{self, Envoy, Options, Response, Stack, echo_upstream};
use tollgate_testkit::front::{assert_problem, deny_rows, store_down_row};
use tollgate_testkit::process::{TollgateProcess, free_addr};
use tollgate_testkit::redis::RedisServer;
use tollgate_testkit::{TestServer, eventually, metric, rollout_config, spec_config};

const JWT_IDENTITY: &str =
    "  - jwt_claim: { namespace: envoy.filters.http.jwt_authn, field: jwt_payload, claim: org_id }\n";

async fn stack_with(yaml: &str, opts: Options) -> Stack {
    Stack::start(yaml, |tollgate, upstream| envoy::config(tollgate, upstream, opts)).await
}

async fn stack() -> Stack {
    stack_with(&spec_config(), Options::default()).await
}

fn jwt(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jwt").join(name);
    std::fs::read_to_string(path).unwrap().trim().to_owned()
}

#[tokio::test]
async fn allowed_request_reaches_the_upstream_with_identity_and_without_the_key() {
    let s = stack().await;
    let r = s.get("/v1/search?q=envoy", &[("x-api-key", "pro-key"), ("x-tollgate-plan", "forged")]).await;
    assert_eq!(r.status, 200, "{r:?}");
    let upstream = r.json();
    let h = &upstream["headers"];
    assert_eq!(h["x-tollgate-account"], "acct_pro");
    assert_eq!(h["x-tollgate-plan"], "pro", "a client cannot forge the plan");
    assert!(h.get("x-api-key").is_none(), "the key never reaches the upstream: {h}");
    assert_eq!(upstream["path"], "/v1/search?q=envoy");
    assert!(r.header("ratelimit-policy").is_some_and(|p| p.starts_with("\"requests-month\";q=1000000;w=")), "{r:?}");
    assert!(r.header("ratelimit").is_some_and(|p| p.starts_with("\"requests-month\";r=999999;t=")), "{r:?}");
    s.stop().await;
}

#[tokio::test]
async fn public_route_reaches_the_upstream_without_a_key() {
    let s = stack().await;
    let r = s.get("/public/docs", &[("x-tollgate-account", "acct_pro")]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.json()["headers"].get("x-tollgate-account").is_none(), "forged identity removed");
    s.stop().await;
}

#[tokio::test]
async fn every_deny_row_reaches_the_client_with_status_body_and_headers() {
    rows(stack().await).await;
}

/// The same rows with tollgate on Redis, exact counting.
#[tokio::test]
async fn every_deny_row_through_envoy_on_redis_exact() {
    let redis = RedisServer::start();
    rows(redis_stack(&format!("{{ backend: redis, url: \"{}\" }}", redis.url())).await).await;
}

/// The same rows with tollgate on Redis, lease counting (quotas and credits leased).
#[tokio::test]
async fn every_deny_row_through_envoy_on_redis_lease() {
    let redis = RedisServer::start();
    rows(redis_stack(&format!("{{ backend: redis, url: \"{}\", counting: lease }}", redis.url())).await).await;
}

/// The decision table through the stack's Envoy; then the stack stops.
async fn rows(s: Stack) {
    deny_rows(&s.envoy).await;
    s.stop().await;
}

/// Envoy in front of tollgate on the spec config with `store:` as given, seeded.
async fn redis_stack(store: &str) -> Stack {
    let yaml = spec_config() + &format!("store: {store}\n");
    let tollgate = TestServer::start_configured(&yaml, true).await;
    let s = Stack::around(tollgate, |tollgate, upstream| envoy::config(tollgate, upstream, Options::default())).await;
    s.envoy.wait_cluster_healthy("tollgate").await;
    s
}

#[tokio::test]
async fn billing_warning_reaches_the_client_in_grace() {
    let s = stack().await;
    let r = s.get("/v1/search", &[("x-api-key", "grace-key")]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.header("x-tollgate-billing-warning").is_some_and(|w| w.starts_with("payment_overdue; grace_ends_at=")),
        "{r:?}"
    );
    assert_eq!(r.json()["headers"]["x-tollgate-account"], "acct_grace");
    s.stop().await;
}

#[tokio::test]
async fn a_verified_jwt_names_the_account_through_jwt_authn() {
    // Only Envoy reaches tollgate here (loopback), so the test vouches for every caller.
    let yaml = spec_config().replace("identity:\n", &format!("identity:\n{JWT_IDENTITY}"))
        + "server: { trusted_callers: any }\n";
    let s = stack_with(&yaml, Options { jwt: true, ..Options::default() }).await;

    let bearer = format!("Bearer {}", jwt("acct_pro.jwt"));
    let r = s.get("/v1/search", &[("authorization", &bearer)]).await;
    assert_eq!(r.status, 200, "{r:?}\n{}", s.envoy.log());
    assert_eq!(r.json()["headers"]["x-tollgate-account"], "acct_pro");
    assert!(r.json()["headers"].get("authorization").is_none(), "jwt_authn does not forward the token");

    let r = s.envoy.send("POST", "/v1/ai/x", &[("authorization", &format!("Bearer {}", jwt("acct_free.jwt")))]).await;
    assert_problem(&r, 402, "feature_not_in_plan");

    // No JWT (and no key) on a route that needs an identity: tollgate's 401, with its body.
    assert_problem(&s.get("/v1/search", &[]).await, 401, "credentials_missing");
    // A JWT that fails verification earns no identity.
    let r = s.get("/v1/search", &[("authorization", &format!("Bearer {}", jwt("wrong_issuer.jwt")))]).await;
    assert_problem(&r, 401, "credentials_invalid");
    // API keys still work beside JWTs.
    assert_eq!(s.get("/v1/search", &[("authorization", "Bearer pro-key")]).await.status, 200);
    s.stop().await;
}

async fn dead_tollgate(opts: Options) -> (Envoy, SocketAddr) {
    // A port nothing listens on: tollgate is down.
    let dead = free_addr();
    let upstream = echo_upstream().await;
    (Envoy::start(&envoy::config(dead, upstream, opts)).await, upstream)
}

#[tokio::test]
async fn tollgate_down_fails_closed_with_status_on_error() {
    let (envoy, _) = dead_tollgate(Options::default()).await;
    let r = envoy.send("GET", "/v1/search", &[("x-api-key", "pro-key")]).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(envoy.send("GET", "/healthz", &[]).await.status, 200, "ext_authz is disabled on /healthz");
}

/// Under `failure_mode_allow`, Envoy lets requests through without tollgate's
/// answer, so nothing makes it pick the route again after the Check: a forged
/// plan must be gone before the first pick, or it would choose the premium upstream.
#[tokio::test]
async fn tollgate_down_passes_requests_under_failure_mode_allow() {
    let premium = envoy::named_upstream("premium").await;
    let (dead, app) = (free_addr(), echo_upstream().await);
    let config = envoy::config(dead, app, Options { failure_mode_allow: true, ..Options::default() });
    let envoy = Envoy::start(&premium_at(config, app, premium)).await;
    let r = envoy.send("GET", "/v1/search", &[("x-api-key", "pro-key")]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.json()["headers"].get("x-tollgate-account").is_none());
    for forged in ["x-tollgate-plan", "X-Tollgate-Plan"] {
        let r = envoy.send("GET", "/v1/search", &[("x-api-key", "pro-key"), (forged, "pro")]).await;
        assert_eq!((r.status, r.json()["upstream"].as_str()), (200, Some("app")), "{forged}: {r:?}");
        assert!(r.json()["headers"].get("x-tollgate-plan").is_none(), "{r:?}");
    }
}

/// Under `failure_mode_allow` the client's API key reaches the upstream
/// (only tollgate's answer removes it); the edit the shipped configs name
/// next to the flag keeps every credential from the upstream on every
/// route, and the Check still sees them while tollgate answers.
#[tokio::test]
async fn under_failure_mode_allow_the_documented_edit_keeps_the_key_from_the_upstream() {
    let edit = "`request_headers_to_remove: [x-api-key, authorization, payment-signature, x-payment]`";
    let vhost = "                    - name: app\n                      domains: [\"*\"]\n";
    let edited = |config: String| {
        assert!(config.contains(edit) && config.contains(vhost), "the config says so, where");
        let removal = "                      request_headers_to_remove: [x-api-key, authorization, payment-signature, x-payment]\n";
        config.replace(vhost, &format!("{vhost}{removal}"))
    };
    let creds: [&[(&str, &str)]; 3] = [
        &[("x-api-key", "pro-key")],
        &[("authorization", "Bearer pro-key")],
        &[("x-api-key", "pro-key"), ("payment-signature", "e30="), ("x-payment", "e30=")],
    ];
    let (dead, app) = (free_addr(), echo_upstream().await);
    let config = envoy::config(dead, app, Options { failure_mode_allow: true, ..Options::default() });
    let envoy = Envoy::start(&config).await;
    let r = envoy.send("GET", "/v1/search", creds[0]).await;
    assert_eq!(r.json()["headers"]["x-api-key"], "pro-key", "why the edit: {r:?}");
    drop(envoy);
    let envoy = Envoy::start(&edited(config)).await;
    for (path, creds) in ["/v1/search", "/public/docs", "/healthz"].into_iter().flat_map(|p| creds.map(|c| (p, c))) {
        let r = envoy.send("GET", path, creds).await;
        assert_eq!(r.status, 200, "{path}: {r:?}");
        let seen = &r.json()["headers"];
        for h in ["x-api-key", "authorization", "payment-signature", "x-payment"] {
            assert!(seen.get(h).is_none(), "{path}: {h}: {r:?}");
        }
    }
    drop(envoy);
    // With tollgate answering, the Check still reads the key: the removal is the router's, after it.
    let s = Stack::start(&spec_config(), |t, u| {
        edited(envoy::config(t, u, Options { failure_mode_allow: true, ..Options::default() }))
    })
    .await;
    for creds in creds {
        let r = s.get("/v1/search", creds).await;
        assert_eq!((r.status, r.json()["headers"]["x-tollgate-account"].as_str()), (200, Some("acct_pro")), "{r:?}");
    }
    assert_eq!(s.get("/v1/search", &[]).await.status, 401, "no key, no pass");
    s.stop().await;
}

/// `config` with its `app-premium` cluster (the app, as shipped) pointed at `premium`.
fn premium_at(config: String, app: SocketAddr, premium: SocketAddr) -> String {
    let at = config.find("    - name: app-premium\n").expect("an app-premium cluster");
    let (head, tail) = config.split_at(at);
    head.to_owned()
        + &tail.replacen(&format!("port_value: {}", app.port()), &format!("port_value: {}", premium.port()), 1)
}

#[tokio::test]
async fn redis_backed_tollgate_behind_envoy_meters_exactly() {
    let redis = RedisServer::start();
    meters_exactly(redis_stack(&format!("{{ backend: redis, url: \"{}\" }}", redis.url())).await).await;
}

#[tokio::test]
async fn lease_mode_tollgate_behind_envoy_meters_exactly() {
    let redis = RedisServer::start();
    meters_exactly(redis_stack(&format!("{{ backend: redis, url: \"{}\", counting: lease }}", redis.url())).await)
        .await;
}

async fn meters_exactly(s: Stack) {
    for i in 0..5 {
        let r = s.get("/v1/search", &[("x-api-key", "free-key")]).await;
        assert_eq!(r.status, 200, "request {i}: {r:?}");
        assert_eq!(r.json()["headers"]["x-tollgate-account"], "acct_free");
    }
    let r = s.get("/v1/search", &[("x-api-key", "free-key")]).await;
    assert_problem(&r, 402, "quota_exhausted");
    s.stop().await;
}

/// Route by plan (deploy/envoy/envoy.yaml): Envoy picks the route again after
/// the Check, on the plan tollgate set: a pro key reaches the premium
/// upstream, a free key the default one, and a client that sends the plan
/// header itself still lands where its own plan (or none) sends it.
#[tokio::test]
async fn premium_plans_reach_their_own_upstream_and_clients_cannot_pick_it() {
    let tollgate = TestServer::start(&spec_config()).await;
    let premium = envoy::named_upstream("premium").await;
    // The shipped app-premium cluster points at the app; here at its own upstream.
    let s = Stack::around(tollgate, |t, u| premium_at(envoy::config(t, u, Options::default()), u, premium)).await;
    s.envoy.wait_cluster_healthy("tollgate").await;
    let upstream = |r: &Response| r.json()["upstream"].as_str().unwrap_or("?").to_owned();
    let r = s.get("/v1/search", &[("x-api-key", "pro-key")]).await;
    assert_eq!((r.status, upstream(&r).as_str()), (200, "premium"), "{r:?}");
    let r = s.get("/v1/search", &[("x-api-key", "grace-key")]).await;
    assert_eq!((r.status, upstream(&r).as_str()), (200, "premium"), "a pro account in grace: {r:?}");
    let r = s.get("/v1/search", &[("x-api-key", "free-key")]).await;
    assert_eq!((r.status, upstream(&r).as_str()), (200, "app"), "{r:?}");
    // The plan header sent by the client decides nothing.
    for forged in ["x-tollgate-plan", "X-Tollgate-Plan"] {
        let r = s.get("/v1/search", &[("x-api-key", "free-key"), (forged, "pro")]).await;
        assert_eq!((r.status, upstream(&r).as_str()), (200, "app"), "{forged}: {r:?}");
        assert_eq!(r.json()["headers"]["x-tollgate-plan"], "free");
        let r = s.get("/public/docs", &[(forged, "pro")]).await;
        assert_eq!((r.status, upstream(&r).as_str()), (200, "app"), "a public route, {forged}: {r:?}");
        assert!(r.json()["headers"].get("x-tollgate-plan").is_none());
        let r = s.get("/v1/search", &[(forged, "pro")]).await;
        assert_eq!(r.status, 401, "no key: denied wherever the route would go");
    }
    s.stop().await;
}

/// Shadow mode through Envoy (issue 12), on the real binary so that a reload
/// is a SIGHUP: a shadowed route lets an over-quota, feature-less or
/// out-of-credits caller through with the would-be code for the upstream, in
/// `/metrics` and in one log line each, while the enforced route next to it
/// denies and an unknown key still gets 401; the operator's opt-out lets
/// that through too; turning shadow off enforces at once.
#[tokio::test]
async fn a_shadowed_route_lets_would_be_denials_through_until_a_reload_turns_it_off() {
    let write =
        |grpc, http, body: &str| format!("server: {{ grpc_listen: \"{grpc}\", http_listen: \"{http}\" }}\n{body}");
    let bin = env!("CARGO_BIN_EXE_tollgate");
    let env = [("TOLLGATE_LOG", "error,tollgate::shadow=info")];
    let tollgate = TollgateProcess::start_env(bin, &[], &env, |g, h| write(g, h, &rollout_config())).await;
    let envoy = Envoy::start(&envoy::config(tollgate.grpc, echo_upstream().await, Options::default())).await;
    envoy.wait_cluster_healthy("tollgate").await;
    let get = async |path: &str, key: &str| envoy.send("GET", path, &[("x-api-key", key)]).await;
    let shadow = |r: &Response| r.json()["headers"]["x-tollgate-shadow"].as_str().map(str::to_owned);

    for i in 0..5 {
        assert_eq!(get("/v1/search", "free-key").await.status, 200, "request {i}");
    }
    assert_problem(&get("/v1/search", "free-key").await, 402, "quota_exhausted");
    for (path, key, would_be) in [
        ("/v1/trial", "free-key", "quota_exhausted"),
        ("/v1/trial-export", "free-key", "feature_not_in_plan"),
        ("/v1/trial", "broke-key", "insufficient_credits"),
    ] {
        let r = get(path, key).await;
        assert_eq!((r.status, shadow(&r).as_deref()), (200, Some(would_be)), "{path} {key}: {r:?}");
        assert!(r.header("x-tollgate-shadow").is_none(), "the client is not told");
    }
    let r = envoy.send("GET", "/v1/search", &[("x-api-key", "pro-key"), ("x-tollgate-shadow", "forged")]).await;
    assert_eq!((r.status, shadow(&r)), (200, None), "a client's copy never reaches the upstream");
    assert_problem(&get("/v1/trial", "no-such-key").await, 401, "credentials_invalid");

    let line = "tollgate_shadow_decisions_total{status=\"402\",code=\"quota_exhausted\"}";
    assert_eq!(metric(tollgate.http, line).await, 1.0);
    let logged = |log: &str, code: &str| {
        log.lines().filter(|l| l.contains("shadow mode let through") && l.contains(&format!("code={code}"))).count()
    };
    eventually("three shadow log lines", std::time::Duration::from_secs(5), async || {
        let log = tollgate.log();
        ["quota_exhausted", "feature_not_in_plan", "insufficient_credits"].iter().all(|c| logged(&log, c) == 1)
    })
    .await;
    assert_eq!(logged(&tollgate.log(), "credentials_invalid"), 0, "enforced: nothing was let through");

    let reload = |body: String, n: f64| {
        std::fs::write(&tollgate.file, write(tollgate.grpc, tollgate.http, &body)).unwrap();
        let ok = std::process::Command::new("kill").args(["-HUP", &tollgate.child.id().to_string()]).status();
        assert!(ok.unwrap().success());
        eventually("the reload", std::time::Duration::from_secs(10), async move || {
            metric(tollgate.http, "tollgate_config_reloads_total{result=\"ok\"}").await >= n
        })
    };
    // The operator opts out of enforcing credentials in shadow mode.
    reload(format!("{}shadow_security: true\n", rollout_config()), 1.0).await;
    let r = get("/v1/trial", "no-such-key").await;
    assert_eq!((r.status, shadow(&r).as_deref()), (200, Some("credentials_invalid")), "{r:?}");
    assert_problem(&get("/v1/search", "no-such-key").await, 401, "credentials_invalid");
    // Shadow off: the same requests are denied at once.
    reload(rollout_config().replace(", shadow: true }", " }"), 2.0).await;
    assert_problem(&get("/v1/trial", "free-key").await, 402, "quota_exhausted");
    assert_problem(&get("/v1/trial-export", "free-key").await, 402, "feature_not_in_plan");
    assert_problem(&get("/v1/trial", "broke-key").await, 402, "insufficient_credits");
    assert_problem(&get("/v1/trial", "no-such-key").await, 401, "credentials_invalid");
}

/// A soft limit through Envoy: limit 10, ceiling 15. The client sees the
/// warning and honest RateLimit headers, the upstream the overage header,
/// and request 16 a 402 whose body shows the overage.
#[tokio::test]
async fn a_soft_limit_warns_the_client_and_tells_the_upstream_then_stops_at_the_ceiling() {
    let s = stack_with(&rollout_config(), Options::default()).await;
    for n in 1..=15u64 {
        let r = s.get("/v1/search", &[("x-api-key", "soft-key"), ("x-tollgate-overage", "forged")]).await;
        assert_eq!(r.status, 200, "request {n}: {r:?}");
        let upstream = r.json()["headers"]["x-tollgate-overage"].as_str().map(str::to_owned);
        let warning = r.header("x-tollgate-billing-warning");
        if n <= 10 {
            assert_eq!((upstream, warning), (None, None), "request {n}: {r:?}");
            continue;
        }
        assert_eq!(upstream.as_deref(), Some(format!("\"requests-month\";units=1;overage={}", n - 10).as_str()));
        let want = format!("quota_overage; policy=\"requests-month\"; limit=10; overage={}; ceiling=15", n - 10);
        assert_eq!(warning, Some(want.as_str()), "request {n}");
        assert!(r.header("ratelimit").is_some_and(|h| h.contains(";r=0;")), "{r:?}");
    }
    let r = s.get("/v1/search", &[("x-api-key", "soft-key")]).await;
    let body = assert_problem(&r, 402, "quota_exhausted");
    assert_eq!((body["quota"]["overage"].as_u64(), body["quota"]["ceiling"].as_u64()), (Some(5), Some(15)), "{body}");
    s.stop().await;
}

/// Envoy's HTTP ext_authz (`deploy/envoy/envoy-http-authz.yaml`) against
/// tollgate's HTTP door on Redis: every deny row as over gRPC, an allowed
/// request reaches the upstream with tollgate's headers and without the
/// key, and with Redis gone the client gets 503.
#[tokio::test]
async fn over_envoy_s_http_ext_authz_every_row_is_as_over_grpc() {
    let mut redis = RedisServer::start();
    let (tollgate, door) = tollgate_testkit::spec_door_on(&redis).await;
    let s = Stack::around(tollgate, |t, u| envoy::http_door_config(t, door, u, Options::default())).await;
    s.envoy.wait_cluster_healthy("tollgate").await;
    let r = s.get("/v1/search", &[("x-api-key", "pro-key"), ("x-tollgate-account", "acct_forged")]).await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = &r.json()["headers"];
    assert_eq!(
        (seen["x-tollgate-account"].as_str(), seen["x-tollgate-plan"].as_str()),
        (Some("acct_pro"), Some("pro"))
    );
    assert!(seen.get("x-api-key").is_none(), "the key never reaches the upstream: {seen}");
    assert!(r.header("ratelimit-policy").is_some(), "{r:?}");
    let r = s.get("/v1/search", &[("x-api-key", "grace-key")]).await;
    assert!(r.header("x-tollgate-billing-warning").is_some_and(|w| w.starts_with("payment_overdue")), "{r:?}");
    let m = tollgate_testkit::http::metric(
        s.tollgate.http,
        "tollgate_door_decisions_total{door=\"envoy_http\",status=\"200\"}",
    );
    assert_eq!(m.await, 2.0);
    deny_rows(&s.envoy).await;
    // Envoy takes a 5xx from an HTTP authorization service as a failed
    // call: `status_on_error` (503) without tollgate's body, and
    // `failure_mode_allow` decides, as when tollgate is down.
    redis.kill();
    let r = store_down_row(&s.envoy).await;
    assert_eq!(r.body, "", "{r:?}");
    s.stop().await;
}

/// `config` with its stdout access log written to `file` instead, in the
/// shipped format: what an operator's log collector reads.
fn access_log_to(config: &str, file: &std::path::Path) -> String {
    let stdout = "\"@type\": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog";
    let line = config.lines().find(|l| l.trim() == stdout).expect("the shipped config logs to stdout");
    let indent = &line[..line.len() - line.trim_start().len()];
    let file_log = format!(
        "{indent}\"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog\n{indent}path: {}",
        file.display()
    );
    config.replacen(line, &file_log, 1)
}

/// The access log's lines, once it holds `n`: Envoy writes its log files
/// every 10 s (`--file-flush-interval-msec`), so this waits up to 15.
async fn logged(file: &std::path::Path, n: usize) -> Vec<String> {
    let read = || std::fs::read_to_string(file).unwrap_or_default().lines().map(str::to_owned).collect::<Vec<_>>();
    let within = std::time::Duration::from_secs(15);
    eventually(&format!("{n} lines in {}", file.display()), within, async || read().len() >= n).await;
    read()
}

/// The shipped access logs say who made each request: over gRPC from the
/// answer's metadata (account, plan, decision), over the HTTP door (whose
/// answers carry none) from the request headers tollgate set. A client's
/// own `x-tollgate-*` headers never show up in them.
#[tokio::test]
async fn the_shipped_access_logs_name_the_account_and_plan_tollgate_decided() {
    let dir = tollgate_testkit::process::temp_dir("access-log");
    let (grpc_log, http_log) = (dir.join("grpc.log"), dir.join("http.log"));
    let spec = spec_config();
    let grpc = Stack::start(&spec, |t, u| access_log_to(&envoy::config(t, u, Options::default()), &grpc_log));
    let door = free_addr();
    let yaml = format!("{spec}server: {{ authz_http_listen: \"{door}\" }}\n");
    let http =
        Stack::start(&yaml, |t, u| access_log_to(&envoy::http_door_config(t, door, u, Options::default()), &http_log));
    let (grpc, http) = tokio::join!(grpc, http);
    let forged = [("x-tollgate-account", "acct_forged"), ("x-tollgate-plan", "forged")];
    for s in [&grpc, &http] {
        assert_eq!(s.get("/v1/search", &[("x-api-key", "pro-key"), forged[0], forged[1]]).await.status, 200);
        assert_eq!(s.get("/v1/search", &forged).await.status, 401);
    }
    let (grpc_lines, http_lines) = tokio::join!(logged(&grpc_log, 2), logged(&http_log, 2));
    assert!(grpc_lines[0].ends_with(" 200 account=acct_pro plan=pro decision=allowed"), "{grpc_lines:?}");
    assert!(grpc_lines[1].ends_with(" 401 account=- plan=- decision=credentials_missing"), "{grpc_lines:?}");
    assert!(http_lines[0].ends_with(" 200 account=acct_pro plan=pro"), "{http_lines:?}");
    assert!(http_lines[1].ends_with(" 401 account=- plan=-"), "{http_lines:?}");
    grpc.stop().await;
    http.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
