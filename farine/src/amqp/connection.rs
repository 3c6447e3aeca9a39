//! The AMQP connection of a process: opened once, shared by every handler, reopened when lost.
//!
//! lapin's own auto-recovery is left off (it has open bugs); farine owns reconnection. A
//! [`Connector`] holds the broker's nodes (`amqp_uri` may list several), picks one with its
//! [`NodeSelector`], and hands out the open connection. When the connection breaks (the broker
//! restarted, the network was cut, heartbeats stopped), every handler whose channel died asks
//! the connector again: the first one dials, with backoff from `amqp_reconnect_delay` to
//! `amqp_reconnect_delay_max`, moving on to the next node after each failure, and the others wait
//! for it. Each handler then declares its topology again and resumes (`docs/reliability.md`).

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::ConnectionProperties;
use lapin::tcp::OwnedTLSConfig;
use lapin::uri::AMQPUri;

use super::transport::Connection;
use tokio_util::sync::CancellationToken;

use super::error::{BrokerError, Resource};
use crate::config::redact::redact_uri;

/// A failure to reach the broker. Never contains the password.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// Every node refused or failed; `causes` has one entry per node, naming its host and port.
    #[error("cannot connect to AMQP broker {}", .causes.join("; "))]
    Failed { causes: Vec<String> },
    /// The broker refused the credentials (403 ACCESS_REFUSED at login).
    #[error("AMQP broker {broker} refused the login of user `{user}`: {text}")]
    LoginRefused {
        broker: String,
        user: String,
        text: String,
    },
    /// The `amqp_uri` text is not a list of AMQP URIs.
    #[error("{0}")]
    BadUri(String),
    /// The runtime is stopping: no connection is opened any more.
    #[error("the connection to the AMQP broker is closed: farine is stopping")]
    Closed,
}

impl From<ConnectError> for BrokerError {
    fn from(error: ConnectError) -> Self {
        match error {
            ConnectError::LoginRefused { broker, text, .. } => BrokerError::AccessRefused {
                resource: Resource::Broker(broker),
                text,
            },
            ConnectError::Failed { ref causes } => BrokerError::ConnectionBroken {
                broker: causes
                    .iter()
                    .filter_map(|c| c.split(": ").next())
                    .collect::<Vec<_>>()
                    .join(", "),
                cause: error.to_string(),
            },
            other => BrokerError::ConnectionBroken {
                broker: String::new(),
                cause: other.to_string(),
            },
        }
    }
}

/// How the node of a multi-node `amqp_uri` is chosen (`amqp_node_selector`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NodeSelector {
    /// The nodes in the order listed: the first is preferred; after a failure the next one is
    /// tried, round the list.
    #[default]
    InOrder,
    /// A random order for each round of attempts: spreads the services over the cluster.
    Random,
}

impl FromStr for NodeSelector {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "in_order" => Ok(NodeSelector::InOrder),
            "random" => Ok(NodeSelector::Random),
            _ => Err("one of in_order, random".to_string()),
        }
    }
}

/// How a [`Connector`] connects.
#[derive(Debug, Clone)]
pub struct ConnectorSettings {
    /// The bound on opening the connection to one node.
    pub connect_timeout: Duration,
    /// The heartbeat proposed to the broker, in seconds (`amqp_heartbeat`; a URI's
    /// `?heartbeat=` wins); the connection is dropped after two silent intervals.
    pub heartbeat: u16,
    pub selector: NodeSelector,
    /// Backoff between rounds of reconnection attempts: from `amqp_reconnect_delay`, doubling,
    /// up to `amqp_reconnect_delay_max`.
    pub reconnect_delay: Duration,
    pub reconnect_delay_max: Duration,
    /// PEM certificates to trust for `amqps://` beside the system's (`amqp_tls_ca_file`).
    pub tls_ca: Option<String>,
}

impl Default for ConnectorSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            heartbeat: 10,
            selector: NodeSelector::InOrder,
            reconnect_delay: Duration::from_millis(100),
            reconnect_delay_max: Duration::from_secs(5),
            tls_ca: None,
        }
    }
}

/// One broker node of `amqp_uri`.
#[derive(Clone)]
struct Node {
    uri: AMQPUri,
    /// `host:port`, for logs and errors.
    addr: String,
    /// The in-memory broker of this name (`memory://<name>`) instead of `uri`.
    memory: Option<String>,
}

/// The name of the in-memory broker `text` names (`memory://<name>`, the test kit's), if it
/// names one.
pub(crate) fn memory_name(text: &str) -> Option<&str> {
    text.trim()
        .strip_prefix("memory://")
        .filter(|name| !name.is_empty() && !name.contains([',', ' ', '\t', '\n']))
}

/// Splits `amqp_uri` into its nodes: URIs separated by commas or whitespace. A comma that is
/// not followed by `amqp://` or `amqps://` belongs to the URI (a password may hold one).
/// The name of this program: its executable's file name (what `ps` shows), else `farine`.
pub(crate) fn program_name() -> String {
    std::env::current_exe()
        .ok()
        .or_else(|| std::env::args_os().next().map(Into::into))
        .and_then(|path| {
            path.file_stem()
                .map(|stem| stem.to_string_lossy().into_owned())
        })
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "farine".to_string())
}

/// The name a connection shows in the broker (management UI, `rabbitmqctl list_connections`):
/// the program first, then what the connection is for: `shop: billing, shipping (farine, pid 42)`.
pub(crate) fn connection_name(program: &str, purpose: &str) -> String {
    format!("{program}: {purpose} (farine, pid {})", std::process::id())
}

pub fn parse_nodes(text: &str) -> Result<Vec<AMQPUri>, String> {
    let mut nodes: Vec<String> = Vec::new();
    for piece in text.split(',').flat_map(str::split_whitespace) {
        let starts_node = piece.starts_with("amqp://") || piece.starts_with("amqps://");
        match nodes.last_mut() {
            Some(last) if !starts_node => {
                last.push(',');
                last.push_str(piece);
            }
            _ => nodes.push(piece.to_string()),
        }
    }
    if nodes.is_empty() {
        return Err("no AMQP URI given".to_string());
    }
    nodes
        .iter()
        .enumerate()
        .map(|(index, node)| {
            // Named by position: the text may hold a password.
            // amq-protocol-uri quotes the text it could not read: never echo it (it may hold
            // a password where farine cannot find it).
            let uri = AMQPUri::from_str(node).map_err(|e| {
                let cause = e.to_string().replace(node.as_str(), "<the URI>");
                format!(
                    "node {} is not an AMQP URI: {}",
                    index + 1,
                    redact_uri(&cause)
                )
            })?;
            // AMQP sends the vhost as a short string (at most 255 bytes).
            if uri.vhost.len() > 255 {
                return Err(format!(
                    "node {}: the vhost is {} bytes long; AMQP allows at most 255",
                    index + 1,
                    uri.vhost.len()
                ));
            }
            Ok(uri)
        })
        .collect()
}

struct State {
    current: Option<Arc<Connection>>,
    /// Whether a connection was ever opened: the next one is a reconnection, however many
    /// rounds failed in between.
    connected_once: bool,
    /// The node to try first in the next round.
    next: usize,
}

/// Opens and hands out the connection to one broker (one or several nodes).
pub struct Connector {
    text: String,
    nodes: Result<Vec<Node>, String>,
    name: String,
    settings: ConnectorSettings,
    state: tokio::sync::Mutex<State>,
    /// `host:port` of the node connected last (or being tried), for errors.
    broker: Mutex<String>,
    /// The connection opened last, readable without waiting for a reconnection under way.
    last: Mutex<Option<Arc<Connection>>>,
    closed: CancellationToken,
    /// How many times a connection was opened again after one was lost.
    reconnects: std::sync::atomic::AtomicU64,
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
    /// A connector for `uri` (one or several AMQP URIs separated by commas) with the default
    /// settings but `timeout`; `name` is shown by the broker (management UI, `rabbitmqctl`).
    pub fn new(uri: impl Into<String>, name: impl Into<String>, timeout: Duration) -> Self {
        let settings = ConnectorSettings {
            connect_timeout: timeout,
            ..ConnectorSettings::default()
        };
        Self::with_settings(uri, name, settings)
    }

    /// A connector with explicit settings.
    pub fn with_settings(
        uri: impl Into<String>,
        name: impl Into<String>,
        settings: ConnectorSettings,
    ) -> Self {
        let text = uri.into();
        let nodes = match memory_name(&text) {
            Some(name) => Ok(vec![Node {
                uri: AMQPUri::default(),
                addr: text.trim().to_string(),
                memory: Some(name.to_string()),
            }]),
            None => Self::amqp_nodes(&text, &settings),
        };
        let broker = match &nodes {
            Ok(nodes) => nodes.first().map(|n| n.addr.clone()).unwrap_or_default(),
            Err(_) => String::new(),
        };
        Self {
            text,
            nodes,
            name: name.into(),
            settings,
            state: tokio::sync::Mutex::new(State {
                current: None,
                connected_once: false,
                next: 0,
            }),
            broker: Mutex::new(broker),
            last: Mutex::new(None),
            closed: CancellationToken::new(),
            reconnects: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn amqp_nodes(text: &str, settings: &ConnectorSettings) -> Result<Vec<Node>, String> {
        parse_nodes(text).map(|uris| {
            uris.into_iter()
                .map(|mut uri| {
                    if uri.query.heartbeat.is_none() {
                        uri.query.heartbeat = Some(settings.heartbeat);
                    }
                    let addr = format!("{}:{}", uri.authority.host, uri.authority.port);
                    Node {
                        uri,
                        addr,
                        memory: None,
                    }
                })
                .collect()
        })
    }

    /// The URI(s) with passwords masked, for logs and errors.
    pub fn display_uri(&self) -> String {
        redact_uri(&self.text)
    }

    /// `host:port` of the node in use (or tried last).
    pub fn broker(&self) -> String {
        self.broker.lock().map(|b| b.clone()).unwrap_or_default()
    }

    /// The connect timeout, which also bounds each broker round trip of set-up and shutdown.
    pub fn connect_timeout(&self) -> Duration {
        self.settings.connect_timeout
    }

    /// False once the connector is closed or when its URI cannot be used: waiting for a
    /// reconnection is then pointless.
    pub fn can_reconnect(&self) -> bool {
        !self.closed.is_cancelled() && self.nodes.is_ok()
    }

    /// How many times a connection was opened again after one was lost.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// True while a connection is open.
    pub fn is_connected(&self) -> bool {
        self.last
            .lock()
            .map(|last| last.as_ref().is_some_and(|c| c.is_connected()))
            .unwrap_or(false)
    }

    /// The open connection, opening one when there is none or the last one broke: one round of
    /// attempts over the nodes, each bounded by the connect timeout.
    pub async fn connection(&self) -> Result<Arc<Connection>, ConnectError> {
        let mut state = self.state.lock().await;
        if let Some(conn) = live(&state) {
            return Ok(conn);
        }
        self.open(&mut state).await
    }

    /// As [`Connector::connection`], retrying with backoff until a connection is open, the
    /// `deadline` (if any) passes or the connector is closed. One caller dials; the others wait
    /// for its connection.
    pub async fn connection_until(
        &self,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Arc<Connection>, ConnectError> {
        let mut state = tokio::select! {
            state = self.state.lock() => state,
            _ = self.closed.cancelled() => return Err(ConnectError::Closed),
        };
        if let Some(conn) = live(&state) {
            return Ok(conn);
        }
        let mut delay = self.settings.reconnect_delay;
        let mut attempt = 1u32;
        loop {
            let error = match self.open(&mut state).await {
                Ok(conn) => return Ok(conn),
                // Retrying cannot help these: wrong credentials, a bad URI, a closed connector.
                Err(
                    e @ (ConnectError::Closed
                    | ConnectError::BadUri(_)
                    | ConnectError::LoginRefused { .. }),
                ) => return Err(e),
                Err(e) => e,
            };
            let wake = tokio::time::Instant::now() + delay;
            if let Some(deadline) = deadline
                && wake >= deadline
            {
                // No round fits before the deadline: pause (without holding the connector,
                // so that others may dial meanwhile) rather than dial in a loop.
                drop(state);
                tokio::select! {
                    _ = tokio::time::sleep_until(wake.min(deadline)) => {}
                    _ = self.closed.cancelled() => {}
                }
                return Err(error);
            }
            tracing::warn!(
                broker = %self.display_uri(),
                attempt,
                retry_in = ?delay,
                error = %error,
                "cannot reach the AMQP broker; retrying"
            );
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = self.closed.cancelled() => return Err(ConnectError::Closed),
            }
            delay = (delay * 2).min(self.settings.reconnect_delay_max);
            attempt += 1;
        }
    }

    /// One round over the nodes, in the selector's order.
    async fn open(&self, state: &mut State) -> Result<Arc<Connection>, ConnectError> {
        if self.closed.is_cancelled() {
            return Err(ConnectError::Closed);
        }
        let nodes = self
            .nodes
            .as_ref()
            .map_err(|e| ConnectError::BadUri(e.clone()))?;
        state.current = None;
        let reconnect = state.connected_once;
        let mut causes = Vec::new();
        for index in self.order(nodes.len(), state.next) {
            let node = &nodes[index];
            if let Ok(mut broker) = self.broker.lock() {
                broker.clone_from(&node.addr);
            }
            match self.open_node(node).await {
                Ok(conn) => {
                    let conn = Arc::new(conn);
                    if reconnect {
                        self.reconnects
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::info!(broker = %node.addr, connection = %self.name, "reconnected to the AMQP broker");
                    } else {
                        tracing::info!(broker = %node.addr, connection = %self.name, "connected to AMQP broker");
                    }
                    state.current = Some(conn.clone());
                    state.connected_once = true;
                    if let Ok(mut last) = self.last.lock() {
                        *last = Some(conn.clone());
                    }
                    state.next = index;
                    return Ok(conn);
                }
                Err(ConnectError::Failed { causes: mut more }) => {
                    tracing::debug!(broker = %node.addr, error = ?more, "AMQP node failed");
                    causes.append(&mut more);
                    // The next round starts after the node that failed.
                    state.next = (index + 1) % nodes.len();
                }
                Err(other) => return Err(other),
            }
        }
        Err(ConnectError::Failed { causes })
    }

    fn order(&self, len: usize, first: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..len).map(|i| (first + i) % len).collect();
        if self.settings.selector == NodeSelector::Random {
            shuffle(&mut order);
        }
        order
    }

    async fn open_node(&self, node: &Node) -> Result<Connection, ConnectError> {
        if let Some(name) = &node.memory {
            return Ok(Connection::Memory(
                super::memory::Broker::named(name).connect(&self.name),
            ));
        }
        let properties = ConnectionProperties::default()
            .with_connection_name(self.name.as_str().into())
            .with_client_property("product".into(), "farine".into())
            .with_client_property("version".into(), env!("CARGO_PKG_VERSION").into());
        let tls = OwnedTLSConfig {
            identity: None,
            cert_chain: self.settings.tls_ca.clone(),
        };
        let failed = |cause: String| ConnectError::Failed {
            causes: vec![format!("{}: {cause}", node.addr)],
        };
        let runtime = lapin::runtime::default_runtime().map_err(|e| failed(e.to_string()))?;
        let connect =
            lapin::Connection::connect_uri_with_config(node.uri.clone(), properties, tls, runtime);
        match tokio::time::timeout(self.settings.connect_timeout, connect).await {
            Err(_) => Err(failed(format!(
                "no answer within {:?}",
                self.settings.connect_timeout
            ))),
            Ok(Ok(conn)) => {
                watch(&conn, node.addr.clone());
                Ok(Connection::Lapin(conn))
            }
            Ok(Err(e)) => match e.kind() {
                lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 403 => {
                    Err(ConnectError::LoginRefused {
                        broker: node.addr.clone(),
                        user: node.uri.authority.userinfo.username.clone(),
                        text: redact_uri(amqp.get_message().as_str()),
                    })
                }
                _ => Err(failed(redact_uri(&e.to_string()))),
            },
        }
    }

    /// Closes the connection, when one is open, waiting at most the connect timeout; no
    /// connection is opened afterwards.
    pub async fn close(&self) {
        self.closed.cancel();
        let conn = self.state.lock().await.current.take();
        if let Ok(mut last) = self.last.lock() {
            *last = None;
        }
        if let Some(conn) = conn
            && conn.is_connected()
        {
            let close = conn.close(200, "farine shutting down");
            match tokio::time::timeout(self.settings.connect_timeout, close).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "closing the AMQP connection"),
                Err(_) => {
                    tracing::warn!(broker = %self.display_uri(), "the broker did not acknowledge the close in time")
                }
            }
        }
    }

    /// Opens a connection to each node in turn and measures it: the time to open it and one
    /// round trip (a passive declare of `amq.direct`). For `--check`.
    pub async fn ping(&self) -> Vec<(String, Result<(Duration, Duration), ConnectError>)> {
        let nodes = match &self.nodes {
            Ok(nodes) => nodes.clone(),
            Err(e) => return vec![(self.display_uri(), Err(ConnectError::BadUri(e.clone())))],
        };
        let mut results = Vec::new();
        for node in nodes {
            let started = Instant::now();
            let measured = match self.open_node(&node).await {
                Ok(conn) => {
                    let opened = started.elapsed();
                    // One round trip: a passive declare of a built-in exchange.
                    let round_trip = async {
                        let channel = conn.create_channel().await?;
                        let trip = Instant::now();
                        channel
                            .exchange_declare(
                                "amq.direct",
                                lapin::ExchangeKind::Direct,
                                lapin::options::ExchangeDeclareOptions {
                                    passive: true,
                                    ..Default::default()
                                },
                                Default::default(),
                            )
                            .await?;
                        let trip = trip.elapsed();
                        let _ = channel.close(200, "ping").await;
                        Ok::<_, lapin::Error>(trip)
                    };
                    let result =
                        match tokio::time::timeout(self.settings.connect_timeout, round_trip).await
                        {
                            Ok(Ok(trip)) => Ok((opened, trip)),
                            Ok(Err(e)) => Err(ConnectError::Failed {
                                causes: vec![format!("{}: {e}", node.addr)],
                            }),
                            Err(_) => Err(ConnectError::Failed {
                                causes: vec![format!("{}: no answer to a round trip", node.addr)],
                            }),
                        };
                    let _ = tokio::time::timeout(
                        self.settings.connect_timeout,
                        conn.close(200, "ping done"),
                    )
                    .await;
                    result
                }
                Err(e) => Err(e),
            };
            results.push((node.addr.clone(), measured));
        }
        results
    }
}

fn live(state: &State) -> Option<Arc<Connection>> {
    state
        .current
        .as_ref()
        .filter(|conn| conn.is_connected())
        .cloned()
}

/// Logs what happens to a connection: its loss (the cause), and the broker blocking publishers
/// (a memory or disk alarm). lapin reports a channel the broker closed on the same stream;
/// that is not a loss.
fn watch(conn: &lapin::Connection, broker: String) {
    let mut events = conn.events_listener();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            match event {
                // A soft error closes one channel (a 404 of a passive declare, a publish to
                // a missing exchange): its owner reports it; the connection is fine.
                lapin::Event::Error(error) if error.is_amqp_soft_error() => {
                    tracing::debug!(broker = %broker, error = %redact_uri(&error.to_string()), "the broker closed a channel");
                }
                lapin::Event::Error(error) => {
                    tracing::warn!(broker = %broker, error = %redact_uri(&error.to_string()), "the connection to the AMQP broker is lost; handlers reconnect");
                }
                lapin::Event::ConnectionBlocked(reason) => {
                    tracing::warn!(broker = %broker, reason = %reason, "the broker blocks publishing (resource alarm): publishes wait, bounded by publish_timeout");
                }
                lapin::Event::ConnectionUnblocked => {
                    tracing::info!(broker = %broker, "the broker unblocked publishing");
                }
                _ => {}
            }
        }
    });
}

/// A Fisher-Yates shuffle seeded by the standard library's random hasher keys (no extra
/// dependency for one shuffle per reconnection round).
fn shuffle(items: &mut [usize]) {
    use std::hash::{BuildHasher, Hasher};
    let state = std::collections::hash_map::RandomState::new();
    for i in (1..items.len()).rev() {
        let mut hasher = state.build_hasher();
        hasher.write_usize(i);
        let j = (hasher.finish() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amqp_uri_lists_nodes_separated_by_commas_or_whitespace() {
        let nodes =
            parse_nodes("amqp://u:p@a:5672, amqp://u:p@b:5673\n amqps://u:p@c/vhost").unwrap();
        let hosts: Vec<_> = nodes
            .iter()
            .map(|n| (n.authority.host.as_str(), n.authority.port))
            .collect();
        assert_eq!(hosts, [("a", 5672), ("b", 5673), ("c", 5671)]);
        assert_eq!(nodes[2].vhost, "vhost");
    }

    #[test]
    fn a_bad_node_is_named_by_its_position_never_by_its_text() {
        let err = parse_nodes("amqp://u:secret@a:5672, amqp://u:secret@b:port").unwrap_err();
        assert!(!err.contains("secret") && err.contains("node 2"), "{err}");
        assert!(parse_nodes(" , ").is_err());
    }

    #[test]
    fn a_comma_inside_a_password_does_not_split_the_node() {
        let nodes = parse_nodes("amqp://u:p,ss@a:5672,amqp://v:w@b:5672").unwrap();
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[0].authority.userinfo.password, "p,ss");
        assert_eq!(nodes[1].authority.host, "b");
    }

    #[test]
    fn the_selector_is_read_from_its_name() {
        assert_eq!("random".parse(), Ok(NodeSelector::Random));
        assert_eq!("In_Order".parse(), Ok(NodeSelector::InOrder));
        assert!("first".parse::<NodeSelector>().is_err());
    }

    #[test]
    fn in_order_starts_at_the_preferred_node_and_random_visits_every_node_once() {
        let connector = Connector::new("amqp://a,amqp://b,amqp://c", "t", Duration::from_secs(1));
        assert_eq!(connector.order(3, 0), [0, 1, 2]);
        assert_eq!(connector.order(3, 2), [2, 0, 1]);
        let random = Connector::with_settings(
            "amqp://a,amqp://b,amqp://c",
            "t",
            ConnectorSettings {
                selector: NodeSelector::Random,
                ..Default::default()
            },
        );
        let mut order = random.order(3, 0);
        order.sort();
        assert_eq!(order, [0, 1, 2]);
    }
}
