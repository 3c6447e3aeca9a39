//! The service registry: what `#[farine::service]` generates and how the runtime finds it.
//!
//! The macro implements [`Service`] for the annotated type (its name, its handlers, how to build
//! it) and submits a [`ServiceEntry`] to a link-time registry (`inventory`). The runtime reads
//! every entry of the binary; `farine --list` prints them.

use std::sync::Arc;

use futures_util::future::BoxFuture;

use crate::amqp::message::Message;
use crate::amqp::topology::ExchangeSettings;
use crate::amqp::topology::QueueSettings;
use crate::config::{Config, ConfigError, Section};
use crate::consume::{ConsumeSpec, ConsumerPlan};
use crate::execute::{BoundExecute, ExecuteFn, ExecutePlan};
use crate::handler::Outcome;
use crate::handler::schema::{Payloads, PayloadsFn, Schemas};
pub use crate::handler::{Description, ExchangeDescription, HandlerKind, QueueDescription};
use crate::rpc::server::{BoundRpc, RpcFn, RpcServerPlan};
#[cfg(feature = "sse")]
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
    /// The service reads keys of its own from its section (it is built by an `init`
    /// function): only a key close to one of farine's is reported as a misspelling.
    const OWN_KEYS: bool = false;
}

/// One annotated method.
pub struct Handler<S> {
    /// The method's name.
    pub name: &'static str,
    pub kind: Declared<S>,
    /// Its parameters after `&self` and its return type, as written (for its description).
    pub takes: &'static str,
    pub gives: &'static str,
    /// The config the attribute carries (`#[execute(interval = "1s")]`), as `(key, value)`:
    /// the handler's own defaults, which the service's section overrides.
    pub settings: &'static [(&'static str, &'static str)],
    /// What its messages carry, as JSON Schema (for the AsyncAPI document).
    pub payloads: PayloadsFn,
}

/// What an annotated method is.
pub enum Declared<S> {
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
    #[cfg(feature = "sse")]
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

/// A handler of a built service: the generated function with the service instance captured.
pub(crate) enum BoundHandler {
    Consume {
        name: &'static str,
        spec: ConsumeSpec,
        call: crate::consume::Call,
    },
    Rpc {
        name: &'static str,
        stream: bool,
        call: BoundRpc,
    },
    Execute {
        name: &'static str,
        call: BoundExecute,
    },
    #[cfg(feature = "sse")]
    Sse { name: &'static str, call: BoundSse },
}

/// The registry entry of one service. Built by the macro with [`ServiceEntry::new`].
pub struct ServiceEntry {
    /// The service's (and its config section's) name.
    pub name: &'static str,
    /// The Rust type's name, as written.
    pub type_name: &'static str,
    /// The Rust module that declares it.
    pub module_path: &'static str,
    /// The service reads keys of its own ([`Service::OWN_KEYS`]).
    pub own_keys: bool,
    describe: fn() -> Vec<HandlerInfo>,
    code_settings: fn() -> Vec<(&'static str, &'static str, &'static str)>,
    descriptions: fn(&Section) -> Vec<Described>,
    payloads: fn(&mut Schemas) -> Vec<(&'static str, Payloads)>,
    build: fn(&Section) -> Result<Vec<BoundHandler>, BoxError>,
}

inventory::collect!(ServiceEntry);

impl ServiceEntry {
    #[doc(hidden)]
    pub const fn new<S: Service>(type_name: &'static str, module_path: &'static str) -> Self {
        Self {
            name: S::NAME,
            type_name,
            module_path,
            own_keys: S::OWN_KEYS,
            describe: describe::<S>,
            code_settings: code_settings::<S>,
            descriptions: descriptions::<S>,
            payloads: payloads::<S>,
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

    /// The service's section of `config`, with the settings its handlers' attributes carry
    /// ([`Config::section_with_code`]); an error when the file has no such section.
    pub fn section(&self, config: &Config) -> Result<Section, ConfigError> {
        config.section_with_code(self.name, &(self.code_settings)())
    }

    /// Each handler as `section` (the service's) resolves it: what `--list` prints.
    pub fn describe(&self, section: &Section) -> Vec<Described> {
        (self.descriptions)(section)
    }

    /// What each handler's messages carry, by handler name, described with `schemas` (which
    /// collects the named types they refer to).
    pub fn payloads(&self, schemas: &mut Schemas) -> Vec<(&'static str, Payloads)> {
        (self.payloads)(schemas)
    }

    /// Builds the service from its section and binds its task-running handlers to it.
    pub(crate) fn build(&self, section: &Section) -> Result<Vec<BoundHandler>, BoxError> {
        (self.build)(section)
    }
}

fn code_settings<S: Service>() -> Vec<(&'static str, &'static str, &'static str)> {
    S::handlers()
        .iter()
        .flat_map(|handler| {
            handler
                .settings
                .iter()
                .map(|(key, value)| (handler.name, *key, *value))
        })
        .collect()
}

fn payloads<S: Service>(schemas: &mut Schemas) -> Vec<(&'static str, Payloads)> {
    S::handlers()
        .iter()
        .map(|handler| (handler.name, (handler.payloads)(schemas)))
        .collect()
}

fn describe<S: Service>() -> Vec<HandlerInfo> {
    S::handlers()
        .into_iter()
        .map(|handler| match handler.kind {
            Declared::Consume(spec, _) => HandlerInfo::Consume {
                name: handler.name,
                spec,
            },
            Declared::Publish(spec) => HandlerInfo::Publish {
                name: handler.name,
                spec,
            },
            Declared::Rpc(spec, _) => HandlerInfo::Rpc {
                name: handler.name,
                spec,
            },
            Declared::RpcClient(spec) => HandlerInfo::RpcClient {
                name: handler.name,
                spec,
            },
            Declared::Execute(_) => HandlerInfo::Execute { name: handler.name },
            #[cfg(feature = "sse")]
            Declared::Sse(_) => HandlerInfo::Sse { name: handler.name },
        })
        .collect()
}

/// A handler's description, or why its config does not resolve.
#[derive(Debug)]
pub struct Described {
    pub handler: &'static str,
    pub kind: HandlerKind,
    pub description: Result<Description, ConfigError>,
}

fn descriptions<S: Service>(section: &Section) -> Vec<Described> {
    S::handlers()
        .iter()
        .map(|handler| {
            let (name, signature) = (handler.name, (handler.takes, handler.gives));
            let (kind, description) = match &handler.kind {
                Declared::Consume(spec, _) => (
                    HandlerKind::Consume,
                    ConsumerPlan::from_config(S::NAME, name, spec, section)
                        .map(|plan| plan.describe(signature)),
                ),
                Declared::Publish(spec) => (
                    HandlerKind::Publish,
                    describe_publish(S::NAME, name, spec, section, signature),
                ),
                Declared::Rpc(spec, _) => (
                    HandlerKind::RpcMethod,
                    RpcServerPlan::from_config(S::NAME, vec![name], section)
                        .map(|plan| plan.describe_method(name, spec.stream, signature)),
                ),
                Declared::RpcClient(spec) => (
                    HandlerKind::RpcClient,
                    crate::rpc::client::describe(S::NAME, name, spec.service, section, signature),
                ),
                Declared::Execute(_) => (
                    HandlerKind::Execute,
                    ExecutePlan::from_config(S::NAME, name, section)
                        .map(|plan| plan.describe(signature)),
                ),
                #[cfg(feature = "sse")]
                Declared::Sse(_) => (
                    HandlerKind::Sse,
                    Ok(crate::sse::describe(S::NAME, name, section, signature)),
                ),
            };
            Described {
                handler: name,
                kind,
                description,
            }
        })
        .collect()
}

/// A `#[publish]` method: its exchange and routing key.
fn describe_publish(
    service: &'static str,
    name: &'static str,
    spec: &PublishSpec,
    section: &Section,
    signature: (&'static str, &'static str),
) -> Result<Description, ConfigError> {
    let scoped = section.handler(name);
    let exchange = ExchangeSettings::from_config(&scoped, spec.exchange)?;
    let mut description = Description::new(service, name, HandlerKind::Publish, signature);
    description.exchange = Some((&exchange).into());
    description.routing_key = Some(
        scoped
            .get_str("routing_key")?
            .unwrap_or_else(|| spec.routing_key.to_string()),
    );
    Ok(description)
}

/// How every kind describes the exchange it uses (the impl lives here, where both types are
/// known; the kinds call `.into()`).
impl From<&ExchangeSettings> for ExchangeDescription {
    fn from(exchange: &ExchangeSettings) -> Self {
        Self {
            name: exchange.name.clone(),
            kind: exchange.kind_name().to_string(),
            durable: exchange.durable,
            auto_delete: exchange.auto_delete,
        }
    }
}

/// How the kinds that consume a queue describe it.
impl From<&QueueSettings> for QueueDescription {
    fn from(queue: &QueueSettings) -> Self {
        Self {
            name: queue.name.clone(),
            durable: queue.durable,
            exclusive: queue.exclusive,
            auto_delete: queue.auto_delete,
            arguments: crate::amqp::topology::arguments_json(&queue.arguments),
        }
    }
}

fn build<S: Service>(section: &Section) -> Result<Vec<BoundHandler>, BoxError> {
    let service = Arc::new(S::build(section)?);
    let mut bound = Vec::new();
    for handler in S::handlers() {
        let instance = service.clone();
        let name = handler.name;
        bound.push(match handler.kind {
            Declared::Consume(spec, call) => BoundHandler::Consume {
                name,
                spec,
                call: Arc::new(move |message| call(instance.clone(), message)),
            },
            Declared::Rpc(spec, call) => BoundHandler::Rpc {
                name,
                stream: spec.stream,
                call: Arc::new(move |request| call(instance.clone(), request)),
            },
            Declared::Execute(call) => BoundHandler::Execute {
                name,
                call: Arc::new(move |shutdown| call(instance.clone(), shutdown)),
            },
            #[cfg(feature = "sse")]
            Declared::Sse(call) => BoundHandler::Sse {
                name,
                call: Arc::new(move |event| call(instance.clone(), event)),
            },
            Declared::Publish(_) | Declared::RpcClient(_) => continue,
        });
    }
    Ok(bound)
}
