//! Consuming: one task per `#[consume]` handler, and where each message gets settled.
//!
//! A consumer opens its own channel, sets `basic.qos` to `prefetch_count`, declares its exchange
//! and queue, and calls the handler for each delivery in a task of its own, so up to
//! `prefetch_count` messages are handled at once. The outcome settles the message
//! (`docs/consuming.md`):
//! - `Ok` (or `()`): ack;
//! - a body that does not decode into the handler's type: reject without requeue;
//! - `Err` or a panic, first delivery: requeued after `requeue_delay` (the delay keeps a failing
//!   message from spinning in a hot loop; the message holds one prefetch slot meanwhile);
//! - `Err` or a panic, redelivered message: reject without requeue (dead-lettered when the
//!   queue has a dead-letter exchange).
//!
//! A handler that settled the message itself is not settled again. On shutdown the consumer is
//! cancelled (no new deliveries), in-flight handlers get `drain_timeout` to finish and settle,
//! then the channel is closed and the broker requeues whatever was not settled.

use std::fmt::Display;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::connection::{ConnectError, Connector};
use super::message::{DecodeError, Message};
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
    pub requeue_delay: Duration,
    pub drain_timeout: Duration,
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
            prefetch: scoped.get_or("prefetch_count", 10u16)?,
            requeue_delay: scoped.get_or("requeue_delay", Duration::from_secs(1))?,
            drain_timeout: scoped.get_or("drain_timeout", Duration::from_secs(30))?,
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
    let channel_err = |e: lapin::Error| ConsumeError::Channel(e.to_string());
    let conn = connector.connection().await?;
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| TopologyError::Channel(e.to_string()))?;
    channel
        .basic_qos(plan.prefetch, BasicQosOptions::default())
        .await
        .map_err(channel_err)?;
    plan.exchange.declare(&channel).await?;
    plan.queue
        .declare_and_bind(&channel, &plan.exchange, &plan.routing_key)
        .await?;
    let mut consumer = channel
        .basic_consume(
            plan.queue.name.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(channel_err)?;
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
                    let task = handle(plan.clone(), message, handled, shutdown.clone());
                    in_flight.spawn(context::scope(shared.clone(), task));
                }
                Some(Err(e)) => break Err(ConsumeError::Channel(e.to_string())),
                None => break Err(ConsumeError::Ended),
            },
        }
    };

    if stopped.is_ok() {
        // Stop taking new messages, then let in-flight handlers finish and settle.
        if let Err(e) = channel
            .basic_cancel(tag.clone(), BasicCancelOptions::default())
            .await
        {
            tracing::debug!(service = plan.service, handler = plan.handler, error = %e, "cancelling the consumer");
        }
        let drained = tokio::time::timeout(plan.drain_timeout, async {
            while in_flight.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                service = plan.service,
                handler = plan.handler,
                unfinished = in_flight.len(),
                drain_timeout = ?plan.drain_timeout,
                "handlers still running at the end of the drain timeout are stopped; the broker requeues their messages"
            );
        }
    }
    // Handlers still running now cannot settle on a broken channel: their messages come back.
    in_flight.shutdown().await;
    if channel.status().connected() {
        let _ = channel.close(200, "farine consumer stopped".into()).await;
    }
    stopped
}

async fn handle(
    plan: Arc<ConsumerPlan>,
    message: Message,
    handled: BoxFuture<'static, Outcome>,
    shutdown: CancellationToken,
) {
    let outcome = match AssertUnwindSafe(handled).catch_unwind().await {
        Ok(outcome) => outcome,
        Err(panic) => Outcome::Failed(format!("panicked: {}", panic_message(&*panic))),
    };
    settle(&plan, &message, outcome, &shutdown).await;
}

async fn settle(
    plan: &ConsumerPlan,
    message: &Message,
    outcome: Outcome,
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
            if message.redelivered() {
                tracing::error!(
                    service,
                    handler,
                    delivery_tag,
                    error = %error,
                    "handler failed on a redelivered message: rejected without requeue (dead-lettered if the queue has a dead-letter exchange)"
                );
                message.reject(false).await
            } else {
                tracing::warn!(
                    service,
                    handler,
                    delivery_tag,
                    error = %error,
                    requeue_in = ?plan.requeue_delay,
                    "handler failed: the message is requeued once"
                );
                tokio::select! {
                    _ = tokio::time::sleep(plan.requeue_delay) => {}
                    _ = shutdown.cancelled() => {}
                }
                message.nack(true).await
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
