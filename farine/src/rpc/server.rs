//! The RPC server: one supervised task per service that has `#[rpc::method]`s.
//!
//! It declares exchange `<service>` and queue `<service>` (config `rpc_queue`), binds the queue
//! once per method with `<service>__<method>`, and consumes it with `prefetch_count`: that many
//! calls run at once, polled within the server's own task (no thread hop between a call and its
//! reply; `handler::InFlight`). With `rpc_queue_per_method = true` it declares and consumes one
//! queue per method instead, `<service>__<method>`, as baguette-messaging does, so that Python
//! and Rust instances of a service share its calls. A call is acked after its last reply was
//! published, so a server that dies mid-call leaves it to another instance. Each instance also
//! has an exclusive control queue bound with `<service>.__cancel__`, on which callers that
//! stopped reading a stream say so; a stream item the broker returns (its caller's reply queue
//! is gone: the caller died) stops the stream too. `docs/rpc-protocol.md` is the protocol.

use std::collections::HashMap;
use std::fmt::Display;
use std::num::NonZeroU16;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{Stream, StreamExt};
use lapin::options::QueueBindOptions;
use lapin::types::FieldTable;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use super::wire::{self, ErrorBody, ErrorKind, RawRequest, Reply};
use crate::amqp::connection::Connector;
use crate::amqp::consuming::{ConsumeError, WindDown, basic_consume, connection_for, open_channel};
use crate::amqp::error::{BrokerError, Resource};
use crate::amqp::message::Message;
use crate::amqp::publisher::{PublishError, PublishOptions, Publisher, PublisherSettings};
use crate::amqp::topology::{ExchangeSettings, QueueSettings, private_queue};
use crate::config::{ConfigError, Section};
use crate::handler::{
    CallScope, Description, HandlerKind, InFlight, Layers, Outcome, Ready, Task, TaskEnv, TaskError,
};
use crate::observe::metrics::RpcMethodMetrics;
use crate::observe::trace::{CallSpec, SpanKind, Tracer};

/// What an `#[rpc::method]` looks like once the macro wrapped it.
pub type RpcFn<S> = fn(Arc<S>, RpcCall) -> BoxFuture<'static, ()>;

pub(crate) type BoundRpc = Arc<dyn Fn(RpcCall) -> BoxFuture<'static, ()> + Send + Sync>;

/// One method as the server dispatches to it.
pub(crate) struct Method {
    /// `<service>__<method>`.
    pub routing_key: String,
    pub name: &'static str,
    pub call: BoundRpc,
    /// It returns a stream: its calls can be cancelled, so they are registered.
    pub streams: bool,
    /// Its counts and durations, when the runtime keeps metrics (set at start).
    pub metrics: Option<RpcMethodMetrics>,
}

/// One call being served: its arguments, and where its replies go.
pub struct RpcCall {
    state: Arc<CallState>,
    request: RawRequest,
}

struct CallState {
    service: &'static str,
    method: &'static str,
    reply_to: Option<String>,
    correlation_id: Option<String>,
    replies: Replies,
    /// The caller reads one result and asks for no end marker (`type = farine.single`).
    single: bool,
    /// Set once the method streams: all its replies then go through the confirming channel,
    /// in order.
    streaming: AtomicBool,
    /// Only a streaming method's call can be cancelled by its caller: other calls go without.
    cancelled: Option<CancellationToken>,
    finished: AtomicBool,
    /// An error reply was sent.
    failed: AtomicBool,
}

/// Where replies are published: `plain` (no confirms: a result, its end marker, an error) and
/// `confirmed` (a stream's items, `mandatory`, and everything after them on the same channel).
#[derive(Clone)]
pub(crate) struct Replies {
    plain: Publisher,
    confirmed: Publisher,
}

impl CallState {
    /// Resolves when the caller cancelled the call (never for a call that cannot be).
    async fn cancellation(&self) {
        match &self.cancelled {
            Some(token) => token.cancelled().await,
            None => std::future::pending().await,
        }
    }

    fn error(&self, kind: ErrorKind, message: String, param: Option<String>) -> ErrorBody {
        ErrorBody {
            kind,
            message,
            service: self.service.to_string(),
            method: self.method.to_string(),
            param,
        }
    }

    /// Publishes one reply; `mandatory` asks the broker to return it when the caller's queue is
    /// gone.
    async fn send(&self, body: &[u8], mandatory: bool) -> Result<(), PublishError> {
        let Some(reply_to) = &self.reply_to else {
            return Ok(());
        };
        let options = PublishOptions {
            routing_key: Some(reply_to.clone()),
            correlation_id: self.correlation_id.clone(),
            persistent: Some(false),
            mandatory: Some(mandatory),
            ..Default::default()
        };
        let publisher = if self.streaming.load(Ordering::Acquire) {
            &self.replies.confirmed
        } else {
            &self.replies.plain
        };
        publisher.publish_bytes(body, options).await
    }

    /// After a reply was refused for its size: tells the caller with an error reply instead.
    async fn too_large(&self, error: &PublishError) {
        tracing::warn!(service = self.service, method = self.method, error = %error, "an RPC reply is too large; the caller gets an error instead");
        let body = Reply::error_body(&self.error(ErrorKind::Remote, error.to_string(), None));
        if let Err(e) = self.send(&body, false).await {
            tracing::warn!(service = self.service, method = self.method, error = %e, "could not send an RPC reply");
        }
    }

    async fn finish(&self, body: &[u8]) {
        self.finished.store(true, Ordering::Release);
        match self.send(body, false).await {
            Ok(()) => {}
            Err(e @ PublishError::TooLarge { .. }) => self.too_large(&e).await,
            Err(e) => {
                tracing::warn!(service = self.service, method = self.method, error = %e, "could not send an RPC reply")
            }
        }
    }

    async fn fail(&self, error: ErrorBody) {
        self.failed.store(true, Ordering::Release);
        tracing::debug!(service = self.service, method = self.method, error = %error.message, "RPC call failed");
        self.finish(&Reply::error_body(&error)).await;
    }

    /// Sends a result and (unless the caller reads one reply only) the end marker.
    async fn respond(&self, body: Vec<u8>) {
        self.finished.store(true, Ordering::Release);
        let sent = match self.send(&body, false).await {
            Ok(()) if !self.single => self.send(&Reply::end_body(), false).await,
            other => other,
        };
        match sent {
            Ok(()) => {}
            Err(e @ PublishError::TooLarge { .. }) => self.too_large(&e).await,
            Err(e) => {
                tracing::warn!(service = self.service, method = self.method, error = %e, "could not send an RPC reply")
            }
        }
    }

    /// Sends one stream item; `false` when the stream must stop (caller gone or cancelled).
    async fn item(&self, body: Vec<u8>) -> bool {
        match self.send(&body, true).await {
            Ok(()) => !self
                .cancelled
                .as_ref()
                .is_some_and(CancellationToken::is_cancelled),
            Err(PublishError::Broker(crate::amqp::error::BrokerError::NoRoute { .. })) => {
                tracing::info!(
                    service = self.service,
                    method = self.method,
                    "the caller's reply queue is gone: stream stopped"
                );
                false
            }
            Err(e @ PublishError::TooLarge { .. }) => {
                self.too_large(&e).await;
                false
            }
            Err(e) => {
                tracing::warn!(service = self.service, method = self.method, error = %e, "could not send a stream item: stream stopped");
                false
            }
        }
    }
}

/// The arguments of a call, matched to the method's parameters.
pub struct Arguments {
    slots: Vec<Option<Box<RawValue>>>,
    names: &'static [&'static str],
    state: Arc<CallState>,
}

impl Arguments {
    /// Takes the parameter at `index` (of `names`), decoded as `T`. A missing argument is read
    /// as `null`, so `Option` parameters may be left out.
    pub fn take<T: DeserializeOwned>(&mut self, index: usize) -> Result<T, ErrorBody> {
        let name = self.names.get(index).copied().unwrap_or("?");
        match self.slots.get_mut(index).and_then(Option::take) {
            Some(value) => serde_json::from_str(value.get()).map_err(|e| {
                self.state.error(
                    ErrorKind::BadArguments,
                    format!(
                        "argument `{name}` is not a {}: {e}",
                        std::any::type_name::<T>()
                    ),
                    Some(name.to_string()),
                )
            }),
            None => serde_json::from_str("null").map_err(|_| {
                self.state.error(
                    ErrorKind::BadArguments,
                    format!("missing argument `{name}`"),
                    Some(name.to_string()),
                )
            }),
        }
    }
}

impl RpcCall {
    /// Matches positional arguments to `names` in order and keyword arguments by name. Keyword
    /// arguments named `__x__` are protocol flags (the Python framework's `__stream__`) and are ignored.
    pub fn arguments(&mut self, names: &'static [&'static str]) -> Result<Arguments, ErrorBody> {
        let state = &self.state;
        let args = std::mem::take(&mut self.request.args);
        if args.len() > names.len() {
            return Err(state.error(
                ErrorKind::BadArguments,
                format!(
                    "takes {} argument(s), got {} positional",
                    names.len(),
                    args.len()
                ),
                None,
            ));
        }
        let mut slots: Vec<Option<Box<RawValue>>> = args.into_iter().map(Some).collect();
        slots.resize(names.len(), None);
        for (name, value) in std::mem::take(&mut self.request.kwargs) {
            if name.starts_with("__") && name.ends_with("__") {
                continue;
            }
            let Some(index) = names.iter().position(|n| *n == name) else {
                return Err(state.error(
                    ErrorKind::BadArguments,
                    format!("no parameter named `{name}`"),
                    Some(name),
                ));
            };
            if slots[index].is_some() {
                return Err(state.error(
                    ErrorKind::BadArguments,
                    format!("argument `{name}` is given twice"),
                    Some(name),
                ));
            }
            slots[index] = Some(value);
        }
        Ok(Arguments {
            slots,
            names,
            state: state.clone(),
        })
    }

    /// Replies with an error (bad arguments, found by the generated code).
    pub async fn fail(self, error: ErrorBody) {
        self.state.fail(error).await;
    }

    /// Replies with a method's plain return value.
    pub async fn reply_value<T: Serialize>(self, value: T) {
        match Reply::item_bytes(&value) {
            Ok(body) => self.state.respond(body).await,
            Err(e) => self.encode_failed(e).await,
        }
    }

    /// Replies with a method's `Result`: `Err` becomes an error reply with its message.
    pub async fn reply_result<T: Serialize, E: Display>(self, result: Result<T, E>) {
        match result {
            Ok(value) => self.reply_value(value).await,
            Err(e) => {
                let error = self.state.error(ErrorKind::Remote, e.to_string(), None);
                self.state.fail(error).await;
            }
        }
    }

    /// Replies with each item of a stream, then the end marker; stops early when the caller
    /// cancels or is gone.
    pub async fn reply_stream<S, T>(self, stream: S)
    where
        S: Stream<Item = T> + Send,
        T: Serialize,
    {
        self.reply_stream_results(stream.map(Ok::<T, std::convert::Infallible>))
            .await;
    }

    /// As [`RpcCall::reply_stream`], for items that are `Result`s: the first `Err` ends the
    /// stream with an error reply.
    pub async fn reply_stream_results<S, T, E>(self, stream: S)
    where
        S: Stream<Item = Result<T, E>> + Send,
        T: Serialize,
        E: Display,
    {
        let state = self.state;
        state.streaming.store(true, Ordering::Release);
        let mut stream = std::pin::pin!(stream);
        loop {
            let next = tokio::select! {
                next = stream.next() => next,
                () = state.cancellation() => {
                    tracing::info!(service = state.service, method = state.method, "the caller cancelled the stream");
                    state.finished.store(true, Ordering::Release);
                    return;
                }
            };
            match next {
                None => {
                    state.finish(&Reply::end_body()).await;
                    return;
                }
                Some(Ok(item)) => {
                    let body = match Reply::item_bytes(&item) {
                        Ok(body) => body,
                        Err(e) => {
                            let error = state.error(
                                ErrorKind::Remote,
                                format!("cannot encode an item: {e}"),
                                None,
                            );
                            state.fail(error).await;
                            return;
                        }
                    };
                    if !state.item(body).await {
                        state.finished.store(true, Ordering::Release);
                        return;
                    }
                }
                Some(Err(e)) => {
                    let error = state.error(ErrorKind::Remote, e.to_string(), None);
                    state.fail(error).await;
                    return;
                }
            }
        }
    }

    async fn encode_failed(self, e: serde_json::Error) {
        let error = self.state.error(
            ErrorKind::Remote,
            format!("cannot encode the result: {e}"),
            None,
        );
        self.state.fail(error).await;
    }
}

/// Everything an RPC server needs, resolved from the service and its section at start.
#[derive(Debug, Clone)]
pub(crate) struct RpcServerPlan {
    pub service: &'static str,
    pub exchange: ExchangeSettings,
    /// The service's request queue; with `queue_per_method`, the settings every method's queue
    /// is declared with (its name is then the method's routing key).
    pub queue: QueueSettings,
    /// `rpc_queue_per_method`: one queue per method, `<service>__<method>`, bound with its own
    /// name, as baguette-messaging declares them (`docs/rpc-protocol.md`).
    pub queue_per_method: bool,
    pub methods: Vec<&'static str>,
    pub prefetch: u16,
    pub drain_timeout: Duration,
    pub op_timeout: Duration,
    /// The largest reply accepted (`max_message_bytes`); a larger result is an error reply.
    pub max_message_bytes: usize,
    /// The database of each call (`farine::Db::current()`), when the service has one.
    pub db: Option<Arc<crate::db::call::CallDb>>,
    /// The runtime's layers, around each call (set at start).
    pub layers: Layers,
    /// The runtime's tracer (set at start).
    pub tracer: Tracer,
}

impl RpcServerPlan {
    /// Method `name` of the server as `--list` shows it.
    pub(crate) fn describe_method(
        &self,
        name: &'static str,
        stream: bool,
        signature: (&'static str, &'static str),
    ) -> Description {
        let mut description =
            Description::new(self.service, name, HandlerKind::RpcMethod, signature);
        description.exchange = Some((&self.exchange).into());
        description.routing_key = Some(wire::routing_key(self.service, name));
        description.queue = Some((&self.queue_of(name)).into());
        if stream {
            description.settings.push("streams its result".to_string());
        }
        description
    }

    /// The queue that takes the calls of `method`: the service's, or with `queue_per_method`
    /// the method's own, named after its routing key.
    pub(crate) fn queue_of(&self, method: &str) -> QueueSettings {
        if !self.queue_per_method {
            return self.queue.clone();
        }
        QueueSettings {
            name: wire::routing_key(self.service, method),
            ..self.queue.clone()
        }
    }

    /// The names of the queues the server consumes.
    pub(crate) fn queue_names(&self) -> Vec<String> {
        if self.queue_per_method {
            self.methods
                .iter()
                .map(|method| wire::routing_key(self.service, method))
                .collect()
        } else {
            vec![self.queue.name.clone()]
        }
    }

    pub fn from_config(
        service: &'static str,
        methods: Vec<&'static str>,
        section: &Section,
    ) -> Result<Self, ConfigError> {
        let scoped = section.handler("rpc");
        if crate::amqp::topology::queue_type(&scoped)?
            == Some(crate::amqp::topology::QueueType::Stream)
        {
            // A stream gives every call to every server, and keeps it.
            return Err(section.invalid(
                "rpc.queue_type",
                "stream",
                "classic or quorum: an RPC queue hands each call to one server",
            ));
        }
        let prefetch = scoped
            .get_or("prefetch_count", NonZeroU16::new(10).unwrap())?
            .get();
        let queue_per_method = scoped.get_or("rpc_queue_per_method", false)?;
        if queue_per_method && let Some(name) = section.get_str("rpc_queue")? {
            return Err(section.invalid(
                "rpc_queue",
                &name,
                format!("no rpc_queue with rpc_queue_per_method = true: each method's queue is then named {service}__<method>"),
            ));
        }
        for method in methods.iter().filter(|_| queue_per_method) {
            crate::amqp::topology::amqp_name(
                &scoped,
                "rpc_queue_per_method",
                wire::routing_key(service, method),
            )?;
        }
        let queue = QueueSettings::named(
            &scoped,
            crate::amqp::topology::amqp_name(
                &scoped,
                "rpc_queue",
                section
                    .get_str("rpc_queue")?
                    .unwrap_or_else(|| service.to_string()),
            )?,
        )?;
        if queue_per_method {
            python_equivalent(&queue, section)?;
        }
        Ok(Self {
            service,
            exchange: ExchangeSettings {
                name: service.to_string(),
                ..ExchangeSettings::from_config(&scoped, service)?
            },
            queue,
            queue_per_method,
            methods,
            prefetch,
            drain_timeout: scoped.get_or("drain_timeout", Duration::from_secs(30))?,
            op_timeout: scoped.get_or("connect_timeout", Duration::from_secs(10))?,
            max_message_bytes: scoped.get_or(
                "max_message_bytes",
                crate::amqp::publisher::DEFAULT_MAX_MESSAGE_BYTES,
            )?,
            db: None,
            layers: Layers::default(),
            tracer: Tracer::default(),
        })
    }
}

/// With `rpc_queue_per_method`, the queues must be declared as baguette-messaging declares
/// them (durable, not exclusive, not auto-delete, no arguments), or whichever side declares
/// second fails with `PRECONDITION_FAILED`: queue options inherited from the section or
/// `[DEFAULT]` (`queue_type = quorum`, say) are a config error here, not a surprise at run time.
fn python_equivalent(queue: &QueueSettings, section: &Section) -> Result<(), ConfigError> {
    let classic_only = queue.arguments.inner().iter().all(|(name, value)| {
        name.as_str() == "x-queue-type"
            && *value == lapin::types::AMQPValue::LongString("classic".into())
    });
    if queue.durable && !queue.exclusive && !queue.auto_delete && classic_only {
        return Ok(());
    }
    let arguments: Vec<String> = queue
        .arguments
        .inner()
        .keys()
        .map(|name| name.to_string())
        .collect();
    Err(section.invalid(
        "rpc_queue_per_method",
        "true",
        format!(
            "the queues declared as baguette-messaging declares them (durable, not exclusive, not auto-delete, no arguments), but the rpc queue options give durable = {}, exclusive = {}, auto_delete = {}, arguments [{}]: set rpc.queue_type = classic, or leave the queue options out of the service's section and [DEFAULT]",
            queue.durable,
            queue.exclusive,
            queue.auto_delete,
            arguments.join(", ")
        ),
    ))
}

/// The supervised task of a service's RPC server, serving `methods`.
pub(crate) fn task(
    mut plan: RpcServerPlan,
    methods: Vec<Method>,
    connector: Arc<Connector>,
    env: &TaskEnv,
) -> Task {
    let service = plan.service;
    let stop_bound = plan.drain_timeout + plan.op_timeout * 3;
    plan.layers = env.layers.clone();
    plan.tracer = env.observe.tracer.clone();
    let mut methods = methods;
    if let Some(metrics) = &env.observe.metrics {
        for method in &mut methods {
            method.metrics = Some(metrics.rpc_method(service, method.name));
        }
    }
    let (plan, methods) = (Arc::new(plan), Arc::new(methods));
    let env = env.clone();
    Task {
        service,
        handler: "rpc",
        stop_bound,
        start: Box::new(move |ready| {
            let run = run(
                plan.clone(),
                connector.clone(),
                methods.clone(),
                env.scope.clone(),
                env.shutdown.clone(),
                ready,
            );
            let connector = connector.clone();
            Box::pin(async move {
                run.await
                    .map_err(|e| TaskError::new(&e, e.is_outage(&connector)))
            })
        }),
    }
}

/// Runs the RPC server of one service until shutdown (`Ok`) or a channel failure (`Err`).
pub(crate) async fn run(
    plan: Arc<RpcServerPlan>,
    connector: Arc<Connector>,
    methods: Arc<Vec<Method>>,
    scope: CallScope,
    shutdown: CancellationToken,
    ready: Ready,
) -> Result<(), ConsumeError> {
    let Some(conn) = connection_for(&connector, ready.pending(), &shutdown).await? else {
        return Ok(());
    };
    let broker = connector.broker();
    let (channel, mut requests, mut control) =
        tokio::time::timeout(plan.op_timeout, set_up(&plan, &conn, &broker))
            .await
            .map_err(|_| ConsumeError::Timeout(plan.op_timeout).on(&conn))?
            .map_err(|e| e.on(&conn))?;
    let tags = requests.tags();
    let queues = plan.queue_names().join(", ");
    tracing::info!(
        service = plan.service,
        handler = "rpc",
        queues = %queues,
        methods = ?plan.methods,
        prefetch = plan.prefetch,
        "serving RPC"
    );
    ready.signal(Ok(()));

    let publisher = |confirm: bool| {
        Publisher::new(
            connector.clone(),
            ExchangeSettings::default_exchange(),
            String::new(),
            PublisherSettings {
                persistent: false,
                timeout: plan.op_timeout,
                declare_exchange: false,
                mandatory: false,
                max_message_bytes: plan.max_message_bytes,
                // A request whose connection broke is redelivered, and answered again then.
                resend: false,
                confirm,
                message_ids: false,
                trace: false,
            },
        )
    };
    let replies = Replies {
        plain: publisher(false),
        confirmed: publisher(true),
    };
    let channel_error = |e: lapin::Error, queue: &str| {
        ConsumeError::Broker(BrokerError::from_lapin(
            &e,
            Resource::Queue(queue.to_string()),
            &broker,
        ))
        .on(&conn)
    };
    let streams: Arc<Mutex<HashMap<String, CancellationToken>>> = Arc::default();
    let mut in_flight = InFlight::Local(Default::default());
    // One future for the whole loop, not one per message.
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    let stopped = loop {
        tokio::select! {
            biased;
            () = &mut cancelled => break Ok(()),
            Some(_) = in_flight.next(), if !in_flight.is_empty() => {}
            cancel = control.next() => match cancel {
                Some(Ok(delivery)) => {
                    if let Some(id) = delivery.properties.correlation_id().as_ref()
                        && let Ok(streams) = streams.lock()
                        && let Some(token) = streams.get(id.as_str())
                    {
                        token.cancel();
                    }
                }
                Some(Err(e)) => break Err(channel_error(e, "control")),
                None => break Err(ConsumeError::Ended.on(&conn)),
            },
            next = requests.next() => match next {
                Some(Ok(delivery)) => {
                    // Boxed at once: the call's future is large, and is moved on from here.
                    let task = Box::pin(serve(
                        plan.clone(),
                        Message::new(delivery),
                        methods.clone(),
                        replies.clone(),
                        streams.clone(),
                    ));
                    in_flight.push(scope.enter(task));
                }
                Some(Err(e)) => break Err(channel_error(e, &queues)),
                None => break Err(ConsumeError::Ended.on(&conn)),
            },
        }
    };

    let wind_down = WindDown {
        service: plan.service,
        handler: "rpc",
        channel: &channel,
        op_timeout: plan.op_timeout,
    };
    if stopped.is_ok() {
        // Together: each is bounded by `op_timeout`, and the stop bound counts one.
        futures_util::future::join_all(tags.into_iter().map(|tag| wind_down.cancel(tag))).await;
        in_flight
            .drain(plan.drain_timeout, plan.service, "rpc")
            .await;
    }
    in_flight.stop().await;
    wind_down.close(&replies.plain).await;
    replies.confirmed.close_within(plan.op_timeout).await;
    stopped
}

async fn set_up(
    plan: &RpcServerPlan,
    conn: &crate::amqp::transport::Connection,
    broker: &str,
) -> Result<
    (
        crate::amqp::transport::Channel,
        Requests,
        crate::amqp::transport::Consumer,
    ),
    ConsumeError,
> {
    let channel = open_channel(conn, broker, plan.prefetch).await?;
    plan.exchange.declare(&channel, broker).await?;
    for method in &plan.methods {
        plan.queue_of(method)
            .declare_and_bind(
                &channel,
                broker,
                &plan.exchange,
                &wire::routing_key(plan.service, method),
            )
            .await?;
    }
    // This instance's control queue: cancellations of streams, whichever instance serves them.
    let control_err = |e: lapin::Error| {
        let binding = Resource::Binding {
            queue: "(control queue)".to_string(),
            exchange: plan.exchange.name.clone(),
            routing_key: wire::cancel_routing_key(plan.service),
        };
        BrokerError::from_lapin(&e, binding, broker)
    };
    let (control_queue, control) = private_queue(&channel).await.map_err(control_err)?;
    channel
        .queue_bind(
            control_queue.as_str(),
            &plan.exchange.name,
            &wire::cancel_routing_key(plan.service),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(control_err)?;
    let requests = if plan.queue_per_method {
        let mut consumers = Vec::with_capacity(plan.methods.len());
        for queue in plan.queue_names() {
            consumers.push(basic_consume(&channel, broker, &queue).await?);
        }
        Requests::PerMethod { consumers, next: 0 }
    } else {
        Requests::One(basic_consume(&channel, broker, &plan.queue.name).await?)
    };
    Ok((channel, requests, control))
}

/// The requests a server consumes: from the service's queue, or (`rpc_queue_per_method`) from
/// one consumer per method's queue, all on the server's one channel and merged here into the
/// one loop that serves them. The default path pays one branch per poll for it.
enum Requests {
    One(crate::amqp::transport::Consumer),
    PerMethod {
        consumers: Vec<crate::amqp::transport::Consumer>,
        /// The consumer polled first next time: each in turn, so that a busy method's queue
        /// does not keep the others waiting.
        next: usize,
    },
}

impl Requests {
    /// The consumer tags, to cancel them on shutdown.
    fn tags(&self) -> Vec<lapin::types::ShortString> {
        match self {
            Requests::One(consumer) => vec![consumer.tag()],
            Requests::PerMethod { consumers, .. } => {
                consumers.iter().map(|consumer| consumer.tag()).collect()
            }
        }
    }
}

impl Stream for Requests {
    type Item = lapin::Result<crate::amqp::transport::Delivery>;

    /// The next request of any consumer; `None` as soon as one of them ended (the broker
    /// cancelled it): the server then stops and is restarted, as with one queue.
    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        match self.get_mut() {
            Requests::One(consumer) => consumer.poll_next_unpin(cx),
            Requests::PerMethod { consumers, next } => {
                let count = consumers.len();
                for offset in 0..count {
                    let index = (*next + offset) % count;
                    if let std::task::Poll::Ready(item) = consumers[index].poll_next_unpin(cx) {
                        *next = (index + 1) % count;
                        return std::task::Poll::Ready(item);
                    }
                }
                std::task::Poll::Pending
            }
        }
    }
}

/// Serves one request: decode, dispatch, reply, then ack.
async fn serve(
    plan: Arc<RpcServerPlan>,
    message: Message,
    methods: Arc<Vec<Method>>,
    replies: Replies,
    streams: Arc<Mutex<HashMap<String, CancellationToken>>>,
) {
    let service = plan.service;
    // A service has a few methods: a scan beats hashing the routing key.
    let found = methods
        .iter()
        .find(|method| method.routing_key == message.routing_key());
    let streams_items = found.is_some_and(|method| method.streams);
    let state = Arc::new(CallState {
        service,
        method: found.map_or("?", |method| method.name),
        reply_to: message.reply_to().map(str::to_string),
        correlation_id: message.correlation_id().map(str::to_string),
        replies,
        single: message.message_type() == Some(wire::SINGLE_REPLY_TYPE),
        streaming: AtomicBool::new(false),
        cancelled: streams_items.then(CancellationToken::new),
        finished: AtomicBool::new(false),
        failed: AtomicBool::new(false),
    });
    // Only a stream can be cancelled: other calls need no entry.
    let registered = match (&state.correlation_id, &state.cancelled) {
        (Some(id), Some(token)) => {
            if let Ok(mut streams) = streams.lock() {
                streams.insert(id.clone(), token.clone());
            }
            Some(id.clone())
        }
        _ => None,
    };

    // The error replies below are boxed: they are rare, and their publish future would make
    // every call's future larger.
    match (found, serde_json::from_slice::<RawRequest>(message.body())) {
        (None, _) => {
            let error = state.error(
                ErrorKind::UnknownMethod,
                format!(
                    "service `{service}` has no method for routing key `{}`",
                    message.routing_key()
                ),
                None,
            );
            Box::pin(state.fail(error)).await;
        }
        (Some(_), Err(e)) => {
            let error = state.error(
                ErrorKind::BadRequest,
                format!("the request is not {{\"args\": [...], \"kwargs\": {{...}}}}: {e}"),
                None,
            );
            Box::pin(state.fail(error)).await;
        }
        (Some(method), Ok(request)) => {
            let spec = CallSpec {
                service,
                handler: method.name,
                kind_name: "rpc",
                span_kind: SpanKind::Server,
                queue: if plan.queue_per_method {
                    &method.routing_key
                } else {
                    &plan.queue.name
                },
                message_id: message.correlation_id(),
            };
            let span = plan.tracer.start(spec, || message.trace_parent());
            let started = method.metrics.as_ref().map(|_| std::time::Instant::now());
            let handled = (method.call)(RpcCall {
                state: state.clone(),
                request,
            });
            // A panic of the method is caught around it (an error reply of kind `panic`); the
            // layers are around the whole call, its database included.
            let handled = async move {
                handled.await;
                Outcome::Done
            };
            let panicked = AtomicBool::new(false);
            let called = async {
                match crate::db::call::around(plan.db.as_deref(), None, handled).await {
                    crate::db::call::Called::Ran(Outcome::Failed(text)) => {
                        tracing::error!(service, method = state.method, error = %text, "RPC method panicked");
                        panicked.store(true, Ordering::Relaxed);
                        Outcome::Failed(text)
                    }
                    crate::db::call::Called::Ran(outcome) => outcome,
                    crate::db::call::Called::Duplicate => Outcome::Done,
                }
            };
            let layered = plan.layers.around(
                (service, method.name, HandlerKind::RpcMethod),
                &message,
                called,
            );
            let outcome = match &span {
                Some(span) => span.run(layered).await,
                None => layered.await,
            };
            // Every call is answered: a call a layer refused or failed, or that ended without a
            // reply, gets an error reply rather than leaving its caller to time out.
            if !state.finished.load(Ordering::Acquire) {
                let (kind, text) = match outcome {
                    Outcome::Failed(text) if panicked.load(Ordering::Relaxed) => {
                        (ErrorKind::Panic, text)
                    }
                    Outcome::Failed(text) | Outcome::Rejected(text) => (ErrorKind::Remote, text),
                    Outcome::Undecodable(error) => (ErrorKind::BadRequest, error.to_string()),
                    Outcome::Done => (
                        ErrorKind::Remote,
                        "the call ended without a reply".to_string(),
                    ),
                };
                Box::pin(state.fail(state.error(kind, text, None))).await;
            }
            let failed = state.failed.load(Ordering::Acquire);
            if let (Some(metrics), Some(started)) = (&method.metrics, started) {
                metrics.served(started.elapsed(), failed);
            }
            if let Some(span) = span {
                span.end(if failed { "error" } else { "ok" });
            }
        }
    }

    if let Some(id) = registered
        && let Ok(mut streams) = streams.lock()
    {
        streams.remove(&id);
    }
    if let Err(e) = message.ack().await {
        tracing::warn!(service, method = state.method, error = %e, "could not ack an RPC request");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn plan(text: &str) -> Result<RpcServerPlan, ConfigError> {
        let config = Config::from_ini(text, "f.ini").unwrap();
        let section = config.section("svc").unwrap();
        RpcServerPlan::from_config("svc", vec!["add", "count"], &section)
    }

    #[test]
    fn by_default_every_method_is_served_from_the_services_one_queue() {
        let plan = plan("[svc]\n").unwrap();
        assert_eq!(plan.queue_names(), ["svc"]);
        assert_eq!(plan.queue_of("add").name, "svc");
    }

    #[test]
    fn with_rpc_queue_per_method_each_method_has_a_queue_named_as_baguette_messaging_names_it() {
        for text in [
            "[svc]\nrpc_queue_per_method = true\n",
            "[DEFAULT]\nrpc_queue_per_method = true\n[svc]\n",
            "[svc]\nrpc.rpc_queue_per_method = true\n",
        ] {
            let plan = plan(text).unwrap();
            assert_eq!(plan.queue_names(), ["svc__add", "svc__count"], "{text}");
            let queue = plan.queue_of("count");
            assert_eq!(queue.name, "svc__count");
            // As Python farine declares it: durable, shared, kept, no arguments.
            assert!(queue.durable && !queue.auto_delete && !queue.exclusive);
            assert!(queue.arguments.inner().is_empty());
        }
    }

    #[test]
    fn with_rpc_queue_per_method_queue_options_python_does_not_declare_are_refused() {
        let error = plan("[DEFAULT]\nqueue_type = quorum\n[svc]\nrpc_queue_per_method = true\n")
            .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("as baguette-messaging declares them"),
            "{error}"
        );
        plan("[DEFAULT]\nqueue_type = quorum\n[svc]\nrpc_queue_per_method = true\nrpc.queue_type = classic\n")
            .expect("classic for the rpc queues");
        let error =
            plan("[svc]\nrpc_queue_per_method = true\nrpc.queue_arguments = x-max-length = 5\n")
                .unwrap_err();
        assert!(error.to_string().contains("x-max-length"), "{error}");
    }

    #[test]
    fn rpc_queue_and_rpc_queue_per_method_together_are_refused() {
        let error = plan("[svc]\nrpc_queue = calls\nrpc_queue_per_method = true\n").unwrap_err();
        assert!(error.to_string().contains("svc__<method>"), "{error}");
    }
}
