//! What a task that consumes a queue needs of the transport: the connection it starts on, its
//! channel with a prefetch, the consumer, how it is let go, and why it stopped. Shared by the
//! handler kinds that consume (`consume`, the RPC server).

use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;

use super::transport::{Channel, Connection, Consumer};
use tokio_util::sync::CancellationToken;

use super::connection::{ConnectError, Connector};
use super::error::{BrokerError, Resource};
use super::publisher::Publisher;

/// Why a consumer stopped (the supervisor restarts it).
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("the broker cancelled the consumer or closed its channel")]
    Ended,
    #[error("the broker did not answer within {0:?} while the consumer was set up")]
    Timeout(Duration),
    /// A stream consumer's saved position could not be read.
    #[error("the stream's position could not be read from the database: {0}")]
    Checkpoint(String),
    /// The connection went away under the consumer: it resumes once farine reconnected.
    #[error("the connection to the broker was lost: {0}")]
    ConnectionLost(String),
}

impl ConsumeError {
    /// True when the task stopped because the connection went away, not through a fault of
    /// its own: the supervisor does not count it against the restart limit.
    pub(crate) fn connection_lost(&self) -> bool {
        matches!(self, ConsumeError::ConnectionLost(_))
    }

    /// True when the task stopped because the broker went away (the error says so, or the
    /// connection of `connector` is down now): an outage, not the task's fault. Refused
    /// credentials and a bad URI are no outage: they count, so the service fails in the end.
    pub(crate) fn is_outage(&self, connector: &Connector) -> bool {
        match self {
            ConsumeError::Connect(ConnectError::LoginRefused { .. } | ConnectError::BadUri(_)) => {
                false
            }
            other => other.connection_lost() || !connector.is_connected(),
        }
    }

    /// This error, or `ConnectionLost` when the connection `conn` is no longer open: only the
    /// connection's state says so, not the error's kind (a channel error on a live connection
    /// is the task's own failure).
    pub(crate) fn on(self, conn: &Connection) -> Self {
        if conn.is_connected() || self.connection_lost() {
            self
        } else {
            ConsumeError::ConnectionLost(self.to_string())
        }
    }
}

/// The connection a consuming task starts on: on its first start (`first`) one round of
/// attempts (a broker that is down fails start-up), on a restart as long as it takes to
/// reconnect; `None` when the process stops meanwhile.
pub(crate) async fn connection_for(
    connector: &Connector,
    first: bool,
    shutdown: &CancellationToken,
) -> Result<Option<Arc<Connection>>, ConsumeError> {
    if first {
        return Ok(Some(connector.connection().await?));
    }
    tokio::select! {
        conn = connector.connection_until(None) => Ok(Some(conn?)),
        _ = shutdown.cancelled() => Ok(None),
    }
}

/// How a consuming task's channel is let go: the consumer cancelled first (no new deliveries)
/// on a clean stop, then, once the calls in flight are done (`handler::InFlight::drain`), its
/// publisher and channel closed; the broker requeues whatever was not settled. Every broker
/// round trip is bounded by `op_timeout`.
pub(crate) struct WindDown<'a> {
    pub service: &'static str,
    pub handler: &'static str,
    pub channel: &'a Channel,
    pub op_timeout: Duration,
}

impl WindDown<'_> {
    /// Cancels the consumer `tag`: the broker delivers nothing more on it.
    pub async fn cancel(&self, tag: lapin::types::ShortString) {
        let cancel = self
            .channel
            .basic_cancel(tag, BasicCancelOptions::default());
        if let Ok(Err(e)) = tokio::time::timeout(self.op_timeout, cancel).await {
            tracing::debug!(service = self.service, handler = self.handler, error = %e, "cancelling the consumer");
        }
    }

    /// Closes `publisher` and the channel.
    pub async fn close(&self, publisher: &Publisher) {
        publisher.close_within(self.op_timeout).await;
        if self.channel.is_connected() {
            let close = self.channel.close(200, "farine handler stopped");
            let _ = tokio::time::timeout(self.op_timeout, close).await;
        }
    }
}

/// Opens a channel with `basic.qos(prefetch)` on `conn` (a connection to `broker`).
pub(crate) async fn open_channel(
    conn: &Connection,
    broker: &str,
    prefetch: u16,
) -> Result<Channel, BrokerError> {
    let channel_err = |e: lapin::Error| BrokerError::from_lapin(&e, Resource::Channel, broker);
    let channel = conn.create_channel().await.map_err(channel_err)?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(channel_err)?;
    Ok(channel)
}

/// Starts consuming `queue` on `channel`.
pub(crate) async fn basic_consume(
    channel: &Channel,
    broker: &str,
    queue: &str,
) -> Result<Consumer, BrokerError> {
    basic_consume_with(channel, broker, queue, FieldTable::default()).await
}

/// Starts consuming `queue` on `channel` with consumer `arguments` (a stream's
/// `x-stream-offset`).
pub(crate) async fn basic_consume_with(
    channel: &Channel,
    broker: &str,
    queue: &str,
    arguments: FieldTable,
) -> Result<Consumer, BrokerError> {
    channel
        .basic_consume(queue, "", BasicConsumeOptions::default(), arguments)
        .await
        .map_err(|e| BrokerError::from_lapin(&e, Resource::Queue(queue.to_string()), broker))
}
