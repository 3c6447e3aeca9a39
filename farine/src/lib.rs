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
//! The reference is on the items you meet: the attributes ([`macro@service`],
//! [`macro@consume`], [`macro@publish`], [`macro@execute`], [`rpc`], [`stream`]), the
//! configuration ([`config`]: every key), the command line ([`main!`]: every flag and exit
//! status), the database ([`db`]), middleware ([`layer`]), a standalone program's publisher
//! ([`Publisher::connect`]) and log ([`log`]). How the crate is built inside is
//! `docs/architecture.md` in the repository.
//!
//! Cargo features, both on by default: `db` (PostgreSQL through sqlx: the `db_*` keys,
//! [`Db`], transactions, the inbox, migrations, stream checkpoints) and `sse`
//! (`#[stream::http]` through eventsource-client). With `default-features = false` neither
//! crate is compiled; a config that names a database is then refused at start.

pub mod amqp;
mod asyncapi;
mod cli;
#[doc = include_str!("docs/configuration.md")]
pub mod config;
mod consume;
#[doc = include_str!("docs/db.md")]
pub mod db;
mod decode;
pub mod execute;
mod handler;
mod ids;
pub mod log;
mod observe;
mod operate;
mod registry;
#[doc = include_str!("docs/rpc.md")]
pub mod rpc;
mod runtime;
#[cfg(feature = "sse")]
mod sse;
#[cfg(feature = "testing")]
pub mod testing;

#[cfg(feature = "sse")]
#[doc = include_str!("docs/stream.md")]
///
/// `#[stream::http]`: a handler for each event of an HTTP Server-Sent-Events stream (Python farine's
/// `stream.http`), and the [`Event`](stream::Event) handle such a handler can ask for.
pub mod stream {
    pub use crate::sse::{Event, EventId, EventType, OnError, SseError, StartFrom};
    pub use farine_macros::stream_http as http;
}

#[doc = include_str!("docs/layer.md")]
///
/// Middleware: layers around every handler call and every send ([`Layer`](layer::Layer)),
/// added with [`Runtime::layer`] or `farine::main!(layers = [...])`.
pub mod layer {
    pub use crate::handler::{CallInfo, HandlerKind, Layer, Next, Outcome, SendInfo};
    pub use futures_util::future::BoxFuture;
}

pub use amqp::error::{BrokerError, Resource};
pub use amqp::message::{Headers, Message, SettleError};
pub use amqp::publisher::{PublishError, PublishOptions, Publisher};
pub use consume::StreamOffset;
#[cfg(feature = "db")]
pub use db::{Db, DbCallError};
pub use decode::DecodeError;
#[doc = include_str!("docs/consume.md")]
pub use farine_macros::consume;
#[doc = include_str!("docs/execute.md")]
pub use farine_macros::execute;
#[doc = include_str!("docs/publish.md")]
pub use farine_macros::publish;
#[doc = include_str!("docs/service.md")]
pub use farine_macros::service;
pub use handler::{FromCall, Rejection, Shutdown};
pub use registry::BoxError;
pub use runtime::{DEFAULT_AMQP_URI, RunError, Running, Runtime, ServiceFailed, StartError};

/// Gives a service package its `main`: `farine::main!();` in `src/main.rs` declares the
/// package's `service` module (`src/service.rs`), embeds the package's `migrations/` folder
/// (applied at start when a database is configured) and runs the farine command line.
/// `farine::main!(services);` names another module; `farine::main!(layers = [Timing])` (or
/// `farine::main!(services, layers = [...])`) puts layers around every call
/// ([`layer`]).
///
#[doc = include_str!("docs/cli.md")]
#[macro_export]
macro_rules! main {
    () => {
        $crate::main!(service);
    };
    ($module:ident) => {
        $crate::main!($module, layers = []);
    };
    (layers = [$($layer:expr),* $(,)?]) => {
        $crate::main!(service, layers = [$($layer),*]);
    };
    ($module:ident, layers = [$($layer:expr),* $(,)?]) => {
        mod $module;
        fn main() -> ::std::process::ExitCode {
            $crate::__private::main_with(
                ::std::env!("CARGO_PKG_NAME"),
                ::std::env!("CARGO_PKG_VERSION"),
                $crate::__private::embed_migrations!(),
                ::std::vec![$(::std::sync::Arc::new($layer) as ::std::sync::Arc<dyn $crate::layer::Layer>),*],
            )
        }
    };
}

/// What the macros expand to, and what farine's own tests and tools reach into. Not part of
/// the API: anything here may change in any release.
#[doc(hidden)]
pub mod __private {
    pub use crate::asyncapi::{document as asyncapi_document, to_yaml};
    pub use crate::cli::{list, main_with};
    pub use crate::config::redact::redact_uri;
    pub use crate::db::EmbeddedMigration;
    pub use crate::runtime::check::config_file;
    pub use crate::runtime::tokio_builder;

    /// Every config key farine reads (for the config fuzz test).
    pub fn config_keys() -> Vec<&'static str> {
        let mut keys: Vec<_> = crate::config::keys::all().collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// The operator's commands (`farine call`, `publish`, `dead-letters`), for the launcher.
    pub mod operate {
        pub use crate::operate::{Command, Options, REPLAY_FLAG_DEPRECATED, run};
    }

    /// The transport's parts, for tests that build them by hand.
    pub mod amqp {
        pub use crate::amqp::connection::{
            ConnectError, Connector, ConnectorSettings, NodeSelector,
        };
        pub use crate::amqp::publisher::PublisherSettings;
        pub use crate::amqp::topology::{ExchangeSettings, QueueSettings};
        pub use crate::amqp::transport::{Channel, Connection, DeclaredQueue};
        pub use crate::rpc::client::ROUTE_CHECK_INTERVAL;
    }

    pub use crate::consume::ConsumeSpec;
    pub use crate::handler::Layers;
    pub use crate::handler::schema::{Payload, Payloads, Probe, Schemas};
    pub use crate::handler::{IntoOutcome, Outcome, Shutdown};
    /// The traits of [`Probe`], which the generated code brings into scope.
    pub mod schema_probe {
        pub use crate::handler::schema::{
            BodyWithSchema, BodyWithoutSchema, NotBody, SentWithSchema, SentWithoutSchema,
        };
    }
    pub use crate::registry::{
        BoxError, Declared, Handler, PublishSpec, RpcClientSpec, RpcSpec, Service, ServiceEntry,
    };
    pub use crate::rpc::server::{Arguments as RpcArguments, RpcCall};
    pub use crate::runtime::context::{client_and_layers, publisher_and_layers, send_through};
    #[cfg(feature = "sse")]
    pub use crate::sse::Event as SseEvent;
    pub use farine_macros::embed_migrations;
    pub use futures_util::future::BoxFuture;
    pub use inventory;
    pub use serde;
    pub use serde_json;
}
