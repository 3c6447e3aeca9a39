//! What a handler is, as its service's config resolves it: the one description of every
//! handler that `--list` prints (and that documents and metrics can read), built by each kind
//! from the same plan it runs with.

use std::fmt;

/// The kind of a handler: the attribute it was declared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum HandlerKind {
    /// `#[consume]`: consumes a queue.
    Consume,
    /// `#[publish]`: publishes to an exchange.
    Publish,
    /// `#[rpc::method]`: answers calls.
    RpcMethod,
    /// `#[rpc::client]`: calls another service.
    RpcClient,
    /// `#[stream::http]`: listens to Server-Sent Events.
    Sse,
    /// `#[execute]`: runs, and runs again.
    Execute,
}

impl HandlerKind {
    /// The name `--list` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            HandlerKind::Consume => "consume",
            HandlerKind::Publish => "publish",
            HandlerKind::RpcMethod => "rpc",
            HandlerKind::RpcClient => "rpc client",
            HandlerKind::Sse => "stream::http",
            HandlerKind::Execute => "execute",
        }
    }
}

/// An exchange as a handler uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExchangeDescription {
    pub name: String,
    /// `direct`, `topic`, `fanout` or `headers`.
    pub kind: String,
    pub durable: bool,
    pub auto_delete: bool,
}

/// A queue as a handler declares it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct QueueDescription {
    pub name: String,
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    /// Its arguments (`x-queue-type`, `x-message-ttl`, ...), as JSON values.
    pub arguments: serde_json::Map<String, serde_json::Value>,
}

/// One handler, as its service's config resolves it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Description {
    pub service: &'static str,
    pub handler: &'static str,
    pub kind: HandlerKind,
    /// The exchange it consumes from (through its queue) or publishes to.
    pub exchange: Option<ExchangeDescription>,
    /// Its routing key (a binding key for a consumer).
    pub routing_key: Option<String>,
    /// The queue it consumes.
    pub queue: Option<QueueDescription>,
    /// What the method takes (its parameters after `&self`) and gives (its return type), as
    /// written in the code.
    pub takes: &'static str,
    pub gives: &'static str,
    /// The kind's own settings, in the order `--list` shows them (`prefetch 10`, ...).
    pub settings: Vec<String>,
}

impl Description {
    /// A description of `handler` of `service` with nothing resolved yet.
    pub(crate) fn new(
        service: &'static str,
        handler: &'static str,
        kind: HandlerKind,
        (takes, gives): (&'static str, &'static str),
    ) -> Self {
        Self {
            service,
            handler,
            kind,
            exchange: None,
            routing_key: None,
            queue: None,
            takes,
            gives,
            settings: Vec::new(),
        }
    }
}

/// The line `--list` prints: `consume relay: exchange orders (direct), routing key
/// "order.created", queue relay.relay, prefetch 10, ..., fn(order: Order) -> Result<(), E>`.
impl fmt::Display for Description {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}:", self.kind.as_str(), self.handler)?;
        let mut parts = Vec::new();
        if let Some(exchange) = &self.exchange {
            parts.push(format!("exchange {} ({})", exchange.name, exchange.kind));
        }
        if let Some(key) = &self.routing_key {
            parts.push(format!("routing key {key:?}"));
        }
        if let Some(queue) = &self.queue {
            parts.push(format!("queue {}", queue.name));
        }
        parts.extend(self.settings.iter().cloned());
        parts.push(format!("fn({}) -> {}", self.takes, self.gives));
        write!(f, " {}", parts.join(", "))
    }
}
