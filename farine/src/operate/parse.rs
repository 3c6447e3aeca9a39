//! The operator commands' arguments, read before anything connects: a wrong one is a usage
//! error (exit status 2) that says what was expected, printed by clap.

use std::time::Duration;

use lapin::types::AMQPValue;
use serde_json::{Map, Value};

use crate::config::FromValue;

/// `SERVICE.METHOD` (or `SERVICE.HANDLER`): split at the last dot, since a method's or
/// handler's name has none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub service: String,
    pub name: String,
}

impl std::fmt::Display for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.service, self.name)
    }
}

/// Reads `SERVICE.NAME`; `what` names the second part in the error (`method`, `handler`).
pub fn member(text: &str, what: &str) -> Result<Member, String> {
    match text.rsplit_once('.') {
        Some((service, name)) if !service.is_empty() && !name.is_empty() => Ok(Member {
            service: service.to_string(),
            name: name.to_string(),
        }),
        _ => Err(format!(
            "expected SERVICE.{}, such as `server.repeat`",
            what.to_uppercase()
        )),
    }
}

/// The positional arguments of a call (a type of its own: clap would read a `Vec` as a list
/// of arguments).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Positional(pub Vec<Value>);

/// The positional arguments of a call: a JSON array.
pub fn json_array(text: &str) -> Result<Positional, String> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Array(items)) => Ok(Positional(items)),
        Ok(other) => Err(format!(
            "expected a JSON array of the positional arguments, such as '[\"ab\", 2]', not {}",
            kind(&other)
        )),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}

/// The arguments of a call by name: a JSON object.
pub fn json_object(text: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(fields)) => Ok(fields),
        Ok(other) => Err(format!(
            "expected a JSON object of the arguments by name, such as '{{\"times\": 2}}', not {}",
            kind(&other)
        )),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}

/// A message body: any JSON value, kept as written (its bytes are what is sent).
pub fn json_text(text: &str) -> Result<String, String> {
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map(|_| text.to_string())
        .map_err(|e| format!("the body is not JSON: {e}"))
}

/// What kind of JSON value `value` is, for an error.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A `--header NAME=VALUE`.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub name: String,
    pub value: AMQPValue,
}

/// Reads `NAME=VALUE` (split at the first `=`). The value is typed as in the config's argument
/// tables (`queue_arguments`): a whole number is a signed 64-bit integer, `true`/`false` a
/// boolean, a value in double quotes (`id="42"`) or anything else a string.
pub fn header(text: &str) -> Result<Header, String> {
    let Some((name, value)) = text.split_once('=') else {
        return Err("expected NAME=VALUE, such as `x-tenant=acme`".to_string());
    };
    let name = name.trim();
    if name.is_empty() {
        return Err("expected a header name before `=`".to_string());
    }
    if name.len() > crate::amqp::topology::MAX_NAME_BYTES {
        return Err(format!(
            "a header name is at most {} bytes (AMQP's limit); this one is {}",
            crate::amqp::topology::MAX_NAME_BYTES,
            name.len()
        ));
    }
    Ok(Header {
        name: name.to_string(),
        value: crate::amqp::topology::argument_value(value),
    })
}

/// A call's timeout: seconds (`30`, `0.5`) or with a unit (`250ms`, `2m`), more than zero.
pub fn timeout(text: &str) -> Result<Duration, String> {
    match Duration::from_value(text.trim()) {
        Some(duration) if !duration.is_zero() => Ok(duration),
        _ => Err(format!(
            "expected {}, more than zero",
            <Duration as FromValue>::expected()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_member_is_split_at_its_last_dot_and_needs_both_parts() {
        assert_eq!(
            member("server.repeat", "method"),
            Ok(Member {
                service: "server".into(),
                name: "repeat".into()
            })
        );
        assert_eq!(
            member("billing.eu.charge", "method").map(|m| m.service),
            Ok("billing.eu".into())
        );
        for wrong in ["server", ".repeat", "server.", ""] {
            let refused = member(wrong, "handler").unwrap_err();
            assert!(refused.contains("SERVICE.HANDLER"), "{wrong}: {refused}");
        }
    }

    #[test]
    fn call_arguments_are_a_json_array_and_an_object() {
        assert_eq!(
            json_array(r#"["ab", 2]"#),
            Ok(Positional(vec![json!("ab"), json!(2)]))
        );
        assert_eq!(json_array("[]"), Ok(Positional::default()));
        let not_json = json_array(r#"["ab", 2"#).unwrap_err();
        assert!(not_json.starts_with("not JSON"), "{not_json}");
        let not_array = json_array(r#"{"text": "ab"}"#).unwrap_err();
        assert!(
            not_array.contains("JSON array") && not_array.contains("not an object"),
            "{not_array}"
        );
        assert_eq!(
            json_object(r#"{"times": 2}"#).map(Value::Object),
            Ok(json!({"times": 2}))
        );
        let not_object = json_object("[2]").unwrap_err();
        assert!(
            not_object.contains("JSON object") && not_object.contains("not an array"),
            "{not_object}"
        );
        assert!(
            json_object("{times: 2}")
                .unwrap_err()
                .starts_with("not JSON")
        );
    }

    #[test]
    fn a_body_is_any_json_kept_as_written() {
        assert_eq!(json_text(r#"{"id": 1.50}"#), Ok(r#"{"id": 1.50}"#.into()));
        assert_eq!(json_text("42"), Ok("42".into()));
        let refused = json_text("{id: 1}").unwrap_err();
        assert!(refused.starts_with("the body is not JSON"), "{refused}");
        assert!(json_text("").is_err());
    }

    #[test]
    fn a_header_value_is_an_integer_a_boolean_or_a_string() {
        let typed = |text: &str| header(text).map(|h| (h.name, h.value));
        assert_eq!(
            typed("x-tenant=acme"),
            Ok(("x-tenant".into(), AMQPValue::LongString("acme".into())))
        );
        assert_eq!(
            typed("count=42"),
            Ok(("count".into(), AMQPValue::LongLongInt(42)))
        );
        assert_eq!(
            typed("offset=-7"),
            Ok(("offset".into(), AMQPValue::LongLongInt(-7)))
        );
        assert_eq!(
            typed("urgent=true"),
            Ok(("urgent".into(), AMQPValue::Boolean(true)))
        );
        assert_eq!(
            typed(r#"id="42""#),
            Ok(("id".into(), AMQPValue::LongString("42".into())))
        );
        assert_eq!(
            typed("ratio=1.5"),
            Ok(("ratio".into(), AMQPValue::LongString("1.5".into())))
        );
        // Split at the first `=`: a value may hold more.
        assert_eq!(
            typed("filter=a=b"),
            Ok(("filter".into(), AMQPValue::LongString("a=b".into())))
        );
        assert_eq!(
            typed("empty="),
            Ok(("empty".into(), AMQPValue::LongString("".into())))
        );
        assert!(header("no-equals").unwrap_err().contains("NAME=VALUE"));
        assert!(header("=value").unwrap_err().contains("header name"));
        assert!(header(&format!("{}=1", "h".repeat(256))).is_err());
    }

    #[test]
    fn a_timeout_is_a_positive_duration() {
        assert_eq!(timeout("30"), Ok(Duration::from_secs(30)));
        assert_eq!(timeout("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(timeout("250ms"), Ok(Duration::from_millis(250)));
        assert!(timeout("0").is_err());
        assert!(timeout("soon").unwrap_err().contains("more than zero"));
    }
}
