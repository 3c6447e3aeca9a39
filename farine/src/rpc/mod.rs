//! RPC over AMQP: `#[rpc::method]` on the server side, [`Client`](crate::rpc::Client) (and `#[rpc::client]`, and the
//! typed clients of `#[rpc::interface]`) on the calling side.
//!
//! The wire format is baguette-messaging's, so services written with either framework call each
//! other; `docs/rpc-protocol.md` specifies it. A call is a message to exchange `<service>` with
//! routing key `<service>__<method>` and body `{"args": [...], "kwargs": {...}}`; the replies
//! go to the caller's `reply_to` queue with the call's `correlation_id`.

pub(crate) mod client;
pub(crate) mod server;
pub(crate) mod wire;

use std::time::Duration;

pub use client::{Args, CallOptions, Client, RpcStream};
pub use farine_macros::{rpc_client as client, rpc_interface as interface, rpc_method as method};
pub use futures_util::stream;
pub use futures_util::{Stream, StreamExt};
pub use wire::ErrorKind;

/// A failed call, naming the service, the method and the cause.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum RpcError {
    /// The method ran and failed (returned `Err`, or panicked: `kind` says which when the server
    /// is farine).
    #[error("{service}.{method} failed: {message}")]
    Remote {
        service: String,
        method: String,
        kind: Option<ErrorKind>,
        message: String,
    },
    /// An argument is missing, extra or of the wrong type; the server names it.
    #[error("{service}.{method}: bad arguments: {message}")]
    BadArguments {
        service: String,
        method: String,
        param: Option<String>,
        message: String,
    },
    /// No exchange `<service>`: no such service runs (or ever declared its topology).
    #[error(
        "no service `{service}` is listening (exchange `{service}` does not exist), calling `{method}`"
    )]
    NoSuchService { service: String, method: String },
    /// The service runs but serves no method of that name.
    #[error("service `{service}` has no method `{method}`")]
    NoSuchMethod { service: String, method: String },
    /// No reply within the call's timeout.
    #[error("{service}.{method} did not answer within {after:?}")]
    Timeout {
        service: String,
        method: String,
        after: Duration,
    },
    /// The reply does not decode into the type the caller expects.
    #[error("{service}.{method}: the reply does not decode as the expected type: {cause}")]
    Decode {
        service: String,
        method: String,
        cause: String,
    },
    /// The arguments cannot be serialised.
    #[error("{service}.{method}: cannot encode the arguments: {cause}")]
    Encode {
        service: String,
        method: String,
        cause: String,
    },
    /// The broker could not be reached, or the connection was lost during the call.
    #[error("{service}.{method}: {cause}")]
    Connection {
        service: String,
        method: String,
        cause: String,
    },
    /// The broker refused the call: `NoConsumers` when the service's queue exists but no
    /// instance consumes it (found when a call times out).
    #[error("{service}.{method}: {error}")]
    Broker {
        service: String,
        method: String,
        #[source]
        error: Box<crate::amqp::error::BrokerError>,
    },
    /// An injected client used where no farine runtime runs its service.
    #[error(
        "the RPC client of `{caller}` (calling {service}.{method}) was used outside a running farine service: start the service with farine, or pass a client yourself (`{caller}_with`)"
    )]
    NotRunning {
        service: String,
        method: String,
        caller: &'static str,
    },
}

impl RpcError {
    /// The kind of failure, as a metric's label: `remote`, `timeout`, `no_such_method`, ...
    pub(crate) fn kind_name(&self) -> &'static str {
        match self {
            RpcError::Remote { .. } => "remote",
            RpcError::BadArguments { .. } => "bad_arguments",
            RpcError::NoSuchService { .. } => "no_such_service",
            RpcError::NoSuchMethod { .. } => "no_such_method",
            RpcError::Timeout { .. } => "timeout",
            RpcError::Decode { .. } => "decode",
            RpcError::Encode { .. } => "encode",
            RpcError::Connection { .. } => "connection",
            RpcError::Broker { .. } => "broker",
            RpcError::NotRunning { .. } => "not_running",
        }
    }

    /// The service called.
    pub fn service(&self) -> &str {
        match self {
            RpcError::Remote { service, .. }
            | RpcError::BadArguments { service, .. }
            | RpcError::NoSuchService { service, .. }
            | RpcError::NoSuchMethod { service, .. }
            | RpcError::Timeout { service, .. }
            | RpcError::Decode { service, .. }
            | RpcError::Encode { service, .. }
            | RpcError::Connection { service, .. }
            | RpcError::Broker { service, .. }
            | RpcError::NotRunning { service, .. } => service,
        }
    }

    /// The method called.
    pub fn method(&self) -> &str {
        match self {
            RpcError::Remote { method, .. }
            | RpcError::BadArguments { method, .. }
            | RpcError::NoSuchService { method, .. }
            | RpcError::NoSuchMethod { method, .. }
            | RpcError::Timeout { method, .. }
            | RpcError::Decode { method, .. }
            | RpcError::Encode { method, .. }
            | RpcError::Connection { method, .. }
            | RpcError::Broker { method, .. }
            | RpcError::NotRunning { method, .. } => method,
        }
    }
}
