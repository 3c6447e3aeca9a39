//! The client side: connections, channels, consumers and deliveries shaped like lapin's, so a
//! call site reads the same against the in-memory broker as against RabbitMQ
//! (`channel.basic_publish(exchange, key, options, body, properties).await?.await?`).
//!
//! Every method completes at once; they are `async` only to keep lapin's call shape. Names are
//! `&str` where lapin takes a `ShortString` (`name.as_str().into()` works with both).

use std::fmt;
use std::future::Future;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::{Arc, PoisonError, Weak};
use std::task::{Context, Poll};

use futures_util::Stream;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{
    BasicProperties, ChannelState, Confirmation, ConnectionState, ErrorKind, ExchangeKind,
};
use tokio::sync::{mpsc, watch};

use super::state::{ConsumerEnd, Settle, Shared};

/// A connection to the in-memory broker. Cheap to clone; clones are the same connection.
#[derive(Clone)]
pub struct Connection {
    shared: Arc<Shared>,
    id: u64,
    name: String,
    closed: watch::Receiver<bool>,
}

impl Connection {
    pub(super) fn new(
        shared: Arc<Shared>,
        id: u64,
        name: String,
        closed: watch::Receiver<bool>,
    ) -> Self {
        Self {
            shared,
            id,
            name,
            closed,
        }
    }

    /// Opens a channel; fails with `InvalidConnectionState` once the connection is closed.
    pub async fn create_channel(&self) -> lapin::Result<Channel> {
        let (id, number) = self.shared.operate(|s| s.create_channel(self.id))?;
        Ok(Channel {
            shared: self.shared.clone(),
            id,
            number,
        })
    }

    /// Closes the connection: its channels close (their unacked messages are requeued, their
    /// consumers end) and its exclusive queues are deleted.
    pub async fn close(&self, _reply_code: u16, _reply_text: &str) -> lapin::Result<()> {
        self.shared.operate(|s| s.client_close_connection(self.id))
    }

    pub fn is_open(&self) -> bool {
        self.state() == ConnectionState::Connected
    }

    /// `Connected`, then `Closed` (closed by the client) or `Error` (killed by the broker).
    pub fn state(&self) -> ConnectionState {
        self.shared.lock().connection_state(self.id)
    }

    /// Resolves once the connection is closed, by [`Connection::close`] or by the broker
    /// ([`super::Broker::kill_connections`]).
    pub async fn closed(&self) {
        let mut closed = self.closed.clone();
        // An error means the broker is gone: closed as well.
        let _ = closed.wait_for(|closed| *closed).await;
    }

    /// The connection name given to [`super::Broker::connect`].
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("name", &self.name)
            .field("state", &self.state())
            .finish()
    }
}

/// A channel, with lapin's `Channel` methods. Cheap to clone; clones are the same channel.
#[derive(Clone)]
pub struct Channel {
    shared: Arc<Shared>,
    id: u64,
    number: u16,
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel")
            .field("id", &self.number)
            .field("state", &self.state())
            .finish()
    }
}

impl Channel {
    /// The channel number within its connection, from 1.
    pub fn id(&self) -> u16 {
        self.number
    }

    /// `Connected`, then `Closed` (closed by the client or by a channel error) or `Error` (its
    /// connection was killed).
    pub fn state(&self) -> ChannelState {
        self.shared.lock().channel_state(self.id)
    }

    pub fn is_open(&self) -> bool {
        self.state() == ChannelState::Connected
    }

    pub async fn close(&self, _reply_code: u16, _reply_text: &str) -> lapin::Result<()> {
        self.shared.operate(|s| s.client_close_channel(self.id))
    }

    pub async fn exchange_declare(
        &self,
        exchange: &str,
        kind: ExchangeKind,
        options: ExchangeDeclareOptions,
        arguments: FieldTable,
    ) -> lapin::Result<()> {
        self.shared
            .operate(|s| s.exchange_declare(self.id, exchange, kind, options, arguments))
    }

    pub async fn exchange_delete(
        &self,
        exchange: &str,
        options: ExchangeDeleteOptions,
    ) -> lapin::Result<()> {
        self.shared
            .operate(|s| s.exchange_delete(self.id, exchange, options.if_unused))
    }

    /// Declares a queue; `""` asks for a server-named `amq.gen-…` queue.
    pub async fn queue_declare(
        &self,
        queue: &str,
        options: QueueDeclareOptions,
        arguments: FieldTable,
    ) -> lapin::Result<DeclaredQueue> {
        self.shared
            .operate(|s| s.queue_declare(self.id, queue, options, arguments))
    }

    pub async fn queue_bind(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        _options: QueueBindOptions,
        arguments: FieldTable,
    ) -> lapin::Result<()> {
        self.shared
            .operate(|s| s.queue_bind(self.id, queue, exchange, routing_key, arguments))
    }

    /// As lapin's: no options.
    pub async fn queue_unbind(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> lapin::Result<()> {
        self.shared
            .operate(|s| s.queue_unbind(self.id, queue, exchange, routing_key, arguments))
    }

    /// Deletes a queue; returns how many ready messages went with it (0 if it did not exist).
    pub async fn queue_delete(
        &self,
        queue: &str,
        options: QueueDeleteOptions,
    ) -> lapin::Result<u32> {
        self.shared
            .operate(|s| s.queue_delete(self.id, queue, options.if_unused, options.if_empty))
    }

    pub async fn queue_purge(
        &self,
        queue: &str,
        _options: QueuePurgeOptions,
    ) -> lapin::Result<u32> {
        self.shared.operate(|s| s.queue_purge(self.id, queue))
    }

    /// With `global = false`, the prefetch of consumers started on this channel after the call
    /// (0 = unlimited); with `global = true`, a limit shared by all of the channel's consumers.
    pub async fn basic_qos(
        &self,
        prefetch_count: u16,
        options: BasicQosOptions,
    ) -> lapin::Result<()> {
        self.shared
            .operate(|s| s.basic_qos(self.id, prefetch_count, options.global))
    }

    /// Starts a consumer; `""` asks for a generated `amq.ctag-…` tag. Of the arguments, a
    /// stream's `x-stream-offset` is read (`first`, `last`, `next`, an offset, a timestamp).
    pub async fn basic_consume(
        &self,
        queue: &str,
        consumer_tag: &str,
        options: BasicConsumeOptions,
        arguments: FieldTable,
    ) -> lapin::Result<Consumer> {
        let new = self
            .shared
            .operate(|s| s.basic_consume(self.id, queue, consumer_tag, options, &arguments))?;
        Ok(Consumer {
            tag: new.tag,
            queue: queue.to_string(),
            rx: new.rx,
            end: new.end,
        })
    }

    /// Stops a consumer: no new deliveries, its stream ends after those it holds; its unacked
    /// messages stay unacked until settled or the channel closes. An unknown tag is no error.
    pub async fn basic_cancel(
        &self,
        consumer_tag: &str,
        _options: BasicCancelOptions,
    ) -> lapin::Result<()> {
        self.shared
            .operate(|s| s.basic_cancel(self.id, consumer_tag))
    }

    /// Takes the oldest ready message of `queue`, or `None` when there is none (a stream
    /// refuses: 540 `NOT_IMPLEMENTED`, which closes the connection).
    pub async fn basic_get(
        &self,
        queue: &str,
        options: BasicGetOptions,
    ) -> lapin::Result<Option<GetMessage>> {
        let got = self
            .shared
            .operate(|s| s.basic_get(self.id, queue, options.no_ack))?;
        Ok(got.map(|(delivery, message_count)| GetMessage {
            delivery,
            message_count,
        }))
    }

    pub async fn confirm_select(&self, _options: ConfirmSelectOptions) -> lapin::Result<()> {
        self.shared.operate(|s| s.confirm_select(self.id))
    }

    /// Publishes a message. An error here means the channel was already closed; an error the
    /// publish itself causes (no such exchange, ...) closes the channel and is what the
    /// returned [`Confirm`] resolves to, confirm mode or not.
    pub async fn basic_publish(
        &self,
        exchange: &str,
        routing_key: &str,
        options: BasicPublishOptions,
        payload: &[u8],
        properties: BasicProperties,
    ) -> lapin::Result<Confirm> {
        let outcome = self
            .shared
            .operate(|s| s.publish(self.id, exchange, routing_key, options, payload, properties))?;
        Ok(Confirm(Some(outcome)))
    }

    pub async fn basic_ack(
        &self,
        delivery_tag: u64,
        options: BasicAckOptions,
    ) -> lapin::Result<()> {
        self.shared.operate(|s| {
            s.settle(
                self.id,
                delivery_tag,
                options.multiple,
                Settle::Ack,
                "basic.ack",
            )
        })
    }

    pub async fn basic_nack(
        &self,
        delivery_tag: u64,
        options: BasicNackOptions,
    ) -> lapin::Result<()> {
        self.shared.operate(|s| {
            s.settle(
                self.id,
                delivery_tag,
                options.multiple,
                requeue_or_discard(options.requeue),
                "basic.nack",
            )
        })
    }

    pub async fn basic_reject(
        &self,
        delivery_tag: u64,
        options: BasicRejectOptions,
    ) -> lapin::Result<()> {
        self.shared.operate(|s| {
            s.settle(
                self.id,
                delivery_tag,
                false,
                requeue_or_discard(options.requeue),
                "basic.reject",
            )
        })
    }
}

fn requeue_or_discard(requeue: bool) -> Settle {
    if requeue {
        Settle::Requeue
    } else {
        Settle::Discard
    }
}

/// What `queue.declare` answers (lapin's `Queue`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeclaredQueue {
    pub name: String,
    /// Ready messages.
    pub message_count: u32,
    pub consumer_count: u32,
}

impl DeclaredQueue {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn message_count(&self) -> u32 {
        self.message_count
    }

    pub fn consumer_count(&self) -> u32 {
        self.consumer_count
    }
}

/// A consumer's deliveries (lapin's `Consumer`). The stream ends (`None`) when the consumer
/// is cancelled — after the deliveries it already holds — or at once when its channel closes
/// (those deliveries were requeued). When the connection is killed it yields the error first.
pub struct Consumer {
    tag: String,
    queue: String,
    rx: mpsc::UnboundedReceiver<Delivery>,
    end: ConsumerEnd,
}

impl Consumer {
    pub fn tag(&self) -> &str {
        &self.tag
    }

    pub fn queue(&self) -> &str {
        &self.queue
    }
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("tag", &self.tag)
            .field("queue", &self.queue)
            .finish()
    }
}

impl Stream for Consumer {
    type Item = lapin::Result<Delivery>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        {
            let mut end = this.end.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(error) = end.as_mut() {
                return Poll::Ready(error.take().map(Err));
            }
        }
        this.rx.poll_recv(cx).map(|delivery| delivery.map(Ok))
    }
}

/// A delivered message (lapin's `Delivery`), settled through its [`Acker`].
#[derive(Debug)]
pub struct Delivery {
    pub delivery_tag: u64,
    pub exchange: ShortString,
    pub routing_key: ShortString,
    pub redelivered: bool,
    pub properties: BasicProperties,
    pub data: Vec<u8>,
    pub acker: Acker,
}

impl Deref for Delivery {
    type Target = Acker;

    fn deref(&self) -> &Acker {
        &self.acker
    }
}

/// What `basic.get` answers (lapin's `BasicGetMessage`).
#[derive(Debug)]
pub struct GetMessage {
    pub delivery: Delivery,
    /// Ready messages left in the queue.
    pub message_count: u32,
}

impl Deref for GetMessage {
    type Target = Delivery;

    fn deref(&self) -> &Delivery {
        &self.delivery
    }
}

/// Settles one delivery (lapin's `Acker`). As with lapin, `Ok(true)` when the broker took it
/// and `Ok(false)` when the channel is already closed (the message was requeued then).
/// Settling a delivery twice reaches the broker, which answers as RabbitMQ does: the channel
/// closes with `PRECONDITION_FAILED - unknown delivery tag N`.
#[derive(Clone)]
pub struct Acker {
    shared: Weak<Shared>,
    channel: u64,
    delivery_tag: u64,
}

impl fmt::Debug for Acker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acker")
            .field("delivery_tag", &self.delivery_tag)
            .finish()
    }
}

impl Acker {
    pub(super) fn new(shared: Weak<Shared>, channel: u64, delivery_tag: u64) -> Self {
        Self {
            shared,
            channel,
            delivery_tag,
        }
    }

    pub async fn ack(&self, options: BasicAckOptions) -> lapin::Result<bool> {
        self.settle(options.multiple, Settle::Ack, "basic.ack")
    }

    pub async fn nack(&self, options: BasicNackOptions) -> lapin::Result<bool> {
        self.settle(
            options.multiple,
            requeue_or_discard(options.requeue),
            "basic.nack",
        )
    }

    pub async fn reject(&self, options: BasicRejectOptions) -> lapin::Result<bool> {
        self.settle(false, requeue_or_discard(options.requeue), "basic.reject")
    }

    fn settle(&self, multiple: bool, how: Settle, context: &'static str) -> lapin::Result<bool> {
        let Some(shared) = self.shared.upgrade() else {
            return Ok(false);
        };
        shared.operate(|s| {
            if s.channel_state(self.channel) != ChannelState::Connected {
                return Ok(false);
            }
            s.settle(self.channel, self.delivery_tag, multiple, how, context)
                .map(|()| true)
        })
    }
}

/// A publisher confirm (lapin's `PublisherConfirm`): resolves at once to
/// `Confirmation::NotRequested` outside confirm mode, `Ack(None)`, `Ack(Some(returned))` for
/// a mandatory message no queue took, `Nack(None)` when a queue refused it
/// (`x-overflow = reject-publish`), or the channel error the publish caused.
#[derive(Debug)]
pub struct Confirm(Option<lapin::Result<Confirmation>>);

impl Future for Confirm {
    type Output = lapin::Result<Confirmation>;

    fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(
            self.get_mut()
                .0
                .take()
                .unwrap_or_else(|| Err(ErrorKind::FutureCompleted.into())),
        )
    }
}
