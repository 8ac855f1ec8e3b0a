//! OpenTelemetry traces: a span per Check and per `tollgate.v1` call, child
//! of the W3C trace context the caller sent (Envoy's `traceparent` gRPC
//! metadata), exported over OTLP/gRPC off the request path.
//!
//! Off unless `tracing.otlp_endpoint` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` /
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set (and `OTEL_SDK_DISABLED` is not
//! `true`); then [`enabled`] turns true and the transports open spans. Ended
//! spans go into a bounded queue ([`Queue`]); a thread of its own batches and
//! exports them. A full queue drops the span and counts it: a slow or dead
//! collector never holds up a Check. While a request runs, [`Stats`] gather
//! its store time and cache hits for the span's attributes.
//!
//! May use: `config` (the tracing settings).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter, SpanProcessor};

use crate::config::TracingConfig;

static ENABLED: AtomicBool = AtomicBool::new(false);
/// `tracing.sample_ratio` as f64 bits; NaN when unset (the SDK's sampler decides alone).
static RATIO: AtomicU64 = AtomicU64::new(0x7ff8_0000_0000_0000);
static EXPORTED: AtomicU64 = AtomicU64::new(0);
static DROPPED: AtomicU64 = AtomicU64::new(0);
static FAILED: AtomicU64 = AtomicU64::new(0);

/// Whether spans are exported: the transports open none otherwise (a span
/// nobody exports would only cost).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Spans since start: exported, dropped (the queue was full), and lost to
/// failed exports; for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Spans the collector took.
    pub exported: u64,
    /// Spans dropped because the queue was full.
    pub dropped: u64,
    /// Spans in batches the collector did not take (down, slow, refused).
    pub failed: u64,
}

/// The totals so far.
pub fn totals() -> Totals {
    Totals {
        exported: EXPORTED.load(Ordering::Relaxed),
        dropped: DROPPED.load(Ordering::Relaxed),
        failed: FAILED.load(Ordering::Relaxed),
    }
}

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built (a bad endpoint).
    #[error("OTLP exporter: {0}")]
    Exporter(String),
    /// The export thread could not be started.
    #[error("span export thread: {0}")]
    Thread(#[from] std::io::Error),
    /// The export thread ended before it built the exporter.
    #[error("span export thread ended at start")]
    ThreadGone,
}

/// The OTLP endpoint in force: the config's, else the standard variables'.
pub fn endpoint(config: &TracingConfig) -> Option<String> {
    if std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true")) {
        return None;
    }
    config.otlp_endpoint.clone().or_else(|| {
        ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"]
            .into_iter()
            .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
    })
}

/// Starts exporting to the configured endpoint (`None` when tracing is off):
/// the provider whose tracer the `tracing-opentelemetry` layer uses. Drop or
/// [`SdkTracerProvider::shutdown`] it on exit to flush what is queued.
pub fn start(config: &TracingConfig) -> Result<Option<SdkTracerProvider>, TelemetryError> {
    let Some(endpoint) = endpoint(config) else { return Ok(None) };
    let timeout = config.export_timeout;
    // Built on the export thread's runtime: the exporter's connection, its
    // HTTP/2 work and reconnects run there, never on the Checks' workers.
    let exporter = move || {
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(timeout)
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))
    };
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| config.service_name.clone());
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service).build();
    let mut builder = SdkTracerProvider::builder()
        .with_span_processor(Queue::start(exporter, config.queue_size, config.export_timeout)?)
        .with_resource(resource);
    if config.sample_ratio.is_some() {
        // `request_span` draws roots at the ratio before a span exists (so an
        // unsampled Check costs nothing); what reaches the SDK is sampled, or
        // follows its parent's flag.
        builder = builder.with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)));
    }
    RATIO.store(config.sample_ratio.unwrap_or(f64::NAN).to_bits(), Ordering::Relaxed);
    let provider = builder.build();
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    ENABLED.store(true, Ordering::Relaxed);
    Ok(Some(provider))
}

/// The tracer spans are exported with.
pub fn tracer(provider: &SdkTracerProvider) -> opentelemetry_sdk::trace::Tracer {
    provider.tracer("tollgate")
}

/// The W3C trace context a caller sent (`traceparent`, `tracestate` in the
/// gRPC metadata, i.e. the HTTP/2 headers), as the parent of the span about
/// to open; an absent or malformed one gives a root.
pub fn parent_from(headers: &tonic::codegen::http::HeaderMap) -> opentelemetry::Context {
    struct Extractor<'a>(&'a tonic::codegen::http::HeaderMap);
    impl opentelemetry::propagation::Extractor for Extractor<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            // Only the two W3C headers: nothing else of the caller's is read.
            match key {
                "traceparent" | "tracestate" => self.0.get(key).and_then(|v| v.to_str().ok()),
                _ => None,
            }
        }
        fn keys(&self) -> Vec<&str> {
            vec!["traceparent", "tracestate"]
        }
    }
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&Extractor(headers)))
}

/// The span of one call (`name`: its gRPC method, `tollgate.v1.Tollgate/GetUsage`),
/// child of `parent`; a disabled span when tracing is off. Its attributes are
/// filled in by [`record_decision`] and [`record_stats`].
pub fn request_span(name: &'static str, parent: opentelemetry::Context) -> tracing::Span {
    if !enabled() || !sampled(&parent) {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        target: "tollgate::trace",
        "request",
        otel.name = name,
        rpc.system = "grpc",
        otel.kind = "server",
        trace_id = tracing::field::Empty,
        tollgate.route = tracing::field::Empty,
        tollgate.decision = tracing::field::Empty,
        tollgate.status = tracing::field::Empty,
        tollgate.account = tracing::field::Empty,
        tollgate.plan = tracing::field::Empty,
        tollgate.store_ms = tracing::field::Empty,
        tollgate.store_calls = tracing::field::Empty,
        tollgate.cache_hits = tracing::field::Empty,
        tollgate.cache_misses = tracing::field::Empty,
    );
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let _ = span.set_parent(parent);
    {
        use opentelemetry::trace::TraceContextExt;
        let cx = span.context();
        let id = cx.span().span_context().trace_id();
        // Log lines inside the span carry the trace id.
        span.record("trace_id", tracing::field::display(id));
    }
    span
}

/// The sampler's answer, made before a span costs anything: a parent's
/// sampled flag, else (a root) `tracing.sample_ratio` drawn at random, which
/// for a random trace id is what the SDK's ratio sampler would decide. An
/// unsampled request then opens no span at all (at 1 %, 99 in 100 Checks
/// pay only this).
fn sampled(parent: &opentelemetry::Context) -> bool {
    use opentelemetry::trace::TraceContextExt;
    let span = parent.span();
    let sc = span.span_context();
    if sc.is_valid() {
        return sc.is_sampled();
    }
    let ratio = f64::from_bits(RATIO.load(Ordering::Relaxed));
    if ratio.is_nan() {
        return true;
    }
    ratio >= 1.0 || unit_random() < ratio
}

/// A uniform number in [0, 1) from a per-thread xorshift seeded from the OS.
fn unit_random() -> f64 {
    thread_local! {
        static STATE: std::cell::Cell<u64> = std::cell::Cell::new(getrandom::u64().unwrap_or(0x9e37_79b9_7f4a_7c15) | 1);
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x >> 11) as f64 / (1u64 << 53) as f64
    })
}

/// What one request did, for its span: filled in by the store calls and
/// cache lookups made while it runs (see [`scope`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Store calls made (each timed by the authorizer).
    pub store_calls: u32,
    /// Their total time, in microseconds.
    pub store_us: u64,
    /// Entitlement and key lookups answered by the cache.
    pub cache_hits: u32,
    /// Lookups that went to the store.
    pub cache_misses: u32,
}

tokio::task_local! {
    static STATS: std::cell::Cell<Stats>;
}

/// Runs `fut` gathering its [`Stats`] (only when tracing is on; otherwise
/// the stats are all zero and nothing is gathered).
pub async fn scope<T>(fut: impl Future<Output = T>) -> (T, Stats) {
    if !enabled() {
        return (fut.await, Stats::default());
    }
    STATS
        .scope(std::cell::Cell::new(Stats::default()), async move {
            let out = fut.await;
            (out, STATS.with(std::cell::Cell::get))
        })
        .await
}

fn note(f: impl FnOnce(&mut Stats)) {
    let _ = STATS.try_with(|cell| {
        let mut s = cell.get();
        f(&mut s);
        cell.set(s);
    });
}

/// Notes a store call of the request in scope (a no-op outside one).
pub fn note_store_call(elapsed: Duration) {
    note(|s| {
        s.store_calls = s.store_calls.saturating_add(1);
        s.store_us = s.store_us.saturating_add(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
    });
}

/// Notes a cache lookup of the request in scope (a no-op outside one).
pub fn note_cache(hit: bool) {
    note(|s| {
        if hit {
            s.cache_hits = s.cache_hits.saturating_add(1);
        } else {
            s.cache_misses = s.cache_misses.saturating_add(1);
        }
    });
}

/// What a decided request puts on its span: never a credential, only ids.
#[derive(Debug, Clone, Copy)]
pub struct Recorded<'a> {
    /// The matched route's name.
    pub route: Option<&'a str>,
    /// The decision code or allow label.
    pub decision: &'a str,
    /// The HTTP status the client gets.
    pub status: u16,
    /// The account id, once known.
    pub account: Option<&'a str>,
    /// The plan, once known.
    pub plan: Option<&'a str>,
}

/// Puts a decision on the current request span (a no-op without one).
pub fn record_decision(r: Recorded<'_>) {
    if !enabled() {
        return;
    }
    let span = tracing::Span::current();
    if span.is_none() {
        return;
    }
    span.record("tollgate.route", r.route.unwrap_or("-"));
    span.record("tollgate.decision", r.decision);
    span.record("tollgate.status", r.status);
    if let Some(a) = r.account {
        span.record("tollgate.account", a);
    }
    if let Some(p) = r.plan {
        span.record("tollgate.plan", p);
    }
}

/// Puts what a call did on its span.
pub fn record_stats(span: &tracing::Span, stats: Stats) {
    if span.is_none() {
        return;
    }
    span.record("tollgate.store_calls", stats.store_calls);
    span.record("tollgate.store_ms", stats.store_us as f64 / 1000.0);
    span.record("tollgate.cache_hits", stats.cache_hits);
    span.record("tollgate.cache_misses", stats.cache_misses);
}

/// A bounded queue between ended spans and the exporter: `on_end` never
/// blocks (a full queue drops and counts), and one thread batches (up to 512
/// spans or 1 s) and exports under the export timeout.
#[derive(Debug)]
pub struct Queue {
    tx: SyncSender<Msg>,
}

enum Msg {
    Span(Box<SpanData>),
    Flush(SyncSender<()>),
    /// The provider's resource (`service.name`), for the exporter to send.
    Resource(Box<opentelemetry_sdk::Resource>),
}

const BATCH: usize = 512;

impl Queue {
    /// Starts the export thread with room for `size` spans; the thread
    /// builds its exporter with `build` on a runtime of its own, and this
    /// returns once it has (or with why it could not).
    pub fn start<E, B>(build: B, size: usize, timeout: Duration) -> Result<Self, TelemetryError>
    where
        E: SpanExporter + 'static,
        B: FnOnce() -> Result<E, TelemetryError> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(size.max(1));
        let (built_tx, built_rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new().name("tollgate-spans".into()).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = built_tx.send(Err(TelemetryError::Thread(e)));
                    return;
                }
            };
            let exporter = {
                let _in_runtime = rt.enter();
                build()
            };
            match exporter {
                Ok(exporter) => {
                    let _ = built_tx.send(Ok(()));
                    export_loop(&rt, exporter, rx, timeout);
                }
                Err(e) => {
                    let _ = built_tx.send(Err(e));
                }
            }
        })?;
        built_rx.recv().map_err(|_| TelemetryError::ThreadGone)??;
        Ok(Self { tx })
    }

    /// Asks the export thread to send what it holds, waiting at most
    /// `timeout` in all (a full queue is retried, never blocked on).
    fn flush_within(&self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        let mut msg = Msg::Flush(done);
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) if std::time::Instant::now() < deadline => {
                    msg = back;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => return,
            }
        }
        let _ = wait.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()));
    }
}

fn export_loop<E: SpanExporter>(rt: &tokio::runtime::Runtime, mut exporter: E, rx: Receiver<Msg>, timeout: Duration) {
    // Blocks for the first message; then gathers more for up to a second (or
    // a full batch, or a flush), exports, and answers the flushes.
    while let Ok(first) = rx.recv() {
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        let mut batch: Vec<SpanData> = Vec::new();
        let mut waiting: Vec<SyncSender<()>> = Vec::new();
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Span(s) => batch.push(*s),
                Msg::Flush(done) => waiting.push(done),
                Msg::Resource(r) => exporter.set_resource(&r),
            }
            if batch.len() >= BATCH || !waiting.is_empty() {
                break;
            }
            next = rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())).ok();
        }
        if !batch.is_empty() {
            let n = batch.len() as u64;
            match rt.block_on(async { tokio::time::timeout(timeout, exporter.export(batch)).await }) {
                Ok(Ok(())) => EXPORTED.fetch_add(n, Ordering::Relaxed),
                _ => FAILED.fetch_add(n, Ordering::Relaxed),
            };
        }
        for done in waiting {
            let _ = done.send(());
        }
    }
}

impl SpanProcessor for Queue {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        match self.tx.try_send(Msg::Span(Box::new(span))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.flush_within(Duration::from_secs(10));
        Ok(())
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        // Before any span: the queue is empty, so this never drops.
        let _ = self.tx.try_send(Msg::Resource(Box::new(resource.clone())));
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.flush_within(timeout);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TraceContextExt;
    use tonic::codegen::http::{HeaderMap, HeaderValue};

    fn parent(traceparent: &str) -> opentelemetry::Context {
        opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
        let mut h = HeaderMap::new();
        h.insert("traceparent", HeaderValue::from_str(traceparent).unwrap());
        // Other headers are never read, whatever they hold.
        h.insert("x-api-key", HeaderValue::from_static("secret"));
        parent_from(&h)
    }

    #[test]
    fn a_caller_s_traceparent_is_the_parent_and_garbage_is_a_root() {
        let cx = parent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid() && sc.is_remote() && sc.is_sampled());
        assert_eq!(sc.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736",
            &"0".repeat(4096),
        ] {
            assert!(!parent(bad).span().span_context().is_valid(), "{bad:?}");
        }
    }

    #[test]
    fn roots_are_drawn_at_the_ratio_and_parents_decide_for_their_children() {
        let draws = 100_000;
        let hits = (0..draws).filter(|_| unit_random() < 0.01).count();
        assert!((700..=1300).contains(&hits), "{hits} of {draws} at 1 %");
        RATIO.store(0.0f64.to_bits(), Ordering::Relaxed);
        assert!(!sampled(&opentelemetry::Context::new()), "a root at ratio 0");
        assert!(sampled(&parent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")), "a sampled parent");
        assert!(!sampled(&parent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")), "an unsampled one");
        RATIO.store(f64::NAN.to_bits(), Ordering::Relaxed);
        assert!(sampled(&opentelemetry::Context::new()), "no ratio: the SDK decides");
    }

    #[test]
    fn without_tracing_no_span_is_opened_and_no_stats_are_gathered() {
        assert!(!enabled());
        let span = request_span("x/Check", opentelemetry::Context::new());
        assert!(span.is_none());
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let ((), stats) = rt.block_on(scope(async { note_cache(true) }));
        assert_eq!(stats, Stats::default());
    }
}
