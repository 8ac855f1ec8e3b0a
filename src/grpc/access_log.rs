//! `envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs`: Envoy's
//! access log, one entry per finished request, for settling charges.
//!
//! Entries without a charge in their ext_authz metadata (public routes,
//! denials, routes nothing can change) and entries other than the one
//! written when a request is done are skipped; the rest go to the [`Settler`], a bounded number at
//! a time per stream. Envoy expects no answer until the stream ends.
//!
//! May use: `settler`, `settlement` (the metadata names).

use std::sync::Arc;

use envoy_types::pb::envoy::data::accesslog::v3::{AccessLogType, HttpAccessLogEntry};
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_server::AccessLogService;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::LogEntries;
use envoy_types::pb::envoy::service::accesslog::v3::{StreamAccessLogsMessage, StreamAccessLogsResponse};
use envoy_types::pb::google::protobuf::value::Kind;
use futures_util::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::settlement;
use crate::settler::Settler;

/// Entries of one stream settled at once.
const IN_FLIGHT: usize = 32;

/// The access-log service.
#[derive(Debug, Clone)]
pub struct AccessLog {
    settler: Arc<Settler>,
}

impl AccessLog {
    /// A service handing entries to `settler`.
    pub fn new(settler: Arc<Settler>) -> Self {
        Self { settler }
    }

    async fn entry(&self, entry: &HttpAccessLogEntry) {
        let Some(common) = &entry.common_properties else { return };
        // Only the entry written when the request is done: not the periodic
        // ones of long streams, nor a router's per-attempt upstream entries.
        let final_entry = [AccessLogType::NotSet as i32, AccessLogType::DownstreamEnd as i32];
        if !final_entry.contains(&common.access_log_type) {
            return;
        }
        let charge = common
            .metadata
            .as_ref()
            .and_then(|m| m.filter_metadata.get(settlement::NAMESPACE))
            .and_then(|s| s.fields.get(settlement::FIELD))
            .and_then(|v| match &v.kind {
                Some(Kind::StructValue(s)) => Some(s),
                _ => None,
            });
        let Some(charge) = charge else { return };
        let field = |name: &str| match charge.fields.get(name).and_then(|v| v.kind.as_ref()) {
            Some(Kind::StringValue(s)) => Some(s.as_str()),
            _ => None,
        };
        let response = entry.response.as_ref();
        let code = response.and_then(|r| r.response_code).map_or(0, |c| c.value);
        let header = |name: &str| {
            let headers = &response?.response_headers;
            headers
                .get(name)
                .or_else(|| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v))
                .map(String::as_str)
        };
        self.settler.settle(field, code, header).await;
    }
}

#[tonic::async_trait]
impl AccessLogService for AccessLog {
    async fn stream_access_logs(
        &self,
        request: Request<Streaming<StreamAccessLogsMessage>>,
    ) -> Result<Response<StreamAccessLogsResponse>, Status> {
        let mut stream = request.into_inner();
        while let Some(message) = stream.message().await? {
            let Some(LogEntries::HttpLogs(http)) = message.log_entries else { continue };
            futures_util::stream::iter(&http.log_entry).for_each_concurrent(IN_FLIGHT, |e| self.entry(e)).await;
        }
        Ok(Response::new(StreamAccessLogsResponse {}))
    }
}
