//! The AMQP connection of a process: opened once, shared by every handler, reopened when lost.
//!
//! lapin's own auto-recovery is left off (it has open bugs); farine owns reconnection: a handler
//! whose channel breaks is restarted by the supervisor, asks the [`Connector`] for a connection,
//! and the connector opens a new one when the old one is gone.

use std::sync::Arc;
use std::time::Duration;

use lapin::{Connection, ConnectionProperties};

use crate::config::redact::redact_uri;

/// A failure to reach the broker. Never contains the password.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to AMQP broker {uri}: {cause}")]
    Failed { uri: String, cause: String },
    #[error("cannot connect to AMQP broker {uri}: no answer within {after:?}")]
    Timeout { uri: String, after: Duration },
}

/// Opens and hands out the connection to one broker URI.
pub struct Connector {
    uri: String,
    name: String,
    timeout: Duration,
    current: tokio::sync::Mutex<Option<Arc<Connection>>>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("uri", &self.display_uri())
            .field("name", &self.name)
            .finish()
    }
}

impl Connector {
    /// A connector for `uri`; `name` is shown by the broker (management UI, `rabbitmqctl`).
    pub fn new(uri: impl Into<String>, name: impl Into<String>, timeout: Duration) -> Self {
        Self {
            uri: uri.into(),
            name: name.into(),
            timeout,
            current: tokio::sync::Mutex::new(None),
        }
    }

    /// The URI with its password masked, for logs and errors.
    pub fn display_uri(&self) -> String {
        redact_uri(&self.uri)
    }

    /// The open connection, opening one when there is none or the last one broke.
    pub async fn connection(&self) -> Result<Arc<Connection>, ConnectError> {
        let mut current = self.current.lock().await;
        if let Some(conn) = current.as_ref()
            && conn.status().connected()
        {
            return Ok(conn.clone());
        }
        let properties = ConnectionProperties::default()
            .with_connection_name(self.name.as_str().into())
            .with_client_property("product".into(), "farine".into())
            .with_client_property("version".into(), env!("CARGO_PKG_VERSION").into());
        let opened = tokio::time::timeout(self.timeout, Connection::connect(&self.uri, properties))
            .await
            .map_err(|_| ConnectError::Timeout {
                uri: self.display_uri(),
                after: self.timeout,
            })?
            .map_err(|e| ConnectError::Failed {
                uri: self.display_uri(),
                cause: redact_uri(&e.to_string()),
            })?;
        let conn = Arc::new(opened);
        tracing::info!(broker = %self.display_uri(), connection = %self.name, "connected to AMQP broker");
        *current = Some(conn.clone());
        Ok(conn)
    }

    /// Closes the connection, when one is open, waiting at most the connect timeout.
    pub async fn close(&self) {
        let conn = self.current.lock().await.take();
        if let Some(conn) = conn
            && conn.status().connected()
        {
            let close = conn.close(200, "farine shutting down".into());
            match tokio::time::timeout(self.timeout, close).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "closing the AMQP connection"),
                Err(_) => {
                    tracing::warn!(broker = %self.display_uri(), "the broker did not acknowledge the close in time")
                }
            }
        }
    }
}
