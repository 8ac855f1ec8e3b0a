//! The ext_authz Check translation and decision: any protobuf bytes that
//! decode as a `CheckRequest` go through the real `ExtAuthz` service, over
//! the demo config and a memory store seeded from it.
//!
//! Invariants (a panic is a counterexample):
//! - `check` returns a `CheckResponse`, never an RPC error: the demo config
//!   answers store faults with `on_error: deny`, and the memory store never fails;
//! - an allow (`status.code == 0`) is only given to a path in normal form;
//! - an allow removes every `x-tollgate-*` header the request carried that
//!   tollgate did not set itself, so no forged one reaches the upstream;
//! - an allow removes every credential the demo config reads: `x-api-key`,
//!   and `authorization` when any copy (or comma-separated part, as Envoy
//!   joins copies) starts with `Bearer` and a space or tab, in whatever
//!   bytes it came (`header_map`'s `raw_value` need not be UTF-8).
//!
//! Two services answer: one trusting no caller (the demo config as is; a
//! `tonic::Request` carries no client certificate), one trusting every caller
//! (`server.trusted_callers: any`), so JWT metadata is read too. The input's
//! length picks one, which keeps every input reproducible.

#![no_main]

use std::sync::{Arc, OnceLock};

use envoy_types::ext_authz::v3::pb::{Authorization, CheckRequest};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use tokio::runtime::Runtime;
use tollgate::accounts::Accounts;
use tollgate::authorizer::Authorizer;
use tollgate::config::{Config, DEMO_CONFIG, TrustedCallers};
use tollgate::grpc::ext_authz::ExtAuthz;
use tollgate::metrics::Metrics;
use tollgate::route::check_path;
use tollgate::store::{MemoryStore, Store};

struct Harness {
    runtime: Runtime,
    untrusted: ExtAuthz,
    trusted: ExtAuthz,
}

static HARNESS: OnceLock<Harness> = OnceLock::new();

fn service(runtime: &Runtime, mut config: Config, trust: TrustedCallers) -> ExtAuthz {
    config.server.trusted_callers = trust;
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let seeding = Accounts::seed(store.as_ref(), &config.accounts, &config.policy.plans);
    runtime.block_on(seeding).expect("the memory store seeds");
    let authorizer = Authorizer::new(Arc::new(config), store, Arc::new(Metrics::new()));
    ExtAuthz::new(Arc::new(authorizer))
}

fn harness() -> &'static Harness {
    HARNESS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("a runtime");
        // The demo config with its JWT identity source switched on (it is
        // commented out there), so the trusted service reads JWT metadata.
        let yaml = DEMO_CONFIG.replace("  # - jwt_claim:", "  - jwt_claim:");
        assert_ne!(yaml, DEMO_CONFIG, "the demo config still carries its jwt_claim line");
        let config = Config::parse(&yaml, "demo.yaml").expect("the demo config parses");
        let untrusted = service(&runtime, config.clone(), config.server.trusted_callers);
        let trusted = service(&runtime, config, TrustedCallers::Any);
        Harness { runtime, untrusted, trusted }
    })
}

/// Lower-cased names of the request's headers starting with `x-tollgate-`
/// when `_` is read as `-` (as CGI-style upstreams read names), from both
/// the `headers` map and `header_map` (raw headers).
fn tollgate_headers(req: &CheckRequest) -> Vec<String> {
    let Some(http) = req.attributes.as_ref().and_then(|a| a.request.as_ref()).and_then(|r| r.http.as_ref()) else {
        return Vec::new();
    };
    let raw = http.header_map.iter().flat_map(|m| m.headers.iter().map(|h| &h.key));
    http.headers
        .keys()
        .chain(raw)
        .map(|k| k.to_ascii_lowercase())
        .filter(|k| k.replace('_', "-").starts_with(tollgate::problem::HEADER_PREFIX))
        .collect()
}

/// Names of the credential headers the request carried, by the demo
/// config's sources (`x-api-key`; `authorization` with `Bearer`), read as
/// tollgate reads a Check: from the `headers` map (lower-case keys, as Envoy
/// sends them), else from `header_map`, every copy, joined.
fn credentials(req: &CheckRequest) -> Vec<&'static str> {
    let Some(http) = req.attributes.as_ref().and_then(|a| a.request.as_ref()).and_then(|r| r.http.as_ref()) else {
        return Vec::new();
    };
    let value = |name: &str| -> Option<String> {
        if let Some(v) = http.headers.get(name) {
            return Some(v.clone());
        }
        let copies: Vec<String> =
            http.header_map
                .iter()
                .flat_map(|m| m.headers.iter())
                .filter(|h| h.key.eq_ignore_ascii_case(name))
                .map(|h| {
                    if h.value.is_empty() {
                        String::from_utf8_lossy(&h.raw_value).into_owned()
                    } else {
                        h.value.clone()
                    }
                })
                .collect();
        (!copies.is_empty()).then(|| copies.join(","))
    };
    let bearer = |v: &str| {
        v.split(',').any(|part| {
            let part = part.trim_start().as_bytes();
            part.len() > 6 && part[..6].eq_ignore_ascii_case(b"bearer") && matches!(part[6], b' ' | b'\t')
        })
    };
    let mut out = Vec::new();
    if value("x-api-key").is_some() {
        out.push("x-api-key");
    }
    if value("authorization").is_some_and(|v| bearer(&v)) {
        out.push("authorization");
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Ok(req) = CheckRequest::decode(data) else { return };
    let h = harness();
    let svc = if data.len().is_multiple_of(2) { &h.untrusted } else { &h.trusted };
    let http = req.attributes.as_ref().and_then(|a| a.request.as_ref()).and_then(|r| r.http.as_ref());
    let path = http.map(|h| h.path.clone());
    let forged = tollgate_headers(&req);
    let credentials = credentials(&req);

    let response = h
        .runtime
        .block_on(svc.check(tonic::Request::new(req)))
        .expect("Check answers with a CheckResponse under on_error: deny")
        .into_inner();

    let code = response.status.as_ref().map_or(0, |s| s.code);
    if code != 0 {
        return;
    }
    if let Some(path) = &path {
        let before_query = path.split('?').next().unwrap_or("");
        assert!(check_path(before_query).is_ok(), "allowed a path not in normal form: {path:?}");
    }
    let Some(HttpResponse::OkResponse(ok)) = &response.http_response else {
        panic!("an allow without an OkHttpResponse: {response:?}");
    };
    let set: Vec<&str> = ok.headers.iter().filter_map(|h| h.header.as_ref()).map(|h| h.key.as_str()).collect();
    for name in &forged {
        assert!(
            set.contains(&name.as_str()) || ok.headers_to_remove.contains(name),
            "forged {name:?} reaches the upstream: set {set:?}, removed {:?}",
            ok.headers_to_remove
        );
    }
    for name in credentials {
        assert!(
            ok.headers_to_remove.iter().any(|h| h == name),
            "credential {name:?} reaches the upstream: {:?}",
            ok.headers_to_remove
        );
    }
});
