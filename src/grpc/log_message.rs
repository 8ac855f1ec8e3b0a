//! What settlement reads of Envoy's access-log stream, decoded without
//! building what it does not read.
//!
//! prost's `StreamAccessLogsMessage` (envoy-types) decodes every entry into
//! an `HttpAccessLogEntry` of 1,848 bytes before its strings and maps: an
//! empty entry is 2 bytes on the wire, so one 256 KiB message of them took
//! 242 MB, from anyone who reaches the gRPC port. [`LogMessage`] keeps only
//! the entries settlement acts on — final ones that carry a charge, decided
//! entry by entry while decoding, so the others are never kept — each as
//! a copy of its own bytes and of its charge (not slices of the stream's
//! receive buffer, which would stay allocated while the entry is settled),
//! and its status; a logged response header is looked up in those bytes
//! when settlement asks for one. A kept entry takes 72 bytes plus its
//! copies, and is at least ~55 bytes on the wire; nothing else is kept,
//! whatever the entry holds.
//!
//! The same rules as prost's own type, so an entry means to settlement what
//! it meant before: a field or message sent twice merges as prost merges it,
//! a map key sent twice is the last one, and of a `oneof` the last member
//! sent wins (`tcp_logs` after `http_logs` leaves no HTTP entries). Fields
//! settlement does not read are skipped unchecked: prost refused a whole
//! message for a string that is not UTF-8 anywhere in it, which ended the
//! stream and lost every entry on it; now such a charge is malformed and
//! such a cost header not a number (each counted as a bad entry).
//!
//! May use: `settlement` (the metadata names), `settler` (what an entry is to it).

use envoy_types::pb::envoy::data::accesslog::v3::AccessLogType;
use prost::bytes::{Buf, BufMut, Bytes};
use prost::encoding::{DecodeContext, WireType, bytes, decode_key, decode_varint, int32, skip_field, uint32};

use crate::settlement;
use crate::settler::LoggedHeaders;

/// What a string settlement reads stands for when it is not UTF-8: not a
/// charge and not a number, so the entry is counted bad, never applied.
const NOT_UTF8: &str = "\u{fffd}";

/// `StreamAccessLogsMessage`, as far as settlement reads it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct LogMessage {
    /// The HTTP entries settlement acts on, in the order sent: the final
    /// ones (`access_log_type` unset or `DOWNSTREAM_END`, not the periodic
    /// entries of long streams nor a router's per-attempt ones) with a
    /// charge in their ext_authz metadata. The others are not kept.
    pub entries: Vec<LogEntry>,
}

/// One `HTTPAccessLogEntry` settlement acts on.
#[derive(Debug, Clone, PartialEq)]
pub struct LogEntry {
    /// The charge (a metadata string), as sent.
    charge: Bytes,
    /// `response.response_code`; 0 when none was sent.
    code: u32,
    /// The entry's own bytes, where logged response headers are looked up.
    raw: Bytes,
}

impl LogEntry {
    /// The charge; one that is not UTF-8 reads as no charge tollgate made.
    pub fn charge(&self) -> &str {
        std::str::from_utf8(&self.charge).unwrap_or(NOT_UTF8)
    }

    /// The response status; 0 when none was sent (the client left first).
    pub fn code(&self) -> u32 {
        self.code
    }
}

impl LoggedHeaders for LogEntry {
    /// The last value logged under `name` (as a map keeps it), else under
    /// `name` in another case (Envoy logs names as configured). A value
    /// that is not UTF-8 reads as one that is not a number.
    fn header(&self, name: &str) -> Option<&str> {
        let (mut exact, mut folded) = (None, None);
        for response in fields(&self.raw, 4, &[]) {
            for entry in fields(response, 4, RESPONSE_MAPS) {
                let (mut key, mut value): (&[u8], &[u8]) = (&[], &[]);
                for (tag, b) in fields_all(entry, &[]) {
                    match tag {
                        1 => key = b,
                        2 => value = b,
                        _ => {}
                    }
                }
                if key == name.as_bytes() {
                    exact = Some(value);
                } else if key.eq_ignore_ascii_case(name.as_bytes()) {
                    folded = Some(value);
                }
            }
        }
        exact.or(folded).map(|v| std::str::from_utf8(v).unwrap_or(NOT_UTF8))
    }
}

/// prost reads a `map` field's entry as length-delimited whatever wire type
/// its key says (other fields are read as their key says): so does the view,
/// or a message could read one way to prost and another to it.
const READ_AS_ENTRY: WireType = WireType::LengthDelimited;

/// The `map` fields of `HTTPResponseProperties`: `response_headers`, `response_trailers`.
const RESPONSE_MAPS: &[u32] = &[4, 5];

/// The length-delimited fields of a message's bytes that were checked when
/// it was decoded, with their tags (fields `maps` are maps: read as entries);
/// stops at anything malformed.
fn fields_all<'a>(mut buf: &'a [u8], maps: &'static [u32]) -> impl Iterator<Item = (u32, &'a [u8])> {
    std::iter::from_fn(move || {
        loop {
            let (tag, wire_type) = decode_key(&mut buf).ok()?;
            if wire_type != WireType::LengthDelimited && !maps.contains(&tag) {
                skip_field(wire_type, tag, &mut buf, DecodeContext::default()).ok()?;
                continue;
            }
            let len = usize::try_from(decode_varint(&mut buf).ok()?).ok()?;
            let (field, rest) = buf.split_at_checked(len)?;
            buf = rest;
            return Some((tag, field));
        }
    })
}

/// The values of length-delimited field `tag` in a message's bytes, in order.
fn fields<'a>(buf: &'a [u8], tag: u32, maps: &'static [u32]) -> impl Iterator<Item = &'a [u8]> {
    fields_all(buf, maps).filter(move |(t, _)| *t == tag).map(|(_, b)| b)
}

/// Runs `field` on each field of the length-delimited message at the front
/// of `buf` (as prost's `merge_loop`; `field` reads or skips it).
fn each_field(
    wire_type: WireType,
    buf: &mut impl Buf,
    ctx: &DecodeContext,
    mut field: impl FnMut(u32, WireType, &mut Bytes) -> Result<(), prost::DecodeError>,
) -> Result<(), prost::DecodeError> {
    let mut message = Bytes::new();
    bytes::merge(wire_type, &mut message, buf, ctx.clone())?;
    while message.has_remaining() {
        let (tag, wire_type) = decode_key(&mut message)?;
        field(tag, wire_type, &mut message)?;
    }
    Ok(())
}

/// A `google.protobuf.Value` as settlement reads it: its string, or `None`
/// when its kind is another (or unset). A kind sent twice: the last one.
fn value(
    wire_type: WireType,
    buf: &mut Bytes,
    ctx: &DecodeContext,
    v: &mut Option<Bytes>,
) -> Result<(), prost::DecodeError> {
    each_field(wire_type, buf, ctx, |tag, wire_type, b| match tag {
        3 => bytes::merge(wire_type, v.get_or_insert_default(), b, ctx.clone()),
        1 | 2 | 4..=6 => {
            *v = None;
            skip_field(wire_type, tag, b, ctx.clone())
        }
        _ => skip_field(wire_type, tag, b, ctx.clone()),
    })
}

/// The charge in the ext_authz namespace's `Struct`: `charge` (from a gRPC
/// Check) if set, else `x-tollgate-charge` (the HTTP door's header); a
/// field set to another kind than a string is no charge.
#[derive(Default)]
struct Namespace {
    /// `charge`: unset, or its string (`None`: another kind).
    field: Option<Option<Bytes>>,
    /// `x-tollgate-charge`, the same way.
    header: Option<Option<Bytes>>,
}

impl Namespace {
    /// Merges one more part of the `Struct` (its `fields` map entries).
    fn merge(&mut self, wire_type: WireType, buf: &mut Bytes, ctx: &DecodeContext) -> Result<(), prost::DecodeError> {
        each_field(wire_type, buf, ctx, |tag, wire_type, b| {
            if tag != 1 {
                return skip_field(wire_type, tag, b, ctx.clone());
            }
            // A map entry: its key and value, each the last sent; inserted
            // whole, replacing what the key had.
            let (mut key, mut v) = (Bytes::new(), None);
            each_field(READ_AS_ENTRY, b, ctx, |tag, wire_type, b| match tag {
                1 => bytes::merge(wire_type, &mut key, b, ctx.clone()),
                2 => value(wire_type, b, ctx, &mut v),
                _ => skip_field(wire_type, tag, b, ctx.clone()),
            })?;
            if key == settlement::FIELD.as_bytes() {
                self.field = Some(v);
            } else if key == settlement::HTTP_HEADER.as_bytes() {
                self.header = Some(v);
            }
            Ok(())
        })
    }

    fn charge(self) -> Option<Bytes> {
        match self.field {
            Some(v) => v,
            None => self.header.flatten(),
        }
    }
}

/// `HTTPAccessLogEntry` at `raw`: kept when final and charged.
fn entry(raw: Bytes, ctx: &DecodeContext) -> Result<Option<LogEntry>, prost::DecodeError> {
    let mut buf = raw.clone();
    let (mut common, mut kind, mut namespace, mut code) = (false, 0, None::<Namespace>, None);
    while buf.has_remaining() {
        let (tag, wire_type) = decode_key(&mut buf)?;
        match tag {
            // common_properties: access_log_type (33) and metadata (17).
            1 => {
                common = true;
                each_field(wire_type, &mut buf, ctx, |tag, wire_type, b| match tag {
                    33 => int32::merge(wire_type, &mut kind, b, ctx.clone()),
                    // metadata.filter_metadata: a map of namespace to `Struct` (2: typed_filter_metadata).
                    17 => each_field(wire_type, b, ctx, |tag, wire_type, b| {
                        if tag != 1 {
                            let wire_type = if tag == 2 { READ_AS_ENTRY } else { wire_type };
                            return skip_field(wire_type, tag, b, ctx.clone());
                        }
                        let (mut key, mut fields) = (Bytes::new(), Namespace::default());
                        each_field(READ_AS_ENTRY, b, ctx, |tag, wire_type, b| match tag {
                            1 => bytes::merge(wire_type, &mut key, b, ctx.clone()),
                            2 => fields.merge(wire_type, b, ctx),
                            _ => skip_field(wire_type, tag, b, ctx.clone()),
                        })?;
                        if key == settlement::NAMESPACE.as_bytes() {
                            namespace = Some(fields);
                        }
                        Ok(())
                    }),
                    // filter_state_objects, custom_tags: maps.
                    21 | 22 => skip_field(READ_AS_ENTRY, tag, b, ctx.clone()),
                    _ => skip_field(wire_type, tag, b, ctx.clone()),
                })?;
            }
            // response: response_code (1, a `UInt32Value`) and response_headers (4, a map, read when asked).
            4 => each_field(wire_type, &mut buf, ctx, |tag, wire_type, b| match tag {
                1 => {
                    let code = code.get_or_insert(0);
                    each_field(wire_type, b, ctx, |tag, wire_type, b| match tag {
                        1 => uint32::merge(wire_type, code, b, ctx.clone()),
                        _ => skip_field(wire_type, tag, b, ctx.clone()),
                    })
                }
                // Checked now, so that a lookup later reads what prost would have.
                4 => each_field(READ_AS_ENTRY, b, ctx, |tag, wire_type, b| match tag {
                    1 | 2 => bytes::merge(wire_type, &mut Bytes::new(), b, ctx.clone()),
                    _ => skip_field(wire_type, tag, b, ctx.clone()),
                }),
                5 => skip_field(READ_AS_ENTRY, tag, b, ctx.clone()),
                _ => skip_field(wire_type, tag, b, ctx.clone()),
            })?,
            _ => skip_field(wire_type, tag, &mut buf, ctx.clone())?,
        }
    }
    let final_entry = [AccessLogType::NotSet as i32, AccessLogType::DownstreamEnd as i32];
    if !common || !final_entry.contains(&kind) {
        return Ok(None);
    }
    let Some(charge) = namespace.and_then(Namespace::charge) else { return Ok(None) };
    // Copied out of the received message: a slice of it would keep the
    // stream's whole receive buffer (up to twice `max_message_bytes`) for
    // as long as the entry is being settled.
    let (charge, raw) = (Bytes::copy_from_slice(&charge), Bytes::copy_from_slice(&raw));
    Ok(Some(LogEntry { charge, code: code.unwrap_or(0), raw }))
}

impl prost::Message for LogMessage {
    /// The kept entries, as sent, in `http_logs` (the server only decodes
    /// this type; a test reads these bytes back).
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if !self.entries.is_empty() {
            prost::encoding::encode_key(2, WireType::LengthDelimited, buf);
            prost::encoding::encode_varint(self.http_logs_len() as u64, buf);
            for e in &self.entries {
                bytes::encode(1, &e.raw, buf);
            }
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
            // http_logs: its log_entry (1), each decoded, and kept or dropped, before the next.
            2 => each_field(wire_type, buf, &ctx, |tag, wire_type, b| {
                if tag != 1 {
                    return skip_field(wire_type, tag, b, ctx.clone());
                }
                let mut raw = Bytes::new();
                bytes::merge(wire_type, &mut raw, b, ctx.clone())?;
                self.entries.extend(entry(raw, &ctx)?);
                Ok(())
            }),
            // tcp_logs: the other member of the oneof, replacing the HTTP entries.
            3 => {
                self.entries.clear();
                bytes::merge(wire_type, &mut Bytes::new(), buf, ctx)
            }
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        if self.entries.is_empty() {
            return 0;
        }
        let len = self.http_logs_len();
        prost::encoding::key_len(2) + prost::encoding::encoded_len_varint(len as u64) + len
    }

    fn clear(&mut self) {
        self.entries.clear();
    }
}

impl LogMessage {
    /// The length of `http_logs` holding the kept entries.
    fn http_logs_len(&self) -> usize {
        self.entries.iter().map(|e| bytes::encoded_len(1, &e.raw)).sum()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use envoy_types::pb::envoy::config::core::v3::Metadata;
    use envoy_types::pb::envoy::data::accesslog::v3::{
        AccessLogCommon, HttpAccessLogEntry, HttpRequestProperties, HttpResponseProperties,
    };
    use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
    use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::{
        HttpAccessLogEntries, LogEntries, TcpAccessLogEntries,
    };
    use envoy_types::pb::google::protobuf::{Struct, UInt32Value, Value, value::Kind};
    use proptest::prelude::*;
    use prost::Message as _;

    use super::*;

    /// What settlement read of a prost entry before this view (the old
    /// `access_log::entry`): the charge, the status, and the headers.
    fn reference(entry: &HttpAccessLogEntry) -> Option<(String, u32, HashMap<String, String>)> {
        let common = entry.common_properties.as_ref()?;
        let final_entry = [AccessLogType::NotSet as i32, AccessLogType::DownstreamEnd as i32];
        if !final_entry.contains(&common.access_log_type) {
            return None;
        }
        let fields = &common.metadata.as_ref()?.filter_metadata.get(settlement::NAMESPACE)?.fields;
        let charge = fields.get(settlement::FIELD).or_else(|| fields.get(settlement::HTTP_HEADER))?;
        let Some(Kind::StringValue(charge)) = &charge.kind else { return None };
        let response = entry.response.as_ref();
        let code = response.and_then(|r| r.response_code).map_or(0, |c| c.value);
        Some((charge.clone(), code, response.map(|r| r.response_headers.clone()).unwrap_or_default()))
    }

    fn message(entries: Vec<HttpAccessLogEntry>) -> StreamAccessLogsMessage {
        StreamAccessLogsMessage {
            identifier: None,
            log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries { log_entry: entries })),
        }
    }

    fn string(s: &str) -> Value {
        Value { kind: Some(Kind::StringValue(s.into())) }
    }

    /// An entry with `fields` in the ext_authz namespace (and `other`
    /// namespaces beside it), of `kind`, with a status and headers.
    fn entry(
        kind: AccessLogType,
        fields: Vec<(&str, Value)>,
        code: Option<u32>,
        headers: &[(&str, &str)],
    ) -> HttpAccessLogEntry {
        let ns = Struct { fields: fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect() };
        let other = Struct { fields: [("charge".to_owned(), string("elsewhere"))].into() };
        HttpAccessLogEntry {
            common_properties: Some(AccessLogCommon {
                access_log_type: kind as i32,
                metadata: Some(Metadata {
                    filter_metadata: [(settlement::NAMESPACE.to_owned(), ns), ("envoy.lb".to_owned(), other)].into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            request: Some(HttpRequestProperties { path: "/v1/search".into(), ..Default::default() }),
            response: Some(HttpResponseProperties {
                response_code: code.map(|value| UInt32Value { value }),
                response_headers: headers.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// prost's type and the view, of the same bytes, settle the same
    /// entries: the same charges, statuses, and cost headers by any name.
    fn agree_on(bytes: &[u8], names: &[&str]) {
        let view = LogMessage::decode(bytes).expect("the view decodes what prost decodes");
        let full = StreamAccessLogsMessage::decode(bytes).expect("prost decodes it");
        let want: Vec<_> = match &full.log_entries {
            Some(LogEntries::HttpLogs(h)) => h.log_entry.iter().filter_map(reference).collect(),
            _ => Vec::new(),
        };
        assert_eq!(view.entries.len(), want.len(), "entries kept");
        for (v, (charge, code, headers)) in view.entries.iter().zip(&want) {
            assert_eq!(v.charge(), charge);
            assert_eq!(v.code(), *code);
            for name in names {
                let old = headers
                    .get(*name)
                    .or_else(|| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v));
                // A name in two other cases: prost's map picked either; the view the last.
                let ambiguous = headers.keys().filter(|k| k.eq_ignore_ascii_case(name) && k != name).count() > 1
                    && !headers.contains_key(*name);
                if !ambiguous {
                    assert_eq!(v.header(name), old.map(String::as_str), "header {name}");
                }
            }
        }
    }

    fn agree(m: &StreamAccessLogsMessage, names: &[&str]) {
        agree_on(&m.encode_to_vec(), names);
    }

    #[test]
    fn the_view_keeps_what_settlement_read() {
        use AccessLogType::{DownstreamEnd, DownstreamPeriodic, NotSet, UpstreamEnd};
        let names = ["x-usage-tokens", "X-Usage-Tokens", "absent"];
        let entries = vec![
            entry(NotSet, vec![("charge", string("c1"))], Some(200), &[("x-usage-tokens", "7")]),
            entry(DownstreamEnd, vec![("charge", string("c2"))], Some(503), &[]),
            entry(DownstreamEnd, vec![("charge", string("c3"))], None, &[("X-Usage-Tokens", "9")]),
            // The HTTP door's field, and both (the gRPC one wins).
            entry(NotSet, vec![("x-tollgate-charge", string("h1"))], Some(201), &[]),
            entry(NotSet, vec![("charge", string("c4")), ("x-tollgate-charge", string("h2"))], Some(200), &[]),
            // Not final, not charged, or charged with another kind: not kept.
            entry(DownstreamPeriodic, vec![("charge", string("p"))], Some(200), &[]),
            entry(UpstreamEnd, vec![("charge", string("u"))], Some(200), &[]),
            entry(NotSet, vec![("account", string("acct"))], Some(200), &[]),
            entry(NotSet, vec![("charge", Value { kind: Some(Kind::NumberValue(1.0)) })], Some(200), &[]),
            entry(NotSet, vec![("charge", Value { kind: None }), ("x-tollgate-charge", string("h3"))], Some(200), &[]),
            HttpAccessLogEntry::default(),
            HttpAccessLogEntry { common_properties: Some(AccessLogCommon::default()), ..Default::default() },
        ];
        let m = message(entries);
        agree(&m, &names);
        let view = LogMessage::decode(&*m.encode_to_vec()).unwrap();
        let charges: Vec<&str> = view.entries.iter().map(LogEntry::charge).collect();
        assert_eq!(charges, ["c1", "c2", "c3", "h1", "c4"]);
        assert_eq!(view.entries[0].header("x-usage-tokens"), Some("7"));
        assert_eq!(view.entries[2].header("x-usage-tokens"), Some("9"), "another case counts");
        assert_eq!(view.entries[2].code(), 0, "no status sent");
        // Encoded again (the kept entries, as sent), it reads the same.
        let again = view.encode_to_vec();
        assert_eq!(again.len(), view.encoded_len());
        assert_eq!(LogMessage::decode(&*again).unwrap(), view);
        // A TCP message, and no message at all: nothing.
        let tcp = StreamAccessLogsMessage {
            identifier: None,
            log_entries: Some(LogEntries::TcpLogs(TcpAccessLogEntries { log_entry: vec![Default::default()] })),
        };
        agree(&tcp, &names);
        agree(&StreamAccessLogsMessage::default(), &names);
    }

    #[test]
    fn parts_sent_twice_merge_as_in_prost() {
        let charged = |charge: &str, code: u32| {
            entry(AccessLogType::NotSet, vec![("charge", string(charge))], Some(code), &[("x-usage-tokens", "1")])
        };
        let names = ["x-usage-tokens"];
        let bytes = |m: &StreamAccessLogsMessage| m.encode_to_vec();
        let tcp = StreamAccessLogsMessage {
            identifier: None,
            log_entries: Some(LogEntries::TcpLogs(TcpAccessLogEntries { log_entry: vec![] })),
        };
        let (a, b) = (message(vec![charged("a", 200)]), message(vec![charged("b", 500)]));
        // http_logs twice: both lists; tcp_logs after: none; http_logs after tcp_logs: the last.
        for parts in [vec![&a, &b], vec![&a, &tcp], vec![&a, &tcp, &b]] {
            let joined: Vec<u8> = parts.iter().flat_map(|m| bytes(m)).collect();
            agree_on(&joined, &names);
        }
        // One entry in two parts: metadata in one, the log type (periodic: not kept) or the response in the other.
        let periodic = HttpAccessLogEntry {
            common_properties: Some(AccessLogCommon {
                access_log_type: AccessLogType::DownstreamPeriodic as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        let later = HttpAccessLogEntry {
            response: Some(HttpResponseProperties {
                response_code: Some(UInt32Value { value: 404 }),
                response_headers: [("x-usage-tokens".to_owned(), "5".to_owned())].into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        for second in [periodic, later] {
            let one: Vec<u8> = [charged("a", 200).encode_to_vec(), second.encode_to_vec()].concat();
            let mut inner = Vec::new();
            prost::encoding::bytes::encode(1, &one, &mut inner);
            let mut outer = Vec::new();
            prost::encoding::bytes::encode(2, &inner, &mut outer);
            agree_on(&outer, &names);
        }
        // The namespace sent twice: the second replaces the first whole (no charge).
        let two_namespaces: Vec<u8> = [
            charged("a", 200).encode_to_vec(),
            entry(AccessLogType::NotSet, vec![("account", string("x"))], None, &[]).encode_to_vec(),
        ]
        .concat();
        let mut inner = Vec::new();
        prost::encoding::bytes::encode(1, &two_namespaces, &mut inner);
        let mut outer = Vec::new();
        prost::encoding::bytes::encode(2, &inner, &mut outer);
        agree_on(&outer, &names);
        assert!(LogMessage::decode(&*outer).unwrap().entries.is_empty());
    }

    /// Field `tag`, length-delimited, holding `parts` one after another.
    fn ld(tag: u32, parts: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        prost::encoding::bytes::encode(tag, &parts.concat(), &mut out);
        out
    }

    /// A message of one entry whose ext_authz namespace has the `Struct`
    /// bytes `fields` (under `key`, sent as the entry's map keys), and `response`.
    fn one_entry(keys: &[&[u8]], fields: &[u8], response: &[u8]) -> Vec<u8> {
        let keys: Vec<Vec<u8>> = keys.iter().map(|k| ld(1, &[k])).collect();
        let keys: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        let namespace = ld(1, &[&keys.concat(), &ld(2, &[fields])]);
        let common = ld(1, &[&ld(17, &[&namespace])]);
        ld(2, &[&ld(1, &[&common, response])])
    }

    /// A `Struct` map entry `key` whose `Value` is sent as `values`, one after another.
    fn field(keys: &[&[u8]], values: &[&[u8]]) -> Vec<u8> {
        let keys: Vec<Vec<u8>> = keys.iter().map(|k| ld(1, &[k])).collect();
        let keys: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        ld(1, &[&keys.concat(), &ld(2, &[&values.concat()])])
    }

    #[test]
    fn repeats_within_an_entry_read_as_prost_reads_them() {
        let ns = settlement::NAMESPACE.as_bytes();
        let (charge, bool_true) = (ld(3, &[b"c"]), [0x20, 0x01]);
        let kept = |m: &[u8]| {
            agree_on(m, &["x-usage-tokens"]);
            LogMessage::decode(m)
                .unwrap()
                .entries
                .into_iter()
                .map(|e| (e.charge().to_owned(), e.code()))
                .collect::<Vec<_>>()
        };
        // A Value's kind sent twice: the last kind.
        assert_eq!(kept(&one_entry(&[ns], &field(&[b"charge"], &[&charge, &bool_true]), &[])), []);
        assert_eq!(kept(&one_entry(&[ns], &field(&[b"charge"], &[&bool_true, &charge]), &[])), [("c".into(), 0)]);
        // A map entry's key sent twice: the last key, in the namespace map and in the Struct.
        assert_eq!(kept(&one_entry(&[b"envoy.lb", ns], &field(&[b"charge"], &[&charge]), &[])), [("c".into(), 0)]);
        assert_eq!(kept(&one_entry(&[ns, b"envoy.lb"], &field(&[b"charge"], &[&charge]), &[])), []);
        assert_eq!(kept(&one_entry(&[ns], &field(&[b"account", b"charge"], &[&charge]), &[])), [("c".into(), 0)]);
        assert_eq!(kept(&one_entry(&[ns], &field(&[b"charge", b"account"], &[&charge]), &[])), []);
        // The status sent in two parts, the second empty: the first stays.
        let code = |c: u64| {
            let mut value = vec![0x08];
            prost::encoding::encode_varint(c, &mut value);
            ld(4, &[&ld(1, &[&value])])
        };
        let empty = ld(4, &[&ld(1, &[])]);
        let status = one_entry(&[ns], &field(&[b"charge"], &[&charge]), &[code(200), empty].concat());
        assert_eq!(kept(&status), [("c".into(), 200)]);
        let status = one_entry(&[ns], &field(&[b"charge"], &[&charge]), &[code(200), code(201)].concat());
        assert_eq!(kept(&status), [("c".into(), 201)]);
        // A map entry whose key says another wire type (varint, 0x20 for a
        // response header): prost reads it as an entry all the same, so does the view.
        let header = ld(4, &[&ld(4, &[&ld(1, &[b"x-usage-tokens"]), &ld(2, &[b"7"])])]);
        let mut varint_key = header.clone();
        let at = varint_key.iter().rposition(|b| *b == 0x22).unwrap();
        varint_key[at] = 0x20;
        for response in [header, varint_key] {
            let m = one_entry(&[ns], &field(&[b"charge"], &[&charge]), &response);
            assert_eq!(kept(&m).len(), 1);
            assert_eq!(LogMessage::decode(&*m).unwrap().entries[0].header("x-usage-tokens"), Some("7"));
        }
    }

    /// Field `tag` holding `content`, keyed as length-delimited or (as no
    /// encoder writes it, but prost reads a map entry so) as a varint.
    fn keyed(tag: u32, varint: bool, content: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        prost::encoding::encode_key(tag, if varint { WireType::Varint } else { WireType::LengthDelimited }, &mut out);
        prost::encoding::encode_varint(content.len() as u64, &mut out);
        out.extend_from_slice(content);
        out
    }

    /// Every map at every level the view parses itself, keyed as a varint in
    /// turn, reads as prost reads it. Each entry also carries a field prost
    /// skips in an entry but that would change the result were the entry
    /// read as fields of the message around it (another namespace without a
    /// charge, a response code that is not one, another header value).
    #[test]
    fn every_map_is_read_whatever_its_wire_type_says() {
        let ns = settlement::NAMESPACE.as_bytes();
        let kv = |k: &[u8], v: &[u8]| [ld(1, &[k]), ld(2, &[v])].concat();
        let no_charge = ld(1, &[&ld(1, &[ns]), &ld(2, &[&ld(1, &[&kv(b"account", &ld(3, &[b"a"]))])])]);
        for site in 0..8 {
            let varint = |n| site == n;
            let struct_entry = keyed(1, varint(0), &kv(b"charge", &ld(3, &[b"c"])));
            let filter_entry = keyed(1, varint(1), &[ld(1, &[ns]), ld(2, &[&struct_entry])].concat());
            let typed_entry = keyed(2, varint(2), &[kv(b"t", b""), no_charge.clone()].concat());
            let metadata = ld(17, &[&filter_entry, &typed_entry]);
            let state = keyed(21, varint(3), &[kv(b"s", b""), ld(17, &[&no_charge])].concat());
            let tags = keyed(22, varint(4), &[kv(b"k", b"v"), ld(17, &[&no_charge])].concat());
            let common = ld(1, &[&metadata, &state, &tags]);
            let headers = keyed(4, varint(5), &kv(b"x-usage-tokens", b"7"));
            let trailers =
                keyed(5, varint(6), &[kv(b"x-usage-tokens", b"9"), ld(4, &[&kv(b"x-usage-tokens", b"8")])].concat());
            let response = ld(4, &[&headers, &trailers]);
            let m = ld(2, &[&ld(1, &[&common, &response])]);
            agree_on(&m, &["x-usage-tokens"]);
            let view = LogMessage::decode(&*m).unwrap();
            assert_eq!(view.entries.len(), 1, "site {site}");
            assert_eq!((view.entries[0].charge(), view.entries[0].code()), ("c", 0), "site {site}");
            assert_eq!(view.entries[0].header("x-usage-tokens"), Some("7"), "site {site}");
        }
    }

    #[test]
    fn strings_settlement_does_not_read_need_not_be_utf8() {
        let e = entry(AccessLogType::NotSet, vec![("charge", string("c"))], Some(200), &[("x-usage-tokens", "7")]);
        let mut bytes = message(vec![e]).encode_to_vec();
        // The request path, "/v1/search", becomes "/v1/se\xffrch".
        let at = bytes.windows(10).position(|w| w == b"/v1/search").unwrap();
        bytes[at + 6] = 0xff;
        assert!(StreamAccessLogsMessage::decode(&*bytes).is_err(), "prost refused the whole message");
        let view = LogMessage::decode(&*bytes).unwrap();
        assert_eq!((view.entries[0].charge(), view.entries[0].header("x-usage-tokens")), ("c", Some("7")));
        // Read ones that are not: no charge tollgate made, not a number.
        let at = bytes.windows(1).rposition(|w| w == b"7").unwrap();
        bytes[at] = 0xff;
        let at = bytes.windows(3).position(|w| w == [0x1a, 1, b'c']).unwrap() + 2;
        bytes[at] = 0xfe;
        let view = LogMessage::decode(&*bytes).unwrap();
        assert_eq!((view.entries[0].charge(), view.entries[0].header("x-usage-tokens")), (NOT_UTF8, Some(NOT_UTF8)));
        assert_eq!(crate::settlement::parse_cost(NOT_UTF8), None);
    }

    #[test]
    fn a_cut_message_is_refused_as_prost_refuses_it() {
        let e = entry(AccessLogType::NotSet, vec![("charge", string("c"))], Some(200), &[("x-usage-tokens", "7")]);
        let bytes = message(vec![e]).encode_to_vec();
        for cut in 1..bytes.len() {
            let part = &bytes[..cut];
            assert_eq!(LogMessage::decode(part).is_ok(), StreamAccessLogsMessage::decode(part).is_ok(), "cut at {cut}");
        }
    }

    /// The most bytes allocated at once while decoding `message` (the view's own), and the view.
    fn decoded(message: &StreamAccessLogsMessage) -> (u64, usize, LogMessage) {
        // As the server's buffer: slices of it are taken without copying.
        let bytes = Bytes::from(message.encode_to_vec());
        // A first clone shares the buffer (a 24-byte header), as the server's is shared.
        let (len, shared) = (bytes.len(), bytes.clone());
        let mut view = LogMessage::default();
        let info = allocation_counter::measure(|| view = LogMessage::decode(shared).unwrap());
        (info.bytes_max, len, view)
    }

    #[test]
    fn memory_is_at_most_a_few_times_what_is_kept() {
        assert_eq!(std::mem::size_of::<LogEntry>(), 72);
        let size = 256 * 1024;
        // 256 KiB of empty entries (2 bytes each; prost's type took 242 MB): nothing.
        let (peak, len, view) = decoded(&message(vec![HttpAccessLogEntry::default(); size / 2 - 8]));
        assert!(view.entries.is_empty() && len > size - 32);
        assert_eq!(peak, 0, "bytes allocated decoding {len} bytes of empty entries");
        // Entries that are not kept, however large: nothing either.
        let headers: Vec<(String, String)> = (0..1000).map(|i| (format!("h{i}"), String::new())).collect();
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let periodic = entry(AccessLogType::DownstreamPeriodic, vec![("charge", string("c"))], None, &headers);
        let (peak, _, view) = decoded(&message(vec![periodic; 30]));
        assert_eq!((peak, view.entries.len()), (0, 0));
        // The smallest entries that are kept (an empty charge, nothing else):
        // each a 72-byte slot (the list doubling as it grows) and a copy of its
        // ~58 bytes, within 5 times their bytes on the wire (4.2 measured).
        let mut smallest = entry(AccessLogType::NotSet, vec![("charge", string(""))], None, &[]);
        smallest.request = None;
        smallest.response = None;
        if let Some(m) = smallest.common_properties.as_mut().and_then(|c| c.metadata.as_mut()) {
            m.filter_metadata.remove("envoy.lb");
        }
        let wire = smallest.encoded_len() + 2;
        assert!(wire >= 55, "{wire}");
        let (peak, len, view) = decoded(&message(vec![smallest; size / wire]));
        assert_eq!(view.entries.len(), size / wire);
        assert!(peak <= 5 * len as u64, "{peak} bytes at most for a message of {len}");
        // Kept entries with many headers: their bytes, about once.
        let heavy = entry(AccessLogType::NotSet, vec![("charge", string("c"))], None, &headers);
        let (peak, len, view) = decoded(&message(vec![heavy; 30]));
        assert_eq!(view.entries.len(), 30);
        assert_eq!(view.entries[29].header("h999"), Some(""));
        assert!(peak <= 2 * len as u64, "{peak} bytes at most for a message of {len}");
        // Copies: nothing kept points into the received message.
        let bytes = Bytes::from(
            message(vec![entry(AccessLogType::NotSet, vec![("charge", string("c"))], None, &[])]).encode_to_vec(),
        );
        let view = LogMessage::decode(bytes.clone()).unwrap();
        let received = bytes.as_ptr_range();
        for b in [&view.entries[0].raw, &view.entries[0].charge] {
            assert!(!received.contains(&b.as_ptr()), "a slice of the received message");
        }
        assert_eq!(view.entries[0].charge(), "c");
    }

    fn header_name() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("x-usage-tokens".to_owned()),
            Just("X-Usage-Tokens".to_owned()),
            Just("x-cost".to_owned()),
            "[a-zA-Z-]{0,6}",
        ]
    }

    fn kind() -> impl Strategy<Value = Option<Kind>> {
        prop_oneof![
            "[a-z|0-9]{0,12}".prop_map(|s| Some(Kind::StringValue(s))),
            Just(None),
            Just(Some(Kind::BoolValue(true))),
            Just(Some(Kind::StructValue(Struct::default()))),
        ]
    }

    proptest! {
        #[test]
        fn random_entries_settle_the_same(
            entries in prop::collection::vec(
                (
                    prop_oneof![Just(0), Just(6), Just(5), Just(9), 0..16i32],
                    prop::option::of(kind()),
                    prop::option::of(kind()),
                    prop::bool::ANY,
                    prop::option::of(0..600u32),
                    prop::collection::vec((header_name(), "[0-9a-z]{0,4}"), 0..4),
                ),
                0..6,
            ),
        ) {
            let entries = entries
                .into_iter()
                .map(|(kind, charge, http, in_ns, code, headers)| {
                    let mut fields = Vec::new();
                    if let Some(k) = charge {
                        fields.push(("charge", Value { kind: k }));
                    }
                    if let Some(k) = http {
                        fields.push(("x-tollgate-charge", Value { kind: k }));
                    }
                    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                    let mut e = entry(AccessLogType::NotSet, fields, code, &headers);
                    if let Some(c) = e.common_properties.as_mut() {
                        c.access_log_type = kind;
                        if !in_ns && let Some(m) = c.metadata.as_mut() {
                            m.filter_metadata.remove(settlement::NAMESPACE);
                        }
                    }
                    e
                })
                .collect();
            agree(&message(entries), &["x-usage-tokens", "x-cost", "X-COST", ""]);
        }
    }
}
