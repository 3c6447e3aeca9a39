//! Spans exported over OTLP/HTTP with JSON encoding (feature `otlp`, config `otlp_endpoint`):
//! what an OpenTelemetry Collector, Jaeger or Tempo receives on port 4318 at `/v1/traces`.
//!
//! Written here rather than taken from the OpenTelemetry SDK: farine already makes the ids and
//! carries the context (`trace`), so exporting is a batch of finished spans posted once a
//! second, over the hyper already in the build; the SDK would bring some ninety crates, its
//! own batch thread and a second notion of the current span. Spans are sent in batches of at
//! most [`BATCH`]; when the receiver is down or slow, at most [`QUEUE`] wait, and newer ones are
//! dropped (counted in the log) rather than holding memory or slowing a handler.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::trace::{CallSpec, SpanContext, SpanKind};

/// The most spans in one request.
const BATCH: usize = 512;
/// The most spans waiting to be sent.
const QUEUE: usize = 8192;
/// How often spans are sent.
const INTERVAL: Duration = Duration::from_secs(1);
/// The bound on one request, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long spans finished while the runtime stops may still be sent.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Where finished spans go: a queue read by the exporting task. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Exporter {
    spans: mpsc::Sender<Finished>,
}

/// What a span says of its call, beside the ids and times.
#[derive(Debug, Clone)]
pub(crate) struct Attributes {
    service: &'static str,
    handler: &'static str,
    kind_name: &'static str,
    span_kind: SpanKind,
    queue: String,
    message_id: Option<String>,
}

impl Attributes {
    pub fn new(call: &CallSpec<'_>) -> Self {
        Self {
            service: call.service,
            handler: call.handler,
            kind_name: call.kind_name,
            span_kind: call.span_kind,
            queue: call.queue.to_string(),
            message_id: call.message_id.map(str::to_string),
        }
    }
}

/// A finished span.
#[derive(Debug)]
pub(crate) struct Finished {
    pub context: SpanContext,
    pub parent_span_id: Option<u64>,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Attributes,
    pub outcome: &'static str,
    pub error: Option<String>,
}

impl Exporter {
    /// Starts the task that posts spans to `endpoint` (`http://host:port`, `/v1/traces` added
    /// when there is no path); it stops a little after `shutdown`, once what was queued is
    /// sent.
    pub fn start(endpoint: &str, shutdown: CancellationToken) -> Self {
        let (spans, receiver) = mpsc::channel(QUEUE);
        let target = Target::parse(endpoint);
        tokio::spawn(export(target, receiver, shutdown));
        Self { spans }
    }

    /// Queues a finished span; dropped when the queue is full.
    pub fn send(&self, span: Finished) {
        if self.spans.try_send(span).is_err() {
            tracing::debug!("OTLP export: the queue is full; a span is dropped");
        }
    }
}

/// Where spans are posted.
#[derive(Debug, Clone)]
struct Target {
    /// `host:port`.
    authority: String,
    path: String,
}

impl Target {
    fn parse(endpoint: &str) -> Self {
        let rest = endpoint.trim_start_matches("http://");
        let (authority, path) = match rest.find('/') {
            Some(at) if rest.len() > at + 1 => (&rest[..at], rest[at..].to_string()),
            Some(at) => (&rest[..at], "/v1/traces".to_string()),
            None => (rest, "/v1/traces".to_string()),
        };
        let authority = if authority.contains(':') {
            authority.to_string()
        } else {
            format!("{authority}:4318")
        };
        Self { authority, path }
    }
}

async fn export(
    target: Target,
    mut receiver: mpsc::Receiver<Finished>,
    shutdown: CancellationToken,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Once the runtime stops: spans of the calls still draining are sent at each tick, until
    // the queue closes or the grace is over.
    let mut stop_at: Option<tokio::time::Instant> = None;
    loop {
        let last = tokio::select! {
            received = receiver.recv() => match received {
                Some(span) => {
                    batch.push(span);
                    if batch.len() < BATCH {
                        continue;
                    }
                    false
                }
                None => true,
            },
            _ = tick.tick() => false,
            _ = shutdown.cancelled(), if stop_at.is_none() => {
                stop_at = Some(tokio::time::Instant::now() + STOP_GRACE);
                false
            }
            _ = sleep_until(stop_at), if stop_at.is_some() => true,
        };
        if !batch.is_empty() {
            let spans = std::mem::take(&mut batch);
            if let Err(e) = post(&target, &spans).await {
                tracing::warn!(endpoint = %target.authority, error = %e, spans = spans.len(), "OTLP export failed; these spans are dropped");
            }
        }
        if last {
            return;
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn post(target: &Target, spans: &[Finished]) -> Result<(), String> {
    let body = serde_json::to_vec(&request(spans)).map_err(|e| e.to_string())?;
    let sent = async {
        let stream = tokio::net::TcpStream::connect(&target.authority)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let request = hyper::Request::post(&target.path)
            .header(hyper::header::HOST, &target.authority)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        // Read to the end: the receiver may say why it refused.
        let answer = response
            .into_body()
            .collect()
            .await
            .map(|body| body.to_bytes())
            .unwrap_or_default();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!(
                "the receiver answered {status}: {}",
                String::from_utf8_lossy(&answer[..answer.len().min(200)])
            ))
        }
    };
    tokio::time::timeout(REQUEST_TIMEOUT, sent)
        .await
        .map_err(|_| format!("no answer within {REQUEST_TIMEOUT:?}"))?
}

/// An `ExportTraceServiceRequest` in OTLP's JSON encoding: one resource per service.
fn request(spans: &[Finished]) -> Value {
    let mut by_service: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for span in spans {
        by_service
            .entry(span.attributes.service)
            .or_default()
            .push(encode(span));
    }
    let resources: Vec<Value> = by_service
        .into_iter()
        .map(|(service, spans)| {
            json!({
                "resource": {"attributes": [string("service.name", service)]},
                "scopeSpans": [{
                    "scope": {"name": "farine", "version": env!("CARGO_PKG_VERSION")},
                    "spans": spans,
                }],
            })
        })
        .collect();
    json!({ "resourceSpans": resources })
}

fn encode(span: &Finished) -> Value {
    let a = &span.attributes;
    let mut attributes = vec![
        string("farine.service", a.service),
        string("farine.handler", a.handler),
        string("farine.kind", a.kind_name),
        string("farine.outcome", span.outcome),
    ];
    if !a.queue.is_empty() {
        attributes.push(string("messaging.destination.name", &a.queue));
        attributes.push(string("messaging.system", "rabbitmq"));
    }
    if let Some(id) = &a.message_id {
        attributes.push(string("messaging.message.id", id));
    }
    let mut value = json!({
        "traceId": format!("{:032x}", span.context.trace_id),
        "spanId": format!("{:016x}", span.context.span_id),
        "name": format!("{} {}.{}", a.kind_name, a.service, a.handler),
        "kind": match a.span_kind {
            SpanKind::Internal => 1,
            SpanKind::Server => 2,
            SpanKind::Consumer => 5,
        },
        "startTimeUnixNano": nanos(span.start),
        "endTimeUnixNano": nanos(span.end),
        "attributes": attributes,
        "status": match &span.error {
            None if span.outcome == "ok" || span.outcome == "duplicate" => json!({"code": 1}),
            None => json!({"code": 2, "message": span.outcome}),
            Some(error) => json!({"code": 2, "message": error}),
        },
        "flags": u32::from(span.context.flags),
    });
    if let Some(parent) = span.parent_span_id {
        value["parentSpanId"] = Value::from(format!("{parent:016x}"));
    }
    if let Some(state) = &span.context.state {
        value["traceState"] = Value::from(state.as_ref());
    }
    value
}

fn string(key: &str, value: &str) -> Value {
    json!({"key": key, "value": {"stringValue": value}})
}

/// Nanoseconds since the epoch, as OTLP's JSON writes 64-bit integers: a string.
fn nanos(at: SystemTime) -> String {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_gets_the_traces_path_and_the_otlp_port_when_it_names_neither() {
        let t = Target::parse("http://collector");
        assert_eq!(
            (t.authority.as_str(), t.path.as_str()),
            ("collector:4318", "/v1/traces")
        );
        let t = Target::parse("http://127.0.0.1:9999/");
        assert_eq!(
            (t.authority.as_str(), t.path.as_str()),
            ("127.0.0.1:9999", "/v1/traces")
        );
        let t = Target::parse("http://127.0.0.1:9999/custom/traces");
        assert_eq!(t.path, "/custom/traces");
    }
}
