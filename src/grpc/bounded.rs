//! `server.limits.request_timeout` and `max_inflight_requests` per service.
//!
//! A call is refused at once with RESOURCE_EXHAUSTED when its pool of
//! in-flight calls is full (it holds a slot until it ends), and a call that
//! runs longer than the timeout ends with CANCELLED ("Timeout expired", as
//! tonic's own server-wide timeout answers). The Check, `tollgate.v1` and
//! health services share one pool and the timeout; the access-log service
//! has a pool of its own and no timeout: Envoy holds each stream open for as
//! long as it runs (cutting it would lose the entries in flight), and
//! however many proxies stream to a replica, their streams never take the
//! slots Checks need.
//!
//! The pool is a count ([`Slots`]), not a semaphore: no call ever waits
//! for a slot, and tokio's semaphore takes a lock on every release, which
//! two workers ending Checks contend for. The timeout's timer is made only
//! for a call still running after its first poll (a Check of the memory
//! store, or of a cached account whose counters answer at once, never
//! needs one).
//!
//! A [traced](Bounded::traced) service also opens a span per call when
//! tracing is on (see `telemetry`), child of the caller's `traceparent`, and
//! puts the call's store time and cache hits on it.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::server::NamedService;
use tower::Service;

/// A pool of calls in flight, shared by the services it bounds: at most
/// `max` taken at once; a call that finds none free is refused, never queued.
#[derive(Debug)]
pub struct Slots {
    taken: AtomicUsize,
    max: usize,
}

impl Slots {
    /// A pool of `max` slots.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self { taken: AtomicUsize::new(0), max })
    }

    /// One slot, held until the returned guard drops; `None` when all are taken.
    pub fn try_take(self: &Arc<Self>) -> Option<Slot> {
        let max = self.max;
        self.taken.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        Some(Slot(self.clone()))
    }

    /// Slots taken now.
    pub fn taken(&self) -> usize {
        self.taken.load(Ordering::Acquire)
    }
}

/// A taken slot of [`Slots`], given back when dropped.
#[derive(Debug)]
pub struct Slot(Arc<Slots>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.taken.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A service whose calls take a slot of a shared pool and, optionally, end after a timeout.
#[derive(Debug, Clone)]
pub struct Bounded<S> {
    inner: S,
    timeout: Option<Duration>,
    slots: Arc<Slots>,
    /// The methods whose calls get a span (`service/Method`); empty: none.
    traced: &'static [&'static str],
}

impl<S> Bounded<S> {
    /// `inner`, each call holding one of `slots` and ended after `timeout` (if any).
    pub fn new(inner: S, timeout: Option<Duration>, slots: Arc<Slots>) -> Self {
        Self { inner, timeout, slots, traced: &[] }
    }

    /// Each call gets a span (when tracing is on), named after its method
    /// when it is one of `methods` (`envoy.service.auth.v3.Authorization/Check`),
    /// else `unknown`: a caller cannot name spans. For the Check and
    /// `tollgate.v1` services; not health probes, reflection or the access-log stream.
    pub fn traced(mut self, methods: &'static [&'static str]) -> Self {
        self.traced = methods;
        self
    }
}

impl<S: NamedService> NamedService for Bounded<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<Request<Body>> for Bounded<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        // Refused before the request is read: a call holds its message buffer while it runs.
        let Some(slot) = self.slots.try_take() else {
            return Box::pin(async { Ok(tonic::Status::resource_exhausted("too many calls in flight").into_http()) });
        };
        let span = if !self.traced.is_empty() && crate::telemetry::enabled() {
            let path = req.uri().path().trim_start_matches('/');
            let name = self.traced.iter().find(|m| **m == path).copied().unwrap_or("unknown");
            crate::telemetry::request_span(name, crate::telemetry::parent_from(req.headers()))
        } else {
            tracing::Span::none()
        };
        let call = {
            // The handler's own code runs when the future is polled, inside the span.
            let _entered = span.enter();
            self.inner.call(req)
        };
        // The deadline counts from here; its timer is made only if the first poll leaves the call running.
        // None: no timeout, or one past the clock's range (no deadline, as tokio's own `timeout` does).
        let deadline = self.timeout.and_then(|t| tokio::time::Instant::now().checked_add(t));
        let bounded = async move {
            let mut call = std::pin::pin!(call);
            let answer = match std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx))).await {
                Poll::Ready(answer) => answer,
                Poll::Pending => match deadline {
                    Some(at) => match tokio::time::timeout_at(at, call).await {
                        Ok(r) => r,
                        Err(_) => Ok(tonic::Status::cancelled("Timeout expired").into_http()),
                    },
                    None => call.await,
                },
            };
            drop(slot);
            answer
        };
        if span.is_none() {
            return Box::pin(bounded);
        }
        Box::pin(tracing::Instrument::instrument(
            async move {
                let (answer, stats) = crate::telemetry::scope(bounded).await;
                crate::telemetry::record_stats(&tracing::Span::current(), stats);
                answer
            },
            span,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers after `delay` (at once when zero, without ever returning Pending).
    #[derive(Clone)]
    struct After(Duration);

    impl Service<Request<Body>> for After {
        type Response = Response<Body>;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<Body>) -> Self::Future {
            let delay = self.0;
            Box::pin(async move {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                Ok(Response::new(Body::empty()))
            })
        }
    }

    fn grpc_status(r: &Response<Body>) -> Option<&str> {
        r.headers().get("grpc-status").and_then(|v| v.to_str().ok())
    }

    #[test]
    fn slots_are_taken_up_to_the_bound_and_given_back_on_drop() {
        let slots = Slots::new(2);
        let a = slots.try_take().expect("first");
        let b = slots.try_take().expect("second");
        assert!(slots.try_take().is_none(), "a third is refused");
        assert_eq!(slots.taken(), 2, "a refusal takes nothing");
        drop(a);
        let c = slots.try_take().expect("a given-back slot is taken again");
        drop((b, c));
        assert_eq!(slots.taken(), 0);
        assert!(Slots::new(0).try_take().is_none(), "a pool of none refuses all");
    }

    #[test]
    fn racing_takers_never_hold_more_than_the_bound() {
        let slots = Slots::new(3);
        let most = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (slots, most) = (slots.clone(), most.clone());
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        if let Some(slot) = slots.try_take() {
                            most.fetch_max(slots.taken(), Ordering::AcqRel);
                            drop(slot);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("taker thread");
        }
        assert!(most.load(Ordering::Acquire) <= 3, "held {} at once", most.load(Ordering::Acquire));
        assert_eq!(slots.taken(), 0, "every slot came back");
    }

    #[tokio::test]
    async fn a_call_answered_at_once_or_in_time_passes_and_gives_its_slot_back() {
        let slots = Slots::new(1);
        for delay in [Duration::ZERO, Duration::from_millis(20)] {
            let mut svc = Bounded::new(After(delay), Some(Duration::from_secs(5)), slots.clone());
            let r = svc.call(Request::new(Body::empty())).await.expect("infallible");
            assert_eq!(grpc_status(&r), None, "answered by the service ({delay:?})");
            assert_eq!(slots.taken(), 0, "slot given back ({delay:?})");
        }
    }

    #[tokio::test]
    async fn a_call_still_running_at_the_deadline_is_cancelled_and_a_full_pool_refuses() {
        let slots = Slots::new(1);
        let mut slow = Bounded::new(After(Duration::from_secs(30)), Some(Duration::from_millis(50)), slots.clone());
        let held = slow.call(Request::new(Body::empty()));
        let mut other = Bounded::new(After(Duration::ZERO), None, slots.clone());
        let refused = other.call(Request::new(Body::empty())).await.expect("infallible");
        assert_eq!(grpc_status(&refused), Some("8"), "RESOURCE_EXHAUSTED while the slot is held");
        let started = std::time::Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(10), held).await.expect("ends").expect("infallible");
        assert_eq!(grpc_status(&r), Some("1"), "CANCELLED at the deadline");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(slots.taken(), 0, "slot given back");
    }
}
