//! The broker handle: where connections come from, and what a test kit reads back (queues,
//! exchanges, the journal of every publish) or does to it (break every connection).

use std::sync::{Arc, Weak};

use lapin::{BasicProperties, ExchangeKind};
use tokio::sync::watch;

use super::client::Connection;
use super::error::connection_killed;
use super::state::Shared;

/// An in-memory AMQP 0-9-1 broker: one vhost, `/`. Cheap to clone; clones are the same
/// broker. Dropping the last handle (and every connection) ends it.
#[derive(Clone)]
pub struct Broker {
    shared: Arc<Shared>,
}

/// A broker that may have ended (the registry of named brokers holds these).
pub(crate) struct WeakBroker(Weak<Shared>);

impl WeakBroker {
    pub fn upgrade(&self) -> Option<Broker> {
        self.0.upgrade().map(|shared| Broker { shared })
    }

    pub fn is_alive(&self) -> bool {
        self.0.strong_count() > 0
    }
}

impl Default for Broker {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("queues", &self.queues())
            .field("connections", &self.connections())
            .finish()
    }
}

/// A queue's counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueStats {
    /// Messages waiting for a consumer; for a stream, those its furthest-behind consumer has
    /// yet to get (0 without consumers: a stream's messages stay, see [`Broker::peek`]).
    pub ready: usize,
    /// Messages delivered and not yet settled.
    pub unacked: usize,
    pub consumers: usize,
}

/// One `basic.publish`, as the broker received it, and what became of it.
#[derive(Clone, Debug)]
pub struct Published {
    /// The name of the publishing connection.
    pub connection: String,
    pub exchange: String,
    pub routing_key: String,
    pub mandatory: bool,
    pub properties: BasicProperties,
    pub body: Vec<u8>,
    pub outcome: PublishOutcome,
}

/// What became of a publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PublishOutcome {
    /// Put in these queues.
    Routed(Vec<String>),
    /// Mandatory, and no queue took it: returned to the publisher (312 NO_ROUTE).
    Returned,
    /// Not mandatory, and no queue took it: gone.
    Dropped,
    /// Some queue refused it (`x-overflow = reject-publish`): nacked.
    Rejected {
        routed: Vec<String>,
        rejected_by: Vec<String>,
    },
    /// The publish failed with this channel error (no such exchange, ...).
    Failed(String),
}

impl Broker {
    /// Changes with every operation on the broker (a publish, an ack, an expiry, ...).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.shared.changes()
    }

    pub(crate) fn downgrade(&self) -> WeakBroker {
        WeakBroker(Arc::downgrade(&self.shared))
    }

    pub fn new() -> Self {
        Self {
            shared: Shared::new(),
        }
    }

    /// A new connection; `name` is what RabbitMQ shows as its `connection_name`.
    pub fn connect(&self, name: &str) -> Connection {
        let (id, closed) = self.shared.operate(|s| s.connect(name));
        Connection::new(self.shared.clone(), id, name.to_string(), closed)
    }

    /// Closes every open connection as a network failure would: their consumers' streams
    /// yield an IO error then end, their channels and they turn to the `Error` state,
    /// their unacked messages are requeued and their exclusive queues deleted.
    pub fn kill_connections(&self) {
        self.shared.operate(|s| {
            for (id, _) in s.open_connections() {
                s.close_connection(id, Some(connection_killed()));
            }
        });
    }

    /// As [`Broker::kill_connections`], for the open connections named `name`; how many.
    pub fn kill_connection(&self, name: &str) -> usize {
        self.shared.operate(|s| {
            let named: Vec<u64> = s
                .open_connections()
                .into_iter()
                .filter(|(_, n)| n == name)
                .map(|(id, _)| id)
                .collect();
            for id in &named {
                s.close_connection(*id, Some(connection_killed()));
            }
            named.len()
        })
    }

    /// The names of the open connections.
    pub fn connections(&self) -> Vec<String> {
        self.shared
            .lock()
            .open_connections()
            .into_iter()
            .map(|(_, name)| name)
            .collect()
    }

    /// The counts of queue `queue`, `None` if it does not exist.
    ///
    /// Expiries due happen first; the look itself does not move [`Broker::changes`], so a
    /// loop that reads the depth after each change waits (and lets a paused clock advance)
    /// rather than waking itself forever.
    pub fn queue_depth(&self, queue: &str) -> Option<QueueStats> {
        self.shared.look(|s| s.queue_stats(queue))
    }

    /// The queues, by name.
    pub fn queues(&self) -> Vec<String> {
        self.shared.operate(|s| s.queue_names())
    }

    /// The exchanges, by name, the default one (`""`) and the `amq.*` ones included.
    pub fn exchanges(&self) -> Vec<(String, ExchangeKind)> {
        self.shared.lock().exchange_list()
    }

    /// The bindings of `exchange` as (queue, routing key).
    pub fn bindings(&self, exchange: &str) -> Vec<(String, String)> {
        self.shared.lock().bindings_of(exchange)
    }

    /// Every publish so far, in order.
    pub fn journal(&self) -> Vec<Published> {
        self.shared.lock().journal().to_vec()
    }

    /// The journal's length, changed by every publish: `changed().await` waits for the next.
    pub fn published(&self) -> watch::Receiver<usize> {
        self.shared.lock().subscribe_journal()
    }

    /// The first publish in the journal, from entry `from` on, that `matches`; waits for it
    /// if there is none yet (bound it with `tokio::time::timeout`). Returns its index too, so
    /// the next wait can start after it.
    pub async fn wait_for_publish(
        &self,
        from: usize,
        matches: impl Fn(&Published) -> bool,
    ) -> (usize, Published) {
        let mut published = self.published();
        let mut next = from;
        loop {
            {
                let state = self.shared.lock();
                let journal = state.journal();
                if let Some((offset, found)) = journal
                    .iter()
                    .enumerate()
                    .skip(next)
                    .find(|(_, p)| matches(p))
                {
                    return (offset, found.clone());
                }
                next = next.max(journal.len());
                published.mark_unchanged();
            }
            if published.changed().await.is_err() {
                // The broker is gone; nothing more will be published.
                std::future::pending::<()>().await;
            }
        }
    }

    /// The ready messages of `queue`, oldest first, left in place (a stream's: its whole log).
    pub fn peek(&self, queue: &str) -> Vec<(BasicProperties, Vec<u8>)> {
        self.shared.operate(|s| s.peek(queue))
    }
}
