//! `#[stream::http]`: a handler for each event of an HTTP Server-Sent-Events stream.
//!
//! The endpoint is the service section's `endpoint` (handler-scoped keys allowed), with request
//! headers from `headers` (one `Name: value` per line). Events are handled one at a time, in
//! order. The position is the id of the last event the handler finished: on a disconnect farine
//! reconnects with backoff and sends it as `Last-Event-ID`, so nothing is skipped and nothing is
//! handled twice; when the service has a database, the position is also saved there
//! (`farine_checkpoint`), so a restarted process resumes where the last one stopped. Without a
//! database the position lives in memory, for the life of the process. A fresh start begins at
//! `start_from`: `end` (no `Last-Event-ID`: what the server sends live), `beginning`
//! (`Last-Event-ID: 0`) or an event id.
//!
//! A handler error is retried with backoff (`retry_delay`, doubling) up to `max_attempts`; then
//! `on_error = skip` (default) logs it and moves on, `on_error = stop` fails the handler's task,
//! which the supervisor restarts from the last position (and counts towards its limit).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventsource_client::{self as es, Client as _, SSE};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

pub(crate) mod feed;

use crate::config::{ConfigError, Section, redact};
use crate::db::checkpoint::Checkpoint;
use crate::decode::DecodeError;
use crate::handler::{
    CallScope, Connected, Description, FromCall, HandlerKind, Layers, Outcome, Ready, Rejection,
    Task, TaskEnv, TaskError,
};
use crate::observe::Observer;
use crate::observe::trace::{CallSpec, SpanKind};

/// What a `#[stream::http]` handler looks like once the macro wrapped it.
pub type SseFn<S> = fn(Arc<S>, Event) -> BoxFuture<'static, Outcome>;

pub(crate) type BoundSse = Arc<dyn Fn(Event) -> BoxFuture<'static, Outcome> + Send + Sync>;

/// One event of the stream, as a handler can ask for it. Cheap to clone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    inner: Arc<es::Event>,
}

impl Event {
    /// An event (tests).
    pub fn new(id: Option<&str>, event_type: &str, data: &str) -> Self {
        Self {
            inner: Arc::new(es::Event {
                event_type: event_type.to_string(),
                data: data.to_string(),
                id: id.map(str::to_string),
                retry: None,
            }),
        }
    }

    /// The event's id: the last id the server set on this connection (SSE's `lastEventId`, so
    /// an event sent without an id line carries the id of the one before it), or `None` when
    /// none was set since the connection opened.
    pub fn id(&self) -> Option<&str> {
        self.inner.id.as_deref()
    }

    /// The event's type (`message` when the server named none).
    pub fn event_type(&self) -> &str {
        &self.inner.event_type
    }

    /// The event's data, as text.
    pub fn data(&self) -> &str {
        &self.inner.data
    }

    /// The data decoded from JSON into `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, DecodeError> {
        serde_json::from_str(self.data()).map_err(|e| DecodeError {
            type_name: std::any::type_name::<T>(),
            cause: e.to_string(),
        })
    }
}

/// The id of the event being handled (see [`Event::id`]), as a handler parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventId(pub Option<String>);

/// The type of the event being handled (`message` when the server named none), as a handler
/// parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventType(pub String);

/// The event handle, as a `#[stream::http]` handler parameter (by value or by reference).
impl FromCall<Event> for Event {
    fn from_call(event: &Event) -> Result<Self, Rejection> {
        Ok(event.clone())
    }
}

impl FromCall<Event> for EventId {
    fn from_call(event: &Event) -> Result<Self, Rejection> {
        Ok(EventId(event.id().map(str::to_string)))
    }
}

impl FromCall<Event> for EventType {
    fn from_call(event: &Event) -> Result<Self, Rejection> {
        Ok(EventType(event.event_type().to_string()))
    }
}

/// The data: a `String` takes it as it is; any other type that deserializes is decoded from
/// JSON, and data that does not decode is a rejection (the event is skipped and logged).
impl<T: DeserializeOwned + 'static> FromCall<Event> for T {
    fn from_call(event: &Event) -> Result<Self, Rejection> {
        use std::any::{Any, TypeId};
        if TypeId::of::<T>() == TypeId::of::<String>() {
            let mut raw = Some(event.data().to_string());
            if let Some(text) = (&mut raw as &mut dyn Any).downcast_mut::<Option<T>>() {
                return text
                    .take()
                    .ok_or_else(|| Rejection::new("the data was taken twice"));
            }
        }
        Ok(event.decode()?)
    }
}

/// Where a fresh start (no position yet) begins.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StartFrom {
    /// No `Last-Event-ID`: what the server sends to a new subscriber.
    End,
    /// `Last-Event-ID: 0`: for servers numbering events from 1, everything.
    Beginning,
    /// `Last-Event-ID: <id>`: the events after this one.
    After(String),
}

/// What happens when a handler still fails after `max_attempts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnError {
    /// Log the event and its error, and go on with the next.
    Skip,
    /// Fail the handler's task: the supervisor restarts it from the last position.
    Stop,
}

/// Everything a listener needs, from its section.
#[derive(Debug, Clone)]
pub(crate) struct SsePlan {
    pub service: &'static str,
    pub handler: &'static str,
    pub endpoint: String,
    pub headers: Vec<(String, String)>,
    pub start_from: StartFrom,
    pub reconnect_delay: Duration,
    pub reconnect_delay_max: Duration,
    pub max_attempts: u32,
    pub retry_delay: Duration,
    pub on_error: OnError,
    pub use_checkpoint: bool,
    /// Bounds on connecting and on the silence between two reads (`connect_timeout`,
    /// `read_timeout`): past them the connection is dropped and reopened.
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    /// `transaction = true`: each call runs in a transaction, committed when it succeeds.
    pub transaction: bool,
    /// The database of each call, when the service has one (set at start).
    pub db: Option<Arc<crate::db::call::CallDb>>,
    /// The runtime's layers, around each call (set at start).
    pub layers: Layers,
    /// The handler's metrics and the runtime's tracer (set at start).
    pub observer: Observer,
}

impl SsePlan {
    pub fn from_config(
        service: &'static str,
        handler: &'static str,
        section: &Section,
    ) -> Result<Self, ConfigError> {
        let scoped = section.handler(handler);
        let endpoint = match scoped.get_str("endpoint")? {
            Some(endpoint) => endpoint,
            None => section.require::<String>("endpoint")?,
        };
        let memory = endpoint
            .strip_prefix("memory://")
            .is_some_and(|name| !name.is_empty());
        if !memory
            && (!endpoint.starts_with("http://") || es::ClientBuilder::for_url(&endpoint).is_err())
        {
            return Err(section.invalid(
                "endpoint",
                &endpoint,
                "an http:// URL (https is not supported yet), or memory://<feed> in tests",
            ));
        }
        let mut headers = Vec::new();
        for line in scoped.get_str("headers")?.unwrap_or_default().lines() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let Some((name, value)) = line.split_once(':') else {
                return Err(section.invalid("headers", "****", "one `Name: value` per line"));
            };
            let name = name.trim();
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
            {
                return Err(section.invalid(
                    "headers",
                    "****",
                    "one `Name: value` per line, with a valid header name",
                ));
            }
            headers.push((name.to_string(), value.trim().to_string()));
        }
        let start_from = match scoped.get_str("start_from")?.as_deref().map(str::trim) {
            None | Some("end") => StartFrom::End,
            Some("beginning") => StartFrom::Beginning,
            Some(id) => StartFrom::After(id.to_string()),
        };
        let on_error = match scoped.get_str("on_error")?.as_deref().map(str::trim) {
            None | Some("skip") => OnError::Skip,
            Some("stop") => OnError::Stop,
            Some(other) => return Err(section.invalid("on_error", other, "`skip` or `stop`")),
        };
        Ok(Self {
            service,
            handler,
            endpoint,
            headers,
            start_from,
            reconnect_delay: scoped.get_or("reconnect_delay", Duration::from_millis(100))?,
            reconnect_delay_max: scoped.get_or("reconnect_delay_max", Duration::from_secs(30))?,
            max_attempts: scoped
                .get_or("max_attempts", std::num::NonZeroU32::new(3).unwrap())?
                .get(),
            retry_delay: scoped.get_or("retry_delay", Duration::from_secs(1))?,
            on_error,
            use_checkpoint: scoped.get_or("checkpoint", true)?,
            connect_timeout: scoped.get_or("connect_timeout", Duration::from_secs(10))?,
            read_timeout: scoped.get_or("read_timeout", Duration::from_secs(300))?,
            transaction: scoped.get_or("transaction", false)?,
            db: None,
            layers: Layers::default(),
            observer: Observer::default(),
        })
    }
}

/// The position of a listener: in memory across restarts of its task, in the database (when
/// there is one) across restarts of the process.
#[derive(Clone, Default)]
pub(crate) struct Position {
    last: Arc<Mutex<Option<String>>>,
    checkpoint: Option<Checkpoint>,
}

impl Position {
    pub fn new(checkpoint: Option<Checkpoint>) -> Self {
        Self {
            last: Arc::default(),
            checkpoint,
        }
    }

    fn get(&self) -> Option<String> {
        self.last.lock().ok().and_then(|last| last.clone())
    }

    async fn start(&self, plan: &SsePlan) -> Result<Option<String>, SseError> {
        if let Some(last) = self.get() {
            return Ok(Some(last));
        }
        if let Some(checkpoint) = &self.checkpoint
            && let Some(saved) = checkpoint
                .load()
                .await
                .map_err(|e| SseError::Checkpoint(e.to_string()))?
        {
            return Ok(Some(saved));
        }
        Ok(match &plan.start_from {
            StartFrom::End => None,
            StartFrom::Beginning => Some("0".to_string()),
            StartFrom::After(id) => Some(id.clone()),
        })
    }

    async fn advance(&self, id: &str) -> Result<(), SseError> {
        if let Some(checkpoint) = &self.checkpoint {
            checkpoint
                .save(id)
                .await
                .map_err(|e| SseError::Checkpoint(e.to_string()))?;
        }
        if let Ok(mut last) = self.last.lock() {
            *last = Some(id.to_string());
        }
        Ok(())
    }
}

/// Why a listener's task failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SseError {
    #[error(
        "the handler failed on event {id:?} after {attempts} attempts (on_error = stop): {cause}"
    )]
    Handler {
        id: Option<String>,
        attempts: u32,
        cause: String,
    },
    #[error("the checkpoint could not be read or saved: {0}")]
    Checkpoint(String),
}

/// The supervised task of one listener, resuming from `position`. A run that failed while the
/// broker was away (a publish that timed out) is the outage's doing, not the handler's.
pub(crate) fn task(
    mut plan: SsePlan,
    call: BoundSse,
    position: Position,
    connected: Connected,
    env: &TaskEnv,
) -> Task {
    let (service, handler) = (plan.service, plan.handler);
    // A listener finishes the event in hand: it gets a drain like the other handlers.
    let stop_bound = Duration::from_secs(30);
    plan.layers = env.layers.clone();
    plan.observer = env.observe.handler(service, handler);
    let plan = Arc::new(plan);
    let env = env.clone();
    Task {
        service,
        handler,
        stop_bound,
        start: Box::new(move |ready| {
            let run = run(
                plan.clone(),
                call.clone(),
                position.clone(),
                env.scope.clone(),
                env.shutdown.clone(),
                ready,
            );
            let connected = connected.clone();
            Box::pin(async move { run.await.map_err(|e| TaskError::new(e, !connected())) })
        }),
    }
}

/// A listener as `--list` shows it: its endpoint (without credentials), or that none is
/// configured yet.
pub(crate) fn describe(
    service: &'static str,
    handler: &'static str,
    section: &Section,
    signature: (&'static str, &'static str),
) -> Description {
    let endpoint = section
        .handler(handler)
        .get_str("endpoint")
        .ok()
        .flatten()
        .map_or_else(
            || "(no endpoint configured)".to_string(),
            |e| display_endpoint(&e),
        );
    let mut description = Description::new(service, handler, HandlerKind::Sse, signature);
    description.settings = vec![format!("endpoint {endpoint}")];
    description
}

/// Listens until shutdown; returns `Err` only for `on_error = stop` and checkpoint failures.
pub(crate) async fn run(
    plan: Arc<SsePlan>,
    call: BoundSse,
    position: Position,
    scope: CallScope,
    shutdown: CancellationToken,
    ready: Ready,
) -> Result<(), SseError> {
    ready.signal(Ok(()));
    let (service, handler) = (plan.service, plan.handler);
    let endpoint = display_endpoint(&plan.endpoint);
    let mut delay = plan.reconnect_delay;
    loop {
        let last = position.start(&plan).await?;
        match events(&plan, last.as_deref()) {
            Err(e) => {
                tracing::warn!(service, handler, endpoint = %endpoint, error = %e, "cannot build the SSE request")
            }
            Ok(mut events) => {
                tracing::info!(service, handler, endpoint = %endpoint, last_event_id = ?last, "listening");
                loop {
                    let next = tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        next = events.next() => next,
                    };
                    match next {
                        Some(Ok(Some(event))) => {
                            let event = Event {
                                inner: Arc::new(event),
                            };
                            handle(&plan, &call, &scope, &event, &shutdown).await?;
                            if let Some(id) = event.id() {
                                position.advance(id).await?;
                            }
                            delay = plan.reconnect_delay;
                        }
                        Some(Ok(None)) => {}
                        Some(Err(e)) => {
                            tracing::warn!(service, handler, endpoint = %endpoint, error = %e, retry_in = ?delay, "SSE stream interrupted; reconnecting");
                            break;
                        }
                        None => {
                            tracing::warn!(service, handler, endpoint = %endpoint, retry_in = ?delay, "SSE stream ended; reconnecting");
                            break;
                        }
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
        delay = (delay * 2).min(plan.reconnect_delay_max);
    }
}

/// The endpoint for logs: without its query string (which may carry a token) and password.
pub(crate) fn display_endpoint(endpoint: &str) -> String {
    let without_query = endpoint.split(['?', '#']).next().unwrap_or(endpoint);
    redact::redact_uri(without_query)
}

/// The stream of the endpoint from after `last`: an event, `None` for what carries no event
/// (the connection opening, a comment), or why the stream broke.
fn events(
    plan: &SsePlan,
    last: Option<&str>,
) -> Result<BoxStream<'static, Result<Option<es::Event>, String>>, String> {
    if let Some(name) = plan.endpoint.strip_prefix("memory://") {
        return Ok(feed::Feed::named(name)
            .read(last)
            .map(|e| Ok(Some(e)))
            .boxed());
    }
    let client = client(plan, last)?;
    Ok(client
        .stream()
        .map(|next| match next {
            Ok(SSE::Event(event)) => Ok(Some(event)),
            Ok(SSE::Connected(_)) => Ok(None),
            Ok(SSE::Comment(_)) => Ok(None),
            Err(e) => Err(e.to_string()),
        })
        .boxed())
}

fn client(plan: &SsePlan, last: Option<&str>) -> Result<impl es::Client, String> {
    let mut builder = es::ClientBuilder::for_url(&plan.endpoint)
        .map_err(|e| e.to_string())?
        // farine reconnects itself, from the last event the handler finished.
        .reconnect(es::ReconnectOptions::reconnect(false).build());
    for (name, value) in &plan.headers {
        builder = builder
            .header(name, value)
            .map_err(|_| format!("header `{name}` is not a valid HTTP header"))?;
    }
    if let Some(last) = last {
        builder = builder.last_event_id(last.to_string());
    }
    // Bounded: a silent or half-open connection errors out and is reconnected.
    let transport = launchdarkly_sdk_transport::HyperTransport::builder()
        .connect_timeout(plan.connect_timeout)
        .read_timeout(plan.read_timeout)
        .build_http()
        .map_err(|e| e.to_string())?;
    Ok(builder.build_with_transport(transport))
}

/// Runs the handler on one event, with retries; `Err` only for `on_error = stop`.
async fn handle(
    plan: &SsePlan,
    call: &BoundSse,
    scope: &CallScope,
    event: &Event,
    shutdown: &CancellationToken,
) -> Result<(), SseError> {
    let (service, handler) = (plan.service, plan.handler);
    if let Some(metrics) = &plan.observer.metrics {
        metrics.sse_event();
    }
    let mut delay = plan.retry_delay;
    for attempt in 1..=plan.max_attempts {
        let called = async {
            match crate::db::call::around(plan.db.as_deref(), None, call(event.clone())).await {
                crate::db::call::Called::Ran(outcome) => outcome,
                crate::db::call::Called::Duplicate => Outcome::Done,
            }
        };
        let kind = (plan.service, plan.handler, HandlerKind::Sse);
        // The endpoint is left out of the span: its URL may carry a token.
        let span = plan.observer.tracer.start(
            CallSpec {
                service,
                handler,
                kind_name: "sse",
                span_kind: SpanKind::Internal,
                queue: "",
                message_id: event.id(),
            },
            || None,
        );
        let started = std::time::Instant::now();
        let layered = scope.enter(plan.layers.around(kind, event, called));
        let outcome = match &span {
            Some(span) => span.run(layered).await,
            None => layered.await,
        };
        outcome.observed(&plan.observer, started, span);
        let error = match outcome {
            Outcome::Done => return Ok(()),
            Outcome::Undecodable(error) => {
                tracing::warn!(service, handler, event_id = ?event.id(), reason = %error, "skipped an event whose data does not decode");
                return Ok(());
            }
            Outcome::Rejected(reason) => {
                tracing::warn!(service, handler, event_id = ?event.id(), %reason, "skipped an event a parameter refused");
                return Ok(());
            }
            Outcome::Failed(error) => error,
        };
        if shutdown.is_cancelled() {
            // Stopping: the event stays unhandled and the position where it was.
            return Err(SseError::Handler {
                id: event.id().map(str::to_string),
                attempts: attempt,
                cause: error,
            });
        }
        if attempt == plan.max_attempts {
            return match plan.on_error {
                OnError::Skip => {
                    tracing::error!(service, handler, event_id = ?event.id(), attempts = attempt, error = %error, "handler failed on an event: skipped (on_error = skip)");
                    Ok(())
                }
                OnError::Stop => Err(SseError::Handler {
                    id: event.id().map(str::to_string),
                    attempts: attempt,
                    cause: error,
                }),
            };
        }
        tracing::warn!(service, handler, event_id = ?event.id(), attempt, error = %error, retry_in = ?delay, "handler failed on an event; retrying");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => {}
        }
        delay *= 2;
    }
    Ok(())
}
