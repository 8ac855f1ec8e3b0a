//! The two messages tollgate decodes from the wire as views of their bytes
//! instead of prost's types: Envoy's `CheckRequest` (`CheckRequestView`)
//! and access-log message (`LogMessage`). Any bytes are decoded both ways.
//!
//! Invariants (a panic is a counterexample):
//! - neither view panics, on decoding or on any read (`check`, `header`,
//!   `header_names`, `metadata`, an entry's `charge` and `header`);
//! - bytes prost decodes, the views decode too, and read the same:
//!   - a Check: method, path, host, every header's value (the last one sent,
//!     as prost's map keeps it) and the metadata, unless `check` refuses it;
//!   - an access-log message: the same entries kept (final, with a charge),
//!     the same charges and statuses, the same cost headers by exact name.

#![no_main]

use envoy_types::ext_authz::v3::pb::CheckRequest;
use envoy_types::pb::envoy::data::accesslog::v3::{AccessLogType, HttpAccessLogEntry};
use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::LogEntries;
use envoy_types::pb::google::protobuf::value::Kind;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use prost::bytes::Bytes;
use tollgate::grpc::check_request::{CheckRequestView, text};
use tollgate::grpc::log_message::LogMessage;
use tollgate::settler::LoggedHeaders;

/// Header names the access-log side is asked for.
const NAMES: [&str; 3] = ["x-usage-tokens", "X-Usage-Tokens", ""];

fn check(data: &Bytes) {
    let view = CheckRequestView::decode(data.clone());
    let full = CheckRequest::decode(data.clone());
    if let Ok(view) = &view {
        let readable = view.check().is_ok();
        if let Some(http) = view.http() {
            let _ = http.header_names().count();
            let _ = http.header("x-api-key");
        }
        let _ = view.attributes.as_ref().and_then(|a| a.metadata());
        let (Ok(full), true) = (&full, readable) else { return };
        let (f, v) = (full.attributes.as_ref(), view.attributes.as_ref());
        assert_eq!(f.is_some(), v.is_some(), "attributes");
        let peers = |s: bool, d: bool| (s, d);
        assert_eq!(
            f.map(|a| peers(a.source.is_some(), a.destination.is_some())),
            v.map(|a| peers(a.source.is_some(), a.destination.is_some())),
            "source, destination"
        );
        assert_eq!(f.and_then(|a| a.metadata_context.clone()), v.and_then(|a| a.metadata()), "metadata");
        let fh = f.and_then(|a| a.request.as_ref()).and_then(|r| r.http.as_ref());
        assert_eq!(fh.is_some(), view.http().is_some(), "http");
        let (Some(fh), Some(vh)) = (fh, view.http()) else { return };
        assert_eq!((fh.method.as_str(), fh.path.as_str(), fh.host.as_str()), (text(&vh.method), text(&vh.path), text(&vh.host)));
        for (k, value) in &fh.headers {
            assert_eq!(vh.header(k), Some(value.as_str()), "header {k:?}");
        }
        let mut names: Vec<&str> = vh.headers.iter().map(|h| text(&h.key)).collect();
        names.sort_unstable();
        names.dedup();
        let mut keys: Vec<&str> = fh.headers.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(names, keys, "header names");
        let raw = fh.header_map.as_ref().map(|m| m.headers.iter().map(|h| (h.key.as_str(), h.value.as_str(), &h.raw_value[..])).collect::<Vec<_>>());
        let vraw = vh.header_map.as_ref().map(|m| m.headers.iter().map(|h| (text(&h.key), text(&h.value), &h.raw_value[..])).collect::<Vec<_>>());
        assert_eq!(raw, vraw, "header_map");
    } else {
        assert!(full.is_err(), "prost decodes a Check the view does not: {view:?}");
    }
}

/// What settlement read of a prost entry before the view.
fn settled(entry: &HttpAccessLogEntry) -> Option<(&str, u32, &HttpAccessLogEntry)> {
    let common = entry.common_properties.as_ref()?;
    if ![AccessLogType::NotSet as i32, AccessLogType::DownstreamEnd as i32].contains(&common.access_log_type) {
        return None;
    }
    let fields = &common.metadata.as_ref()?.filter_metadata.get("envoy.filters.http.ext_authz")?.fields;
    let charge = fields.get("charge").or_else(|| fields.get("x-tollgate-charge"))?;
    let Some(Kind::StringValue(charge)) = &charge.kind else { return None };
    Some((charge, entry.response.as_ref().and_then(|r| r.response_code).map_or(0, |c| c.value), entry))
}

fn access_log(data: &Bytes) {
    let view = LogMessage::decode(data.clone());
    let full = StreamAccessLogsMessage::decode(data.clone());
    let Ok(view) = view else {
        assert!(full.is_err(), "prost decodes an access-log message the view does not");
        return;
    };
    for e in &view.entries {
        let _ = (e.charge(), e.code());
        for name in NAMES {
            let _ = e.header(name);
        }
    }
    let Ok(full) = full else { return };
    let want: Vec<_> = match &full.log_entries {
        Some(LogEntries::HttpLogs(h)) => h.log_entry.iter().filter_map(settled).collect(),
        _ => Vec::new(),
    };
    assert_eq!(view.entries.len(), want.len(), "entries kept");
    for (v, (charge, code, entry)) in view.entries.iter().zip(want) {
        assert_eq!((v.charge(), v.code()), (charge, code));
        let headers = entry.response.as_ref().map(|r| &r.response_headers);
        let logged: Vec<&str> = headers.iter().flat_map(|h| h.keys().map(String::as_str)).collect();
        for name in NAMES.into_iter().chain(logged) {
            if let Some(value) = headers.and_then(|h| h.get(name)) {
                assert_eq!(v.header(name), Some(value.as_str()), "header {name:?}");
            } else if headers.is_none_or(|h| !h.keys().any(|k| k.eq_ignore_ascii_case(name))) {
                assert_eq!(v.header(name), None, "header {name:?}");
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let data = Bytes::copy_from_slice(data);
    check(&data);
    access_log(&data);
});
