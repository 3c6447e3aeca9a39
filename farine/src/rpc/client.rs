//! The RPC client: calls another service's `#[rpc::method]`s, one result or a stream of them.
//!
//! One [`Client`] targets one service. All its calls share one reply queue (exclusive to the
//! connection, named by the broker) and one table of calls in flight keyed by correlation id,
//! so any number of concurrent calls go through it; clones share all of it. Requests are
//! published with `mandatory` and a confirm, so a call to a method nobody serves fails at once
//! (`NoSuchMethod`, or `NoSuchService` when the service's exchange does not exist) instead of
//! timing out. A reply that arrives after its call gave up finds no entry and is dropped.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{Stream, StreamExt, TryFutureExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};

use super::RpcError;
use super::wire::{self, ErrorBody, ErrorKind, Reply, Request};
use crate::amqp::connection::Connector;
use crate::amqp::error::{BrokerError, Resource};
use crate::amqp::publisher::{
    PublishError, PublishOptions, Publisher, PublisherSettings, Unconfirmed,
};
use crate::amqp::topology::{ExchangeSettings, private_queue};

/// How long a method's confirmed route is trusted before a call checks it again (and only on
/// the connection it was confirmed on).
pub const ROUTE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The default bound on a call (config key `rpc_timeout`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// The arguments of a call: positional (`arg`) and by name (`kwarg`).
///
/// Tuples of serialisable values convert into positional arguments: `client.call("repeat",
/// ("abc", 3))`.
#[derive(Debug, Clone, Default)]
pub struct Args {
    args: Vec<Value>,
    kwargs: Map<String, Value>,
    error: Option<String>,
}

impl Args {
    /// No arguments.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a positional argument.
    pub fn arg(mut self, value: impl Serialize) -> Self {
        match serde_json::to_value(value) {
            Ok(value) => self.args.push(value),
            Err(e) => self.error = Some(format!("argument {}: {e}", self.args.len())),
        }
        self
    }

    /// Adds an argument by name.
    pub fn kwarg(mut self, name: &str, value: impl Serialize) -> Self {
        match serde_json::to_value(value) {
            Ok(value) => {
                self.kwargs.insert(name.to_string(), value);
            }
            Err(e) => self.error = Some(format!("argument `{name}`: {e}")),
        }
        self
    }

    fn into_body(self) -> Result<Vec<u8>, String> {
        if let Some(error) = self.error {
            return Err(error);
        }
        let request = Request {
            args: self.args,
            kwargs: self.kwargs,
        };
        serde_json::to_vec(&request).map_err(|e| e.to_string())
    }
}

impl From<()> for Args {
    fn from((): ()) -> Self {
        Args::new()
    }
}

macro_rules! tuple_args {
    ($($name:ident),+) => {
        impl<$($name: Serialize),+> From<($($name,)+)> for Args {
            #[allow(non_snake_case)]
            fn from(($($name,)+): ($($name,)+)) -> Self {
                Args::new()$(.arg($name))+
            }
        }
    };
}

tuple_args!(A);
tuple_args!(A, B);
tuple_args!(A, B, C);
tuple_args!(A, B, C, D);
tuple_args!(A, B, C, D, E);
tuple_args!(A, B, C, D, E, F);
tuple_args!(A, B, C, D, E, F, G);
tuple_args!(A, B, C, D, E, F, G, H);

/// Per-call options.
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct CallOptions {
    /// Overrides the client's timeout for this call (for a stream: the longest wait for the
    /// next item).
    pub timeout: Option<Duration>,
}

impl CallOptions {
    /// Options with this timeout.
    pub fn timeout(timeout: Duration) -> Self {
        Self {
            timeout: Some(timeout),
        }
    }
}

enum Reader {
    Unary(oneshot::Sender<Reply>),
    Stream(mpsc::UnboundedSender<Reply>),
}

/// A call in flight, and the reply queue its request named (`None` until it is sent): when a
/// reply queue dies with its connection, only the calls that named it lose their replies.
struct Pending {
    reader: Reader,
    queue: Option<u64>,
}

/// The calls in flight, by the counter part of their correlation id (`<prefix>-<n>`).
type Calls = Arc<Mutex<HashMap<u64, Pending, BuildHasherDefault<CounterHasher>>>>;

/// Hashes the call counters: sequential numbers, spread by a multiplication (no SipHash for a
/// key nobody outside chooses).
#[derive(Default)]
struct CounterHasher(u64);

impl std::hash::Hasher for CounterHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*byte)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// Calls the RPC methods of one service. Cheap to clone; clones share the reply queue.
#[derive(Clone)]
pub struct Client {
    target: Target,
    timeout: Option<Duration>,
}

#[derive(Clone)]
enum Target {
    Live(Arc<Inner>),
    Detached {
        service: String,
        caller: &'static str,
    },
}

struct Inner {
    service: String,
    connector: Arc<Connector>,
    timeout: Duration,
    /// Requests with a confirm: the first call of a method, and one a second after that, learn
    /// at once whether anything serves it (`NoSuchService`, `NoSuchMethod`).
    checked_requests: Publisher,
    /// Requests without a confirm, for a method whose route was confirmed within
    /// [`ROUTE_CHECK_INTERVAL`]: a confirm per call costs the broker and the client a frame and
    /// a wake-up each (`BENCHMARKS.md`).
    requests: Publisher,
    /// When each method's route was last confirmed, and on which connection (the connector's
    /// count of reconnections then).
    routes: std::sync::RwLock<HashMap<String, (std::time::Instant, u64)>>,
    calls: Calls,
    replies: tokio::sync::Mutex<Option<ReplyQueue>>,
    /// The live reply queue, read by every call without waiting for `replies`.
    current: std::sync::RwLock<Option<CurrentQueue>>,
    next_id: AtomicU64,
    prefix: String,
    /// The runtime's metrics, for a `#[rpc::client]` method's calls.
    metrics: Option<Arc<crate::observe::Metrics>>,
}

/// The reply queue calls name: its name, generation, and whether it still lives.
#[derive(Clone)]
struct CurrentQueue {
    name: String,
    generation: u64,
    state: Arc<QueueState>,
}

/// What calls learn of their reply queue as it goes (one allocation, shared by its calls).
struct QueueState {
    /// The queue still lives (its consumer runs).
    alive: AtomicBool,
    /// Bound to the service's exchange with its own name as the routing key, where servers of
    /// baguette-messaging (the Python farine) send their replies; false while that exchange
    /// did not exist yet.
    bound: AtomicBool,
}

/// The consumer of a reply queue (its name and state are in [`CurrentQueue`]).
struct ReplyQueue {
    /// Counts the reply queues of this client: which one a request named.
    generation: u64,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(mut replies) = self.replies.try_lock()
            && let Some(queue) = replies.take()
        {
            queue.task.abort();
        }
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("service", &self.service())
            .finish()
    }
}

impl Client {
    /// A client of `service` on `connector`'s connection; `timeout` bounds each call.
    #[doc(hidden)]
    pub fn new(connector: Arc<Connector>, service: impl Into<String>, timeout: Duration) -> Self {
        Self::observed(connector, service.into(), timeout, None)
    }

    /// As [`Client::new`], its calls counted and timed in `metrics` (a runtime's
    /// `#[rpc::client]` methods).
    pub(crate) fn observed(
        connector: Arc<Connector>,
        service: String,
        timeout: Duration,
        metrics: Option<Arc<crate::observe::Metrics>>,
    ) -> Self {
        let requests = |confirm: bool| {
            Publisher::new(
                connector.clone(),
                ExchangeSettings {
                    name: service.clone(),
                    ..ExchangeSettings::default_exchange()
                },
                String::new(),
                PublisherSettings {
                    persistent: false,
                    timeout,
                    declare_exchange: false,
                    mandatory: true,
                    max_message_bytes: crate::amqp::publisher::DEFAULT_MAX_MESSAGE_BYTES,
                    // A request sent again after a reconnection would name the dead reply
                    // queue.
                    resend: false,
                    confirm,
                    message_ids: false,
                    trace: true,
                },
            )
        };
        let (checked_requests, requests) = (requests(true), requests(false));
        Self {
            timeout: None,
            target: Target::Live(Arc::new(Inner {
                service,
                connector,
                timeout,
                checked_requests,
                requests,
                routes: std::sync::RwLock::new(HashMap::new()),
                calls: Arc::new(Mutex::new(HashMap::default())),
                replies: tokio::sync::Mutex::new(None),
                current: std::sync::RwLock::new(None),
                next_id: AtomicU64::new(0),
                prefix: crate::ids::random_prefix(),
                metrics,
            })),
        }
    }

    /// A client of its own connection to `uri`, outside any service (tests, tools), as the
    /// Python framework's `rpc.Client('server', timeout)`.
    pub async fn connect(uri: &str, service: &str, timeout: Duration) -> Result<Self, RpcError> {
        let name = crate::amqp::connection::connection_name(
            &crate::amqp::connection::program_name(),
            &format!("rpc client of {service}"),
        );
        let connector = Arc::new(Connector::new(uri, name, Duration::from_secs(10)));
        let client = Self::new(connector, service, timeout);
        if let Target::Live(inner) = &client.target {
            inner
                .reply_queue(Some(tokio::time::Instant::now()))
                .await
                .map_err(|cause| RpcError::Connection {
                    service: service.to_string(),
                    method: String::new(),
                    cause,
                })?;
        }
        Ok(client)
    }

    pub(crate) fn detached(service: &str, caller: &'static str) -> Self {
        Self {
            timeout: None,
            target: Target::Detached {
                service: service.to_string(),
                caller,
            },
        }
    }

    /// The same client (same reply queue) with another default timeout for its calls.
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        Self {
            target: self.target.clone(),
            timeout: Some(timeout),
        }
    }

    /// The service this client calls.
    pub fn service(&self) -> &str {
        match &self.target {
            Target::Live(inner) => &inner.service,
            Target::Detached { service, .. } => service,
        }
    }

    /// Calls `method` with `args` and decodes its result as `T`.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        args: impl Into<Args>,
    ) -> Result<T, RpcError> {
        self.call_with(method, args, CallOptions::default()).await
    }

    /// As [`Client::call`], with per-call options (a timeout).
    pub async fn call_with<T: DeserializeOwned>(
        &self,
        method: &str,
        args: impl Into<Args>,
        options: CallOptions,
    ) -> Result<T, RpcError> {
        let metrics = match &self.target {
            Target::Live(inner) => inner.metrics.as_ref(),
            Target::Detached { .. } => None,
        };
        let Some(metrics) = metrics else {
            return self.call_unobserved(method, args, options).await;
        };
        let started = std::time::Instant::now();
        let result = self.call_unobserved(method, args, options).await;
        let error = result.as_ref().err().map(RpcError::kind_name);
        metrics.rpc_call(self.service(), method, started.elapsed(), error);
        result
    }

    async fn call_unobserved<T: DeserializeOwned>(
        &self,
        method: &str,
        args: impl Into<Args>,
        options: CallOptions,
    ) -> Result<T, RpcError> {
        let inner = self.live(method)?;
        let timeout = options.timeout.or(self.timeout).unwrap_or(inner.timeout);
        let deadline = tokio::time::Instant::now() + timeout;
        let body = inner.body(method, args.into())?;
        let (sender, mut receiver) = oneshot::channel();
        let (mut entry, id, reply_to) = inner
            .enter(method, Reader::Unary(sender), deadline, timeout)
            .await?;
        // One timer bounds the whole call: the publish, then the reply.
        let expired = tokio::time::sleep_until(deadline);
        tokio::pin!(expired);
        // Pinned where it is: `select!` would otherwise move this large future into its own.
        let (connection, sent) = inner.publish_request(method, id, &body, reply_to, timeout, true);
        tokio::pin!(sent);
        let unconfirmed = tokio::select! {
            biased;
            result = &mut sent => result?,
            () = &mut expired => return Err(inner.timed_out(method, timeout)),
        };
        // The reply usually comes after the confirm, but need not wait for it: a call
        // nobody serves is known from the confirm (a returned message), a served one from its
        // reply, whichever comes first.
        let confirmed = unconfirmed.confirmed();
        tokio::pin!(confirmed);
        let mut confirm_seen = false;
        let reply = loop {
            tokio::select! {
                biased;
                reply = &mut receiver => match reply {
                    Ok(reply) => {
                        // A unary entry leaves the table with its reply.
                        entry.removed();
                        break reply;
                    }
                    Err(_) => return Err(inner.reply_queue_lost(method)),
                },
                result = &mut confirmed, if !confirm_seen => {
                    confirm_seen = true;
                    match result {
                        Ok(true) => inner.route_confirmed(method, connection),
                        Ok(false) => {}
                        Err(e) => return Err(inner.request_error(method, e)),
                    }
                }
                () = &mut expired => {
                    let id = inner.call_id(entry.key);
                    return Err(Box::pin(inner.not_answered(method, &id, timeout)).await);
                }
            }
        };
        if !confirm_seen {
            // lapin keeps a confirm dropped before it resolved until the channel closes: see
            // this one through (it is due by now: the reply came after the broker routed it).
            let _ = tokio::time::timeout_at(deadline, &mut confirmed).await;
        }
        match reply {
            Reply::Item(value) => inner.decode(method, value.get()),
            Reply::End => inner.decode(method, "null"),
            Reply::Error { message, detail } => Err(inner.remote(method, message, detail)),
        }
    }

    /// Calls a streaming `method`: the items come as a [`Stream`] of results, ended by the
    /// server's end marker or by the first error. Dropping the stream cancels the call on the
    /// server. The timeout bounds the wait for each item.
    pub async fn stream<T: DeserializeOwned>(
        &self,
        method: &str,
        args: impl Into<Args>,
    ) -> Result<RpcStream<T>, RpcError> {
        self.stream_with(method, args, CallOptions::default()).await
    }

    /// As [`Client::stream`], with per-call options.
    pub async fn stream_with<T: DeserializeOwned>(
        &self,
        method: &str,
        args: impl Into<Args>,
        options: CallOptions,
    ) -> Result<RpcStream<T>, RpcError> {
        let inner = self.live(method)?.clone();
        let timeout = options.timeout.or(self.timeout).unwrap_or(inner.timeout);
        let deadline = tokio::time::Instant::now() + timeout;
        let body = inner.body(method, args.into())?;
        let (sender, receiver) = mpsc::unbounded_channel();
        let (entry, id, reply_to) = inner
            .enter(method, Reader::Stream(sender), deadline, timeout)
            .await?;
        let sent = async {
            let (connection, published) =
                inner.publish_request(method, id.clone(), &body, reply_to, timeout, false);
            let confirmed = published
                .await?
                .confirmed()
                .await
                .map_err(|e| inner.request_error(method, e))?;
            if confirmed {
                inner.route_confirmed(method, connection);
            }
            Ok::<(), RpcError>(())
        };
        match tokio::time::timeout_at(deadline, sent).await {
            Ok(result) => result?,
            Err(_) => return Err(inner.timed_out(method, timeout)),
        }
        Ok(RpcStream {
            inner,
            method: method.to_string(),
            id,
            entry: Some(entry),
            receiver,
            timeout,
            idle: Box::pin(tokio::time::sleep(timeout)),
            done: false,
            _item: PhantomData,
        })
    }

    fn live(&self, method: &str) -> Result<&Arc<Inner>, RpcError> {
        match &self.target {
            Target::Live(inner) => Ok(inner),
            Target::Detached { service, caller } => Err(RpcError::NotRunning {
                service: service.clone(),
                method: method.to_string(),
                caller,
            }),
        }
    }

    /// How many calls are waiting for a reply (for tests: a late reply must leave none behind).
    pub fn calls_in_flight(&self) -> usize {
        match &self.target {
            Target::Live(inner) => inner.calls.lock().map(|c| c.len()).unwrap_or(0),
            Target::Detached { .. } => 0,
        }
    }
}

/// A call's entry in the table, removed when the call ends however it ends.
struct Entry {
    calls: Calls,
    key: u64,
    /// False once the reply's dispatch removed the entry itself.
    armed: bool,
}

impl Entry {
    fn insert(calls: &Calls, key: u64, pending: Pending) -> Self {
        if let Ok(mut table) = calls.lock() {
            table.insert(key, pending);
        }
        Self {
            calls: calls.clone(),
            key,
            armed: true,
        }
    }

    /// The dispatch of the call's one reply removed the entry: nothing to do when it drops.
    fn removed(&mut self) {
        self.armed = false;
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        if self.armed
            && let Ok(mut table) = self.calls.lock()
        {
            table.remove(&self.key);
        }
    }
}

/// The counter of a correlation id this client made (`<prefix>-<n>`).
fn call_key(prefix: &str, id: &str) -> Option<u64> {
    id.strip_prefix(prefix)?.strip_prefix('-')?.parse().ok()
}

impl Inner {
    /// A new call's key and correlation id.
    fn next_call_id(&self) -> (u64, String) {
        let key = self.next_id.fetch_add(1, Ordering::Relaxed);
        (key, self.call_id(key))
    }

    /// The correlation id of the call keyed `key`.
    fn call_id(&self, key: u64) -> String {
        crate::ids::numbered(&self.prefix, key)
    }

    fn body(&self, method: &str, args: Args) -> Result<Vec<u8>, RpcError> {
        args.into_body().map_err(|cause| RpcError::Encode {
            service: self.service.clone(),
            method: method.to_string(),
            cause,
        })
    }

    /// Enters a call in the table, tagged with the reply queue its request will name; returns
    /// the entry, the call's id and the queue's name.
    async fn enter(
        self: &Arc<Self>,
        method: &str,
        reader: Reader,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Result<(Entry, String, String), RpcError> {
        let queue = match tokio::time::timeout_at(deadline, self.reply_queue(Some(deadline))).await
        {
            Ok(queue) => queue.map_err(|cause| self.connection_error(method, cause))?,
            Err(_) => return Err(self.timed_out(method, timeout)),
        };
        let (key, id) = self.next_call_id();
        let pending = Pending {
            reader,
            queue: Some(queue.generation),
        };
        let entry = Entry::insert(&self.calls, key, pending);
        // The queue may have died between handing out its name and the insertion: then its
        // clean-up missed this call.
        if !queue.state.alive.load(Ordering::Acquire) {
            return Err(self.reply_queue_lost(method));
        }
        if !queue.state.bound.load(Ordering::Acquire)
            && !Box::pin(self.bind_reply_queue(&queue)).await
        {
            // No exchange: nothing serves the service (what the request's publish would say).
            return Err(RpcError::NoSuchService {
                service: self.service.clone(),
                method: method.to_string(),
            });
        }
        Ok((entry, id, queue.name))
    }

    /// Publishes the request of call `id`; the confirm is still to come. `single`: the caller
    /// reads one result, the server need not send the end marker. Also returns the connection
    /// it goes out on (the connector's count of reconnections, read before the publish: a
    /// reconnection meanwhile only costs a check more), for [`Inner::route_confirmed`].
    ///
    /// A plain function returning the publish's future, not an `async fn`: that would hold the
    /// options in its own state beside the publish's.
    fn publish_request<'a>(
        &'a self,
        method: &'a str,
        id: String,
        body: &'a [u8],
        reply_to: String,
        timeout: Duration,
        single: bool,
    ) -> (
        u64,
        impl Future<Output = Result<Unconfirmed, RpcError>> + Send + use<'a>,
    ) {
        let options = PublishOptions {
            routing_key: Some(wire::routing_key(&self.service, method)),
            correlation_id: Some(id),
            reply_to: Some(reply_to),
            message_type: single.then(|| wire::SINGLE_REPLY_TYPE.to_string()),
            // A request nobody took within the call's timeout is dropped by the broker.
            expiration: Some(timeout),
            persistent: Some(false),
            ..Default::default()
        };
        // A route confirmed on a connection that has since been lost is checked again: the
        // first requests of a new connection's channels to a quorum queue whose leader is being
        // elected (its node was the one lost) are refused by the broker, nacked when confirmed
        // (the call fails at once) but dropped without a word when not (the call would wait
        // for its timeout). Found on a real cluster: farine/tests/cluster.rs.
        let connection = self.connector.reconnects();
        let checked = self
            .routes
            .read()
            .ok()
            .and_then(|routes| routes.get(method).copied())
            .is_some_and(|(at, on)| on == connection && at.elapsed() < ROUTE_CHECK_INTERVAL);
        let publisher = if checked {
            &self.requests
        } else {
            &self.checked_requests
        };
        let published = publisher
            .publish_unconfirmed(body, options)
            .map_err(move |e| self.request_error(method, e));
        (connection, published)
    }

    /// Notes that the broker routed a request of `method` to a queue, sent on `connection`
    /// (the connector's count of reconnections then).
    fn route_confirmed(&self, method: &str, connection: u64) {
        let confirmed = (std::time::Instant::now(), connection);
        if let Ok(mut routes) = self.routes.write() {
            match routes.get_mut(method) {
                Some(at) => *at = confirmed,
                None => {
                    routes.insert(method.to_string(), confirmed);
                }
            }
        }
    }

    /// The call's error for a request the broker refused.
    fn request_error(&self, method: &str, error: PublishError) -> RpcError {
        match error {
            PublishError::Broker(BrokerError::NoRoute { .. }) => RpcError::NoSuchMethod {
                service: self.service.clone(),
                method: method.to_string(),
            },
            PublishError::Broker(BrokerError::NotFound { .. }) => RpcError::NoSuchService {
                service: self.service.clone(),
                method: method.to_string(),
            },
            PublishError::Timeout { after, .. } => self.timed_out(method, after),
            PublishError::TooLarge { .. } => RpcError::Encode {
                service: self.service.clone(),
                method: method.to_string(),
                cause: error.to_string(),
            },
            other => self.connection_error(method, other.to_string()),
        }
    }

    /// The error of a call that got no reply in time: `NoConsumers` when the queue the request
    /// waits in has no consumer, else `Timeout`. That queue is `<service>` for a farine server
    /// (the default `rpc_queue`), `<service>__<method>` for a baguette-messaging one: the first
    /// of the two that exists is asked.
    async fn not_answered(&self, method: &str, id: &str, timeout: Duration) -> RpcError {
        // A request sent without a confirm that the broker returned: its route went away
        // since it was last checked.
        let returned = self.requests.take_returned().await;
        if returned.iter().any(|correlation| correlation == id) {
            return RpcError::NoSuchMethod {
                service: self.service.clone(),
                method: method.to_string(),
            };
        }
        let consumers = |queue: String| async move {
            let conn = self.connector.connection().await.ok()?;
            let channel = conn.create_channel().await.ok()?;
            let options = lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            let declared = channel
                .queue_declare(queue.as_str(), options, Default::default())
                .await;
            // A queue that does not exist: the broker closed the channel already.
            if declared.is_ok() {
                let _ = channel.close(200, "probe done").await;
            }
            declared.ok().map(|queue| queue.consumer_count)
        };
        // Each probe adds at most this to a call that timed out.
        let bound = self
            .connector
            .connect_timeout()
            .min(Duration::from_millis(250));
        for queue in [
            self.service.clone(),
            wire::routing_key(&self.service, method),
        ] {
            match tokio::time::timeout(bound, consumers(queue.clone())).await {
                Ok(Some(0)) => {
                    return RpcError::Broker {
                        service: self.service.clone(),
                        method: method.to_string(),
                        error: Box::new(BrokerError::NoConsumers {
                            resource: Resource::Queue(queue),
                        }),
                    };
                }
                // Someone consumes it: the server is slow, or busy.
                Ok(Some(_)) => break,
                // No such queue (or no answer in time): the next.
                _ => {}
            }
        }
        self.timed_out(method, timeout)
    }

    /// The reply queue's name and generation, declaring it (and starting its consumer) when
    /// there is none or the last one died with its connection; waits for a reconnection until
    /// `deadline`.
    async fn reply_queue(
        self: &Arc<Self>,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<CurrentQueue, String> {
        if let Some(current) = self.live_queue() {
            return Ok(current);
        }
        // Boxed for the same reason as a publisher's reopening: a cold path with a large state.
        Box::pin(self.new_reply_queue(deadline)).await
    }

    async fn new_reply_queue(
        self: &Arc<Self>,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<CurrentQueue, String> {
        let mut slot = self.replies.lock().await;
        if let Some(current) = self.live_queue() {
            return Ok(current);
        }
        let generation = slot.as_ref().map_or(0, |queue| queue.generation + 1);
        let conn = self
            .connector
            .connection_until(deadline)
            .await
            .map_err(|e| e.to_string())?;
        let channel = conn.create_channel().await.map_err(|e| e.to_string())?;
        let (name, mut consumer) = private_queue(&channel).await.map_err(|e| e.to_string())?;
        let name = name.to_string();
        let state = Arc::new(QueueState {
            alive: AtomicBool::new(true),
            bound: AtomicBool::new(false),
        });
        let calls = self.calls.clone();
        let service = self.service.clone();
        let prefix = self.prefix.clone();
        let task_state = state.clone();
        let owner = Arc::downgrade(self);
        let task = tokio::spawn(async move {
            let _channel = channel;
            let mut cancelled = std::collections::HashSet::new();
            while let Some(Ok(delivery)) = consumer.next().await {
                let Some(orphan) = dispatch(&calls, &service, &prefix, &delivery) else {
                    continue;
                };
                // Items keep coming for a call nobody reads: stop that stream (once per id).
                if cancelled.len() > 4096 {
                    cancelled.clear();
                }
                if cancelled.insert(orphan.clone())
                    && let Some(inner) = owner.upgrade()
                {
                    inner.cancel(&orphan);
                }
            }
            task_state.alive.store(false, Ordering::Release);
            // The queue went with its connection: the calls that named it get no reply (they
            // fail at once, whether or not the server ran them: not safe to repeat blindly).
            // Calls not sent yet go out on the next queue.
            if let Ok(mut table) = calls.lock() {
                table.retain(|_, pending| pending.queue.is_none_or(|g| g > generation));
            }
        });
        if let Some(old) = slot.replace(ReplyQueue { generation, task }) {
            old.task.abort();
        }
        let current = CurrentQueue {
            name,
            generation,
            state,
        };
        if let Ok(mut slot) = self.current.write() {
            *slot = Some(current.clone());
        }
        Ok(current)
    }

    /// Binds the reply queue to the service's exchange with the queue's name as the routing
    /// key: a baguette-messaging server publishes its replies there (farine's go through the
    /// default exchange, which needs no binding). Done before the first request, on a channel
    /// of its own, which the broker closes when the exchange does not exist: then no server
    /// runs (false, and tried again on the next call). Any other failure is left for the
    /// request's publish to report (true).
    async fn bind_reply_queue(&self, queue: &CurrentQueue) -> bool {
        let bind = async {
            let conn = self.connector.connection().await.ok()?;
            let bound = async {
                let channel = conn.create_channel().await?;
                channel
                    .queue_bind(
                        queue.name.as_str(),
                        self.service.as_str(),
                        queue.name.as_str(),
                        Default::default(),
                        Default::default(),
                    )
                    .await?;
                let _ = channel.close(200, "reply queue bound").await;
                Ok::<_, lapin::Error>(())
            };
            Some(bound.await)
        };
        match tokio::time::timeout(self.connector.connect_timeout(), bind).await {
            Ok(Some(Ok(()))) => {
                queue.state.bound.store(true, Ordering::Release);
                true
            }
            Ok(Some(Err(error))) => !matches!(
                BrokerError::from_lapin(
                    &error,
                    Resource::Exchange(self.service.clone()),
                    &self.connector.broker()
                ),
                BrokerError::NotFound { .. }
            ),
            Ok(None) | Err(_) => true,
        }
    }

    fn live_queue(&self) -> Option<CurrentQueue> {
        let current = self.current.read().ok()?;
        current
            .as_ref()
            .filter(|queue| queue.state.alive.load(Ordering::Acquire))
            .cloned()
    }

    /// Decodes a result from its JSON text.
    fn decode<T: DeserializeOwned>(&self, method: &str, json: &str) -> Result<T, RpcError> {
        serde_json::from_str(json).map_err(|e| RpcError::Decode {
            service: self.service.clone(),
            method: method.to_string(),
            cause: e.to_string(),
        })
    }

    fn remote(&self, method: &str, message: String, detail: Option<ErrorBody>) -> RpcError {
        RpcError::from_reply(&self.service, method, message, detail)
    }

    fn timed_out(&self, method: &str, after: Duration) -> RpcError {
        RpcError::Timeout {
            service: self.service.clone(),
            method: method.to_string(),
            after,
        }
    }

    fn connection_error(&self, method: &str, cause: String) -> RpcError {
        RpcError::Connection {
            service: self.service.clone(),
            method: method.to_string(),
            cause,
        }
    }

    fn reply_queue_lost(&self, method: &str) -> RpcError {
        self.connection_error(
            method,
            "the connection to the broker was lost before the reply arrived".into(),
        )
    }

    /// Tells every instance of the service to stop producing the stream `id`.
    fn cancel(self: &Arc<Self>, id: &str) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let inner = self.clone();
        let id = id.to_string();
        runtime.spawn(async move {
            let options = PublishOptions {
                routing_key: Some(wire::cancel_routing_key(&inner.service)),
                correlation_id: Some(id),
                persistent: Some(false),
                // Nobody to tell when no instance listens: no return to collect.
                mandatory: Some(false),
                ..Default::default()
            };
            if let Err(e) = inner.requests.publish_bytes(b"{}", options).await {
                tracing::debug!(service = %inner.service, error = %e, "could not send a stream cancellation");
            }
        });
    }
}

/// Hands one reply to the call waiting for it; a reply nobody waits for is dropped. Returns the
/// id of an *item* nobody waits for: a stream whose reader is gone (dropped before the server
/// took the request, or read as a single result), which the caller then cancels.
fn dispatch(
    calls: &Calls,
    service: &str,
    prefix: &str,
    delivery: &crate::amqp::transport::Delivery,
) -> Option<String> {
    let id = delivery.properties.correlation_id().as_ref()?.as_str();
    let Some(key) = call_key(prefix, id) else {
        tracing::warn!(service, correlation_id = %id, "ignored a reply to a call this client did not make");
        return None;
    };
    let Some(reply) = Reply::parse(&delivery.data) else {
        tracing::warn!(service, correlation_id = %id, "ignored a reply that is not an RPC reply");
        return None;
    };
    let mut table = calls.lock().ok()?;
    match table.get(&key).map(|pending| &pending.reader) {
        Some(Reader::Unary(_)) => {
            if let Some(Pending {
                reader: Reader::Unary(sender),
                ..
            }) = table.remove(&key)
            {
                let _ = sender.send(reply);
            }
        }
        Some(Reader::Stream(sender)) => {
            let last = !matches!(reply, Reply::Item(_));
            let _ = sender.send(reply);
            if last {
                table.remove(&key);
            }
        }
        None => return matches!(reply, Reply::Item(_)).then(|| id.to_string()),
    }
    None
}

/// The items of a streaming call. Dropping it before the end cancels the call on the server.
pub struct RpcStream<T> {
    inner: Arc<Inner>,
    method: String,
    id: String,
    entry: Option<Entry>,
    receiver: mpsc::UnboundedReceiver<Reply>,
    timeout: Duration,
    idle: Pin<Box<tokio::time::Sleep>>,
    done: bool,
    _item: PhantomData<fn() -> T>,
}

impl<T> RpcStream<T> {
    fn finish(&mut self) {
        self.done = true;
        self.entry = None;
    }
}

impl<T: DeserializeOwned> Stream for RpcStream<T> {
    type Item = Result<T, RpcError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.receiver.poll_recv(cx) {
            Poll::Ready(Some(Reply::Item(value))) => {
                let deadline = tokio::time::Instant::now() + self.timeout;
                self.idle.as_mut().reset(deadline);
                Poll::Ready(Some(self.inner.decode(&self.method, value.get())))
            }
            Poll::Ready(Some(Reply::End)) => {
                self.finish();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Reply::Error { message, detail })) => {
                self.finish();
                let error = self.inner.remote(&self.method, message, detail);
                Poll::Ready(Some(Err(error)))
            }
            Poll::Ready(None) => {
                self.finish();
                Poll::Ready(Some(Err(self.inner.reply_queue_lost(&self.method))))
            }
            Poll::Pending => match self.idle.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    let error = self.inner.timed_out(&self.method, self.timeout);
                    self.inner.cancel(&self.id);
                    self.finish();
                    Poll::Ready(Some(Err(error)))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<T> Drop for RpcStream<T> {
    fn drop(&mut self) {
        if !self.done {
            self.inner.cancel(&self.id);
        }
    }
}

impl RpcError {
    pub(crate) fn from_reply(
        service: &str,
        method: &str,
        message: String,
        detail: Option<ErrorBody>,
    ) -> RpcError {
        let (service, method) = (service.to_string(), method.to_string());
        match detail {
            Some(ErrorBody {
                kind: ErrorKind::BadArguments,
                param,
                message,
                ..
            }) => RpcError::BadArguments {
                service,
                method,
                param,
                message,
            },
            Some(ErrorBody {
                kind: ErrorKind::UnknownMethod,
                ..
            }) => RpcError::NoSuchMethod { service, method },
            Some(ErrorBody { kind, message, .. }) => RpcError::Remote {
                service,
                method,
                kind: Some(kind),
                message,
            },
            None => RpcError::Remote {
                service,
                method,
                kind: None,
                message,
            },
        }
    }
}

/// A `#[rpc::client]` method as `--list` shows it: the service it calls and its timeout.
pub(crate) fn describe(
    service: &'static str,
    name: &'static str,
    target: &'static str,
    section: &crate::config::Section,
    signature: (&'static str, &'static str),
) -> Result<crate::handler::Description, crate::config::ConfigError> {
    use crate::handler::{Description, HandlerKind};
    let timeout = section
        .handler(name)
        .get_or("rpc_timeout", DEFAULT_TIMEOUT)?;
    let mut description = Description::new(service, name, HandlerKind::RpcClient, signature);
    description.settings = vec![
        format!("calls service {target}"),
        format!("timeout {timeout:?}"),
    ];
    Ok(description)
}
