//! Helpers for farine's tests, which run against the real RabbitMQ (and PostgreSQL).
//!
//! Every test that touches the broker makes a [`Broker`]: a RabbitMQ virtual host of the test's
//! own ([`vhost`]) and a connection in it. farine is pointed at it with [`Broker::uri`] (or
//! [`Broker::uri_via`] through a fault proxy), so no two tests and no two runs of the suite can
//! meet, and dropping the `Broker` deletes the vhost with everything in it (even when the test
//! panics; a failed deletion fails the test). Names within a test still come from [`unique`].
//! Waiting is always on a condition with a bound ([`Broker::wait_for_messages`], [`wait_until`]),
//! never a bare sleep.

pub mod asyncapi;
pub mod cluster;
pub mod process;
pub mod proxy;
pub mod sse;
pub mod tls;
pub mod vhost;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::Value;

/// The broker in its default vhost (`$FARINE_TEST_AMQP_URI`, else the local RabbitMQ), for the
/// benchmark; tests use a [`Broker`]'s vhost instead.
pub fn default_vhost_uri() -> String {
    vhost::base_uri()
}

/// The broker's `host:port`, for a proxy in front of it.
pub fn broker_addr() -> std::net::SocketAddr {
    use std::net::ToSocketAddrs;
    let (_, _, host) = vhost::broker_parts();
    host.to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .unwrap_or_else(|| panic!("the broker address `{host}` resolves"))
}

/// Panics with `message` unless the thread is already panicking (then prints it): a cleanup
/// that failed fails the test, without turning a test failure into an abort.
fn cleanup_failed(message: String) {
    if std::thread::panicking() {
        eprintln!("test support: {message}");
    } else {
        panic!("test support: {message}");
    }
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

/// A vhost of the test's own on the real broker, and a raw lapin connection in it for setting up
/// and observing the test. Dropping it deletes the vhost and everything in it.
pub struct Broker {
    vhost: String,
    connection: Connection,
    channel: Channel,
}

impl Broker {
    /// Makes a vhost for the test and connects to it.
    pub async fn connect() -> Self {
        let vhost = vhost::new_name();
        let made = vhost.clone();
        tokio::task::spawn_blocking(move || vhost::create(&made))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        // From here on the vhost is deleted however the rest goes.
        let mut guard = VhostGuard(Some(vhost.clone()));
        let uri = with_vhost(&vhost::base_uri(), &vhost);
        let connection = Connection::connect(&uri, ConnectionProperties::default())
            .await
            .expect("the test broker is reachable (is RabbitMQ running?)");
        let channel = connection.create_channel().await.expect("a channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        guard.0 = None; // the Broker deletes it now
        Self {
            vhost,
            connection,
            channel,
        }
    }

    /// The test's vhost.
    pub fn vhost(&self) -> &str {
        &self.vhost
    }

    /// The AMQP URI of the test's vhost, to give farine.
    pub fn uri(&self) -> String {
        with_vhost(&vhost::base_uri(), &self.vhost)
    }

    /// The AMQP URI of the test's vhost through a proxy listening on `addr`.
    pub fn uri_via(&self, addr: std::net::SocketAddr) -> String {
        let (user, password, _) = vhost::broker_parts();
        format!("amqp://{user}:{password}@{addr}/{}", self.vhost)
    }

    /// The `amqps://` URI of the test's vhost through a TLS front on local port `port`, by host
    /// name (the test certificate's).
    pub fn amqps_uri_via(&self, port: u16) -> String {
        let (user, password, _) = vhost::broker_parts();
        format!("amqps://{user}:{password}@localhost:{port}/{}", self.vhost)
    }

    /// The test's connection, for channels of its own.
    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// The test's channel, for anything the helpers do not cover.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Declares a durable exchange.
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
    }

    /// Declares a queue of the test's own bound to `exchange`.
    pub async fn bind_queue(&self, exchange: &str, routing_key: &str) -> String {
        let queue = unique("observer");
        self.declare_bound_queue(&queue, exchange, routing_key, FieldTable::default())
            .await;
        queue
    }

    /// Declares durable queue `queue` with `arguments` and binds it to `exchange` with
    /// `routing_key`: the topology a service will declare, made first so that messages can
    /// wait there before it starts.
    pub async fn declare_bound_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                arguments,
            )
            .await
            .expect("queue declared");
        self.channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                routing_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("queue bound");
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

    /// Publishes each of `values` as JSON, all at once, and waits for every confirm.
    pub async fn publish_json_batch(&self, exchange: &str, routing_key: &str, values: &[Value]) {
        let mut confirms = Vec::with_capacity(values.len());
        for value in values {
            let body = serde_json::to_vec(value).expect("serialisable");
            confirms.push(
                self.channel
                    .basic_publish(
                        exchange.into(),
                        routing_key.into(),
                        BasicPublishOptions::default(),
                        &body,
                        BasicProperties::default(),
                    )
                    .await
                    .expect("published"),
            );
        }
        for confirm in confirms {
            let confirmation = confirm.await.expect("confirmed");
            assert!(confirmation.is_ack(), "the broker took the message");
        }
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
        passive_queue_state(&self.connection, queue).await
    }

    /// What the broker's management API knows of `queue` in the test's vhost (its `type`,
    /// `arguments`, `durable`, ...), as JSON.
    pub fn queue_info(&self, queue: &str) -> Value {
        vhost::get(&format!("/api/queues/{}/{queue}", self.vhost)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// What the broker's management API knows of `exchange` in the test's vhost (its `type`,
    /// `durable`, `arguments`, ...), as JSON.
    pub fn exchange_info(&self, exchange: &str) -> Value {
        vhost::get(&format!("/api/exchanges/{}/{exchange}", self.vhost))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The names of the queues in the test's vhost, and of its exchanges (less the broker's
    /// own: the default exchange and `amq.*`), from the management API.
    pub fn declared(&self) -> (Vec<String>, Vec<String>) {
        let names = |kind: &str| -> Vec<String> {
            let listed = vhost::get(&format!("/api/{kind}/{}?columns=name", self.vhost))
                .unwrap_or_else(|e| panic!("{e}"));
            listed
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|item| item["name"].as_str())
                .filter(|name| !name.is_empty() && !name.starts_with("amq."))
                .map(str::to_string)
                .collect()
        };
        (names("queues"), names("exchanges"))
    }

    /// The names farine gave its connections open now in the test's vhost (`<program>: ...
    /// (farine, pid N)`, as the management UI shows them; the test's own connection is not one
    /// of them).
    pub fn farine_connections(&self) -> Vec<String> {
        let listed = vhost::get(&format!("/api/vhosts/{}/connections", self.vhost))
            .unwrap_or_else(|e| panic!("{e}"));
        listed
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|connection| connection["user_provided_name"].as_str())
            .filter(|name| name.contains("(farine, pid "))
            .map(str::to_string)
            .collect()
    }

    /// Waits until `queue` has `consumers` consumers, for at most `bound`.
    pub async fn wait_for_consumers(&self, queue: &str, consumers: u32, bound: Duration) -> bool {
        self.wait_for_state(queue, bound, |(_, c)| c == consumers)
            .await
    }

    /// Waits until `queue` holds `ready` messages ready for delivery, for at most `bound`.
    pub async fn wait_for_ready(&self, queue: &str, ready: u32, bound: Duration) -> bool {
        self.wait_for_state(queue, bound, |(r, _)| r == ready).await
    }

    /// Waits until `queue`'s (ready, consumers) satisfy `done`, for at most `bound`.
    async fn wait_for_state(
        &self,
        queue: &str,
        bound: Duration,
        done: impl Fn((u32, u32)) -> bool,
    ) -> bool {
        poll_until(bound, Duration::from_millis(20), async || {
            self.queue_state(queue).await.is_some_and(&done)
        })
        .await
    }
}

/// `(ready messages, consumers)` of `queue`, from a passive declare on a channel of its own on
/// `connection`; `None` when the queue does not exist (or the broker does not answer).
pub async fn passive_queue_state(connection: &Connection, queue: &str) -> Option<(u32, u32)> {
    let channel = connection.create_channel().await.ok()?;
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
        .ok();
    let _ = channel.close(200, "done".into()).await;
    declared.map(|declared| (declared.message_count(), declared.consumer_count()))
}

/// Asks `check` every `interval` until it holds, for at most `bound`: whether it did.
pub async fn poll_until(
    bound: Duration,
    interval: Duration,
    mut check: impl AsyncFnMut() -> bool,
) -> bool {
    let deadline = Instant::now() + bound;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(interval).await;
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // Deleting the vhost closes every connection still open in it, this one included.
        if let Err(e) = vhost::delete(&self.vhost) {
            cleanup_failed(e);
        }
    }
}

/// Deletes a vhost on drop: for the moments a [`Broker`] is not made yet.
struct VhostGuard(Option<String>);

impl Drop for VhostGuard {
    fn drop(&mut self) {
        if let Some(vhost) = self.0.take()
            && let Err(e) = vhost::delete(&vhost)
        {
            cleanup_failed(e);
        }
    }
}

/// `uri` with its path replaced by `vhost`.
fn with_vhost(uri: &str, vhost: &str) -> String {
    let (scheme, rest) = uri.split_once("://").unwrap_or(("amqp", uri));
    let authority = rest.split('/').next().unwrap_or(rest);
    format!("{scheme}://{authority}/{vhost}")
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
        if let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            cleanup_failed(format!("removing {}: {e}", self.path.display()));
        }
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

    /// How many connections to this database are open now (other than the one asking).
    pub async fn connections(&self) -> i64 {
        use sqlx::Connection;
        let mut admin = sqlx::PgConnection::connect(POSTGRES_ADMIN)
            .await
            .expect("PostgreSQL is reachable");
        sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = $1")
            .bind(&self.name)
            .fetch_one(&mut admin)
            .await
            .expect("pg_stat_activity is readable")
    }

    /// A connection to this database, for a test's own queries.
    pub async fn connect(&self) -> sqlx::PgConnection {
        use sqlx::Connection;
        let url = format!("postgres://postgres@127.0.0.1:5432/{}", self.name);
        sqlx::PgConnection::connect(&url)
            .await
            .expect("the test's database is reachable")
    }

    /// The one number `sql` selects in this database (`SELECT count(*) FROM ...`).
    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_one(&mut self.connect().await)
            .await
            .expect("the query runs")
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
        let dropped = std::thread::spawn(move || -> Result<(), String> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async move {
                use sqlx::Connection;
                let mut admin = sqlx::PgConnection::connect(POSTGRES_ADMIN)
                    .await
                    .map_err(|e| e.to_string())?;
                let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                sqlx::query(sqlx::AssertSqlSafe(drop))
                    .execute(&mut admin)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
        })
        .join()
        .unwrap_or_else(|_| Err("the cleanup thread panicked".into()));
        if let Err(e) = dropped {
            cleanup_failed(format!("dropping database {}: {e}", self.name));
        }
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
