//! `envoy.service.auth.v3.Authorization/Check`: one call per HTTP request Envoy sees.
//!
//! Always answers with a `CheckResponse` (a deny is a successful RPC whose
//! `status` is non-OK and whose `denied_response` carries the HTTP answer),
//! except under `store.on_error: error`, where a store fault fails the RPC
//! with UNAVAILABLE (the one mapping, [`super::status`]) so that Envoy's
//! `failure_mode_allow` decides.
//!
//! May use: `authorizer` (and the domain types its answers name), [`super::status`].

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use envoy_types::ext_authz::v3::pb::{
    Authorization, CheckRequest, CheckResponse, DeniedHttpResponse, HeaderAppendAction, HeaderValue, HeaderValueOption,
    HttpResponse, HttpStatus, OkHttpResponse,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::google::rpc;
use tonic::{Request, Response, Status};

use super::check_request::{Attributes, CheckRequestView, HttpView, text};
use crate::authorizer::{Ask, Authorizer, Outcome, Query, Subject};
use crate::decision::{Code, Verdict};
use crate::identity::Credentials;
use crate::route::RouteKey;

/// The ext_authz service.
#[derive(Debug, Clone)]
pub struct ExtAuthz {
    authorizer: Arc<Authorizer>,
}

impl ExtAuthz {
    /// A service answering from `authorizer`.
    pub fn new(authorizer: Arc<Authorizer>) -> Self {
        Self { authorizer }
    }
}

/// The metadata key of [`crate::config::OWN_HEADERS_SHOWN`], parsed once
/// (a `&str` key is parsed and validated on every lookup). `from_static`
/// panics only on an invalid key: this one is a constant, lower-case ASCII
/// name, read on every Check of the test suite.
static OWN_HEADERS_SHOWN_KEY: std::sync::LazyLock<tonic::metadata::AsciiMetadataKey> =
    std::sync::LazyLock::new(|| tonic::metadata::AsciiMetadataKey::from_static(crate::config::OWN_HEADERS_SHOWN.0));

/// A CheckRequest's headers and JWT metadata, as [`Credentials`].
struct EnvoyCredentials<'a> {
    http: Option<&'a HttpView>,
    /// Where the metadata is, decoded only for a claim (only a trusted caller's are read).
    attributes: Option<&'a Attributes>,
    /// The metadata once decoded (several `jwt_claim` sources read it once);
    /// metadata that does not decode is none, as if not sent.
    metadata: std::sync::OnceLock<Option<envoy_types::pb::envoy::config::core::v3::Metadata>>,
}

impl Credentials for EnvoyCredentials<'_> {
    fn header(&self, name: &str) -> Option<Cow<'_, str>> {
        let http = self.http?;
        if let Some(v) = http.header(name) {
            return Some(Cow::Borrowed(v));
        }
        // With `encode_raw_headers: true` Envoy fills `header_map` instead: an
        // entry per time the header was sent, its bytes in `raw_value`. Read
        // as Envoy would have put them in `headers` (joined by `,`, bytes
        // that are not UTF-8 replaced), so the two encodings mean the same.
        let map = http.header_map.as_ref()?;
        let sent = map.headers.iter().filter(|h| h.key.eq_ignore_ascii_case(name.as_bytes())).map(|h| {
            let v = if h.value.is_empty() { &h.raw_value } else { &h.value };
            String::from_utf8_lossy(v)
        });
        crate::identity::joined(sent)
    }

    fn claim(&self, namespace: &str, field: &str, claim: &str) -> Option<String> {
        let metadata = self.metadata.get_or_init(|| self.attributes.and_then(Attributes::metadata)).as_ref()?;
        let payload = metadata.filter_metadata.get(namespace)?.fields.get(field)?;
        let mut value = payload;
        for part in claim.split('.') {
            match &value.kind {
                Some(Kind::StructValue(s)) => value = s.fields.get(part)?,
                _ => return None,
            }
        }
        match &value.kind {
            Some(Kind::StringValue(s)) => Some(s.clone()),
            Some(Kind::NumberValue(n)) if n.fract() == 0.0 => Some(format!("{n:.0}")),
            _ => None,
        }
    }

    fn headers_with_prefix(&self, prefix: &str) -> Vec<Cow<'_, str>> {
        let Some(http) = self.http else { return Vec::new() };
        let has = |k: &[u8]| crate::identity::spelled_with_prefix(k, prefix);
        let mut out: Vec<Cow<'_, str>> =
            http.header_names().filter(|k| has(k)).filter_map(|k| std::str::from_utf8(k).ok()).map(lower).collect();
        // Each name once, however often it was sent (sorting: a flood of names costs n log n, not n²).
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// `name` in lower case, borrowed when it is already (Envoy lower-cases header names).
fn lower(name: &str) -> Cow<'_, str> {
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    }
}

/// A header to set, overwriting the request's or response's own.
fn header((key, value): (crate::problem::Name, crate::problem::Text)) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue { key: key.into_owned(), value: value.into_owned(), ..Default::default() }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

fn string_value(s: impl Into<String>) -> Value {
    Value { kind: Some(Kind::StringValue(s.into())) }
}

/// The gRPC status code of a deny: UNAUTHENTICATED for 401, PERMISSION_DENIED for
/// 402/403, RESOURCE_EXHAUSTED for 429, UNAVAILABLE for 503 (SPEC §5).
pub(super) fn rpc_code(verdict: Verdict) -> tonic::Code {
    match verdict {
        Verdict::Allow(_) => tonic::Code::Ok,
        Verdict::Deny(code) => match code.http_status() {
            401 => tonic::Code::Unauthenticated,
            429 => tonic::Code::ResourceExhausted,
            503 => tonic::Code::Unavailable,
            400 => tonic::Code::InvalidArgument,
            500 => tonic::Code::Internal,
            _ => tonic::Code::PermissionDenied,
        },
    }
}

/// Builds the CheckResponse for an outcome: what the `Authorization` trait
/// answers in process, and the reference the server's wire encoding
/// ([`super::answer::Answer`]) is tested against.
pub fn check_response(outcome: Outcome) -> CheckResponse {
    let dynamic_metadata = outcome.carries_metadata.then(|| Struct {
        fields: outcome.metadata().map(|(k, v)| (k.to_owned(), string_value(v))).collect::<HashMap<_, _>>(),
    });
    let Outcome { decision: d, response: r, .. } = outcome;
    let code = rpc_code(d.verdict);
    let http_response = match d.verdict {
        Verdict::Allow(_) => HttpResponse::OkResponse(OkHttpResponse {
            headers: r.upstream_headers.into_iter().map(header).collect(),
            headers_to_remove: r.upstream_remove.into_iter().map(crate::problem::Text::into_owned).collect(),
            response_headers_to_add: r.client_headers.into_iter().map(header).collect(),
            ..Default::default()
        }),
        Verdict::Deny(_) => HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus { code: i32::from(r.status) }),
            headers: r.client_headers.into_iter().map(header).collect(),
            body: r.body.unwrap_or_default(),
        }),
    };
    CheckResponse {
        status: Some(rpc::Status {
            code: code as i32,
            message: if code == tonic::Code::Ok { String::new() } else { d.verdict.label().to_owned() },
            details: Vec::new(),
        }),
        dynamic_metadata,
        http_response: Some(http_response),
    }
}

#[tonic::async_trait]
impl Authorization for ExtAuthz {
    async fn check(&self, request: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        // Read as the server reads a received one (`CheckRequestView`), so both answer the same.
        let view = request.map(|r| CheckRequestView::from_request(&r));
        self.decide(view).await.map(|outcome| Response::new(check_response(outcome)))
    }
}

impl ExtAuthz {
    /// Decides one Check, with its metrics and log line: the outcome both
    /// answers are made of (the server's encoded [`super::answer::Answer`],
    /// the trait's [`check_response`]). A store fault under `on_error: error` is the RPC's error.
    pub async fn decide(&self, request: Request<CheckRequestView>) -> Result<Outcome, Status> {
        let started = Instant::now();
        // A fact for `server.trusted_callers`, which the authorizer applies with its config snapshot.
        let peer_verified = request.peer_certs().is_some_and(|certs| !certs.is_empty());
        // The proxy's word on its own call (never the client's request): see `RemoveOwnHeaders::Auto`.
        let own_headers_shown = request
            .metadata()
            .get(&*OWN_HEADERS_SHOWN_KEY)
            .is_some_and(|v| v.as_bytes() == crate::config::OWN_HEADERS_SHOWN.1.as_bytes());
        let req = request.into_inner();
        // A Check tollgate cannot read whole (see `check_request`) is denied
        // 400 `request_invalid`, read no further: an RPC error would let a
        // proxy under `failure_mode_allow` pass it.
        let malformed = req.check().inspect_err(|e| tracing::debug!(reason = %e, "Check not readable")).is_err();
        let (attributes, http) = if malformed { (None, None) } else { (req.attributes.as_ref(), req.http()) };
        let creds = EnvoyCredentials { http, attributes, metadata: std::sync::OnceLock::new() };
        let ask = match (attributes, http) {
            (Some(_), Some(h)) => {
                Ask::Http(RouteKey { path: text(&h.path), method: text(&h.method), host: text(&h.host) })
            }
            // Istio's network-level ext_authz sends peers but no HTTP request.
            (Some(a), None) if a.source.is_some() || a.destination.is_some() => Ask::NotHttp,
            // Nothing to go on: an empty path is answered 400 `request_invalid`.
            _ => Ask::Http(RouteKey { path: "", method: "", host: "" }),
        };
        let query = Query {
            subject: Subject::Request(&creds),
            ask,
            cost: None,
            dry_run: false,
            peer_verified,
            client_headers_unfiltered: false,
            own_headers_shown,
        };
        let outcome = match self.authorizer.authorize(query).await {
            Ok(o) => o,
            Err(e) => {
                let metrics = self.authorizer.metrics();
                metrics.record_decision(Verdict::Deny(Code::StoreUnavailable), started.elapsed());
                return Err(e.into());
            }
        };
        let d = &outcome.decision;
        outcome.trace();
        self.authorizer.metrics().record_door("grpc", d.verdict.http_status());
        // By plan, for the plans the config defines (a stored record may name
        // any string: it must not become a label).
        if let Some(plan) = d.plan.as_deref()
            && self.authorizer.has_plan(plan)
        {
            self.authorizer.metrics().record_plan_decision(plan, d.verdict);
        }
        if let Verdict::Deny(code) = d.verdict {
            tracing::info!(
                account = d.account.as_deref().unwrap_or("-"),
                route = outcome.route.as_deref().unwrap_or("-"),
                code = code.as_str(),
                status = code.http_status(),
                "check denied"
            );
        }
        self.authorizer.metrics().record_decision(d.verdict, started.elapsed());
        Ok(outcome)
    }
}
