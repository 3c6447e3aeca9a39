//! The one error of the floor that every layer shares: a payload (a message body, an event's
//! data) that does not decode into the type a handler asked for.

/// Why a body could not be decoded into the handler's type.
#[derive(Debug, Clone, thiserror::Error)]
#[error("body does not decode as {type_name}: {cause}")]
#[non_exhaustive]
pub struct DecodeError {
    pub type_name: &'static str,
    pub cause: String,
}
