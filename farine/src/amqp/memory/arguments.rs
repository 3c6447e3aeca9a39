//! Queue arguments (`x-message-ttl`, `x-dead-letter-exchange`, ...): what the broker reads from
//! them, how it validates them and when a redeclaration is equivalent, as RabbitMQ 3.10 does.

use lapin::types::{AMQPValue, FieldTable};

use super::error::{inequivalent, precondition_failed, resource};
use super::routing::{describe, integer, string, values_equal};

/// What happens when a queue with a length limit is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Overflow {
    /// The oldest message leaves (dead-lettered with reason `maxlen`, or dropped).
    DropHead,
    /// The new message is refused; a publisher in confirm mode gets a nack.
    RejectPublish,
    /// As `RejectPublish`, and the refused message is dead-lettered.
    RejectPublishDlx,
}

/// The queue type (`x-queue-type`). Quorum queues behave as classic queues here; quorum and
/// stream queues are validated as RabbitMQ validates them (durable, not exclusive, not
/// auto-delete). A stream is an append-only log read by cursors (see `state.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum QueueType {
    Classic,
    Quorum,
    Stream,
}

impl QueueType {
    /// Whether RabbitMQ refuses this type for a non-durable, exclusive or auto-delete queue.
    pub(super) fn is_replicated(self) -> bool {
        matches!(self, QueueType::Quorum | QueueType::Stream)
    }
}

/// The arguments of a queue the broker acts on.
#[derive(Clone, Debug)]
pub(super) struct QueueArguments {
    pub message_ttl: Option<u64>,
    pub expires: Option<u64>,
    pub dead_letter_exchange: Option<String>,
    pub dead_letter_routing_key: Option<String>,
    pub max_length: Option<u64>,
    pub max_length_bytes: Option<u64>,
    pub overflow: Overflow,
    pub queue_type: QueueType,
}

/// The arguments RabbitMQ compares when a queue is declared again; others are ignored.
const EQUIVALENCE_CHECKED: &[&str] = &[
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-dead-letter-strategy",
    "x-delivery-limit",
    "x-expires",
    "x-max-age",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-priority",
    "x-message-ttl",
    "x-overflow",
    "x-queue-mode",
    "x-queue-type",
    "x-single-active-consumer",
];

fn invalid(queue: &str, key: &str, why: impl std::fmt::Display) -> lapin::Error {
    precondition_failed(format!(
        "invalid arg '{key}' for {}: {why}",
        resource("queue", queue)
    ))
}

/// A non-negative integer argument; `positive` also refuses zero (as `x-expires` does).
fn count(queue: &str, args: &FieldTable, key: &str, positive: bool) -> lapin::Result<Option<u64>> {
    let Some(value) = args.inner().get(key) else {
        return Ok(None);
    };
    let Some(number) = integer(value) else {
        return Err(invalid(
            queue,
            key,
            format_args!("{{unacceptable_type,{}}}", super::routing::type_name(value)),
        ));
    };
    if number < 0 {
        return Err(invalid(
            queue,
            key,
            format_args!("{{value_negative,{number}}}"),
        ));
    }
    if positive && number == 0 {
        return Err(invalid(queue, key, "{value_zero,0}"));
    }
    Ok(Some(u64::try_from(number).unwrap_or(u64::MAX)))
}

fn text(queue: &str, args: &FieldTable, key: &str) -> lapin::Result<Option<String>> {
    match args.inner().get(key) {
        None => Ok(None),
        Some(value) => string(value).map(Some).ok_or_else(|| {
            invalid(
                queue,
                key,
                format_args!("{{unacceptable_type,{}}}", super::routing::type_name(value)),
            )
        }),
    }
}

impl QueueArguments {
    /// Reads and validates the arguments of a queue being declared.
    pub(super) fn parse(queue: &str, args: &FieldTable) -> lapin::Result<Self> {
        let dead_letter_exchange = text(queue, args, "x-dead-letter-exchange")?;
        let dead_letter_routing_key = text(queue, args, "x-dead-letter-routing-key")?;
        if dead_letter_routing_key.is_some() && dead_letter_exchange.is_none() {
            return Err(invalid(
                queue,
                "x-dead-letter-routing-key",
                "routing_key_but_no_dlx_defined",
            ));
        }
        let overflow = match text(queue, args, "x-overflow")?.as_deref() {
            None | Some("drop-head") => Overflow::DropHead,
            Some("reject-publish") => Overflow::RejectPublish,
            Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
            Some(other) => {
                return Err(invalid(
                    queue,
                    "x-overflow",
                    format_args!("{{invalid_overflow_value,<<\"{other}\">>}}"),
                ));
            }
        };
        let queue_type = match text(queue, args, "x-queue-type")?.as_deref() {
            None | Some("classic") => QueueType::Classic,
            Some("quorum") => QueueType::Quorum,
            Some("stream") => QueueType::Stream,
            Some(other) => {
                return Err(invalid(
                    queue,
                    "x-queue-type",
                    format_args!("{{unsupported_queue_type,<<\"{other}\">>}}"),
                ));
            }
        };
        Ok(Self {
            message_ttl: count(queue, args, "x-message-ttl", false)?,
            expires: count(queue, args, "x-expires", true)?,
            dead_letter_exchange,
            dead_letter_routing_key,
            max_length: count(queue, args, "x-max-length", false)?,
            max_length_bytes: count(queue, args, "x-max-length-bytes", false)?,
            overflow,
            queue_type,
        })
    }
}

/// Whether `received` declares the same queue arguments as `current`: the error RabbitMQ sends
/// for the first checked argument that differs. Integers compare by number whatever their
/// type; an absent `x-queue-type` is `classic`.
pub(super) fn assert_equivalent(
    queue: &str,
    current: &FieldTable,
    received: &FieldTable,
) -> lapin::Result<()> {
    for key in EQUIVALENCE_CHECKED {
        let mut now = current.inner().get(*key);
        let mut new = received.inner().get(*key);
        let classic = AMQPValue::LongString("classic".into());
        if *key == "x-queue-type" {
            now = now.or(Some(&classic));
            new = new.or(Some(&classic));
        }
        let same = match (now, new) {
            (None, None) => true,
            (Some(a), Some(b)) => values_equal(a, b),
            _ => false,
        };
        if !same {
            return Err(inequivalent(
                key,
                "queue",
                queue,
                &describe(new),
                &describe(now),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(entries: &[(&str, AMQPValue)]) -> FieldTable {
        let mut table = FieldTable::default();
        for (key, value) in entries {
            table.insert((*key).into(), value.clone());
        }
        table
    }

    #[test]
    fn integer_arguments_of_any_width_are_equivalent_when_equal() {
        let a = args(&[("x-message-ttl", AMQPValue::LongLongInt(1000))]);
        let b = args(&[("x-message-ttl", AMQPValue::ShortUInt(1000))]);
        assert!(assert_equivalent("q", &a, &b).is_ok());
        let c = args(&[("x-message-ttl", AMQPValue::LongInt(2000))]);
        let error = assert_equivalent("q", &a, &c).unwrap_err();
        assert!(
            error.to_string().contains(
                "PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue 'q' in vhost '/': received the value '2000' of type 'signedint' but current is the value '1000' of type 'long'"
            ),
            "{error}"
        );
        let error = assert_equivalent("q", &a, &FieldTable::default()).unwrap_err();
        assert!(error.to_string().contains("received none but current is"));
        // Unchecked arguments and an explicit classic type are equivalent to none.
        let d = args(&[
            ("x-custom", AMQPValue::Boolean(true)),
            ("x-queue-type", AMQPValue::LongString("classic".into())),
        ]);
        assert!(assert_equivalent("q", &FieldTable::default(), &d).is_ok());
    }

    #[test]
    fn arguments_are_validated() {
        let parsed = QueueArguments::parse(
            "q",
            &args(&[
                ("x-message-ttl", AMQPValue::ShortShortUInt(5)),
                ("x-dead-letter-exchange", AMQPValue::ShortString("".into())),
                (
                    "x-dead-letter-routing-key",
                    AMQPValue::LongString("q".into()),
                ),
                ("x-max-length", AMQPValue::LongLongInt(3)),
            ]),
        )
        .unwrap();
        assert_eq!(parsed.message_ttl, Some(5));
        assert_eq!(parsed.dead_letter_exchange.as_deref(), Some(""));
        assert_eq!(parsed.dead_letter_routing_key.as_deref(), Some("q"));
        assert_eq!(parsed.max_length, Some(3));
        assert!(
            QueueArguments::parse("q", &args(&[("x-message-ttl", AMQPValue::LongInt(-1))]))
                .is_err()
        );
        assert!(
            QueueArguments::parse(
                "q",
                &args(&[("x-message-ttl", AMQPValue::LongString("1".into()))])
            )
            .is_err()
        );
        assert!(
            QueueArguments::parse("q", &args(&[("x-expires", AMQPValue::LongInt(0))])).is_err()
        );
        assert!(
            QueueArguments::parse(
                "q",
                &args(&[(
                    "x-dead-letter-routing-key",
                    AMQPValue::LongString("k".into())
                )])
            )
            .is_err()
        );
        let stream = QueueArguments::parse(
            "q",
            &args(&[
                ("x-queue-type", AMQPValue::LongString("stream".into())),
                ("x-max-length-bytes", AMQPValue::LongLongInt(1_000_000)),
            ]),
        )
        .unwrap();
        assert_eq!(stream.queue_type, QueueType::Stream);
        assert_eq!(stream.max_length_bytes, Some(1_000_000));
    }
}
