//! Load loops for the benches: up to N calls with a fixed number in flight,
//! each timed, bounded in time, and the figures made of them (rates,
//! nearest-rank percentiles, medians over rounds, CPU seconds).
//!
//! [`drive`] runs any [`Caller`] (a gRPC Check, an HTTP request through
//! Envoy); [`run_load`] is it for ext_authz Checks.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use envoy_types::pb::google::rpc;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic_prost::ProstCodec;

/// Upper bound on one run; a slower run stops early and reports what it did.
pub const RUN_DEADLINE: Duration = Duration::from_secs(60);

/// How one call went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Allowed (an OK Check, a 2xx through Envoy).
    Allowed,
    /// Answered with a deny.
    Denied,
    /// No answer: a transport or RPC error.
    Failed,
}

/// One caller of the thing under load; cloned once per worker, so a clone
/// should share the connection (a tonic client, an HTTP client).
pub trait Caller: Clone + Send + 'static {
    /// Makes one call.
    fn call(&mut self) -> impl Future<Output = Outcome> + Send;
}

/// The one field of a `CheckResponse` a load client reads: its status.
///
/// Decoding the rest (headers into `String`s, the metadata into a
/// `HashMap`) is the client's cost and grows with the answer, so a client
/// decoding it all charges the server under test for the size of its
/// answer. What the answer costs the real client is measured through Envoy
/// (`benches/envoy.rs`); prost skips the other fields without copying them.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Verdict {
    /// The Check's status: code 0 is an allow.
    #[prost(message, optional, tag = "1")]
    pub status: Option<rpc::Status>,
}

/// `envoy.service.auth.v3.Authorization/Check`.
const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

/// Checks with one request over one HTTP/2 channel, reading each answer's
/// [`Verdict`] only.
#[derive(Clone)]
pub struct Check {
    /// The channel; clones share it.
    pub channel: Channel,
    /// The request every call sends.
    pub request: CheckRequest,
}

impl Caller for Check {
    async fn call(&mut self) -> Outcome {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        if grpc.ready().await.is_err() {
            return Outcome::Failed;
        }
        let codec = ProstCodec::<CheckRequest, Verdict>::default();
        let request = tonic::Request::new(self.request.clone());
        match grpc.unary(request, PathAndQuery::from_static(CHECK_PATH), codec).await {
            Ok(r) if r.get_ref().status.as_ref().map_or(-1, |s| s.code) == 0 => Outcome::Allowed,
            Ok(_) => Outcome::Denied,
            Err(_) => Outcome::Failed,
        }
    }
}

/// What one run did.
#[derive(Debug, Default)]
pub struct Run {
    /// Calls allowed.
    pub allowed: usize,
    /// Calls denied.
    pub denied: usize,
    /// Calls that got no answer.
    pub errors: usize,
    /// Wall time of the whole run.
    pub elapsed: Duration,
    /// Per-call latencies in ns, sorted.
    pub latencies: Vec<u64>,
}

impl Run {
    /// Calls made.
    pub fn calls(&self) -> usize {
        self.allowed + self.denied + self.errors
    }

    /// Calls per second.
    pub fn rate(&self) -> f64 {
        self.calls() as f64 / self.elapsed.as_secs_f64()
    }

    /// Nearest-rank percentile (`p` in 0..=1) in ms; NaN for an empty run.
    pub fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let rank = ((p * self.latencies.len() as f64).ceil() as usize).clamp(1, self.latencies.len());
        self.latencies[rank - 1] as f64 / 1e6
    }
}

/// Makes up to `calls` calls with `concurrency` in flight, each timed;
/// stops early after [`RUN_DEADLINE`].
pub async fn drive(caller: impl Caller, calls: usize, concurrency: usize) -> Run {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (mut caller, next) = (caller.clone(), next.clone());
            tokio::spawn(async move {
                let mut run = Run { latencies: Vec::with_capacity(calls / concurrency + 1), ..Run::default() };
                while next.fetch_add(1, Ordering::Relaxed) < calls && started.elapsed() < RUN_DEADLINE {
                    let t = Instant::now();
                    let outcome = caller.call().await;
                    run.latencies.push(t.elapsed().as_nanos() as u64);
                    match outcome {
                        Outcome::Allowed => run.allowed += 1,
                        Outcome::Denied => run.denied += 1,
                        Outcome::Failed => run.errors += 1,
                    }
                }
                run
            })
        })
        .collect();
    let mut total = Run::default();
    for w in workers {
        let run = w.await.expect("load worker");
        total.allowed += run.allowed;
        total.denied += run.denied;
        total.errors += run.errors;
        total.latencies.extend(run.latencies);
    }
    total.elapsed = started.elapsed();
    total.latencies.sort_unstable();
    total
}

/// Runs up to `calls` Checks of `request` with `concurrency` in flight over
/// `channel`, each timed.
pub async fn run_load(channel: &Channel, request: &CheckRequest, calls: usize, concurrency: usize) -> Run {
    drive(Check { channel: channel.clone(), request: request.clone() }, calls, concurrency).await
}

/// The median of `xs` (mean of the middle two for an even count); NaN when empty.
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// Medians over rounds: (calls/s, p50 ms, p99 ms).
pub fn medians(runs: &[Run]) -> (f64, f64, f64) {
    (
        median(runs.iter().map(Run::rate).collect()),
        median(runs.iter().map(|r| r.percentile_ms(0.50)).collect()),
        median(runs.iter().map(|r| r.percentile_ms(0.99)).collect()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_nearest_rank_percentiles() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(vec![]).is_nan());
        let run = Run { latencies: (1..=100).map(|ms| ms * 1_000_000).collect(), ..Run::default() };
        assert_eq!((run.percentile_ms(0.5), run.percentile_ms(0.99), run.percentile_ms(1.0)), (50.0, 99.0, 100.0));
        assert!(Run::default().percentile_ms(0.5).is_nan());
    }

    /// A caller that allows every other call and fails every fifth.
    #[derive(Clone)]
    struct Counting(Arc<AtomicUsize>);

    impl Caller for Counting {
        async fn call(&mut self) -> Outcome {
            match self.0.fetch_add(1, Ordering::Relaxed) {
                n if n % 5 == 4 => Outcome::Failed,
                n if n % 2 == 0 => Outcome::Allowed,
                _ => Outcome::Denied,
            }
        }
    }

    #[tokio::test]
    async fn drive_makes_exactly_the_calls_asked_for_across_workers() {
        let made = Arc::new(AtomicUsize::new(0));
        let run = drive(Counting(made.clone()), 100, 7).await;
        assert_eq!((run.calls(), made.load(Ordering::Relaxed), run.latencies.len()), (100, 100, 100));
        assert_eq!(run.errors, 20);
        assert!(run.latencies.is_sorted());
    }
}
