//! The three-node RabbitMQ cluster of `scripts/cluster` (nodes `farine-c1@localhost` ..
//! `farine-c3@localhost`, AMQP on 127.0.0.1:5681 .. 5683), for the cluster tests.
//!
//! The cluster tests are long, so they run only under `FARINE_CLUSTER=1`, which
//! `scripts/cluster-test` sets; elsewhere (`scripts/test`) [`Cluster::start`] prints why the test
//! is skipped and returns `None`, as it does where RabbitMQ is not installed. A [`Cluster`] is a
//! virtual host of the test's own on the cluster, deleted (with its queues and exchanges) when it
//! is dropped; the nodes themselves stay up for the next test, and `scripts/cluster-test` stops
//! them at the end. Nodes are killed and started again through the script, which knows their
//! pid files.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use crate::{cleanup_failed, unique};

/// The variable that turns the cluster tests on (`scripts/cluster-test` sets it).
pub const ENABLE: &str = "FARINE_CLUSTER";

/// How many nodes the cluster has.
pub const NODES: usize = 3;

/// `scripts/cluster`'s exit status where RabbitMQ is not installed.
const NOT_INSTALLED: i32 = 3;

/// The path of `scripts/cluster`.
fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/cluster")
}

/// Runs `scripts/cluster args`; its exit status and what it printed (stdout, then stderr).
fn run(args: &[&str]) -> (Option<i32>, String) {
    let output = Command::new(script())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running scripts/cluster {}: {e}", args.join(" ")));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code(), text)
}

/// Runs `scripts/cluster args` and panics with its output when it fails.
fn run_ok(args: &[&str]) -> String {
    match run(args) {
        (Some(0), text) => text,
        (status, text) => panic!(
            "scripts/cluster {} failed ({status:?}): {text}",
            args.join(" ")
        ),
    }
}

/// The AMQP port of node `n` (1-based).
pub fn amqp_port(n: usize) -> u16 {
    assert!((1..=NODES).contains(&n), "node {n} of {NODES}");
    5680 + n as u16
}

/// The cluster, as a virtual host of the test's own on it.
pub struct Cluster {
    vhost: String,
}

impl Cluster {
    /// Brings the cluster up (`scripts/cluster up`: idempotent, and serialised across test
    /// processes by the script's lock) and makes a vhost for the test. `None`, after printing
    /// why, when the cluster tests are off (`FARINE_CLUSTER` unset) or RabbitMQ is not
    /// installed: the caller returns, and the skip shows in the test's output.
    pub fn start(test: &str) -> Option<Self> {
        if std::env::var(ENABLE).as_deref() != Ok("1") {
            println!(
                "SKIPPED {test}: a cluster test runs only with {ENABLE}=1, on a three-node \
                 RabbitMQ cluster of its own: run scripts/cluster-test"
            );
            return None;
        }
        match run(&["up"]) {
            (Some(0), _) => {}
            (Some(NOT_INSTALLED), text) => {
                println!("SKIPPED {test}: {}", text.trim());
                return None;
            }
            (status, text) => panic!("scripts/cluster up failed ({status:?}): {text}"),
        }
        let vhost = unique("cluster");
        run_ok(&["ctl", "1", "add_vhost", &vhost]);
        let cluster = Self { vhost };
        run_ok(&[
            "ctl",
            "1",
            "set_permissions",
            "-p",
            &cluster.vhost,
            "guest",
            ".*",
            ".*",
            ".*",
        ]);
        Some(cluster)
    }

    /// The test's vhost.
    pub fn vhost(&self) -> &str {
        &self.vhost
    }

    /// The AMQP URI of node `n` (1-based) in the test's vhost.
    pub fn uri(&self, n: usize) -> String {
        format!(
            "amqp://guest:guest@127.0.0.1:{}/{}",
            amqp_port(n),
            self.vhost
        )
    }

    /// An `amqp_uri` listing every node, node `first` first and the others after it in turn:
    /// a service with it connects to `first` and moves on to the next node when that one fails.
    pub fn uris_from(&self, first: usize) -> String {
        (0..NODES)
            .map(|i| self.uri((first - 1 + i) % NODES + 1))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Kills node `n`'s Erlang VM with SIGKILL: a node lost hard, without closing anything.
    pub async fn kill(&self, n: usize) {
        script_off_runtime("kill", n).await;
    }

    /// Starts node `n` again and waits until it serves (it rejoins the cluster).
    pub async fn start_node(&self, n: usize) {
        script_off_runtime("start", n).await;
    }

    /// `rabbitmqctl args` on node `n`, for what the helpers do not cover; its output.
    pub fn ctl(&self, n: usize, args: &[&str]) -> String {
        let node = n.to_string();
        let mut all = vec!["ctl", node.as_str()];
        all.extend_from_slice(args);
        run_ok(&all)
    }

    /// The node that leads quorum queue `queue` now (`farine-cN@localhost`), as node `ask`
    /// sees it.
    pub fn leader(&self, ask: usize, queue: &str) -> Option<String> {
        let listed = self.ctl(
            ask,
            &[
                "list_queues",
                "-p",
                &self.vhost,
                "--quiet",
                "--no-table-headers",
                "name",
                "leader",
            ],
        );
        listed.lines().find_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next() == Some(queue)).then(|| fields.next().map(str::to_string))?
        })
    }

    /// A connection to node `n` in the test's vhost, for setting up and observing.
    pub async fn connect(&self, n: usize) -> Connection {
        Connection::connect(&self.uri(n), ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("node {n} of the cluster is reachable: {e}"))
    }

    /// `(ready messages, consumers)` of `queue`, from a passive declare on node `n`.
    pub async fn queue_state(&self, n: usize, queue: &str) -> Option<(u32, u32)> {
        let connection = self.connect(n).await;
        let state = crate::passive_queue_state(&connection, queue).await;
        let _ = connection.close(200, "done".into()).await;
        state
    }

    /// Waits until `queue`'s (ready, consumers), asked on node `n`, satisfy `done`, for at most
    /// `bound`.
    pub async fn wait_for_queue(
        &self,
        n: usize,
        queue: &str,
        bound: Duration,
        done: impl Fn((u32, u32)) -> bool,
    ) -> bool {
        crate::poll_until(bound, Duration::from_millis(100), async || {
            self.queue_state(n, queue).await.is_some_and(&done)
        })
        .await
    }
}

/// `scripts/cluster command n` on a blocking thread: the runtime's workers go on serving the
/// services under test meanwhile.
async fn script_off_runtime(command: &'static str, n: usize) {
    let node = n.to_string();
    tokio::task::spawn_blocking(move || run_ok(&[command, &node]))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Any running node will do: a test may leave one down when it fails.
        let mut causes = Vec::new();
        for n in 1..=NODES {
            match run(&["ctl", &n.to_string(), "delete_vhost", &self.vhost]) {
                (Some(0), _) => return,
                (status, text) => causes.push(format!("node {n} ({status:?}): {}", text.trim())),
            }
        }
        cleanup_failed(format!(
            "deleting vhost {} on the cluster: {}",
            self.vhost,
            causes.join("; ")
        ));
    }
}

/// A publisher with confirms on one node: every message is published again until the broker
/// confirms it (a nack, a confirm that does not come within `confirm_bound`, or a closed
/// channel), so none is lost whatever a node does meanwhile.
pub struct ConfirmingPublisher {
    uri: String,
    connection: Connection,
    channel: Channel,
    /// How many messages were published again after a failed first attempt.
    pub resent: u64,
}

impl ConfirmingPublisher {
    pub async fn connect(uri: &str) -> Self {
        let (connection, channel) = open(uri).await;
        Self {
            uri: uri.to_string(),
            connection,
            channel,
            resent: 0,
        }
    }

    /// Publishes `bodies` to `exchange` with `routing_key`, `batch` at a time (all of a batch,
    /// then their confirms), until every one is confirmed; panics after 20 rounds of failures.
    pub async fn publish_all(
        &mut self,
        exchange: &str,
        routing_key: &str,
        bodies: Vec<Vec<u8>>,
        batch: usize,
    ) {
        const CONFIRM_BOUND: Duration = Duration::from_secs(30);
        let mut pending = bodies;
        for round in 0.. {
            assert!(round < 20, "{} messages never confirmed", pending.len());
            let mut failed = Vec::new();
            for chunk in pending.chunks(batch) {
                let mut confirms = Vec::with_capacity(chunk.len());
                for body in chunk {
                    let sent = self
                        .channel
                        .basic_publish(
                            exchange.into(),
                            routing_key.into(),
                            BasicPublishOptions::default(),
                            body,
                            BasicProperties::default().with_delivery_mode(2),
                        )
                        .await;
                    match sent {
                        Ok(confirm) => confirms.push((body, confirm)),
                        Err(_) => failed.push(body.clone()),
                    }
                }
                for (body, confirm) in confirms {
                    match tokio::time::timeout(CONFIRM_BOUND, confirm).await {
                        Ok(Ok(confirmation)) if confirmation.is_ack() => {}
                        _ => failed.push(body.clone()),
                    }
                }
            }
            if failed.is_empty() {
                return;
            }
            self.resent += failed.len() as u64;
            if !self.channel.status().connected() || !self.connection.status().connected() {
                let (connection, channel) = open(&self.uri).await;
                self.connection = connection;
                self.channel = channel;
            }
            pending = failed;
        }
    }
}

/// A connection to `uri` and a channel in confirm mode on it.
async fn open(uri: &str) -> (Connection, Channel) {
    let connection = Connection::connect(uri, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("the publisher's node is reachable: {e}"));
    let channel = connection.create_channel().await.expect("a channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    (connection, channel)
}
