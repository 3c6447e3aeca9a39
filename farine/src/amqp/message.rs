//! The handle a `#[consume]` handler can ask for: the delivery's metadata and explicit settlement.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::transport::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde::de::DeserializeOwned;

pub use crate::decode::DecodeError;

/// The header holding a message's attempt number (see [`Message::attempt`]).
pub const ATTEMPT_HEADER: &str = "x-farine-attempt";
/// The header holding the error of a message's last failed attempt.
pub const ERROR_HEADER: &str = "x-farine-error";
/// On a dead letter: why it is there (`failed`: every attempt failed; `undecodable`: the body
/// does not decode into the handler's type).
pub const REASON_HEADER: &str = "x-farine-reason";
/// On a dead letter: the queue it was consumed from (where a replay sends it back).
pub const QUEUE_HEADER: &str = "x-farine-queue";
/// On a retried or dead letter: the exchange and routing key it was first published with.
pub const EXCHANGE_HEADER: &str = "x-farine-exchange";
pub const ROUTING_KEY_HEADER: &str = "x-farine-routing-key";
/// On a dead letter: when it was dead-lettered, in seconds since the Unix epoch.
pub const FAILED_AT_HEADER: &str = "x-farine-failed-at";

/// A failed message's copy on its way to the retry or the dead-letter queue: the same body and
/// properties, with farine's headers.
pub(crate) struct Copy {
    pub body: Vec<u8>,
    pub properties: lapin::BasicProperties,
}

impl Copy {
    /// The copy for the retry queue: attempt `attempt` comes after `delay` (its TTL).
    pub fn retry(message: &Message, attempt: u32, error: &str, delay: std::time::Duration) -> Self {
        let mut headers = message.origin_headers();
        headers.insert(ATTEMPT_HEADER.into(), AMQPValue::LongUInt(attempt));
        headers.insert(ERROR_HEADER.into(), error_value(error));
        let properties = without_expiration(message.properties())
            .with_headers(headers)
            .with_expiration(delay.as_millis().to_string().into());
        Self {
            body: message.body().to_vec(),
            properties,
        }
    }

    /// The copy for the dead-letter queue after `attempt` calls, with no TTL: a dead letter
    /// waits for a human.
    pub fn dead(message: &Message, attempt: u32, error: &str, reason: &str, queue: &str) -> Self {
        let mut headers = message.origin_headers();
        headers.insert(ATTEMPT_HEADER.into(), AMQPValue::LongUInt(attempt));
        headers.insert(ERROR_HEADER.into(), error_value(error));
        headers.insert(REASON_HEADER.into(), AMQPValue::LongString(reason.into()));
        headers.insert(QUEUE_HEADER.into(), AMQPValue::LongString(queue.into()));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        headers.insert(FAILED_AT_HEADER.into(), AMQPValue::Timestamp(now));
        Self {
            body: message.body().to_vec(),
            properties: without_expiration(message.properties()).with_headers(headers),
        }
    }
}

/// An error text as a header value, cut to 1 KiB (headers travel with every copy).
fn error_value(error: &str) -> AMQPValue {
    let mut end = error.len().min(1024);
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    AMQPValue::LongString(error[..end].into())
}

/// `properties` without their per-message TTL.
pub(crate) fn without_expiration(properties: &lapin::BasicProperties) -> lapin::BasicProperties {
    let mut copy = lapin::BasicProperties::default();
    macro_rules! keep {
        ($($get:ident => $set:ident),* $(,)?) => {
            $(if let Some(value) = properties.$get() { copy = copy.$set(value.clone()); })*
        };
    }
    keep!(
        content_type => with_content_type,
        content_encoding => with_content_encoding,
        headers => with_headers,
        delivery_mode => with_delivery_mode,
        priority => with_priority,
        correlation_id => with_correlation_id,
        reply_to => with_reply_to,
        message_id => with_message_id,
        timestamp => with_timestamp,
        kind => with_type,
        user_id => with_user_id,
        app_id => with_app_id,
        cluster_id => with_cluster_id,
    );
    copy
}

/// A message delivered to a `#[consume]` handler. Cheap to clone; all clones share one delivery.
///
/// farine settles the message when the handler returns (see `docs/consuming.md`); a handler that
/// settles it itself with [`Message::ack`], [`Message::nack`] or [`Message::reject`] is not
/// settled a second time.
#[derive(Clone)]
pub struct Message {
    inner: Arc<Inner>,
}

struct Inner {
    delivery: Delivery,
    settled: AtomicBool,
}

/// Why a message could not be settled.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SettleError {
    /// The message was acked, nacked or rejected before.
    #[error("message {delivery_tag} was already settled")]
    AlreadySettled { delivery_tag: u64 },
    /// The channel the message came on is gone; the broker will redeliver the message.
    #[error("cannot settle message {delivery_tag}: {cause} (the broker will redeliver it)")]
    Channel { delivery_tag: u64, cause: String },
}

/// The headers of a consumed message, as a `#[consume]` handler parameter.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Headers(FieldTable);

impl Headers {
    /// The header `name`, if the message has it.
    pub fn get(&self, name: &str) -> Option<&AMQPValue> {
        self.0.inner().get(name)
    }

    /// The header `name` when it is text.
    pub fn text(&self, name: &str) -> Option<&str> {
        match self.get(name)? {
            AMQPValue::LongString(text) => std::str::from_utf8(text.as_bytes()).ok(),
            AMQPValue::ShortString(text) => Some(text.as_str()),
            _ => None,
        }
    }

    /// Every header.
    pub fn table(&self) -> &FieldTable {
        &self.0
    }
}

impl From<FieldTable> for Headers {
    fn from(table: FieldTable) -> Self {
        Self(table)
    }
}

impl Message {
    pub(crate) fn new(delivery: Delivery) -> Self {
        Self {
            inner: Arc::new(Inner {
                delivery,
                settled: AtomicBool::new(false),
            }),
        }
    }

    /// The raw body.
    pub fn body(&self) -> &[u8] {
        &self.inner.delivery.data
    }

    /// The body decoded from JSON into `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, DecodeError> {
        serde_json::from_slice(self.body()).map_err(|e| DecodeError {
            type_name: std::any::type_name::<T>(),
            cause: e.to_string(),
        })
    }

    /// The exchange the message was published to (empty for the default exchange).
    pub fn exchange(&self) -> &str {
        self.inner.delivery.exchange.as_str()
    }

    /// The routing key the message was published with.
    pub fn routing_key(&self) -> &str {
        self.inner.delivery.routing_key.as_str()
    }

    /// True when the broker delivered this message before (to this or another consumer).
    pub fn redelivered(&self) -> bool {
        self.inner.delivery.redelivered
    }

    /// The delivery tag, unique on the handler's channel.
    pub fn delivery_tag(&self) -> u64 {
        self.inner.delivery.delivery_tag
    }

    /// The message's headers (empty when it has none).
    pub fn headers(&self) -> FieldTable {
        self.inner
            .delivery
            .properties
            .headers()
            .clone()
            .unwrap_or_default()
    }

    /// One header, when present.
    pub fn header(&self, name: &str) -> Option<AMQPValue> {
        self.inner
            .delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|headers| headers.inner().get(name).cloned())
    }

    /// The trace the message's sender was in (its `traceparent` and `tracestate` headers), when
    /// it says one.
    pub(crate) fn trace_parent(&self) -> Option<crate::observe::trace::SpanContext> {
        let headers = self.inner.delivery.properties.headers().as_ref()?;
        let text = |name: &str| match headers.inner().get(name) {
            Some(AMQPValue::LongString(text)) => std::str::from_utf8(text.as_bytes()).ok(),
            _ => None,
        };
        crate::observe::trace::SpanContext::parse(
            text(crate::observe::trace::TRACEPARENT)?,
            text(crate::observe::trace::TRACESTATE),
        )
    }

    /// The `message_id` property, when set by the publisher.
    pub fn message_id(&self) -> Option<&str> {
        self.inner
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str())
    }

    /// The `correlation_id` property, when set.
    pub fn correlation_id(&self) -> Option<&str> {
        self.inner
            .delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(|s| s.as_str())
    }

    /// The `reply_to` property, when set.
    pub fn reply_to(&self) -> Option<&str> {
        self.inner
            .delivery
            .properties
            .reply_to()
            .as_ref()
            .map(|s| s.as_str())
    }

    /// The `type` property (the message's type name), when set.
    pub fn message_type(&self) -> Option<&str> {
        self.inner
            .delivery
            .properties
            .kind()
            .as_ref()
            .map(|s| s.as_str())
    }

    /// The `content_type` property, when set.
    pub fn content_type(&self) -> Option<&str> {
        self.inner
            .delivery
            .properties
            .content_type()
            .as_ref()
            .map(|s| s.as_str())
    }

    /// Which attempt at handling this message this is: 1, or the `x-farine-attempt` header that
    /// farine sets when it publishes a failed message again.
    pub fn attempt(&self) -> u32 {
        let value = match self.header(ATTEMPT_HEADER) {
            Some(AMQPValue::LongUInt(n)) => i64::from(n),
            Some(AMQPValue::LongInt(n)) => i64::from(n),
            Some(AMQPValue::LongLongInt(n)) => n,
            Some(AMQPValue::ShortUInt(n)) => i64::from(n),
            Some(AMQPValue::ShortInt(n)) => i64::from(n),
            _ => 1,
        };
        u32::try_from(value).unwrap_or(1).max(1)
    }

    /// The headers, with the exchange and routing key the message was first published with
    /// (kept across retries, which arrive through the default exchange).
    fn origin_headers(&self) -> FieldTable {
        let mut headers = self.headers();
        // A stream's offset is the broker's, of this delivery: a copy appended to a stream
        // again gets another.
        if headers.inner().contains_key("x-stream-offset") {
            let mut table = headers.inner().clone();
            table.remove("x-stream-offset");
            headers = FieldTable::from(table);
        }
        if !headers.inner().contains_key(EXCHANGE_HEADER) {
            headers.insert(
                EXCHANGE_HEADER.into(),
                AMQPValue::LongString(self.exchange().into()),
            );
            headers.insert(
                ROUTING_KEY_HEADER.into(),
                AMQPValue::LongString(self.routing_key().into()),
            );
        }
        headers
    }

    pub(crate) fn properties(&self) -> &lapin::BasicProperties {
        &self.inner.delivery.properties
    }

    /// True once the message was acked, nacked or rejected.
    pub fn is_settled(&self) -> bool {
        self.inner.settled.load(Ordering::Acquire)
    }

    /// Acknowledges the message: the broker forgets it.
    pub async fn ack(&self) -> Result<(), SettleError> {
        self.claim()?;
        let result = self
            .inner
            .delivery
            .acker
            .ack(BasicAckOptions::default())
            .await;
        self.settled(result)
    }

    /// Negatively acknowledges the message; with `requeue` the broker delivers it again.
    pub async fn nack(&self, requeue: bool) -> Result<(), SettleError> {
        self.claim()?;
        let options = BasicNackOptions {
            multiple: false,
            requeue,
        };
        let result = self.inner.delivery.acker.nack(options).await;
        self.settled(result)
    }

    /// Rejects the message; without `requeue` it is dropped, or dead-lettered when its queue
    /// has a dead-letter exchange.
    pub async fn reject(&self, requeue: bool) -> Result<(), SettleError> {
        self.claim()?;
        let result = self
            .inner
            .delivery
            .acker
            .reject(BasicRejectOptions { requeue })
            .await;
        self.settled(result)
    }

    fn claim(&self) -> Result<(), SettleError> {
        if self.inner.settled.swap(true, Ordering::AcqRel) {
            return Err(SettleError::AlreadySettled {
                delivery_tag: self.delivery_tag(),
            });
        }
        Ok(())
    }

    fn settled(&self, result: lapin::Result<bool>) -> Result<(), SettleError> {
        match result {
            Ok(true) => Ok(()),
            Ok(false) => Err(SettleError::Channel {
                delivery_tag: self.delivery_tag(),
                cause: "the channel was closed".into(),
            }),
            Err(e) => Err(SettleError::Channel {
                delivery_tag: self.delivery_tag(),
                cause: e.to_string(),
            }),
        }
    }
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("exchange", &self.exchange())
            .field("routing_key", &self.routing_key())
            .field("delivery_tag", &self.delivery_tag())
            .field("redelivered", &self.redelivered())
            .field("bytes", &self.body().len())
            .finish()
    }
}
