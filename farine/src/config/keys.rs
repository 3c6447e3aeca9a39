//! Every key farine reads, by where it is read: a misspelt key is reported (a warning at start,
//! an error under `--check`) instead of silently ignored.
//!
//! The handler kinds' lists are also what a handler attribute may carry
//! (`#[execute(interval = "1s")]`): `farine-macros/src/keys.rs` holds the same lists, for the
//! compiler's error, and a test keeps the two equal.

/// Keys of the supervisor, read for every handler that runs as a task.
const SUPERVISION: &[&str] = &[
    "restart_delay",
    "restart_delay_max",
    "restart_window",
    "max_restarts",
];

// The lists below are compared with farine-macros/src/keys.rs by a test: keep them in step.

pub const CONSUME: &[&str] = &[
    "exchange",
    "exchange_type",
    "exchange_durable",
    "exchange_auto_delete",
    "exchange_arguments",
    "queue",
    "queue_durable",
    "queue_auto_delete",
    "queue_exclusive",
    "queue_arguments",
    "queue_type",
    "binding_arguments",
    "routing_key",
    "prefetch_count",
    "retry_delay",
    "max_attempts",
    "drain_timeout",
    "connect_timeout",
    "retry_queue",
    "dead_letter_queue",
    "retry_queue_arguments",
    "dead_letter_queue_arguments",
    "transaction",
    "inbox",
    "inbox_key",
    "start_from",
    "checkpoint",
    "restart_delay",
    "restart_delay_max",
    "restart_window",
    "max_restarts",
];

pub const PUBLISH: &[&str] = &[
    "exchange",
    "exchange_type",
    "exchange_durable",
    "exchange_auto_delete",
    "exchange_arguments",
    "routing_key",
    "persistent",
    "publish_timeout",
    "mandatory",
    "max_message_bytes",
];

pub const RPC_CLIENT: &[&str] = &["rpc_timeout"];

pub const EXECUTE: &[&str] = &[
    "restart",
    "interval",
    "drain_timeout",
    "transaction",
    "restart_delay",
    "restart_delay_max",
    "restart_window",
    "max_restarts",
];

pub const STREAM_HTTP: &[&str] = &[
    "endpoint",
    "headers",
    "start_from",
    "checkpoint",
    "on_error",
    "read_timeout",
    "connect_timeout",
    "reconnect_delay",
    "reconnect_delay_max",
    "retry_delay",
    "max_attempts",
    "transaction",
    "restart_delay",
    "restart_delay_max",
    "restart_window",
    "max_restarts",
];

/// The RPC server's keys, `rpc.<key>` (or the service's `<key>`).
pub const RPC_SERVER: &[&str] = &[
    "exchange_type",
    "exchange_durable",
    "exchange_auto_delete",
    "exchange_arguments",
    "queue_durable",
    "queue_auto_delete",
    "queue_exclusive",
    "queue_arguments",
    "queue_type",
    "binding_arguments",
    "rpc_queue_per_method",
    "prefetch_count",
    "drain_timeout",
    "connect_timeout",
    "max_message_bytes",
    "restart_delay",
    "restart_delay_max",
    "restart_window",
    "max_restarts",
];

/// Keys of the service as a whole: its broker, database, health endpoint, process.
pub const SERVICE: &[&str] = &[
    "enabled",
    "amqp_uri",
    "amqp_node_selector",
    "amqp_heartbeat",
    "amqp_reconnect_delay",
    "amqp_reconnect_delay_max",
    "amqp_tls_ca_file",
    "connect_timeout",
    "max_message_bytes",
    "health_addr",
    "metrics",
    "tracing",
    "otlp_endpoint",
    "log_format",
    "rpc_queue",
    "db_connector",
    "db_host",
    "db_port",
    "db_name",
    "db_user",
    "db_password",
    "db_max_conn",
    "db_timeout",
    "db_stale_timeout",
    "runtime",
    "worker_threads",
];

/// Every key farine reads somewhere.
pub fn all() -> impl Iterator<Item = &'static str> {
    [
        SERVICE,
        CONSUME,
        PUBLISH,
        RPC_CLIENT,
        EXECUTE,
        STREAM_HTTP,
        RPC_SERVER,
        SUPERVISION,
    ]
    .into_iter()
    .flatten()
    .copied()
}

/// The known key closest to `key` (at most two edits away), for "did you mean".
pub fn closest<'a>(key: &str, known: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    known
        .map(|candidate| (distance(key, candidate), candidate))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, candidate)| candidate)
}

/// Levenshtein distance, on bytes (keys are ASCII).
fn distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, x) in a.iter().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, y) in b.iter().enumerate() {
            current[j + 1] = (previous[j] + usize::from(x != y))
                .min(previous[j + 1] + 1)
                .min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_closest_key_is_at_most_two_edits_away() {
        assert_eq!(closest("prefetch_cout", all()), Some("prefetch_count"));
        assert_eq!(
            closest("exchnge", CONSUME.iter().copied()),
            Some("exchange")
        );
        assert_eq!(closest("greeting", all()), None);
        assert_eq!(distance("", "abc"), 3);
        assert_eq!(distance("abc", "abc"), 0);
    }

    /// The `&[...]` list named `name` in Rust source `text`.
    fn list<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        let start = text
            .find(&format!("pub const {name}: &[&str] = &["))
            .unwrap_or_else(|| panic!("no list {name}"));
        let body = &text[start..];
        let body = &body[body.find("= &[").unwrap() + 4..body.find("];").unwrap()];
        body.split(',')
            .map(|item| item.trim().trim_matches('"'))
            .filter(|item| !item.is_empty())
            .collect()
    }

    #[test]
    fn the_macros_lists_of_attribute_keys_are_these() {
        let ours = include_str!("keys.rs");
        let macros = include_str!("../../../farine-macros/src/keys.rs");
        for name in ["CONSUME", "PUBLISH", "RPC_CLIENT", "EXECUTE", "STREAM_HTTP"] {
            assert_eq!(list(macros, name), list(ours, name), "{name}");
        }
    }

    #[test]
    fn every_key_of_the_sample_config_is_known_and_the_sample_has_every_key() {
        let sample = include_str!("../../../etc/farine.ini");
        let mut in_sample = std::collections::BTreeSet::new();
        for line in sample.lines() {
            let line = line.trim_start_matches(['#', ';', ' ']);
            let Some((key, _)) = line.split_once(" =") else {
                continue;
            };
            if key.is_empty()
                || !key
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_' || b == b'.')
            {
                continue;
            }
            let bare = key.rsplit('.').next().unwrap();
            assert!(
                all().any(|k| k == bare),
                "etc/farine.ini has `{key}`, which farine does not read"
            );
            in_sample.insert(bare);
        }
        let missing: Vec<_> = all().filter(|k| !in_sample.contains(k)).collect();
        assert!(
            missing.is_empty(),
            "etc/farine.ini does not show {missing:?}"
        );
    }
}
