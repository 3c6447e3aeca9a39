//! Helpers for farine's tests, which run against the real RabbitMQ (and PostgreSQL).
//!
//! Every test names its exchanges and queues with [`unique`] and registers them with a
//! [`Broker`], which deletes them when dropped (even when the test panics). Waiting is always on
//! a condition with a bound ([`Broker::wait_for_messages`], [`wait_until`]), never a bare sleep.

pub mod process;
pub mod proxy;
pub mod sse;
pub mod tls;

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::Value;

/// The broker the tests use: `$FARINE_TEST_AMQP_URI`, else the local RabbitMQ.
pub fn amqp_uri() -> String {
    std::env::var("FARINE_TEST_AMQP_URI")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".to_string())
}

/// A name no other test (or test run) uses: `prefix-<pid>-<time>-<counter>`.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() % 1_000_000_000_000)
        .unwrap_or(0);
    format!(
        "test-{prefix}-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Waits until `condition` holds, checking every 10 ms, for at most `bound`.
pub async fn wait_until(bound: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + bound;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A message read back from a queue.
#[derive(Debug, Clone)]
pub struct Received {
    pub body: Vec<u8>,
    pub properties: BasicProperties,
    pub routing_key: String,
    pub exchange: String,
}

impl Received {
    /// The body as JSON (panics when it is not: a test failure).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("the body is JSON")
    }
}

/// A raw lapin connection for setting up and observing a test, with cleanup on drop.
pub struct Broker {
    connection: Connection,
    channel: Channel,
    queues: Mutex<Vec<String>>,
    exchanges: Mutex<Vec<String>>,
}

impl Broker {
    pub async fn connect() -> Self {
        let connection = Connection::connect(&amqp_uri(), ConnectionProperties::default())
            .await
            .expect("the test broker is reachable (is RabbitMQ running?)");
        let channel = connection.create_channel().await.expect("a channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        Self {
            connection,
            channel,
            queues: Mutex::new(Vec::new()),
            exchanges: Mutex::new(Vec::new()),
        }
    }

    /// The test's connection, for channels of its own.
    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// The test's channel, for anything the helpers do not cover.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Deletes `queue` when the broker is dropped, with `<queue>.retry` and `<queue>.dead`
    /// (a farine consumer's retry and dead-letter queues) when they exist.
    pub fn forget_queue_on_drop(&self, queue: &str) {
        self.queues.lock().unwrap().push(queue.to_string());
    }

    /// Deletes `exchange` when the broker is dropped.
    pub fn forget_exchange_on_drop(&self, exchange: &str) {
        self.exchanges.lock().unwrap().push(exchange.to_string());
    }

    /// Declares a durable exchange (deleted on drop).
    pub async fn declare_exchange(&self, name: &str, kind: ExchangeKind) {
        self.channel
            .exchange_declare(
                name.into(),
                kind,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("exchange declared");
        self.forget_exchange_on_drop(name);
    }

    /// Declares a queue of the test's own bound to `exchange` (deleted on drop).
    pub async fn bind_queue(&self, exchange: &str, routing_key: &str) -> String {
        let queue = unique("observer");
        self.channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("queue declared");
        self.forget_queue_on_drop(&queue);
        self.channel
            .queue_bind(
                queue.as_str().into(),
                exchange.into(),
                routing_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("queue bound");
        queue
    }

    /// Publishes raw bytes and waits for the broker's confirm.
    pub async fn publish(&self, exchange: &str, routing_key: &str, body: &[u8]) {
        self.publish_with(exchange, routing_key, body, BasicProperties::default())
            .await;
    }

    /// Publishes with properties and waits for the broker's confirm.
    pub async fn publish_with(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) {
        self.channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .expect("published")
            .await
            .expect("confirmed");
    }

    /// Publishes `value` as JSON and waits for the confirm.
    pub async fn publish_json(&self, exchange: &str, routing_key: &str, value: &Value) {
        let body = serde_json::to_vec(value).expect("serialisable");
        self.publish(exchange, routing_key, &body).await;
    }

    /// Takes one message from `queue` (acking it), if there is one.
    pub async fn get(&self, queue: &str) -> Option<Received> {
        let message = self
            .channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .expect("basic.get")?;
        let delivery = message.delivery;
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
        Some(Received {
            body: delivery.data,
            properties: delivery.properties,
            routing_key: delivery.routing_key.to_string(),
            exchange: delivery.exchange.to_string(),
        })
    }

    /// Takes messages from `queue` until there are `count`, for at most `bound`.
    pub async fn wait_for_messages(
        &self,
        queue: &str,
        count: usize,
        bound: Duration,
    ) -> Vec<Received> {
        let deadline = Instant::now() + bound;
        let mut received = Vec::new();
        while received.len() < count && Instant::now() < deadline {
            match self.get(queue).await {
                Some(message) => received.push(message),
                None => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        received
    }

    /// Takes every message now in `queue`.
    pub async fn drain(&self, queue: &str) -> Vec<Received> {
        let mut received = Vec::new();
        while let Some(message) = self.get(queue).await {
            received.push(message);
        }
        received
    }

    /// `(ready messages, consumers)` of `queue`, from a passive declare.
    pub async fn queue_state(&self, queue: &str) -> Option<(u32, u32)> {
        let channel = self.connection.create_channel().await.ok()?;
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .ok()?;
        let _ = channel.close(200, "done".into()).await;
        Some((declared.message_count(), declared.consumer_count()))
    }

    /// Waits until `queue` has `consumers` consumers, for at most `bound`.
    pub async fn wait_for_consumers(&self, queue: &str, consumers: u32, bound: Duration) -> bool {
        let deadline = Instant::now() + bound;
        loop {
            if self
                .queue_state(queue)
                .await
                .is_some_and(|(_, c)| c == consumers)
            {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut *self.queues.lock().unwrap());
        let exchanges = std::mem::take(&mut *self.exchanges.lock().unwrap());
        if queues.is_empty() && exchanges.is_empty() {
            return;
        }
        // Drop cannot await: clean up on a thread with a runtime of its own.
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                let Ok(connection) =
                    Connection::connect(&amqp_uri(), ConnectionProperties::default()).await
                else {
                    return;
                };
                // A farine consumer's queue comes with its retry and dead-letter queues.
                let companions = queues
                    .iter()
                    .flat_map(|q| [format!("{q}.retry"), format!("{q}.dead")])
                    .collect::<Vec<_>>();
                for queue in queues.into_iter().chain(companions) {
                    if let Ok(channel) = connection.create_channel().await {
                        let _ = channel
                            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                            .await;
                    }
                }
                for exchange in exchanges {
                    if let Ok(channel) = connection.create_channel().await {
                        let _ = channel
                            .exchange_delete(
                                exchange.as_str().into(),
                                ExchangeDeleteOptions::default(),
                            )
                            .await;
                    }
                }
                let _ = connection.close(200, "cleanup done".into()).await;
            });
        });
        let _ = cleanup.join();
    }
}

/// A config file of the test's own, removed on drop.
pub struct IniFile {
    pub path: std::path::PathBuf,
}

impl IniFile {
    pub fn new(contents: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{}.ini", unique("farine")));
        std::fs::write(&path, contents).expect("temp ini written");
        Self { path }
    }
}

impl Drop for IniFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A PostgreSQL database of the test's own (on the local server, as user `postgres`), dropped
/// when this is dropped.
pub struct Database {
    pub name: String,
}

const POSTGRES_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";

impl Database {
    pub async fn create() -> Self {
        use sqlx::Connection;
        let name = unique("db").replace('-', "_");
        let mut admin = sqlx::PgConnection::connect(POSTGRES_ADMIN)
            .await
            .expect("PostgreSQL is reachable (is it running?)");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("database created");
        Self { name }
    }

    /// The `db_*` keys of a farine section for this database.
    pub fn ini_keys(&self) -> String {
        format!(
            "db_connector = postgres\ndb_host = 127.0.0.1\ndb_name = {}\ndb_user = postgres\n",
            self.name
        )
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                use sqlx::Connection;
                if let Ok(mut admin) = sqlx::PgConnection::connect(POSTGRES_ADMIN).await {
                    let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                    let _ = sqlx::query(sqlx::AssertSqlSafe(drop))
                        .execute(&mut admin)
                        .await;
                }
            });
        })
        .join();
    }
}

/// A hand-written RPC caller's reply queue on `channel`: server-named, exclusive (gone with the
/// connection), consumed without acks, as `docs/rpc-protocol.md` describes. Returns its name
/// and its consumer.
pub async fn reply_queue(channel: &Channel) -> (lapin::types::ShortString, lapin::Consumer) {
    use lapin::options::BasicConsumeOptions;
    let queue = private_queue(channel).await;
    let consumer = channel
        .basic_consume(
            queue.clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("reply queue consumed");
    (queue, consumer)
}

/// Declares a server-named, exclusive queue on `channel` (gone with the connection); returns
/// its name.
pub async fn private_queue(channel: &Channel) -> lapin::types::ShortString {
    channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("private queue declared")
        .name()
        .clone()
}

/// A local port nothing listens on now (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free local port")
}

/// `GET path` on `127.0.0.1:port`: the status code and the body, or `None` when nothing answers.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())?;
    Some((status, body))
}
