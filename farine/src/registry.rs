//! The service registry: what `#[farine::service]` generates and how the runtime finds it.
//!
//! The macro implements [`Service`] for the annotated type (its name, its handlers, how to build
//! it) and submits a [`ServiceEntry`] to a link-time registry (`inventory`). The runtime reads
//! every entry of the binary; `farine --list` prints them.

use std::sync::Arc;

use futures_util::future::BoxFuture;

use crate::amqp::message::Message;
use crate::config::Section;
use crate::consume::ConsumeSpec;
use crate::execute::{BoundExecute, ExecuteFn};
use crate::handler::Outcome;
use crate::rpc::server::{BoundRpc, RpcFn};
use crate::sse::{BoundSse, SseFn};

/// An error of any kind, as user code returns it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a `#[consume]` handler looks like once the macro wrapped it: decode, call, report.
pub type ConsumeFn<S> = fn(Arc<S>, Message) -> BoxFuture<'static, Outcome>;

/// A service: implemented by `#[farine::service]`, not by hand.
pub trait Service: Send + Sync + Sized + 'static {
    /// The service's name, and the name of its config section.
    const NAME: &'static str;
    /// The handlers declared in the service's `impl` block.
    fn handlers() -> Vec<Handler<Self>>;
    /// Builds the service (`Default`, or the `init` function named in the attribute).
    fn build(section: &Section) -> Result<Self, BoxError>;
}

/// One annotated method.
pub struct Handler<S> {
    /// The method's name.
    pub name: &'static str,
    pub kind: HandlerKind<S>,
}

/// What an annotated method is.
pub enum HandlerKind<S> {
    /// `#[consume]`: a task that consumes a queue and calls the method for each message.
    Consume(ConsumeSpec, ConsumeFn<S>),
    /// `#[publish]`: no task; farine prepares the method's publisher.
    Publish(PublishSpec),
    /// `#[rpc::method]`: served by the service's RPC server task.
    Rpc(RpcSpec, RpcFn<S>),
    /// `#[rpc::client("service")]`: no task; farine prepares the method's client.
    RpcClient(RpcClientSpec),
    /// `#[execute]`: a task that runs the method, and runs it again when it returns.
    Execute(ExecuteFn<S>),
    /// `#[stream::http]`: a task that listens to the configured SSE endpoint.
    Sse(SseFn<S>),
}

/// The arguments of `#[rpc::method(...)]`.
#[derive(Debug, Clone, Copy)]
pub struct RpcSpec {
    /// The method returns a stream of items.
    pub stream: bool,
}

/// The argument of `#[rpc::client("service")]`.
#[derive(Debug, Clone, Copy)]
pub struct RpcClientSpec {
    /// The service called.
    pub service: &'static str,
}

/// The arguments of `#[publish(...)]`.
#[derive(Debug, Clone, Copy)]
pub struct PublishSpec {
    pub exchange: &'static str,
    pub routing_key: &'static str,
}

/// A handler without its function: for listing and for preparing publishers.
#[derive(Debug, Clone, Copy)]
pub enum HandlerInfo {
    Consume {
        name: &'static str,
        spec: ConsumeSpec,
    },
    Publish {
        name: &'static str,
        spec: PublishSpec,
    },
    Rpc {
        name: &'static str,
        spec: RpcSpec,
    },
    RpcClient {
        name: &'static str,
        spec: RpcClientSpec,
    },
    Execute {
        name: &'static str,
    },
    Sse {
        name: &'static str,
    },
}

impl HandlerInfo {
    /// The method's name.
    pub fn name(&self) -> &'static str {
        match self {
            HandlerInfo::Consume { name, .. }
            | HandlerInfo::Publish { name, .. }
            | HandlerInfo::Rpc { name, .. }
            | HandlerInfo::RpcClient { name, .. }
            | HandlerInfo::Execute { name }
            | HandlerInfo::Sse { name } => name,
        }
    }
}

/// A built service: its handlers with the instance captured.
#[derive(Default)]
pub(crate) struct Bound {
    pub consumers: Vec<BoundConsumer>,
    pub rpc: Vec<(&'static str, BoundRpc)>,
    pub executes: Vec<(&'static str, BoundExecute)>,
    pub listeners: Vec<(&'static str, BoundSse)>,
}

/// A built service's consume handlers, with the service instance captured.
pub(crate) struct BoundConsumer {
    pub name: &'static str,
    pub spec: ConsumeSpec,
    pub call: Arc<dyn Fn(Message) -> BoxFuture<'static, Outcome> + Send + Sync>,
}

/// The registry entry of one service. Built by the macro with [`ServiceEntry::new`].
pub struct ServiceEntry {
    /// The service's (and its config section's) name.
    pub name: &'static str,
    /// The Rust type's name, as written.
    pub type_name: &'static str,
    /// The Rust module that declares it.
    pub module_path: &'static str,
    describe: fn() -> Vec<HandlerInfo>,
    build: fn(&Section) -> Result<Bound, BoxError>,
}

inventory::collect!(ServiceEntry);

impl ServiceEntry {
    #[doc(hidden)]
    pub const fn new<S: Service>(type_name: &'static str, module_path: &'static str) -> Self {
        Self {
            name: S::NAME,
            type_name,
            module_path,
            describe: describe::<S>,
            build: build::<S>,
        }
    }

    /// Every service linked into this binary, sorted by name.
    pub fn all() -> Vec<&'static ServiceEntry> {
        let mut entries: Vec<_> = inventory::iter::<ServiceEntry>.into_iter().collect();
        entries.sort_by_key(|entry| entry.name);
        entries
    }

    /// The service's handlers, in declaration order.
    pub fn handlers(&self) -> Vec<HandlerInfo> {
        (self.describe)()
    }

    pub(crate) fn build(&self, section: &Section) -> Result<Bound, BoxError> {
        (self.build)(section)
    }
}

fn describe<S: Service>() -> Vec<HandlerInfo> {
    S::handlers()
        .into_iter()
        .map(|handler| match handler.kind {
            HandlerKind::Consume(spec, _) => HandlerInfo::Consume {
                name: handler.name,
                spec,
            },
            HandlerKind::Publish(spec) => HandlerInfo::Publish {
                name: handler.name,
                spec,
            },
            HandlerKind::Rpc(spec, _) => HandlerInfo::Rpc {
                name: handler.name,
                spec,
            },
            HandlerKind::RpcClient(spec) => HandlerInfo::RpcClient {
                name: handler.name,
                spec,
            },
            HandlerKind::Execute(_) => HandlerInfo::Execute { name: handler.name },
            HandlerKind::Sse(_) => HandlerInfo::Sse { name: handler.name },
        })
        .collect()
}

fn build<S: Service>(section: &Section) -> Result<Bound, BoxError> {
    let service = Arc::new(S::build(section)?);
    let mut bound = Bound::default();
    for handler in S::handlers() {
        let instance = service.clone();
        match handler.kind {
            HandlerKind::Consume(spec, call) => bound.consumers.push(BoundConsumer {
                name: handler.name,
                spec,
                call: Arc::new(move |message| call(instance.clone(), message)),
            }),
            HandlerKind::Rpc(_, call) => bound.rpc.push((
                handler.name,
                Arc::new(move |request| call(instance.clone(), request)),
            )),
            HandlerKind::Execute(call) => bound.executes.push((
                handler.name,
                Arc::new(move |shutdown| call(instance.clone(), shutdown)),
            )),
            HandlerKind::Sse(call) => bound.listeners.push((
                handler.name,
                Arc::new(move |event| call(instance.clone(), event)),
            )),
            HandlerKind::Publish(_) | HandlerKind::RpcClient(_) => {}
        }
    }
    Ok(bound)
}
