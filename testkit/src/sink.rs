//! An HTTP event sink for tests: takes CloudEvents batches as OpenMeter's
//! ingest does, keeps every event it was sent, and can be stopped (its port
//! refuses connections) and started again on the same port.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// What the sink received.
#[derive(Debug, Default)]
pub struct Received {
    /// Every event of every accepted batch, in order (duplicates included).
    pub events: Vec<serde_json::Value>,
    /// Each accepted batch's headers.
    pub headers: Vec<HeaderMap>,
    /// Each accepted batch's raw body.
    pub bodies: Vec<String>,
}

/// A running (or stopped) sink.
pub struct Sink {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it received.
    pub received: Arc<Mutex<Received>>,
    /// Set while stopped: connections kept alive from before answer 503.
    down: Arc<std::sync::atomic::AtomicBool>,
    /// A batch with an event of this subject is refused with 400 (a sink that rejects an event for good).
    pub refuse_subject: Arc<Mutex<Option<String>>>,
    task: Option<JoinHandle<()>>,
}

impl Sink {
    /// A sink on a free loopback port.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Received::default()));
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let refuse_subject = Arc::new(Mutex::new(None));
        let task = Some(serve(listener, received.clone(), down.clone(), refuse_subject.clone()));
        Self { addr, received, down, refuse_subject, task }
    }

    /// The URL to configure as `events.sink.url`.
    pub fn url(&self) -> String {
        format!("http://{}/api/v1/events", self.addr)
    }

    /// Stops listening: connections are refused until [`Sink::resume`].
    pub fn stop(&mut self) {
        self.down.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// Listens again on the same port.
    pub async fn resume(&mut self) {
        self.stop();
        let listener = TcpListener::bind(self.addr).await.expect("rebind the sink's port");
        self.down.store(false, std::sync::atomic::Ordering::SeqCst);
        self.task = Some(serve(listener, self.received.clone(), self.down.clone(), self.refuse_subject.clone()));
    }

    /// Every event received, deduplicated by id (as a sink keyed on ids keeps them).
    pub fn unique(&self) -> Vec<serde_json::Value> {
        let r = self.received.lock().unwrap();
        let mut seen = std::collections::HashSet::new();
        r.events.iter().filter(|e| seen.insert(e["id"].as_str().unwrap_or_default().to_owned())).cloned().collect()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(
    listener: TcpListener,
    received: Arc<Mutex<Received>>,
    down: Arc<std::sync::atomic::AtomicBool>,
    refuse_subject: Arc<Mutex<Option<String>>>,
) -> JoinHandle<()> {
    let app = axum::Router::new().fallback(move |headers: HeaderMap, body: Bytes| {
        let (received, down, refuse) = (received.clone(), down.clone(), refuse_subject.clone());
        async move {
            if down.load(std::sync::atomic::Ordering::SeqCst) {
                return StatusCode::SERVICE_UNAVAILABLE;
            }
            let text = String::from_utf8_lossy(&body).into_owned();
            let Ok(serde_json::Value::Array(events)) = serde_json::from_str::<serde_json::Value>(&text) else {
                return StatusCode::BAD_REQUEST;
            };
            let refused = refuse.lock().unwrap().clone();
            if let Some(subject) = refused
                && events.iter().any(|e| e["subject"] == subject.as_str())
            {
                return StatusCode::BAD_REQUEST;
            }
            let mut r = received.lock().unwrap();
            r.events.extend(events);
            r.headers.push(headers);
            r.bodies.push(text);
            StatusCode::NO_CONTENT
        }
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    })
}
