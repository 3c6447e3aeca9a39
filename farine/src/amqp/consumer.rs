//! Consuming: one task per `#[consume]` handler, and where each message gets settled.
//!
//! A consumer opens its own channel, sets `basic.qos` to `prefetch_count`, declares its exchange
//! and queue, and calls the handler for each delivery in a task of its own, so up to
//! `prefetch_count` messages are handled at once. The outcome settles the message
//! (`docs/consuming.md`):
//! - `Ok` (or `()`): ack;
//! - a body that does not decode into the handler's type: reject without requeue;
//! - `Err` or a panic: after `retry_delay`, the message is published again to the tail of its
//!   queue with its attempt count in the `x-farine-attempt` header, then acked; at the
//!   `max_attempts`-th failure it is rejected without requeue (dead-lettered when the queue has
//!   a dead-letter exchange). The count lives in the message, so a restart or a redelivery
//!   neither resets it nor spends it.
//!
//! A handler that settled the message itself is not settled again. On shutdown the consumer is
//! cancelled (no new deliveries), in-flight handlers get `drain_timeout` to finish and settle,
//! then the channel is closed and the broker requeues whatever was not settled. Every broker
//! round trip here is bounded by `connect_timeout`: a broker that stops answering cannot hang
//! start-up or shutdown.

use std::fmt::Display;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::connection::{ConnectError, Connector};
use super::message::{DecodeError, Message};
use super::publisher::{Publisher, PublisherSettings};
use super::topology::{ExchangeSettings, QueueSettings, TopologyError};
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
        Ok(Self {
            service,
            handler,
            exchange: ExchangeSettings::from_config(&scoped, spec.exchange)?,
            queue: QueueSettings::from_config(&scoped, spec.queue, format!("{service}.{handler}"))?,
            routing_key: scoped
                .get_str("routing_key")?
                .unwrap_or_else(|| spec.routing_key.to_string()),
            prefetch: match scoped.get_or("prefetch_count", 10u16)? {
                0 => {
                    return Err(section.invalid(
                        "prefetch_count",
                        "0",
                        "a whole number from 1 to 65535 (0 would mean no limit)",
                    ));
                }
                n => n,
            },
            retry_delay: scoped.get_or("retry_delay", Duration::from_secs(1))?,
            max_attempts: match scoped.get_or("max_attempts", 3u32)? {
                0 => {
                    return Err(section.invalid("max_attempts", "0", "a whole number, 1 or more"));
                }
                n => n,
            },
            drain_timeout: scoped.get_or("drain_timeout", Duration::from_secs(30))?,
            op_timeout: scoped.get_or("connect_timeout", Duration::from_secs(10))?,
            transaction: scoped.get_or("transaction", false)? || scoped.get_or("inbox", false)?,
            inbox: scoped.get_or("inbox", false)?,
            inbox_key: scoped.get_str("inbox_key")?,
            db: None,
        })
    }
}

/// Why a consumer stopped (the supervisor restarts it).
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error("channel error: {0}")]
    Channel(String),
    #[error("the broker cancelled the consumer or closed its channel")]
    Ended,
    #[error("the broker did not answer within {0:?} while the consumer was set up")]
    Timeout(Duration),
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
    let (channel, mut consumer) = tokio::time::timeout(plan.op_timeout, set_up(&plan, &connector))
        .await
        .map_err(|_| ConsumeError::Timeout(plan.op_timeout))??;
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

    // Failed messages go back to the tail of their queue through the default exchange.
    let retry = Publisher::new(
        connector.clone(),
        ExchangeSettings::default_exchange(),
        plan.queue.name.clone(),
        PublisherSettings {
            persistent: true,
            timeout: plan.op_timeout,
            declare_exchange: false,
        },
    );
    let mut in_flight = JoinSet::new();
    let stopped = loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let message = Message::new(delivery);
                    let handled = call(message.clone());
                    let task = handle(plan.clone(), message, handled, retry.clone(), shutdown.clone());
                    in_flight.spawn(context::scope(shared.clone(), task));
                }
                Some(Err(e)) => break Err(ConsumeError::Channel(e.to_string())),
                None => break Err(ConsumeError::Ended),
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
        in_flight: &mut JoinSet<()>,
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
                while in_flight.join_next().await.is_some() {}
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
        in_flight.shutdown().await;
        publisher.close_within(self.op_timeout).await;
        if self.channel.status().connected() {
            let close = self.channel.close(200, "farine handler stopped".into());
            let _ = tokio::time::timeout(self.op_timeout, close).await;
        }
    }
}

/// Opens a channel with `basic.qos(prefetch)` on the connector's connection.
pub(crate) async fn open_channel(
    connector: &Connector,
    prefetch: u16,
) -> Result<lapin::Channel, ConsumeError> {
    let conn = connector.connection().await?;
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| TopologyError::Channel(e.to_string()))?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| ConsumeError::Channel(e.to_string()))?;
    Ok(channel)
}

/// Opens the consumer's channel, declares its topology and starts consuming.
async fn set_up(
    plan: &ConsumerPlan,
    connector: &Connector,
) -> Result<(lapin::Channel, lapin::Consumer), ConsumeError> {
    let channel_err = |e: lapin::Error| ConsumeError::Channel(e.to_string());
    let channel = open_channel(connector, plan.prefetch).await?;
    plan.exchange.declare(&channel).await?;
    plan.queue
        .declare_and_bind(&channel, &plan.exchange, &plan.routing_key)
        .await?;
    let consumer = channel
        .basic_consume(
            plan.queue.name.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(channel_err)?;
    Ok((channel, consumer))
}

async fn handle(
    plan: Arc<ConsumerPlan>,
    message: Message,
    handled: BoxFuture<'static, Outcome>,
    retry: Publisher,
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
    settle(&plan, &message, outcome, &retry, &shutdown).await;
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
    retry: &Publisher,
    shutdown: &CancellationToken,
) {
    let (service, handler, delivery_tag) = (plan.service, plan.handler, message.delivery_tag());
    let result = match outcome {
        Outcome::Done => {
            if message.is_settled() {
                return;
            }
            message.ack().await
        }
        Outcome::Undecodable(error) => {
            tracing::warn!(
                service,
                handler,
                delivery_tag,
                reason = %error,
                "rejected a message whose body does not decode (not requeued)"
            );
            if message.is_settled() {
                return;
            }
            message.reject(false).await
        }
        Outcome::Failed(error) => {
            if message.is_settled() {
                tracing::error!(service, handler, delivery_tag, error = %error, "handler failed after settling its message");
                return;
            }
            let attempt = message.attempt();
            if attempt >= plan.max_attempts {
                tracing::error!(
                    service,
                    handler,
                    delivery_tag,
                    attempt,
                    error = %error,
                    "handler failed on the last attempt: message rejected without requeue (dead-lettered if the queue has a dead-letter exchange)"
                );
                message.reject(false).await
            } else {
                tracing::warn!(
                    service,
                    handler,
                    delivery_tag,
                    attempt,
                    error = %error,
                    retry_in = ?plan.retry_delay,
                    "handler failed: the message will be retried"
                );
                let waited = tokio::select! {
                    _ = tokio::time::sleep(plan.retry_delay) => true,
                    _ = shutdown.cancelled() => false,
                };
                if !waited {
                    // Shutting down: give the message back as it is (its count unchanged).
                    message.nack(true).await
                } else {
                    match retry.republish(message, attempt + 1, &error).await {
                        Ok(()) => message.ack().await,
                        Err(e) => {
                            tracing::warn!(service, handler, delivery_tag, error = %e, "could not publish the retry: the message is requeued");
                            message.nack(true).await
                        }
                    }
                }
            }
        }
    };
    if let Err(e) = result {
        tracing::warn!(service, handler, delivery_tag, error = %e, "could not settle a message");
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
