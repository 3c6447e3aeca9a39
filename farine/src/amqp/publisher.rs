//! Publishing: the [`Publisher`] a `#[publish]` method receives.
//!
//! A publisher owns one channel in confirm mode, opened on first use and reopened after a failure.
//! [`Publisher::publish`] returns once the broker confirmed the message (publisher confirms), or
//! with a typed error within `publish_timeout`: it never hangs. Publishes from concurrent tasks
//! share the channel and are in flight together, so `join_all` over many `publish` calls pipelines
//! them.

use std::borrow::Cow;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::future::Either;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation};

use super::transport::{Channel, Confirm};
use serde::Serialize;

use super::connection::{ConnectError, Connector};
use super::error::{BrokerError, Resource};
use super::topology::ExchangeSettings;

/// A failure to publish, naming the exchange and what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    #[error(
        "publisher `{service}.{method}` was used outside a running farine service: start the service with farine, or pass a Publisher yourself (`{method}_with`)"
    )]
    NotRunning {
        service: &'static str,
        method: &'static str,
    },
    #[error("cannot encode the message for exchange `{exchange}` as JSON: {cause}")]
    Encode { exchange: String, cause: String },
    /// The body is larger than `max_message_bytes`: refused before it reaches the broker
    /// (which would close the channel, or the connection, over it).
    #[error(
        "the message for exchange `{exchange}` is {size} bytes, over max_message_bytes = {limit}: send a reference to the data instead, or raise the limit"
    )]
    TooLarge {
        exchange: String,
        size: usize,
        limit: usize,
    },
    /// A routing key or a property (message id, correlation id, reply-to, type) is longer
    /// than AMQP's 255 bytes: refused before it reaches the broker.
    #[error(
        "the {field} for exchange `{exchange}` is {length} bytes long; AMQP allows at most 255"
    )]
    TooLong {
        exchange: String,
        field: &'static str,
        length: usize,
    },
    /// The broker refused the message (`NoRoute` for a `mandatory` message nobody takes,
    /// `NotFound` for a missing exchange, ...) or the connection is broken.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(
        "the broker refused (nacked) the message for exchange `{exchange}`, routing key `{routing_key}`"
    )]
    Nacked {
        exchange: String,
        routing_key: String,
    },
    #[error(
        "no confirm from the broker within {after:?} for exchange `{exchange}`, routing key `{routing_key}`"
    )]
    Timeout {
        exchange: String,
        routing_key: String,
        after: Duration,
    },
}

impl PublishError {
    /// The broker's error, when the broker refused the message or the connection broke.
    pub fn broker(&self) -> Option<&BrokerError> {
        match self {
            PublishError::Broker(error) => Some(error),
            _ => None,
        }
    }
}

impl From<ConnectError> for PublishError {
    fn from(error: ConnectError) -> Self {
        PublishError::Broker(error.into())
    }
}

/// Per-message options of [`Publisher::publish_with`]. The defaults are those of
/// [`Publisher::publish`]: the publisher's routing key, persistent, JSON, not mandatory.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct PublishOptions {
    /// Overrides the publisher's routing key.
    pub routing_key: Option<String>,
    pub headers: Option<FieldTable>,
    /// The message id; by default a unique one (`<process prefix>-<counter>`), so that a
    /// message sent again after a broken connection is recognisable by a consumer's inbox.
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    /// Per-message TTL.
    pub expiration: Option<Duration>,
    pub priority: Option<u8>,
    /// Overrides the publisher's delivery mode (persistent by default).
    pub persistent: Option<bool>,
    /// Ask the broker to return the message when no queue is bound for it
    /// ([`BrokerError::NoRoute`]); `None`: the publisher's setting (config `mandatory`).
    pub mandatory: Option<bool>,
    /// Overrides `application/json` (for [`Publisher::publish_bytes`]).
    pub content_type: Option<String>,
    /// The `type` property (the message's type name).
    pub message_type: Option<String>,
}

impl PublishOptions {
    /// The defaults: what [`Publisher::publish`] sends. Each method below sets one option:
    /// `PublishOptions::new().routing_key("order.paid").message_id("o-42")`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sends with this routing key instead of the publisher's.
    pub fn routing_key(mut self, key: impl Into<String>) -> Self {
        self.routing_key = Some(key.into());
        self
    }

    /// Sends these headers (AMQP field table).
    pub fn headers(mut self, headers: FieldTable) -> Self {
        self.headers = Some(headers);
        self
    }

    /// Sends this message id instead of a unique one.
    pub fn message_id(mut self, id: impl Into<String>) -> Self {
        self.message_id = Some(id.into());
        self
    }

    /// Sends this correlation id.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// Sends this reply-to queue name.
    pub fn reply_to(mut self, queue: impl Into<String>) -> Self {
        self.reply_to = Some(queue.into());
        self
    }

    /// Gives the message this time to live.
    pub fn expiration(mut self, ttl: Duration) -> Self {
        self.expiration = Some(ttl);
        self
    }

    /// Sends with this priority (for a queue with `x-max-priority`).
    pub fn priority(mut self, priority: u8) -> Self {
        self.priority = Some(priority);
        self
    }

    /// Persistent (delivery mode 2) or not, instead of the publisher's setting.
    pub fn persistent(mut self, persistent: bool) -> Self {
        self.persistent = Some(persistent);
        self
    }

    /// Mandatory (returned as [`BrokerError::NoRoute`] when no queue takes it) or not,
    /// instead of the publisher's setting.
    pub fn mandatory(mut self, mandatory: bool) -> Self {
        self.mandatory = Some(mandatory);
        self
    }

    /// Sends this content type instead of `application/json` (for
    /// [`Publisher::publish_bytes`]).
    pub fn content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// Sends this `type` property (the message's type name).
    pub fn message_type(mut self, kind: impl Into<String>) -> Self {
        self.message_type = Some(kind.into());
        self
    }
}

/// How a publisher publishes.
#[derive(Debug, Clone)]
pub struct PublisherSettings {
    /// Delivery mode 2 (the broker writes the message to disk in durable queues).
    pub persistent: bool,
    /// The bound on one publish, confirm included.
    pub timeout: Duration,
    /// Declare the exchange when the channel opens. An RPC client does not: a missing
    /// exchange is how it learns that no such service listens.
    pub declare_exchange: bool,
    /// Publish with `mandatory` unless a message says otherwise (config `mandatory`).
    pub mandatory: bool,
    /// The largest body accepted (config `max_message_bytes`).
    pub max_message_bytes: usize,
    /// Send a message again when the connection broke before its confirm. An RPC client does
    /// not: its request names a reply queue that died with the connection.
    pub resend: bool,
    /// Put the channel in confirm mode and wait for each confirm. An RPC server's replies go
    /// without: the request's ack follows the reply on the same connection.
    pub confirm: bool,
    /// Give each message a unique `message_id` unless it has one.
    pub message_ids: bool,
    /// Inside a handler call, carry its trace on (`traceparent`, `tracestate` headers). An RPC
    /// server's replies go without: the caller's trace is the caller's own.
    pub trace: bool,
}

/// The default `max_message_bytes`: 16 MiB, well under RabbitMQ's own limit (128 MiB).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

impl Default for PublisherSettings {
    fn default() -> Self {
        Self {
            persistent: true,
            timeout: Duration::from_secs(10),
            declare_exchange: true,
            mandatory: false,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            resend: true,
            confirm: true,
            message_ids: true,
            trace: true,
        }
    }
}

/// Sends messages to one exchange with one routing key. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    target: Target,
}

#[derive(Clone)]
enum Target {
    Live(Arc<Core>),
    Detached {
        service: &'static str,
        method: &'static str,
    },
}

pub(crate) struct Core {
    connector: Arc<Connector>,
    exchange: ExchangeSettings,
    routing_key: String,
    settings: PublisherSettings,
    /// Read by every publish, written when the channel is reopened: a read lock does not make
    /// concurrent publishers wait for each other.
    channel: RwLock<Option<Channel>>,
    reopen: tokio::sync::Mutex<()>,
    /// The connection is this publisher's own ([`Publisher::connect`]): closed with it.
    own_connection: bool,
    /// The runtime's counts of what this publisher sent (`farine_published_total`).
    metrics: Option<crate::observe::metrics::PublishMetrics>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.target {
            Target::Live(core) => f
                .debug_struct("Publisher")
                .field("exchange", &core.exchange.name)
                .field("routing_key", &core.routing_key)
                .finish(),
            Target::Detached { service, method } => f
                .debug_struct("Publisher")
                .field("detached", &format_args!("{service}.{method}"))
                .finish(),
        }
    }
}

impl Publisher {
    /// A publisher on a connector of the caller's (farine's own tests and benchmarks);
    /// programs use [`Publisher::connect`].
    #[doc(hidden)]
    pub fn new(
        connector: Arc<Connector>,
        exchange: ExchangeSettings,
        routing_key: impl Into<String>,
        settings: PublisherSettings,
    ) -> Self {
        Self::live(
            connector,
            exchange,
            routing_key.into(),
            settings,
            false,
            None,
        )
    }

    /// As [`Publisher::new`], counting what it sends in `metrics`.
    pub(crate) fn observed(
        connector: Arc<Connector>,
        exchange: ExchangeSettings,
        routing_key: String,
        settings: PublisherSettings,
        metrics: Option<crate::observe::metrics::PublishMetrics>,
    ) -> Self {
        Self::live(connector, exchange, routing_key, settings, false, metrics)
    }

    fn live(
        connector: Arc<Connector>,
        exchange: ExchangeSettings,
        routing_key: String,
        settings: PublisherSettings,
        own_connection: bool,
        metrics: Option<crate::observe::metrics::PublishMetrics>,
    ) -> Self {
        Self {
            target: Target::Live(Arc::new(Core {
                connector,
                exchange,
                routing_key,
                settings,
                channel: RwLock::new(None),
                reopen: tokio::sync::Mutex::new(()),
                own_connection,
                metrics,
            })),
        }
    }

    /// A publisher with a connection of its own to `uri` (one node, or several separated by
    /// commas), for a program that is not a farine service: a tool, a script, a test. It sends
    /// to `exchange` with `routing_key` unless a message says otherwise
    /// ([`PublishOptions::routing_key`]), as JSON, persistent, and waits for each confirm; after
    /// a broken connection it reconnects and sends again what was not confirmed, as a
    /// service's publishers do. The connection is named after the program in the broker.
    ///
    /// The exchange is not declared: the services that consume from it declare it, and a
    /// publish to an exchange that does not exist is [`BrokerError::NotFound`]. Returns once
    /// the connection and its channel are open, so a wrong URI or password is the error here.
    ///
    /// ```no_run
    /// # async fn send() -> Result<(), farine::PublishError> {
    /// let orders = farine::Publisher::connect(
    ///     "amqp://guest:guest@127.0.0.1:5672",
    ///     "orders",
    ///     "order.created",
    /// )
    /// .await?;
    /// orders.publish(&serde_json::json!({"id": 1})).await?;
    /// orders.close().await;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(
        uri: &str,
        exchange: &str,
        routing_key: &str,
    ) -> Result<Self, PublishError> {
        let settings = PublisherSettings {
            declare_exchange: false,
            ..PublisherSettings::default()
        };
        let name = super::connection::connection_name(
            &super::connection::program_name(),
            &format!("publisher to {exchange}"),
        );
        let connector = Arc::new(Connector::new(uri, name, settings.timeout));
        let exchange = ExchangeSettings {
            name: exchange.to_string(),
            ..ExchangeSettings::default_exchange()
        };
        let publisher = Self::live(
            connector.clone(),
            exchange,
            routing_key.to_string(),
            settings,
            true,
            None,
        );
        // Nothing is opened yet: names AMQP cannot carry are refused before any connection.
        let core = publisher.core()?;
        core.check_short("exchange name", &core.exchange.name)?;
        core.check_short("routing key", &core.routing_key)?;
        if let Err(e) = publisher.prepare().await {
            connector.close().await;
            return Err(e);
        }
        Ok(publisher)
    }

    /// Closes a publisher made by [`Publisher::connect`]: its channel and its connection; a
    /// publish after this is an error. Waits at most the publish timeout. Does nothing to a
    /// publisher of a running service (others share its channel): the service closes it.
    pub async fn close(&self) {
        if let Target::Live(core) = &self.target
            && core.own_connection
        {
            self.close_within(core.settings.timeout).await;
            core.connector.close().await;
        }
    }

    pub(crate) fn detached(service: &'static str, method: &'static str) -> Self {
        Self {
            target: Target::Detached { service, method },
        }
    }

    /// The exchange this publisher sends to (`None` when detached from any runtime).
    pub fn exchange(&self) -> Option<&str> {
        match &self.target {
            Target::Live(core) => Some(&core.exchange.name),
            Target::Detached { .. } => None,
        }
    }

    /// The routing key this publisher sends with (`None` when detached from any runtime).
    pub fn routing_key(&self) -> Option<&str> {
        match &self.target {
            Target::Live(core) => Some(&core.routing_key),
            Target::Detached { .. } => None,
        }
    }

    /// Sends `value` as JSON (`application/json`, persistent) and waits for the broker's confirm.
    ///
    /// The value is encoded when this is called; the returned future sends it.
    pub fn publish<'a, T: Serialize + ?Sized>(
        &'a self,
        value: &T,
    ) -> impl Future<Output = Result<(), PublishError>> + Send + use<'a, T> {
        self.publish_with(value, PublishOptions::default())
    }

    /// As [`Publisher::publish`], with per-message options. The value is encoded when this is
    /// called.
    pub fn publish_with<'a, T: Serialize + ?Sized>(
        &'a self,
        value: &T,
        options: PublishOptions,
    ) -> impl Future<Output = Result<(), PublishError>> + Send + use<'a, T> {
        // The message is made ready here, outside the future: a future holds what it captured
        // for its whole life, so each async layer taking the options or the properties by
        // value would carry its own copy (they are a few hundred bytes each, and a publish's
        // future is moved when awaited).
        let payload = self.core().and_then(|core| {
            serde_json::to_vec(value).map_err(|e| PublishError::Encode {
                exchange: core.exchange.name.clone(),
                cause: e.to_string(),
            })
        });
        match payload {
            Ok(payload) => Either::Left(self.send(Cow::Owned(payload), options)),
            Err(e) => Either::Right(std::future::ready(Err(e))),
        }
    }

    /// Sends raw bytes (content type from the options, else `application/json`). As with
    /// [`Publisher::publish`], the message (its properties, its id) is made when this is called.
    pub fn publish_bytes<'a>(
        &'a self,
        payload: &'a [u8],
        options: PublishOptions,
    ) -> impl Future<Output = Result<(), PublishError>> + Send + use<'a> {
        self.send(Cow::Borrowed(payload), options)
    }

    /// Sends `payload` with `options`, waiting for the confirm: what `publish_with` and
    /// `publish_bytes` share.
    fn send<'a>(
        &'a self,
        payload: Cow<'a, [u8]>,
        options: PublishOptions,
    ) -> impl Future<Output = Result<(), PublishError>> + Send + use<'a> {
        match self.outgoing(payload, options) {
            Ok((core, message)) => Either::Left(core.send_bounded(message)),
            Err(e) => Either::Right(std::future::ready(Err(e))),
        }
    }

    /// The live publisher and the message `payload` and `options` make (size checked, options
    /// resolved into properties), or why there is none.
    fn outgoing<'a>(
        &'a self,
        payload: Cow<'a, [u8]>,
        options: PublishOptions,
    ) -> Result<(&'a Arc<Core>, Outgoing<'a>), PublishError> {
        let core = self.core()?;
        Ok((core, core.outgoing(payload, options)?))
    }

    /// Publishes without waiting for the confirm: the returned [`Unconfirmed`] waits for it,
    /// so that a caller can wait for something else at the same time (an RPC client, for its
    /// reply). Never sent again after a reconnection. Neither step is bounded here: the caller
    /// bounds both with its own deadline (one timer per call, not three).
    pub(crate) fn publish_unconfirmed<'a>(
        &'a self,
        payload: &'a [u8],
        options: PublishOptions,
    ) -> impl Future<Output = Result<Unconfirmed, PublishError>> + Send + use<'a> {
        match self.outgoing(Cow::Borrowed(payload), options) {
            Ok((core, message)) => Either::Left(core.start(message)),
            Err(e) => Either::Right(std::future::ready(Err(e))),
        }
    }

    /// Opens the channel and declares the exchange now rather than at the first publish;
    /// bounded by the publish timeout.
    pub async fn prepare(&self) -> Result<(), PublishError> {
        let core = self.core()?;
        let deadline = tokio::time::Instant::now() + core.settings.timeout;
        match tokio::time::timeout_at(deadline, core.channel(deadline)).await {
            Ok(channel) => channel.map(|_| ()),
            Err(_) => Err(core.out_of_time(&core.routing_key)),
        }
    }

    /// Publishes a failed message's copy to `queue` through the default exchange.
    pub(crate) async fn send_copy(
        &self,
        queue: &str,
        copy: &super::message::Copy,
    ) -> Result<(), PublishError> {
        let core = self.core()?;
        core.send_bounded(Outgoing {
            payload: Cow::Borrowed(&copy.body),
            routing_key: Some(Cow::Borrowed(queue)),
            mandatory: core.settings.mandatory,
            properties: copy.properties.clone(),
        })
        .await
    }

    /// The correlation ids of messages the broker returned on a channel without confirms
    /// (lapin keeps them until asked): an RPC client reads them when a call times out.
    pub(crate) async fn take_returned(&self) -> Vec<String> {
        let Ok(core) = self.core() else {
            return Vec::new();
        };
        let Some(channel) = core.live_channel() else {
            return Vec::new();
        };
        let wait = channel.wait_for_confirms();
        match tokio::time::timeout(Duration::from_millis(250), wait).await {
            Ok(Ok(returned)) => returned
                .into_iter()
                .filter_map(|message| {
                    message
                        .delivery
                        .properties
                        .correlation_id()
                        .as_ref()
                        .map(|id| id.to_string())
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Closes the publisher's channel, waiting at most `timeout` for the broker.
    pub(crate) async fn close_within(&self, timeout: Duration) {
        if let Target::Live(core) = &self.target {
            let channel = core.channel.write().ok().and_then(|mut c| c.take());
            if let Some(channel) = channel
                && channel.is_connected()
            {
                let close = channel.close(200, "farine shutting down");
                let _ = tokio::time::timeout(timeout, close).await;
            }
        }
    }

    fn core(&self) -> Result<&Arc<Core>, PublishError> {
        match &self.target {
            Target::Live(core) => Ok(core),
            Target::Detached { service, method } => {
                Err(PublishError::NotRunning { service, method })
            }
        }
    }
}

/// A message id unique to this process and message: a random process prefix and a counter.
fn next_message_id() -> String {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static PREFIX: OnceLock<String> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(crate::ids::random_prefix);
    crate::ids::numbered(prefix, NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A message ready to send: its options resolved into the routing key and properties.
struct Outgoing<'a> {
    payload: Cow<'a, [u8]>,
    /// `None`: the publisher's own.
    routing_key: Option<Cow<'a, str>>,
    mandatory: bool,
    properties: BasicProperties,
}

/// A message handed to the broker whose confirm is still to come.
pub(crate) struct Unconfirmed {
    core: Arc<Core>,
    confirm: Confirm,
    routing_key: String,
}

impl Unconfirmed {
    /// Waits for the confirm (the caller bounds the wait): `true` when the broker confirmed
    /// the message, `false` when the channel is not in confirm mode.
    pub async fn confirmed(self) -> Result<bool, PublishError> {
        let Self {
            core,
            confirm,
            routing_key,
        } = self;
        let requested = core.settings.confirm;
        core.finish(confirm, &routing_key).await.map(|()| requested)
    }
}

impl Core {
    /// `TooLarge` for a payload over `max_message_bytes`, before the broker sees it.
    fn check_size(&self, payload: &[u8]) -> Result<(), PublishError> {
        if payload.len() > self.settings.max_message_bytes {
            return Err(PublishError::TooLarge {
                exchange: self.exchange.name.clone(),
                size: payload.len(),
                limit: self.settings.max_message_bytes,
            });
        }
        Ok(())
    }

    fn broker_error(&self, e: &lapin::Error) -> PublishError {
        let resource = Resource::Exchange(self.exchange.name.clone());
        PublishError::Broker(BrokerError::from_lapin(
            e,
            resource,
            &self.connector.broker(),
        ))
    }

    /// The open confirm channel, reopened (and the exchange declared again) when it broke;
    /// waits for a reconnection until `deadline`.
    async fn channel(&self, deadline: tokio::time::Instant) -> Result<Channel, PublishError> {
        if let Some(channel) = self.live_channel() {
            return Ok(channel);
        }
        // Boxed: reopening holds a connection's whole opening in its state, which would
        // otherwise make every publish's future kilobytes large (and moved on each call).
        Box::pin(self.reopen_channel(deadline)).await
    }

    async fn reopen_channel(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<Channel, PublishError> {
        let _single_flight = self.reopen.lock().await;
        if let Some(channel) = self.live_channel() {
            return Ok(channel);
        }
        let conn = self.connector.connection_until(Some(deadline)).await?;
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| self.broker_error(&e))?;
        if self.settings.confirm {
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|e| self.broker_error(&e))?;
        }
        if self.settings.declare_exchange {
            self.exchange
                .declare(&channel, &self.connector.broker())
                .await?;
        }
        if let Ok(mut slot) = self.channel.write() {
            *slot = Some(channel.clone());
        }
        Ok(channel)
    }

    fn live_channel(&self) -> Option<Channel> {
        let slot = self.channel.read().ok()?;
        slot.as_ref()
            .filter(|channel| channel.is_connected())
            .cloned()
    }

    /// Checks the size and resolves the options into the message to send.
    fn outgoing<'a>(
        &self,
        payload: Cow<'a, [u8]>,
        mut options: PublishOptions,
    ) -> Result<Outgoing<'a>, PublishError> {
        self.check_size(&payload)?;
        let routing_key = options.routing_key.take();
        if let Some(key) = &routing_key {
            self.check_short("routing key", key)?;
        }
        Ok(Outgoing {
            payload,
            routing_key: routing_key.map(Cow::Owned),
            mandatory: options.mandatory.unwrap_or(self.settings.mandatory),
            properties: self.properties(options)?,
        })
    }

    /// Sends within the publish timeout. When the connection breaks before the confirm, the
    /// message is sent again once farine reconnected, while time is left: the broker may then
    /// hold it twice (at-least-once, `docs/delivery.md`), but it is never silently lost.
    ///
    /// One flat future, no layers each holding the message: the properties live here and in
    /// lapin's publish, nowhere else.
    async fn send_bounded(&self, mut message: Outgoing<'_>) -> Result<(), PublishError> {
        let deadline = tokio::time::Instant::now() + self.settings.timeout;
        let resend = self.settings.resend;
        let routing_key = message.routing_key.as_deref().unwrap_or(&self.routing_key);
        let properties = &mut message.properties;
        let attempts = async {
            loop {
                let result = match self.channel(deadline).await {
                    Ok(channel) => {
                        // Without resends the one attempt takes the properties: no copy kept.
                        let properties = if resend {
                            properties.clone()
                        } else {
                            std::mem::take(properties)
                        };
                        let sent = self
                            .hand_over(
                                &channel,
                                routing_key.into(),
                                message.mandatory,
                                &message.payload,
                                properties,
                            )
                            .await;
                        match sent {
                            Ok(confirm) => self.finish(confirm, routing_key).await,
                            Err(e) => Err(e),
                        }
                    }
                    Err(e) => Err(e),
                };
                match result {
                    Err(PublishError::Broker(BrokerError::ConnectionBroken { broker, cause }))
                        if resend
                            && self.connector.can_reconnect()
                            && tokio::time::Instant::now() < deadline =>
                    {
                        tracing::debug!(%broker, %cause, exchange = %self.exchange.name, "publish interrupted by a broken connection; sending again after the reconnection");
                        // Let the connection be seen as broken before asking for a new one.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    other => return other,
                }
            }
        };
        let outcome = tokio::time::timeout_at(deadline, attempts).await;
        let outcome = outcome.unwrap_or_else(|_| Err(self.out_of_time(routing_key)));
        if let Some(metrics) = &self.metrics {
            match &outcome {
                Ok(()) => &metrics.ok,
                Err(PublishError::Broker(BrokerError::NoRoute { .. })) => &metrics.returned,
                Err(PublishError::Nacked { .. }) => &metrics.nacked,
                Err(_) => &metrics.error,
            }
            .inc();
        }
        outcome
    }

    /// The error of a publish that ran out of `publish_timeout`: `ConnectionBroken`, naming the
    /// broker, when farine was not connected to it, else `Timeout`.
    fn out_of_time(&self, routing_key: &str) -> PublishError {
        if !self.connector.is_connected() {
            return PublishError::Broker(BrokerError::ConnectionBroken {
                broker: self.connector.broker(),
                cause: format!(
                    "not reconnected within publish_timeout ({:?})",
                    self.settings.timeout
                ),
            });
        }
        PublishError::Timeout {
            exchange: self.exchange.name.clone(),
            routing_key: routing_key.to_string(),
            after: self.settings.timeout,
        }
    }

    /// `text` as an AMQP short string, or `TooLong` naming the `field`.
    fn short(&self, field: &'static str, text: String) -> Result<ShortString, PublishError> {
        self.check_short(field, &text)?;
        Ok(ShortString::from(text))
    }

    /// `TooLong` when `text` is longer than an AMQP short string.
    fn check_short(&self, field: &'static str, text: &str) -> Result<(), PublishError> {
        if text.len() <= crate::amqp::topology::MAX_NAME_BYTES {
            return Ok(());
        }
        Err(PublishError::TooLong {
            exchange: self.exchange.name.clone(),
            field,
            length: text.len(),
        })
    }

    fn properties(&self, options: PublishOptions) -> Result<BasicProperties, PublishError> {
        let persistent = options.persistent.unwrap_or(self.settings.persistent);
        let content_type = match options.content_type {
            Some(kind) => self.short("content type", kind)?,
            None => ShortString::from("application/json"),
        };
        let mut properties = BasicProperties::default()
            .with_content_type(content_type)
            .with_delivery_mode(if persistent { 2 } else { 1 });
        let mut headers = options.headers;
        // Inside a handler call, the message continues its trace (`observe::trace`).
        if let Some(trace) = self
            .settings
            .trace
            .then(crate::observe::trace::current)
            .flatten()
        {
            let headers = headers.get_or_insert_with(FieldTable::default);
            if !headers
                .inner()
                .contains_key(crate::observe::trace::TRACEPARENT)
            {
                headers.insert(
                    crate::observe::trace::TRACEPARENT.into(),
                    lapin::types::AMQPValue::LongString(trace.traceparent().into()),
                );
                if let Some(state) = &trace.state {
                    headers.insert(
                        crate::observe::trace::TRACESTATE.into(),
                        lapin::types::AMQPValue::LongString(state.as_ref().into()),
                    );
                }
            }
        }
        if let Some(headers) = headers {
            properties = properties.with_headers(headers);
        }
        // Every message has an id: a resend after a broken connection carries the same one, so
        // a consumer's inbox recognises the duplicate. (RPC traffic is matched by correlation
        // id instead and goes without.)
        match options.message_id {
            Some(id) => properties = properties.with_message_id(self.short("message id", id)?),
            None if self.settings.message_ids => {
                properties = properties.with_message_id(ShortString::from(next_message_id()))
            }
            None => {}
        }
        if let Some(id) = options.correlation_id {
            properties = properties.with_correlation_id(self.short("correlation id", id)?);
        }
        if let Some(reply_to) = options.reply_to {
            properties = properties.with_reply_to(self.short("reply-to", reply_to)?);
        }
        if let Some(ttl) = options.expiration {
            properties = properties.with_expiration(ShortString::from(ttl.as_millis().to_string()));
        }
        if let Some(priority) = options.priority {
            properties = properties.with_priority(priority);
        }
        if let Some(kind) = options.message_type {
            properties = properties.with_type(self.short("message type", kind)?);
        }
        Ok(properties)
    }

    /// Hands the message to the channel; the confirm is still to come. Not bounded here: the
    /// caller bounds it and the confirm with its own deadline.
    async fn start(self: &Arc<Self>, message: Outgoing<'_>) -> Result<Unconfirmed, PublishError> {
        let deadline = tokio::time::Instant::now() + self.settings.timeout;
        let routing_key = match message.routing_key {
            Some(key) => ShortString::from(key.into_owned()),
            None => ShortString::from(self.routing_key.as_str()),
        };
        // A copy of the routing key only for a confirm's error: without confirms there is none.
        let kept = if self.settings.confirm {
            routing_key.as_str().to_string()
        } else {
            String::new()
        };
        let channel = self.channel(deadline).await?;
        let confirm = self
            .hand_over(
                &channel,
                routing_key,
                message.mandatory,
                &message.payload,
                message.properties,
            )
            .await?;
        Ok(Unconfirmed {
            core: self.clone(),
            confirm,
            routing_key: kept,
        })
    }

    /// Gives a message for this publisher's exchange to `channel`: lapin's publish future, with
    /// its error named, and nothing kept beside it (a plain function, not an `async fn` that
    /// would hold the properties a second time).
    fn hand_over<'c>(
        &'c self,
        channel: &'c Channel,
        routing_key: ShortString,
        mandatory: bool,
        payload: &'c [u8],
        properties: BasicProperties,
    ) -> impl Future<Output = Result<Confirm, PublishError>> + Send + 'c {
        use futures_util::TryFutureExt;
        channel
            .basic_publish(
                self.exchange.name.as_str().into(),
                routing_key,
                BasicPublishOptions {
                    mandatory,
                    immediate: false,
                },
                payload,
                properties,
            )
            .map_err(|e| self.broker_error(&e))
    }

    /// Waits for the broker's confirm of a message [`Core::start`] sent.
    async fn finish(&self, confirm: Confirm, routing_key: &str) -> Result<(), PublishError> {
        match confirm.await.map_err(|e| self.broker_error(&e))? {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(returned)) => {
                Err(PublishError::Broker(match returned.reply_code {
                    313 => BrokerError::NoConsumers {
                        resource: Resource::Exchange(self.exchange.name.clone()),
                    },
                    _ => BrokerError::NoRoute {
                        exchange: self.exchange.name.clone(),
                        routing_key: routing_key.to_string(),
                    },
                }))
            }
            Confirmation::Nack(_) => Err(PublishError::Nacked {
                exchange: self.exchange.name.clone(),
                routing_key: routing_key.to_string(),
            }),
        }
    }
}
