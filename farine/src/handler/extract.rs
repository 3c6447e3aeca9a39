//! Extractors: how a handler's parameters are taken from its call, whatever their names.
//!
//! The code `#[farine::service]` generates asks, for each parameter of type `T` (or `&T`),
//! `<T as FromCall<C>>::from_call(&call)`, where `C` is what the handler kind handles: the
//! `farine::Message` of a `#[consume]` handler, the `farine::stream::Event` of a
//! `#[stream::http]` handler, the `farine::execute::Run` of an `#[execute]` method. A
//! wrong parameter is a trait-bound error at that parameter. Each injected value is one impl:
//! the body (any `serde::Deserialize` type, decoded from JSON), the message handle and its
//! headers, an event's id and type, the database of the call, the shutdown signal, and any type
//! of the user's own (a tenant read from a header, say).

use std::fmt;

use crate::decode::DecodeError;

use super::Outcome;

/// A value a handler parameter takes from its call of kind `C`.
///
/// Implement it for a type of your own to take it as a parameter:
///
/// ```
/// use farine::{FromCall, Message, Rejection};
///
/// /// The tenant a message is for, from its `x-tenant` header.
/// pub struct Tenant(pub String);
///
/// impl FromCall<Message> for Tenant {
///     fn from_call(message: &Message) -> Result<Self, Rejection> {
///         match message.header("x-tenant") {
///             Some(farine::amqp::AMQPValue::LongString(tenant)) => Ok(Tenant(tenant.to_string())),
///             _ => Err(Rejection::new("the message has no x-tenant header")),
///         }
///     }
/// }
/// ```
///
/// A message whose extractor refuses it goes to the dead-letter queue at once with the reason
/// (running it again would not help); a refused SSE event is skipped and logged; a refused
/// `#[execute]` run is a failed run.
///
/// For a `#[consume]` or `#[stream::http]` handler, every type that implements
/// `serde::Deserialize` is already its body (a blanket impl), so an extractor of your own is a
/// type that does not implement `Deserialize` (wrap one that does in a type of your own).
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a parameter farine can give a handler of `{C}`",
    label = "not something a handler of `{C}` can take: not its body, and no `farine::FromCall<{C}>` extractor",
    note = "#[consume] handlers take the body, farine::Message and farine::Headers; #[stream::http] handlers the data, farine::stream::{{Event, EventId, EventType}}; every kind farine::Db, farine::Shutdown and types of your own that implement farine::FromCall"
)]
pub trait FromCall<C>: Sized {
    /// Takes the value from `call`, or refuses the call.
    fn from_call(call: &C) -> Result<Self, Rejection>;
}

/// Why an extractor refused a call.
#[derive(Debug, Clone)]
pub struct Rejection(Refused);

#[derive(Debug, Clone)]
enum Refused {
    Undecodable(DecodeError),
    Reason(String),
}

impl Rejection {
    /// A refusal with its reason (logged, and carried by a dead letter).
    pub fn new(reason: impl fmt::Display) -> Self {
        Self(Refused::Reason(reason.to_string()))
    }

    /// The outcome of the call it refused.
    #[doc(hidden)]
    pub fn into_outcome(self) -> Outcome {
        match self.0 {
            Refused::Undecodable(error) => Outcome::Undecodable(error),
            Refused::Reason(reason) => Outcome::Rejected(reason),
        }
    }
}

impl From<DecodeError> for Rejection {
    fn from(error: DecodeError) -> Self {
        Self(Refused::Undecodable(error))
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Refused::Undecodable(error) => error.fmt(f),
            Refused::Reason(reason) => f.write_str(reason),
        }
    }
}

impl std::error::Error for Rejection {}

/// The shutdown signal, in a call of any kind.
impl<C> FromCall<C> for super::Shutdown {
    fn from_call(_: &C) -> Result<Self, Rejection> {
        Ok(super::Shutdown::current())
    }
}
