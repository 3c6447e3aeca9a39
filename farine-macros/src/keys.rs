//! The config keys a handler attribute may carry (`#[execute(interval = "1s")]`): the keys each
//! kind of handler reads. The same lists are in `farine/src/config/keys.rs`, where farine
//! reads them; a test keeps the two equal.

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
