//! The broker's errors as types: one variant per AMQP condition a user meets, each naming the
//! exchange, queue or broker involved.
//!
//! lapin reports a broker's refusal as a protocol error with a reply code and a text; farine
//! turns it into a [`BrokerError`] that says what was being done to what (`exchange `orders``)
//! and what to do next. Publishing ([`super::publisher::PublishError::Broker`]), declaring topology and
//! consuming all report through it, so a user matches `BrokerError::PreconditionFailed { .. }`
//! wherever it came from.

use std::fmt;

/// What a broker error is about.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Resource {
    Exchange(String),
    Queue(String),
    /// A binding of `queue` to `exchange` with `routing_key`.
    Binding {
        queue: String,
        exchange: String,
        routing_key: String,
    },
    /// The broker itself (`host:port`), for connection-level errors.
    Broker(String),
    /// A channel of the connection (opening it, setting its options).
    Channel,
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resource::Exchange(name) if name.is_empty() => f.write_str("the default exchange"),
            Resource::Exchange(name) => write!(f, "exchange `{name}`"),
            Resource::Queue(name) => write!(f, "queue `{name}`"),
            Resource::Binding {
                queue,
                exchange,
                routing_key,
            } => write!(
                f,
                "the binding of queue `{queue}` to exchange `{exchange}` (routing key `{routing_key}`)"
            ),
            Resource::Broker(addr) => write!(f, "broker {addr}"),
            Resource::Channel => f.write_str("a channel"),
        }
    }
}

/// A refusal from the broker, or the loss of the connection to it. Never contains a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// 312: a `mandatory` message matched no queue and was returned.
    #[error(
        "no queue is bound to exchange `{exchange}` for routing key `{routing_key}` (312 NO_ROUTE): the message was returned; bind a queue for that key or publish without `mandatory`"
    )]
    NoRoute {
        exchange: String,
        routing_key: String,
    },
    /// 313: nobody consumes from where the message had to go. RabbitMQ does not implement the
    /// `immediate` flag that yields this code; farine reports it when a queue it needs a
    /// consumer on has none (an RPC service that no instance serves).
    #[error("{resource} has no consumer (313 NO_CONSUMERS): start one")]
    NoConsumers { resource: Resource },
    /// 403: the user may not do this (a reserved `amq.` name, a missing permission, a refused
    /// login).
    #[error(
        "{resource}: access refused (403 ACCESS_REFUSED): {text}; check the user's permissions and the name"
    )]
    AccessRefused { resource: Resource, text: String },
    /// 404: the exchange or queue does not exist.
    #[error("{resource} does not exist (404 NOT_FOUND): {text}")]
    NotFound { resource: Resource, text: String },
    /// 405: an exclusive queue of another connection.
    #[error(
        "{resource} is exclusive to another connection (405 RESOURCE_LOCKED): {text}; use another name or stop the other consumer"
    )]
    ResourceLocked { resource: Resource, text: String },
    /// 406: declared before with other options (type, durability, arguments).
    #[error(
        "{resource} already exists with other options (406 PRECONDITION_FAILED): {text}; declare it as it is, or delete it so farine can declare it anew"
    )]
    PreconditionFailed { resource: Resource, text: String },
    /// The connection is gone (closed, cut, heartbeats missed) or cannot be opened.
    #[error("the connection to broker {broker} is broken: {cause}")]
    ConnectionBroken { broker: String, cause: String },
    /// Any other reply code.
    #[error("{resource}: the broker answered {code}: {text}")]
    Other {
        resource: Resource,
        code: u16,
        text: String,
    },
}

impl BrokerError {
    /// The AMQP reply code, where the broker gave one.
    pub fn code(&self) -> Option<u16> {
        match self {
            BrokerError::NoRoute { .. } => Some(312),
            BrokerError::NoConsumers { .. } => Some(313),
            BrokerError::AccessRefused { .. } => Some(403),
            BrokerError::NotFound { .. } => Some(404),
            BrokerError::ResourceLocked { .. } => Some(405),
            BrokerError::PreconditionFailed { .. } => Some(406),
            BrokerError::ConnectionBroken { .. } => None,
            BrokerError::Other { code, .. } => Some(*code),
        }
    }

    /// True when the connection, not the request, failed: retrying after a reconnect may
    /// succeed.
    pub fn is_connection(&self) -> bool {
        matches!(self, BrokerError::ConnectionBroken { .. })
    }

    /// The typed error for a lapin error met while working on `resource` over a connection to
    /// `broker` (`host:port`).
    pub(crate) fn from_lapin(error: &lapin::Error, resource: Resource, broker: &str) -> Self {
        let lapin::ErrorKind::ProtocolError(amqp) = error.kind() else {
            let cause = crate::config::redact::redact_uri(&error.to_string());
            return match error.kind() {
                // The socket, the heartbeats, or a channel closed under the request.
                lapin::ErrorKind::IOError(_)
                | lapin::ErrorKind::MissingHeartbeatError
                | lapin::ErrorKind::InvalidConnectionState(_)
                | lapin::ErrorKind::InvalidChannelState(..)
                | lapin::ErrorKind::RuntimeShutdownError(_) => BrokerError::ConnectionBroken {
                    broker: broker.to_string(),
                    cause,
                },
                // The client's own limits and faults: retrying would not help.
                _ => BrokerError::Other {
                    resource,
                    code: 0,
                    text: cause,
                },
            };
        };
        let text = amqp.get_message().to_string();
        let code = amqp.get_id();
        match code {
            312 => BrokerError::NoRoute {
                exchange: match resource {
                    Resource::Exchange(name) => name,
                    other => other.to_string(),
                },
                routing_key: String::new(),
            },
            313 => BrokerError::NoConsumers { resource },
            403 => BrokerError::AccessRefused { resource, text },
            404 => BrokerError::NotFound { resource, text },
            405 => BrokerError::ResourceLocked { resource, text },
            406 => BrokerError::PreconditionFailed { resource, text },
            // Connection-level codes (320 CONNECTION_FORCED, 501 FRAME_ERROR, ...): the
            // connection is gone. (503, 530, 540 answer the request itself.)
            503 | 530 | 540 => BrokerError::Other {
                resource,
                code,
                text,
            },
            _ if error.is_amqp_hard_error() => BrokerError::ConnectionBroken {
                broker: broker.to_string(),
                cause: format!("{code} {text}"),
            },
            _ => BrokerError::Other {
                resource,
                code,
                text,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_names_what_it_is_about_and_its_code() {
        let err = BrokerError::PreconditionFailed {
            resource: Resource::Exchange("orders".into()),
            text: "inequivalent arg 'type'".into(),
        };
        assert_eq!(err.code(), Some(406));
        let text = err.to_string();
        assert!(
            text.contains("exchange `orders`") && text.contains("406"),
            "{text}"
        );
        let err = BrokerError::ResourceLocked {
            resource: Resource::Queue("q".into()),
            text: String::new(),
        };
        assert!(err.to_string().contains("queue `q`"));
        assert!(!err.is_connection());
        let broken = BrokerError::ConnectionBroken {
            broker: "127.0.0.1:5672".into(),
            cause: "reset".into(),
        };
        assert!(broken.is_connection() && broken.code().is_none());
        assert!(broken.to_string().contains("127.0.0.1:5672"));
    }
}
