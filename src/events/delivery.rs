//! Delivers the outbox to the sink (`events.sink`): claim a batch, POST it
//! as `application/cloudevents-batch+json`, acknowledge it on a 2xx.
//!
//! At least once: a batch is acknowledged only after the sink answered 2xx,
//! so a failed or timed-out POST is sent again (the same events, the same
//! ids), after a pause that doubles from 1 s to 30 s while the sink keeps
//! failing. Events this replica claimed and had not delivered when it died
//! are taken over by another replica after `events.reclaim_after` (Redis);
//! the memory store's queue dies with the process. Every replica runs one
//! loop; the config is read afresh each round (a reload changes the sink).
//!
//! May use: `events`, `authorizer` (live config, store, metrics), `outbound` (the HTTP client).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use tokio::sync::watch;

use crate::authorizer::Authorizer;
use crate::config::SinkConfig;
use crate::usage::OutboxEvent;

/// The pause after an empty claim.
const IDLE: Duration = Duration::from_millis(200);
/// The first and the longest pause after a failed POST.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

use crate::outbound::{HttpsClient, https_client as client};

/// Why a POST failed.
#[derive(Debug, thiserror::Error)]
enum PostError {
    #[error("sink answered {0}")]
    Status(u16),
    #[error("sink unreachable: {0}")]
    Send(String),
    #[error("sink did not answer within {0:?}")]
    Timeout(Duration),
    #[error("bad request: {0}")]
    Build(String),
}

impl PostError {
    /// A refusal retrying cannot change: a 4xx other than 408 (timeout) and 429 (slow down).
    fn is_permanent(&self) -> bool {
        matches!(self, PostError::Status(s) if (400..500).contains(s) && *s != 408 && *s != 429)
    }
}

/// Posts `events` one per batch; those refused for good are logged and
/// counted (they leave the outbox with the rest). Fails on the first error
/// that is not permanent. Answers how many were refused.
async fn post_each(client: &HttpsClient, sink: &SinkConfig, events: &[OutboxEvent]) -> Result<u64, PostError> {
    let mut refused = 0;
    for e in events {
        match post(client, sink, super::batch([e.payload.as_str()])).await {
            Ok(()) => {}
            Err(err) if err.is_permanent() => {
                let head: String = e.payload.chars().take(200).collect();
                tracing::error!(error = %err, event = %head, "the sink refuses this event for good; dropped");
                refused += 1;
            }
            Err(err) => return Err(err),
        }
    }
    Ok(refused)
}

async fn post(client: &HttpsClient, sink: &SinkConfig, body: String) -> Result<(), PostError> {
    let mut req = hyper::Request::post(&sink.url).header("content-type", super::BATCH_CONTENT_TYPE);
    if let Some(token) = &sink.token {
        req = req.header("authorization", format!("Bearer {}", token.0));
    }
    if let Some(secret) = &sink.signing_secret {
        req = req.header("tollgate-signature", super::signature(&secret.0, Utc::now().timestamp(), &body));
    }
    let req = req.body(Full::new(Bytes::from(body))).map_err(|e| PostError::Build(e.to_string()))?;
    let answer = async {
        let resp = client.request(req).await.map_err(|e| PostError::Send(e.to_string()))?;
        let status = resp.status().as_u16();
        // Drain (bounded by the timeout) so the connection is reused.
        let _ = resp.into_body().collect().await;
        if (200..300).contains(&status) { Ok(()) } else { Err(PostError::Status(status)) }
    };
    tokio::time::timeout(sink.timeout, answer).await.map_err(|_| PostError::Timeout(sink.timeout))?
}

/// Runs the delivery loop until `stopping` turns true.
pub async fn run(authorizer: Arc<Authorizer>, mut stopping: watch::Receiver<bool>) {
    let Some(client) = client() else { return };
    let consumer = authorizer.replica_id();
    let mut backoff = FIRST_BACKOFF;
    let pause = async |stopping: &mut watch::Receiver<bool>, d: Duration| {
        tokio::select! {
            _ = tokio::time::sleep(d) => false,
            _ = stopping.wait_for(|s| *s) => true,
        }
    };
    loop {
        if *stopping.borrow() {
            return;
        }
        let config = authorizer.config();
        let Some(sink) = &config.events.sink else {
            if pause(&mut stopping, Duration::from_secs(1)).await {
                return;
            }
            continue;
        };
        let metrics = authorizer.metrics();
        let store = authorizer.store();
        // A claim visits many accounts: the sink's timeout, not a Check's, bounds it.
        let claim = store.outbox_claim(&consumer, sink.batch, config.events.reclaim_after);
        let events: Vec<OutboxEvent> = match authorizer.call(sink.timeout, claim).await {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the outbox");
                if pause(&mut stopping, backoff).await {
                    return;
                }
                continue;
            }
        };
        if events.is_empty() {
            if pause(&mut stopping, IDLE).await {
                return;
            }
            continue;
        }
        let body = super::batch(events.iter().map(|e| e.payload.as_str()));
        let mut result = post(&client, sink, body).await.map(|()| 0);
        if result.as_ref().is_err_and(PostError::is_permanent) {
            // The sink refuses the batch for what it holds: send the events one
            // by one, and set aside (acknowledge, count as dropped) each one it
            // refuses for good, so one bad event does not hold up the outbox.
            result = post_each(&client, sink, &events).await;
        }
        match result {
            Ok(refused) => {
                metrics.record_events("dropped", refused);
                backoff = FIRST_BACKOFF;
                let now = Utc::now();
                for e in &events {
                    if let Some(t) = super::time_of(&e.payload) {
                        metrics.record_event_lag((now - t).to_std().unwrap_or_default());
                    }
                }
                metrics.record_events("delivered", events.len() as u64 - refused);
                if let Err(e) = authorizer.call(sink.timeout, store.outbox_ack(&events)).await {
                    // Delivered but still in the outbox: they will be sent again (same ids).
                    tracing::warn!(error = %e, "cannot acknowledge delivered events");
                }
            }
            Err(e) => {
                metrics.record_events("retried", events.len() as u64);
                tracing::warn!(error = %e, events = events.len(), retry_in = ?backoff, "event delivery failed");
                if pause(&mut stopping, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
