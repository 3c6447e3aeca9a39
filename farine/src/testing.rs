//! The test kit: run your services in-process on an in-memory broker with RabbitMQ's
//! semantics, in a plain `cargo test`, without RabbitMQ, PostgreSQL or any network.
//!
//! Enable it for tests only:
//!
//! ```toml
//! [dev-dependencies]
//! farine = { version = "0.1", features = ["testing"] }
//! tokio = { version = "1", features = ["macros", "rt", "time", "test-util"] }
//! ```
//!
//! A [`TestBroker`] is one in-memory broker (named `memory://<name>`; every farine connection
//! to that URI in this process reaches it). [`TestBroker::start`] starts services of the test
//! binary (yours, and stubs your test defines) on it with an INI text or your config file,
//! pointed at the broker; then the test publishes, waits for what the handlers published, calls
//! RPC methods through the ordinary [`rpc::Client`](crate::rpc::Client), reads queue depths and
//! dead letters, and feeds `#[stream::http]` handlers through an in-memory event stream
//! ([`TestBroker::feed`], an endpoint `memory://<feed>`).
//!
//! Time is tokio's: under `#[tokio::test(start_paused = true)]` retry delays, message TTLs
//! and `#[execute]` intervals pass at once, and a wait with a bound that nothing can satisfy
//! fails at once too.
//!
#![doc = include_str!("docs/testing.md")]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::amqp::error::{BrokerError, Resource};
use crate::amqp::memory;
use crate::amqp::message::Headers;
use crate::amqp::message::{ATTEMPT_HEADER, ERROR_HEADER, REASON_HEADER};
use crate::amqp::publisher::PublishError;
use crate::config::{Config, ConfigError};
use crate::runtime::{Running, Runtime, StartError};

#[cfg(feature = "sse")]
pub use crate::sse::feed::Feed;

/// The default bound of [`TestBroker::next_published`].
pub const WAIT: Duration = Duration::from_secs(5);

/// An in-memory broker and what a test does with it. Dropping it (and stopping the services
/// on it) ends the broker.
pub struct TestBroker {
    broker: memory::Broker,
    name: String,
    /// The journal position [`TestBroker::next_published`] reads from.
    seen: std::sync::Mutex<usize>,
}

impl Default for TestBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for TestBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestBroker")
            .field("uri", &self.uri())
            .finish()
    }
}

/// One message a publish put on the broker, as the broker received it.
#[derive(Clone, Debug)]
pub struct Published {
    pub exchange: String,
    pub routing_key: String,
    pub body: Vec<u8>,
    pub headers: Headers,
    pub content_type: Option<String>,
    pub correlation_id: Option<String>,
    /// The queues it was put in (none: returned or dropped).
    pub queues: Vec<String>,
}

impl Published {
    /// The body decoded as JSON into `T`; panics (naming the body) when it does not decode.
    pub fn json<T: DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "the message published to `{}` with routing key `{}` is not the JSON expected: {e}; body: {}",
                self.exchange,
                self.routing_key,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn from_journal(published: &memory::Published) -> Self {
        let queues = match &published.outcome {
            memory::PublishOutcome::Routed(queues) => queues.clone(),
            memory::PublishOutcome::Rejected { routed, .. } => routed.clone(),
            _ => Vec::new(),
        };
        Self {
            exchange: published.exchange.clone(),
            routing_key: published.routing_key.clone(),
            body: published.body.clone(),
            headers: Headers::from(published.properties.headers().clone().unwrap_or_default()),
            content_type: published
                .properties
                .content_type()
                .as_ref()
                .map(|t| t.to_string()),
            correlation_id: published
                .properties
                .correlation_id()
                .as_ref()
                .map(|t| t.to_string()),
            queues,
        }
    }
}

/// A dead letter: a message farine gave up on, as it waits in a dead-letter queue.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    pub body: Vec<u8>,
    /// The error of its last attempt.
    pub error: Option<String>,
    /// How many attempts it had.
    pub attempts: Option<u32>,
    /// `failed` (every attempt failed) or `undecodable`.
    pub reason: Option<String>,
    pub headers: Headers,
}

/// A queue's counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueDepth {
    /// Messages waiting for a consumer; for a stream queue, those its furthest-behind
    /// consumer has yet to get (0 without consumers: a stream keeps its messages).
    pub ready: usize,
    /// Messages delivered and not settled yet.
    pub unacked: usize,
    /// Consumers of the queue.
    pub consumers: usize,
}

/// How services are started on a [`TestBroker`]: see [`TestBroker::start`].
#[must_use = "nothing starts until `.start().await`"]
pub struct Start<'a> {
    kit: &'a TestBroker,
    config: Result<Config, ConfigError>,
    services: Vec<String>,
}

impl Start<'_> {
    /// Starts only these services (default: every service of the binary with a section).
    pub fn services<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.services = names.into_iter().map(Into::into).collect();
        self
    }

    /// Sets `key` of `section` (`"DEFAULT"` for `[DEFAULT]`) above what the INI says: an SSE
    /// `endpoint` pointed at a [`Feed`], a shorter `retry_delay`.
    pub fn set(mut self, section: &str, key: &str, value: impl ToString) -> Self {
        if let Ok(config) = &mut self.config {
            let section = (section != "DEFAULT").then_some(section);
            config.set(section, key, &value.to_string());
        }
        self
    }

    /// Starts the services on the kit's broker and waits until each handler is ready.
    pub async fn start(self) -> Result<Running, StartError> {
        let mut config = self.config?;
        let uri = self.kit.uri();
        // Every service on this broker, whatever its section says; no health listener (a
        // test needs no port).
        let sections: Vec<String> = config.section_names().map(str::to_string).collect();
        for section in std::iter::once(None).chain(sections.iter().map(|s| Some(s.as_str()))) {
            config.set(section, "amqp_uri", &uri);
            config.set(section, "health_addr", "off");
        }
        let mut runtime = Runtime::new(config);
        if !self.services.is_empty() {
            runtime = runtime.services(self.services);
        }
        runtime.start().await
    }
}

static NEXT: AtomicU64 = AtomicU64::new(0);

impl TestBroker {
    /// A new, empty broker with a name of its own.
    pub fn new() -> Self {
        let name = format!(
            "farine-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        Self {
            broker: memory::Broker::named(&name),
            name,
            seen: std::sync::Mutex::new(0),
        }
    }

    /// The URI of this broker, for `amqp_uri`, [`rpc::Client::connect`](crate::rpc::Client::connect)
    /// or `Publisher::connect`: `memory://<name>`.
    pub fn uri(&self) -> String {
        format!("memory://{}", self.name)
    }

    /// Services configured by `ini` (an INI text, as a config file holds), on this broker.
    pub fn start(&self, ini: &str) -> Start<'_> {
        Start {
            kit: self,
            config: Config::from_ini(ini, "test.ini"),
            services: Vec::new(),
        }
    }

    /// Services configured by the file at `path` (your `etc/farine.ini`), on this broker.
    pub fn start_file(&self, path: impl AsRef<std::path::Path>) -> Start<'_> {
        let path = path.as_ref();
        let config = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })
            .and_then(|text| Config::from_ini(&text, &path.display().to_string()));
        Start {
            kit: self,
            config,
            services: Vec::new(),
        }
    }

    /// Publishes `body` as JSON to `exchange` with `routing_key` (persistent, confirmed);
    /// `NoRoute` when no queue takes it.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &impl Serialize,
    ) -> Result<(), PublishError> {
        let body = serde_json::to_vec(body).map_err(|e| PublishError::Encode {
            exchange: exchange.to_string(),
            cause: e.to_string(),
        })?;
        self.publish_bytes(exchange, routing_key, &body, Some("application/json"))
            .await
    }

    /// Publishes `body` as it is (a body that is not JSON, to see a handler reject it).
    pub async fn publish_bytes(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        content_type: Option<&str>,
    ) -> Result<(), PublishError> {
        let connection = self.broker.connect("farine test kit");
        let result = async {
            let channel = connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            let mut properties = BasicProperties::default().with_delivery_mode(2);
            if let Some(content_type) = content_type {
                properties = properties.with_content_type(content_type.into());
            }
            channel
                .basic_publish(
                    exchange,
                    routing_key,
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    body,
                    properties,
                )
                .await?
                .await
        }
        .await;
        let _ = connection.close(200, "done").await;
        let broker = |e: lapin::Error| {
            PublishError::Broker(BrokerError::from_lapin(
                &e,
                Resource::Exchange(exchange.to_string()),
                &self.uri(),
            ))
        };
        match result.map_err(broker)? {
            lapin::Confirmation::Ack(Some(_)) => Err(PublishError::Broker(BrokerError::NoRoute {
                exchange: exchange.to_string(),
                routing_key: routing_key.to_string(),
            })),
            _ => Ok(()),
        }
    }

    /// Every publish so far, in order (the kit's own included).
    pub fn journal(&self) -> Vec<Published> {
        self.broker
            .journal()
            .iter()
            .map(Published::from_journal)
            .collect()
    }

    /// The next message published to `exchange` with `routing_key` (after the last one this
    /// method returned), waiting at most [`WAIT`]; panics with every publish seen otherwise.
    pub async fn next_published(&self, exchange: &str, routing_key: &str) -> Published {
        self.next_published_within(exchange, routing_key, WAIT)
            .await
    }

    /// As [`TestBroker::next_published`], with a bound of `within`.
    pub async fn next_published_within(
        &self,
        exchange: &str,
        routing_key: &str,
        within: Duration,
    ) -> Published {
        let from = *self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let wait = self.broker.wait_for_publish(from, |published| {
            published.exchange == exchange && published.routing_key == routing_key
        });
        match tokio::time::timeout(within, wait).await {
            Ok((at, published)) => {
                *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = at + 1;
                Published::from_journal(&published)
            }
            Err(_) => panic!(
                "nothing was published to exchange `{exchange}` with routing key `{routing_key}` within {within:?}; published: {}",
                self.describe_journal()
            ),
        }
    }

    fn describe_journal(&self) -> String {
        let journal = self.broker.journal();
        if journal.is_empty() {
            return "nothing".to_string();
        }
        journal
            .iter()
            .map(|p| {
                format!(
                    "\n  `{}` `{}` -> {:?}: {}",
                    p.exchange,
                    p.routing_key,
                    p.outcome,
                    String::from_utf8_lossy(&p.body)
                )
            })
            .collect()
    }

    /// The counts of `queue`, `None` when it does not exist.
    pub fn queue(&self, queue: &str) -> Option<QueueDepth> {
        self.broker.queue_depth(queue).map(|stats| QueueDepth {
            ready: stats.ready,
            unacked: stats.unacked,
            consumers: stats.consumers,
        })
    }

    /// Waits until `queue` exists with no message ready or unacked (every message handled;
    /// for a stream queue, every consumer of it at the end and done); panics after `within`.
    pub async fn wait_settled(&self, queue: &str, within: Duration) {
        let mut changed = self.broker.changes();
        let settled = async {
            loop {
                if self
                    .queue(queue)
                    .is_some_and(|q| q.ready == 0 && q.unacked == 0)
                {
                    return;
                }
                if changed.changed().await.is_err() {
                    return;
                }
            }
        };
        if tokio::time::timeout(within, settled).await.is_err() {
            panic!(
                "queue `{queue}` did not settle within {within:?}: {:?}",
                self.queue(queue)
            );
        }
    }

    /// The messages waiting in `queue` (their bodies), without taking them.
    pub fn messages(&self, queue: &str) -> Vec<Vec<u8>> {
        self.broker
            .peek(queue)
            .into_iter()
            .map(|(_, body)| body)
            .collect()
    }

    /// The dead letters waiting in `dead_letter_queue` (a handler's is
    /// `<queue>.dead` unless configured), without taking them.
    pub fn dead_letters(&self, dead_letter_queue: &str) -> Vec<DeadLetter> {
        self.broker
            .peek(dead_letter_queue)
            .into_iter()
            .map(|(properties, body)| {
                let headers = Headers::from(properties.headers().clone().unwrap_or_default());
                let text = |name: &str| {
                    headers.get(name).and_then(|value| match value {
                        lapin::types::AMQPValue::LongString(s) => {
                            Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                        }
                        lapin::types::AMQPValue::ShortString(s) => Some(s.to_string()),
                        _ => None,
                    })
                };
                let attempts = headers.get(ATTEMPT_HEADER).and_then(|value| match value {
                    lapin::types::AMQPValue::LongUInt(n) => Some(*n),
                    lapin::types::AMQPValue::LongInt(n) => u32::try_from(*n).ok(),
                    lapin::types::AMQPValue::LongLongInt(n) => u32::try_from(*n).ok(),
                    _ => None,
                });
                DeadLetter {
                    error: text(ERROR_HEADER),
                    reason: text(REASON_HEADER),
                    attempts,
                    body,
                    headers,
                }
            })
            .collect()
    }

    /// An RPC client of `service` on this broker (the ordinary client).
    pub async fn client(&self, service: &str) -> crate::rpc::Client {
        crate::rpc::Client::connect(&self.uri(), service, WAIT)
            .await
            .expect("the in-memory broker always accepts a connection")
    }

    #[cfg(feature = "sse")]
    /// The in-memory event stream `name`: an `#[stream::http]` handler whose `endpoint` is
    /// [`Feed::endpoint`] (`memory://<name>`) reads it.
    pub fn feed(&self, name: &str) -> Feed {
        Feed::named(&format!("{}-{name}", self.name))
    }

    /// Breaks every connection to the broker, as a network failure would: handlers reconnect.
    pub fn kill_connections(&self) {
        self.broker.kill_connections();
    }
}
