//! A Server-Sent-Events server of the test's own: events `1..=available` with ids, data
//! `{"n": id}`; it honours `Last-Event-ID` (sends the events after it), cuts the connection
//! once after each id listed in `cuts`, and keeps the connection open when it has no more
//! events, until [`SseServer::publish_up_to`] makes more available. [`SseServer::start_with`]
//! adds faults and quirks ([`SseOptions`]): connections that go silent, events without an id,
//! keep-alive comments.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// What an [`SseServer`] does besides serving its events ([`SseServer::start_with`]).
#[derive(Debug, Clone, Default)]
pub struct SseOptions {
    /// Cut the connection once after each of these ids.
    pub cuts: Vec<u32>,
    /// Go silent once after each of these ids: the connection stays open, but nothing more is
    /// sent on it (no event, no comment), until the client closes it.
    pub stalls: Vec<u32>,
    /// Events sent without an `id:` line (their data still says which they are).
    pub without_id: Vec<u32>,
    /// While there is no event to send, a comment (`: keep-alive`) this often.
    pub keep_alive: Option<Duration>,
}

struct State {
    available: AtomicU32,
    more: Notify,
    cuts: Mutex<BTreeSet<u32>>,
    stalls: Mutex<BTreeSet<u32>>,
    without_id: BTreeSet<u32>,
    keep_alive: Option<Duration>,
    stalls_closed: AtomicUsize,
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
        Self::start_with(
            available,
            SseOptions {
                cuts: cuts.to_vec(),
                ..SseOptions::default()
            },
        )
        .await
    }

    /// Serves events `1..=available` as `options` says.
    pub async fn start_with(available: u32, options: SseOptions) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let addr = listener.local_addr().expect("address");
        let state = Arc::new(State {
            available: AtomicU32::new(available),
            more: Notify::new(),
            cuts: Mutex::new(options.cuts.into_iter().collect()),
            stalls: Mutex::new(options.stalls.into_iter().collect()),
            without_id: options.without_id.into_iter().collect(),
            keep_alive: options.keep_alive,
            stalls_closed: AtomicUsize::new(0),
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

    /// How many of the connections that went silent (`stalls`) the client has closed.
    pub fn stalled_connections_closed(&self) -> usize {
        self.state.stalls_closed.load(Ordering::SeqCst)
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
            let id = if state.without_id.contains(&next) {
                String::new()
            } else {
                format!("id: {next}\n")
            };
            let event = format!("{id}event: number\ndata: {{\"n\": {next}}}\n\n");
            if stream.write_all(event.as_bytes()).await.is_err() {
                return;
            }
            let cut = state.cuts.lock().unwrap().remove(&next);
            let stall = state.stalls.lock().unwrap().remove(&next);
            next += 1;
            if cut {
                let _ = stream.flush().await;
                return;
            }
            if stall {
                let _ = stream.flush().await;
                // Silent from now on; the connection ends when the client closes it.
                let mut sink = [0u8; 256];
                while let Ok(1..) = stream.read(&mut sink).await {}
                state.stalls_closed.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
        let _ = stream.flush().await;
        match state.keep_alive {
            None => more.await,
            Some(every) => {
                tokio::pin!(more);
                loop {
                    tokio::select! {
                        _ = &mut more => break,
                        _ = tokio::time::sleep(every) => {
                            if stream.write_all(b": keep-alive\n\n").await.is_err() {
                                return;
                            }
                            let _ = stream.flush().await;
                        }
                    }
                }
            }
        }
    }
}
