//! Check requests as Envoy sends them (lower-case header keys, the query
//! string inside `path`), and [`Answer`], a `CheckResponse` flattened for
//! assertions.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::Metadata;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request as AttrRequest};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};

/// A CheckRequest for an HTTP request.
pub fn http_check(method: &str, path: &str, headers: &[(&str, &str)]) -> CheckRequest {
    let headers: HashMap<String, String> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .chain([(":authority".to_string(), "api.example.com".to_string()), (":method".to_string(), method.to_string())])
        .collect();
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(AttrRequest {
                http: Some(HttpRequest {
                    id: "req-1".into(),
                    method: method.into(),
                    path: path.into(),
                    host: "api.example.com".into(),
                    scheme: "http".into(),
                    protocol: "HTTP/1.1".into(),
                    headers,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// Adds a verified JWT payload to a CheckRequest's metadata, as jwt_authn + ext_authz forward it.
pub fn with_jwt(mut req: CheckRequest, claims: &[(&str, &str)]) -> CheckRequest {
    let payload = Struct {
        fields: claims
            .iter()
            .map(|(k, v)| (k.to_string(), Value { kind: Some(Kind::StringValue(v.to_string())) }))
            .collect(),
    };
    let ns = Struct {
        fields: [("jwt_payload".to_string(), Value { kind: Some(Kind::StructValue(payload)) })].into_iter().collect(),
    };
    let attrs = req.attributes.as_mut().unwrap();
    attrs.metadata_context = Some(Metadata {
        filter_metadata: [("envoy.filters.http.jwt_authn".to_string(), ns)].into_iter().collect(),
        ..Default::default()
    });
    req
}

/// What a CheckResponse says, flattened for assertions.
#[derive(Debug)]
pub struct Answer {
    /// The gRPC status code inside the response (0 allows).
    pub rpc_code: i32,
    /// An `OkResponse`.
    pub allowed: bool,
    /// The deny's HTTP status; 200 on an allow.
    pub http_status: u16,
    /// The deny's body as JSON (`Null` when it is not JSON or on an allow).
    pub body: serde_json::Value,
    /// The deny's body as sent.
    pub raw_body: String,
    /// Deny: headers to the client. Allow: `response_headers_to_add`.
    pub client_headers: HashMap<String, String>,
    /// Allow: headers added to the upstream request.
    pub upstream_headers: HashMap<String, String>,
    /// Allow: headers removed from the upstream request.
    pub upstream_remove: Vec<String>,
    /// The dynamic metadata's string fields.
    pub metadata: HashMap<String, String>,
}

impl Answer {
    /// Flattens a `CheckResponse`.
    pub fn of(r: &CheckResponse) -> Self {
        let rpc_code = r.status.as_ref().map_or(0, |s| s.code);
        let metadata = r
            .dynamic_metadata
            .as_ref()
            .map(|m| {
                m.fields
                    .iter()
                    .filter_map(|(k, v)| match &v.kind {
                        Some(Kind::StringValue(s)) => Some((k.clone(), s.clone())),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let hv = |h: &[envoy_types::pb::envoy::config::core::v3::HeaderValueOption]| -> HashMap<String, String> {
            h.iter().filter_map(|o| o.header.as_ref()).map(|h| (h.key.clone(), h.value.clone())).collect()
        };
        match &r.http_response {
            Some(HttpResponse::DeniedResponse(d)) => Answer {
                rpc_code,
                allowed: false,
                http_status: d.status.as_ref().map_or(0, |s| s.code as u16),
                body: serde_json::from_str(&d.body).unwrap_or(serde_json::Value::Null),
                raw_body: d.body.clone(),
                client_headers: hv(&d.headers),
                upstream_headers: HashMap::new(),
                upstream_remove: vec![],
                metadata,
            },
            Some(HttpResponse::OkResponse(ok)) => Answer {
                rpc_code,
                allowed: true,
                http_status: 200,
                body: serde_json::Value::Null,
                raw_body: String::new(),
                client_headers: hv(&ok.response_headers_to_add),
                upstream_headers: hv(&ok.headers),
                upstream_remove: ok.headers_to_remove.clone(),
                metadata,
            },
            other => panic!("unexpected http_response {other:?}"),
        }
    }

    /// The problem body's `code` ("" when there is none).
    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }
}

/// Sends `n` copies of `req` at once, round-robin over `channels` (replicas
/// sharing one store), and returns every answer: how the tests show that
/// replicas together never allow more than a limit.
pub async fn spread(channels: &[tonic::transport::Channel], n: usize, req: CheckRequest) -> Vec<Answer> {
    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let mut client = AuthorizationClient::new(channels[i % channels.len()].clone());
            let req = req.clone();
            tokio::spawn(async move { Answer::of(client.check(req).await.expect("Check").get_ref()) })
        })
        .collect();
    let mut answers = Vec::with_capacity(n);
    for t in tasks {
        answers.push(t.await.expect("Check task"));
    }
    answers
}

/// How many of `answers` were allowed; every other one must be denied with
/// `code` (anything else fails the test).
pub fn allowed_else(answers: &[Answer], code: &str) -> usize {
    for denied in answers.iter().filter(|a| !a.allowed) {
        assert_eq!(denied.code(), code, "{denied:?}");
    }
    answers.iter().filter(|a| a.allowed).count()
}
