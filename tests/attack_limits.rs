//! Issue 8, item 3: memory exhaustion without credentials. Each test is an
//! attack an unauthenticated peer can make on loopback, and pins the bound
//! that `server.limits` puts on it: streams per connection (and the RSS they
//! cost, on the real binary), message size, silent connections, the
//! connection cap, slow HTTP heads and bodies, and body size.
//!
//! Every loop is bounded in count and time. `TOLLGATE_ATTACK_BIN` runs the
//! stream flood against another build (to measure an older one); its
//! `TOLLGATE_ATTACK_MAX_MB` (default 320) caps what the flood sends in total,
//! so an unbounded build grows by at most that much.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tollgate_testkit::process::TollgateProcess;
use tollgate_testkit::{TestServer, http_check, http_get, spec_config};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

/// `spec_config()` with `server.limits` set to `limits` (a YAML flow mapping body).
fn config_with_limits(limits: &str) -> String {
    spec_config() + &format!("server: {{ limits: {{ {limits} }} }}\n")
}

// ---------------------------------------------------------------------------
// A raw HTTP/2 client: an attacker ignores the server's SETTINGS, so no
// compliant client library will do.

mod h2raw {
    use super::*;

    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const WINDOW_UPDATE: u8 = 0x8;
    pub const END_STREAM: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const ACK: u8 = 0x1;
    pub const REFUSED_STREAM: u32 = 0x7;
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// HPACK integer with an `n`-bit prefix (RFC 7541 §5.1).
    fn int(out: &mut Vec<u8>, first: u8, n: u32, mut v: usize) {
        let max = (1usize << n) - 1;
        if v < max {
            out.push(first | v as u8);
            return;
        }
        out.push(first | max as u8);
        v -= max;
        while v >= 128 {
            out.push((v % 128 + 128) as u8);
            v /= 128;
        }
        out.push(v as u8);
    }

    /// A header block of literals without indexing and without Huffman coding.
    pub fn header_block(headers: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, value) in headers {
            out.push(0x00);
            int(&mut out, 0, 7, name.len());
            out.extend_from_slice(name.as_bytes());
            int(&mut out, 0, 7, value.len());
            out.extend_from_slice(value.as_bytes());
        }
        out
    }

    pub fn check_headers(stream: u32) -> Vec<u8> {
        let block = header_block(&[
            (":method", "POST"),
            (":scheme", "http"),
            (":path", CHECK_PATH),
            (":authority", "tollgate"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]);
        frame(HEADERS, END_HEADERS, stream, &block)
    }

    /// The 5-byte gRPC message prefix announcing `len` bytes, uncompressed.
    pub fn grpc_prefix(len: u32) -> Vec<u8> {
        let mut p = vec![0u8];
        p.extend_from_slice(&len.to_be_bytes());
        p
    }

    /// What the server has said so far on one connection.
    #[derive(Debug, Default)]
    pub struct Seen {
        pub max_concurrent_streams: Option<u32>,
        pub initial_window: i64,
        pub conn_window: i64,
        pub stream_windows: std::collections::HashMap<u32, i64>,
        pub refused: HashSet<u32>,
        /// Streams the server ended: a response with END_STREAM, or a reset other than REFUSED_STREAM.
        pub ended: HashSet<u32>,
        pub goaway: Option<u32>,
        pub closed: bool,
    }

    impl Seen {
        pub fn window(&self, stream: u32) -> i64 {
            self.conn_window.min(self.initial_window + self.stream_windows.get(&stream).copied().unwrap_or(0))
        }
    }

    pub struct Conn {
        pub write: tokio::net::tcp::OwnedWriteHalf,
        pub seen: Arc<Mutex<Seen>>,
        pub reader: tokio::task::JoinHandle<()>,
    }

    impl Conn {
        /// Connects, exchanges SETTINGS, and keeps reading (answering SETTINGS and PINGs) in a task.
        pub async fn open(addr: SocketAddr) -> Conn {
            let stream = TcpStream::connect(addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let (read, mut write) = stream.into_split();
            write.write_all(PREFACE).await.unwrap();
            write.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
            let seen = Arc::new(Mutex::new(Seen { initial_window: 65_535, conn_window: 65_535, ..Default::default() }));
            let (acks_tx, mut acks_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
            let reader = tokio::spawn(read_frames(read, seen.clone(), acks_tx));
            // The server's SETTINGS come first; wait for them (bounded).
            let deadline = Instant::now() + Duration::from_secs(5);
            while seen.lock().unwrap().max_concurrent_streams.is_none() && !seen.lock().unwrap().closed {
                assert!(Instant::now() < deadline, "no SETTINGS from the server");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let mut conn = Conn { write, seen, reader };
            while let Ok(ack) = acks_rx.try_recv() {
                conn.write.write_all(&ack).await.unwrap();
            }
            // Later PINGs go unanswered: keepalive_interval (30 s) outlasts every test here.
            drop(acks_rx);
            conn.write.flush().await.unwrap();
            conn
        }

        pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
            self.write.write_all(bytes).await
        }
    }

    async fn read_frames(
        mut read: OwnedReadHalf,
        seen: Arc<Mutex<Seen>>,
        acks: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
    ) {
        let mut head = [0u8; 9];
        loop {
            if read.read_exact(&mut head).await.is_err() {
                break;
            }
            let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
            let (kind, flags) = (head[3], head[4]);
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; len];
            if read.read_exact(&mut payload).await.is_err() {
                break;
            }
            let mut s = seen.lock().unwrap();
            match kind {
                SETTINGS if flags & ACK == 0 => {
                    for setting in payload.chunks_exact(6) {
                        let id = u16::from_be_bytes([setting[0], setting[1]]);
                        let value = u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]);
                        match id {
                            0x3 => s.max_concurrent_streams = Some(value),
                            0x4 => s.initial_window = i64::from(value),
                            _ => {}
                        }
                    }
                    // No MAX_CONCURRENT_STREAMS means unlimited.
                    s.max_concurrent_streams.get_or_insert(u32::MAX);
                    let _ = acks.send(frame(SETTINGS, ACK, 0, &[]));
                }
                PING if flags & ACK == 0 => {
                    let _ = acks.send(frame(PING, ACK, 0, &payload));
                }
                WINDOW_UPDATE if payload.len() == 4 => {
                    let inc =
                        i64::from(u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff);
                    if stream == 0 {
                        s.conn_window += inc;
                    } else {
                        *s.stream_windows.entry(stream).or_default() += inc;
                    }
                }
                RST_STREAM if payload.len() == 4 => {
                    let code = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                    if code == REFUSED_STREAM {
                        s.refused.insert(stream);
                    } else {
                        s.ended.insert(stream);
                    }
                }
                HEADERS if flags & END_STREAM != 0 => {
                    s.ended.insert(stream);
                }
                DATA if flags & END_STREAM != 0 => {
                    s.ended.insert(stream);
                }
                GOAWAY if payload.len() >= 8 => {
                    s.goaway = Some(u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]));
                }
                _ => {}
            }
        }
        seen.lock().unwrap().closed = true;
    }
}

// ---------------------------------------------------------------------------
// The real binary, for RSS.

/// The tollgate binary with `server.limits` set, for RSS (override the binary
/// with `TOLLGATE_ATTACK_BIN` to measure another build).
async fn start_binary(limits: &str) -> TollgateProcess {
    let bin = std::env::var("TOLLGATE_ATTACK_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_tollgate").to_owned());
    TollgateProcess::start(&bin, &[], |grpc, http| {
        spec_config()
            + &format!("server: {{ grpc_listen: \"{grpc}\", http_listen: \"{http}\", limits: {{ {limits} }} }}\n")
    })
    .await
}

async fn check_allowed(grpc: SocketAddr) -> bool {
    let Ok(mut c) = AuthorizationClient::connect(format!("http://{grpc}")).await else { return false };
    let r = c.check(http_check("GET", "/v1/search", &[("x-api-key", "pro-key")])).await;
    r.is_ok_and(|r| tollgate_testkit::Answer::of(r.get_ref()).allowed)
}

/// (a) One connection opens 1,000 Check streams, sends each a gRPC prefix
/// announcing a message just under the limit and as much of it as flow
/// control allows, and never finishes one.
#[tokio::test]
async fn a_stream_flood_on_one_connection_is_capped_at_the_advertised_limit_and_bounded_in_memory() {
    const STREAMS: u32 = 1_000;
    let max_total: usize =
        std::env::var("TOLLGATE_ATTACK_MAX_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(320) << 20;
    let mut b = start_binary("request_timeout: 8s").await;
    assert!(check_allowed(b.grpc).await, "warm-up Check");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = b.rss_kib();

    let mut conn = h2raw::Conn::open(b.grpc).await;
    let advertised = conn.seen.lock().unwrap().max_concurrent_streams.unwrap();
    let ids: Vec<u32> = (0..STREAMS).map(|i| 2 * i + 1).collect();
    // The body each stream announces: just under the default max_message_bytes (256 KiB), or 4 MiB
    // on a build without a limit (tonic's default), as the original attack did.
    let announce: u32 = if advertised == u32::MAX { 4 << 20 } else { (256 << 10) - 64 };
    // HEADERS for all of them; the message prefix only on those the server can have taken
    // (DATA on a refused stream is a connection error, which would end the test, not the server).
    let takeable = |id: u32| id <= 2 * advertised.min(STREAMS);
    for &id in &ids {
        let mut f = h2raw::check_headers(id);
        if takeable(id) {
            f.extend(h2raw::frame(h2raw::DATA, 0, id, &h2raw::grpc_prefix(announce)));
            let mut s = conn.seen.lock().unwrap();
            s.conn_window -= 5;
            *s.stream_windows.entry(id).or_default() -= 5;
        }
        if conn.send(&f).await.is_err() {
            break;
        }
    }
    // Fill the streams the server took, within flow control, never finishing a message.
    let started = Instant::now();
    let mut sent_total = 0usize;
    let mut sent: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
    let chunk = vec![0x5au8; 16 * 1024];
    'fill: while started.elapsed() < Duration::from_secs(10) && sent_total < max_total {
        let mut progressed = false;
        for &id in &ids {
            let (window, refused, closed) = {
                let s = conn.seen.lock().unwrap();
                (s.window(id), s.refused.contains(&id) || s.ended.contains(&id), s.closed)
            };
            if closed {
                break 'fill;
            }
            if refused || !takeable(id) {
                continue;
            }
            let already = sent.get(&id).copied().unwrap_or(0);
            let left = (announce as usize).saturating_sub(already + 1);
            let n = chunk.len().min(left).min(usize::try_from(window.max(0)).unwrap_or(0));
            if n == 0 {
                continue;
            }
            if conn.send(&h2raw::frame(h2raw::DATA, 0, id, &chunk[..n])).await.is_err() {
                break 'fill;
            }
            {
                let mut s = conn.seen.lock().unwrap();
                s.conn_window -= n as i64;
                *s.stream_windows.entry(id).or_default() -= n as i64;
            }
            *sent.entry(id).or_default() += n;
            sent_total += n;
            progressed = true;
            if sent_total >= max_total {
                break 'fill;
            }
        }
        if !progressed {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let s = conn.seen.lock().unwrap();
            let any_window = ids.iter().take(advertised.min(STREAMS) as usize).any(|&id| {
                !s.refused.contains(&id)
                    && s.window(id) > 0
                    && sent.get(&id).copied().unwrap_or(0) + 1 < announce as usize
            });
            if !any_window && started.elapsed() > Duration::from_secs(2) {
                break;
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = b.rss_kib();
    let grown_mib = after.saturating_sub(before) as f64 / 1024.0;
    let (refused, goaway) = {
        let s = conn.seen.lock().unwrap();
        (s.refused.len(), s.goaway)
    };
    eprintln!(
        "stream flood: advertised {advertised}, refused {refused}, goaway {goaway:?}, sent {} MiB to {} streams; \
         RSS {} MiB -> {} MiB (+{grown_mib:.1} MiB)",
        sent_total >> 20,
        sent.len(),
        before / 1024,
        after / 1024
    );

    // The process and its other doors stay up while the flood holds its streams.
    assert_eq!(http_get(b.http, "/healthz").await.unwrap().0, 200);
    assert!(check_allowed(b.grpc).await, "a Check on another connection is served during the flood");

    assert_eq!(advertised, 128, "SETTINGS_MAX_CONCURRENT_STREAMS is server.limits.max_concurrent_streams");
    assert!(
        refused as u32 >= STREAMS - advertised || goaway.is_some(),
        "streams beyond the limit are refused (refused {refused}, goaway {goaway:?})"
    );
    assert!(sent.len() <= advertised as usize, "no more than {advertised} streams took data");
    // The bound: 128 streams × 256 KiB (tonic reserves the announced length) = 32 MiB of message
    // buffers, plus per-stream state. The build without limits grew by 420+ MiB (and stopped
    // answering /healthz) under the same flood.
    assert!(grown_mib < 48.0, "RSS grew {grown_mib:.1} MiB under the flood");

    // request_timeout (8 s here) ends the streams that never finish.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ended, closed) = {
            let s = conn.seen.lock().unwrap();
            (sent.keys().filter(|id| s.ended.contains(id)).count(), s.closed)
        };
        if ended == sent.len() || closed {
            break;
        }
        assert!(Instant::now() < deadline, "only {ended} of {} held streams ended by request_timeout", sent.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    conn.reader.abort();
}

/// (a') The same flood spread over 8 connections (1,024 streams, each
/// announcing a message just under max_message_bytes): what one replica
/// holds is bounded by `max_inflight_requests` over all connections, not per
/// connection; calls beyond it are refused at once with RESOURCE_EXHAUSTED.
#[tokio::test]
async fn a_stream_flood_over_many_connections_is_bounded_by_max_inflight_requests() {
    const CONNS: usize = 8;
    let mut b = start_binary("request_timeout: 6s, max_inflight_requests: 32").await;
    assert!(check_allowed(b.grpc).await, "warm-up Check");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = b.rss_kib();
    let announce: u32 = (256 << 10) - 64;
    let mut conns = Vec::with_capacity(CONNS);
    let mut opened = 0usize;
    for _ in 0..CONNS {
        let mut conn = h2raw::Conn::open(b.grpc).await;
        let advertised = conn.seen.lock().unwrap().max_concurrent_streams.unwrap_or(128).min(128);
        for i in 0..advertised {
            let id = 2 * i + 1;
            let mut f = h2raw::check_headers(id);
            f.extend(h2raw::frame(h2raw::DATA, 0, id, &h2raw::grpc_prefix(announce)));
            if conn.send(&f).await.is_err() {
                break;
            }
            opened += 1;
        }
        conns.push(conn);
    }
    // Shed calls end at once; the admitted ones wait for a body that never comes.
    let deadline = Instant::now() + Duration::from_secs(5);
    let ended = loop {
        let ended: usize = conns.iter().map(|c| c.seen.lock().unwrap().ended.len()).sum();
        if ended + 32 >= opened || Instant::now() > deadline {
            break ended;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let after = b.rss_kib();
    let grown_mib = after.saturating_sub(before) as f64 / 1024.0;
    eprintln!(
        "multi-connection flood: {opened} streams on {CONNS} connections, {ended} ended at once; RSS {} MiB -> {} MiB \
         (+{grown_mib:.1} MiB)",
        before / 1024,
        after / 1024
    );
    assert!(ended + 32 >= opened, "all but the {} admitted calls are refused at once ({ended} of {opened})", 32);
    // 32 calls × 256 KiB = 8 MiB of message buffers, plus h2 state for ~1,000 streams.
    assert!(grown_mib < 24.0, "RSS grew {grown_mib:.1} MiB under the flood");
    assert_eq!(http_get(b.http, "/healthz").await.unwrap().0, 200, "liveness holds");
    for c in &conns {
        c.reader.abort();
    }
    drop(conns);
    // Once the flood is gone, Checks are served again.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check_allowed(b.grpc).await {
        assert!(Instant::now() < deadline, "Checks are served again after the flood");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A connection that stays (pinging, or holding a stream such as a health
/// `Watch`) is sent GOAWAY at `max_connection_age`, so none holds a slot
/// of `max_connections` forever.
#[tokio::test]
async fn connections_are_sent_goaway_at_max_connection_age() {
    let b = start_binary("max_connection_age: 1s, request_timeout: 1s").await;
    let conn = h2raw::Conn::open(b.grpc).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (goaway, closed) = {
            let s = conn.seen.lock().unwrap();
            (s.goaway, s.closed)
        };
        if goaway.is_some() || closed {
            break;
        }
        assert!(Instant::now() < deadline, "no GOAWAY within 10 s of a 1 s max_connection_age");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    conn.reader.abort();
    assert!(check_allowed(b.grpc).await, "new connections are served");
}

/// (b) A 1 MiB or 5 MiB message is refused with OUT_OF_RANGE; a prefix announcing 5 MiB
/// is answered at once, before any of the body is sent, so nothing is buffered.
#[tokio::test]
async fn a_message_over_max_message_bytes_is_refused_from_its_prefix() {
    let s = TestServer::start(&spec_config()).await;
    let mut client = AuthorizationClient::new(s.channel().await);
    // 1 MiB: over max_message_bytes (256 KiB), under tonic's own default (4 MiB).
    for size in [1 << 20, 5 << 20] {
        let big = "x".repeat(size);
        let status = client
            .check(http_check("GET", "/v1/search", &[("x-api-key", "pro-key"), ("x-padding", &big)]))
            .await
            .expect_err("over the limit");
        assert!(
            matches!(status.code(), tonic::Code::OutOfRange | tonic::Code::ResourceExhausted),
            "{size}: {:?}: {}",
            status.code(),
            status.message()
        );
    }
    // A normal Check on the same channel still works.
    let ok = client.check(http_check("GET", "/v1/search", &[("x-api-key", "pro-key")])).await.unwrap();
    assert!(tollgate_testkit::Answer::of(ok.get_ref()).allowed);

    let mut conn = h2raw::Conn::open(s.grpc).await;
    let mut f = h2raw::check_headers(1);
    f.extend(h2raw::frame(h2raw::DATA, 0, 1, &h2raw::grpc_prefix(5 << 20)));
    conn.send(&f).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !conn.seen.lock().unwrap().ended.contains(&1) {
        assert!(Instant::now() < deadline, "the announced 5 MB message was not refused on its prefix");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Closed before the drain: this client answers no PING, so hyper's graceful close would wait on it.
    conn.reader.abort();
    drop(conn);
    s.stop().await;
}

/// gRPC metadata (HTTP/2 headers) is bounded by max_header_list_bytes
/// (default 64 KiB; hyper's own default would be 16 KiB): 32 KiB passes,
/// 100 KiB is refused, and the connection keeps serving.
#[tokio::test]
async fn metadata_is_bounded_by_max_header_list_bytes() {
    let s = TestServer::start(&spec_config()).await;
    let mut client = AuthorizationClient::new(s.channel().await);
    let padded = |kib: usize| {
        let mut request = tonic::Request::new(http_check("GET", "/v1/search", &[("x-api-key", "pro-key")]));
        request.metadata_mut().insert("x-padding", "x".repeat(kib * 1024).parse().unwrap());
        request
    };
    assert!(client.check(padded(32)).await.is_ok(), "32 KiB of metadata is within 64 KiB");
    assert!(client.check(padded(100)).await.is_err(), "100 KiB of metadata is over 64 KiB");
    let ok = client.check(http_check("GET", "/v1/search", &[("x-api-key", "pro-key")])).await.unwrap();
    assert!(tollgate_testkit::Answer::of(ok.get_ref()).allowed);
    s.stop().await;
}

/// Reads until EOF or an error; returns how long that took (bounded by `within`).
async fn closed_within(mut s: TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 512];
    loop {
        match tokio::time::timeout(within.saturating_sub(start.elapsed()), s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            // hyper may answer a timed-out HTTP/1 head (408) before closing; h2 sends SETTINGS.
            Ok(Ok(_)) => continue,
        }
    }
}

/// (c) 300 silent connections to each port are closed by the server within
/// handshake_timeout; a connection that said hello outlives it.
#[tokio::test]
async fn silent_connections_are_closed_after_the_handshake_timeout_on_both_ports() {
    const SILENT: usize = 300;
    let s = TestServer::start(&config_with_limits("handshake_timeout: 1s")).await;
    // A gRPC channel that has sent its preface and a Check.
    let channel = s.channel().await;
    let mut client = AuthorizationClient::new(channel);
    assert!(client.check(http_check("GET", "/v1/search", &[("x-api-key", "pro-key")])).await.is_ok());

    let mut silent = Vec::new();
    for addr in [s.grpc, s.http] {
        for _ in 0..SILENT {
            silent.push(TcpStream::connect(addr).await.unwrap());
        }
    }
    let opened = Instant::now();
    let results = futures_util::future::join_all(silent.into_iter().map(|c| closed_within(c, Duration::from_secs(5))));
    let results = results.await;
    let open = results.iter().filter(|r| r.is_none()).count();
    assert_eq!(open, 0, "{open} of {} silent connections still open after 5 s", 2 * SILENT);
    let slowest = results.iter().flatten().max().copied().unwrap_or_default();
    assert!(slowest >= Duration::from_millis(900), "closed before the timeout: {slowest:?}");
    assert!(opened.elapsed() < Duration::from_secs(4), "closed within handshake_timeout (+ slack): {slowest:?}");

    // The channel that said hello is past its deadline and still works.
    assert!(client.check(http_check("GET", "/v1/search", &[("x-api-key", "pro-key")])).await.is_ok());
    assert_eq!(http_get(s.http, "/healthz").await.unwrap().0, 200);
    s.stop().await;
}

/// (d) With max_connections 50, the 51st connection is closed while the first
/// 50 are held, and new connections work once they close.
#[tokio::test]
async fn connections_beyond_max_connections_are_closed_until_slots_free_up() {
    let s = TestServer::start(&config_with_limits("max_connections: 50, handshake_timeout: 30s")).await;
    for addr in [s.grpc, s.http] {
        let mut held = Vec::new();
        for _ in 0..50 {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        // The server has accepted them all once a 51st is closed at once.
        let extra = TcpStream::connect(addr).await.unwrap();
        assert!(closed_within(extra, Duration::from_secs(5)).await.is_some(), "the 51st connection is closed");
        // The 50 are still open.
        for c in &mut held {
            let mut buf = [0u8; 16];
            let r = tokio::time::timeout(Duration::from_millis(10), c.read(&mut buf)).await;
            assert!(!matches!(r, Ok(Ok(0)) | Ok(Err(_))), "a held connection was closed: {r:?}");
        }
        drop(held);
        // Slots come back as the server sees the closes (bounded wait).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ok = if addr == s.grpc {
                check_allowed(s.grpc).await
            } else {
                http_get(s.http, "/healthz").await.is_ok_and(|r| r.0 == 200)
            };
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "no new connection admitted after the held ones closed ({addr})");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    s.stop().await;
}

/// Sends `head` (and then nothing) and reads the response head, if any, until the server closes.
async fn send_and_read(addr: SocketAddr, head: &[u8], within: Duration) -> (Option<Duration>, String) {
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(head).await.unwrap();
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(within.saturating_sub(start.elapsed()), c.read(&mut buf)).await {
            Err(_) => return (None, String::from_utf8_lossy(&got).into_owned()),
            Ok(Ok(0)) | Ok(Err(_)) => return (Some(start.elapsed()), String::from_utf8_lossy(&got).into_owned()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// (e) A slow-loris head (headers never finished, trickled a line at a time)
/// is closed after the header timeout.
#[tokio::test]
async fn a_slow_loris_head_is_closed_after_the_header_timeout() {
    let s = TestServer::start(&config_with_limits("handshake_timeout: 1s")).await;
    let mut c = TcpStream::connect(s.http).await.unwrap();
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: tollgate\r\n").await.unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    let closed = loop {
        // One more header line every 200 ms: never idle, never finished.
        let _ = c.write_all(b"X-Slow: 1\r\n").await;
        match tokio::time::timeout(Duration::from_millis(200), c.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break start.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => {}
        }
        assert!(start.elapsed() < Duration::from_secs(6), "slow-loris head still open after 6 s");
    };
    assert!(closed >= Duration::from_millis(900) && closed < Duration::from_secs(4), "closed after {closed:?}");
    s.stop().await;
}

/// An HTTP/1 head over max_header_list_bytes is refused with 431, not buffered.
#[tokio::test]
async fn an_http_head_over_max_header_list_bytes_gets_431() {
    let s = TestServer::start(&spec_config()).await;
    let head = format!("GET /healthz HTTP/1.1\r\nHost: tollgate\r\nX-Padding: {}\r\n\r\n", "x".repeat(100 * 1024));
    let (_, response) = send_and_read(s.http, head.as_bytes(), Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 431"), "{response:?}");
    let head = format!(
        "GET /healthz HTTP/1.1\r\nHost: tollgate\r\nConnection: close\r\nX-Padding: {}\r\n\r\n",
        "x".repeat(32 * 1024)
    );
    let (_, response) = send_and_read(s.http, head.as_bytes(), Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 200"), "32 KiB of headers is within 64 KiB: {response:?}");
    s.stop().await;
}

/// (e) A webhook body over max_body_bytes gets 413, whether its length is
/// announced (refused before it is sent) or streamed (refused at the limit).
#[tokio::test]
async fn a_webhook_body_over_max_body_bytes_gets_413() {
    let s = TestServer::start(&spec_config()).await;
    let limit = 1 << 20;
    // Announced: Content-Length over the limit, body withheld until 100-continue (never sent).
    let head = format!(
        "POST /webhooks/stripe HTTP/1.1\r\nHost: tollgate\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        limit + 1
    );
    let (_, response) = send_and_read(s.http, head.as_bytes(), Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response:?}");

    // Streamed: chunked, 2 MiB in 64 KiB chunks.
    let mut c = TcpStream::connect(s.http).await.unwrap();
    c.write_all(b"POST /webhooks/stripe HTTP/1.1\r\nHost: tollgate\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    let (mut read, mut write) = c.into_split();
    let writer = tokio::spawn(async move {
        let chunk = format!("10000\r\n{}\r\n", "a".repeat(0x10000));
        for _ in 0..32 {
            if write.write_all(chunk.as_bytes()).await.is_err() {
                return;
            }
        }
        let _ = write.write_all(b"0\r\n\r\n").await;
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let start = Instant::now();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") && start.elapsed() < Duration::from_secs(5) {
        match tokio::time::timeout(Duration::from_secs(5), read.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let response = String::from_utf8_lossy(&got);
    assert!(response.starts_with("HTTP/1.1 413"), "{response:?}");
    writer.abort();

    // Within the limit, the body reaches the handler (no billing.stripe configured here: 404).
    let body = "{}";
    let head = format!(
        "POST /webhooks/stripe HTTP/1.1\r\nHost: tollgate\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (_, response) = send_and_read(s.http, head.as_bytes(), Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 404"), "{response:?}");
    s.stop().await;
}

/// (e) A body that trickles in slower than request_timeout gets 408.
#[tokio::test]
async fn a_body_slower_than_request_timeout_gets_408() {
    let s = TestServer::start(&config_with_limits("request_timeout: 1s")).await;
    let head = "POST /webhooks/stripe HTTP/1.1\r\nHost: tollgate\r\nContent-Length: 100\r\n\r\n{\"id\":";
    let (closed, response) = send_and_read(s.http, head.as_bytes(), Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 408"), "{response:?}");
    assert!(closed.is_some(), "the connection is closed after the 408");
    s.stop().await;
}

/// TLS: the handshake deadline counts from the accept through the TLS
/// handshake, and a TLS client that said hello outlives it.
#[tokio::test]
async fn under_tls_silent_connections_close_and_live_ones_outlive_the_handshake_timeout() {
    let dir = std::env::temp_dir().join(format!("tollgate-attack-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert_pem, key_pem) = (cert.cert.pem(), cert.signing_key.serialize_pem());
    std::fs::write(dir.join("cert.pem"), &cert_pem).unwrap();
    std::fs::write(dir.join("key.pem"), &key_pem).unwrap();
    let yaml = spec_config()
        + &format!(
            "server: {{ tls: {{ cert: \"{}\", key: \"{}\" }}, limits: {{ handshake_timeout: 1s }} }}\n",
            dir.join("cert.pem").display(),
            dir.join("key.pem").display()
        );
    let s = TestServer::start(&yaml).await;
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&cert_pem)).domain_name("localhost");
    let channel =
        Channel::from_shared(format!("https://{}", s.grpc)).unwrap().tls_config(tls).unwrap().connect().await.unwrap();
    let mut client = AuthorizationClient::new(channel);
    let check = http_check("GET", "/v1/search", &[("x-api-key", "pro-key")]);
    assert!(client.check(check.clone()).await.is_ok());

    let silent = TcpStream::connect(s.grpc).await.unwrap();
    let closed = closed_within(silent, Duration::from_secs(5)).await;
    assert!(closed.is_some_and(|d| d < Duration::from_secs(3)), "silent TLS-port connection: {closed:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(client.check(check).await.is_ok(), "the TLS channel outlives the handshake timeout");
    s.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
