//! farine: a microservice framework over RabbitMQ, the Rust counterpart of the Python
//! framework baguette-messaging.
//!
//! A user writes a plain struct and annotates the methods of one `impl` block; farine reads the
//! INI config, connects to the broker, and runs one supervised task per handler:
//!
//! ```no_run
//! use farine::{consume, publish, Publisher, PublishError};
//! use serde_json::{json, Map, Value};
//!
//! #[derive(Default)]
//! pub struct Relay;
//!
//! #[farine::service]
//! impl Relay {
//!     #[consume(exchange = "orders", routing_key = "order.created")]
//!     async fn relay(&self, order: Map<String, Value>) -> Result<(), PublishError> {
//!         self.seen(&json!({ "seen": order })).await
//!     }
//!
//!     #[publish(exchange = "audit", routing_key = "order.seen")]
//!     async fn seen(&self, publisher: Publisher, event: &Value) -> Result<(), PublishError> {
//!         publisher.publish(event).await
//!     }
//! }
//! # fn main() {}
//! ```
//!
//! Where things live: [`config`] (the INI file), [`registry`] (what the macros register),
//! [`runtime`] (start, supervision, shutdown), [`amqp`] (connection, topology, consumers,
//! publishers, messages), [`rpc`] (RPC server, client, wire format), [`stream`] (SSE
//! listeners), [`execute`] (restarted methods), [`db`] (PostgreSQL), [`cli`] (the command line
//! of a service binary).

pub mod amqp;
pub mod cli;
pub mod config;
pub mod db;
pub mod execute;
mod ids;
pub mod registry;
pub mod rpc;
pub mod runtime;
pub mod stream;

pub use amqp::error::{BrokerError, Resource};
pub use amqp::message::{DecodeError, Message, SettleError};
pub use amqp::publisher::{PublishError, PublishOptions, Publisher};
pub use db::{Db, DbCallError};
pub use execute::Shutdown;
pub use farine_macros::{consume, execute, publish, service};
pub use runtime::{RunError, Running, Runtime, StartError};

/// Gives a service package its `main`: `farine::main!();` in `src/main.rs` declares the
/// package's `service` module (`src/service.rs`), embeds the package's `migrations/` folder
/// (applied at start when a database is configured) and runs the farine command line.
/// `farine::main!(services);` names another module.
#[macro_export]
macro_rules! main {
    () => {
        $crate::main!(service);
    };
    ($module:ident) => {
        mod $module;
        fn main() -> ::std::process::ExitCode {
            $crate::cli::main_with_migrations(
                ::std::env!("CARGO_PKG_NAME"),
                $crate::__private::embed_migrations!(),
            )
        }
    };
}

#[doc(hidden)]
pub mod __private {
    pub use crate::amqp::consumer::{IntoOutcome, Outcome};
    pub use crate::execute::Shutdown;
    pub use crate::registry::{
        BoxError, ConsumeSpec, Handler, HandlerKind, PublishSpec, RpcClientSpec, RpcSpec, Service,
        ServiceEntry,
    };
    pub use crate::rpc::server::{Arguments as RpcArguments, RpcCall};
    pub use crate::runtime::context::{publisher, rpc_client};
    pub use crate::stream::Event as SseEvent;
    pub use farine_macros::embed_migrations;
    pub use futures_util::future::BoxFuture;
    pub use inventory;
    pub use serde;
    pub use serde_json;
}
