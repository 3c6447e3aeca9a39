//! The broker's state and every operation on it, behind one mutex.
//!
//! Each client call locks the state once, reads the clock once ([`State::now`]), lets the
//! messages whose time has come expire, does its work, then [`State::run`]s the consequences:
//! dead letters are routed and ready messages go to consumers with room for them. Nothing here
//! awaits: the lock is never held across an `.await`. Time is tokio's ([`Instant`]), so a test
//! that pauses the clock sees a 10 s TTL pass at once; a timer task (spawned on the first
//! deadline, holding only a `Weak` to the state) wakes the broker when a message or an unused
//! queue expires with no client call to do it.

use std::cmp::Reverse;
use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use lapin::message::BasicReturnMessage;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::protocol::AMQPHardError;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ChannelState, Confirmation, ConnectionState, ExchangeKind};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::arguments::{Overflow, QueueArguments, QueueType, assert_equivalent};
use super::broker::{PublishOutcome, Published, QueueStats};
use super::client::{Acker, DeclaredQueue, Delivery};
use super::death::{deaths, is_cycle, record_death, unix_time};
use super::error::{
    access_refused, channel_state, connection_state, hard, inequivalent, not_found,
    precondition_failed, resource, resource_locked, short,
};
use super::routing::{binding_matches, headers_match_kind};

/// How many dead letters one operation may route before the broker gives up on a loop that
/// RabbitMQ's cycle detection would not have caught.
const MAX_DEAD_LETTERS_PER_RUN: usize = 100_000;

/// The exchanges every vhost starts with.
const PREDECLARED: &[(&str, ExchangeKind)] = &[
    ("", ExchangeKind::Direct),
    ("amq.direct", ExchangeKind::Direct),
    ("amq.fanout", ExchangeKind::Fanout),
    ("amq.headers", ExchangeKind::Headers),
    ("amq.match", ExchangeKind::Headers),
    ("amq.topic", ExchangeKind::Topic),
];

/// The state and the lock around it; what every handle shares.
pub(super) struct Shared {
    state: Mutex<State>,
    wake: Arc<Notify>,
    /// Bumped after every operation: a test kit waits on it for a queue to settle.
    changes: watch::Sender<u64>,
}

impl Shared {
    pub(super) fn new() -> Arc<Self> {
        let wake = Arc::new(Notify::new());
        Arc::new_cyclic(|this| Shared {
            state: Mutex::new(State::new(this.clone(), wake.clone())),
            wake,
            changes: watch::Sender::new(0),
        })
    }

    /// The state, for a look that changes nothing.
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs one operation on the state: the clock is read and due expiries happen first; dead
    /// letters are routed and ready messages delivered after.
    pub(super) fn operate<R>(&self, op: impl FnOnce(&mut State) -> R) -> R {
        let mut state = self.lock();
        state.begin();
        let result = op(&mut state);
        state.run();
        drop(state);
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
        result
    }

    /// A look at the state, after the expiries due (as [`Shared::operate`]); counts as a
    /// change only when something expired, not for the look itself.
    pub(super) fn look<R>(&self, op: impl FnOnce(&State) -> R) -> R {
        let mut state = self.lock();
        let expired = state.begin();
        state.run();
        let result = op(&state);
        drop(state);
        if expired {
            self.changes.send_modify(|n| *n = n.wrapping_add(1));
        }
        result
    }

    /// A receiver that sees every operation (see [`Shared::operate`]).
    pub(super) fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The timer task waits on this; woken, it finds the state gone and ends.
        self.wake.notify_one();
    }
}

/// An exchange: its declaration and its bindings to queues.
pub(super) struct Exchange {
    pub kind: ExchangeKind,
    durable: bool,
    auto_delete: bool,
    internal: bool,
    arguments: FieldTable,
    pub bindings: Vec<Binding>,
}

pub(super) struct Binding {
    pub queue: String,
    pub routing_key: String,
    arguments: FieldTable,
}

/// A message as the broker keeps it: where it was last published, and what.
#[derive(Clone)]
pub(super) struct Message {
    exchange: String,
    routing_key: String,
    properties: BasicProperties,
    body: Arc<[u8]>,
}

/// A message in a queue (ready) or out on a channel (unacked).
struct Queued {
    message: Message,
    redelivered: bool,
    /// When the queue's TTL or the message's `expiration` ends its life, whichever is sooner.
    /// Kept while the message is out, so a requeued message keeps its deadline.
    expires_at: Option<Instant>,
}

/// A message in a stream's log: it stays there, however often it is read.
struct Logged {
    message: Message,
    /// When it was appended, in milliseconds since the Unix epoch on the broker's clock.
    appended_ms: u128,
}

/// A queue's ready messages, oldest first, with their total size (for `x-max-length-bytes`).
#[derive(Default)]
struct Ready {
    messages: VecDeque<Queued>,
    bytes: usize,
}

impl Ready {
    fn len(&self) -> usize {
        self.messages.len()
    }

    fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    fn push_back(&mut self, queued: Queued) {
        self.bytes += queued.message.body.len();
        self.messages.push_back(queued);
    }

    fn push_front(&mut self, queued: Queued) {
        self.bytes += queued.message.body.len();
        self.messages.push_front(queued);
    }

    fn pop_front(&mut self) -> Option<Queued> {
        let queued = self.messages.pop_front()?;
        self.bytes -= queued.message.body.len();
        Some(queued)
    }

    fn clear(&mut self) -> usize {
        let count = self.messages.len();
        self.messages.clear();
        self.bytes = 0;
        count
    }

    /// Takes out, in queue order, every message whose deadline is at or before `now`.
    fn take_expired(&mut self, now: Instant) -> Vec<Queued> {
        let (expired, kept): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.messages)
            .into_iter()
            .partition(|q| q.expires_at.is_some_and(|at| at <= now));
        self.messages = kept;
        self.bytes = self.messages.iter().map(|q| q.message.body.len()).sum();
        expired.into()
    }
}

pub(super) struct Queue {
    name: String,
    durable: bool,
    /// The connection of an exclusive queue.
    exclusive_owner: Option<u64>,
    auto_delete: bool,
    arguments: FieldTable,
    config: QueueArguments,
    ready: Ready,
    /// A stream's messages; its offsets are the indices (nothing is ever truncated). Empty
    /// for other queue types.
    log: Vec<Logged>,
    /// Consumers as (channel, consumer id), in the order deliveries go round.
    consumers: Vec<(u64, u64)>,
    next_consumer: usize,
    had_consumer: bool,
    exclusive_consumer: bool,
    /// Last declared, read with `basic.get` or left by its last consumer (`x-expires`).
    last_used: Instant,
}

impl Queue {
    /// The dead letter for `message` leaving this queue for `reason`, if the queue has a
    /// dead-letter exchange (else the message is dropped).
    fn death(&self, message: Message, reason: Reason) -> Option<DeadLetter> {
        Some(DeadLetter {
            queue: self.name.clone(),
            exchange: self.config.dead_letter_exchange.clone()?,
            routing_key: self.config.dead_letter_routing_key.clone(),
            message,
            reason,
        })
    }

    fn is_full_for(&self, size: usize) -> bool {
        self.config
            .max_length
            .is_some_and(|max| self.ready.len() as u64 >= max)
            || self
                .config
                .max_length_bytes
                .is_some_and(|max| (self.ready.bytes + size) as u64 > max)
    }

    fn is_over_limit(&self) -> bool {
        self.config
            .max_length
            .is_some_and(|max| self.ready.len() as u64 > max)
            || self
                .config
                .max_length_bytes
                .is_some_and(|max| self.ready.bytes as u64 > max)
    }

    /// RabbitMQ's check that a connection may use a queue: an exclusive queue is its owner's.
    fn check_access(&self, conn: u64) -> lapin::Result<()> {
        match self.exclusive_owner {
            Some(owner) if owner != conn => Err(resource_locked(&self.name)),
            _ => Ok(()),
        }
    }

    fn is_stream(&self) -> bool {
        self.config.queue_type == QueueType::Stream
    }

    /// What `queue.declare-ok` says. RabbitMQ answers 0 messages and 0 consumers for a
    /// stream, however many it has.
    fn stats(&self) -> DeclaredQueue {
        let consumers = if self.is_stream() {
            0
        } else {
            self.consumers.len()
        };
        DeclaredQueue {
            name: self.name.clone(),
            message_count: u32::try_from(self.ready.len()).unwrap_or(u32::MAX),
            consumer_count: u32::try_from(consumers).unwrap_or(u32::MAX),
        }
    }
}

struct Conn {
    name: String,
    state: ConnectionState,
    channels: Vec<u64>,
    next_number: u16,
    closed: watch::Sender<bool>,
}

struct Chan {
    conn: u64,
    state: ChannelState,
    /// `basic.qos` with `global = false`: the prefetch of consumers started after it.
    prefetch: u16,
    /// `basic.qos` with `global = true`: a limit shared by all the channel's consumers.
    global_prefetch: u16,
    /// Unacked deliveries to consumers (not `basic.get`), for the global prefetch.
    consumer_unacked: u32,
    confirm: bool,
    next_tag: u64,
    unacked: BTreeMap<u64, Unacked>,
    consumers: BTreeMap<u64, Slot>,
}

struct Unacked {
    queue: String,
    queued: Queued,
    /// The consumer it went to; `None` for `basic.get`.
    consumer: Option<u64>,
}

/// What ends a consumer's stream early: `Some(None)` ends it now, `Some(Some(error))` yields the
/// error first. Left `None`, the stream ends once its buffered deliveries are read.
pub(super) type ConsumerEnd = Arc<Mutex<Option<Option<lapin::Error>>>>;

/// A consumer as the broker sees it.
struct Slot {
    tag: String,
    queue: String,
    no_ack: bool,
    exclusive: bool,
    prefetch: u16,
    outstanding: u32,
    /// A stream consumer's position: the offset of the next message it gets.
    cursor: Option<usize>,
    tx: mpsc::UnboundedSender<Delivery>,
    end: ConsumerEnd,
}

impl Slot {
    fn has_room(&self) -> bool {
        self.no_ack || self.prefetch == 0 || self.outstanding < u32::from(self.prefetch)
    }

    /// Ends the stream at once (its buffered deliveries were requeued), with `error` first.
    fn abort(&self, error: Option<lapin::Error>) {
        *self.end.lock().unwrap_or_else(PoisonError::into_inner) = Some(error);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reason {
    Rejected,
    Expired,
    MaxLen,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::Rejected => "rejected",
            Reason::Expired => "expired",
            Reason::MaxLen => "maxlen",
        }
    }
}

/// A message on its way to its queue's dead-letter exchange.
struct DeadLetter {
    queue: String,
    exchange: String,
    routing_key: Option<String>,
    message: Message,
    reason: Reason,
}

/// How a settled delivery ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Settle {
    Ack,
    Requeue,
    /// Nack or reject without requeue: dead-lettered, or dropped.
    Discard,
}

#[derive(PartialEq, Eq)]
struct Deadline {
    at: Instant,
    seq: u64,
    what: Due,
}

#[derive(PartialEq, Eq)]
enum Due {
    /// Some message of this queue may have expired.
    Messages(String),
    /// This queue may have been unused for its `x-expires`.
    QueueUnused(String),
}

impl Ord for Deadline {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

impl PartialOrd for Deadline {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// A consumer just registered: what the client side wraps into a stream.
pub(super) struct NewConsumer {
    pub tag: String,
    pub rx: mpsc::UnboundedReceiver<Delivery>,
    pub end: ConsumerEnd,
}

pub(super) struct State {
    this: Weak<Shared>,
    /// The time of the operation under way.
    now: Instant,
    /// An instant and the Unix time then, in milliseconds: the broker's wall clock, which
    /// moves with [`State::now`] (so with a paused tokio clock too).
    origin: (Instant, u128),
    exchanges: BTreeMap<String, Exchange>,
    queues: BTreeMap<String, Queue>,
    connections: BTreeMap<u64, Conn>,
    channels: HashMap<u64, Chan>,
    next_id: u64,
    name_seed: u64,
    journal: Vec<Published>,
    journal_len: watch::Sender<usize>,
    dead: VecDeque<DeadLetter>,
    deadlines: BinaryHeap<Reverse<Deadline>>,
    timer: Option<JoinHandle<()>>,
    wake: Arc<Notify>,
}

impl State {
    fn new(this: Weak<Shared>, wake: Arc<Notify>) -> Self {
        let exchanges = PREDECLARED
            .iter()
            .map(|(name, kind)| {
                let exchange = Exchange {
                    kind: kind.clone(),
                    durable: true,
                    auto_delete: false,
                    internal: false,
                    arguments: FieldTable::default(),
                    bindings: Vec::new(),
                };
                (name.to_string(), exchange)
            })
            .collect();
        Self {
            this,
            now: Instant::now(),
            origin: (
                Instant::now(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis()),
            ),
            exchanges,
            queues: BTreeMap::new(),
            connections: BTreeMap::new(),
            channels: HashMap::new(),
            next_id: 1,
            name_seed: RandomState::new().build_hasher().finish(),
            journal: Vec::new(),
            journal_len: watch::Sender::new(0),
            dead: VecDeque::new(),
            deadlines: BinaryHeap::new(),
            timer: None,
            wake,
        }
    }

    /// Reads the clock and runs the expiries due; whether any deadline came due.
    fn begin(&mut self) -> bool {
        self.now = Instant::now();
        self.expire_due()
    }

    /// [`State::now`] as milliseconds since the Unix epoch.
    fn unix_ms(&self) -> u128 {
        let (instant, ms) = self.origin;
        ms + self.now.saturating_duration_since(instant).as_millis()
    }

    fn id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// `prefix` and 22 characters, as RabbitMQ's `amq.gen-…` and `amq.ctag-…`; unique within
    /// the broker (a bijective mix of a counter).
    fn generated_name(&mut self, prefix: &str) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let counter = self.id();
        let mut name = String::from(prefix);
        for half in [
            mix(self.name_seed.wrapping_add(counter)),
            mix(counter ^ self.name_seed.rotate_left(32)),
        ] {
            for i in 0..11 {
                name.push(char::from(ALPHABET[((half >> (i * 6)) & 63) as usize]));
            }
        }
        name
    }

    // ----- connections and channels -----

    pub(super) fn connect(&mut self, name: &str) -> (u64, watch::Receiver<bool>) {
        let id = self.id();
        let (closed, closed_rx) = watch::channel(false);
        self.connections.insert(
            id,
            Conn {
                name: name.to_string(),
                state: ConnectionState::Connected,
                channels: Vec::new(),
                next_number: 1,
                closed,
            },
        );
        (id, closed_rx)
    }

    pub(super) fn connection_state(&self, conn: u64) -> ConnectionState {
        self.connections
            .get(&conn)
            .map_or(ConnectionState::Closed, |c| c.state)
    }

    pub(super) fn open_connections(&self) -> Vec<(u64, String)> {
        self.connections
            .iter()
            .filter(|(_, c)| c.state == ConnectionState::Connected)
            .map(|(id, c)| (*id, c.name.clone()))
            .collect()
    }

    pub(super) fn create_channel(&mut self, conn_id: u64) -> lapin::Result<(u64, u16)> {
        let id = self.id();
        let conn = self
            .connections
            .get_mut(&conn_id)
            .ok_or_else(|| connection_state(ConnectionState::Closed))?;
        if conn.state != ConnectionState::Connected {
            return Err(connection_state(conn.state));
        }
        let number = conn.next_number;
        conn.next_number = conn.next_number.wrapping_add(1).max(1);
        conn.channels.push(id);
        self.channels.insert(
            id,
            Chan {
                conn: conn_id,
                state: ChannelState::Connected,
                prefetch: 0,
                global_prefetch: 0,
                consumer_unacked: 0,
                confirm: false,
                next_tag: 1,
                unacked: BTreeMap::new(),
                consumers: BTreeMap::new(),
            },
        );
        Ok((id, number))
    }

    pub(super) fn channel_state(&self, chan: u64) -> ChannelState {
        self.channels
            .get(&chan)
            .map_or(ChannelState::Closed, |c| c.state)
    }

    /// The channel, if open; else lapin's error for `context`.
    fn open_channel(&self, chan: u64, context: &'static str) -> lapin::Result<&Chan> {
        match self.channels.get(&chan) {
            Some(c) if c.state == ChannelState::Connected => Ok(c),
            Some(c) => Err(channel_state(c.state, context)),
            None => Err(channel_state(ChannelState::Closed, context)),
        }
    }

    fn conn_of(&self, chan: u64) -> u64 {
        self.channels.get(&chan).map_or(0, |c| c.conn)
    }

    /// Runs `op` on an open channel; an error it returns closes the channel (a soft error) or
    /// the connection (a hard one), as the broker's `channel.close`/`connection.close` would.
    fn on_channel<R>(
        &mut self,
        chan: u64,
        context: &'static str,
        op: impl FnOnce(&mut Self) -> lapin::Result<R>,
    ) -> lapin::Result<R> {
        self.open_channel(chan, context)?;
        let result = op(self);
        if let Err(error) = &result {
            self.fail(chan, error.clone());
        }
        result
    }

    fn fail(&mut self, chan: u64, error: lapin::Error) {
        tracing::debug!(channel = chan, %error, "in-memory broker closes on error");
        if error.is_amqp_hard_error() {
            let conn = self.conn_of(chan);
            self.close_connection(conn, Some(error));
        } else {
            self.close_channel(chan, None);
        }
    }

    /// Closes a channel: its unacked messages go back to their queues (redelivered), its
    /// consumers end — with `broken` first when the connection broke.
    pub(super) fn close_channel(&mut self, chan_id: u64, broken: Option<lapin::Error>) {
        let Some(chan) = self.channels.get_mut(&chan_id) else {
            return;
        };
        if chan.state != ChannelState::Connected {
            return;
        }
        chan.state = if broken.is_some() {
            ChannelState::Error
        } else {
            ChannelState::Closed
        };
        let consumers = std::mem::take(&mut chan.consumers);
        let unacked = std::mem::take(&mut chan.unacked);
        chan.consumer_unacked = 0;
        self.requeue(unacked.into_values().collect());
        for (id, slot) in consumers {
            slot.abort(broken.clone());
            self.detach_consumer(&slot.queue, chan_id, id, slot.exclusive);
        }
    }

    /// `channel.close` from the client.
    pub(super) fn client_close_channel(&mut self, chan: u64) -> lapin::Result<()> {
        self.open_channel(chan, "channel.close")?;
        self.close_channel(chan, None);
        Ok(())
    }

    /// Closes a connection: its channels close, its exclusive queues are deleted. With
    /// `broken`, as if the network failed: consumers see that error, states become `Error`.
    pub(super) fn close_connection(&mut self, conn_id: u64, broken: Option<lapin::Error>) {
        let Some(conn) = self.connections.get_mut(&conn_id) else {
            return;
        };
        if conn.state != ConnectionState::Connected {
            return;
        }
        conn.state = if broken.is_some() {
            ConnectionState::Error
        } else {
            ConnectionState::Closed
        };
        let channels = std::mem::take(&mut conn.channels);
        conn.closed.send_replace(true);
        for chan in channels {
            self.close_channel(chan, broken.clone());
        }
        let exclusive: Vec<String> = self
            .queues
            .values()
            .filter(|q| q.exclusive_owner == Some(conn_id))
            .map(|q| q.name.clone())
            .collect();
        for queue in exclusive {
            self.delete_queue(&queue);
        }
    }

    pub(super) fn client_close_connection(&mut self, conn_id: u64) -> lapin::Result<()> {
        let state = self.connection_state(conn_id);
        if state != ConnectionState::Connected {
            return Err(connection_state(state));
        }
        self.close_connection(conn_id, None);
        Ok(())
    }

    // ----- exchanges -----

    pub(super) fn exchange_declare(
        &mut self,
        chan: u64,
        name: &str,
        kind: ExchangeKind,
        options: ExchangeDeclareOptions,
        arguments: FieldTable,
    ) -> lapin::Result<()> {
        self.on_channel(chan, "exchange.declare", |s| {
            s.try_exchange_declare(name, kind, options, arguments)
        })
    }

    fn try_exchange_declare(
        &mut self,
        name: &str,
        kind: ExchangeKind,
        options: ExchangeDeclareOptions,
        arguments: FieldTable,
    ) -> lapin::Result<()> {
        if name.is_empty() {
            return Err(access_refused(
                "operation not permitted on the default exchange",
            ));
        }
        if let ExchangeKind::Custom(custom) = &kind {
            return Err(hard(
                AMQPHardError::COMMANDINVALID,
                format!("invalid exchange type '{custom}'"),
            ));
        }
        let Some(current) = self.exchanges.get(name) else {
            if options.passive {
                return Err(not_found("exchange", name));
            }
            if name.starts_with("amq.") {
                return Err(access_refused(format!(
                    "exchange name '{name}' contains reserved prefix 'amq.*'"
                )));
            }
            self.exchanges.insert(
                name.to_string(),
                Exchange {
                    kind,
                    durable: options.durable,
                    auto_delete: options.auto_delete,
                    internal: options.internal,
                    arguments,
                    bindings: Vec::new(),
                },
            );
            return Ok(());
        };
        if options.passive {
            return Ok(());
        }
        let quoted = |b: bool| format!("'{b}'");
        if current.kind != kind {
            return Err(inequivalent(
                "type",
                "exchange",
                name,
                &format!("'{}'", kind_name(&kind)),
                &format!("'{}'", kind_name(&current.kind)),
            ));
        }
        for (key, now, new) in [
            ("durable", current.durable, options.durable),
            ("auto_delete", current.auto_delete, options.auto_delete),
            ("internal", current.internal, options.internal),
        ] {
            if now != new {
                return Err(inequivalent(
                    key,
                    "exchange",
                    name,
                    &quoted(new),
                    &quoted(now),
                ));
            }
        }
        let key = "alternate-exchange";
        let (now, new) = (
            current.arguments.inner().get(key),
            arguments.inner().get(key),
        );
        let same = match (now, new) {
            (None, None) => true,
            (Some(a), Some(b)) => super::routing::values_equal(a, b),
            _ => false,
        };
        if !same {
            return Err(inequivalent(
                key,
                "exchange",
                name,
                &super::routing::describe(new),
                &super::routing::describe(now),
            ));
        }
        Ok(())
    }

    pub(super) fn exchange_delete(
        &mut self,
        chan: u64,
        name: &str,
        if_unused: bool,
    ) -> lapin::Result<()> {
        self.on_channel(chan, "exchange.delete", |s| {
            if name.is_empty() {
                return Err(access_refused(
                    "operation not permitted on the default exchange",
                ));
            }
            if name.starts_with("amq.") {
                return Err(access_refused(format!(
                    "deletion of system {} not allowed",
                    resource("exchange", name)
                )));
            }
            let Some(exchange) = s.exchanges.get(name) else {
                return Ok(());
            };
            if if_unused && !exchange.bindings.is_empty() {
                return Err(precondition_failed(format!(
                    "{} in use",
                    resource("exchange", name)
                )));
            }
            s.exchanges.remove(name);
            Ok(())
        })
    }

    // ----- queues -----

    pub(super) fn queue_declare(
        &mut self,
        chan: u64,
        name: &str,
        options: QueueDeclareOptions,
        arguments: FieldTable,
    ) -> lapin::Result<DeclaredQueue> {
        self.on_channel(chan, "queue.declare", |s| {
            s.try_queue_declare(chan, name, options, arguments)
        })
    }

    fn try_queue_declare(
        &mut self,
        chan: u64,
        name: &str,
        options: QueueDeclareOptions,
        arguments: FieldTable,
    ) -> lapin::Result<DeclaredQueue> {
        let conn = self.conn_of(chan);
        if options.passive {
            let queue = self
                .queues
                .get(name)
                .ok_or_else(|| not_found("queue", name))?;
            queue.check_access(conn)?;
            let stats = queue.stats();
            self.touch(name);
            return Ok(stats);
        }
        let name = if name.is_empty() {
            loop {
                let generated = self.generated_name("amq.gen-");
                if !self.queues.contains_key(&generated) {
                    break generated;
                }
            }
        } else if name.starts_with("amq.") {
            return Err(access_refused(format!(
                "queue name '{name}' contains reserved prefix 'amq.*'"
            )));
        } else {
            name.to_string()
        };
        if let Some(queue) = self.queues.get(&name) {
            if queue.exclusive_owner != options.exclusive.then_some(conn) {
                return Err(resource_locked(&name));
            }
            for (key, now, new) in [
                ("durable", queue.durable, options.durable),
                ("auto_delete", queue.auto_delete, options.auto_delete),
            ] {
                if now != new {
                    return Err(inequivalent(
                        key,
                        "queue",
                        &name,
                        &format!("'{new}'"),
                        &format!("'{now}'"),
                    ));
                }
            }
            assert_equivalent(&name, &queue.arguments, &arguments)?;
            let stats = queue.stats();
            self.touch(&name);
            return Ok(stats);
        }
        let config = QueueArguments::parse(&name, &arguments)?;
        if config.queue_type.is_replicated() {
            // RabbitMQ checks a stream in another order and names exclusivity otherwise.
            let checks = if config.queue_type == QueueType::Stream {
                [
                    (options.auto_delete, "auto-delete"),
                    (options.exclusive, "exclusive-owner"),
                    (!options.durable, "non-durable"),
                ]
            } else {
                [
                    (!options.durable, "non-durable"),
                    (options.exclusive, "exclusive"),
                    (options.auto_delete, "auto-delete"),
                ]
            };
            for (bad, property) in checks {
                if bad {
                    return Err(precondition_failed(format!(
                        "invalid property '{property}' for {}",
                        resource("queue", &name)
                    )));
                }
            }
        }
        let queue = Queue {
            name: name.clone(),
            durable: options.durable,
            exclusive_owner: options.exclusive.then_some(conn),
            auto_delete: options.auto_delete,
            arguments,
            config,
            ready: Ready::default(),
            log: Vec::new(),
            consumers: Vec::new(),
            next_consumer: 0,
            had_consumer: false,
            exclusive_consumer: false,
            last_used: self.now,
        };
        let stats = queue.stats();
        self.queues.insert(name.clone(), queue);
        self.touch(&name);
        Ok(stats)
    }

    /// The queue `name`, if it exists and the channel's connection may use it.
    fn accessible_queue(&self, chan: u64, name: &str) -> lapin::Result<&Queue> {
        let queue = self
            .queues
            .get(name)
            .ok_or_else(|| not_found("queue", name))?;
        queue.check_access(self.conn_of(chan))?;
        Ok(queue)
    }

    /// Marks a queue used now; an unused queue with `x-expires` gets its deadline.
    fn touch(&mut self, name: &str) {
        let now = self.now;
        let Some(queue) = self.queues.get_mut(name) else {
            return;
        };
        queue.last_used = now;
        if let Some(expires) = queue.config.expires
            && queue.consumers.is_empty()
        {
            let at = now + Duration::from_millis(expires);
            self.push_deadline(at, Due::QueueUnused(name.to_string()));
        }
    }

    pub(super) fn queue_bind(
        &mut self,
        chan: u64,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> lapin::Result<()> {
        self.on_channel(chan, "queue.bind", |s| {
            s.check_binding(chan, queue, exchange)?;
            let Some(x) = s.exchanges.get_mut(exchange) else {
                return Err(not_found("exchange", exchange));
            };
            if x.kind == ExchangeKind::Headers {
                headers_match_kind(&arguments).map_err(|value| {
                    precondition_failed(format!(
                        "Invalid x-match field value <<\"{value}\">>; expected all, any, \
                         all-with-x, or any-with-x"
                    ))
                })?;
            }
            let exists = x.bindings.iter().any(|b| {
                b.queue == queue && b.routing_key == routing_key && b.arguments == arguments
            });
            if !exists {
                x.bindings.push(Binding {
                    queue: queue.to_string(),
                    routing_key: routing_key.to_string(),
                    arguments,
                });
            }
            Ok(())
        })
    }

    pub(super) fn queue_unbind(
        &mut self,
        chan: u64,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> lapin::Result<()> {
        self.on_channel(chan, "queue.unbind", |s| {
            s.check_binding(chan, queue, exchange)?;
            let Some(x) = s.exchanges.get_mut(exchange) else {
                return Err(not_found("exchange", exchange));
            };
            let before = x.bindings.len();
            x.bindings.retain(|b| {
                !(b.queue == queue && b.routing_key == routing_key && b.arguments == arguments)
            });
            if x.auto_delete && before > 0 && x.bindings.is_empty() {
                s.exchanges.remove(exchange);
            }
            Ok(())
        })
    }

    /// What `queue.bind` and `queue.unbind` check, in RabbitMQ's order.
    fn check_binding(&self, chan: u64, queue: &str, exchange: &str) -> lapin::Result<()> {
        if exchange.is_empty() {
            return Err(access_refused(
                "operation not permitted on the default exchange",
            ));
        }
        if !self.exchanges.contains_key(exchange) {
            return Err(not_found("exchange", exchange));
        }
        self.accessible_queue(chan, queue)?;
        Ok(())
    }

    pub(super) fn queue_purge(&mut self, chan: u64, name: &str) -> lapin::Result<u32> {
        self.on_channel(chan, "queue.purge", |s| {
            s.accessible_queue(chan, name)?;
            let purged = s.queues.get_mut(name).map_or(0, |q| q.ready.clear());
            Ok(u32::try_from(purged).unwrap_or(u32::MAX))
        })
    }

    pub(super) fn queue_delete(
        &mut self,
        chan: u64,
        name: &str,
        if_unused: bool,
        if_empty: bool,
    ) -> lapin::Result<u32> {
        self.on_channel(chan, "queue.delete", |s| {
            let Some(queue) = s.queues.get(name) else {
                return Ok(0);
            };
            queue.check_access(s.conn_of(chan))?;
            if if_unused && !queue.consumers.is_empty() {
                return Err(precondition_failed(format!(
                    "{} in use",
                    resource("queue", name)
                )));
            }
            if if_empty && !queue.ready.is_empty() {
                return Err(precondition_failed(format!(
                    "{} not empty",
                    resource("queue", name)
                )));
            }
            Ok(s.delete_queue(name))
        })
    }

    /// Deletes a queue: its consumers are cancelled (their streams end), its bindings go (and
    /// auto-delete exchanges left with none), its ready messages are dropped. Returns how many.
    fn delete_queue(&mut self, name: &str) -> u32 {
        let Some(queue) = self.queues.remove(name) else {
            return 0;
        };
        for (chan, id) in &queue.consumers {
            if let Some(chan) = self.channels.get_mut(chan) {
                // Dropping the sender ends the stream after what it already holds.
                chan.consumers.remove(id);
            }
        }
        let mut emptied = Vec::new();
        for (exchange_name, exchange) in &mut self.exchanges {
            let before = exchange.bindings.len();
            exchange.bindings.retain(|b| b.queue != name);
            if exchange.auto_delete && before > 0 && exchange.bindings.is_empty() {
                emptied.push(exchange_name.clone());
            }
        }
        for exchange in emptied {
            self.exchanges.remove(&exchange);
        }
        u32::try_from(queue.ready.len()).unwrap_or(u32::MAX)
    }

    // ----- consuming -----

    pub(super) fn basic_qos(
        &mut self,
        chan: u64,
        prefetch: u16,
        global: bool,
    ) -> lapin::Result<()> {
        self.on_channel(chan, "basic.qos", |s| {
            if let Some(c) = s.channels.get_mut(&chan) {
                if global {
                    c.global_prefetch = prefetch;
                } else {
                    c.prefetch = prefetch;
                }
            }
            Ok(())
        })
    }

    pub(super) fn basic_consume(
        &mut self,
        chan: u64,
        queue_name: &str,
        tag: &str,
        options: BasicConsumeOptions,
        arguments: &FieldTable,
    ) -> lapin::Result<NewConsumer> {
        self.on_channel(chan, "basic.consume", |s| {
            let queue = s.accessible_queue(chan, queue_name)?;
            let cursor = if queue.is_stream() {
                let prefetch = s.channels.get(&chan).map_or(0, |c| c.prefetch);
                Some(stream_cursor(queue, prefetch, options.no_ack, arguments)?)
            } else {
                None
            };
            if queue.exclusive_consumer || (options.exclusive && !queue.consumers.is_empty()) {
                return Err(access_refused(format!(
                    "{} in exclusive use",
                    resource("queue", queue_name)
                )));
            }
            let tag = if tag.is_empty() {
                s.generated_name("amq.ctag-")
            } else {
                tag.to_string()
            };
            let id = s.id();
            let Some(c) = s.channels.get_mut(&chan) else {
                return Err(channel_state(ChannelState::Closed, "basic.consume"));
            };
            if c.consumers.values().any(|slot| slot.tag == tag) {
                return Err(hard(
                    AMQPHardError::NOTALLOWED,
                    format!("attempt to reuse consumer tag '{tag}'"),
                ));
            }
            let (tx, rx) = mpsc::unbounded_channel();
            let end = ConsumerEnd::default();
            c.consumers.insert(
                id,
                Slot {
                    tag: tag.clone(),
                    queue: queue_name.to_string(),
                    no_ack: options.no_ack,
                    exclusive: options.exclusive,
                    prefetch: c.prefetch,
                    outstanding: 0,
                    cursor,
                    tx,
                    end: end.clone(),
                },
            );
            if let Some(queue) = s.queues.get_mut(queue_name) {
                queue.consumers.push((chan, id));
                queue.had_consumer = true;
                queue.exclusive_consumer = options.exclusive;
                queue.last_used = s.now;
            }
            Ok(NewConsumer { tag, rx, end })
        })
    }

    pub(super) fn basic_cancel(&mut self, chan: u64, tag: &str) -> lapin::Result<()> {
        self.on_channel(chan, "basic.cancel", |s| {
            s.cancel_consumer(chan, |_, slot| slot.tag == tag);
            Ok(())
        })
    }

    /// Removes the channel's consumers that `which` picks; their streams end once read.
    fn cancel_consumer(&mut self, chan: u64, which: impl Fn(u64, &Slot) -> bool) {
        let removed: Vec<(u64, Slot)> = match self.channels.get_mut(&chan) {
            None => return,
            Some(c) => {
                let ids: Vec<u64> = c
                    .consumers
                    .iter()
                    .filter(|(id, slot)| which(**id, slot))
                    .map(|(id, _)| *id)
                    .collect();
                ids.into_iter()
                    .filter_map(|id| c.consumers.remove(&id).map(|slot| (id, slot)))
                    .collect()
            }
        };
        for (id, slot) in removed {
            let (queue, exclusive) = (slot.queue.clone(), slot.exclusive);
            // Dropping the sender ends the stream after what it already holds.
            drop(slot);
            self.detach_consumer(&queue, chan, id, exclusive);
        }
    }

    /// Takes a consumer off its queue's list; a queue left without consumers is deleted if
    /// auto-delete, or starts its `x-expires` countdown.
    fn detach_consumer(&mut self, queue_name: &str, chan: u64, id: u64, exclusive: bool) {
        let Some(queue) = self.queues.get_mut(queue_name) else {
            return;
        };
        if let Some(index) = queue.consumers.iter().position(|c| *c == (chan, id)) {
            queue.consumers.remove(index);
            if index < queue.next_consumer {
                queue.next_consumer -= 1;
            }
        }
        if exclusive {
            queue.exclusive_consumer = false;
        }
        if queue.consumers.is_empty() {
            if queue.auto_delete && queue.had_consumer {
                self.delete_queue(queue_name);
            } else {
                self.touch(queue_name);
            }
        }
    }

    pub(super) fn basic_get(
        &mut self,
        chan: u64,
        queue_name: &str,
        no_ack: bool,
    ) -> lapin::Result<Option<(Delivery, u32)>> {
        self.on_channel(chan, "basic.get", |s| {
            if s.accessible_queue(chan, queue_name)?.is_stream() {
                return Err(hard(
                    AMQPHardError::NOTIMPLEMENTED,
                    format!(
                        "basic.get not supported by stream queues {}",
                        resource("queue", queue_name)
                    ),
                ));
            }
            s.touch(queue_name);
            let Some(queue) = s.queues.get_mut(queue_name) else {
                return Ok(None);
            };
            let Some(queued) = queue.ready.pop_front() else {
                return Ok(None);
            };
            let remaining = u32::try_from(queue.ready.len()).unwrap_or(u32::MAX);
            let Some(c) = s.channels.get_mut(&chan) else {
                return Ok(None);
            };
            let tag = c.next_tag;
            c.next_tag += 1;
            let delivery = delivery(&s.this, chan, tag, &queued);
            if !no_ack {
                c.unacked.insert(
                    tag,
                    Unacked {
                        queue: queue_name.to_string(),
                        queued,
                        consumer: None,
                    },
                );
            }
            Ok(Some((delivery, remaining)))
        })
    }

    /// `basic.ack`, `basic.nack`, `basic.reject`: settles `tag` (and, with `multiple`, every
    /// earlier unacked tag; `0` with `multiple` is all of them). An unknown tag is a channel
    /// error, as in RabbitMQ.
    pub(super) fn settle(
        &mut self,
        chan: u64,
        tag: u64,
        multiple: bool,
        how: Settle,
        context: &'static str,
    ) -> lapin::Result<()> {
        self.on_channel(chan, context, |s| {
            let Some(c) = s.channels.get_mut(&chan) else {
                return Err(channel_state(ChannelState::Closed, context));
            };
            let tags: Vec<u64> = if multiple && tag == 0 {
                c.unacked.keys().copied().collect()
            } else if !c.unacked.contains_key(&tag) {
                return Err(precondition_failed(format!("unknown delivery tag {tag}")));
            } else if multiple {
                c.unacked.range(..=tag).map(|(t, _)| *t).collect()
            } else {
                vec![tag]
            };
            let mut settled = Vec::with_capacity(tags.len());
            for t in tags {
                let Some(unacked) = c.unacked.remove(&t) else {
                    continue;
                };
                if let Some(id) = unacked.consumer {
                    c.consumer_unacked = c.consumer_unacked.saturating_sub(1);
                    if let Some(slot) = c.consumers.get_mut(&id) {
                        slot.outstanding = slot.outstanding.saturating_sub(1);
                    }
                }
                settled.push(unacked);
            }
            match how {
                Settle::Ack => {}
                Settle::Requeue => s.requeue(settled),
                Settle::Discard => {
                    // A stream keeps its messages: settling one only gives the credit back.
                    settled.retain(|u| !s.is_stream(&u.queue));
                    for unacked in settled {
                        s.dead_letter(&unacked.queue, unacked.queued.message, Reason::Rejected);
                    }
                }
            }
            Ok(())
        })
    }

    /// Puts messages back at the head of their queues, in delivery order, marked redelivered
    /// (a stream's stay in its log: nothing goes back).
    fn requeue(&mut self, unacked: Vec<Unacked>) {
        for mut u in unacked.into_iter().rev() {
            let Some(queue) = self.queues.get_mut(&u.queue) else {
                continue;
            };
            if queue.is_stream() {
                continue;
            }
            u.queued.redelivered = true;
            let expires_at = u.queued.expires_at;
            queue.ready.push_front(u.queued);
            if let Some(at) = expires_at {
                self.push_deadline(at, Due::Messages(u.queue));
            }
        }
    }

    fn is_stream(&self, queue: &str) -> bool {
        self.queues.get(queue).is_some_and(Queue::is_stream)
    }

    pub(super) fn confirm_select(&mut self, chan: u64) -> lapin::Result<()> {
        self.on_channel(chan, "confirm.select", |s| {
            if let Some(c) = s.channels.get_mut(&chan) {
                c.confirm = true;
            }
            Ok(())
        })
    }

    // ----- publishing -----

    /// `basic.publish`. The outer error is lapin's for a channel no longer open; the inner
    /// result is what the publisher confirm resolves to — an error there (no such exchange,
    /// ...) has closed the channel, as RabbitMQ's `channel.close` would.
    pub(super) fn publish(
        &mut self,
        chan: u64,
        exchange: &str,
        routing_key: &str,
        options: BasicPublishOptions,
        body: &[u8],
        properties: BasicProperties,
    ) -> lapin::Result<lapin::Result<Confirmation>> {
        let confirm = self.open_channel(chan, "basic.publish")?.confirm;
        let conn = self.conn_of(chan);
        let connection = self
            .connections
            .get(&conn)
            .map(|c| c.name.clone())
            .unwrap_or_default();
        let mut record = Published {
            connection,
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
            mandatory: options.mandatory,
            properties: properties.clone(),
            body: body.to_vec(),
            outcome: PublishOutcome::Dropped,
        };
        let targets = match self.check_publish(exchange, routing_key, options, &properties) {
            Ok(targets) => targets,
            Err(error) => {
                record.outcome = PublishOutcome::Failed(error.to_string());
                self.record(record);
                self.fail(chan, error.clone());
                return Ok(Err(error));
            }
        };
        let message = Message {
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
            properties: properties.clone(),
            body: Arc::from(body),
        };
        let mut routed = Vec::new();
        let mut rejected = Vec::new();
        for queue in targets {
            if self.enqueue(&queue, message.clone()) {
                routed.push(queue);
            } else {
                rejected.push(queue);
            }
        }
        let returned = routed.is_empty() && rejected.is_empty() && options.mandatory;
        record.outcome = if !rejected.is_empty() {
            PublishOutcome::Rejected {
                routed,
                rejected_by: rejected,
            }
        } else if !routed.is_empty() {
            PublishOutcome::Routed(routed)
        } else if returned {
            PublishOutcome::Returned
        } else {
            PublishOutcome::Dropped
        };
        let nacked = matches!(record.outcome, PublishOutcome::Rejected { .. });
        self.record(record);
        if !confirm {
            return Ok(Ok(Confirmation::NotRequested));
        }
        if nacked {
            return Ok(Ok(Confirmation::Nack(None)));
        }
        if returned {
            let mut delivery = lapin::message::Delivery::mock(
                0,
                short(exchange),
                short(routing_key),
                false,
                body.to_vec(),
            );
            delivery.properties = properties;
            return Ok(Ok(Confirmation::Ack(Some(BasicReturnMessage {
                delivery,
                reply_code: 312,
                reply_text: "NO_ROUTE".into(),
            }))));
        }
        Ok(Ok(Confirmation::Ack(None)))
    }

    /// The queues a publish goes to, or the error RabbitMQ closes the channel with.
    fn check_publish(
        &self,
        exchange: &str,
        routing_key: &str,
        options: BasicPublishOptions,
        properties: &BasicProperties,
    ) -> lapin::Result<Vec<String>> {
        if options.immediate {
            return Err(hard(AMQPHardError::NOTIMPLEMENTED, "immediate=true"));
        }
        let x = self
            .exchanges
            .get(exchange)
            .ok_or_else(|| not_found("exchange", exchange))?;
        if x.internal {
            return Err(access_refused(format!(
                "cannot publish to internal {}",
                resource("exchange", exchange)
            )));
        }
        if let Some(expiration) = properties.expiration()
            && expiration.as_str().parse::<u64>().is_err()
        {
            return Err(precondition_failed(format!(
                "invalid expiration '{expiration}': not a non-negative integer"
            )));
        }
        Ok(self.route(exchange, routing_key, properties.headers().as_ref()))
    }

    fn record(&mut self, published: Published) {
        self.journal.push(published);
        self.journal_len.send_replace(self.journal.len());
    }

    /// The queues `exchange` routes a message with `routing_key` and `headers` to, each once.
    fn route(
        &self,
        exchange: &str,
        routing_key: &str,
        headers: Option<&FieldTable>,
    ) -> Vec<String> {
        if exchange.is_empty() {
            return if self.queues.contains_key(routing_key) {
                vec![routing_key.to_string()]
            } else {
                Vec::new()
            };
        }
        let Some(x) = self.exchanges.get(exchange) else {
            return Vec::new();
        };
        let mut seen = BTreeSet::new();
        x.bindings
            .iter()
            .filter(|b| {
                binding_matches(&x.kind, &b.routing_key, &b.arguments, routing_key, headers)
            })
            .filter(|b| seen.insert(b.queue.as_str()))
            .map(|b| b.queue.clone())
            .collect()
    }

    /// Puts a message in a queue: its deadline set, handed to a waiting consumer if there is
    /// one, the queue's length limit applied. False when the queue refused it
    /// (`x-overflow = reject-publish`).
    fn enqueue(&mut self, queue_name: &str, message: Message) -> bool {
        let now = self.now;
        let appended_ms = self.unix_ms();
        let Some(queue) = self.queues.get_mut(queue_name) else {
            return false;
        };
        if queue.is_stream() {
            // Appended for good: no TTL, no length limit, no overflow.
            queue.log.push(Logged {
                message,
                appended_ms,
            });
            self.dispatch_queue(queue_name);
            return true;
        }
        let ttl = [queue.config.message_ttl, message_ttl(&message.properties)]
            .into_iter()
            .flatten()
            .min();
        let expires_at = ttl.map(|ms| now + Duration::from_millis(ms));
        if queue.config.overflow != Overflow::DropHead && queue.is_full_for(message.body.len()) {
            if queue.config.overflow == Overflow::RejectPublishDlx
                && let Some(dead) = queue.death(message, Reason::MaxLen)
            {
                self.dead.push_back(dead);
            }
            return false;
        }
        queue.ready.push_back(Queued {
            message,
            redelivered: false,
            expires_at,
        });
        if let Some(at) = expires_at {
            self.push_deadline(at, Due::Messages(queue_name.to_string()));
        }
        self.dispatch_queue(queue_name);
        if let Some(queue) = self.queues.get_mut(queue_name) {
            while queue.is_over_limit() {
                let Some(oldest) = queue.ready.pop_front() else {
                    break;
                };
                if let Some(dead) = queue.death(oldest.message, Reason::MaxLen) {
                    self.dead.push_back(dead);
                }
            }
        }
        true
    }

    // ----- dead letters -----

    /// Sends a message leaving `queue_name` for `reason` to the queue's dead-letter exchange,
    /// or drops it when the queue has none (or is gone).
    fn dead_letter(&mut self, queue_name: &str, message: Message, reason: Reason) {
        if let Some(dead) = self
            .queues
            .get(queue_name)
            .and_then(|q| q.death(message, reason))
        {
            self.dead.push_back(dead);
        }
    }

    /// Routes a dead letter: `x-death` updated, `expiration` removed, published to the
    /// dead-letter exchange with the dead-letter routing key (or the message's own). A missing
    /// exchange drops it; so does a fully automatic cycle (RabbitMQ's rule: back to a queue it
    /// died in, with no rejection on the way).
    fn route_dead_letter(&mut self, dead: DeadLetter) {
        if !self.exchanges.contains_key(&dead.exchange) {
            tracing::debug!(
                queue = dead.queue,
                exchange = dead.exchange,
                "dead-letter exchange missing; message dropped"
            );
            return;
        }
        let routing_key = dead
            .routing_key
            .clone()
            .unwrap_or_else(|| dead.message.routing_key.clone());
        let properties = record_death(
            &dead.message.properties,
            &dead.queue,
            dead.reason.as_str(),
            &dead.message.exchange,
            &[dead.message.routing_key.as_str()],
            unix_time(),
        );
        let mut targets = self.route(&dead.exchange, &routing_key, properties.headers().as_ref());
        if dead.reason != Reason::Rejected {
            let deaths = deaths(&properties);
            targets.retain(|queue| !is_cycle(queue, &deaths));
        }
        let message = Message {
            exchange: dead.exchange,
            routing_key,
            properties,
            body: dead.message.body,
        };
        for queue in targets {
            self.enqueue(&queue, message.clone());
        }
    }

    // ----- delivering -----

    /// Routes pending dead letters and delivers ready messages until nothing moves.
    fn run(&mut self) {
        let mut routed = 0usize;
        loop {
            while let Some(dead) = self.dead.pop_front() {
                routed += 1;
                if routed > MAX_DEAD_LETTERS_PER_RUN {
                    tracing::warn!(
                        dropped = self.dead.len() + 1,
                        "in-memory broker: dead-letter loop; dropping the rest"
                    );
                    self.dead.clear();
                    break;
                }
                self.route_dead_letter(dead);
            }
            let names: Vec<String> = self
                .queues
                .values()
                .filter(|q| (!q.ready.is_empty() || q.is_stream()) && !q.consumers.is_empty())
                .map(|q| q.name.clone())
                .collect();
            for name in names {
                self.dispatch_queue(&name);
            }
            if self.dead.is_empty() {
                return;
            }
        }
    }

    /// Hands a queue's ready messages, oldest first, round-robin to its consumers with room.
    fn dispatch_queue(&mut self, name: &str) {
        let now = self.now;
        let mut gone = Vec::new();
        let State {
            queues,
            channels,
            dead,
            this,
            ..
        } = self;
        let Some(queue) = queues.get_mut(name) else {
            return;
        };
        if queue.is_stream() {
            gone = dispatch_stream(queue, channels, this);
        }
        while let Some(head) = queue.ready.messages.front() {
            // Expired before this operation began (a requeued message past its time).
            if head.expires_at.is_some_and(|at| at < now) {
                if let Some(expired) = queue.ready.pop_front()
                    && let Some(letter) = queue.death(expired.message, Reason::Expired)
                {
                    dead.push_back(letter);
                }
                continue;
            }
            let count = queue.consumers.len();
            let mut chosen = None;
            for i in 0..count {
                let index = (queue.next_consumer + i) % count;
                let (chan_id, id) = queue.consumers[index];
                let Some(chan) = channels.get(&chan_id) else {
                    continue;
                };
                let Some(slot) = chan.consumers.get(&id) else {
                    continue;
                };
                if slot.tx.is_closed() {
                    if !gone.contains(&(chan_id, id)) {
                        gone.push((chan_id, id));
                    }
                    continue;
                }
                let global_room = chan.global_prefetch == 0
                    || slot.no_ack
                    || chan.consumer_unacked < u32::from(chan.global_prefetch);
                if slot.has_room() && global_room {
                    chosen = Some((index, chan_id, id));
                    break;
                }
            }
            let Some((index, chan_id, id)) = chosen else {
                break;
            };
            let (Some(queued), Some(chan)) = (queue.ready.pop_front(), channels.get_mut(&chan_id))
            else {
                break;
            };
            let Some(slot) = chan.consumers.get_mut(&id) else {
                break;
            };
            queue.next_consumer = index + 1;
            let tag = chan.next_tag;
            chan.next_tag += 1;
            let delivery = delivery(this, chan_id, tag, &queued);
            if let Err(refused) = slot.tx.send(delivery) {
                // The stream was dropped just now: the message goes back, the consumer goes.
                drop(refused);
                queue.ready.push_front(queued);
                gone.push((chan_id, id));
                continue;
            }
            if !slot.no_ack {
                slot.outstanding += 1;
                chan.consumer_unacked += 1;
                chan.unacked.insert(
                    tag,
                    Unacked {
                        queue: name.to_string(),
                        queued,
                        consumer: Some(id),
                    },
                );
            }
        }
        // A consumer whose stream was dropped is cancelled, as if it had asked.
        for (chan, id) in gone {
            self.cancel_consumer(chan, |candidate, _| candidate == id);
        }
    }

    // ----- time -----

    fn push_deadline(&mut self, at: Instant, what: Due) {
        let seq = self.id();
        let sooner = self
            .deadlines
            .peek()
            .is_none_or(|Reverse(first)| at < first.at);
        self.deadlines.push(Reverse(Deadline { at, seq, what }));
        if self.timer.as_ref().is_none_or(JoinHandle::is_finished)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            self.timer = Some(runtime.spawn(timer(self.this.clone(), self.wake.clone())));
        }
        if sooner {
            self.wake.notify_one();
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.peek().map(|Reverse(first)| first.at)
    }

    /// Expires what is due at [`State::now`]: messages past their TTL (any position in the
    /// queue, not only the head) and queues unused for their `x-expires`; whether any
    /// deadline came due.
    fn expire_due(&mut self) -> bool {
        let now = self.now;
        let mut message_queues = BTreeSet::new();
        let mut unused_queues = BTreeSet::new();
        let due = self
            .deadlines
            .peek()
            .is_some_and(|Reverse(first)| first.at <= now);
        while self
            .deadlines
            .peek()
            .is_some_and(|Reverse(first)| first.at <= now)
        {
            let Some(Reverse(due)) = self.deadlines.pop() else {
                break;
            };
            match due.what {
                Due::Messages(queue) => message_queues.insert(queue),
                Due::QueueUnused(queue) => unused_queues.insert(queue),
            };
        }
        for name in message_queues {
            let Some(queue) = self.queues.get_mut(&name) else {
                continue;
            };
            for expired in queue.ready.take_expired(now) {
                if let Some(dead) = queue.death(expired.message, Reason::Expired) {
                    self.dead.push_back(dead);
                }
            }
        }
        for name in unused_queues {
            let expired = self.queues.get(&name).is_some_and(|q| {
                q.consumers.is_empty()
                    && q.config
                        .expires
                        .is_some_and(|ms| q.last_used + Duration::from_millis(ms) <= now)
            });
            if expired {
                self.delete_queue(&name);
            }
        }
        due
    }

    // ----- inspection -----

    pub(super) fn queue_stats(&self, name: &str) -> Option<QueueStats> {
        let queue = self.queues.get(name)?;
        let unacked = self
            .channels
            .values()
            .flat_map(|c| c.unacked.values())
            .filter(|u| u.queue == name)
            .count();
        let ready = if queue.is_stream() {
            // What the furthest-behind consumer has yet to get (the log stays whole).
            queue
                .consumers
                .iter()
                .filter_map(|(chan, id)| self.channels.get(chan)?.consumers.get(id)?.cursor)
                .map(|cursor| queue.log.len().saturating_sub(cursor))
                .max()
                .unwrap_or(0)
        } else {
            queue.ready.len()
        };
        Some(QueueStats {
            ready,
            unacked,
            consumers: queue.consumers.len(),
        })
    }

    pub(super) fn queue_names(&self) -> Vec<String> {
        self.queues.keys().cloned().collect()
    }

    pub(super) fn exchange_list(&self) -> Vec<(String, ExchangeKind)> {
        self.exchanges
            .iter()
            .map(|(name, x)| (name.clone(), x.kind.clone()))
            .collect()
    }

    pub(super) fn bindings_of(&self, exchange: &str) -> Vec<(String, String)> {
        self.exchanges.get(exchange).map_or_else(Vec::new, |x| {
            x.bindings
                .iter()
                .map(|b| (b.queue.clone(), b.routing_key.clone()))
                .collect()
        })
    }

    pub(super) fn journal(&self) -> &[Published] {
        &self.journal
    }

    pub(super) fn subscribe_journal(&self) -> watch::Receiver<usize> {
        self.journal_len.subscribe()
    }

    pub(super) fn peek(&self, name: &str) -> Vec<(BasicProperties, Vec<u8>)> {
        self.queues.get(name).map_or_else(Vec::new, |q| {
            if q.is_stream() {
                return q
                    .log
                    .iter()
                    .map(|m| (m.message.properties.clone(), m.message.body.to_vec()))
                    .collect();
            }
            q.ready
                .messages
                .iter()
                .map(|m| (m.message.properties.clone(), m.message.body.to_vec()))
                .collect()
        })
    }
}

/// The timer: sleeps until the next deadline (or until a sooner one is set), then lets the
/// broker expire what is due. Ends when the broker is dropped.
async fn timer(shared: Weak<Shared>, wake: Arc<Notify>) {
    loop {
        let next = match shared.upgrade() {
            Some(shared) => shared.operate(|state| state.next_deadline()),
            None => return,
        };
        match next {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

fn delivery(this: &Weak<Shared>, chan: u64, tag: u64, queued: &Queued) -> Delivery {
    let message = &queued.message;
    Delivery {
        delivery_tag: tag,
        exchange: short(&message.exchange),
        routing_key: short(&message.routing_key),
        redelivered: queued.redelivered,
        properties: message.properties.clone(),
        data: message.body.to_vec(),
        acker: Acker::new(this.clone(), chan, tag),
    }
}

/// Where a new consumer of `queue`, a stream, starts: the offset its `x-stream-offset`
/// argument names (`next` without one), or RabbitMQ's refusal — a stream consumer needs a
/// prefetch and manual acks.
fn stream_cursor(
    queue: &Queue,
    prefetch: u16,
    no_ack: bool,
    arguments: &FieldTable,
) -> lapin::Result<usize> {
    if prefetch == 0 {
        return Err(precondition_failed(format!(
            "consumer prefetch count is not set for '{}'",
            resource("queue", &queue.name)
        )));
    }
    if no_ack {
        return Err(hard(
            AMQPHardError::NOTIMPLEMENTED,
            format!(
                "automatic acknowledgement not supported by stream queues {}",
                resource("queue", &queue.name)
            ),
        ));
    }
    let len = queue.log.len();
    let Some(value) = arguments.inner().get("x-stream-offset") else {
        return Ok(len);
    };
    let cursor = match value {
        AMQPValue::Timestamp(seconds) => {
            let from_ms = u128::from(*seconds) * 1000;
            queue.log.partition_point(|m| m.appended_ms < from_ms)
        }
        other => match (
            super::routing::string(other),
            super::routing::integer(other),
        ) {
            (Some(text), _) if text == "first" => 0,
            (Some(text), _) if text == "last" => len.saturating_sub(1),
            (Some(text), _) if text == "next" => len,
            (_, Some(offset)) => usize::try_from(offset.max(0)).map_or(len, |o| o.min(len)),
            _ => {
                return Err(precondition_failed(format!(
                    "Invalid stream offset arg: {}",
                    super::routing::describe(Some(other))
                )));
            }
        },
    };
    Ok(cursor)
}

/// Hands each consumer of `queue`, a stream, the messages from its cursor on while it has
/// room, each with its offset in the header `x-stream-offset`. Every consumer reads every
/// message. Returns the consumers whose stream was dropped.
fn dispatch_stream(
    queue: &Queue,
    channels: &mut HashMap<u64, Chan>,
    this: &Weak<Shared>,
) -> Vec<(u64, u64)> {
    let mut gone = Vec::new();
    for &(chan_id, id) in &queue.consumers {
        let Some(chan) = channels.get_mut(&chan_id) else {
            continue;
        };
        let Chan {
            consumers,
            unacked,
            next_tag,
            consumer_unacked,
            global_prefetch,
            ..
        } = chan;
        let Some(slot) = consumers.get_mut(&id) else {
            continue;
        };
        while let Some(cursor) = slot.cursor
            && let Some(logged) = queue.log.get(cursor)
            && slot.has_room()
            && (*global_prefetch == 0 || *consumer_unacked < u32::from(*global_prefetch))
        {
            let mut properties = logged.message.properties.clone();
            let mut headers = properties.headers().clone().unwrap_or_default();
            headers.insert(
                "x-stream-offset".into(),
                AMQPValue::LongLongInt(i64::try_from(cursor).unwrap_or(i64::MAX)),
            );
            properties = properties.with_headers(headers);
            let queued = Queued {
                message: Message {
                    properties,
                    ..logged.message.clone()
                },
                redelivered: false,
                expires_at: None,
            };
            let tag = *next_tag;
            if slot.tx.send(delivery(this, chan_id, tag, &queued)).is_err() {
                gone.push((chan_id, id));
                break;
            }
            *next_tag += 1;
            slot.cursor = Some(cursor + 1);
            slot.outstanding += 1;
            *consumer_unacked += 1;
            unacked.insert(
                tag,
                Unacked {
                    queue: queue.name.clone(),
                    queued,
                    consumer: Some(id),
                },
            );
        }
    }
    gone
}

/// splitmix64's finaliser: a bijection, so distinct inputs give distinct names.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn kind_name(kind: &ExchangeKind) -> &str {
    match kind {
        ExchangeKind::Custom(name) => name,
        ExchangeKind::Direct => "direct",
        ExchangeKind::Fanout => "fanout",
        ExchangeKind::Headers => "headers",
        ExchangeKind::Topic => "topic",
    }
}

/// A message's own TTL in milliseconds, from its `expiration` property.
fn message_ttl(properties: &BasicProperties) -> Option<u64> {
    properties
        .expiration()
        .as_ref()
        .and_then(|e| e.as_str().parse().ok())
}
