//! JSON values as YAML, in block style: enough for a document of maps, lists, strings, numbers
//! and booleans. Strings are written as JSON strings (double-quoted with JSON's escapes, which
//! YAML's double-quoted style reads the same), keys plain when they cannot be read as anything
//! but a string; so what is written is read back as the same JSON value.

use std::fmt::Write;

use serde_json::Value;

/// `value` as a YAML document.
pub fn to_yaml(value: &Value) -> String {
    let mut out = String::new();
    match value {
        Value::Object(map) if !map.is_empty() => block(&mut out, value, 0),
        Value::Array(items) if !items.is_empty() => block(&mut out, value, 0),
        scalar => {
            out.push_str(&inline(scalar));
            out.push('\n');
        }
    }
    out
}

/// A non-empty map or list at `indent`, each entry on its own line(s).
fn block(out: &mut String, value: &Value, indent: usize) {
    let pad = " ".repeat(indent);
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                let _ = write!(out, "{pad}{}:", key_text(key));
                nested(out, value, indent + 2);
            }
        }
        Value::Array(items) => {
            for item in items {
                let _ = write!(out, "{pad}-");
                match item {
                    // A map in a list starts on the dash's line.
                    Value::Object(map) if !map.is_empty() => {
                        let mut inner = String::new();
                        block(&mut inner, item, indent + 2);
                        out.push(' ');
                        out.push_str(inner.trim_start());
                    }
                    _ => nested(out, item, indent + 2),
                }
            }
        }
        _ => {}
    }
}

/// What follows `key:` or `-`: a scalar or empty collection on the same line, else a block.
fn nested(out: &mut String, value: &Value, indent: usize) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            out.push('\n');
            block(out, value, indent);
        }
        Value::Array(items) if !items.is_empty() => {
            out.push('\n');
            block(out, value, indent);
        }
        scalar => {
            out.push(' ');
            out.push_str(&inline(scalar));
            out.push('\n');
        }
    }
}

/// A scalar, or an empty map or list, on one line.
fn inline(value: &Value) -> String {
    match value {
        Value::Object(_) => "{}".to_string(),
        Value::Array(_) => "[]".to_string(),
        // A JSON string, number, boolean or null reads the same in YAML.
        other => other.to_string(),
    }
}

/// A key as written: plain when it is a word YAML reads as a string, quoted otherwise.
fn key_text(key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '$'))
        && key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_' || c == '$')
        && !matches!(
            key.to_ascii_lowercase().as_str(),
            "true" | "false" | "null" | "yes" | "no" | "on" | "off" | "y" | "n" | "~"
        );
    if plain {
        key.to_string()
    } else {
        Value::from(key).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn maps_lists_and_scalars_are_written_in_block_style() {
        let value = json!({
            "asyncapi": "3.0.0",
            "info": { "title": "t", "version": "1" },
            "list": [1, "two", { "a": true, "b": null }, [], {}],
            "weird key/": "line\nbreak \"quoted\"",
            "yes": {},
        });
        assert_eq!(
            to_yaml(&value),
            "asyncapi: \"3.0.0\"\n\
             info:\n  title: \"t\"\n  version: \"1\"\n\
             list:\n  - 1\n  - \"two\"\n  - a: true\n    b: null\n  - []\n  - {}\n\
             \"weird key/\": \"line\\nbreak \\\"quoted\\\"\"\n\
             \"yes\": {}\n"
        );
    }
}
