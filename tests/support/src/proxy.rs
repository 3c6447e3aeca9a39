//! A TCP proxy of the test's own between farine and the broker, to inject faults without
//! touching the shared broker: [`Proxy::cut`] drops every open connection, [`Proxy::stall`]
//! stops passing bytes (a broker that hangs), [`Proxy::stall_replies`] stops only what the
//! broker sends (it takes everything and answers nothing), [`Proxy::resume`] passes them again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

struct State {
    target: SocketAddr,
    stalled: AtomicBool,
    /// Only the broker's side (broker to client) is stalled.
    replies_stalled: AtomicBool,
    resumed: Notify,
    generation: AtomicU64,
    cut: Notify,
    accepted: AtomicU64,
    /// Connections being passed on now.
    open: AtomicU64,
    closed: Notify,
}

/// A running proxy; it stops when dropped.
pub struct Proxy {
    addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy on a free local port that forwards to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy binds");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(State {
            target,
            stalled: AtomicBool::new(false),
            replies_stalled: AtomicBool::new(false),
            resumed: Notify::new(),
            generation: AtomicU64::new(0),
            cut: Notify::new(),
            accepted: AtomicU64::new(0),
            open: AtomicU64::new(0),
            closed: Notify::new(),
        });
        let accept_state = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let state = accept_state.clone();
                state.accepted.fetch_add(1, Ordering::SeqCst);
                state.open.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let _open = Open(state.clone());
                    let Ok(server) = TcpStream::connect(state.target).await else {
                        return;
                    };
                    let generation = state.generation.load(Ordering::SeqCst);
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let up = pipe(state.clone(), client_read, server_write, false);
                    let down = pipe(state.clone(), server_read, client_write, true);
                    tokio::select! {
                        _ = async { tokio::join!(up, down) } => {}
                        _ = wait_cut(&state, generation) => {}
                    }
                });
            }
        });
        Self { addr, state, task }
    }

    /// The `host:port` to give farine instead of the broker's.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts a proxy in front of the test broker: give farine
    /// [`Broker::uri_via`](crate::Broker::uri_via)`(proxy.addr())`.
    pub async fn to_broker() -> Self {
        Self::start(crate::broker_addr()).await
    }

    /// How many connections the proxy accepted so far.
    pub fn connections(&self) -> u64 {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// Drops every open connection (new ones are accepted).
    pub fn cut(&self) {
        self.state.generation.fetch_add(1, Ordering::SeqCst);
        self.state.cut.notify_waiters();
    }

    /// Stops passing bytes in both directions, connections stay open.
    pub fn stall(&self) {
        self.state.stalled.store(true, Ordering::SeqCst);
    }

    /// Stops passing what the broker sends; what the client sends still reaches the broker.
    pub fn stall_replies(&self) {
        self.state.replies_stalled.store(true, Ordering::SeqCst);
    }

    /// Passes bytes again after [`Proxy::stall`] or [`Proxy::stall_replies`].
    pub fn resume(&self) {
        self.state.stalled.store(false, Ordering::SeqCst);
        self.state.replies_stalled.store(false, Ordering::SeqCst);
        self.state.resumed.notify_waiters();
    }
}

/// Counts a connection as open until it is dropped.
struct Open(Arc<State>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
        self.0.closed.notify_waiters();
    }
}

impl Proxy {
    /// Stops for good: no new connection is accepted (the port refuses), and every open one
    /// is closed before this returns.
    pub async fn stop(self) {
        self.task.abort();
        let state = self.state.clone();
        loop {
            let closed = state.closed.notified();
            if state.open.load(Ordering::SeqCst) == 0 {
                return;
            }
            // Cut again each round: a connection accepted just before the listener stopped
            // may have started after the first cut.
            self.cut();
            let _ = tokio::time::timeout(std::time::Duration::from_millis(100), closed).await;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

async fn wait_cut(state: &State, generation: u64) {
    loop {
        let notified = state.cut.notified();
        if state.generation.load(Ordering::SeqCst) != generation {
            return;
        }
        notified.await;
    }
}

async fn pipe(
    state: Arc<State>,
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    replies: bool,
) {
    let stalled = |state: &State| {
        state.stalled.load(Ordering::SeqCst)
            || (replies && state.replies_stalled.load(Ordering::SeqCst))
    };
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        while stalled(&state) {
            let resumed = state.resumed.notified();
            if !stalled(&state) {
                break;
            }
            resumed.await;
        }
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while stalled(&state) {
            let resumed = state.resumed.notified();
            if !stalled(&state) {
                break;
            }
            resumed.await;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}
