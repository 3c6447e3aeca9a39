//! The plain model of a service that the macro builds before checking and generating.

use proc_macro2::Span;
use syn::{Ident, Path, Type};

/// The arguments of `#[farine::service(...)]`.
#[derive(Default)]
pub struct ServiceArgs {
    /// `name = "..."`: the service's (and its config section's) name.
    pub name: Option<(String, Span)>,
    /// `init = path`: `fn(&farine::config::Section) -> Result<Self, E>` instead of `Default`.
    pub init: Option<Path>,
    /// `implements = path::Trait`: an `#[rpc::interface]` trait the service's RPC methods
    /// implement, checked by the compiler.
    pub implements: Option<Path>,
}

/// The handler attributes farine knows.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AttrKind {
    Consume,
    Publish,
    RpcMethod,
    RpcClient,
    StreamHttp,
    Execute,
}

impl AttrKind {
    pub fn display(self) -> &'static str {
        match self {
            AttrKind::Consume => "#[consume]",
            AttrKind::Publish => "#[publish]",
            AttrKind::RpcMethod => "#[rpc::method]",
            AttrKind::RpcClient => "#[rpc::client]",
            AttrKind::StreamHttp => "#[stream::http]",
            AttrKind::Execute => "#[execute]",
        }
    }

    /// The config keys the attribute may carry besides its own (`#[execute(interval =
    /// "1s")]`); none for an RPC method, whose settings are the server's (`rpc.<key>`).
    pub fn settings(self) -> &'static [&'static str] {
        match self {
            AttrKind::Consume => crate::keys::CONSUME,
            AttrKind::Publish => crate::keys::PUBLISH,
            AttrKind::RpcMethod => &[],
            AttrKind::RpcClient => crate::keys::RPC_CLIENT,
            AttrKind::StreamHttp => crate::keys::STREAM_HTTP,
            AttrKind::Execute => crate::keys::EXECUTE,
        }
    }

    /// The keys the attribute takes.
    pub fn keys(self) -> &'static [&'static str] {
        match self {
            AttrKind::Consume => &["exchange", "routing_key", "queue"],
            AttrKind::Publish => &["exchange", "routing_key"],
            AttrKind::RpcMethod => &["stream"],
            AttrKind::RpcClient => &["service"],
            _ => &[],
        }
    }
}

/// The arguments of a handler attribute.
#[derive(Default)]
pub struct HandlerArgs {
    pub exchange: Option<String>,
    pub routing_key: Option<String>,
    pub queue: Option<String>,
    /// `#[rpc::method(stream)]`.
    pub stream: bool,
    /// `#[rpc::client("service")]`.
    pub service: Option<String>,
    /// Config the attribute carries (`interval = "1s"`, `inbox`), as `(key, value)`.
    pub settings: Vec<(String, String)>,
}

/// A parameter a handler takes from its call through `farine::FromCall`, whatever its type's
/// name: the body, the message or event handle, the database, the shutdown signal, or a type of
/// the user's own. A `&T` parameter borrows a `T` taken for the call.
pub struct Extracted {
    pub ty: Box<Type>,
    pub by_ref: bool,
}

/// A checked `#[consume]` handler.
pub struct Consume {
    pub method: Ident,
    pub exchange: String,
    pub routing_key: String,
    pub queue: Option<String>,
    pub params: Vec<Extracted>,
    /// The declared return type (`None` for `()`), where a wrong return type is reported.
    pub output: Option<Box<Type>>,
}

/// A checked `#[publish]` method.
pub struct Publish {
    pub method: Ident,
    pub exchange: String,
    pub routing_key: String,
    /// What it sends, for its description: the type of its one parameter after the publisher
    /// (`&T` read as `T`); `None` when it takes several or none.
    pub payload: Option<Box<Type>>,
}

/// How an RPC method's result becomes replies.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ReplyShape {
    /// A plain value (unit included).
    Value,
    /// A `Result`: `Err` is an error reply.
    Result,
    /// A stream of values.
    Stream,
    /// A stream of `Result`s.
    StreamOfResults,
}

/// A checked `#[rpc::method]`.
pub struct RpcMethod {
    pub method: Ident,
    pub is_async: bool,
    /// Parameter names (for keyword arguments) and types, after `&self`.
    pub params: Vec<(Ident, Type)>,
    pub shape: ReplyShape,
    /// The declared return type, where a type that cannot be sent is reported.
    pub output: Option<Box<Type>>,
    /// What each reply carries, for its description: `T` of `T`, `Result<T, E>`,
    /// `impl Stream<Item = T>` or `impl Stream<Item = Result<T, E>>`; `None` when the
    /// signature does not name it (an `impl` type, a stream type of the user's own).
    pub reply: Option<Type>,
}

/// A checked `#[rpc::client("service")]` method.
pub struct RpcClient {
    pub method: Ident,
    pub service: String,
}

/// A checked `#[execute]` method.
pub struct Execute {
    pub method: Ident,
    pub params: Vec<Extracted>,
    pub output: Option<Box<Type>>,
}

/// A checked `#[stream::http]` handler.
pub struct Sse {
    pub method: Ident,
    pub params: Vec<Extracted>,
    pub output: Option<Box<Type>>,
}

/// A checked handler.
pub enum HandlerModel {
    Execute(Execute),
    Sse(Sse),
    Consume(Consume),
    Publish(Publish),
    RpcMethod(RpcMethod),
    RpcClient(RpcClient),
}
