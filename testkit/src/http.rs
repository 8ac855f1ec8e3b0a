//! A small HTTP/1.1 client over loopback, one request per connection
//! (`Connection: close`): enough for tollgate's HTTP port, Envoy's listener
//! and admin port, and the echo upstream, with no client library between the
//! test and the bytes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An HTTP response as the client saw it.
#[derive(Debug)]
pub struct Response {
    /// The status code (0 when the status line did not parse).
    pub status: u16,
    /// Lower-case names; repeated headers joined with ", ".
    pub headers: HashMap<String, String>,
    /// The body, de-chunked.
    pub body: String,
}

impl Response {
    /// The body as JSON; panics (with the body) when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// A header by its lower-case name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// Writes `request` to `addr` and reads until the server closes, within `within`.
async fn exchange(addr: SocketAddr, request: &str, within: Duration) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(request.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(within, s.read_to_end(&mut buf))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "response timed out"))??;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The status code of a response head (0 when it does not parse).
fn status_of(head: &str) -> u16 {
    head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// One HTTP/1.1 request with `Connection: close`; handles content-length and chunked bodies.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<Response> {
    request_with_body(addr, method, path, headers, "").await
}

/// Like [`request`], sending `body` (with its `Content-Length`; 0 for a
/// method other than GET and HEAD without a body).
pub async fn request_with_body(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<Response> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n");
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    if !body.is_empty() || (method != "GET" && method != "HEAD") {
        req += &format!("Content-Length: {}\r\n", body.len());
    }
    req += "\r\n";
    req += body;
    let text = exchange(addr, &req, Duration::from_secs(10)).await?;
    let (head, raw_body) =
        text.split_once("\r\n\r\n").ok_or_else(|| std::io::Error::other(format!("no header end: {text:?}")))?;
    let mut lines = head.lines();
    let status = lines.next().map_or(0, status_of);
    let mut map: HashMap<String, String> = HashMap::new();
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_owned());
            map.entry(k).and_modify(|e| *e = format!("{e}, {v}")).or_insert(v);
        }
    }
    let body = if map.get("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        let mut out = String::new();
        let mut rest = raw_body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || after.len() < n {
                break;
            }
            out += &after[..n];
            rest = after[n..].trim_start_matches("\r\n");
        }
        out
    } else {
        raw_body.to_owned()
    };
    Ok(Response { status, headers: map, body })
}

/// A minimal GET over loopback: (status, head, body) as the server sent them;
/// status 0 when the answer has no status line.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String, String)> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let text = exchange(addr, &request, Duration::from_secs(5)).await?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Ok((status_of(head), head.to_owned(), body.to_owned()))
}

/// The value of the first `/metrics` line at `http` starting with `line_start`
/// (e.g. `tollgate_events_total{result="queued"}`); 0 when there is none.
pub async fn metric(http: SocketAddr, line_start: &str) -> f64 {
    metric_in(&http_get(http, "/metrics").await.map(|r| r.2).unwrap_or_default(), line_start)
}

/// [`metric`] read from a scrape already taken (several values of one snapshot).
pub fn metric_in(scrape: &str, line_start: &str) -> f64 {
    scrape.lines().find(|l| l.starts_with(line_start)).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0.0)
}
