//! AMQP 0-9-1 over lapin, the floor every other layer stands on: the connection, the topology
//! farine declares, what a consuming task needs of a channel, publishers and the message
//! handle. Nothing here knows of handler kinds, the runtime, the database or the registry
//! (`docs/architecture.md`).

pub(crate) mod connection;
pub(crate) mod consuming;
pub(crate) mod dead_letter;
pub(crate) mod error;
pub(crate) mod memory;
pub(crate) mod message;
pub(crate) mod publisher;
pub(crate) mod topology;
pub(crate) mod transport;

pub use error::{BrokerError, Resource};
pub use lapin::ExchangeKind;
pub use lapin::types::{AMQPValue, FieldTable};
pub use message::{ATTEMPT_HEADER, ERROR_HEADER, EXCHANGE_HEADER, QUEUE_HEADER, REASON_HEADER};
