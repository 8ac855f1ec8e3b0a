//! The paywall from the outside: a real Envoy built from the shipped
//! `deploy/envoy/envoy.yaml` (only its ports rewritten) in front of tollgate
//! and an echo upstream that reports the path and headers it received. Every
//! request here carries no valid credential, or a forged one, and the
//! assertions are on what the upstream got.
//!
//! What the edge config alone must stop (normalization, the header filter,
//! the exact health route) is asserted in the plain tests. Assertions that
//! rely on tollgate's own second layer (it removes every `x-tollgate-*` and
//! the credential header it sees) live in tests whose names end with
//! `_with_tollgate_second_layer`.

use futures_util::future::join_all;
use tollgate_testkit::envoy::{self, Options, Pki, Response, Stack};
use tollgate_testkit::{TestServer, spec_config};

/// Paths that a lax proxy and a lax upstream read differently: each one names
/// a paid route (`/v1/ai`) to an upstream that resolves dot segments, decodes
/// escapes, drops `;` parameters or merges slashes, while starting with a
/// public or unauthorized-looking prefix.
const PATH_CONFUSION: &[&str] = &[
    "/public/../v1/ai/chat",
    "/public/./../v1/ai/chat",
    "/public/../../v1/ai/chat",
    "/public//../v1/ai/chat",
    "/public/%2e%2e/v1/ai/chat",
    "/public/%2E%2E/v1/ai/chat",
    "/public/.%2e/v1/ai/chat",
    "/public/%2e./v1/ai/chat",
    "/public%2f..%2fv1%2fai%2fchat",
    "/public%2F..%2Fv1%2Fai%2Fchat",
    "/public%2f..%2Fv1%2fai%2Fchat",
    "/public/..%2fv1/ai/chat",
    "/public/..%5cv1/ai/chat",
    "/public/..%5Cv1/ai/chat",
    "/public/..\\v1/ai/chat",
    "/public\\..\\v1\\ai\\chat",
    "/public/%2e%2e%2fv1/ai/chat",
    "/public/..;/v1/ai/chat",
    "/public/.;/../v1/ai/chat",
    "/public/..;x=1/v1/ai/chat",
    "/public/%2e%2e;/v1/ai/chat",
    "/public/%252e%252e/v1/ai/chat",
    "/public/..%252fv1/ai/chat",
    "/public/..%255cv1/ai/chat",
    "//v1/ai/chat",
    "///v1//ai/chat",
    "/v1//ai/chat",
    "http://api.example.com/public/../v1/ai/chat",
    "/healthz/../v1/ai/chat",
    "/healthz/./../v1/ai/chat",
    "/healthz/%2e%2e/v1/ai/chat",
    "/healthz%2f..%2fv1%2fai%2fchat",
    "/healthz%2F..%2Fv1%2Fai%2Fchat",
    "/healthz/..%5cv1/ai/chat",
    "/healthz/..;/v1/ai/chat",
    "/healthz;/../v1/ai/chat",
    "/healthz//../v1/ai/chat",
    "/healthzz/../v1/ai/chat",
];

/// The forged headers a client may try, in the spellings upstreams accept.
const FORGED: &[(&str, &str)] = &[
    // Values no real answer carries, so a forged one is told from tollgate's.
    ("x-tollgate-account", "acct_forged"),
    ("X-Tollgate-Plan", "forged-plan"),
    ("x-tollgate-degraded", "store_unavailable"),
    ("x-tollgate-billing-warning", "none"),
    ("x-tollgate-anything", "forged"),
    ("X-TOLLGATE-ANYTHING-ELSE", "forged"),
    // CGI-style upstreams (Rack, WSGI, PHP) read this as x-tollgate-account.
    ("x_tollgate_account", "acct_forged_underscore"),
];

/// tollgate on the spec config behind Envoy on the shipped config.
async fn stack() -> Stack {
    stack_with_config(|c| c).await
}

/// A stack whose Envoy config is the shipped one after `edit`.
async fn stack_with_config(edit: impl FnOnce(String) -> String) -> Stack {
    stack_with(&spec_config(), edit).await
}

/// tollgate on `tollgate_config` behind Envoy on the shipped config after `edit`.
async fn stack_with(tollgate_config: &str, edit: impl FnOnce(String) -> String) -> Stack {
    Stack::start(tollgate_config, |tollgate, upstream| edit(envoy::config(tollgate, upstream, Options::default())))
        .await
}

/// The path as the laxest upstream would serve it: query and fragment
/// dropped, escapes decoded (up to three rounds), `\` read as `/`, `;`
/// parameters dropped, dot segments resolved, slashes merged, case folded.
fn laxest_reading(raw: &str) -> String {
    let raw = raw.strip_prefix("http://api.example.com").unwrap_or(raw);
    let mut path = raw.split(['?', '#']).next().unwrap_or("").to_owned();
    for _ in 0..3 {
        path = percent_decode(&path);
    }
    let path = path.replace('\\', "/").to_ascii_lowercase();
    let mut out: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        match segment.split(';').next().unwrap_or("") {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_paid(path: &str) -> bool {
    let p = laxest_reading(path);
    ["/v1/ai", "/v1/search"].iter().any(|paid| p.starts_with(paid))
}

/// The upstream's view of a request that reached it (the echo's JSON).
fn upstream_saw(r: &Response) -> Option<serde_json::Value> {
    (r.status == 200).then(|| r.json())
}

/// Header names the upstream received, lower-cased with `_` read as `-`.
fn upstream_header_names(echo: &serde_json::Value) -> Vec<String> {
    echo["headers"].as_object().unwrap().keys().map(|k| k.to_ascii_lowercase().replace('_', "-")).collect()
}

#[test]
fn the_laxest_reading_of_every_confusion_path_is_paid() {
    // The attack table is only worth something if each entry would reach a
    // paid handler upstream when the edge let it through.
    for path in PATH_CONFUSION {
        assert!(is_paid(path), "{path} reads as {}", laxest_reading(path));
    }
    assert!(!is_paid("/public/docs") && !is_paid("/healthz?/../v1/ai/chat"));
}

#[tokio::test]
async fn no_confusion_path_reaches_a_paid_upstream_route_without_a_credential() {
    let s = stack().await;
    let attempts: Vec<(&str, &str)> = PATH_CONFUSION.iter().flat_map(|p| [("GET", *p), ("POST", *p)]).collect();
    // Concurrently: Envoy closes a connection it refused after its delayed-close
    // timeout, which would make one request after another slow.
    let answers = join_all(attempts.iter().map(|(method, path)| s.send(method, path, &[]))).await;
    for ((method, path), r) in attempts.iter().zip(answers) {
        let refused = matches!(r.status, 400 | 401 | 403 | 404) || (300..400).contains(&r.status);
        if let Some(echo) = upstream_saw(&r) {
            let got = echo["path"].as_str().unwrap();
            assert!(!is_paid(got), "{method} {path}: the upstream served {got} without a credential");
        } else {
            assert!(refused, "{method} {path}: {r:?}");
        }
    }
    s.stop().await;
}

#[tokio::test]
async fn the_edge_refuses_encoded_slashes_and_double_encodings_with_400() {
    let s = stack().await;
    let paths = [
        "/public%2f..%2fv1%2fai%2fchat",
        "/public/..%5Cv1/ai/chat",
        "/public/%2e%2e%2fv1/ai/chat",
        "/healthz%2f..%2fv1%2fai%2fchat",
        // Left undecoded by Envoy's normalization, so caught by the route that
        // refuses dot segments with parameters and double encodings.
        "/public/%2e%2e;/v1/ai/chat",
        "/public/%252e%252e/v1/ai/chat",
        "/public/..%252fv1/ai/chat",
        "/public/..%255cv1/ai/chat",
    ];
    let answers = join_all(paths.iter().map(|path| s.send("GET", path, &[]))).await;
    for (path, r) in paths.iter().zip(answers) {
        assert_eq!(r.status, 400, "{path}: {r:?}");
    }
    s.stop().await;
}

#[tokio::test]
async fn dot_segments_and_double_slashes_are_resolved_before_tollgate_decides() {
    let s = stack().await;
    // Normalized to /v1/ai/chat, then decided as that: no key, 401.
    for path in [
        "/public/../v1/ai/chat",
        "/public/%2e%2e/v1/ai/chat",
        "/public/..\\v1/ai/chat",
        "/public/..;/v1/ai/chat",
        "//v1/ai/chat",
        "/healthz/../v1/ai/chat",
        "/healthz;/../v1/ai/chat",
        "http://api.example.com/public/../v1/ai/chat",
    ] {
        let r = s.send("GET", path, &[]).await;
        assert_eq!(r.status, 401, "{path}: {r:?}");
        assert_eq!(r.json()["code"], "credentials_missing", "{path}");
    }
    // With a key, the normalized path is what is charged and what the upstream gets.
    let r = s.send("POST", "/public/../v1//ai/./chat", &[("x-api-key", "pro-key")]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["path"], "/v1/ai/chat");
    assert_eq!(r.json()["headers"]["x-tollgate-account"], "acct_pro");
    s.stop().await;
}

#[tokio::test]
async fn the_health_route_is_exact_and_everything_else_is_checked() {
    let s = stack().await;
    for path in ["/healthz", "/healthz?probe=1"] {
        let r = s.send("GET", path, &[]).await;
        assert_eq!(r.status, 200, "{path}: {r:?}");
        assert_eq!(r.json()["path"], path);
    }
    // Anything longer goes through tollgate (default deny, or 401 on a paid route).
    for path in ["/healthz/x", "/healthzx", "/healthz/", "/HEALTHZ"] {
        let r = s.send("GET", path, &[]).await;
        assert!(matches!(r.status, 401 | 403), "{path}: {r:?}");
        assert!(r.header("content-type").is_some_and(|c| c == "application/problem+json"), "{path}: {r:?}");
    }
    s.stop().await;
}

#[tokio::test]
async fn forged_tollgate_headers_never_reach_the_upstream_on_public_paid_or_health_routes() {
    let s = stack().await;
    for path in ["/public/docs", "/healthz"] {
        let r = s.send("GET", path, FORGED).await;
        let echo = upstream_saw(&r).unwrap_or_else(|| panic!("{path}: {r:?}"));
        let names = upstream_header_names(&echo);
        assert!(!names.iter().any(|n| n.starts_with("x-tollgate-")), "{path}: {names:?}");
    }
    // A paid route with a real key: only tollgate's own answer.
    let mut headers = FORGED.to_vec();
    headers.push(("x-api-key", "pro-key"));
    let r = s.send("POST", "/v1/ai/chat", &headers).await;
    let echo = upstream_saw(&r).unwrap_or_else(|| panic!("{r:?}"));
    let mut names: Vec<String> =
        upstream_header_names(&echo).into_iter().filter(|n| n.starts_with("x-tollgate-")).collect();
    names.sort();
    assert_eq!(names, ["x-tollgate-account", "x-tollgate-plan"]);
    assert_eq!(echo["headers"]["x-tollgate-account"], "acct_pro");
    assert_eq!(echo["headers"]["x-tollgate-plan"], "pro");
    s.stop().await;
}

#[tokio::test]
async fn a_forged_identity_header_does_not_reach_tollgate_through_the_edge() {
    // spec_config trusts x-account-id (a header a mesh sets), but the shipped
    // ext_authz sends tollgate only the headers listed in allowed_headers.
    let s = stack().await;
    let r = s.send("POST", "/v1/ai/chat", &[("x-account-id", "acct_pro")]).await;
    assert_eq!(r.status, 401, "{r:?}");
    s.stop().await;
}

#[tokio::test]
async fn credentials_never_reach_the_upstream_on_the_health_route() {
    let s = stack().await;
    let credentials = ["x-api-key", "authorization", "payment-signature", "x-payment"];
    let sent = credentials.map(|h| (h, if h == "authorization" { "Bearer pro-key" } else { "pro-key" }));
    let r = s.send("GET", "/healthz", &sent).await;
    let echo = upstream_saw(&r).unwrap_or_else(|| panic!("{r:?}"));
    let names = upstream_header_names(&echo);
    assert!(!names.iter().any(|n| credentials.contains(&n.as_str())), "{names:?}");
    s.stop().await;
}

#[tokio::test]
async fn credentials_never_reach_the_upstream_on_a_paid_route() {
    let s = stack().await;
    for key in [("x-api-key", "pro-key"), ("authorization", "Bearer pro-key")] {
        let r = s.send("POST", "/v1/ai/chat", &[key]).await;
        let echo = upstream_saw(&r).unwrap_or_else(|| panic!("{r:?}"));
        assert!(!upstream_header_names(&echo).contains(&key.0.to_owned()), "{key:?}: {echo}");
    }
    s.stop().await;
}

/// The shipped config with Envoy sending each header as sent
/// (`encode_raw_headers: true`: `header_map`, values as bytes) instead of
/// the `headers` map, which joins a repeated header's values with `,`.
fn with_raw_headers(config: String) -> String {
    let at = "                      clear_route_cache: true\n";
    assert!(config.contains(at), "the ext_authz filter no longer has `{at}`");
    config.replace(at, &format!("{at}                      encode_raw_headers: true\n"))
}

/// A credential sent twice, whichever way Envoy encodes the headers for
/// tollgate: two keys are one key nobody has (401), never the first paid
/// with; an `authorization` that carries `Bearer` in a
/// second copy after `Basic` never reaches the upstream.
#[tokio::test]
async fn a_credential_sent_twice_pays_with_neither_copy_and_never_reaches_the_upstream() {
    for raw in [false, true] {
        let s = stack_with_config(|c| if raw { with_raw_headers(c) } else { c }).await;
        let r = s.send("POST", "/v1/ai/chat", &[("x-api-key", "pro-key")]).await;
        assert_eq!(r.status, 200, "raw {raw}: one key is read: {r:?}");
        for twice in [[("x-api-key", "pro-key"), ("x-api-key", "free-key")], [("authorization", "Bearer pro-key"); 2]] {
            let r = s.send("POST", "/v1/ai/chat", &twice).await;
            assert_eq!(r.status, 401, "raw {raw}: {twice:?}: {r:?}");
        }
        let both = [("x-api-key", "pro-key"), ("authorization", "Basic Zm9v"), ("authorization", "Bearer free-key")];
        let r = s.send("POST", "/v1/ai/chat", &both).await;
        let echo = upstream_saw(&r).unwrap_or_else(|| panic!("raw {raw}: {r:?}"));
        let names = upstream_header_names(&echo);
        assert!(!names.iter().any(|n| n == "x-api-key" || n == "authorization"), "raw {raw}: {echo}");
        s.stop().await;
    }
}

/// tollgate requiring client certificates from `pki`'s CA, behind Envoy built
/// from `file` with its certificate paths pointed at `certs`.
async fn mtls_stack(pki: &Pki, file: &str, certs: &Pki) -> Stack {
    let tollgate = TestServer::start(&(spec_config() + &pki.tollgate_tls())).await;
    Stack::around(tollgate, |tollgate, upstream| {
        certs.envoy_config(&envoy::config_from(file, tollgate, upstream, Options::default()))
    })
    .await
}

#[tokio::test]
async fn the_mtls_config_reaches_a_tollgate_that_requires_client_certificates() {
    let pki = Pki::new("mtls-ok");
    let s = mtls_stack(&pki, "deploy/envoy/envoy-mtls.yaml", &pki).await;
    s.envoy.wait_cluster_healthy("tollgate").await;
    let r = s.send("POST", "/v1/ai/chat", &[("x-api-key", "pro-key")]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["headers"]["x-tollgate-account"], "acct_pro");
    assert_eq!(s.send("POST", "/public/../v1/ai/chat", &[]).await.status, 401);
    s.stop().await;
}

#[tokio::test]
async fn a_proxy_without_a_client_certificate_from_the_ca_gets_no_decision_and_fails_closed() {
    let pki = Pki::new("mtls-server");
    // The plaintext config: no TLS at all.
    let s = mtls_stack(&pki, "deploy/envoy/envoy.yaml", &pki).await;
    assert_eq!(s.send("POST", "/v1/ai/chat", &[("x-api-key", "pro-key")]).await.status, 503);
    s.stop().await;
    // The mTLS config with a client certificate from another CA (trusting tollgate's).
    let other = Pki::new("mtls-other");
    std::fs::copy(pki.dir.join("ca.crt"), other.dir.join("ca.crt")).unwrap();
    let s = mtls_stack(&pki, "deploy/envoy/envoy-mtls.yaml", &other).await;
    assert_eq!(s.send("POST", "/v1/ai/chat", &[("x-api-key", "pro-key")]).await.status, 503);
    assert_eq!(s.send("GET", "/public/docs", &[]).await.status, 503);
    s.stop().await;
}

// ---- Tollgate's second layer: these pass once tollgate removes every
// x-tollgate-* header and the credential header it sees (issue 8, lead's part).

#[tokio::test]
async fn credentials_never_reach_the_upstream_on_a_public_route_with_tollgate_second_layer() {
    // Needs tollgate: Envoy does not know which routes tollgate calls public.
    let s = stack().await;
    for key in [("x-api-key", "pro-key"), ("authorization", "Bearer pro-key")] {
        let r = s.send("GET", "/public/docs", &[key]).await;
        let echo = upstream_saw(&r).unwrap_or_else(|| panic!("{r:?}"));
        assert!(!upstream_header_names(&echo).contains(&key.0.to_owned()), "{key:?}: {echo}");
    }
    s.stop().await;
}

#[tokio::test]
async fn forged_headers_are_removed_by_tollgate_even_without_the_edge_filter_with_tollgate_second_layer() {
    // The edge filter taken out (a misordered or forgotten filter): ext_authz
    // still sends tollgate every x-tollgate-* header, and tollgate removes
    // them, whether it removes all its own or only those it saw (`seen`, and
    // `auto` on the shipped config's word, both relying on allowed_headers).
    let settings = ["", "server: { remove_own_headers: always }\n", "server: { remove_own_headers: seen }\n"];
    for extra in settings {
        let s = stack_with(&(spec_config() + extra), without_header_filter).await;
        let forged: Vec<(&str, &str)> = FORGED.iter().copied().filter(|(k, _)| !k.contains('_')).collect();
        for (path, key) in [("/public/docs", None), ("/v1/ai/chat", Some(("x-api-key", "pro-key")))] {
            let mut headers = forged.clone();
            headers.extend(key);
            let r = s.send("POST", path, &headers).await;
            let echo = upstream_saw(&r).unwrap_or_else(|| panic!("{extra}{path}: {r:?}"));
            let h = &echo["headers"];
            for (name, value) in &forged {
                let got = h[name.to_ascii_lowercase()].as_str();
                assert!(got.is_none_or(|g| g != *value), "{extra}{path}: forged {name} reached the upstream: {h}");
            }
            assert!(h["x-api-key"].is_null(), "{extra}{path}: the key reached the upstream: {h}");
        }
        s.stop().await;
    }
}

/// The shipped configs tell tollgate, on their own gRPC call, that no client
/// `x-tollgate-*` header reaches the Check unseen (`initial_metadata`), and
/// tollgate takes that word through a real Envoy, a client's own copy of it
/// aside: in a config where the word is false (no edge filter, the prefix
/// not in `allowed_headers`), a forged header tollgate was not shown reaches
/// the upstream while the word is given, and is removed once it is taken
/// out. Hence the comment at `initial_metadata`: take it out when changing either.
#[tokio::test]
async fn the_proxy_s_word_on_own_headers_reaches_tollgate_and_is_taken() {
    const WORD: &str = "                        initial_metadata:\n                          - { key: tollgate-own-headers, value: shown }\n";
    const SHOWN: &str = "                          - { prefix: x-tollgate- }\n";
    for given in [true, false] {
        let s = stack_with_config(move |c| {
            assert!(c.contains(WORD) && c.contains(SHOWN), "the shipped config gives the word and shows the prefix");
            let c = without_header_filter(c).replace(SHOWN, "");
            if given { c } else { c.replace(WORD, "") }
        })
        .await;
        let forged = [("x-api-key", "pro-key"), ("x-tollgate-degraded", "forged"), ("tollgate-own-headers", "shown")];
        let r = s.get("/v1/search", &forged).await;
        let echo = upstream_saw(&r).unwrap_or_else(|| panic!("{given}: {r:?}"));
        let h = &echo["headers"];
        assert_eq!(h["x-tollgate-degraded"].as_str() == Some("forged"), given, "word given: {given}: {h}");
        assert!(h["x-api-key"].is_null(), "the key never reaches the upstream: {h}");
        assert_eq!(h["x-tollgate-account"], "acct_pro");
        s.stop().await;
    }
}

#[test]
fn the_header_filter_can_be_taken_out_for_the_second_layer_tests() {
    let c = envoy::config("127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap(), Options::default());
    let without = without_header_filter(c.clone());
    for edge in ["- name: envoy.filters.http.header_mutation\n", "early_header_mutation_extensions:\n"] {
        assert!(c.contains(edge) && !without.contains(edge), "{edge}");
    }
    assert!(without.contains("envoy.filters.http.ext_authz"));
    assert!(without.contains("request_headers_to_remove"), "the rest of the config stays");
}

/// The shipped config minus both edge removals of client `x-tollgate-*`
/// headers: the connection manager's early header mutation and the first
/// HTTP filter.
fn without_header_filter(config: String) -> String {
    let cut = |config: String, from: &str, to: &str| {
        let start = config.find(from).unwrap_or_else(|| panic!("{from}"));
        let end = start + config[start..].find(to).unwrap_or_else(|| panic!("{to} after {from}"));
        format!("{}{}", &config[..start], &config[end..])
    };
    let config = cut(config, "                early_header_mutation_extensions:\n", "                access_log:\n");
    cut(
        config,
        "                  - name: envoy.filters.http.header_mutation",
        "                  - name: envoy.filters.http.ext_authz",
    )
}
