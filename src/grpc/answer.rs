//! The Check's answer, written straight to the wire.
//!
//! [`check_response`](super::ext_authz::check_response) builds Envoy's
//! `CheckResponse` from an [`Outcome`]: a `String` per header name and value,
//! a map (hashed) for the metadata, then prost encodes it and everything is
//! dropped. That was a fifth of what an allowed Check cost tollgate. Here the
//! same message is encoded from the outcome without being built: names are
//! borrowed (tollgate's own are static), values are the outcome's own. `check_response`
//! stays the reference (and the in-process answer of the `Authorization`
//! trait): the tests decode these bytes and compare them with it.
//!
//! [`CheckServer`] is the `envoy.service.auth.v3.Authorization` service as
//! tonic would generate it, with this encoder for its answers.
//!
//! May use: `authorizer` (the outcome and its metadata), `problem` (header names).

use std::future::Future;
use std::pin::Pin;

use envoy_types::ext_authz::v3::pb::HeaderAppendAction;
use prost::bytes::{Buf, BufMut};
use prost::encoding::{DecodeContext, WireType, encode_key, encode_varint, encoded_len_varint, key_len, skip_field};
use tonic::body::Body;
use tonic::codegen::{Body as HttpBody, StdError, http};
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::{Request, Status};

use super::check_request::CheckRequestView;
use super::ext_authz::{ExtAuthz, rpc_code};
use super::view_server::{Method, Server};
use crate::authorizer::Outcome;
use crate::decision::Verdict;
use crate::problem::{Name, Text};

/// A `CheckResponse` for one outcome, encoded on the way out (prost calls
/// [`prost::Message::encode_raw`]); never decoded.
#[derive(Debug)]
pub struct Answer {
    outcome: Outcome,
}

impl Answer {
    /// The answer to send for `outcome`.
    pub fn new(outcome: Outcome) -> Self {
        Self { outcome }
    }

    /// `google.rpc.Status { code = 1, message = 2 }`: the deny's label as message.
    fn status(&self) -> (u64, &str) {
        let verdict = self.outcome.decision.verdict;
        let code = rpc_code(verdict);
        // The gRPC codes are 0..=16: the cast keeps them as protobuf's int32 varint does.
        let message = if code == tonic::Code::Ok { "" } else { verdict.label() };
        (code as u64, message)
    }

    fn status_len(&self) -> usize {
        let (code, message) = self.status();
        varint_len(1, code) + str_len(2, message)
    }

    fn metadata_len(&self) -> usize {
        self.outcome.metadata().map(|(k, v)| field_len(1, entry_len(k, v))).sum()
    }

    /// The `http_response` oneof: its tag (`denied_response = 2`, `ok_response = 3`) and length.
    fn http(&self) -> (u32, usize) {
        let r = &self.outcome.response;
        match self.outcome.decision.verdict {
            // OkHttpResponse { headers = 2, headers_to_remove = 5, response_headers_to_add = 6 }
            Verdict::Allow(_) => (
                3,
                headers_len(2, &r.upstream_headers)
                    + r.upstream_remove.iter().map(|h| field_len(5, h.len())).sum::<usize>()
                    + headers_len(6, &r.client_headers),
            ),
            // DeniedHttpResponse { status = 1 { code = 1 }, headers = 2, body = 3 }
            Verdict::Deny(_) => (
                2,
                field_len(1, varint_len(1, u64::from(r.status)))
                    + headers_len(2, &r.client_headers)
                    + str_len(3, r.body.as_deref().unwrap_or("")),
            ),
        }
    }
}

impl prost::Message for Answer {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        // CheckResponse { status = 1, http_response = 2 | 3, dynamic_metadata = 4 }
        let (code, message) = self.status();
        put_head(1, self.status_len(), buf);
        put_varint(1, code, buf);
        put_str(2, message, buf);

        let r = &self.outcome.response;
        let (tag, len) = self.http();
        put_head(tag, len, buf);
        if tag == 3 {
            for (k, v) in &r.upstream_headers {
                put_header(2, k, v, buf);
            }
            for h in &r.upstream_remove {
                put_bytes(5, h.as_bytes(), buf);
            }
            for (k, v) in &r.client_headers {
                put_header(6, k, v, buf);
            }
        } else {
            put_head(1, varint_len(1, u64::from(r.status)), buf);
            put_varint(1, u64::from(r.status), buf);
            for (k, v) in &r.client_headers {
                put_header(2, k, v, buf);
            }
            put_str(3, r.body.as_deref().unwrap_or(""), buf);
        }

        // Struct { fields = 1: map<string, Value> }: entries { key = 1, value = 2 };
        // no field at all when the answer goes without.
        if !self.outcome.carries_metadata {
            return;
        }
        put_head(4, self.metadata_len(), buf);
        for (k, v) in self.outcome.metadata() {
            put_head(1, entry_len(k, v), buf);
            put_str(1, k, buf);
            // Value { string_value = 3 }: a oneof, sent even when empty.
            put_head(2, field_len(3, v.len()), buf);
            put_bytes(3, v.as_bytes(), buf);
        }
    }

    /// Never decoded (the answer only leaves): every field is skipped.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        let (tag, len) = self.http();
        let meta = if self.outcome.carries_metadata { field_len(4, self.metadata_len()) } else { 0 };
        field_len(1, self.status_len()) + field_len(tag, len) + meta
    }

    fn clear(&mut self) {}
}

/// `HeaderValueOption.append_action`: tollgate's headers replace the request's or response's own.
const OVERWRITE: u64 = HeaderAppendAction::OverwriteIfExistsOrAdd as u64;

/// Bytes of a length-delimited field `tag` holding `len` bytes.
fn field_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

/// Bytes of a singular string field (proto3 leaves an empty one out).
fn str_len(tag: u32, s: &str) -> usize {
    if s.is_empty() { 0 } else { field_len(tag, s.len()) }
}

/// Bytes of a singular varint field (proto3 leaves a zero out).
fn varint_len(tag: u32, v: u64) -> usize {
    if v == 0 { 0 } else { key_len(tag) + encoded_len_varint(v) }
}

/// `HeaderValue { key = 1, value = 2 }`.
fn header_value_len(k: &str, v: &str) -> usize {
    str_len(1, k) + str_len(2, v)
}

/// `HeaderValueOption { header = 1, append_action = 3 }`.
fn header_len(k: &str, v: &str) -> usize {
    field_len(1, header_value_len(k, v)) + varint_len(3, OVERWRITE)
}

fn headers_len(tag: u32, headers: &[(Name, Text)]) -> usize {
    headers.iter().map(|(k, v)| field_len(tag, header_len(k, v))).sum()
}

/// A metadata map entry `{ key = 1, value = 2: Value { string_value = 3 } }`.
fn entry_len(k: &str, v: &str) -> usize {
    str_len(1, k) + field_len(2, field_len(3, v.len()))
}

fn put_head(tag: u32, len: usize, buf: &mut impl BufMut) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(len as u64, buf);
}

/// A length-delimited field, written even when empty (repeated and oneof fields).
fn put_bytes(tag: u32, bytes: &[u8], buf: &mut impl BufMut) {
    put_head(tag, bytes.len(), buf);
    buf.put_slice(bytes);
}

fn put_str(tag: u32, s: &str, buf: &mut impl BufMut) {
    if !s.is_empty() {
        put_bytes(tag, s.as_bytes(), buf);
    }
}

fn put_varint(tag: u32, v: u64, buf: &mut impl BufMut) {
    if v != 0 {
        encode_key(tag, WireType::Varint, buf);
        encode_varint(v, buf);
    }
}

fn put_header(tag: u32, k: &str, v: &str, buf: &mut impl BufMut) {
    put_head(tag, header_len(k, v), buf);
    put_head(1, header_value_len(k, v), buf);
    put_str(1, k, buf);
    put_str(2, v, buf);
    put_varint(3, OVERWRITE, buf);
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Envoy's `Authorization` service (what `AuthorizationServer` is, as tonic
/// generates it), answering Checks with [`Answer`]s.
pub type CheckServer = Server<Check>;

/// The unary Check method: decoded as a view of the received bytes
/// (`check_request`), not copied into prost's own type; answered with the
/// wire encoder above.
#[derive(Debug, Clone)]
pub struct Check(ExtAuthz);

impl Check {
    /// Checks with `ext_authz`.
    pub fn new(ext_authz: ExtAuthz) -> Self {
        Self(ext_authz)
    }
}

impl Method for Check {
    const SERVICE: &'static str = <envoy_types::ext_authz::v3::pb::AuthorizationServer<ExtAuthz> as NamedService>::NAME;
    const PATH: &'static str = "/envoy.service.auth.v3.Authorization/Check";
    type Codec = tonic_prost::ProstCodec<Answer, CheckRequestView>;

    async fn serve<B>(self, grpc: &mut Grpc<Self::Codec>, req: http::Request<B>) -> http::Response<Body>
    where
        B: HttpBody + Send + 'static,
        B::Error: Into<StdError> + Send + 'static,
    {
        grpc.unary(self, req).await
    }
}

impl UnaryService<CheckRequestView> for Check {
    type Response = Answer;
    type Future = BoxFuture<Result<tonic::Response<Answer>, Status>>;

    fn call(&mut self, request: Request<CheckRequestView>) -> Self::Future {
        let ext_authz = self.0.clone();
        Box::pin(async move { ext_authz.decide(request).await.map(|o| tonic::Response::new(Answer::new(o))) })
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::ext_authz::v3::pb::CheckResponse;
    use proptest::prelude::*;
    use prost::Message as _;

    use super::*;
    use crate::decision::{AllowKind, Code, Decision};
    use crate::grpc::ext_authz::check_response;
    use crate::problem::Response;

    /// The wire bytes decode to exactly what `check_response` builds, and
    /// `encoded_len` is their length.
    fn same_as_reference(outcome: Outcome) {
        let bytes = Answer::new(outcome.clone()).encode_to_vec();
        assert_eq!(bytes.len(), Answer::new(outcome.clone()).encoded_len());
        let decoded = CheckResponse::decode(bytes.as_slice()).expect("our bytes decode");
        assert_eq!(decoded, check_response(outcome));
    }

    #[test]
    fn the_method_is_envoy_s() {
        assert_eq!(CheckServer::NAME, "envoy.service.auth.v3.Authorization");
        assert_eq!(Check::PATH, format!("/{}/Check", CheckServer::NAME));
    }

    fn outcome(decision: Decision, response: Response, charge: Option<String>) -> Outcome {
        Outcome { decision, response, route: None, charge, carries_metadata: true }
    }

    /// `server.dynamic_metadata: lean` leaves the metadata out of plain
    /// allows only (what the request says cannot choose: only the verdict,
    /// the shadowed code and the charge do).
    #[test]
    fn lean_metadata_leaves_plain_allows_only() {
        let mut config = crate::config::Config::parse(crate::config::DEMO_CONFIG, "demo").expect("demo config");
        let with = |config: &crate::config::Config, d: Decision, charge: Option<&str>| {
            let o = Outcome::new(config, d, Response::default(), None, charge.map(Into::into));
            same_as_reference(o.clone());
            check_response(o).dynamic_metadata.map(|m| m.fields.len())
        };
        let allowed = || {
            let mut d = Decision::allow(AllowKind::Allowed);
            d.account = Some("acct_a".into());
            d.plan = Some("pro".into());
            d
        };
        let shadowed = || {
            let mut d = allowed();
            d.shadowed = Some(Code::QuotaExhausted);
            d
        };
        // full (the default): every answer.
        assert_eq!(with(&config, allowed(), None), Some(3));
        assert_eq!(with(&config, Decision::allow(AllowKind::Public), None), Some(1));
        config.server.dynamic_metadata = crate::config::DynamicMetadata::Lean;
        assert_eq!(with(&config, allowed(), None), None);
        assert_eq!(with(&config, Decision::allow(AllowKind::Public), None), None);
        assert_eq!(with(&config, allowed(), Some("v1.charge")), Some(4), "settlement needs its charge");
        assert_eq!(with(&config, shadowed(), None), Some(4), "the log shows what shadow mode let through");
        for kind in [AllowKind::Grace, AllowKind::FailOpen, AllowKind::Paid] {
            assert_eq!(with(&config, Decision::allow(kind), None), Some(1), "{kind:?}");
        }
        for code in Code::ALL {
            assert_eq!(with(&config, Decision::deny(code), None), Some(1), "{code:?}");
        }
    }

    #[test]
    fn an_allow_as_tollgate_sends_it() {
        let mut d = Decision::allow(AllowKind::Allowed);
        d.account = Some("acct_bench".into());
        d.plan = Some("bench".into());
        let r = Response {
            status: 200,
            body: None,
            client_headers: vec![
                ("ratelimit-policy".into(), "\"requests-month\";q=1000;w=2592000".into()),
                ("ratelimit".into(), "\"requests-month\";r=999;t=604800".into()),
            ],
            upstream_headers: vec![("x-tollgate-account".into(), "acct_bench".into())],
            upstream_remove: vec![
                "x-tollgate-plan".into(),
                Text::Shared("x-api-key".into()),
                Text::Owned("x-forged".into()),
            ],
        };
        same_as_reference(outcome(d, r, Some("v1.charge".into())));
    }

    #[test]
    fn every_deny_code() {
        for code in Code::ALL {
            let r = Response {
                status: code.http_status(),
                body: Some("{\"type\":\"x\"}".into()),
                client_headers: vec![("content-type".into(), "application/problem+json".into())],
                ..Response::default()
            };
            same_as_reference(outcome(Decision::deny(code), r, None));
        }
    }

    #[test]
    fn empty_parts_are_what_prost_makes_of_them() {
        // Empty values, names and bodies; no headers at all; a shadowed allow.
        let mut d = Decision::allow(AllowKind::Allowed);
        d.account = Some("".into());
        d.shadowed = Some(Code::QuotaExhausted);
        let r = Response {
            status: 200,
            upstream_headers: vec![("".into(), Text::Owned(String::new())), ("x-tollgate-shadow".into(), "".into())],
            upstream_remove: vec![Text::Owned(String::new())],
            ..Response::default()
        };
        same_as_reference(outcome(d, r, Some(String::new())));
        same_as_reference(outcome(Decision::deny(Code::RateLimited), Response::default(), None));
    }

    fn headers() -> impl Strategy<Value = Vec<(Name, Text)>> {
        prop::collection::vec(
            ("\\PC{0,40}", "\\PC{0,300}").prop_map(|(k, v)| (Text::Owned(k), Text::Shared(v.into()))),
            0..8,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        /// Any outcome, however long or odd its strings (lengths past one
        /// varint byte, non-ASCII), encodes to the reference message.
        #[test]
        fn any_outcome_encodes_to_the_reference(
            allow in any::<bool>(),
            code in 0..Code::ALL.len(),
            account in proptest::option::of("\\PC{0,80}"),
            plan in proptest::option::of("[a-z]{0,20}"),
            charge in proptest::option::of("[A-Za-z0-9._-]{0,400}"),
            shadowed in any::<bool>(),
            carries_metadata in any::<bool>(),
            body in proptest::option::of("\\PC{0,2000}"),
            status in 0u16..1000,
            client in headers(),
            upstream in headers(),
            remove in prop::collection::vec("\\PC{0,40}", 0..10),
        ) {
            let mut d = if allow { Decision::allow(AllowKind::Allowed) } else { Decision::deny(Code::ALL[code]) };
            d.account = account.map(Into::into);
            d.plan = plan.map(Into::into);
            d.shadowed = shadowed.then_some(Code::ALL[code]);
            let r = Response {
                status,
                body,
                client_headers: client,
                upstream_headers: upstream,
                upstream_remove: remove.into_iter().map(Text::Owned).collect(),
            };
            same_as_reference(Outcome { carries_metadata, ..outcome(d, r, charge) });
        }
    }
}
