//! Liveness and readiness over HTTP, for an orchestrator's probes (`health_addr`, off by
//! default).
//!
//! - `GET /live`: 200 while the process runs its runtime (the event loop answers).
//! - `GET /ready`: 200 when every broker connection is open and every handler task is up
//!   (consuming, serving RPC, running); 503 otherwise, during start-up, a reconnection or a
//!   handler's restart. The body is JSON naming each handler's state.
//!
//! The server is a few lines over a TCP listener rather than a web framework: two fixed routes,
//! one request per connection, bounded reads.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::amqp::connection::Connector;
use crate::handler::Ready;

/// What readiness is made of.
pub(crate) struct Health {
    pub handlers: Vec<(&'static str, &'static str, Ready)>,
    pub connectors: Vec<Arc<Connector>>,
}

impl Health {
    /// Whether the process is ready, and the detail.
    pub fn readiness(&self) -> (bool, Value) {
        let connected = self.connectors.iter().all(|c| c.is_connected());
        let mut handlers = Map::new();
        let mut all_up = true;
        for (service, handler, ready) in &self.handlers {
            let up = ready.is_up();
            all_up &= up;
            handlers.insert(
                format!("{service}.{handler}"),
                Value::from(if up { "up" } else { "down" }),
            );
        }
        let ready = connected && all_up;
        let body = json!({
            "status": if ready { "ready" } else { "not ready" },
            "broker": if connected { "connected" } else { "disconnected" },
            "handlers": handlers,
        });
        (ready, body)
    }
}

/// Serves `/live` and `/ready` on `listener` until `shutdown`.
pub(crate) async fn serve(listener: TcpListener, health: Arc<Health>, shutdown: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, say: do not spin on it.
                    tracing::debug!(error = %e, "health endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let health = health.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), answer(stream, &health)).await;
        });
    }
}

async fn answer(mut stream: TcpStream, health: &Health) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(512);
    let mut buffer = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
        let read = stream.read(&mut buffer).await?;
        if read == 0 {
            break;
        }
        request.extend_from_slice(&buffer[..read]);
    }
    let line = String::from_utf8_lossy(&request);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET" | "HEAD", "/live" | "/health/live") => (200, json!({ "status": "live" })),
        ("GET" | "HEAD", "/ready" | "/health/ready") => match health.readiness() {
            (true, body) => (200, body),
            (false, body) => (503, body),
        },
        ("GET" | "HEAD", _) => (404, json!({ "error": "try /live or /ready" })),
        _ => (405, json!({ "error": "only GET" })),
    };
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let body = body.to_string();
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\ncache-control: no-store\r\n\r\n{}",
        body.len(),
        if method == "HEAD" { "" } else { body.as_str() }
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
