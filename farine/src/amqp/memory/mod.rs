//! An in-memory AMQP 0-9-1 broker with RabbitMQ 3.10's semantics, for tests: no network, no
//! server, and time that follows `tokio::time::pause()`.
//!
//! Its vocabulary is lapin's (`BasicProperties`, `FieldTable`, `ExchangeKind`, the option
//! structs, `lapin::Error` with RabbitMQ's reply codes and texts, `Confirmation`), and its
//! [`Connection`], [`Channel`], [`Consumer`] and [`Delivery`] mirror lapin's, so the rest of
//! farine can run over either with little change.
//!
//! What it does, as RabbitMQ does: the default and `amq.*` exchanges; direct, topic, fanout
//! and headers routing (`x-match` `all`/`any`/`all-with-x`/`any-with-x`), each queue once per
//! message; durable/exclusive/auto-delete/passive declarations and their equivalence checks
//! (integer arguments compared by number); `x-message-ttl`, per-message `expiration` (the
//! smaller wins), `x-dead-letter-exchange`, `x-dead-letter-routing-key`, `x-max-length`,
//! `x-max-length-bytes`, `x-overflow` (`drop-head`, `reject-publish`, `reject-publish-dlx`),
//! `x-expires`; dead-lettering with RabbitMQ's `x-death` and `x-first-death-*` headers and its
//! cycle rule; FIFO delivery round-robin over consumers with room, per-consumer and
//! per-channel prefetch, per-channel delivery tags, ack/nack/reject with `multiple`, requeue
//! at the head with `redelivered`; exclusive consumers; publisher confirms and mandatory
//! returns; channel errors that close the channel, hard errors that close the connection.
//!
//! Stream queues (`x-queue-type = stream`) as RabbitMQ 3.10 serves them over AMQP 0-9-1: durable,
//! not exclusive, not auto-delete (406 otherwise, with its texts); an append-only log whose
//! messages get offsets 0, 1, 2, ... and stay when read; each consumer has a cursor of its own,
//! placed by its `x-stream-offset` argument (`first`, `last`, `next` — the default —, an offset
//! clamped to the log, or a timestamp: the first message appended at or after that second, on the
//! broker's clock, which follows a paused tokio clock), and reads every message, each with its
//! offset in the header `x-stream-offset` (a long); a consumer needs a prefetch (`basic.qos` > 0,
//! else 406 `consumer prefetch count is not set for '...'`) and manual acks (else 540
//! `NOT_IMPLEMENTED`, closing the connection); unacked deliveries count against the prefetch and
//! ack, nack or reject only give the place back (nothing is requeued or dead-lettered); `basic.get`
//! is 540 `NOT_IMPLEMENTED`; a passive declare answers 0 messages and 0 consumers.
//!
//! Where it differs, on purpose:
//! - A message expires wherever it is in its queue once its time has passed (RabbitMQ only
//!   expires from the head, so a short-TTL message may wait behind a long one there).
//! - `x-queue-type`: `classic` and `quorum` are accepted (quorum's declaration rules checked)
//!   and behave as classic queues (no `x-delivery-limit`, no `x-delivery-count`).
//!   `x-max-priority`, `x-single-active-consumer`, `x-queue-mode` are recorded (and
//!   equivalence-checked), not enforced.
//! - Streams have no chunks: `last` starts at the last message (RabbitMQ: the first of the last
//!   chunk), an offset or a timestamp at exactly that message (RabbitMQ: the chunk holding it,
//!   so a few earlier ones may come too), and a consumer gets one message at a time within
//!   its prefetch (RabbitMQ may send a whole chunk). A stream keeps everything:
//!   `x-max-length-bytes`, `x-max-age` and `x-stream-max-segment-size-bytes` are recorded,
//!   not enforced; its other queue arguments (TTL, dead-lettering, length limit) are ignored.
//!   An interval as `x-stream-offset` (`"1h"`, RabbitMQ 3.11+) is refused with 406.
//! - Headers matching treats short and long strings as equal when their bytes are.
//! - A publish that fails (no such exchange, ...) closes the channel and its [`Confirm`]
//!   resolves to the error even outside confirm mode (lapin would say `NotRequested`).
//! - Closing a channel ends its consumers' streams at once, dropping the deliveries they had
//!   not yet read (those were requeued); a cancelled consumer's stream still yields them.
//! - A consumer whose stream is dropped is cancelled; `CC`/`BCC` headers, `user_id` checks,
//!   alternate exchanges, exchange-to-exchange bindings and authentication are not modelled.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Mutex;

mod arguments;
mod broker;
mod client;
mod death;
mod error;
mod routing;
mod state;
#[cfg(test)]
mod tests;

#[allow(unused_imports)]
pub(crate) use broker::{Broker, PublishOutcome, Published, QueueStats};
#[allow(unused_imports)]
pub(crate) use client::{
    Acker, Channel, Confirm, Connection, Consumer, DeclaredQueue, Delivery, GetMessage,
};

/// The live brokers by name: `memory://<name>` connects to the one of that name, made when
/// none is alive (a broker lives while a handle or a connection to it does).
static NAMED: Mutex<Option<HashMap<String, broker::WeakBroker>>> = Mutex::new(None);

impl Broker {
    /// The broker named `name`, made when no broker of that name is alive.
    pub fn named(name: &str) -> Self {
        let mut named = NAMED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let named = named.get_or_insert_with(HashMap::new);
        named.retain(|_, broker| broker.is_alive());
        if let Some(broker) = named.get(name).and_then(broker::WeakBroker::upgrade) {
            return broker;
        }
        let broker = Broker::new();
        named.insert(name.to_string(), broker.downgrade());
        broker
    }
}
