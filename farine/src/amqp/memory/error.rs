//! The broker's refusals, built as lapin builds them from the wire: a protocol error with
//! RabbitMQ's reply code and reply text (`NOT_FOUND - no queue 'x' in vhost '/'`), so code that
//! reads `lapin::Error`s cannot tell this broker from RabbitMQ.

use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::types::ShortString;
use lapin::{ChannelState, ConnectionState, ErrorKind};

/// The one virtual host of the in-memory broker, as it appears in reply texts.
pub(super) const VHOST: &str = "/";

/// `'name' in vhost '/'` with its kind: RabbitMQ's way of naming a resource in a reply text.
pub(super) fn resource(kind: &str, name: &str) -> String {
    format!("{kind} '{name}' in vhost '{VHOST}'")
}

/// A channel-level (soft) error: the channel closes, the connection stays.
pub(super) fn soft(kind: AMQPSoftError, text: impl AsRef<str>) -> lapin::Error {
    let prefix = match kind {
        AMQPSoftError::CONTENTTOOLARGE => "CONTENT_TOO_LARGE",
        AMQPSoftError::NOROUTE => "NO_ROUTE",
        AMQPSoftError::NOCONSUMERS => "NO_CONSUMERS",
        AMQPSoftError::ACCESSREFUSED => "ACCESS_REFUSED",
        AMQPSoftError::NOTFOUND => "NOT_FOUND",
        AMQPSoftError::RESOURCELOCKED => "RESOURCE_LOCKED",
        AMQPSoftError::PRECONDITIONFAILED => "PRECONDITION_FAILED",
    };
    protocol(AMQPErrorKind::Soft(kind), prefix, text.as_ref())
}

/// A connection-level (hard) error: the whole connection closes.
pub(super) fn hard(kind: AMQPHardError, text: impl AsRef<str>) -> lapin::Error {
    let prefix = match kind {
        AMQPHardError::COMMANDINVALID => "COMMAND_INVALID",
        AMQPHardError::NOTALLOWED => "NOT_ALLOWED",
        AMQPHardError::NOTIMPLEMENTED => "NOT_IMPLEMENTED",
        AMQPHardError::CONNECTIONFORCED => "CONNECTION_FORCED",
        _ => "INTERNAL_ERROR",
    };
    protocol(AMQPErrorKind::Hard(kind), prefix, text.as_ref())
}

fn protocol(kind: AMQPErrorKind, prefix: &str, text: &str) -> lapin::Error {
    let message = short(&format!("{prefix} - {text}"));
    lapin::Error::from(ErrorKind::ProtocolError(AMQPError::new(kind, message)))
}

pub(super) fn not_found(kind: &str, name: &str) -> lapin::Error {
    soft(
        AMQPSoftError::NOTFOUND,
        format!("no {kind} '{name}' in vhost '{VHOST}'"),
    )
}

pub(super) fn precondition_failed(text: impl AsRef<str>) -> lapin::Error {
    soft(AMQPSoftError::PRECONDITIONFAILED, text)
}

pub(super) fn access_refused(text: impl AsRef<str>) -> lapin::Error {
    soft(AMQPSoftError::ACCESSREFUSED, text)
}

pub(super) fn resource_locked(queue: &str) -> lapin::Error {
    soft(
        AMQPSoftError::RESOURCELOCKED,
        format!(
            "cannot obtain exclusive access to locked {}. It could be originally declared on \
             another connection or the exclusive property value does not match that of the \
             original declaration.",
            resource("queue", queue)
        ),
    )
}

/// `inequivalent arg 'key' for <resource>: received X but current is Y`.
pub(super) fn inequivalent(
    key: &str,
    kind: &str,
    name: &str,
    received: &str,
    current: &str,
) -> lapin::Error {
    precondition_failed(format!(
        "inequivalent arg '{key}' for {}: received {received} but current is {current}",
        resource(kind, name)
    ))
}

/// What lapin answers for an operation on a channel that is no longer open.
pub(super) fn channel_state(state: ChannelState, context: &'static str) -> lapin::Error {
    ErrorKind::InvalidChannelState(state, context).into()
}

/// What lapin answers for an operation on a connection that is no longer open.
pub(super) fn connection_state(state: ConnectionState) -> lapin::Error {
    ErrorKind::InvalidConnectionState(state).into()
}

/// What a consumer of a connection that broke sees: an IO error, as lapin reports a lost socket.
pub(super) fn connection_killed() -> lapin::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "connection killed by the in-memory broker",
    )
    .into()
}

/// `text` as a [`ShortString`], cut to the 255 bytes AMQP allows (lapin's `From` panics beyond).
pub(super) fn short(text: &str) -> ShortString {
    let mut end = text.len().min(255);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    ShortString::from(&text[..end])
}
