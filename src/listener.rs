//! Accepting connections within bounds, for both ports.
//!
//! [`LimitedIncoming`] accepts TCP connections (with `TCP_NODELAY`: Nagle's
//! algorithm would hold each small gRPC reply for the peer's delayed ACK,
//! ~40 ms per Check) and admits at most `server.limits.max_connections` at
//! once. Each admitted [`LimitedStream`] holds a semaphore permit until it is
//! dropped, so the cap counts connections, not accepts. A connection beyond
//! the cap is accepted and closed at once: it costs a file descriptor for an
//! instant instead of waiting in the kernel's queue for a slot.
//!
//! Every admitted connection also has a handshake deadline
//! (`server.limits.handshake_timeout`, counted from the accept): until the
//! peer has sent [`HANDSHAKE_BYTES`] bytes (the length of the HTTP/2
//! preface; any real HTTP/1 request line and `Host` header is longer), a read
//! that would wait past the deadline fails with [`std::io::ErrorKind::TimedOut`]
//! instead, and hyper or the TLS acceptor drops the connection. So a silent
//! connection, or one that trickles a byte at a time, is closed; one that
//! has said hello is left to the HTTP layers (HTTP/2 keepalive, hyper's
//! header read timeout).
//!
//! With TLS done by tonic ([`LimitedIncoming::count_after_tls`]) the bytes
//! that count are those after the TLS handshake: tonic asks the stream for
//! its [`Connected::connect_info`] once the handshake is done, which starts
//! the count, so the one deadline covers the TLS handshake and the first
//! application bytes. Every HTTP/2 client sends at least a SETTINGS ACK
//! (31 bytes as a TLS record) right after the handshake.
//!
//! The connect info is tonic's [`TcpConnectInfo`] (and, under TLS,
//! `TlsConnectInfo<TcpConnectInfo>`), so `Request::remote_addr` and
//! `Request::peer_certs` keep working through this wrapper.
//!
//! Depends on nothing of ours but [`crate::config::Limits`].

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::config::Limits;

/// Bytes a new connection must send before its handshake deadline: the
/// length of the HTTP/2 client preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`).
pub const HANDSHAKE_BYTES: usize = 24;

/// How long accepting pauses after an error that is not the peer's doing
/// (out of file descriptors, out of memory), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Connections accepted and closed over the cap in one poll before the
/// accept loop yields to other tasks.
const REJECT_BUDGET: usize = 64;

/// The read error a connection gets once its handshake deadline has passed.
#[derive(Debug, thiserror::Error)]
#[error("no handshake within {0:?}")]
pub struct HandshakeTimeout(pub Duration);

/// Accepts connections on a listener, at most `max_connections` open at once,
/// each with a handshake deadline. A [`Stream`] for tonic's
/// `serve_with_incoming_shutdown`; [`LimitedIncoming::accept`] for our own
/// HTTP accept loop. Dropping it closes the listening socket.
#[derive(Debug)]
pub struct LimitedIncoming {
    listener: TcpListener,
    /// One permit per open connection; a permit travels with its stream.
    permits: Arc<Semaphore>,
    handshake_timeout: Duration,
    /// Whether the handshake count starts at `connect_info` (after TLS) rather than at the accept.
    count_after_tls: bool,
    /// Set after an accept error that is not the peer's doing; accepting resumes when it fires.
    backoff: Option<Pin<Box<Sleep>>>,
}

impl LimitedIncoming {
    /// Bounds `listener` by `limits.max_connections` and `limits.handshake_timeout`.
    pub fn new(listener: TcpListener, limits: &Limits) -> Self {
        Self {
            listener,
            permits: Arc::new(Semaphore::new(limits.max_connections)),
            handshake_timeout: limits.handshake_timeout,
            count_after_tls: false,
            backoff: None,
        }
    }

    /// Counts handshake bytes only once the server's TLS handshake is done
    /// (see the module doc); set when tonic terminates TLS on these streams.
    pub fn count_after_tls(mut self, yes: bool) -> Self {
        self.count_after_tls = yes;
        self
    }

    /// Connections that may still be admitted before the cap is reached.
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }

    /// The next admitted connection. Never fails: connections over the cap
    /// are closed here, and accept errors are logged and retried.
    pub async fn accept(&mut self) -> LimitedStream {
        std::future::poll_fn(|cx| self.poll_accept(cx)).await
    }

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<LimitedStream> {
        let mut rejected = 0;
        loop {
            if let Some(backoff) = self.backoff.as_mut() {
                if backoff.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.backoff = None;
            }
            let (stream, peer) = match self.listener.poll_accept(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(accepted)) => accepted,
                Poll::Ready(Err(e)) if is_peer_error(&e) => continue,
                Poll::Ready(Err(e)) => {
                    tracing::warn!(error = %e, backoff = ?ACCEPT_BACKOFF, "accept failed");
                    self.backoff = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
                    continue;
                }
            };
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                // Dropping the stream closes it: the peer reads EOF at once.
                tracing::debug!(%peer, "connection limit reached: closed");
                rejected += 1;
                if rejected >= REJECT_BUDGET {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                continue;
            };
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
            }
            return Poll::Ready(LimitedStream::new(stream, permit, self.handshake_timeout, !self.count_after_tls));
        }
    }
}

impl Stream for LimitedIncoming {
    type Item = Result<LimitedStream, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_accept(cx).map(|s| Some(Ok(s)))
    }
}

/// Errors about one connection (the peer gave up before we accepted it),
/// after which the next accept may succeed at once.
fn is_peer_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// A connection's pending handshake: dropped once [`HANDSHAKE_BYTES`] have arrived.
#[derive(Debug)]
struct Handshake {
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
    /// Bytes still owed before the deadline no longer applies.
    remaining: usize,
    /// Whether bytes count yet (false until TLS is done when tonic does TLS).
    /// Atomic because tonic signals it through `connect_info(&self)`.
    counting: AtomicBool,
}

/// An admitted TCP connection: holds its slot under the connection cap until
/// dropped and fails reads that would wait past its handshake deadline.
#[derive(Debug)]
pub struct LimitedStream {
    io: TcpStream,
    /// `None` once the peer has sent its first bytes (or was never limited).
    handshake: Option<Handshake>,
    /// Returned to the cap when the connection is dropped.
    _permit: OwnedSemaphorePermit,
}

impl LimitedStream {
    fn new(io: TcpStream, permit: OwnedSemaphorePermit, timeout: Duration, counting: bool) -> Self {
        let handshake = Handshake {
            deadline: Box::pin(tokio::time::sleep(timeout)),
            timeout,
            remaining: HANDSHAKE_BYTES,
            counting: AtomicBool::new(counting),
        };
        Self { io, handshake: Some(handshake), _permit: permit }
    }

    /// The underlying TCP stream (addresses, socket options).
    pub fn get_ref(&self) -> &TcpStream {
        &self.io
    }

    /// Whether the handshake deadline still applies to this connection.
    pub fn in_handshake(&self) -> bool {
        self.handshake.is_some()
    }
}

impl AsyncRead for LimitedStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(h) = this.handshake.as_mut()
            && h.deadline.as_mut().poll(cx).is_ready()
        {
            // Stays armed: every later read fails too, until the connection is dropped.
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, HandshakeTimeout(h.timeout))));
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.io).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(h)) = (&result, this.handshake.as_mut())
            && h.counting.load(Ordering::Acquire)
        {
            h.remaining = h.remaining.saturating_sub(buf.filled().len() - before);
            if h.remaining == 0 {
                this.handshake = None;
            }
        }
        result
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    /// False, on purpose: h2 then copies DATA frames of up to 1 KiB into its
    /// write buffer (`CHAIN_THRESHOLD_WITHOUT_VECTORED_IO` in h2's
    /// `FramedWrite`), where over vectored I/O it keeps every frame of 256
    /// bytes or more aside to be written on its own, and buffers nothing
    /// after it until then. A Check's answer (~400 bytes) would leave in two
    /// writes (the message, then the trailers): two TCP segments, two
    /// wake-ups of Envoy and of us (see `grpc::frames`). Unvectored, the
    /// headers, the message and the trailers leave in one write; a frame of
    /// 1 KiB or more takes two writes instead of one writev.
    fn is_write_vectored(&self) -> bool {
        false
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl Connected for LimitedStream {
    type ConnectInfo = TcpConnectInfo;

    /// tonic calls this once per connection, after its TLS handshake (if any):
    /// from here on the peer's bytes count towards [`HANDSHAKE_BYTES`].
    fn connect_info(&self) -> TcpConnectInfo {
        if let Some(h) = &self.handshake {
            h.counting.store(true, Ordering::Release);
        }
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limits(max_connections: usize, handshake_timeout: Duration) -> Limits {
        Limits { max_connections, handshake_timeout, ..Limits::default() }
    }

    async fn bound(l: &Limits) -> (LimitedIncoming, std::net::SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (LimitedIncoming::new(listener, l), addr)
    }

    #[tokio::test]
    async fn a_silent_connection_fails_its_read_at_the_deadline() {
        let (mut incoming, addr) = bound(&limits(4, Duration::from_millis(200))).await;
        let _client = TcpStream::connect(addr).await.unwrap();
        let mut server = incoming.accept().await;
        assert!(server.get_ref().nodelay().unwrap(), "TCP_NODELAY is set");
        // So h2 buffers a Check's answer whole (tests/service.rs `one_write`).
        assert!(!server.is_write_vectored(), "unvectored to h2");
        let mut buf = [0u8; 8];
        let err = tokio::time::timeout(Duration::from_secs(5), server.read(&mut buf)).await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn a_trickle_shorter_than_the_preface_still_times_out() {
        let (mut incoming, addr) = bound(&limits(4, Duration::from_millis(300))).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        let mut server = incoming.accept().await;
        client.write_all(b"PRI * HTTP/2.0").await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(server.read(&mut buf).await.unwrap(), 14);
        assert!(server.in_handshake());
        let err = tokio::time::timeout(Duration::from_secs(5), server.read(&mut buf)).await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn after_the_first_bytes_the_deadline_no_longer_applies() {
        let (mut incoming, addr) = bound(&limits(4, Duration::from_millis(100))).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        let mut server = incoming.accept().await;
        client.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        let mut got = 0;
        while got < HANDSHAKE_BYTES {
            got += server.read(&mut buf).await.unwrap();
        }
        assert!(!server.in_handshake());
        tokio::time::sleep(Duration::from_millis(300)).await;
        client.write_all(b"later").await.unwrap();
        assert_eq!(server.read(&mut buf).await.unwrap(), 5, "read after the deadline succeeds");
    }

    #[tokio::test]
    async fn under_tls_bytes_count_only_after_connect_info() {
        let (incoming, addr) = bound(&limits(4, Duration::from_millis(300))).await;
        let mut incoming = incoming.count_after_tls(true);
        let mut client = TcpStream::connect(addr).await.unwrap();
        let mut server = incoming.accept().await;
        client.write_all(&[0x16; 100]).await.unwrap(); // a "ClientHello"
        let mut buf = [0u8; 128];
        let mut got = 0;
        while got < 100 {
            got += server.read(&mut buf).await.unwrap();
        }
        assert!(server.in_handshake(), "handshake bytes do not count");
        let _ = server.connect_info();
        client.write_all(&[0x17; 31]).await.unwrap();
        let mut got = 0;
        while got < 31 {
            got += server.read(&mut buf).await.unwrap();
        }
        assert!(!server.in_handshake());
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_and_slots_come_back() {
        let (mut incoming, addr) = bound(&limits(2, Duration::from_secs(10))).await;
        let _c1 = TcpStream::connect(addr).await.unwrap();
        let _c2 = TcpStream::connect(addr).await.unwrap();
        let s1 = incoming.accept().await;
        let _s2 = incoming.accept().await;
        assert_eq!(incoming.available(), 0);
        let mut c3 = TcpStream::connect(addr).await.unwrap();
        let accepting = tokio::spawn(async move {
            let s = incoming.accept().await;
            (incoming, s)
        });
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), c3.read(&mut buf)).await.unwrap().unwrap_or(0);
        assert_eq!(n, 0, "the third connection reads EOF");
        drop(s1);
        let mut c4 = TcpStream::connect(addr).await.unwrap();
        let (incoming, s4) = tokio::time::timeout(Duration::from_secs(5), accepting).await.unwrap().unwrap();
        assert_eq!(s4.get_ref().peer_addr().unwrap(), c4.local_addr().unwrap(), "the freed slot admits a new one");
        assert_eq!(incoming.available(), 0);
        c4.write_all(b"x").await.unwrap();
    }
}
