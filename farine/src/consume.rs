//! `#[consume]`: one task per handler, consuming its queue, and where each message is settled.
//!
//! A consumer opens its own channel, sets `basic.qos` to `prefetch_count`, declares its exchange
//! and queue, and calls the handler for each delivery in a task of its own, so up to
//! `prefetch_count` messages are handled at once. The outcome settles the message
//! (`docs/consuming.md`):
//! - `Ok` (or `()`): ack;
//! - `Err` or a panic: the message is published to the handler's retry queue `<queue>.retry`
//!   with its attempt count in the `x-farine-attempt` header and a per-message TTL of
//!   `retry_delay`, then acked; the broker dead-letters it back to `<queue>` when the TTL
//!   expires, so a delay never blocks the consumer. At the `max_attempts`-th failure it is
//!   published to the dead-letter queue `<queue>.dead` with the error in `x-farine-error`, then
//!   acked. The count lives in the message, so a restart or a redelivery neither resets it nor
//!   spends it.
//! - a body that does not decode into the handler's type, or a message a parameter or a layer
//!   refused: straight to the dead-letter queue (with `dead_letter_queue = none`, rejected
//!   without requeue, for the queue's own dead-letter exchange).
//!
//! A handler that settled the message itself is not settled again. On shutdown the consumer is
//! cancelled (no new deliveries), in-flight handlers get `drain_timeout` to finish and settle,
//! then the channel is closed and the broker requeues whatever was not settled. Every broker
//! round trip here is bounded by `connect_timeout`: a broker that stops answering cannot hang
//! start-up or shutdown.

mod stream;

pub(crate) use stream::Position;
pub use stream::StreamOffset;

use std::num::{NonZeroU16, NonZeroU32};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use lapin::types::{AMQPValue, FieldTable};
use serde::de::DeserializeOwned;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::amqp::connection::Connector;
use crate::amqp::consuming::{
    ConsumeError, WindDown, basic_consume_with, connection_for, open_channel,
};
use crate::amqp::error::{BrokerError, Resource};
use crate::amqp::message::{self, Headers, Message};
use crate::amqp::publisher::{PublishError, Publisher, PublisherSettings};
use crate::amqp::topology::{
    ExchangeSettings, QueueSettings, QueueType, amqp_name, handler_queue_name, is_none,
    parse_arguments, queue_type,
};
use crate::config::{ConfigError, Section};
use crate::handler::{
    CallScope, Description, FromCall, HandlerKind, InFlight, Layers, Outcome, Ready, Rejection,
    Task, TaskEnv, TaskError,
};
use crate::observe::Observer;
use crate::observe::metrics::MessageOutcome;
use crate::observe::trace::{CallSpec, SpanKind};

/// The arguments of `#[consume(...)]`.
#[derive(Debug, Clone, Copy)]
pub struct ConsumeSpec {
    pub exchange: &'static str,
    pub routing_key: &'static str,
    pub queue: Option<&'static str>,
}

/// Everything a consumer needs, resolved from the attribute and the config at start.
#[derive(Debug, Clone)]
pub(crate) struct ConsumerPlan {
    pub service: &'static str,
    pub handler: &'static str,
    pub exchange: ExchangeSettings,
    pub queue: QueueSettings,
    pub routing_key: String,
    pub prefetch: u16,
    pub retry_delay: Duration,
    pub max_attempts: u32,
    /// Where failed messages wait `retry_delay` (`<queue>.retry`, config `retry_queue`, with
    /// `retry_queue_arguments` beside the dead-lettering back to `<queue>`); `None`
    /// (`retry_queue = none`): a failure is final, as a last attempt's is.
    pub retry_queue: Option<QueueSettings>,
    /// Where messages go after their last attempt or when they do not decode (`<queue>.dead`,
    /// config `dead_letter_queue`); `None` (`dead_letter_queue = none`): rejected without
    /// requeue, for queues with a dead-letter exchange of their own.
    pub dead_letter_queue: Option<QueueSettings>,
    pub drain_timeout: Duration,
    /// The bound on each broker round trip of set-up and shutdown (`connect_timeout`).
    pub op_timeout: Duration,
    /// `transaction = true`: the call runs in a transaction committed before the ack.
    pub transaction: bool,
    /// `inbox = true`: the message id is recorded in the same transaction; a known id is acked
    /// without running the handler.
    pub inbox: bool,
    /// `inbox_key`: the top-level field of the JSON body that identifies the message, instead
    /// of its `message_id` property.
    pub inbox_key: Option<String>,
    /// The database of each call, when the service has one (set at start).
    pub db: Option<Arc<crate::db::call::CallDb>>,
    /// `queue_type = stream`: where it is read from, and the position.
    pub stream: Option<stream::StreamPlan>,
    /// The runtime's layers, around each call (set at start).
    pub layers: Layers,
    /// The handler's metrics and the runtime's tracer (set at start).
    pub observer: Observer,
}

impl ConsumerPlan {
    pub fn from_config(
        service: &'static str,
        handler: &'static str,
        spec: &ConsumeSpec,
        section: &Section,
    ) -> Result<Self, ConfigError> {
        let scoped = section.handler(handler);
        let queue =
            QueueSettings::from_config(&scoped, spec.queue, format!("{service}.{handler}"))?;
        let mut retry_args = parse_arguments(&scoped, "retry_queue_arguments")?;
        for (name, value) in retry_arguments(&queue.name).inner() {
            retry_args.insert(name.clone(), value.clone());
        }
        let kind = queue_type(&scoped)?;
        let stream = stream::StreamPlan::from_config(&scoped, kind == Some(QueueType::Stream))?;
        // The retry and dead-letter queues are of the queue's type (a queue that survives a
        // node loss keeps its retries and dead letters too), unless their tables say one; a
        // stream's dead letters are in a queue (a replicated one).
        let companion_kind = kind.map(|kind| match kind {
            QueueType::Stream => QueueType::Quorum,
            other => other,
        });
        let companion = |name: String, arguments: FieldTable, key: &str| {
            let mut companion = QueueSettings::companion(name, queue.durable, arguments);
            if let Some(kind) = companion_kind
                && !companion.arguments.inner().contains_key("x-queue-type")
            {
                companion.set_type(&scoped, kind, key)?;
            }
            Ok::<_, ConfigError>(companion)
        };
        if kind == Some(QueueType::Quorum) {
            // A quorum retry queue dead-letters back to the queue at least once (RabbitMQ
            // 3.10+; it needs `x-overflow = reject-publish`): a retry is not lost on the way.
            for (name, value) in [
                ("x-dead-letter-strategy", "at-least-once"),
                ("x-overflow", "reject-publish"),
            ] {
                if !retry_args.inner().contains_key(name) {
                    retry_args.insert(name.into(), AMQPValue::LongString(value.into()));
                }
            }
        }
        let retry_queue = if stream.is_some() {
            // Nothing can be put back into a stream: its consumer retries in place.
            match handler_queue_name(&scoped, "retry_queue", true)? {
                Some(name) if !is_none(&name) => {
                    return Err(section.invalid(
                        &format!("{handler}.retry_queue"),
                        &name,
                        "none: a stream consumer retries a failed message in place (max_attempts, retry_delay)",
                    ));
                }
                _ => None,
            }
        } else {
            companion_name(&scoped, "retry_queue", &queue.name, "retry")?
                .map(|name| companion(name, retry_args, "retry_queue_arguments"))
                .transpose()?
        };
        let dead_args = parse_arguments(&scoped, "dead_letter_queue_arguments")?;
        let dead_letter_queue = companion_name(&scoped, "dead_letter_queue", &queue.name, "dead")?
            .map(|name| companion(name, dead_args, "dead_letter_queue_arguments"))
            .transpose()?;
        Ok(Self {
            service,
            handler,
            exchange: ExchangeSettings::from_config(&scoped, spec.exchange)?,
            queue,
            retry_queue,
            dead_letter_queue,
            routing_key: amqp_name(
                &scoped,
                "routing_key",
                scoped
                    .get_str("routing_key")?
                    .unwrap_or_else(|| spec.routing_key.to_string()),
            )?,
            prefetch: scoped
                .get_or("prefetch_count", NonZeroU16::new(10).unwrap())?
                .get(),
            retry_delay: scoped.get_or("retry_delay", Duration::from_secs(1))?,
            max_attempts: scoped
                .get_or("max_attempts", NonZeroU32::new(3).unwrap())?
                .get(),
            drain_timeout: scoped.get_or("drain_timeout", Duration::from_secs(30))?,
            op_timeout: scoped.get_or("connect_timeout", Duration::from_secs(10))?,
            transaction: scoped.get_or("transaction", false)? || scoped.get_or("inbox", false)?,
            inbox: scoped.get_or("inbox", false)?,
            inbox_key: scoped.get_str("inbox_key")?,
            db: None,
            stream,
            layers: Layers::default(),
            observer: Observer::default(),
        })
    }
}

impl ConsumerPlan {
    /// The consumer as `--list` shows it.
    pub(crate) fn describe(&self, signature: (&'static str, &'static str)) -> Description {
        let mut description =
            Description::new(self.service, self.handler, HandlerKind::Consume, signature);
        description.exchange = Some((&self.exchange).into());
        description.routing_key = Some(self.routing_key.clone());
        description.queue = Some((&self.queue).into());
        description.settings = vec![
            format!("prefetch {}", self.prefetch),
            match (&self.stream, &self.retry_queue) {
                (Some(stream), _) => format!(
                    "stream from {}, retried in place (x{})",
                    stream.start_from, self.max_attempts
                ),
                (None, Some(retry)) => format!("retries {} (x{})", retry.name, self.max_attempts),
                (None, None) => "no retries (retry_queue = none)".to_string(),
            },
            format!("dead letters {}", dead_letter(self)),
        ];
        description
    }
}

/// The names of the queue and the dead-letter queue (`None`: `dead_letter_queue = none`) of
/// handler `handler` of `service`, as [`ConsumerPlan::from_config`] resolves them from
/// `section` (`declared`: the attribute's `queue`, when known). For a tool that does not link
/// the service (`farine dead-letters` without `--start`): the queue named in the code is then
/// unknown and the default naming applies.
pub(crate) fn queue_names(
    section: &Section,
    service: &str,
    handler: &str,
    declared: Option<&str>,
) -> Result<(String, Option<String>), ConfigError> {
    let scoped = section.handler(handler);
    let queue = QueueSettings::from_config(&scoped, declared, format!("{service}.{handler}"))?;
    let dead = companion_name(&scoped, "dead_letter_queue", &queue.name, "dead")?;
    Ok((queue.name, dead))
}

/// The name of a companion queue (option `key`): the handler's own value (`<handler>.<key>`),
/// `None` for `none`, else `<queue>.<suffix>`. A name is read only per handler (two handlers
/// must not share a retry queue), but `none` may be set for the whole service.
fn companion_name(
    scoped: &crate::config::HandlerSection<'_>,
    key: &str,
    queue: &str,
    suffix: &str,
) -> Result<Option<String>, ConfigError> {
    let name = match handler_queue_name(scoped, key, true)? {
        Some(name) if is_none(&name) => return Ok(None),
        Some(name) => name,
        None => format!("{queue}.{suffix}"),
    };
    amqp_name(scoped, key, name).map(Some)
}

/// The arguments of a retry queue: expired messages go back to `queue` through the default
/// exchange.
fn retry_arguments(queue: &str) -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-dead-letter-exchange".into(),
        lapin::types::AMQPValue::LongString("".into()),
    );
    arguments.insert(
        "x-dead-letter-routing-key".into(),
        lapin::types::AMQPValue::LongString(queue.into()),
    );
    arguments
}

/// The message handle, as a `#[consume]` handler parameter (by value or by reference).
impl FromCall<Message> for Message {
    fn from_call(message: &Message) -> Result<Self, Rejection> {
        Ok(message.clone())
    }
}

/// The message's headers.
impl FromCall<Message> for Headers {
    fn from_call(message: &Message) -> Result<Self, Rejection> {
        Ok(Headers::from(message.headers()))
    }
}

/// The body: any type that deserializes, decoded from the message's JSON body; a body that
/// does not decode is a rejection (the message goes to the dead-letter queue).
impl<T: DeserializeOwned> FromCall<Message> for T {
    fn from_call(message: &Message) -> Result<Self, Rejection> {
        Ok(message.decode()?)
    }
}

/// A `#[consume]` handler bound to its service: the generated code's function, the service
/// instance captured.
pub(crate) type Call = Arc<dyn Fn(Message) -> BoxFuture<'static, Outcome> + Send + Sync>;

/// The supervised task of one consumer.
pub(crate) fn task(
    mut plan: ConsumerPlan,
    call: Call,
    connector: Arc<Connector>,
    env: &TaskEnv,
) -> Task {
    let (service, handler) = (plan.service, plan.handler);
    let stop_bound = plan.drain_timeout + plan.op_timeout * 3;
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
                connector.clone(),
                call.clone(),
                env.scope.clone(),
                env.shutdown.clone(),
                ready,
            );
            let connector = connector.clone();
            Box::pin(async move {
                run.await
                    .map_err(|e| TaskError::new(&e, e.is_outage(&connector)))
            })
        }),
    }
}

/// Runs one consumer until shutdown (`Ok`) or until its channel fails (`Err`).
pub(crate) async fn run(
    plan: Arc<ConsumerPlan>,
    connector: Arc<Connector>,
    call: Call,
    scope: CallScope,
    shutdown: CancellationToken,
    ready: Ready,
) -> Result<(), ConsumeError> {
    let Some(conn) = connection_for(&connector, ready.pending(), &shutdown).await? else {
        return Ok(());
    };
    let broker = connector.broker();
    // A stream is read from a position: this run's, and the consumer argument that asks for it.
    let (stream_run, arguments) = match &plan.stream {
        Some(stream) => {
            let (run, arguments) = stream::Run::open(&plan, stream)
                .await
                .map_err(ConsumeError::Checkpoint)?;
            (Some(run), arguments)
        }
        None => (None, FieldTable::default()),
    };
    let (channel, mut consumer) =
        tokio::time::timeout(plan.op_timeout, set_up(&plan, &conn, &broker, arguments))
            .await
            .map_err(|_| ConsumeError::Timeout(plan.op_timeout).on(&conn))?
            .map_err(|e| e.on(&conn))?;
    let tag = consumer.tag();
    tracing::info!(
        service = plan.service,
        handler = plan.handler,
        queue = %plan.queue.name,
        exchange = %plan.exchange.name,
        routing_key = %plan.routing_key,
        prefetch = plan.prefetch,
        "consuming"
    );
    ready.signal(Ok(()));
    let stop_writer = CancellationToken::new();
    let writer = stream_run
        .as_ref()
        .map(|run| run.checkpoint_writer(plan.clone(), stop_writer.clone()));

    // Failed messages go to the retry and dead-letter queues through the default exchange.
    let retry = Publisher::new(
        connector.clone(),
        ExchangeSettings::default_exchange(),
        plan.queue.name.clone(),
        PublisherSettings {
            persistent: true,
            timeout: plan.op_timeout,
            declare_exchange: false,
            mandatory: true,
            max_message_bytes: usize::MAX,
            ..PublisherSettings::default()
        },
    );
    let companions = Arc::new(Companions {
        retry: retry.clone(),
        channel: channel.clone(),
        broker: broker.clone(),
    });
    let mut in_flight = InFlight::Tasks(JoinSet::new());
    // One future for the whole loop, not one per message.
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    let stopped = loop {
        tokio::select! {
            biased;
            () = &mut cancelled => break Ok(()),
            Some(_) = in_flight.next(), if !in_flight.is_empty() => {}
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let message = Message::new(delivery);
                    if let Some(run) = &stream_run {
                        match run.admit(&plan, &message) {
                            stream::Admit::Handle(offset) => {
                                let task = Box::pin(stream::handle(plan.clone(), message, offset, call.clone(), run.clone(), companions.clone(), shutdown.clone()));
                                in_flight.push(scope.enter(task));
                            }
                            // Before the position: only the credit is given back.
                            stream::Admit::Skip => if let Err(e) = message.ack().await {
                                tracing::debug!(service = plan.service, handler = plan.handler, error = %e, "could not ack a skipped message");
                            },
                        }
                        continue;
                    }
                    let handled = call(message.clone());
                    // Boxed at once: the call's future is large, and is moved on from here.
                    let task = Box::pin(handle(plan.clone(), message, handled, companions.clone(), shutdown.clone()));
                    in_flight.push(scope.enter(task));
                }
                Some(Err(e)) => break Err(ConsumeError::Broker(BrokerError::from_lapin(&e, Resource::Queue(plan.queue.name.clone()), &broker)).on(&conn)),
                None => break Err(ConsumeError::Ended.on(&conn)),
            },
        }
    };

    let wind_down = WindDown {
        service: plan.service,
        handler: plan.handler,
        channel: &channel,
        op_timeout: plan.op_timeout,
    };
    if stopped.is_ok() {
        wind_down.cancel(tag).await;
        in_flight
            .drain(plan.drain_timeout, plan.service, plan.handler)
            .await;
    }
    // Handlers still running now cannot settle on a broken channel: their messages come back.
    in_flight.stop().await;
    if let (Some(run), Some(writer)) = (&stream_run, writer) {
        stop_writer.cancel();
        let _ = writer.await;
        run.close(&plan).await;
    }
    wind_down.close(&retry).await;
    stopped
}

/// Opens the consumer's channel, declares its topology (exchange, queue and binding, retry and
/// dead-letter queues) and starts consuming.
async fn set_up(
    plan: &ConsumerPlan,
    conn: &crate::amqp::transport::Connection,
    broker: &str,
    arguments: FieldTable,
) -> Result<
    (
        crate::amqp::transport::Channel,
        crate::amqp::transport::Consumer,
    ),
    ConsumeError,
> {
    let channel = open_channel(conn, broker, plan.prefetch).await?;
    plan.exchange.declare(&channel, broker).await?;
    plan.queue
        .declare_and_bind(&channel, broker, &plan.exchange, &plan.routing_key)
        .await?;
    if let Some(retry) = &plan.retry_queue {
        retry.declare(&channel, broker).await?;
    }
    if let Some(dead) = &plan.dead_letter_queue {
        dead.declare(&channel, broker).await?;
    }
    let consumer = basic_consume_with(&channel, broker, &plan.queue.name, arguments).await?;
    Ok((channel, consumer))
}

/// What a failed message is sent on: the publisher to the retry and dead-letter queues, and the
/// consumer's channel, to declare them again if someone deleted them.
struct Companions {
    retry: Publisher,
    channel: crate::amqp::transport::Channel,
    broker: String,
}

async fn handle(
    plan: Arc<ConsumerPlan>,
    message: Message,
    handled: BoxFuture<'static, Outcome>,
    companions: Arc<Companions>,
    shutdown: CancellationToken,
) {
    let (outcome, call) = observe(&plan, &message, handled).await;
    let settled = settle(
        &plan,
        &message,
        outcome,
        message.attempt(),
        &companions,
        &shutdown,
    )
    .await;
    call.end(&plan, settled);
}

/// One call of the handler on `message` (`handled`), inside the inbox, the transaction and the
/// layers, traced and timed: its outcome, and the call to end once the message is settled.
async fn observe(
    plan: &ConsumerPlan,
    message: &Message,
    handled: BoxFuture<'static, Outcome>,
) -> (Outcome, ObservedCall) {
    let id = inbox_id(plan, message);
    let spec = CallSpec {
        service: plan.service,
        handler: plan.handler,
        kind_name: "consume",
        span_kind: SpanKind::Consumer,
        queue: &plan.queue.name,
        message_id: message.message_id(),
    };
    let mut span = plan.observer.tracer.start(spec, || message.trace_parent());
    let started = plan
        .observer
        .metrics
        .as_ref()
        .map(|_| std::time::Instant::now());
    let duplicate = std::sync::atomic::AtomicBool::new(false);
    // The layers are around the whole call: the inbox, the transaction and its commit, so what
    // they see is what settles the message.
    let called = async {
        match crate::db::call::around(plan.db.as_deref(), id.as_deref(), handled).await {
            crate::db::call::Called::Ran(outcome) => outcome,
            crate::db::call::Called::Duplicate => {
                tracing::info!(
                    service = plan.service,
                    handler = plan.handler,
                    message_id = id.as_deref().unwrap_or(""),
                    "already handled (the id is in the inbox): acked without running the handler again"
                );
                duplicate.store(true, std::sync::atomic::Ordering::Relaxed);
                Outcome::Done
            }
        }
    };
    let kind = (plan.service, plan.handler, HandlerKind::Consume);
    let layered = plan.layers.around(kind, message, called);
    let outcome = match &span {
        Some(span) => span.run(layered).await,
        None => layered.await,
    };
    if let (Some(metrics), Some(started)) = (&plan.observer.metrics, started) {
        metrics.took(started.elapsed());
    }
    if let Some(span) = &mut span {
        span.failed(|| outcome.error());
    }
    let duplicate = duplicate.load(std::sync::atomic::Ordering::Relaxed);
    (outcome, ObservedCall { span, duplicate })
}

/// A call whose message is not settled yet: its span, and whether the inbox knew the message.
struct ObservedCall {
    span: Option<crate::observe::trace::CallSpan>,
    duplicate: bool,
}

impl ObservedCall {
    /// Counts the message as `settled` and ends the span.
    fn end(self, plan: &ConsumerPlan, mut settled: MessageOutcome) {
        if settled == MessageOutcome::Ok && self.duplicate {
            settled = MessageOutcome::Duplicate;
        }
        if let Some(metrics) = &plan.observer.metrics {
            metrics.message(settled);
        }
        if let Some(span) = self.span {
            span.end(settled.label());
        }
    }
}

/// The id the inbox records for `message`: the `inbox_key` field of its body, else its
/// `message_id`, else for a stream's message `<queue>@<offset>`; `None` (no deduplication, logged) when it has neither.
fn inbox_id(plan: &ConsumerPlan, message: &Message) -> Option<String> {
    if !plan.inbox {
        return None;
    }
    let id = match &plan.inbox_key {
        Some(key) => serde_json::from_slice::<serde_json::Value>(message.body())
            .ok()
            .and_then(|body| match body.get(key) {
                Some(serde_json::Value::String(text)) => Some(text.clone()),
                Some(serde_json::Value::Null) | None => None,
                Some(other) => Some(other.to_string()),
            }),
        // A stream's message without an id is known by its place in the stream.
        None => message.message_id().map(str::to_string).or_else(|| {
            plan.stream.as_ref()?;
            stream::offset_of(message).map(|offset| format!("{}@{offset}", plan.queue.name))
        }),
    };
    if id.is_none() {
        tracing::warn!(
            service = plan.service,
            handler = plan.handler,
            delivery_tag = message.delivery_tag(),
            "a message without an id cannot be deduplicated by the inbox; handled as is"
        );
    }
    id
}

/// Settles `message` after its `attempt`-th call ended with `outcome`.
async fn settle(
    plan: &ConsumerPlan,
    message: &Message,
    outcome: Outcome,
    attempt: u32,
    companions: &Companions,
    shutdown: &CancellationToken,
) -> MessageOutcome {
    let (service, handler, delivery_tag) = (plan.service, plan.handler, message.delivery_tag());
    let (error, target) = match outcome {
        Outcome::Done => {
            if !message.is_settled()
                && let Err(e) = message.ack().await
            {
                tracing::warn!(service, handler, delivery_tag, error = %e, "could not ack a message");
            }
            return MessageOutcome::Ok;
        }
        _ if message.is_settled() => {
            tracing::error!(
                service,
                handler,
                delivery_tag,
                "handler failed after settling its message"
            );
            return MessageOutcome::Dead;
        }
        Outcome::Undecodable(error) => {
            tracing::warn!(
                service,
                handler,
                delivery_tag,
                reason = %error,
                dead_letter = dead_letter(plan),
                "a message whose body does not decode is dead-lettered"
            );
            (error.to_string(), Target::Dead("undecodable"))
        }
        Outcome::Rejected(reason) => {
            tracing::warn!(
                service,
                handler,
                delivery_tag,
                %reason,
                dead_letter = dead_letter(plan),
                "a message a parameter refused is dead-lettered"
            );
            (reason, Target::Dead("rejected"))
        }
        Outcome::Failed(error) if attempt >= plan.max_attempts || plan.retry_queue.is_none() => {
            tracing::error!(
                service,
                handler,
                delivery_tag,
                attempt,
                error = %error,
                dead_letter = dead_letter(plan),
                "handler failed on the last attempt: the message is dead-lettered"
            );
            (error, Target::Dead("failed"))
        }
        Outcome::Failed(error) => {
            tracing::warn!(
                service,
                handler,
                delivery_tag,
                attempt,
                error = %error,
                retry_in = ?plan.retry_delay,
                "handler failed: the message will be retried"
            );
            (error, Target::Retry)
        }
    };
    let mut settled = match target {
        Target::Retry => MessageOutcome::Retry,
        Target::Dead("failed") => MessageOutcome::Dead,
        Target::Dead(_) => MessageOutcome::Rejected,
    };
    let result = match (&target, &plan.dead_letter_queue) {
        // Nothing leaves a stream: the ack gives the credit back, and the position moves on.
        (Target::Dead(_), None) if plan.stream.is_some() => message.ack().await,
        (Target::Dead(_), None) => message.reject(false).await,
        // Boxed: a cold path whose publish future would make every call's future larger.
        _ => match Box::pin(forward(plan, message, attempt, &error, &target, companions)).await {
            Ok(()) => message.ack().await,
            // A stream cannot take the message back: the copy is made again until it is taken
            // (or the process stops: the message is read again at the next start).
            Err(e) if plan.stream.is_some() => {
                tracing::warn!(service, handler, delivery_tag, error = %e, "could not copy the failed message to the dead-letter queue; trying again");
                loop {
                    tokio::select! {
                        () = tokio::time::sleep(plan.retry_delay) => {}
                        () = shutdown.cancelled() => return MessageOutcome::Retry,
                    }
                    match Box::pin(forward(plan, message, attempt, &error, &target, companions))
                        .await
                    {
                        Ok(()) => break message.ack().await,
                        Err(e) => {
                            tracing::debug!(service, handler, delivery_tag, error = %e, "the dead-letter copy failed again");
                        }
                    }
                }
            }
            Err(e) => {
                // Nothing is lost: the message goes back to its queue, after a pause so that a
                // broker refusing the copy cannot make it spin.
                tracing::warn!(service, handler, delivery_tag, error = %e, "could not move the failed message; it is requeued");
                tokio::select! {
                    _ = tokio::time::sleep(plan.retry_delay) => {}
                    _ = shutdown.cancelled() => {}
                }
                // It comes back: handled again, as a retry is.
                settled = MessageOutcome::Retry;
                message.nack(true).await
            }
        },
    };
    if let Err(e) = result {
        tracing::warn!(service, handler, delivery_tag, error = %e, "could not settle a message");
    }
    settled
}

/// Where a dead letter goes, for the log and `--list`: the dead-letter queue, or rejected
/// without requeue.
fn dead_letter(plan: &ConsumerPlan) -> &str {
    plan.dead_letter_queue
        .as_ref()
        .map_or("rejected (dead_letter_queue = none)", |queue| {
            queue.name.as_str()
        })
}

/// Where a failed message goes.
enum Target {
    /// The retry queue, to come back after `retry_delay`.
    Retry,
    /// The dead-letter queue, with the reason (`failed`, `undecodable`, `rejected`).
    Dead(&'static str),
}

/// Publishes the failed message's copy after its `attempt`-th call to the retry or dead-letter
/// queue and waits for the confirm; declares the queue again when it is gone (someone deleted
/// it), once.
async fn forward(
    plan: &ConsumerPlan,
    message: &Message,
    attempt: u32,
    error: &str,
    target: &Target,
    companions: &Companions,
) -> Result<(), PublishError> {
    let (queue, copy) = match (target, &plan.retry_queue, &plan.dead_letter_queue) {
        (Target::Retry, Some(retry), _) => (
            retry,
            message::Copy::retry(message, attempt + 1, error, plan.retry_delay),
        ),
        (Target::Dead(reason), _, Some(dead)) => (
            dead,
            message::Copy::dead(message, attempt, error, reason, &plan.queue.name),
        ),
        // `handle` sends neither: a retry without a retry queue is a last failure, and a dead
        // letter without a dead-letter queue is rejected.
        _ => unreachable!("no queue for a failed message's copy"),
    };
    match companions.retry.send_copy(&queue.name, &copy).await {
        Err(PublishError::Broker(BrokerError::NoRoute { .. })) => {
            queue
                .declare(&companions.channel, &companions.broker)
                .await?;
            companions.retry.send_copy(&queue.name, &copy).await
        }
        other => other,
    }
}
