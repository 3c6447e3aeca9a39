//! AMQP 0-9-1 over lapin, the floor every other layer stands on: the connection, the topology
//! farine declares, what a consuming task needs of a channel, publishers and the message
//! handle. Nothing here knows of handler kinds, the runtime, the database or the registry
//! (`docs/architecture.md`).

pub mod connection;
pub(crate) mod consuming;
pub mod dead_letter;
pub mod error;
pub mod message;
pub mod publisher;
pub mod topology;

pub use error::{BrokerError, Resource};
pub use lapin::ExchangeKind;
pub use lapin::types::{AMQPValue, FieldTable};
