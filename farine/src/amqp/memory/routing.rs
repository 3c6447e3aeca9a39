//! How an exchange picks queues: the matching rules of RabbitMQ's direct, topic, fanout and
//! headers exchanges, as pure functions of a binding and a message.

use lapin::ExchangeKind;
use lapin::types::{AMQPValue, FieldTable};

/// True when a binding with `binding_key` and `binding_args` on an exchange of `kind` takes a
/// message with `routing_key` and `headers`.
pub(super) fn binding_matches(
    kind: &ExchangeKind,
    binding_key: &str,
    binding_args: &FieldTable,
    routing_key: &str,
    headers: Option<&FieldTable>,
) -> bool {
    match kind {
        ExchangeKind::Direct | ExchangeKind::Custom(_) => binding_key == routing_key,
        ExchangeKind::Fanout => true,
        ExchangeKind::Topic => topic_matches(binding_key, routing_key),
        ExchangeKind::Headers => headers_match(binding_args, headers),
    }
}

/// A topic binding key against a routing key: words split on `.`, `*` is exactly one word,
/// `#` zero or more. As in RabbitMQ, the empty key has no words (`#` matches it, `*` does not).
pub(super) fn topic_matches(pattern: &str, routing_key: &str) -> bool {
    let pattern = words(pattern);
    let key = words(routing_key);
    // matches[j]: pattern[i..] matches key[j..], computed from the last pattern word back.
    let mut matches = vec![false; key.len() + 1];
    matches[key.len()] = true;
    for word in pattern.iter().rev() {
        let mut next = vec![false; key.len() + 1];
        for j in (0..=key.len()).rev() {
            next[j] = match *word {
                // Zero words (skip the `#`), or one word and still in the `#`.
                "#" => matches[j] || (j < key.len() && next[j + 1]),
                "*" => j < key.len() && matches[j + 1],
                literal => j < key.len() && key[j] == literal && matches[j + 1],
            };
        }
        matches = next;
    }
    matches[0]
}

fn words(key: &str) -> Vec<&str> {
    if key.is_empty() {
        Vec::new()
    } else {
        key.split('.').collect()
    }
}

/// How a headers binding combines its keys (`x-match`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum HeadersMatch {
    All,
    Any,
    AllWithX,
    AnyWithX,
}

/// The `x-match` of headers binding arguments; `Err` carries the unknown value.
pub(super) fn headers_match_kind(args: &FieldTable) -> Result<HeadersMatch, String> {
    match args.inner().get("x-match") {
        None => Ok(HeadersMatch::All),
        Some(value) => match string(value).as_deref() {
            Some("all") => Ok(HeadersMatch::All),
            Some("any") => Ok(HeadersMatch::Any),
            Some("all-with-x") => Ok(HeadersMatch::AllWithX),
            Some("any-with-x") => Ok(HeadersMatch::AnyWithX),
            Some(other) => Err(other.to_string()),
            None => Err(format!("{value:?}")),
        },
    }
}

/// A headers binding against a message's headers. Binding keys starting `x-` take no part
/// unless `x-match` is `all-with-x`/`any-with-x`; a `Void` binding value asks only that the
/// header be present; values compare as [`values_equal`].
pub(super) fn headers_match(args: &FieldTable, headers: Option<&FieldTable>) -> bool {
    let kind = headers_match_kind(args).unwrap_or(HeadersMatch::All);
    let with_x = matches!(kind, HeadersMatch::AllWithX | HeadersMatch::AnyWithX);
    let all = matches!(kind, HeadersMatch::All | HeadersMatch::AllWithX);
    let mut considered = args
        .inner()
        .iter()
        .filter(|(key, _)| key.as_str() != "x-match" && (with_x || !key.as_str().starts_with("x-")))
        .map(|(key, wanted)| {
            let found = headers.and_then(|h| h.inner().get(key.as_str()));
            match (wanted, found) {
                (_, None) => false,
                (AMQPValue::Void, Some(_)) => true,
                (wanted, Some(found)) => values_equal(wanted, found),
            }
        });
    if all {
        considered.all(|matched| matched)
    } else {
        considered.any(|matched| matched)
    }
}

/// Equality of two AMQP values as RabbitMQ compares argument and header values: integers of
/// any width and sign by number, floats by number, short and long strings by their bytes.
pub(super) fn values_equal(left: &AMQPValue, right: &AMQPValue) -> bool {
    if let (Some(l), Some(r)) = (integer(left), integer(right)) {
        return l == r;
    }
    if let (Some(l), Some(r)) = (float(left), float(right)) {
        return l == r;
    }
    if let (Some(l), Some(r)) = (string_bytes(left), string_bytes(right)) {
        return l == r;
    }
    left == right
}

/// An integer value of any AMQP integer type.
pub(super) fn integer(value: &AMQPValue) -> Option<i128> {
    Some(match value {
        AMQPValue::ShortShortInt(v) => i128::from(*v),
        AMQPValue::ShortShortUInt(v) => i128::from(*v),
        AMQPValue::ShortInt(v) => i128::from(*v),
        AMQPValue::ShortUInt(v) => i128::from(*v),
        AMQPValue::LongInt(v) => i128::from(*v),
        AMQPValue::LongUInt(v) => i128::from(*v),
        AMQPValue::LongLongInt(v) => i128::from(*v),
        AMQPValue::Timestamp(v) => i128::from(*v),
        _ => return None,
    })
}

fn float(value: &AMQPValue) -> Option<f64> {
    match value {
        AMQPValue::Float(v) => Some(f64::from(*v)),
        AMQPValue::Double(v) => Some(*v),
        _ => None,
    }
}

fn string_bytes(value: &AMQPValue) -> Option<&[u8]> {
    match value {
        AMQPValue::ShortString(s) => Some(s.as_str().as_bytes()),
        AMQPValue::LongString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// A short or long string value as text.
pub(super) fn string(value: &AMQPValue) -> Option<String> {
    string_bytes(value).map(|bytes| String::from_utf8_lossy(bytes).into_owned())
}

/// RabbitMQ's name for a value's type, as in `the value '1000' of type 'long'`.
pub(super) fn type_name(value: &AMQPValue) -> &'static str {
    match value {
        AMQPValue::Boolean(_) => "bool",
        AMQPValue::ShortShortInt(_) => "byte",
        AMQPValue::ShortShortUInt(_) => "unsignedbyte",
        AMQPValue::ShortInt(_) => "short",
        AMQPValue::ShortUInt(_) => "unsignedshort",
        AMQPValue::LongInt(_) => "signedint",
        AMQPValue::LongUInt(_) => "unsignedint",
        AMQPValue::LongLongInt(_) => "long",
        AMQPValue::Float(_) => "float",
        AMQPValue::Double(_) => "double",
        AMQPValue::DecimalValue(_) => "decimal",
        AMQPValue::ShortString(_) => "shortstr",
        AMQPValue::LongString(_) => "longstr",
        AMQPValue::FieldArray(_) => "array",
        AMQPValue::Timestamp(_) => "timestamp",
        AMQPValue::FieldTable(_) => "table",
        AMQPValue::ByteArray(_) => "binary",
        AMQPValue::Void => "void",
    }
}

/// A value as RabbitMQ prints it in an equivalence error: `the value '1000' of type 'long'`,
/// or `none` when absent.
pub(super) fn describe(value: Option<&AMQPValue>) -> String {
    match value {
        None => "none".to_string(),
        Some(value) => {
            let shown = integer(value)
                .map(|i| i.to_string())
                .or_else(|| string(value))
                .or_else(|| float(value).map(|f| f.to_string()))
                .unwrap_or_else(|| match value {
                    AMQPValue::Boolean(b) => b.to_string(),
                    other => format!("{other:?}"),
                });
            format!("the value '{shown}' of type '{}'", type_name(value))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_hash_matches_zero_or_more_words() {
        assert!(topic_matches("#", ""));
        assert!(topic_matches("#", "a"));
        assert!(topic_matches("#", "a.b.c"));
        assert!(topic_matches("a.#", "a"));
        assert!(topic_matches("a.#", "a.b.c"));
        assert!(!topic_matches("a.#", "b.a"));
        assert!(topic_matches("#.a", "a"));
        assert!(topic_matches("#.a", "x.y.a"));
        assert!(!topic_matches("#.a", "a.x"));
        assert!(topic_matches("a.#.b", "a.b"));
        assert!(topic_matches("a.#.b", "a.x.b"));
        assert!(topic_matches("a.#.b", "a.x.y.b"));
        assert!(!topic_matches("a.#.b", "a.x.y.c"));
        assert!(!topic_matches("a.#.b", "a"));
        assert!(topic_matches("#.#", ""));
        assert!(topic_matches("a.#.#.b", "a.b"));
    }

    #[test]
    fn topic_star_matches_exactly_one_word() {
        assert!(topic_matches("*", "a"));
        assert!(!topic_matches("*", ""));
        assert!(!topic_matches("*", "a.b"));
        assert!(topic_matches("a.*", "a.b"));
        assert!(!topic_matches("a.*", "a"));
        assert!(!topic_matches("a.*", "a.b.c"));
        assert!(topic_matches("*.b.*", "a.b.c"));
        assert!(topic_matches("*.#", "a"));
        assert!(!topic_matches("*.#", ""));
        assert!(topic_matches("#.*", "a.b"));
        // Empty words count: "a." is the words "a" and "".
        assert!(topic_matches("a.*", "a."));
        assert!(topic_matches("", ""));
        assert!(!topic_matches("", "a"));
        assert!(topic_matches("order.created", "order.created"));
        assert!(!topic_matches("order.created", "order.updated"));
    }

    fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
        let mut table = FieldTable::default();
        for (key, value) in entries {
            table.insert((*key).into(), value.clone());
        }
        table
    }

    fn text(s: &str) -> AMQPValue {
        AMQPValue::LongString(s.into())
    }

    #[test]
    fn headers_all_needs_every_non_x_key_and_any_needs_one() {
        let all = table(&[("format", text("pdf")), ("type", text("report"))]);
        let any = table(&[
            ("x-match", text("any")),
            ("format", text("pdf")),
            ("type", text("report")),
        ]);
        let both = table(&[
            ("format", text("pdf")),
            ("type", text("report")),
            ("x-other", text("ignored")),
        ]);
        let one = table(&[("format", text("pdf"))]);
        let wrong = table(&[("format", text("zip"))]);
        assert!(headers_match(&all, Some(&both)));
        assert!(!headers_match(&all, Some(&one)));
        assert!(!headers_match(&all, None));
        assert!(headers_match(&any, Some(&one)));
        assert!(!headers_match(&any, Some(&wrong)));
        assert!(!headers_match(&any, None));
        // x- binding keys are ignored for all/any, considered with -with-x.
        let x_all = table(&[("x-tenant", text("a"))]);
        assert!(headers_match(&x_all, Some(&wrong)));
        let with_x = table(&[("x-match", text("all-with-x")), ("x-tenant", text("a"))]);
        assert!(!headers_match(&with_x, Some(&wrong)));
        assert!(headers_match(
            &with_x,
            Some(&table(&[("x-tenant", text("a"))]))
        ));
        let any_with_x = table(&[
            ("x-match", text("any-with-x")),
            ("x-tenant", text("a")),
            ("format", text("doc")),
        ]);
        assert!(headers_match(
            &any_with_x,
            Some(&table(&[("x-tenant", text("a"))]))
        ));
        // Void: presence only.
        let present = table(&[("format", AMQPValue::Void)]);
        assert!(headers_match(&present, Some(&wrong)));
        assert!(!headers_match(&present, Some(&table(&[]))));
    }

    #[test]
    fn values_compare_integers_by_number_and_strings_by_bytes() {
        assert!(values_equal(
            &AMQPValue::LongLongInt(1000),
            &AMQPValue::ShortUInt(1000)
        ));
        assert!(values_equal(
            &AMQPValue::ShortShortInt(-1),
            &AMQPValue::LongInt(-1)
        ));
        assert!(!values_equal(
            &AMQPValue::LongInt(1),
            &AMQPValue::LongInt(2)
        ));
        assert!(values_equal(
            &AMQPValue::ShortString("a".into()),
            &AMQPValue::LongString("a".into())
        ));
        assert!(!values_equal(&AMQPValue::Boolean(true), &text("true")));
        assert_eq!(
            describe(Some(&AMQPValue::LongLongInt(1000))),
            "the value '1000' of type 'long'"
        );
        assert_eq!(describe(None), "none");
    }
}
