//! Dead-lettering's bookkeeping, as RabbitMQ 3.10 keeps it: the `x-death` history a message
//! carries from queue to queue, and the rule that stops a message dying in a loop.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};

use super::routing::{integer, string as value_string};

/// Seconds since the Unix epoch, for `x-death`'s `time` (wall-clock, unlike expiry).
pub(super) fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `properties` with the death recorded as RabbitMQ 3.10 records it: an `x-death` entry for
/// (queue, reason) with `count`, `reason`, `queue`, `time`, `exchange`, `routing-keys` (and
/// `original-expiration` when the message had one) at the front of the array, its count one
/// more than the entry it replaces; `x-first-death-*` on the first death; no `expiration`.
pub(super) fn record_death(
    properties: &BasicProperties,
    queue: &str,
    reason: &str,
    exchange: &str,
    routing_keys: &[&str],
    time: u64,
) -> BasicProperties {
    let mut headers = properties
        .headers()
        .as_ref()
        .map(|h| h.inner().clone())
        .unwrap_or_default();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    let mut entry = FieldTable::default();
    entry.insert("reason".into(), text(reason));
    entry.insert("queue".into(), text(queue));
    entry.insert("time".into(), AMQPValue::Timestamp(time));
    entry.insert("exchange".into(), text(exchange));
    entry.insert(
        "routing-keys".into(),
        AMQPValue::FieldArray(FieldArray::from(
            routing_keys.iter().map(|k| text(k)).collect::<Vec<_>>(),
        )),
    );
    if let Some(expiration) = properties.expiration() {
        entry.insert("original-expiration".into(), text(expiration.as_str()));
    }
    let deaths = match headers.get("x-death") {
        Some(AMQPValue::FieldArray(array)) => array.as_slice().to_vec(),
        _ => {
            headers.insert("x-first-death-reason".into(), text(reason));
            headers.insert("x-first-death-queue".into(), text(queue));
            headers.insert("x-first-death-exchange".into(), text(exchange));
            Vec::new()
        }
    };
    let same = |death: &AMQPValue| {
        death_field(death, "queue").as_deref() == Some(queue)
            && death_field(death, "reason").as_deref() == Some(reason)
    };
    let previous = deaths
        .iter()
        .find(|d| same(d))
        .and_then(|d| match d {
            AMQPValue::FieldTable(t) => t.inner().get("count").and_then(integer),
            _ => None,
        })
        .unwrap_or(0);
    let count = i64::try_from(previous)
        .unwrap_or(i64::MAX)
        .saturating_add(1);
    entry.insert("count".into(), AMQPValue::LongLongInt(count));
    let mut updated = vec![AMQPValue::FieldTable(entry)];
    updated.extend(deaths.into_iter().filter(|d| !same(d)));
    headers.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(updated)),
    );
    without_expiration(properties).with_headers(FieldTable::from(headers))
}

fn death_field(death: &AMQPValue, key: &str) -> Option<String> {
    match death {
        AMQPValue::FieldTable(table) => table.inner().get(key).and_then(value_string),
        _ => None,
    }
}

pub(super) fn deaths(properties: &BasicProperties) -> Vec<AMQPValue> {
    match properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-death"))
    {
        Some(AMQPValue::FieldArray(array)) => array.as_slice().to_vec(),
        _ => Vec::new(),
    }
}

/// RabbitMQ's cycle rule: dead-lettering to `queue` is a cycle when the message already died
/// there and every death since (that one included) was automatic — none `rejected`.
pub(super) fn is_cycle(queue: &str, deaths: &[AMQPValue]) -> bool {
    let Some(position) = deaths
        .iter()
        .position(|d| death_field(d, "queue").as_deref() == Some(queue))
    else {
        return false;
    };
    deaths[..=position].iter().all(|d| {
        matches!(d, AMQPValue::FieldTable(_))
            && death_field(d, "reason").as_deref() != Some("rejected")
    })
}

/// `properties` without `expiration` (lapin's properties cannot unset a field).
pub(super) fn without_expiration(properties: &BasicProperties) -> BasicProperties {
    let p = properties;
    let mut out = BasicProperties::default();
    if let Some(v) = p.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = p.headers() {
        out = out.with_headers(v.clone());
    }
    if let Some(v) = p.delivery_mode() {
        out = out.with_delivery_mode(*v);
    }
    if let Some(v) = p.priority() {
        out = out.with_priority(*v);
    }
    if let Some(v) = p.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = p.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = p.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = p.user_id() {
        out = out.with_user_id(v.clone());
    }
    if let Some(v) = p.app_id() {
        out = out.with_app_id(v.clone());
    }
    if let Some(v) = p.cluster_id() {
        out = out.with_cluster_id(v.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(death: &AMQPValue, key: &str) -> AMQPValue {
        match death {
            AMQPValue::FieldTable(t) => t.inner().get(key).cloned().unwrap_or(AMQPValue::Void),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_repeated_death_counts_up_and_moves_to_the_front() {
        let fresh = BasicProperties::default().with_expiration("1000".into());
        let once = record_death(&fresh, "q.retry", "expired", "", &["q.retry"], 1);
        assert!(once.expiration().is_none());
        let twice = record_death(&once, "q", "rejected", "x", &["q"], 2);
        let thrice = record_death(&twice, "q.retry", "expired", "", &["q.retry"], 3);
        let deaths = deaths(&thrice);
        assert_eq!(deaths.len(), 2);
        assert_eq!(
            entry(&deaths[0], "queue"),
            AMQPValue::LongString("q.retry".into())
        );
        assert_eq!(entry(&deaths[0], "count"), AMQPValue::LongLongInt(2));
        assert_eq!(entry(&deaths[0], "time"), AMQPValue::Timestamp(3));
        assert_eq!(
            entry(&deaths[1], "queue"),
            AMQPValue::LongString("q".into())
        );
        assert_eq!(entry(&deaths[1], "count"), AMQPValue::LongLongInt(1));
        let headers = thrice.headers().clone().unwrap();
        assert_eq!(
            headers.inner().get("x-first-death-queue"),
            Some(&AMQPValue::LongString("q.retry".into()))
        );
        // Back to q.retry by expiry after a rejection in q: not a fully automatic cycle.
        assert!(!is_cycle("q", &deaths));
        assert!(is_cycle("q.retry", &deaths));
        let rejected_last = record_death(&thrice, "q", "rejected", "x", &["q"], 4);
        assert!(!is_cycle("q.retry", &super::deaths(&rejected_last)));
    }
}
