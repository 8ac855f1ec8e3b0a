//! The HTTP authorization door (`server.authz_http_listen`, off by default):
//! the same decisions as ext_authz over gRPC, for proxies that ask over HTTP.
//!
//! - `/envoy/<original path>`: Envoy's HTTP ext_authz (`http_service` with
//!   `path_prefix: /envoy`): the original method, path and allowed headers
//!   arrive as the request itself.
//! - `/traefik`: Traefik's ForwardAuth: method, host and URI in
//!   `X-Forwarded-Method`, `X-Forwarded-Host`, `X-Forwarded-Uri`.
//! - `/nginx`: nginx's `auth_request` (and ingress-nginx's `auth-url`):
//!   method and URL in `X-Original-Method`, `X-Original-URL`. nginx turns
//!   any answer but 2xx, 401 and 403 into a 500, so every deny is 401 (a
//!   real 401) or 403, carrying the real status in `x-tollgate-status` and
//!   the problem body in `x-tollgate-problem` for the shipped
//!   `deploy/nginx/tollgate.conf` to turn back into the real answer. nginx
//!   cannot strip headers by prefix, so a request carrying any
//!   `x-tollgate-*` header is refused (400) rather than let one reach the upstream.
//!
//! A thin translation, like `grpc::ext_authz`: the request becomes a
//! [`Query`] for the [`Authorizer`], the [`Outcome`] an HTTP answer. Allowed:
//! 200 with the headers for the upstream (identity, plan, warnings) and, for
//! Envoy, `x-envoy-auth-headers-to-remove` naming the credential headers and
//! `x-tollgate-charge` carrying the signed charge (charging on the response).
//! Denied: the status, problem body and client headers as the client should
//! see them. A request the door cannot read (forwarded headers missing or not
//! UTF-8, a URI that is not an absolute path) is decided as a Check with no
//! request: 400 `request_invalid`, never an allow.
//!
//! May use: `authorizer`, `decision`, `identity` (the `Credentials` trait), `metrics`,
//! `problem` (a store fault rendered as `on_error: deny` would), `settlement` (the charge's header).

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::authorizer::{Ask, Authorizer, Query, Subject};
use crate::decision::Decision;
use crate::identity::Credentials;
use crate::problem;
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
    /// nginx's `auth_request`.
    Nginx,
}

impl Door {
    /// The label (`grpc`, `envoy_http`, `traefik`, `nginx`).
    pub fn as_str(self) -> &'static str {
        match self {
            Door::Grpc => "grpc",
            Door::EnvoyHttp => "envoy_http",
            Door::Traefik => "traefik",
            Door::Nginx => "nginx",
        }
    }
}

/// On the nginx door, the status the client should see (`402`), for
/// `auth_request_set` to read: nginx only carries 401 and 403.
pub const NGINX_STATUS_HEADER: &str = "x-tollgate-status";
/// On the nginx door, the problem body (JSON, non-ASCII escaped) for `auth_request_set`.
pub const NGINX_PROBLEM_HEADER: &str = "x-tollgate-problem";

/// The request's headers, as [`Credentials`].
struct HeaderCredentials<'a>(&'a HeaderMap);

impl Credentials for HeaderCredentials<'_> {
    fn header(&self, name: &str) -> Option<Cow<'_, str>> {
        // As Envoy's `headers` map carries it (see the trait): joined by `,`,
        // bytes that are not UTF-8 replaced; not the first copy alone.
        let sent = self.0.get_all(name).iter().map(|v| String::from_utf8_lossy(v.as_bytes()));
        crate::identity::joined(sent)
    }

    fn claim(&self, _namespace: &str, _field: &str, _claim: &str) -> Option<String> {
        // No proxy metadata over HTTP: JWT claims come only from Envoy's gRPC door.
        None
    }

    fn headers_with_prefix(&self, prefix: &str) -> Vec<Cow<'_, str>> {
        // Header names are lower-case in `http`'s map, each once.
        let has = |k: &&str| crate::identity::spelled_with_prefix(k.as_bytes(), prefix);
        self.0.keys().map(HeaderName::as_str).filter(has).map(Cow::Borrowed).collect()
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

/// Whether any of `names`, the headers a door reads the request's method,
/// URI and host from, was sent twice. The proxy sets each once: a second
/// copy is somebody else's, and which one the proxy meant cannot be known,
/// so the request is not read (400).
fn sent_twice(headers: &HeaderMap, names: &[&str]) -> bool {
    names.iter().any(|name| headers.get_all(*name).iter().nth(1).is_some())
}

/// The host and path (with query) of nginx's `X-Original-URL`
/// (`$scheme://$host$request_uri`): an absolute `http(s)` URL without user
/// info, else `None`.
fn original_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"))?;
    let (authority, path) = rest.split_at(rest.find('/')?);
    (!authority.is_empty() && !authority.contains(['@', '?', '#'])).then_some((authority, path))
}

async fn answer(State(authorizer): State<Arc<Authorizer>>, request: Request) -> Response {
    let started = std::time::Instant::now();
    let (parts, _) = request.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let headers = &parts.headers;
    let host_header = forwarded(headers, "host").unwrap_or("");
    // What the proxy asks about; `None`: it could not be read (400).
    // And the headers it was read from, none of which may come twice.
    type Asked<'a> = Option<(String, &'a str, &'a str)>;
    let (door, asked, read): (Door, Asked, &[&str]) = if let Some(rest) = path.strip_prefix("/envoy") {
        let original = if rest.is_empty() { "/" } else { rest };
        let ok = original.starts_with('/');
        (Door::EnvoyHttp, ok.then(|| (original.to_owned(), parts.method.as_str(), host_header)), &["host"])
    } else if path == "/traefik" || path.starts_with("/traefik?") {
        let method = forwarded(headers, "x-forwarded-method");
        let uri = forwarded(headers, "x-forwarded-uri").filter(|u| u.starts_with('/'));
        let host = forwarded(headers, "x-forwarded-host").unwrap_or(host_header);
        let read = &["host", "x-forwarded-method", "x-forwarded-uri", "x-forwarded-host"];
        (Door::Traefik, method.zip(uri).map(|(m, u)| (u.to_owned(), m, host)), read)
    } else if path == "/nginx" || path.starts_with("/nginx?") {
        let method = forwarded(headers, "x-original-method");
        let url = forwarded(headers, "x-original-url").and_then(original_url);
        // nginx passes the client's headers on and cannot strip a prefix.
        let own =
            |k: &HeaderName| crate::identity::spelled_with_prefix(k.as_str().as_bytes(), crate::problem::HEADER_PREFIX);
        let forged = headers.keys().any(own);
        let asked = method.zip(url).filter(|_| !forged).map(|(m, (host, uri))| (uri.to_owned(), m, host));
        (Door::Nginx, asked, &["x-original-method", "x-original-url"])
    } else {
        return (StatusCode::NOT_FOUND, "unknown authorization door: use /envoy/…, /traefik or /nginx\n")
            .into_response();
    };
    let asked = asked.filter(|_| !sent_twice(headers, read));
    let creds = HeaderCredentials(headers);
    let (path, method, host) = asked.as_ref().map_or(("", "", ""), |(p, m, h)| (p.as_str(), *m, *h));
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
        own_headers_shown: false,
    };
    let outcome = match authorizer.authorize(query).await {
        Ok(o) => o,
        Err(e) => {
            // `store.on_error: error` has no HTTP meaning of its own: the
            // proxy sees what `on_error: deny` answers, 503 `store_unavailable`.
            tracing::warn!(error = %e, "store unavailable on the HTTP door");
            authorizer.metrics().record_door(door.as_str(), 503);
            let decision = crate::decision::Decision::deny(crate::decision::Code::StoreUnavailable);
            let config = authorizer.config();
            let response = crate::problem::render(&decision, &config, Default::default(), chrono::Utc::now());
            return render(door, &decision, &response, None);
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
    render(door, &outcome.decision, &outcome.response, outcome.charge.as_deref())
}

fn put(headers: &mut HeaderMap, name: &str, value: &str) {
    if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
        headers.append(n, v);
    }
}

/// The HTTP answer for a decided request; `charge` is the signed charge for
/// settlement (see `settlement`), which only Envoy's door carries on.
fn render(door: Door, decision: &Decision, r: &problem::Response, charge: Option<&str>) -> Response {
    let mut headers = HeaderMap::new();
    if decision.is_allowed() {
        for (k, v) in r.upstream_headers.iter().chain(&r.client_headers) {
            put(&mut headers, k, v);
        }
        if let (Door::EnvoyHttp, Some(charge)) = (door, charge) {
            // Envoy's `dynamic_metadata_from_headers` makes it the request's
            // metadata, which its access log streams back for settlement.
            put(&mut headers, crate::settlement::HTTP_HEADER, charge);
        }
        if door == Door::EnvoyHttp && !r.upstream_remove.is_empty() {
            // Envoy removes these from the upstream request (the credential,
            // forged `x-tollgate-*`); tollgate's own set ones are overwritten.
            let mut names = String::with_capacity(r.upstream_remove.iter().map(|h| h.len() + 1).sum());
            for (i, h) in r.upstream_remove.iter().enumerate() {
                if i > 0 {
                    names.push(',');
                }
                names.push_str(h);
            }
            put(&mut headers, "x-envoy-auth-headers-to-remove", &names);
        }
        return (StatusCode::OK, headers).into_response();
    }
    if door == Door::Nginx {
        // nginx drops the body of an `auth_request` answer and fails any
        // status but 401/403 as a 500: the real ones go in headers.
        for (k, v) in r.client_headers.iter().filter(|(k, _)| k != "content-type") {
            put(&mut headers, k, v);
        }
        put(&mut headers, NGINX_STATUS_HEADER, &r.status.to_string());
        if let Some(body) = &r.body {
            put(&mut headers, NGINX_PROBLEM_HEADER, &header_safe_json(body));
        }
        let status = if r.status == 401 { StatusCode::UNAUTHORIZED } else { StatusCode::FORBIDDEN };
        return (status, headers).into_response();
    }
    for (k, v) in &r.client_headers {
        put(&mut headers, k, v);
    }
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::FORBIDDEN);
    (status, headers, r.body.clone().unwrap_or_default()).into_response()
}

/// `json` with every character a header value cannot hold (non-ASCII, DEL)
/// written as a JSON `\\u` escape: the same JSON, fit for one header line.
/// Controls inside strings are already escaped by the serializer.
fn header_safe_json(json: &str) -> Cow<'_, str> {
    let plain = |c: char| c.is_ascii() && c != '\x7f';
    if json.chars().all(plain) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 32);
    for c in json.chars() {
        if plain(c) {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                let _ = write!(out, "\\u{u:04x}");
            }
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_urls_give_host_and_path_or_nothing() {
        assert_eq!(original_url("https://api.example.com/v1/search?q=1"), Some(("api.example.com", "/v1/search?q=1")));
        assert_eq!(original_url("http://api.example.com:8080/"), Some(("api.example.com:8080", "/")));
        for bad in [
            "/v1/search",
            "api.example.com/v1",
            "ftp://api.example.com/x",
            "https://api.example.com",
            "https:///v1/search",
            "https://user@api.example.com/v1",
            "https://api.example.com?x=/v1",
            "HTTPS://api.example.com/v1",
        ] {
            assert_eq!(original_url(bad), None, "{bad}");
        }
    }

    #[test]
    fn problem_json_is_made_fit_for_a_header_and_stays_the_same_json() {
        assert!(matches!(header_safe_json(r#"{"a":"b"}"#), Cow::Borrowed(_)));
        for text in ["Kundenkonto gesperrt: zahlen Sie €5 🙂", "tab\there", "del\u{7f}"] {
            let json = serde_json::json!({ "detail": text }).to_string();
            let safe = header_safe_json(&json);
            assert!(HeaderValue::from_str(&safe).is_ok(), "{safe}");
            let back: serde_json::Value = serde_json::from_str(&safe).unwrap();
            assert_eq!(back["detail"], text);
        }
    }
}
