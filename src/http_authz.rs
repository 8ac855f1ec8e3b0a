//! The HTTP authorization door (`server.authz_http_listen`, off by default):
//! the same decisions as ext_authz over gRPC, for proxies that ask over HTTP.
//!
//! - `/envoy/<original path>`: Envoy's HTTP ext_authz (`http_service` with
//!   `path_prefix: /envoy`): the original method, path and allowed headers
//!   arrive as the request itself.
//! - `/traefik`: Traefik's ForwardAuth: method, host and URI in
//!   `X-Forwarded-Method`, `X-Forwarded-Host`, `X-Forwarded-Uri`.
//!
//! A thin translation, like `grpc::ext_authz`: the request becomes a
//! [`Query`] for the [`Authorizer`], the [`Outcome`] an HTTP answer. Allowed:
//! 200 with the headers for the upstream (identity, plan, warnings) and, for
//! Envoy, `x-envoy-auth-headers-to-remove` naming the credential headers.
//! Denied: the status, problem body and client headers as the client should
//! see them. A request the door cannot read (forwarded headers missing or not
//! UTF-8, a URI that is not an absolute path) is decided as a Check with no
//! request: 400 `request_invalid`, never an allow.
//!
//! May use: `authorizer`, `identity` (the `Credentials` trait), `metrics`.

use std::borrow::Cow;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::authorizer::{Ask, Authorizer, Outcome, Query, Subject};
use crate::identity::Credentials;
use crate::route::RouteKey;

/// Which proxy's contract a request came in by: a metric label and the answer's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    /// Envoy's gRPC ext_authz (`grpc::ext_authz`).
    Grpc,
    /// Envoy's HTTP ext_authz.
    EnvoyHttp,
    /// Traefik's ForwardAuth.
    Traefik,
}

impl Door {
    /// The label (`grpc`, `envoy_http`, `traefik`).
    pub fn as_str(self) -> &'static str {
        match self {
            Door::Grpc => "grpc",
            Door::EnvoyHttp => "envoy_http",
            Door::Traefik => "traefik",
        }
    }
}

/// The request's headers, as [`Credentials`]; values that are not UTF-8 are absent.
struct HeaderCredentials<'a>(&'a HeaderMap);

impl Credentials for HeaderCredentials<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(|v| v.to_str().ok())
    }

    fn claim(&self, _namespace: &str, _field: &str, _claim: &str) -> Option<String> {
        // No proxy metadata over HTTP: JWT claims come only from Envoy's gRPC door.
        None
    }

    fn headers_with_prefix(&self, prefix: &str) -> Vec<Cow<'_, str>> {
        // Header names are lower-case in `http`'s map.
        self.0.keys().map(HeaderName::as_str).filter(|k| k.starts_with(prefix)).map(Cow::Borrowed).collect()
    }
}

/// The door's router.
pub fn router(authorizer: Arc<Authorizer>) -> Router {
    Router::new().fallback(answer).with_state(authorizer)
}

/// A forwarded header's value: present, UTF-8, not empty.
fn forwarded<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty())
}

async fn answer(State(authorizer): State<Arc<Authorizer>>, request: Request) -> Response {
    let started = std::time::Instant::now();
    let (parts, _) = request.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let headers = &parts.headers;
    let host_header = forwarded(headers, "host").unwrap_or("");
    // What the proxy asks about; `None`: it could not be read (400).
    let (door, asked): (Door, Option<(String, &str, &str)>) = if let Some(rest) = path.strip_prefix("/envoy") {
        let original = if rest.is_empty() { "/" } else { rest };
        let ok = original.starts_with('/');
        (Door::EnvoyHttp, ok.then(|| (original.to_owned(), parts.method.as_str(), host_header)))
    } else if path == "/traefik" || path.starts_with("/traefik?") {
        let method = forwarded(headers, "x-forwarded-method");
        let uri = forwarded(headers, "x-forwarded-uri").filter(|u| u.starts_with('/'));
        let host = forwarded(headers, "x-forwarded-host").unwrap_or(host_header);
        (Door::Traefik, method.zip(uri).map(|(m, u)| (u.to_owned(), m, host)))
    } else {
        return (StatusCode::NOT_FOUND, "unknown authorization door: use /envoy/… or /traefik\n").into_response();
    };
    let creds = HeaderCredentials(headers);
    let (path, method, host) = asked.as_ref().map_or(("", "", ""), |(p, m, h)| (p.as_str(), *m, *h));
    let host = host.split(':').next().unwrap_or("");
    let query = Query {
        subject: Subject::Request(&creds),
        // An empty path is what a Check with no request is: 400 `request_invalid`.
        ask: Ask::Http(RouteKey { path, method, host }),
        cost: None,
        dry_run: false,
        peer_verified: false,
        // Traefik forwards every client header: a trusted header or claim
        // here would be the client's word.
        client_headers_unfiltered: true,
    };
    let outcome = match authorizer.authorize(query).await {
        Ok(o) => o,
        Err(e) => {
            // `store.on_error: error` has no HTTP meaning of its own: the proxy sees 503.
            tracing::warn!(error = %e, "store unavailable on the HTTP door");
            authorizer.metrics().record_door(door.as_str(), 503);
            return (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n").into_response();
        }
    };
    outcome.trace();
    let d = &outcome.decision;
    authorizer.metrics().record_decision(d.verdict, started.elapsed());
    authorizer.metrics().record_door(door.as_str(), d.verdict.http_status());
    if let crate::decision::Verdict::Deny(code) = d.verdict {
        tracing::info!(
            door = door.as_str(),
            account = d.account.as_deref().unwrap_or("-"),
            route = outcome.route.as_deref().unwrap_or("-"),
            code = code.as_str(),
            status = code.http_status(),
            "check denied"
        );
    }
    render(door, &outcome)
}

fn put(headers: &mut HeaderMap, name: &str, value: &str) {
    if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
        headers.append(n, v);
    }
}

/// The HTTP answer for a decided request.
fn render(door: Door, outcome: &Outcome) -> Response {
    let r = &outcome.response;
    let mut headers = HeaderMap::new();
    if outcome.decision.is_allowed() {
        for (k, v) in r.upstream_headers.iter().chain(&r.client_headers) {
            put(&mut headers, k, v);
        }
        if door == Door::EnvoyHttp && !r.upstream_remove.is_empty() {
            // Envoy removes these from the upstream request (the credential,
            // forged `x-tollgate-*`); tollgate's own set ones are overwritten.
            put(&mut headers, "x-envoy-auth-headers-to-remove", &r.upstream_remove.join(","));
        }
        return (StatusCode::OK, headers).into_response();
    }
    for (k, v) in &r.client_headers {
        put(&mut headers, k, v);
    }
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::FORBIDDEN);
    (status, headers, r.body.clone().unwrap_or_default()).into_response()
}
