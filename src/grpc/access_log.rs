//! `envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs`: Envoy's
//! access log, one entry per finished request, for settling charges.
//!
//! Entries without a charge in their ext_authz metadata (public routes,
//! denials, routes nothing can change) and entries other than the one
//! written when a request is done are skipped; the rest go to the [`Settler`].
//! Envoy expects no answer until the stream ends, and resends nothing: each
//! message read is settled in a task of its own (at most [`MESSAGES`] per
//! stream at once, the next read waiting for a slot), so that an entry read is
//! settled even if the stream is cut meanwhile. When shutdown begins the
//! stream ends (Envoy opens a new one to another replica); entries Envoy sent
//! and tollgate had not read by then are lost, and their reservations stand.
//! A stream idle for a minute is ended too, so idle streams (a proxy with no
//! traffic, or a caller holding streams open) give their slots back.
//!
//! May use: `settler`, `settlement` (the metadata names).

use std::sync::Arc;

use envoy_types::pb::envoy::data::accesslog::v3::{AccessLogType, HttpAccessLogEntry};
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_server::AccessLogService;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::LogEntries;
use envoy_types::pb::envoy::service::accesslog::v3::{StreamAccessLogsMessage, StreamAccessLogsResponse};
use envoy_types::pb::google::protobuf::value::Kind;
use tokio::sync::{Semaphore, watch};
use tonic::{Request, Response, Status, Streaming};

use crate::settlement;
use crate::settler::{Entry, Settler};

/// A stream with no message for this long is ended (with OK).
const IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// Messages of one stream being settled at once.
const MESSAGES: u32 = 4;

/// The access-log service.
#[derive(Debug, Clone)]
pub struct AccessLog {
    settler: Arc<Settler>,
    stopping: watch::Receiver<bool>,
}

impl AccessLog {
    /// A service handing entries to `settler`, ending its streams when `stopping` turns true.
    pub fn new(settler: Arc<Settler>, stopping: watch::Receiver<bool>) -> Self {
        Self { settler, stopping }
    }
}

/// Settles one message's entries: those that carry a charge and are final.
async fn settle_all(settler: &Settler, entries: &[HttpAccessLogEntry]) {
    let entries: Vec<Entry<'_>> = entries.iter().filter_map(entry).collect();
    if !entries.is_empty() {
        settler.settle_all(&entries).await;
    }
}

/// What settlement needs of an entry, if it carries a charge and is the one
/// written when its request was done (not the periodic ones of long streams,
/// nor a router's per-attempt upstream entries).
fn entry(entry: &HttpAccessLogEntry) -> Option<Entry<'_>> {
    let common = entry.common_properties.as_ref()?;
    let final_entry = [AccessLogType::NotSet as i32, AccessLogType::DownstreamEnd as i32];
    if !final_entry.contains(&common.access_log_type) {
        return None;
    }
    let fields = &common.metadata.as_ref()?.filter_metadata.get(settlement::NAMESPACE)?.fields;
    // From a gRPC Check's metadata, or from the HTTP door's header.
    let charge = fields.get(settlement::FIELD).or_else(|| fields.get(settlement::HTTP_HEADER))?;
    let Some(Kind::StringValue(charge)) = &charge.kind else { return None };
    let response = entry.response.as_ref();
    Some(Entry {
        charge,
        code: response.and_then(|r| r.response_code).map_or(0, |c| c.value),
        headers: response.map(|r| &r.response_headers),
    })
}

#[tonic::async_trait]
impl AccessLogService for AccessLog {
    async fn stream_access_logs(
        &self,
        request: Request<Streaming<StreamAccessLogsMessage>>,
    ) -> Result<Response<StreamAccessLogsResponse>, Status> {
        let mut stream = request.into_inner();
        let mut stopping = self.stopping.clone();
        let slots = Arc::new(Semaphore::new(MESSAGES as usize));
        let ended = loop {
            let Ok(slot) = slots.clone().acquire_owned().await else { break Ok(()) };
            let message = tokio::select! {
                m = stream.message() => m,
                _ = stopping.wait_for(|s| *s) => break Ok(()),
                // An idle stream gives its slot back (Envoy opens a new one on its next flush).
                _ = tokio::time::sleep(IDLE) => break Ok(()),
            };
            let message = match message {
                Ok(Some(m)) => m,
                Ok(None) => break Ok(()),
                Err(status) => break Err(status),
            };
            let Some(LogEntries::HttpLogs(http)) = message.log_entries else { continue };
            let settler = self.settler.clone();
            tokio::spawn(async move {
                settle_all(&settler, &http.log_entry).await;
                drop(slot);
            });
        };
        // Whatever was read is settled before the stream ends.
        let _ = slots.acquire_many(MESSAGES).await;
        ended.map(|()| Response::new(StreamAccessLogsResponse {}))
    }
}
