//! What tollgate reads of Envoy's `CheckRequest`, decoded without copies.
//!
//! prost's `CheckRequest` (envoy-types) copies every string of the request
//! into a `String` of its own and its headers into a SipHash `HashMap`: ~26k
//! instructions per Check on a request of seven headers, more than the whole
//! decision, and most of it for fields tollgate never reads (the request
//! id, the scheme, the peers' addresses). [`CheckRequestView`] has the same
//! field numbers but only the fields tollgate reads, as `Bytes` slices of the
//! received message (prost skips the rest without copying it); the headers
//! are a list, as on the wire (a `map` is a repeated entry message), and the
//! metadata (JWT claims) stays bytes until a trusted caller's claim is read.
//!
//! The same rules as prost's own type, so no request means one thing to
//! Envoy and another to tollgate: a header sent twice in `headers` is the
//! last one sent (a map's rule); a field or message sent twice merges as
//! prost merges it. A Check tollgate cannot read whole ([`CheckRequestView::check`]:
//! a string it reads that is not UTF-8, or more than [`MAX_ENTRIES`] of a
//! list) is denied as malformed. Fields tollgate does not read are not checked.
//!
//! Lists are bounded while decoding: an empty header entry is 2 bytes on the
//! wire and 64–96 in memory, so unbounded, one 256 KiB message of them would
//! take 8–16 MiB.
//!
//! May use: nothing of tollgate's (envoy-types' `Metadata` for JWT claims).

use envoy_types::ext_authz::v3::pb::CheckRequest;
use envoy_types::pb::envoy::config::core::v3::Metadata;
use prost::Message as _;
use prost::bytes::{Buf, BufMut, Bytes};
use prost::encoding::{DecodeContext, WireType, bytes, check_wire_type, message, skip_field};

/// The most entries kept of `headers`, of `header_map` and of
/// `metadata_context`'s parts. Envoy sends at most its `max_headers_count`
/// (100 by default) headers and one metadata message; a Check with more is
/// malformed (the entries past this are skipped, not kept).
pub const MAX_ENTRIES: usize = 1024;

/// One more entry of a bounded list (the list and its overflow flag):
/// merged by `merge` while the list holds fewer than [`MAX_ENTRIES`];
/// past that skipped, not kept, and the flag set.
fn merge_bounded<T, B: Buf>(
    (list, overflow): (&mut Vec<T>, &mut bool),
    merge: impl FnOnce(WireType, &mut Vec<T>, &mut B, DecodeContext) -> Result<(), prost::DecodeError>,
    tag: u32,
    wire_type: WireType,
    buf: &mut B,
    ctx: DecodeContext,
) -> Result<(), prost::DecodeError> {
    if list.len() < MAX_ENTRIES {
        return merge(wire_type, list, buf, ctx);
    }
    *overflow = true;
    skip_field(wire_type, tag, buf, ctx)
}

/// Envoy's `CheckRequest`, as far as tollgate reads it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CheckRequestView {
    /// `attributes`.
    #[prost(message, optional, tag = "1")]
    pub attributes: Option<Attributes>,
}

/// `AttributeContext`: its peers (only whether they were sent), the HTTP
/// request, and the metadata JWT claims come in.
#[derive(Clone, PartialEq, Default, Debug)]
pub struct Attributes {
    /// `source` (1): only whether it was sent.
    pub source: Option<Unread>,
    /// `destination` (2): only whether it was sent.
    pub destination: Option<Unread>,
    /// `request` (4).
    pub request: Option<RequestView>,
    /// `metadata_context` (11), each time it was sent, undecoded: read
    /// only for a trusted caller's claims ([`Attributes::metadata`]).
    pub metadata_context: Vec<Bytes>,
    /// More than [`MAX_ENTRIES`] `metadata_context` parts were sent.
    pub overflow: bool,
}

impl Attributes {
    /// `metadata_context`, decoded as prost decodes it (parts sent twice
    /// merge); `None` when none was sent or it does not decode (then a
    /// trusted caller's claims are absent: prost's type failed the Check,
    /// which a working Envoy never sends).
    pub fn metadata(&self) -> Option<Metadata> {
        if self.metadata_context.is_empty() {
            return None;
        }
        let mut m = Metadata::default();
        for part in &self.metadata_context {
            m.merge(part.clone()).ok()?;
        }
        Some(m)
    }
}

impl prost::Message for Attributes {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if let Some(m) = &self.source {
            message::encode(1, m, buf);
        }
        if let Some(m) = &self.destination {
            message::encode(2, m, buf);
        }
        if let Some(m) = &self.request {
            message::encode(4, m, buf);
        }
        bytes::encode_repeated(11, &self.metadata_context, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        match tag {
            // Only whether they were sent: their contents are not parsed.
            1 | 2 => {
                check_wire_type(WireType::LengthDelimited, wire_type)?;
                *(if tag == 1 { &mut self.source } else { &mut self.destination }) = Some(Unread {});
                skip_field(wire_type, tag, buf, ctx)
            }
            4 => message::merge(wire_type, self.request.get_or_insert_with(RequestView::default), buf, ctx),
            11 => merge_bounded(
                (&mut self.metadata_context, &mut self.overflow),
                bytes::merge_repeated,
                tag,
                wire_type,
                buf,
                ctx,
            ),
            // context_extensions: a map, read as entries whatever the wire type says (as prost does).
            10 => skip_field(WireType::LengthDelimited, tag, buf, ctx),
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        self.source.as_ref().map_or(0, |m| message::encoded_len(1, m))
            + self.destination.as_ref().map_or(0, |m| message::encoded_len(2, m))
            + self.request.as_ref().map_or(0, |m| message::encoded_len(4, m))
            + bytes::encoded_len_repeated(11, &self.metadata_context)
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// A message whose presence is all tollgate reads: its bytes are skipped unparsed.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Unread {}

/// `AttributeContext.Request`: the HTTP request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RequestView {
    /// `http`.
    #[prost(message, optional, tag = "2")]
    pub http: Option<HttpView>,
}

/// `AttributeContext.HttpRequest`, as far as tollgate reads it.
#[derive(Clone, PartialEq, Default, Debug)]
pub struct HttpView {
    /// `method` (2).
    pub method: Bytes,
    /// `headers` (3; a `map<string, string>`: entries in wire order).
    pub headers: Vec<HeaderEntry>,
    /// `path` (4), with the query string.
    pub path: Bytes,
    /// `host` (5).
    pub host: Bytes,
    /// `header_map` (13): what Envoy sends instead of `headers` under `encode_raw_headers: true`.
    pub header_map: Option<RawHeaders>,
    /// More than [`MAX_ENTRIES`] `headers` entries were sent.
    pub overflow: bool,
}

impl prost::Message for HttpView {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        for (tag, b) in [(2, &self.method), (4, &self.path), (5, &self.host)] {
            if !b.is_empty() {
                bytes::encode(tag, b, buf);
            }
        }
        message::encode_repeated(3, &self.headers, buf);
        if let Some(m) = &self.header_map {
            message::encode(13, m, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        match tag {
            2 => bytes::merge(wire_type, &mut self.method, buf, ctx),
            // A map: each entry read as length-delimited whatever the wire type says (as prost does).
            3 => merge_bounded(
                (&mut self.headers, &mut self.overflow),
                |wire_type, list, buf, ctx| {
                    let mut entry = HeaderEntry::default();
                    message::merge(wire_type, &mut entry, buf, ctx)?;
                    list.push(entry);
                    Ok(())
                },
                tag,
                WireType::LengthDelimited,
                buf,
                ctx,
            ),
            4 => bytes::merge(wire_type, &mut self.path, buf, ctx),
            5 => bytes::merge(wire_type, &mut self.host, buf, ctx),
            13 => message::merge(wire_type, self.header_map.get_or_insert_with(RawHeaders::default), buf, ctx),
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        [(2, &self.method), (4, &self.path), (5, &self.host)]
            .into_iter()
            .filter(|(_, b)| !b.is_empty())
            .map(|(tag, b)| bytes::encoded_len(tag, b))
            .sum::<usize>()
            + message::encoded_len_repeated(3, &self.headers)
            + self.header_map.as_ref().map_or(0, |m| message::encoded_len(13, m))
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// One entry of the `headers` map.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HeaderEntry {
    /// The name (Envoy sends it lower-case).
    #[prost(bytes = "bytes", tag = "1")]
    pub key: Bytes,
    /// The value.
    #[prost(bytes = "bytes", tag = "2")]
    pub value: Bytes,
}

/// `config.core.v3.HeaderMap`.
#[derive(Clone, PartialEq, Default, Debug)]
pub struct RawHeaders {
    /// `headers` (1).
    pub headers: Vec<RawHeader>,
    /// More than [`MAX_ENTRIES`] entries were sent.
    pub overflow: bool,
}

impl prost::Message for RawHeaders {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        message::encode_repeated(1, &self.headers, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        match tag {
            1 => merge_bounded(
                (&mut self.headers, &mut self.overflow),
                message::merge_repeated,
                tag,
                wire_type,
                buf,
                ctx,
            ),
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        message::encoded_len_repeated(1, &self.headers)
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// `config.core.v3.HeaderValue`: the value as a string or, raw, as bytes.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RawHeader {
    /// `key`.
    #[prost(bytes = "bytes", tag = "1")]
    pub key: Bytes,
    /// `value` (a string).
    #[prost(bytes = "bytes", tag = "2")]
    pub value: Bytes,
    /// `raw_value` (bytes: not required to be UTF-8).
    #[prost(bytes = "bytes", tag = "3")]
    pub raw_value: Bytes,
}

/// Why a Check cannot be read whole: it is denied 400 `request_invalid`
/// (prost's own type refused the first as an RPC error, which a proxy
/// under `failure_mode_allow` would have let through).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Malformed {
    /// A string field tollgate reads is not UTF-8 (the field's name).
    #[error("{0} is not UTF-8")]
    NotUtf8(&'static str),
    /// More than [`MAX_ENTRIES`] of a list (the list's name).
    #[error("more than {MAX_ENTRIES} entries in {0}")]
    TooMany(&'static str),
}

impl CheckRequestView {
    /// The view of a prost `CheckRequest` (the in-process `Authorization`
    /// trait's): encoded, then decoded as the server decodes what it receives.
    pub fn from_request(request: &CheckRequest) -> Self {
        let bytes = Bytes::from(request.encode_to_vec());
        // What prost encodes, prost decodes: the view's fields are a subset with the same types on the wire.
        Self::decode(bytes).unwrap_or_default()
    }

    /// The HTTP request, when Envoy sent one.
    pub fn http(&self) -> Option<&HttpView> {
        self.attributes.as_ref()?.request.as_ref()?.http.as_ref()
    }

    /// Whether tollgate can read the whole request: every string field it
    /// reads UTF-8 (prost's `CheckRequest` refused it otherwise), no list
    /// cut at [`MAX_ENTRIES`]. Called before any of it is read.
    pub fn check(&self) -> Result<(), Malformed> {
        if self.attributes.as_ref().is_some_and(|a| a.overflow) {
            return Err(Malformed::TooMany("metadata_context"));
        }
        let Some(http) = self.http() else { return Ok(()) };
        if http.overflow {
            return Err(Malformed::TooMany("headers"));
        }
        if http.header_map.as_ref().is_some_and(|m| m.overflow) {
            return Err(Malformed::TooMany("header_map"));
        }
        // ASCII first (a word at a time; nearly every header is): a tenth of `from_utf8`'s cost on short strings.
        let utf8 = |b: &Bytes, field: &'static str| {
            if b.is_ascii() || std::str::from_utf8(b).is_ok() { Ok(()) } else { Err(Malformed::NotUtf8(field)) }
        };
        utf8(&http.method, "method")?;
        utf8(&http.path, "path")?;
        utf8(&http.host, "host")?;
        for h in &http.headers {
            utf8(&h.key, "headers")?;
            utf8(&h.value, "headers")?;
        }
        for h in http.header_map.iter().flat_map(|m| &m.headers) {
            utf8(&h.key, "header_map")?;
            utf8(&h.value, "header_map")?;
        }
        Ok(())
    }
}

/// `b` as a string; empty if it is not UTF-8 (never, after [`CheckRequestView::check`]).
pub fn text(b: &Bytes) -> &str {
    std::str::from_utf8(b).unwrap_or_default()
}

impl HttpView {
    /// The value of header `name` in `headers` (the last one sent, as a map
    /// keeps it); `None` when absent or not UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        let h = self.headers.iter().rev().find(|h| h.key == name.as_bytes())?;
        std::str::from_utf8(&h.value).ok()
    }

    /// The names in `headers` and `header_map`, as sent: a name sent twice
    /// comes twice (the caller, which keeps few of them, drops repeats).
    pub fn header_names(&self) -> impl Iterator<Item = &[u8]> {
        let raw = self.header_map.iter().flat_map(|m| &m.headers).map(|h| &h.key[..]);
        self.headers.iter().map(|h| &h.key[..]).chain(raw)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use envoy_types::ext_authz::v3::pb::CheckRequest;
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
    use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
    use proptest::prelude::*;

    use super::*;

    fn request(http: HttpRequest, peers: bool, metadata: Option<Metadata>) -> CheckRequest {
        CheckRequest {
            attributes: Some(AttributeContext {
                source: peers.then(|| Peer { principal: "spiffe://a".into(), ..Default::default() }),
                destination: peers.then(Peer::default),
                request: Some(Request { http: Some(http), ..Default::default() }),
                metadata_context: metadata,
                context_extensions: HashMap::from([("k".into(), "v".into())]),
                ..Default::default()
            }),
        }
    }

    fn jwt_metadata(sub: &str) -> Metadata {
        let payload = Value { kind: Some(Kind::StringValue(sub.into())) };
        Metadata {
            filter_metadata: HashMap::from([(
                "envoy.filters.http.jwt_authn".into(),
                Struct { fields: HashMap::from([("sub".into(), payload)]) },
            )]),
            ..Default::default()
        }
    }

    /// What prost's own type and the view say of the same bytes agree on
    /// every field tollgate reads.
    fn agree(full: &CheckRequest) {
        agree_on(Bytes::from(full.encode_to_vec()));
    }

    /// [`agree`] on bytes: what prost decodes `bytes` to and the view of them.
    fn agree_on(bytes: Bytes) {
        let view = CheckRequestView::decode(bytes.clone()).expect("the view decodes what prost encodes");
        let again = CheckRequest::decode(bytes).expect("prost decodes its own");
        let a = again.attributes.as_ref();
        let v = view.attributes.as_ref();
        assert_eq!(a.is_some(), v.is_some());
        assert_eq!(a.and_then(|a| a.source.as_ref()).is_some(), v.and_then(|v| v.source.as_ref()).is_some());
        assert_eq!(a.and_then(|a| a.destination.as_ref()).is_some(), v.and_then(|v| v.destination.as_ref()).is_some());
        assert_eq!(a.and_then(|a| a.metadata_context.clone()), v.and_then(Attributes::metadata));
        let ah = a.and_then(|a| a.request.as_ref()).and_then(|r| r.http.as_ref());
        let vh = view.http();
        assert_eq!(ah.is_some(), vh.is_some());
        let (Some(ah), Some(vh)) = (ah, vh) else { return };
        assert_eq!(view.check(), Ok(()));
        assert_eq!(ah.method, text(&vh.method));
        assert_eq!(ah.path, text(&vh.path));
        assert_eq!(ah.host, text(&vh.host));
        for (k, value) in &ah.headers {
            assert_eq!(vh.header(k), Some(value.as_str()), "header {k:?}");
        }
        let mut names: Vec<&str> = vh.headers.iter().map(|h| text(&h.key)).collect();
        let mut keys: Vec<&str> = ah.headers.keys().map(String::as_str).collect();
        names.sort_unstable();
        names.dedup();
        keys.sort_unstable();
        assert_eq!(names, keys);
        let raw = |m: Option<&HeaderMap>| {
            m.map(|m| {
                m.headers.iter().map(|h| (h.key.clone(), h.value.clone(), h.raw_value.clone())).collect::<Vec<_>>()
            })
        };
        let vraw = vh.header_map.as_ref().map(|m| {
            m.headers
                .iter()
                .map(|h| (text(&h.key).to_owned(), text(&h.value).to_owned(), h.raw_value.to_vec()))
                .collect::<Vec<_>>()
        });
        assert_eq!(raw(ah.header_map.as_ref()), vraw);
    }

    #[test]
    fn the_view_reads_what_prost_reads() {
        let http = HttpRequest {
            id: "123".into(),
            method: "GET".into(),
            path: "/v1/search?q=x".into(),
            host: "api.example.com".into(),
            scheme: "https".into(),
            headers: HashMap::from([("x-api-key".into(), "tg_live_k".into()), ("accept".into(), "*/*".into())]),
            header_map: Some(HeaderMap {
                headers: vec![HeaderValue {
                    key: "x-raw".into(),
                    raw_value: b"\xffraw".to_vec(),
                    ..Default::default()
                }],
            }),
            ..Default::default()
        };
        agree(&request(http.clone(), true, Some(jwt_metadata("acct_1"))));
        agree(&request(http, false, None));
        agree(&CheckRequest::default());
        agree(&CheckRequest { attributes: Some(AttributeContext::default()) });
        assert_eq!(CheckRequestView::from_request(&CheckRequest::default()), CheckRequestView::default());
    }

    /// A header sent twice (Envoy never does; a hand-made Check may) is
    /// the last one, as prost's map keeps it; listed once.
    #[test]
    fn a_header_sent_twice_is_the_last_one_as_in_a_map() {
        let entry = |k: &str, v: &str| HeaderEntry { key: Bytes::from(k.to_owned()), value: Bytes::from(v.to_owned()) };
        let http = HttpView {
            headers: vec![entry("x-api-key", "first"), entry("accept", "a"), entry("x-api-key", "second")],
            ..Default::default()
        };
        let wire = CheckRequestView {
            attributes: Some(Attributes { request: Some(RequestView { http: Some(http) }), ..Default::default() }),
        }
        .encode_to_vec();
        let prost = CheckRequest::decode(wire.as_slice()).expect("prost decodes it");
        let view = CheckRequestView::decode(Bytes::from(wire)).expect("the view decodes it");
        let headers = &prost.attributes.and_then(|a| a.request).and_then(|r| r.http).expect("http").headers;
        let vh = view.http().expect("http");
        assert_eq!(headers.get("x-api-key").map(String::as_str), Some("second"));
        assert_eq!(vh.header("x-api-key"), Some("second"));
        let names: Vec<&[u8]> = vh.header_names().collect();
        assert_eq!(names, [&b"x-api-key"[..], b"accept", b"x-api-key"]);
    }

    /// A string field tollgate reads that is not UTF-8 fails the Check, as
    /// prost failed it; one it does not read (the request id) does not.
    #[test]
    fn a_string_that_is_not_utf8_is_refused_where_it_is_read() {
        let raw = |f: fn(&mut HttpView)| {
            let mut http =
                HttpView { method: Bytes::from_static(b"GET"), path: Bytes::from_static(b"/"), ..Default::default() };
            f(&mut http);
            CheckRequestView {
                attributes: Some(Attributes { request: Some(RequestView { http: Some(http) }), ..Default::default() }),
            }
        };
        type Case = (fn(&mut HttpView), &'static str);
        let cases: [Case; 5] = [
            (|h| h.path = Bytes::from_static(b"/\xff"), "path"),
            (|h| h.method = Bytes::from_static(b"G\xc3"), "method"),
            (|h| h.host = Bytes::from_static(b"\x80"), "host"),
            (
                |h| {
                    h.headers
                        .push(HeaderEntry { key: Bytes::from_static(b"x-api-key"), value: Bytes::from_static(b"\xff") })
                },
                "headers",
            ),
            (
                |h| {
                    h.header_map = Some(RawHeaders {
                        headers: vec![RawHeader { key: Bytes::from_static(b"k\xff"), ..Default::default() }],
                        overflow: false,
                    })
                },
                "header_map",
            ),
        ];
        for (f, field) in cases {
            let view = raw(f);
            assert_eq!(view.check(), Err(Malformed::NotUtf8(field)));
            assert!(CheckRequest::decode(view.encode_to_vec().as_slice()).is_err(), "prost refuses {field} too");
        }
        // A raw value is bytes; the request id is not read.
        let view = raw(|h| {
            h.header_map = Some(RawHeaders {
                headers: vec![RawHeader {
                    key: Bytes::from_static(b"k"),
                    raw_value: Bytes::from_static(b"\xff\xfe"),
                    ..Default::default()
                }],
                overflow: false,
            })
        });
        assert_eq!(view.check(), Ok(()));
        let mut with_id =
            request(HttpRequest { method: "GET".into(), path: "/".into(), ..Default::default() }, false, None)
                .encode_to_vec();
        // Field 1 of HttpRequest (id) appended as a non-UTF-8 string: nested messages merge.
        let mut http = vec![0x0a, 0x02, 0xff, 0xfe];
        let mut request_msg = vec![0x12, http.len() as u8];
        request_msg.append(&mut http);
        let mut attrs = vec![0x22, request_msg.len() as u8];
        attrs.append(&mut request_msg);
        with_id.extend_from_slice(&[0x0a, attrs.len() as u8]);
        with_id.append(&mut attrs);
        assert!(CheckRequest::decode(with_id.as_slice()).is_err(), "prost refused the whole request");
        let view = CheckRequestView::decode(Bytes::from(with_id)).expect("the view skips the id");
        assert_eq!(view.check(), Ok(()));
        assert_eq!(view.http().map(|h| text(&h.path)), Some("/"), "the merged request keeps its path");
    }

    /// prost reads a map's entry as length-delimited whatever wire type its
    /// key says; so does the view, or the same bytes would read one way to
    /// it and another to prost (a header; a context extension or a peer's
    /// label, whose entry read as fields 1 and 2 would make up a source and
    /// a destination).
    #[test]
    fn a_map_entry_is_read_whatever_its_wire_type_says() {
        let http = HttpRequest {
            path: "/v1/search".into(),
            headers: HashMap::from([("x-api-key".into(), "k".into())]),
            ..Default::default()
        };
        let mut req = request(http, false, None);
        if let Some(a) = req.attributes.as_mut() {
            a.context_extensions = HashMap::from([("e".into(), "v".into())]);
        }
        let bytes = req.encode_to_vec();
        // Field 3 of HttpRequest (headers, 0x1a) and 10 of AttributeContext (0x52) as varints.
        for (key, varint) in [(0x1a, 0x18), (0x52, 0x50)] {
            let mut odd = bytes.clone();
            let at = odd.iter().position(|b| *b == key).unwrap();
            odd[at] = varint;
            agree_on(Bytes::from(odd.clone()));
            let view = CheckRequestView::decode(Bytes::from(odd)).unwrap();
            assert_eq!(view.http().and_then(|h| h.header("x-api-key")), Some("k"));
            assert_eq!(view.http().map(|h| text(&h.path)), Some("/v1/search"));
        }
        // A source whose label entry (Peer field 3) is keyed as a varint:
        // prost reads one peer with a label; the view, one source and no destination.
        let mut label = Vec::new();
        prost::encoding::encode_key(3, WireType::Varint, &mut label);
        let entry = [&[0x0a, 0x01, b'a'][..], &[0x12, 0x01, b'b']].concat();
        prost::encoding::encode_varint(entry.len() as u64, &mut label);
        label.extend(entry);
        let mut attributes = Vec::new();
        bytes::encode(1, &label, &mut attributes);
        let mut odd = Vec::new();
        bytes::encode(1, &attributes, &mut odd);
        agree_on(Bytes::from(odd.clone()));
        let view = CheckRequestView::decode(Bytes::from(odd)).unwrap();
        let a = view.attributes.as_ref().unwrap();
        assert!(a.source.is_some() && a.destination.is_none());
    }

    /// Two messages sent one after the other merge (the protobuf rule):
    /// the metadata's parts merge in the view as in prost's type.
    #[test]
    fn metadata_sent_twice_merges_as_in_prost() {
        let http = HttpRequest { method: "GET".into(), path: "/".into(), ..Default::default() };
        let mut first = jwt_metadata("acct_1");
        first.filter_metadata.insert("only_first".into(), Struct::default());
        let mut both = request(http.clone(), false, Some(first)).encode_to_vec();
        let mut second = jwt_metadata("acct_2");
        second.filter_metadata.insert("only_second".into(), Struct::default());
        both.extend(request(http, true, Some(second)).encode_to_vec());
        let view = CheckRequestView::decode(&both[..]).expect("decodes");
        let attributes = view.attributes.as_ref().expect("attributes");
        assert_eq!(attributes.metadata_context.len(), 2);
        let merged = attributes.metadata().expect("decodes").filter_metadata;
        assert!(merged.contains_key("only_first") && merged.contains_key("only_second"), "{merged:?}");
        assert_eq!(
            merged.get("envoy.filters.http.jwt_authn"),
            jwt_metadata("acct_2").filter_metadata.get("envoy.filters.http.jwt_authn")
        );
        agree_on(Bytes::from(both));
    }

    /// Lists keep [`MAX_ENTRIES`] entries, however many are sent, and say
    /// they were cut; the bound holds across a message sent in parts.
    #[test]
    fn lists_are_bounded_while_decoding() {
        let entry = || HeaderEntry { key: Bytes::from_static(b"a"), value: Bytes::new() };
        let raw = || RawHeader { key: Bytes::from_static(b"a"), ..Default::default() };
        let with = |headers: usize, raws: usize, parts: usize| {
            let http = HttpView {
                headers: std::iter::repeat_with(entry).take(headers).collect(),
                header_map: Some(RawHeaders {
                    headers: std::iter::repeat_with(raw).take(raws).collect(),
                    overflow: false,
                }),
                ..Default::default()
            };
            let attributes = Attributes {
                request: Some(RequestView { http: Some(http) }),
                metadata_context: vec![Bytes::new(); parts],
                ..Default::default()
            };
            CheckRequestView { attributes: Some(attributes) }.encode_to_vec()
        };
        let read = |wire: &[u8]| CheckRequestView::decode(wire).expect("decodes");
        let full = read(&with(MAX_ENTRIES, MAX_ENTRIES, MAX_ENTRIES));
        assert_eq!(full.check(), Ok(()));
        let http = full.http().expect("http");
        assert_eq!(
            (http.headers.len(), http.header_map.as_ref().map(|m| m.headers.len())),
            (MAX_ENTRIES, Some(MAX_ENTRIES))
        );
        for (wire, list) in [
            (with(MAX_ENTRIES + 1, 0, 0), "headers"),
            (with(0, 100_000, 0), "header_map"),
            (with(0, 0, MAX_ENTRIES + 1), "metadata_context"),
        ] {
            let view = read(&wire);
            assert_eq!(view.check(), Err(Malformed::TooMany(list)));
            let http = view.http().expect("http");
            assert!(http.headers.len() <= MAX_ENTRIES);
            assert!(http.header_map.as_ref().is_none_or(|m| m.headers.len() <= MAX_ENTRIES));
            assert!(view.attributes.as_ref().is_some_and(|a| a.metadata_context.len() <= MAX_ENTRIES));
        }
        // The request's `http` sent twice, each part under the bound: the two merge, and so does the count.
        let half = with(MAX_ENTRIES / 2 + 1, 0, 0);
        let view = read(&[half.clone(), half].concat());
        assert_eq!(view.http().map(|h| h.headers.len()), Some(MAX_ENTRIES));
        assert_eq!(view.check(), Err(Malformed::TooMany("headers")));
    }

    fn header_name() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("x-api-key".to_owned()),
            Just("authorization".to_owned()),
            Just("x-tollgate-plan".to_owned()),
            Just("X-Tollgate-Account".to_owned()),
            "[a-z-]{1,12}",
            "\\PC{0,8}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn random_requests_read_the_same(
            method in "\\PC{0,8}",
            path in "\\PC{0,40}",
            host in "\\PC{0,20}",
            id in "\\PC{0,20}",
            headers in proptest::collection::hash_map(header_name(), "\\PC{0,30}", 0..24),
            raw in proptest::option::of(proptest::collection::vec((header_name(), "\\PC{0,10}", proptest::collection::vec(any::<u8>(), 0..10)), 0..4)),
            peers in any::<bool>(),
            sub in proptest::option::of("\\PC{0,12}"),
        ) {
            let header_map = raw.map(|hs| HeaderMap {
                headers: hs.into_iter().map(|(key, value, raw_value)| HeaderValue { key, value, raw_value }).collect(),
            });
            let http = HttpRequest { id, method, path, host, headers, header_map, ..Default::default() };
            agree(&request(http, peers, sub.as_deref().map(jwt_metadata)));
        }
    }
}
