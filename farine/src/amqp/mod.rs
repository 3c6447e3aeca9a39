//! AMQP 0-9-1 over lapin: the connection, the topology farine declares, consumers, publishers
//! and the message handle.

pub mod connection;
pub mod consumer;
pub mod dead_letter;
pub mod error;
pub mod message;
pub mod publisher;
pub mod topology;

pub use error::{BrokerError, Resource};
pub use lapin::ExchangeKind;
pub use lapin::types::{AMQPValue, FieldTable};
