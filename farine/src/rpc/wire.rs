//! The RPC wire format, compatible with baguette-messaging: `docs/rpc-protocol.md` is its
//! specification. This module only builds and reads the JSON bodies.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// The `type` property of a request whose caller reads one result only: a farine server then
/// sends no end marker after it (baguette-messaging peers neither send nor need it). A property
/// rather than a header: a header table costs the broker and both peers a table to encode and
/// decode on every call.
pub const SINGLE_REPLY_TYPE: &str = "farine.single";

/// The routing key of a call of `method` on `service`: `<service>__<method>`.
pub fn routing_key(service: &str, method: &str) -> String {
    // Built by hand: this runs on every call, and formatting machinery costs more.
    let mut key = String::with_capacity(service.len() + 2 + method.len());
    key.push_str(service);
    key.push_str("__");
    key.push_str(method);
    key
}

/// The routing key that cancels a streaming call on every instance of `service`.
pub fn cancel_routing_key(service: &str) -> String {
    format!("{service}.__cancel__")
}

/// A request body: `{"args": [...], "kwargs": {...}}`.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct Request {
    #[serde(default)]
    pub args: Vec<Value>,
    #[serde(default)]
    pub kwargs: Map<String, Value>,
}

/// What kind of failure an error reply reports (the `kind` of the `error` extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// The method returned an error.
    Remote,
    /// The method panicked.
    Panic,
    /// An argument is missing, extra, or of the wrong type.
    BadArguments,
    /// The service has no such method (a stale binding, or an older server).
    UnknownMethod,
    /// The request body is not `{"args": [...], "kwargs": {...}}`.
    BadRequest,
}

/// The structured error farine adds beside `__except__` (older peers ignore it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    pub kind: ErrorKind,
    pub message: String,
    pub service: String,
    pub method: String,
    /// The parameter at fault, for `bad_arguments`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
}

/// A request body as a server reads it: each argument kept as its JSON text, decoded straight
/// into the parameter's type (no intermediate `Value` tree).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawRequest {
    #[serde(default)]
    pub args: Vec<Box<RawValue>>,
    #[serde(default)]
    pub kwargs: std::collections::BTreeMap<String, Box<RawValue>>,
}

/// One reply message, as read by a client.
#[derive(Debug, Clone)]
pub enum Reply {
    /// `{"body": <value>, "__end__": false}`: a result, or one item of a stream, as its JSON
    /// text (decoded into the caller's type once, with `serde_json::from_str`).
    Item(Box<RawValue>),
    /// `{"__end__": true}`: the call is over.
    End,
    /// `{"__except__": "<message>", "error": {...}}`: the call failed; nothing follows.
    Error {
        message: String,
        detail: Option<ErrorBody>,
    },
}

impl PartialEq for Reply {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Reply::Item(a), Reply::Item(b)) => a.get() == b.get(),
            (Reply::End, Reply::End) => true,
            (
                Reply::Error { message, detail },
                Reply::Error {
                    message: m,
                    detail: d,
                },
            ) => message == m && detail == d,
            _ => false,
        }
    }
}

/// A field whose presence matters even when it is `null` (`"body": null` is a result).
#[derive(Debug, Default)]
enum Field {
    #[default]
    Absent,
    Present(Box<RawValue>),
}

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Box::<RawValue>::deserialize(deserializer).map(Field::Present)
    }
}

/// The fields of any reply shape.
#[derive(Deserialize)]
struct WireReply {
    #[serde(default)]
    body: Field,
    #[serde(default, rename = "__end__")]
    end: Option<bool>,
    #[serde(default, rename = "__except__")]
    except: Option<Value>,
    #[serde(default)]
    error: Option<Box<RawValue>>,
}

impl Reply {
    /// Reads a reply body; `None` when it is none of the three shapes.
    pub fn parse(body: &[u8]) -> Option<Reply> {
        // Only an object is a reply (serde would also read a struct from an array).
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return None;
        }
        let reply: WireReply = serde_json::from_slice(body).ok()?;
        if let Some(except) = reply.except
            && !except.is_null()
        {
            let message = match except {
                Value::String(text) => text,
                other => other.to_string(),
            };
            let detail = reply.error.and_then(|e| serde_json::from_str(e.get()).ok());
            return Some(Reply::Error { message, detail });
        }
        match reply.body {
            Field::Present(body) => Some(Reply::Item(body)),
            Field::Absent if reply.end == Some(true) => Some(Reply::End),
            Field::Absent => None,
        }
    }

    /// The JSON body of one result or stream item, serialised straight from `value`.
    pub fn item_bytes<T: serde::Serialize + ?Sized>(value: &T) -> serde_json::Result<Vec<u8>> {
        #[derive(serde::Serialize)]
        struct Item<'a, T: ?Sized> {
            body: &'a T,
            __end__: bool,
        }
        serde_json::to_vec(&Item {
            body: value,
            __end__: false,
        })
    }

    /// The JSON body of the end marker.
    pub fn end_body() -> Vec<u8> {
        br#"{"__end__":true}"#.to_vec()
    }

    /// The JSON body of an error reply.
    pub fn error_body(error: &ErrorBody) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "__except__": error.message, "error": error }))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn raw(value: Value) -> Box<RawValue> {
        RawValue::from_string(value.to_string()).unwrap()
    }

    #[test]
    fn the_three_reply_shapes_are_read() {
        assert_eq!(
            Reply::parse(br#"{"body":3, "__end__": false}"#),
            Some(Reply::Item(raw(json!(3))))
        );
        assert_eq!(Reply::parse(br#"{"__end__": true}"#), Some(Reply::End));
        assert_eq!(
            Reply::parse(br#"{"__except__": "Traceback: boom"}"#),
            Some(Reply::Error {
                message: "Traceback: boom".into(),
                detail: None
            })
        );
        assert_eq!(Reply::parse(b"[1]"), None);
    }

    #[test]
    fn a_null_body_is_an_item_and_a_null_except_is_not_an_error() {
        assert_eq!(
            Reply::parse(br#"{"body":null, "__end__": false, "__except__": null}"#),
            Some(Reply::Item(raw(Value::Null)))
        );
    }

    #[test]
    fn error_replies_carry_the_message_twice_for_old_and_new_peers() {
        let error = ErrorBody {
            kind: ErrorKind::BadArguments,
            message: "missing argument `times`".into(),
            service: "server".into(),
            method: "repeat".into(),
            param: Some("times".into()),
        };
        let parsed = Reply::parse(&Reply::error_body(&error)).unwrap();
        assert_eq!(
            parsed,
            Reply::Error {
                message: "missing argument `times`".into(),
                detail: Some(error)
            }
        );
    }

    #[test]
    fn requests_default_missing_args_and_kwargs() {
        let request: Request = serde_json::from_str(r#"{"args": [1]}"#).unwrap();
        assert_eq!(request.args, vec![json!(1)]);
        assert!(request.kwargs.is_empty());
    }
}
