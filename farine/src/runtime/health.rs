//! Liveness and readiness over HTTP, for an orchestrator's probes (`health_addr`, off by
//! default).
//!
//! - `GET /live`: 200 while the process runs its runtime (the event loop answers).
//! - `GET /ready`: 200 when every broker connection is open and every handler task is up
//!   (consuming, serving RPC, running); 503 otherwise, during start-up, a reconnection or a
//!   handler's restart. The body is JSON naming each handler's state.
//! - `GET /metrics`: the metrics in Prometheus' text format, when a renderer is set; 404 when
//!   none is.
//!
//! `/health/live` and `/health/ready` are the same routes; `HEAD` answers the headers of `GET`.
//!
//! The server is hyper's HTTP/1.1 connection, not a hand-written parser: probes and scrapers
//! keep connections alive, and a malformed, slow or idle client must cost one task and a bounded
//! time, never another client's answer. Each connection is served in a task of its own; reading
//! a request's head is bounded by `HEADER_READ_TIMEOUT`, which hyper also applies while a
//! kept-alive connection waits for its next request, so an idle connection is closed after it;
//! and at most `MAX_CONNECTIONS` are open at once.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Map, Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::amqp::connection::Connector;
use crate::handler::Ready;

/// How long a client may take to send a request's head, and how long a kept-alive connection
/// may wait for its next request.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The most connections served at once; further clients wait in the listener's backlog.
const MAX_CONNECTIONS: usize = 256;

/// How long open connections may take to finish their answer once the runtime stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// The content type of Prometheus' text exposition format.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders the metrics in Prometheus' text format, for `GET /metrics`.
pub(crate) type RenderMetrics = Arc<dyn Fn() -> String + Send + Sync>;

/// What readiness is made of, and what the endpoint serves besides.
pub(crate) struct Health {
    pub handlers: Vec<(&'static str, &'static str, Ready)>,
    pub connectors: Vec<Arc<Connector>>,
    /// The body of `GET /metrics`; without one, `/metrics` is 404.
    pub metrics: Option<RenderMetrics>,
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

/// Serves the health routes on `listener` until `shutdown`, then closes the open connections
/// gracefully.
pub(crate) async fn serve(listener: TcpListener, health: Arc<Health>, shutdown: CancellationToken) {
    let mut connections = JoinSet::new();
    'accept: loop {
        while connections.try_join_next().is_some() {}
        while connections.len() >= MAX_CONNECTIONS {
            tokio::select! {
                _ = connections.join_next() => {}
                _ = shutdown.cancelled() => break 'accept,
            }
        }
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: do not spin on it.
                    tracing::debug!(error = %e, "health endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        connections.spawn(connection(stream, health.clone(), shutdown.clone()));
    }
    drop(listener);
    // Each connection saw the cancellation and is finishing its answer; one still waiting for
    // a request's head is aborted when the grace ends and the set is dropped.
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
}

/// Serves one connection until the client closes it, it fails or idles out, or `shutdown`.
async fn connection(stream: TcpStream, health: Arc<Health>, shutdown: CancellationToken) {
    let service = service_fn(move |request: Request<Incoming>| {
        let response = respond(&health, request.method(), request.uri().path());
        std::future::ready(Ok::<_, Infallible>(response))
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    let served = tokio::select! {
        served = connection.as_mut() => served,
        _ = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = served {
        // A client's mistake or a timeout: hyper has answered what it could.
        tracing::debug!(error = %e, "health endpoint: connection ended");
    }
}

/// The answer to `method path` (the path without its query).
fn respond(health: &Health, method: &Method, path: &str) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        let mut response = answer(
            method,
            StatusCode::METHOD_NOT_ALLOWED,
            "application/json",
            json!({ "error": "only GET and HEAD" }).to_string(),
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let (status, body) = match path {
        "/live" | "/health/live" => (StatusCode::OK, json!({ "status": "live" })),
        "/ready" | "/health/ready" => match health.readiness() {
            (true, body) => (StatusCode::OK, body),
            (false, body) => (StatusCode::SERVICE_UNAVAILABLE, body),
        },
        "/metrics" => match &health.metrics {
            Some(render) => {
                return answer(method, StatusCode::OK, METRICS_CONTENT_TYPE, render());
            }
            None => (
                StatusCode::NOT_FOUND,
                json!({ "error": "no metrics here; try /live or /ready" }),
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            json!({ "error": "try /live or /ready" }),
        ),
    };
    answer(method, status, "application/json", body.to_string())
}

/// A response with `body` and its headers; for `HEAD`, the same headers and no body.
fn answer(
    method: &Method,
    status: StatusCode,
    content_type: &'static str,
    body: String,
) -> Response<Full<Bytes>> {
    let length = body.len();
    let body = if method == Method::HEAD {
        Bytes::new()
    } else {
        Bytes::from(body)
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
