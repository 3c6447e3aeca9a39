//! A handler's dead letters: looking at them, replaying them, purging them (what
//! `farine dead-letters list|replay|purge` does).
//!
//! A message that failed every attempt (or did not decode) waits in its handler's dead-letter
//! queue, `<queue>.dead`, with farine's headers saying why (`docs/consuming.md`). Once the
//! cause is fixed, a replay moves the messages that are there now back to the handler's
//! queue, with a fresh attempt count, each one published with a confirm before its dead
//! letter is acked: a replay interrupted half-way loses nothing (at worst one message is in
//! both queues). Each operation takes only the messages there when it starts (at most its
//! limit): one that arrives meanwhile, or fails again after a replay, is left for the next.

use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};

use super::connection::Connector;
use super::error::{BrokerError, Resource};
use super::message::{
    ATTEMPT_HEADER, ERROR_HEADER, EXCHANGE_HEADER, FAILED_AT_HEADER, QUEUE_HEADER, REASON_HEADER,
    ROUTING_KEY_HEADER, without_expiration,
};
use super::transport::{Channel, Delivery};

/// A dead letter as farine left it: why it failed and where it came from, read from its
/// headers (`None` where a header is missing: a message put there by something else).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The error of its last attempt (`x-farine-error`).
    pub error: Option<String>,
    /// Why it is here: `failed`, `undecodable`, `rejected` (`x-farine-reason`).
    pub reason: Option<String>,
    /// How many attempts were made (`x-farine-attempt`).
    pub attempts: Option<u32>,
    /// When it was dead-lettered, in seconds since the Unix epoch (`x-farine-failed-at`).
    pub failed_at: Option<u64>,
    /// The exchange and routing key it was first published with (`x-farine-exchange`,
    /// `x-farine-routing-key`), else those it reached the dead-letter queue with.
    pub exchange: String,
    pub routing_key: String,
    /// The `content_type` property, when set.
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

impl DeadLetter {
    fn read(delivery: &Delivery) -> Self {
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        let text = |name: &str| match headers.inner().get(name)? {
            AMQPValue::LongString(text) => {
                Some(String::from_utf8_lossy(text.as_bytes()).into_owned())
            }
            AMQPValue::ShortString(text) => Some(text.to_string()),
            _ => None,
        };
        let attempts = match headers.inner().get(ATTEMPT_HEADER) {
            Some(AMQPValue::LongUInt(n)) => Some(*n),
            Some(AMQPValue::LongInt(n)) => u32::try_from(*n).ok(),
            Some(AMQPValue::LongLongInt(n)) => u32::try_from(*n).ok(),
            Some(AMQPValue::ShortUInt(n)) => Some(u32::from(*n)),
            Some(AMQPValue::ShortInt(n)) => u32::try_from(*n).ok(),
            _ => None,
        };
        let failed_at = match headers.inner().get(FAILED_AT_HEADER) {
            Some(AMQPValue::Timestamp(seconds)) => Some(*seconds),
            Some(AMQPValue::LongLongInt(seconds)) => u64::try_from(*seconds).ok(),
            _ => None,
        };
        Self {
            error: text(ERROR_HEADER),
            reason: text(REASON_HEADER),
            attempts,
            failed_at,
            exchange: text(EXCHANGE_HEADER).unwrap_or_else(|| delivery.exchange.to_string()),
            routing_key: text(ROUTING_KEY_HEADER)
                .unwrap_or_else(|| delivery.routing_key.to_string()),
            content_type: delivery
                .properties
                .content_type()
                .as_ref()
                .map(|kind| kind.to_string()),
            body: delivery.data.clone(),
        }
    }
}

/// A dead-letter queue opened for one operation: a channel to its broker, how many messages
/// it held then, and how many of those the operation still takes.
struct Opened<'a> {
    channel: Channel,
    queue: &'a str,
    broker: String,
    waiting: u32,
    left: u64,
}

impl<'a> Opened<'a> {
    /// Opens `queue` (`NotFound` when it does not exist) for an operation on at most `limit`
    /// of the messages there now. `confirm`: the channel in confirm mode.
    async fn new(
        connector: &Connector,
        queue: &'a str,
        limit: Option<u64>,
        confirm: bool,
    ) -> Result<Self, BrokerError> {
        let conn = connector.connection().await?;
        let broker = connector.broker();
        let failed = |e: lapin::Error| {
            BrokerError::from_lapin(&e, Resource::Queue(queue.to_string()), &broker)
        };
        let channel = conn.create_channel().await.map_err(failed)?;
        if confirm {
            channel
                .confirm_select(Default::default())
                .await
                .map_err(failed)?;
        }
        let waiting = channel
            .queue_declare(
                queue,
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(failed)?
            .message_count;
        let left = limit.map_or(u64::from(waiting), |limit| limit.min(u64::from(waiting)));
        Ok(Self {
            channel,
            queue,
            broker,
            waiting,
            left,
        })
    }

    /// A lapin error on this queue, typed.
    fn error(&self, error: lapin::Error) -> BrokerError {
        BrokerError::from_lapin(
            &error,
            Resource::Queue(self.queue.to_string()),
            &self.broker,
        )
    }

    /// The next message the operation takes, unacked; `None` once it took its share or the
    /// queue is empty.
    async fn next(&mut self) -> Result<Option<Delivery>, BrokerError> {
        if self.left == 0 {
            return Ok(None);
        }
        let got = self
            .channel
            .basic_get(self.queue, BasicGetOptions { no_ack: false })
            .await
            .map_err(|e| self.error(e))?;
        if got.is_some() {
            self.left -= 1;
        }
        Ok(got)
    }

    /// Acks `delivery`: it leaves the queue.
    async fn ack(&self, delivery: &Delivery) -> Result<(), BrokerError> {
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .map(|_| ())
            .map_err(|e| self.error(e))
    }
}

/// The messages now in `dead_letter_queue` (at most `limit`, from the head), left in it: each
/// is taken without an ack, and closing the channel gives them all back, in their order. Returns
/// how many the queue holds, and those read.
///
/// Each read counts as a delivery: a quorum queue with a `x-delivery-limit` counts it.
pub async fn peek(
    connector: &Connector,
    dead_letter_queue: &str,
    limit: Option<u64>,
) -> Result<(u32, Vec<DeadLetter>), BrokerError> {
    let mut opened = Opened::new(connector, dead_letter_queue, limit, false).await?;
    let mut seen = Vec::new();
    while let Some(delivery) = opened.next().await? {
        seen.push(DeadLetter::read(&delivery));
    }
    // Unacked, they go back to the queue with the channel.
    let _ = opened.channel.close(200, "dead letters listed").await;
    Ok((opened.waiting, seen))
}

/// Deletes the messages now in `dead_letter_queue` (at most `limit`, from the head); returns
/// how many.
pub async fn purge(
    connector: &Connector,
    dead_letter_queue: &str,
    limit: Option<u64>,
) -> Result<u64, BrokerError> {
    let mut opened = Opened::new(connector, dead_letter_queue, limit, false).await?;
    let mut purged = 0u64;
    while let Some(delivery) = opened.next().await? {
        opened.ack(&delivery).await?;
        purged += 1;
    }
    // The acks are sent before the close: the broker has them all once it answers.
    opened
        .channel
        .close(200, "dead letters purged")
        .await
        .map_err(|e| opened.error(e))?;
    Ok(purged)
}

/// Moves the messages now in `dead_letter_queue` (at most `limit`, from the head) back to
/// `queue`; returns how many.
pub async fn replay(
    connector: &Connector,
    dead_letter_queue: &str,
    queue: &str,
    limit: Option<u64>,
) -> Result<u64, BrokerError> {
    let mut opened = Opened::new(connector, dead_letter_queue, limit, true).await?;
    let mut moved = 0u64;
    // Only the messages there now: one that fails again comes back behind them.
    while let Some(delivery) = opened.next().await? {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        let mut fresh = FieldTable::default();
        for (name, value) in headers.inner() {
            let farine_state = [
                ATTEMPT_HEADER,
                ERROR_HEADER,
                REASON_HEADER,
                QUEUE_HEADER,
                FAILED_AT_HEADER,
            ]
            .contains(&name.as_str());
            if !farine_state && name.as_str() != "x-death" {
                fresh.insert(name.clone(), value.clone());
            }
        }
        headers = fresh;
        let properties = without_expiration(&delivery.properties).with_headers(headers);
        let confirm = opened
            .channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &delivery.data,
                properties,
            )
            .await
            .map_err(|e| opened.error(e))?
            .await
            .map_err(|e| opened.error(e))?;
        if let lapin::Confirmation::Ack(Some(_)) | lapin::Confirmation::Nack(_) = confirm {
            // The queue is gone or refused it: leave the dead letter where it is.
            return Err(BrokerError::NoRoute {
                exchange: String::new(),
                routing_key: queue.to_string(),
            });
        }
        opened.ack(&delivery).await?;
        moved += 1;
    }
    let _ = opened.channel.close(200, "replay done").await;
    Ok(moved)
}
