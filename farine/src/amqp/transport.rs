//! What farine needs of a broker connection, as one set of types over the transports: RabbitMQ
//! through lapin. The methods mirror lapin's (its option, property and error types are the
//! vocabulary), so code above this module reads as lapin code and does not know which
//! transport it runs on: RabbitMQ through lapin, or the in-memory broker of the test kit
//! (`memory://<name>`).

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::Stream;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation, ExchangeKind};

use super::memory;

/// A connection to the broker.
#[derive(Debug)]
pub enum Connection {
    Lapin(lapin::Connection),
    Memory(memory::Connection),
}

impl Connection {
    /// True while the connection is open.
    pub fn is_connected(&self) -> bool {
        match self {
            Connection::Lapin(conn) => conn.status().connected(),
            Connection::Memory(conn) => conn.is_open(),
        }
    }

    pub async fn create_channel(&self) -> lapin::Result<Channel> {
        match self {
            Connection::Lapin(conn) => conn.create_channel().await.map(Channel::Lapin),
            Connection::Memory(conn) => conn.create_channel().await.map(Channel::Memory),
        }
    }

    pub async fn close(&self, reply_code: u16, reply_text: &str) -> lapin::Result<()> {
        match self {
            Connection::Lapin(conn) => conn.close(reply_code, reply_text.into()).await,
            Connection::Memory(conn) => conn.close(reply_code, reply_text).await,
        }
    }
}

/// A channel on a [`Connection`].
#[derive(Clone, Debug)]
pub enum Channel {
    Lapin(lapin::Channel),
    Memory(memory::Channel),
}

/// What a queue declare answers.
pub struct DeclaredQueue {
    pub name: ShortString,
    pub message_count: u32,
    pub consumer_count: u32,
}

impl Channel {
    /// True while the channel is open.
    pub fn is_connected(&self) -> bool {
        match self {
            Channel::Lapin(channel) => channel.status().connected(),
            Channel::Memory(channel) => channel.is_open(),
        }
    }

    pub async fn close(&self, reply_code: u16, reply_text: &str) -> lapin::Result<()> {
        match self {
            Channel::Lapin(channel) => channel.close(reply_code, reply_text.into()).await,
            Channel::Memory(channel) => channel.close(reply_code, reply_text).await,
        }
    }

    pub async fn basic_qos(
        &self,
        prefetch_count: u16,
        options: BasicQosOptions,
    ) -> lapin::Result<()> {
        match self {
            Channel::Lapin(channel) => channel.basic_qos(prefetch_count, options).await,
            Channel::Memory(channel) => channel.basic_qos(prefetch_count, options).await,
        }
    }

    pub async fn confirm_select(&self, options: ConfirmSelectOptions) -> lapin::Result<()> {
        match self {
            Channel::Lapin(channel) => channel.confirm_select(options).await,
            Channel::Memory(channel) => channel.confirm_select(options).await,
        }
    }

    pub async fn exchange_declare(
        &self,
        exchange: &str,
        kind: ExchangeKind,
        options: ExchangeDeclareOptions,
        arguments: FieldTable,
    ) -> lapin::Result<()> {
        match self {
            Channel::Lapin(channel) => {
                channel
                    .exchange_declare(exchange.into(), kind, options, arguments)
                    .await
            }
            Channel::Memory(channel) => {
                channel
                    .exchange_declare(exchange, kind, options, arguments)
                    .await
            }
        }
    }

    pub async fn queue_declare(
        &self,
        queue: &str,
        options: QueueDeclareOptions,
        arguments: FieldTable,
    ) -> lapin::Result<DeclaredQueue> {
        match self {
            Channel::Lapin(channel) => {
                let queue = channel
                    .queue_declare(queue.into(), options, arguments)
                    .await?;
                Ok(DeclaredQueue {
                    name: queue.name().clone(),
                    message_count: queue.message_count(),
                    consumer_count: queue.consumer_count(),
                })
            }
            Channel::Memory(channel) => {
                let queue = channel.queue_declare(queue, options, arguments).await?;
                Ok(DeclaredQueue {
                    name: queue.name.as_str().into(),
                    message_count: queue.message_count,
                    consumer_count: queue.consumer_count,
                })
            }
        }
    }

    pub async fn queue_bind(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        options: QueueBindOptions,
        arguments: FieldTable,
    ) -> lapin::Result<()> {
        match self {
            Channel::Lapin(channel) => {
                channel
                    .queue_bind(
                        queue.into(),
                        exchange.into(),
                        routing_key.into(),
                        options,
                        arguments,
                    )
                    .await
            }
            Channel::Memory(channel) => {
                channel
                    .queue_bind(queue, exchange, routing_key, options, arguments)
                    .await
            }
        }
    }

    pub async fn basic_consume(
        &self,
        queue: &str,
        consumer_tag: &str,
        options: BasicConsumeOptions,
        arguments: FieldTable,
    ) -> lapin::Result<Consumer> {
        match self {
            Channel::Lapin(channel) => channel
                .basic_consume(queue.into(), consumer_tag.into(), options, arguments)
                .await
                .map(Consumer::Lapin),
            Channel::Memory(channel) => channel
                .basic_consume(queue, consumer_tag, options, arguments)
                .await
                .map(Consumer::Memory),
        }
    }

    pub async fn basic_cancel(
        &self,
        consumer_tag: ShortString,
        options: BasicCancelOptions,
    ) -> lapin::Result<()> {
        match self {
            Channel::Lapin(channel) => channel.basic_cancel(consumer_tag, options).await,
            Channel::Memory(channel) => channel.basic_cancel(consumer_tag.as_str(), options).await,
        }
    }

    pub async fn basic_get(
        &self,
        queue: &str,
        options: BasicGetOptions,
    ) -> lapin::Result<Option<Delivery>> {
        match self {
            Channel::Lapin(channel) => Ok(channel
                .basic_get(queue.into(), options)
                .await?
                .map(|message| Delivery::from(message.delivery))),
            Channel::Memory(channel) => Ok(channel
                .basic_get(queue, options)
                .await?
                .map(|message| Delivery::from(message.delivery))),
        }
    }

    /// Waits for the confirms outstanding on the channel; answers the messages the broker
    /// returned meanwhile (on a channel without confirms: those returned so far).
    pub async fn wait_for_confirms(
        &self,
    ) -> lapin::Result<Vec<lapin::message::BasicReturnMessage>> {
        match self {
            Channel::Lapin(channel) => channel.wait_for_confirms().await,
            // Its confirms resolve at once; a return is read from the publish's confirm.
            Channel::Memory(_) => Ok(Vec::new()),
        }
    }

    /// Publishes `payload`; the returned [`Confirm`] resolves to the broker's confirm
    /// ([`Confirmation::NotRequested`] on a channel not in confirm mode).
    pub async fn basic_publish(
        &self,
        exchange: ShortString,
        routing_key: ShortString,
        options: BasicPublishOptions,
        payload: &[u8],
        properties: BasicProperties,
    ) -> lapin::Result<Confirm> {
        match self {
            Channel::Lapin(channel) => channel
                .basic_publish(exchange, routing_key, options, payload, properties)
                .await
                .map(Confirm::Lapin),
            Channel::Memory(channel) => channel
                .basic_publish(
                    exchange.as_str(),
                    routing_key.as_str(),
                    options,
                    payload,
                    properties,
                )
                .await
                .map(|confirm| Confirm::Memory(Box::new(confirm))),
        }
    }
}

/// The deliveries of one `basic.consume`.
pub enum Consumer {
    Lapin(lapin::Consumer),
    Memory(memory::Consumer),
}

impl Consumer {
    /// The consumer tag (for `basic.cancel`).
    pub fn tag(&self) -> ShortString {
        match self {
            Consumer::Lapin(consumer) => consumer.tag(),
            Consumer::Memory(consumer) => consumer.tag().into(),
        }
    }
}

impl Stream for Consumer {
    type Item = lapin::Result<Delivery>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.get_mut() {
            Consumer::Lapin(consumer) => Pin::new(consumer)
                .poll_next(cx)
                .map(|next| next.map(|delivery| delivery.map(Delivery::from))),
            Consumer::Memory(consumer) => Pin::new(consumer)
                .poll_next(cx)
                .map(|next| next.map(|delivery| delivery.map(Delivery::from))),
        }
    }
}

/// A delivered message, with what settles it.
pub struct Delivery {
    pub delivery_tag: u64,
    pub exchange: ShortString,
    pub routing_key: ShortString,
    pub redelivered: bool,
    pub properties: BasicProperties,
    pub data: Vec<u8>,
    pub acker: Acker,
}

impl From<memory::Delivery> for Delivery {
    fn from(delivery: memory::Delivery) -> Self {
        Self {
            delivery_tag: delivery.delivery_tag,
            exchange: delivery.exchange,
            routing_key: delivery.routing_key,
            redelivered: delivery.redelivered,
            properties: delivery.properties,
            data: delivery.data,
            acker: Acker::Memory(delivery.acker),
        }
    }
}

impl From<lapin::message::Delivery> for Delivery {
    fn from(delivery: lapin::message::Delivery) -> Self {
        Self {
            delivery_tag: delivery.delivery_tag,
            exchange: delivery.exchange,
            routing_key: delivery.routing_key,
            redelivered: delivery.redelivered,
            properties: delivery.properties,
            data: delivery.data,
            acker: Acker::Lapin(delivery.acker),
        }
    }
}

/// Settles one delivery. Each method answers `Ok(false)` when the channel is gone (the broker
/// redelivers the message then).
pub enum Acker {
    Lapin(lapin::Acker),
    Memory(memory::Acker),
}

impl Acker {
    pub async fn ack(&self, options: BasicAckOptions) -> lapin::Result<bool> {
        match self {
            Acker::Lapin(acker) => acker.ack(options).await,
            Acker::Memory(acker) => acker.ack(options).await,
        }
    }

    pub async fn nack(&self, options: BasicNackOptions) -> lapin::Result<bool> {
        match self {
            Acker::Lapin(acker) => acker.nack(options).await,
            Acker::Memory(acker) => acker.nack(options).await,
        }
    }

    pub async fn reject(&self, options: BasicRejectOptions) -> lapin::Result<bool> {
        match self {
            Acker::Lapin(acker) => acker.reject(options).await,
            Acker::Memory(acker) => acker.reject(options).await,
        }
    }
}

/// The broker's confirm of one publish, still to come.
pub enum Confirm {
    Lapin(lapin::PublisherConfirm),
    Memory(Box<memory::Confirm>),
}

impl Future for Confirm {
    type Output = lapin::Result<Confirmation>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Confirm::Lapin(confirm) => Pin::new(confirm).poll(cx),
            Confirm::Memory(confirm) => Pin::new(confirm.as_mut()).poll(cx),
        }
    }
}
