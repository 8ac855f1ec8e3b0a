//! Envoy's side of settlement, for tests: the charge an allowed Check
//! carries, access-log entries as Envoy sends them, and one stream of them.

use std::net::SocketAddr;

use envoy_types::pb::envoy::config::core::v3::Metadata;
use envoy_types::pb::envoy::data::accesslog::v3::{AccessLogCommon, HttpAccessLogEntry, HttpResponseProperties};
use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_client::AccessLogServiceClient;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::{HttpAccessLogEntries, LogEntries};
use envoy_types::pb::envoy::service::auth::v3::CheckResponse;
use envoy_types::pb::google::protobuf::{Struct, UInt32Value, Value, value::Kind};

/// The `charge` string of a Check's dynamic metadata (panics when there is none).
pub fn charge_of(resp: &CheckResponse) -> String {
    let meta = resp.dynamic_metadata.as_ref().expect("dynamic metadata");
    match meta.fields.get("charge").and_then(|v| v.kind.as_ref()) {
        Some(Kind::StringValue(s)) => s.clone(),
        other => panic!("no charge string in the metadata: {other:?}"),
    }
}

/// An access-log entry as Envoy sends it: the status, the charge in the
/// ext_authz metadata, and the response headers it was told to log.
pub fn entry(code: u32, charge: &str, headers: &[(&str, &str)]) -> HttpAccessLogEntry {
    let charge = Value { kind: Some(Kind::StringValue(charge.to_owned())) };
    let ns = Struct { fields: [("charge".to_owned(), charge)].into() };
    HttpAccessLogEntry {
        common_properties: Some(AccessLogCommon {
            metadata: Some(Metadata {
                filter_metadata: [("envoy.filters.http.ext_authz".to_owned(), ns)].into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        response: Some(HttpResponseProperties {
            response_code: Some(UInt32Value { value: code }),
            response_headers: headers.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Sends `entries` on one access-log stream to `grpc` in one message, as
/// Envoy would, and waits for the stream's end (when tollgate settled them).
pub async fn stream(grpc: SocketAddr, entries: Vec<HttpAccessLogEntry>) {
    let msg = StreamAccessLogsMessage {
        identifier: None,
        log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries { log_entry: entries })),
    };
    let mut client = AccessLogServiceClient::new(crate::server::channel(grpc).await);
    client.stream_access_logs(tokio_stream::iter([msg])).await.expect("the stream is accepted");
}
