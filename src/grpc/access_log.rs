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
//! May use: `settler`, `log_message` (the messages as settlement reads them).

use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsResponse;
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_server::SERVICE_NAME;
use tokio::sync::{Semaphore, watch};
use tonic::body::Body;
use tonic::codegen::{Body as HttpBody, StdError, http};
use tonic::server::{ClientStreamingService, Grpc};
use tonic::{Request, Response, Status, Streaming};

use super::log_message::{LogEntry, LogMessage};
use super::view_server::{Method, Server};
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

/// Settles one message's entries (all final and charged: [`LogMessage`]).
async fn settle_all(settler: &Settler, entries: &[LogEntry]) {
    let entries: Vec<Entry<'_>> =
        entries.iter().map(|e| Entry { charge: e.charge(), code: e.code(), headers: e }).collect();
    settler.settle_all(&entries).await;
}

impl AccessLog {
    /// `StreamAccessLogs`: settles each message read, until the stream ends.
    async fn stream(
        &self,
        request: Request<Streaming<LogMessage>>,
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
            if message.entries.is_empty() {
                continue;
            }
            let settler = self.settler.clone();
            tokio::spawn(async move {
                settle_all(&settler, &message.entries).await;
                drop(slot);
            });
        };
        // Whatever was read is settled before the stream ends.
        let _ = slots.acquire_many(MESSAGES).await;
        ended.map(|()| Response::new(StreamAccessLogsResponse {}))
    }
}

/// Envoy's `AccessLogService` (what tonic generates as
/// `AccessLogServiceServer`), reading each message as a [`LogMessage`]:
/// prost's own type took ~900 times a message's size in memory.
pub type AccessLogServer = Server<AccessLog>;

impl Method for AccessLog {
    const SERVICE: &'static str = SERVICE_NAME;
    const PATH: &'static str = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs";
    type Codec = tonic_prost::ProstCodec<StreamAccessLogsResponse, LogMessage>;

    async fn serve<B>(self, grpc: &mut Grpc<Self::Codec>, req: http::Request<B>) -> http::Response<Body>
    where
        B: HttpBody + Send + 'static,
        B::Error: Into<StdError> + Send + 'static,
    {
        grpc.client_streaming(self, req).await
    }
}

impl ClientStreamingService<LogMessage> for AccessLog {
    type Response = StreamAccessLogsResponse;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Response<StreamAccessLogsResponse>, Status>> + Send>>;

    fn call(&mut self, request: Request<Streaming<LogMessage>>) -> Self::Future {
        let log = self.clone();
        Box::pin(async move { log.stream(request).await })
    }
}

#[cfg(test)]
mod tests {
    use tonic::server::NamedService;

    use super::*;

    #[test]
    fn the_path_is_the_generated_service_s() {
        assert_eq!(AccessLog::PATH, format!("/{}/StreamAccessLogs", AccessLogServer::NAME));
    }
}
