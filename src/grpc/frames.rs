//! Check answers in DATA frames under h2's chaining threshold, so each leaves in one write.
//!
//! h2 copies a DATA frame of under 256 bytes into its write buffer, but
//! keeps a larger one aside and writes it on its own (`CHAIN_THRESHOLD` in
//! h2's `FramedWrite`): until that frame is flushed nothing else can be
//! buffered, so the gRPC trailers that end the call go out in a second
//! write. For a Check that is two TCP segments instead of one, two wake-ups
//! of Envoy's worker and of ours: measured through Envoy (README,
//! "Performance"), an answer over the threshold cost the answering server
//! ~5 µs and Envoy ~5 µs more per request than one under it, whatever
//! part of it was left out. tollgate's allow answer (RateLimit headers, the
//! headers to remove, the metadata) is ~400 bytes; cut into frames under
//! the threshold, the headers, the whole message and the trailers leave in
//! one write again. The frames are slices of the same buffer (no copy here;
//! h2 copies them into its buffer as it does any small frame).
//!
//! Over plain TCP the threshold is 1 KiB: tollgate's connections tell h2
//! they are not vectored (`listener`), so an allow (~400 bytes) is one
//! frame, buffered, and only a larger answer (a long problem body, an x402
//! challenge) is cut, at [`MAX_FRAME_UNVECTORED`]. tonic's TLS stream says
//! it is vectored whatever the connection under it says, so under TLS
//! answers are cut at [`MAX_FRAME`] (`grpc::Bounds::tls`).
//! `tests/service.rs` (`one_write`) counts the writes of answers each way.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use hyper::body::{Body as HttpBody, Bytes, Frame, SizeHint};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;

/// The largest DATA frame handed to h2 over a stream that says it writes
/// vectored I/O (TLS): one under its 256-byte threshold.
pub const MAX_FRAME: usize = 255;

/// The largest over tollgate's own (unvectored) connections: one under
/// h2's 1 KiB threshold there.
pub const MAX_FRAME_UNVECTORED: usize = 1023;

/// A body whose data frames are at most `max` bytes.
#[derive(Debug)]
pub struct SmallFrames<B> {
    inner: B,
    /// What is left of a data frame being cut.
    rest: Bytes,
    max: usize,
}

impl<B> SmallFrames<B> {
    /// `inner`'s frames, cut at [`MAX_FRAME`].
    pub fn new(inner: B) -> Self {
        Self::with_max(inner, MAX_FRAME)
    }

    /// `inner`'s frames, cut at `max` bytes (at least 1).
    pub fn with_max(inner: B, max: usize) -> Self {
        Self { inner, rest: Bytes::new(), max: max.max(1) }
    }

    fn cut(&mut self, mut data: Bytes) -> Frame<Bytes> {
        if data.len() > self.max {
            self.rest = data.split_off(self.max);
        }
        Frame::data(data)
    }
}

impl<B> HttpBody for SmallFrames<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        if !this.rest.is_empty() {
            let rest = std::mem::take(&mut this.rest);
            return Poll::Ready(Some(Ok(this.cut(rest))));
        }
        Poll::Ready(match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => Some(Ok(match frame.into_data() {
                Ok(data) => this.cut(data),
                Err(frame) => frame,
            })),
            other => other,
        })
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let (inner, rest) = (self.inner.size_hint(), self.rest.len() as u64);
        // The upper bound first: `set_lower` asserts it stays at or below it.
        let mut hint = SizeHint::new();
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint.set_lower(inner.lower().saturating_add(rest));
        hint
    }
}

/// A gRPC service whose responses go out in [`SmallFrames`].
#[derive(Debug, Clone)]
pub struct SmallFramesService<S> {
    inner: S,
    max: usize,
}

impl<S> SmallFramesService<S> {
    /// `inner`, its answers cut at [`MAX_FRAME`].
    pub fn new(inner: S) -> Self {
        Self::with_max(inner, MAX_FRAME)
    }

    /// `inner`, its answers cut at `max` bytes.
    pub fn with_max(inner: S, max: usize) -> Self {
        Self { inner, max }
    }
}

impl<S: NamedService> NamedService for SmallFramesService<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, R> tower::Service<http::Request<R>> for SmallFramesService<S>
where
    S: tower::Service<http::Request<R>, Response = http::Response<Body>>,
    S::Future: Unpin,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Cut<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<R>) -> Self::Future {
        Cut { answer: self.inner.call(req), max: self.max }
    }
}

/// The answer of a [`SmallFramesService`], its body cut once it is ready
/// (no future boxed per call).
#[derive(Debug)]
pub struct Cut<F> {
    answer: F,
    max: usize,
}

impl<F, E> std::future::Future for Cut<F>
where
    F: std::future::Future<Output = Result<http::Response<Body>, E>> + Unpin,
{
    type Output = Result<http::Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let max = this.max;
        Pin::new(&mut this.answer)
            .poll(cx)
            .map(|r| r.map(|a| a.map(|body| Body::new(SmallFrames::with_max(body, max)))))
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt as _;

    use super::*;

    #[tokio::test]
    async fn frames_are_cut_under_the_threshold_and_nothing_is_lost() {
        for len in [0, 1, MAX_FRAME, MAX_FRAME + 1, 3 * MAX_FRAME, 1000] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut body = SmallFrames::new(http_body_util::Full::new(Bytes::from(data.clone())));
            let mut got = Vec::new();
            while let Some(frame) = body.frame().await {
                let chunk = frame.expect("no error").into_data().expect("data only");
                assert!(chunk.len() <= MAX_FRAME && (len == 0 || !chunk.is_empty()), "len {len}: {}", chunk.len());
                got.extend_from_slice(&chunk);
            }
            assert_eq!(got, data, "len {len}");
            assert!(body.is_end_stream());
        }
    }

    /// A data frame, then trailers, as a gRPC answer ends.
    struct Answer {
        data: Option<Bytes>,
        trailers: Option<http::HeaderMap>,
    }

    impl HttpBody for Answer {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            let this = self.get_mut();
            let frame = match this.data.take() {
                Some(data) => Some(Frame::data(data)),
                None => this.trailers.take().map(Frame::trailers),
            };
            Poll::Ready(frame.map(Ok))
        }

        fn is_end_stream(&self) -> bool {
            self.data.is_none() && self.trailers.is_none()
        }

        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
        }
    }

    #[tokio::test]
    async fn trailers_follow_the_cut_data_and_the_hints_hold() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let data = Bytes::from(vec![7u8; 600]);
        let mut body = SmallFrames::new(Answer { data: Some(data.clone()), trailers: Some(trailers.clone()) });
        assert_eq!(body.size_hint().exact(), Some(600));
        let mut got = Vec::new();
        let mut seen = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("no error");
            if frame.is_data() {
                assert!(seen.is_none(), "data after the trailers");
                // Part of the frame is still held back: the stream has not ended.
                assert!(!body.is_end_stream());
                // What is held back is counted (an exact inner hint, now 0, plus the rest).
                assert!(body.size_hint().lower() <= body.size_hint().upper().unwrap_or(u64::MAX));
            }
            match frame.into_data() {
                Ok(chunk) => got.extend_from_slice(&chunk),
                Err(frame) => seen = frame.into_trailers().ok(),
            }
        }
        assert_eq!(got, data.to_vec());
        assert_eq!(seen, Some(trailers));
        assert!(body.is_end_stream());
    }
}
