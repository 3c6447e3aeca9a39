//! Consuming: one task per `#[consume]` handler, and where each message gets settled.
//!
//! A consumer opens its own channel, sets `basic.qos` to `prefetch_count`, declares its exchange
//! and queue, and calls the handler for each delivery in a task of its own, so up to
//! `prefetch_count` messages are handled at once. The outcome settles the message
//! (`docs/consuming.md`):
//! - `Ok` (or `()`): ack;
//! - a body that does not decode into the handler's type: reject without requeue;
//! - `Err` or a panic: the message is published to the handler's retry queue `<queue>.retry`
//!   with its attempt count in the `x-farine-attempt` header and a per-message TTL of
//!   `retry_delay`, then acked; the broker dead-letters it back to `<queue>` when the TTL
//!   expires, so a delay never blocks the consumer. At the `max_attempts`-th failure it is
//!   published to the dead-letter queue `<queue>.dead` with the error in `x-farine-error`, then
//!   acked. The count lives in the message, so a restart or a redelivery neither resets it nor
//!   spends it.
//! - a body that does not decode: straight to the dead-letter queue.
//!
//! A handler that settled the message itself is not settled again. On shutdown the consumer is
//! cancelled (no new deliveries), in-flight handlers get `drain_timeout` to finish and settle,
//! then the channel is closed and the broker requeues whatever was not settled. Every broker
//! round trip here is bounded by `connect_timeout`: a broker that stops answering cannot hang
//! start-up or shutdown.

use std::fmt::Display;
use std::num::{NonZeroU16, NonZeroU32};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::connection::{ConnectError, Connector};
use super::error::{BrokerError, Resource};
use super::message::{DecodeError, Message};
use super::publisher::{PublishError, Publisher, PublisherSettings};
use super::topology::{ExchangeSettings, QueueSettings, parse_arguments};
use crate::config::{ConfigError, Section};
use crate::registry::ConsumeSpec;
use crate::runtime::context::{self, Shared};
use crate::runtime::supervisor::Ready;

/// How a handler call ended, as the generated code reports it.
#[derive(Debug)]
pub enum Outcome {
    Done,
    Failed(String),
    Undecodable(DecodeError),
}

/// What a `#[consume]` handler may return: `()` or `Result<(), E>` with a displayable `E`.
#[diagnostic::on_unimplemented(
    message = "a #[consume] handler returns `Result<(), E>` with E: Display, or nothing; `{Self}` is neither",
    label = "Ok acks the message, Err retries it: return `Result<(), E>` where E: Display"
)]
pub trait IntoOutcome {
    fn into_outcome(self) -> Outcome;
}

impl IntoOutcome for () {
    fn into_outcome(self) -> Outcome {
        Outcome::Done
    }
}

impl<E: Display> IntoOutcome for Result<(), E> {
    fn into_outcome(self) -> Outcome {
        match self {
            Ok(()) => Outcome::Done,
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }
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
    /// `retry_queue_arguments` beside the dead-lettering back to `<queue>`).
    pub retry_queue: QueueSettings,
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
        let retry_queue = QueueSettings::companion(
            scoped
                .get_own_str("retry_queue")?
                .unwrap_or_else(|| format!("{}.retry", queue.name)),
            queue.durable,
            retry_args,
        );
        let dead_args = parse_arguments(&scoped, "dead_letter_queue_arguments")?;
        let dead_letter_queue = match scoped.get_own_str("dead_letter_queue")? {
            Some(name) if name.trim().eq_ignore_ascii_case("none") => None,
            Some(name) => Some(name),
            None => Some(format!("{}.dead", queue.name)),
        }
        .map(|name| QueueSettings::companion(name, queue.durable, dead_args));
        Ok(Self {
            service,
            handler,
            exchange: ExchangeSettings::from_config(&scoped, spec.exchange)?,
            queue,
            retry_queue,
            dead_letter_queue,
            routing_key: scoped
                .get_str("routing_key")?
                .unwrap_or_else(|| spec.routing_key.to_string()),
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
        })
    }
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

/// Why a consumer stopped (the supervisor restarts it).
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("the broker cancelled the consumer or closed its channel")]
    Ended,
    #[error("the broker did not answer within {0:?} while the consumer was set up")]
    Timeout(Duration),
    /// The connection went away under the consumer: it resumes once farine reconnected.
    #[error("the connection to the broker was lost: {0}")]
    ConnectionLost(String),
}

impl ConsumeError {
    /// True when the task stopped because the connection went away, not through a fault of
    /// its own: the supervisor does not count it against the restart limit.
    pub(crate) fn connection_lost(&self) -> bool {
        matches!(self, ConsumeError::ConnectionLost(_))
    }

    /// This error, or `ConnectionLost` when the connection `conn` is no longer open: only the
    /// connection's state says so, not the error's kind (a channel error on a live connection
    /// is the task's own failure).
    pub(crate) fn on(self, conn: &lapin::Connection) -> Self {
        if conn.status().connected() || self.connection_lost() {
            self
        } else {
            ConsumeError::ConnectionLost(self.to_string())
        }
    }
}

/// The connection a consuming task starts on: on its first start one round of attempts (a
/// broker that is down fails start-up), on a restart as long as it takes to reconnect.
pub(crate) async fn connection_for(
    connector: &Connector,
    ready: &Ready,
    shutdown: &CancellationToken,
) -> Result<Option<Arc<lapin::Connection>>, ConsumeError> {
    if ready.pending() {
        return Ok(Some(connector.connection().await?));
    }
    tokio::select! {
        conn = connector.connection_until(None) => Ok(Some(conn?)),
        _ = shutdown.cancelled() => Ok(None),
    }
}

type Call = Arc<dyn Fn(Message) -> BoxFuture<'static, Outcome> + Send + Sync>;

/// Runs one consumer until shutdown (`Ok`) or until its channel fails (`Err`).
pub(crate) async fn run(
    plan: Arc<ConsumerPlan>,
    connector: Arc<Connector>,
    call: Call,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    ready: Ready,
) -> Result<(), ConsumeError> {
    let Some(conn) = connection_for(&connector, &ready, &shutdown).await? else {
        return Ok(());
    };
    let broker = connector.broker();
    let (channel, mut consumer) =
        tokio::time::timeout(plan.op_timeout, set_up(&plan, &conn, &broker))
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

    // Failed messages go to the retry and dead-letter queues through the default exchange.
    let retry = Publisher::new(
        connector.clone(),
        ExchangeSettings::default_exchange(),
        plan.retry_queue.name.clone(),
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
                    let handled = call(message.clone());
                    // Boxed at once: the call's future is large, and is moved on from here.
                    let task = Box::pin(handle(plan.clone(), message, handled, companions.clone(), shutdown.clone()));
                    in_flight.push(context::scope(shared.clone(), task));
                }
                Some(Err(e)) => break Err(ConsumeError::Broker(BrokerError::from_lapin(&e, Resource::Queue(plan.queue.name.clone()), &broker)).on(&conn)),
                None => break Err(ConsumeError::Ended.on(&conn)),
            },
        }
    };

    WindDown {
        service: plan.service,
        handler: plan.handler,
        channel: &channel,
        drain_timeout: plan.drain_timeout,
        op_timeout: plan.op_timeout,
    }
    .run(stopped.is_ok().then_some(tag), &mut in_flight, &retry)
    .await;
    stopped
}

/// The handler calls a consuming task has under way.
///
/// A consumer spawns each call as a task of its own (`Tasks`): calls run in parallel on every
/// worker thread, which a consumer's work (decoding, database writes) can use. An RPC server
/// polls its calls within its own task (`Local`): a call's reply then goes out without the
/// cross-thread wake-up a spawned task costs, which is most of an RPC's latency on a loaded
/// machine (`BENCHMARKS.md`); calls still run concurrently, and a method that computes for long
/// belongs in `spawn_blocking`.
pub(crate) enum InFlight {
    Tasks(JoinSet<()>),
    Local(futures_util::stream::FuturesUnordered<BoxFuture<'static, ()>>),
}

impl InFlight {
    pub fn push(&mut self, call: impl std::future::Future<Output = ()> + Send + 'static) {
        match self {
            InFlight::Tasks(tasks) => {
                tasks.spawn(call);
            }
            InFlight::Local(calls) => {
                // A panic that escaped the call's own guard must not end the server's loop.
                let guarded =
                    futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(call));
                calls.push(Box::pin(async move {
                    let _ = guarded.await;
                }));
            }
        }
    }

    /// The next call to finish (`None` when there is none).
    pub async fn next(&mut self) -> Option<()> {
        match self {
            InFlight::Tasks(tasks) => tasks.join_next().await.map(|_| ()),
            InFlight::Local(calls) => calls.next().await,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            InFlight::Tasks(tasks) => tasks.len(),
            InFlight::Local(calls) => calls.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops every call still under way.
    async fn stop(&mut self) {
        match self {
            InFlight::Tasks(tasks) => tasks.shutdown().await,
            InFlight::Local(calls) => calls.clear(),
        }
    }
}

/// How a consuming task (a consumer, an RPC server) stops: shared by both.
pub(crate) struct WindDown<'a> {
    pub service: &'static str,
    pub handler: &'static str,
    pub channel: &'a lapin::Channel,
    pub drain_timeout: Duration,
    pub op_timeout: Duration,
}

impl WindDown<'_> {
    /// On a clean stop (`tag`), cancels the consumer (no new deliveries) and lets the in-flight
    /// tasks finish within the drain timeout; then stops whatever still runs (the broker
    /// requeues its messages), closes `publisher` and the channel. Every broker round trip is
    /// bounded by `op_timeout`.
    pub async fn run(
        self,
        tag: Option<lapin::types::ShortString>,
        in_flight: &mut InFlight,
        publisher: &Publisher,
    ) {
        let (service, handler) = (self.service, self.handler);
        if let Some(tag) = tag {
            let cancel = self
                .channel
                .basic_cancel(tag, BasicCancelOptions::default());
            if let Ok(Err(e)) = tokio::time::timeout(self.op_timeout, cancel).await {
                tracing::debug!(service, handler, error = %e, "cancelling the consumer");
            }
            let drained = tokio::time::timeout(self.drain_timeout, async {
                while in_flight.next().await.is_some() {}
            })
            .await;
            if drained.is_err() {
                tracing::warn!(
                    service,
                    handler,
                    unfinished = in_flight.len(),
                    drain_timeout = ?self.drain_timeout,
                    "handlers still running at the end of the drain timeout are stopped; the broker requeues their messages"
                );
            }
        }
        // Handlers still running now cannot settle on a broken channel: their messages come back.
        in_flight.stop().await;
        publisher.close_within(self.op_timeout).await;
        if self.channel.status().connected() {
            let close = self.channel.close(200, "farine handler stopped".into());
            let _ = tokio::time::timeout(self.op_timeout, close).await;
        }
    }
}

/// Opens a channel with `basic.qos(prefetch)` on `conn` (a connection to `broker`).
pub(crate) async fn open_channel(
    conn: &lapin::Connection,
    broker: &str,
    prefetch: u16,
) -> Result<lapin::Channel, BrokerError> {
    let channel_err = |e: lapin::Error| BrokerError::from_lapin(&e, Resource::Channel, broker);
    let channel = conn.create_channel().await.map_err(channel_err)?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(channel_err)?;
    Ok(channel)
}

/// Starts consuming `queue` on `channel`.
pub(crate) async fn basic_consume(
    channel: &lapin::Channel,
    broker: &str,
    queue: &str,
) -> Result<lapin::Consumer, BrokerError> {
    channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| BrokerError::from_lapin(&e, Resource::Queue(queue.to_string()), broker))
}

/// Opens the consumer's channel, declares its topology (exchange, queue and binding, retry and
/// dead-letter queues) and starts consuming.
async fn set_up(
    plan: &ConsumerPlan,
    conn: &lapin::Connection,
    broker: &str,
) -> Result<(lapin::Channel, lapin::Consumer), ConsumeError> {
    let channel = open_channel(conn, broker, plan.prefetch).await?;
    plan.exchange.declare(&channel, broker).await?;
    plan.queue
        .declare_and_bind(&channel, broker, &plan.exchange, &plan.routing_key)
        .await?;
    plan.retry_queue.declare(&channel, broker).await?;
    if let Some(dead) = &plan.dead_letter_queue {
        dead.declare(&channel, broker).await?;
    }
    let consumer = basic_consume(&channel, broker, &plan.queue.name).await?;
    Ok((channel, consumer))
}

/// What a failed message is sent on: the publisher to the retry and dead-letter queues, and the
/// consumer's channel, to declare them again if someone deleted them.
struct Companions {
    retry: Publisher,
    channel: lapin::Channel,
    broker: String,
}

async fn handle(
    plan: Arc<ConsumerPlan>,
    message: Message,
    handled: BoxFuture<'static, Outcome>,
    companions: Arc<Companions>,
    shutdown: CancellationToken,
) {
    let id = inbox_id(&plan, &message);
    let outcome = match crate::db::call::around(plan.db.as_deref(), id.as_deref(), handled).await {
        crate::db::call::Called::Ran(outcome) => outcome,
        crate::db::call::Called::Duplicate => {
            tracing::info!(
                service = plan.service,
                handler = plan.handler,
                message_id = id.as_deref().unwrap_or(""),
                "already handled (the id is in the inbox): acked without running the handler again"
            );
            Outcome::Done
        }
    };
    settle(&plan, &message, outcome, &companions, &shutdown).await;
}

/// The id the inbox records for `message`: the `inbox_key` field of its body, else its
/// `message_id`; `None` (no deduplication, logged) when it has neither.
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
        None => message.message_id().map(str::to_string),
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

async fn settle(
    plan: &ConsumerPlan,
    message: &Message,
    outcome: Outcome,
    companions: &Companions,
    shutdown: &CancellationToken,
) {
    let (service, handler, delivery_tag) = (plan.service, plan.handler, message.delivery_tag());
    let attempt = message.attempt();
    let (error, target) = match outcome {
        Outcome::Done => {
            if !message.is_settled()
                && let Err(e) = message.ack().await
            {
                tracing::warn!(service, handler, delivery_tag, error = %e, "could not ack a message");
            }
            return;
        }
        _ if message.is_settled() => {
            tracing::error!(
                service,
                handler,
                delivery_tag,
                "handler failed after settling its message"
            );
            return;
        }
        Outcome::Undecodable(error) => {
            tracing::warn!(
                service,
                handler,
                delivery_tag,
                reason = %error,
                "a message whose body does not decode goes to the dead-letter queue"
            );
            (error.to_string(), Target::Dead("undecodable"))
        }
        Outcome::Failed(error) if attempt >= plan.max_attempts => {
            tracing::error!(
                service,
                handler,
                delivery_tag,
                attempt,
                error = %error,
                "handler failed on the last attempt: the message goes to the dead-letter queue"
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
    let result = match (&target, &plan.dead_letter_queue) {
        (Target::Dead(_), None) => message.reject(false).await,
        // Boxed: a cold path whose publish future would make every call's future larger.
        _ => match Box::pin(forward(plan, message, &error, &target, companions)).await {
            Ok(()) => message.ack().await,
            Err(e) => {
                // Nothing is lost: the message goes back to its queue, after a pause so that a
                // broker refusing the copy cannot make it spin.
                tracing::warn!(service, handler, delivery_tag, error = %e, "could not move the failed message; it is requeued");
                tokio::select! {
                    _ = tokio::time::sleep(plan.retry_delay) => {}
                    _ = shutdown.cancelled() => {}
                }
                message.nack(true).await
            }
        },
    };
    if let Err(e) = result {
        tracing::warn!(service, handler, delivery_tag, error = %e, "could not settle a message");
    }
}

/// Where a failed message goes.
enum Target {
    /// The retry queue, to come back after `retry_delay`.
    Retry,
    /// The dead-letter queue, with the reason (`failed`, `undecodable`).
    Dead(&'static str),
}

/// Publishes the failed message's copy to the retry or dead-letter queue and waits for the
/// confirm; declares the queue again when it is gone (someone deleted it), once.
async fn forward(
    plan: &ConsumerPlan,
    message: &Message,
    error: &str,
    target: &Target,
    companions: &Companions,
) -> Result<(), PublishError> {
    let (queue, copy) = match target {
        Target::Retry => (
            &plan.retry_queue,
            super::message::Copy::retry(message, message.attempt() + 1, error, plan.retry_delay),
        ),
        Target::Dead(reason) => (
            plan.dead_letter_queue.as_ref().unwrap_or(&plan.retry_queue),
            super::message::Copy::dead(message, error, reason, &plan.queue.name),
        ),
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

/// The text of a panic payload (`panic!("...")` gives a `&str` or a `String`).
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_string()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic with a non-text payload".to_string()
    }
}
