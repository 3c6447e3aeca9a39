//! The raw lapin baseline: what a careful user writes by hand for each workload, with no
//! framework: one connection, a channel per role, per-message acks, replies without confirms.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{Value, json};
use tokio::sync::oneshot;

pub async fn connect(uri: &str) -> Connection {
    Connection::connect(uri, ConnectionProperties::default())
        .await
        .expect("the broker is reachable")
}

/// W1: drains `n` messages from `queue` with `basic.qos(prefetch)`, decoding each from JSON and
/// acking it; the acks are in flight together (up to the prefetch), not awaited one by one.
/// Returns the time from connecting to the last ack.
pub async fn drain(uri: &str, queue: &str, n: usize, prefetch: u16) -> Duration {
    let started = Instant::now();
    let conn = connect(uri).await;
    let channel = conn.create_channel().await.expect("a channel");
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut acks = futures_util::stream::FuturesUnordered::new();
    let (mut seen, mut acked) = (0, 0);
    while acked < n {
        tokio::select! {
            Some(()) = acks.next(), if !acks.is_empty() => acked += 1,
            delivery = consumer.next(), if seen < n => {
                let delivery = delivery.expect("deliveries").expect("a delivery");
                let order: Value = serde_json::from_slice(&delivery.data).expect("JSON");
                assert!(!order.is_null());
                seen += 1;
                acks.push(async move {
                    delivery
                        .acker
                        .ack(BasicAckOptions::default())
                        .await
                        .expect("ack");
                });
            }
        }
    }
    let elapsed = started.elapsed();
    let _ = channel.close(200, "done".into()).await;
    let _ = conn.close(200, "done".into()).await;
    elapsed
}

/// What the hand-written RPC puts on the wire.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// What a hand-written RPC sends: requests to the server's queue through the default
    /// exchange, with a correlation id, a reply queue and delivery mode 1; replies with the
    /// correlation id only.
    Minimal,
    /// farine's messages, by hand: requests to a direct exchange with routing key
    /// `<exchange>__echo`, `mandatory`, `content_type`, `expiration`, `type = farine.single`
    /// and a correlation id of farine's shape; replies with `content_type` and a delivery mode.
    /// What farine costs beyond what it puts on the wire.
    Farine,
}

/// The exchange (and queue) of the [`Wire::Farine`] server: as long as the farine side's
/// `bench_echo`, so that both put the same bytes on the wire.
pub const FARINE_WIRE_EXCHANGE: &str = "bench_wire";

/// The routing key of its `echo` method, as farine names a method's binding.
const FARINE_WIRE_ROUTING_KEY: &str = "bench_wire__echo";

/// W2, W3: an echo RPC server with farine's bodies, one reply per call, on its own connection;
/// up to `prefetch` calls are answered concurrently. Runs until the connection closes.
pub struct EchoServer {
    pub queue: String,
    wire: Wire,
    conn: Connection,
}

impl EchoServer {
    pub async fn start(uri: &str, prefetch: u16, wire: Wire) -> Self {
        let conn = connect(uri).await;
        let channel = conn.create_channel().await.expect("a channel");
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .expect("qos");
        // The farine wire's server declares what a farine RPC server declares: a durable
        // direct exchange and a durable queue, both named after the service (deleted by the
        // harness's clean-up).
        let queue = match wire {
            Wire::Minimal => farine_test_support::private_queue(&channel)
                .await
                .to_string(),
            Wire::Farine => {
                crate::declare_queue(
                    &conn,
                    FARINE_WIRE_EXCHANGE,
                    FARINE_WIRE_EXCHANGE,
                    FARINE_WIRE_ROUTING_KEY,
                    lapin::ExchangeKind::Direct,
                )
                .await;
                FARINE_WIRE_EXCHANGE.to_string()
            }
        };
        let mut requests = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        tokio::spawn(async move {
            let mut answering = futures_util::stream::FuturesUnordered::new();
            loop {
                tokio::select! {
                    Some(()) = answering.next(), if !answering.is_empty() => {}
                    next = requests.next() => {
                        let Some(Ok(delivery)) = next else { break };
                        answering.push(answer(channel.clone(), delivery, wire));
                    }
                }
            }
        });
        Self { queue, wire, conn }
    }

    pub async fn stop(self) {
        let _ = self.conn.close(200, "done".into()).await;
    }
}

/// Answers one echo request, then acks it.
async fn answer(channel: Channel, delivery: lapin::message::Delivery, wire: Wire) {
    let request: Value = serde_json::from_slice(&delivery.data).unwrap_or(Value::Null);
    let body = serde_json::to_vec(&json!({ "body": &request["args"][0], "__end__": false }))
        .expect("JSON");
    if let (Some(reply_to), Some(id)) = (
        delivery.properties.reply_to().clone(),
        delivery.properties.correlation_id().clone(),
    ) {
        let _ = channel
            .basic_publish(
                "".into(),
                reply_to.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                match wire {
                    Wire::Minimal => BasicProperties::default().with_correlation_id(id),
                    Wire::Farine => BasicProperties::default()
                        .with_correlation_id(id)
                        .with_content_type("application/json".into())
                        .with_delivery_mode(1),
                },
            )
            .await;
    }
    let _ = delivery.acker.ack(BasicAckOptions::default()).await;
}

type Waiting = Arc<Mutex<HashMap<String, oneshot::Sender<Vec<u8>>>>>;

/// A hand-written RPC client: one reply queue, a table of calls in flight, requests published
/// without confirms.
#[derive(Clone)]
pub struct EchoClient {
    channel: Channel,
    reply_to: ShortString,
    queue: String,
    wire: Wire,
    waiting: Waiting,
    next: Arc<AtomicU64>,
}

impl EchoClient {
    pub async fn connect(uri: &str, server: &EchoServer) -> (Self, Connection) {
        let queue = server.queue.as_str();
        let conn = connect(uri).await;
        let channel = conn.create_channel().await.expect("a channel");
        let replies = conn.create_channel().await.expect("a channel");
        let (reply_to, mut consumer) = farine_test_support::reply_queue(&replies).await;
        let waiting: Waiting = Arc::default();
        let table = waiting.clone();
        tokio::spawn(async move {
            let _replies = replies;
            while let Some(Ok(delivery)) = consumer.next().await {
                let Some(id) = delivery.properties.correlation_id().as_ref() else {
                    continue;
                };
                let sender = table.lock().unwrap().remove(id.as_str());
                if let Some(sender) = sender {
                    let _ = sender.send(delivery.data);
                }
            }
        });
        let client = Self {
            channel,
            reply_to,
            queue: queue.to_string(),
            wire: server.wire,
            waiting,
            next: Arc::default(),
        };
        (client, conn)
    }

    pub async fn echo(&self, value: &Value) -> Value {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let id = match self.wire {
            Wire::Minimal => n.to_string(),
            // farine's shape: a per-process prefix, then the counter.
            Wire::Farine => format!("5f3a9c2e7b1d4e60-{n}"),
        };
        let (sender, receiver) = oneshot::channel();
        self.waiting.lock().unwrap().insert(id.clone(), sender);
        let body = serde_json::to_vec(&json!({ "args": [value], "kwargs": {} })).expect("JSON");
        let properties = BasicProperties::default()
            .with_correlation_id(id.into())
            .with_reply_to(self.reply_to.clone())
            .with_delivery_mode(1);
        let published = match self.wire {
            Wire::Minimal => {
                self.channel
                    .basic_publish(
                        "".into(),
                        self.queue.as_str().into(),
                        BasicPublishOptions::default(),
                        &body,
                        properties,
                    )
                    .await
            }
            Wire::Farine => {
                self.channel
                    .basic_publish(
                        FARINE_WIRE_EXCHANGE.into(),
                        FARINE_WIRE_ROUTING_KEY.into(),
                        BasicPublishOptions {
                            mandatory: true,
                            immediate: false,
                        },
                        &body,
                        properties
                            .with_content_type("application/json".into())
                            .with_expiration("30000".into())
                            .with_type("farine.single".into()),
                    )
                    .await
            }
        };
        published.expect("request published");
        let reply = tokio::time::timeout(Duration::from_secs(30), receiver)
            .await
            .expect("a reply within 30 s")
            .expect("the reply queue lives");
        let reply: Value = serde_json::from_slice(&reply).expect("JSON reply");
        reply["body"].clone()
    }
}

/// W4: a channel in confirm mode publishing persistent JSON to `exchange`.
pub async fn confirm_channel(conn: &Connection) -> Channel {
    let channel = conn.create_channel().await.expect("a channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    channel
}

pub async fn publish_confirmed(channel: &Channel, exchange: &str, value: &Value) {
    let body = serde_json::to_vec(value).expect("JSON");
    let confirm = channel
        .basic_publish(
            exchange.into(),
            "w4".into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2),
        )
        .await
        .expect("published")
        .await
        .expect("confirmed");
    assert!(confirm.is_ack(), "the broker acked");
}
