//! A Server-Sent-Events server of the test's own: events `1..=available` with ids, data
//! `{"n": id}`; it honours `Last-Event-ID` (sends the events after it), cuts the connection
//! once after each id listed in `cuts`, and keeps the connection open when it has no more
//! events, until [`SseServer::publish_up_to`] makes more available.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

struct State {
    available: AtomicU32,
    more: Notify,
    cuts: Mutex<BTreeSet<u32>>,
    requests: Mutex<Vec<(Option<String>, String)>>,
}

/// A running SSE server; it stops when dropped.
pub struct SseServer {
    addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl SseServer {
    /// Serves events `1..=available`, cutting the connection once after each id in `cuts`.
    pub async fn start(available: u32, cuts: &[u32]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let addr = listener.local_addr().expect("address");
        let state = Arc::new(State {
            available: AtomicU32::new(available),
            more: Notify::new(),
            cuts: Mutex::new(cuts.iter().copied().collect()),
            requests: Mutex::new(Vec::new()),
        });
        let accept_state = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, accept_state.clone()));
            }
        });
        Self { addr, state, task }
    }

    /// The events URL.
    pub fn url(&self) -> String {
        format!("http://{}/events", self.addr)
    }

    /// Makes events up to `last` available (sent to connected clients at once).
    pub fn publish_up_to(&self, last: u32) {
        self.state.available.store(last, Ordering::SeqCst);
        self.state.more.notify_waiters();
    }

    /// The `Last-Event-ID` of each request received so far (`None`: none sent).
    pub fn requests(&self) -> Vec<Option<String>> {
        self.state
            .requests
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.0.clone())
            .collect()
    }

    /// The head (request line and headers) of each request received so far.
    pub fn request_heads(&self) -> Vec<String> {
        self.state
            .requests
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.1.clone())
            .collect()
    }
}

impl Drop for SseServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut stream: TcpStream, state: Arc<State>) {
    let mut request = Vec::new();
    let mut buffer = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buffer[..n]),
        }
    }
    let text = String::from_utf8_lossy(&request);
    let last = text.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("last-event-id")
            .then(|| value.trim().to_string())
    });
    state
        .requests
        .lock()
        .unwrap()
        .push((last.clone(), text.to_string()));
    let mut next = last.and_then(|id| id.parse::<u32>().ok()).unwrap_or(0) + 1;
    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\nconnection: close\r\n\r\n";
    if stream.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    loop {
        let more = state.more.notified();
        while next <= state.available.load(Ordering::SeqCst) {
            let event = format!("id: {next}\nevent: number\ndata: {{\"n\": {next}}}\n\n");
            if stream.write_all(event.as_bytes()).await.is_err() {
                return;
            }
            let cut = state.cuts.lock().unwrap().remove(&next);
            next += 1;
            if cut {
                let _ = stream.flush().await;
                return;
            }
        }
        let _ = stream.flush().await;
        more.await;
    }
}
