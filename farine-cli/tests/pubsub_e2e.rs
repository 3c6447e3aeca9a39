//! End to end: the real `farine --start=pubsub` process against the real broker.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use farine_test_support::process::{self, Process, SIGKILL, SIGTERM};
use farine_test_support::{Broker, IniFile, unique};
use lapin::ExchangeKind;
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::json;

/// The first start builds the pubsub example with cargo: give it time.
const START_BOUND: Duration = Duration::from_secs(300);
const BOUND: Duration = Duration::from_secs(15);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace is farine-cli's parent")
        .to_path_buf()
}

fn farine(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_farine"));
    command
        .args(args)
        .current_dir(workspace())
        .env_remove("FARINE_INI")
        .env("RUST_LOG", "info");
    command
}

/// A config for `relay` in the test's vhost, with exchanges and a queue of the test's own.
fn own_topology(broker: &Broker, extra: &str) -> (IniFile, String, String, String) {
    let (orders, audit, queue) = (unique("orders"), unique("audit"), unique("relay"));
    let ini = IniFile::new(&format!(
        "[DEFAULT]\namqp_uri = {}\n\n[relay]\nrelay.exchange = {orders}\nrelay.queue = {queue}\nseen.exchange = {audit}\n{extra}",
        broker.uri()
    ));
    (ini, orders, audit, queue)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn farine_start_pubsub_relays_an_order_to_audit_and_exits_0_on_sigterm() {
    let broker = Broker::connect().await;
    // The example as shipped: etc/farine.ini, exchanges `orders` and `audit`, in the test's
    // vhost through the environment override a container would use.
    broker.declare_exchange("audit", ExchangeKind::Direct).await;
    let observer = broker.bind_queue("audit", "order.seen").await;
    let mut command = farine(&["--start=pubsub", "--config", "etc/farine.ini"]);
    command.env("FARINE__DEFAULT__AMQP_URI", broker.uri());
    let mut process = Process::spawn(command);
    assert!(
        process.wait_for_output("consuming", START_BOUND),
        "farine started:\n{}",
        process.output()
    );

    broker
        .publish_json("orders", "order.created", &json!({"id": 1}))
        .await;
    let received = broker.wait_for_messages(&observer, 1, BOUND).await;
    assert_eq!(received.len(), 1, "relayed:\n{}", process.output());
    let message = &received[0];
    assert_eq!(message.json(), json!({"seen": {"id": 1}}));
    assert_eq!(message.exchange, "audit");
    assert_eq!(message.routing_key, "order.seen");
    assert_eq!(
        message
            .properties
            .content_type()
            .as_ref()
            .map(|s| s.as_str()),
        Some("application/json")
    );

    process.signal(SIGTERM);
    let status = process.wait_exit(BOUND).expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", process.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_is_not_json_is_dead_lettered_and_logged_and_the_next_order_is_relayed() {
    let broker = Broker::connect().await;
    let (ini, orders, audit, queue) = own_topology(&broker, "");
    let path = ini.path.display().to_string();
    let mut process = Process::spawn(farine(&["--start=pubsub", "--config", &path]));
    assert!(
        process.wait_for_output("consuming", START_BOUND),
        "{}",
        process.output()
    );
    let observer = broker.bind_queue(&audit, "order.seen").await;

    broker.publish(&orders, "order.created", b"{not json").await;
    broker
        .publish_json(&orders, "order.created", &json!([1, 2]))
        .await;
    broker
        .publish_json(&orders, "order.created", &json!({"id": 2}))
        .await;
    let received = broker.wait_for_messages(&observer, 1, BOUND).await;
    assert_eq!(received.len(), 1, "{}", process.output());
    assert_eq!(received[0].json(), json!({"seen": {"id": 2}}));
    assert!(
        process.wait_for_output("does not decode", BOUND),
        "the rejection is logged:\n{}",
        process.output()
    );
    assert_eq!(
        broker.queue_state(&queue).await.map(|s| s.0),
        Some(0),
        "not requeued"
    );
    let dead = broker
        .wait_for_messages(&format!("{queue}.dead"), 2, BOUND)
        .await;
    assert_eq!(
        dead.len(),
        2,
        "both bad bodies are in the dead-letter queue"
    );

    process.signal(SIGTERM);
    let status = process.wait_exit(BOUND).expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", process.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_in_the_middle_of_a_stream_of_orders_loses_none_and_acks_none_unhandled() {
    let broker = Broker::connect().await;
    let (ini, orders, audit, queue) = own_topology(&broker, "drain_timeout = 5\n");
    // Fill the relay's queue before farine starts.
    broker.declare_exchange(&orders, ExchangeKind::Direct).await;
    broker.declare_exchange(&audit, ExchangeKind::Direct).await;
    let observer = broker.bind_queue(&audit, "order.seen").await;
    let channel = broker.channel();
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("relay queue declared");
    channel
        .queue_bind(
            queue.as_str().into(),
            orders.as_str().into(),
            "order.created".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("relay queue bound");
    const ORDERS: u64 = 2000;
    let bodies: Vec<_> = (0..ORDERS).map(|id| json!({ "id": id })).collect();
    broker
        .publish_json_batch(&orders, "order.created", &bodies)
        .await;

    let path = ini.path.display().to_string();
    let mut process = Process::spawn(farine(&["--start=pubsub", "--config", &path]));
    // SIGTERM once a hundred orders are taken, while most still wait.
    let deadline = tokio::time::Instant::now() + START_BOUND;
    while broker.queue_state(&queue).await.expect("queue").0 > ORDERS as u32 - 100 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            process.output()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    process.signal(SIGTERM);
    let status = process
        .wait_exit(Duration::from_secs(5) + BOUND)
        .expect("exits within the drain timeout");
    assert_eq!(status.code(), Some(0), "{}", process.output());

    let audited: Vec<u64> = broker
        .drain(&observer)
        .await
        .iter()
        .map(|m| m.json()["seen"]["id"].as_u64().expect("an id"))
        .collect();
    let remaining: Vec<u64> = broker
        .drain(&queue)
        .await
        .iter()
        .map(|m| m.json()["id"].as_u64().expect("an id"))
        .collect();
    // SIGTERM landed mid-stream: some orders relayed, the others still queued.
    assert!(
        !audited.is_empty() && !remaining.is_empty(),
        "relayed before exit: {}, still queued: {}",
        audited.len(),
        remaining.len()
    );
    let audited_set: BTreeSet<u64> = audited.iter().copied().collect();
    assert_eq!(audited_set.len(), audited.len(), "nothing relayed twice");
    let remaining: BTreeSet<u64> = remaining.into_iter().collect();
    assert!(
        audited_set.is_disjoint(&remaining),
        "an order both relayed and left queued: it was handled and not acked"
    );
    // Every order is in one of the two: none was acked without being relayed.
    let all: BTreeSet<u64> = audited_set.union(&remaining).copied().collect();
    assert_eq!(all, (0..ORDERS).collect::<BTreeSet<u64>>(), "none lost");
}

#[test]
fn an_unknown_module_is_a_usage_error_that_lists_the_available_ones() {
    let output = farine(&["--start=nosuchmodule"]).output().expect("runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("unknown module `nosuchmodule`") && stderr.contains("pubsub"),
        "{stderr}"
    );
    // Packages of tools over farine opt out of being modules.
    assert!(
        !stderr.contains("farine-cli") && !stderr.contains("farine-bench"),
        "{stderr}"
    );
}

#[test]
fn list_shows_each_handler_with_exchange_queue_and_routing_key() {
    let output = farine(&["--start=pubsub", "--list", "--config", "etc/farine.ini"])
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("service relay (Relay, section [relay], enabled)"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "consume relay: exchange orders (direct), routing key \"order.created\", queue relay.relay, prefetch 10"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("publish seen: exchange audit (direct), routing key \"order.seen\""),
        "{stdout}"
    );
}

#[test]
fn a_missing_config_file_is_a_config_error_naming_the_path() {
    let output = farine(&["--start=pubsub", "--config", "/nonexistent/farine.ini"])
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/farine.ini"), "{stderr}");
}

#[test]
fn the_config_path_comes_from_farine_ini_when_no_flag_is_given() {
    let ini = IniFile::new("[relay]\nprefetch_count = 3\n");
    let output = farine(&["--start=pubsub", "--list"])
        .env("FARINE_INI", &ini.path)
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("prefetch 3"), "{stdout}");
}

#[test]
fn the_config_flag_wins_over_farine_ini() {
    let from_env = IniFile::new("[relay]\nprefetch_count = 3\n");
    let from_flag = IniFile::new("[relay]\nprefetch_count = 4\n");
    let output = farine(&["--start=pubsub", "--list", "--config"])
        .arg(&from_flag.path)
        .env("FARINE_INI", &from_env.path)
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("prefetch 4"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_modules_run_side_by_side_and_sigterm_stops_them_all() {
    let broker = Broker::connect().await;
    let (ini, _, _, queue) = own_topology(&broker, "");
    let path = ini.path.display().to_string();
    // Two processes of one module: competing consumers of the relay queue.
    let mut process = Process::spawn(farine(&[
        "--start=pubsub",
        "--start=pubsub",
        "--config",
        &path,
    ]));
    assert!(
        process.wait_for_lines("consuming", 2, START_BOUND),
        "{}",
        process.output()
    );
    assert!(broker.wait_for_consumers(&queue, 2, BOUND).await);
    process.signal(SIGTERM);
    let status = process.wait_exit(BOUND).expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", process.output());
    assert!(
        broker.wait_for_consumers(&queue, 0, BOUND).await,
        "both stopped"
    );
    // Both were asked to stop: neither ending is reported as a module ending on its own.
    assert!(
        !process.output().contains("stopping the others"),
        "{}",
        process.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_to_a_multi_module_launcher_stops_every_module_it_started() {
    let broker = Broker::connect().await;
    let (ini, _, _, queue) = own_topology(&broker, "");
    let path = ini.path.display().to_string();
    let mut launcher = Process::spawn(farine(&["--start=pubsub,pubsub", "--config", &path]));
    assert!(
        launcher.wait_for_lines("consuming", 2, START_BOUND),
        "{}",
        launcher.output()
    );
    assert!(broker.wait_for_consumers(&queue, 2, BOUND).await);
    let modules = process::children(launcher.pid());
    assert_eq!(modules.len(), 2, "two module processes: {modules:?}");

    // SIGKILL cannot be caught: the launcher forwards nothing, the kernel tells the modules.
    launcher.signal(SIGKILL);
    launcher.wait_exit(BOUND).expect("killed");
    assert!(
        farine_test_support::wait_until(BOUND, || !modules.iter().any(|&m| process::running(m)))
            .await,
        "the modules {modules:?} still run after the launcher was killed"
    );
    // They stopped as on SIGTERM: their consumers are gone from the queue.
    assert!(broker.wait_for_consumers(&queue, 0, BOUND).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_send_order_example_publishes_through_farine_and_the_service_relays_it() {
    let broker = Broker::connect().await;
    broker.declare_exchange("audit", ExchangeKind::Direct).await;
    let observer = broker.bind_queue("audit", "order.seen").await;
    let mut command = farine(&["--start=pubsub", "--config", "etc/farine.ini"]);
    command.env("FARINE__DEFAULT__AMQP_URI", broker.uri());
    let mut service = Process::spawn(command);
    assert!(
        service.wait_for_output("consuming", START_BOUND),
        "farine started:\n{}",
        service.output()
    );

    // As the README runs it: cargo builds and runs the example.
    let sent = Command::new(env!("CARGO"))
        .args([
            "run",
            "--quiet",
            "-p",
            "pubsub",
            "--example",
            "send_order",
            "7",
        ])
        .current_dir(workspace())
        .env("AMQP_URI", broker.uri())
        .output()
        .expect("cargo runs the example");
    let stdout = String::from_utf8_lossy(&sent.stdout);
    assert!(
        sent.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    assert!(
        stdout.contains(r#"sent to orders (order.created): {"id":7}"#),
        "{stdout}"
    );
    assert!(
        stdout.contains(r#"received from audit (order.seen, application/json): {"seen":{"id":7}}"#),
        "{stdout}"
    );

    let received = broker.wait_for_messages(&observer, 1, BOUND).await;
    assert_eq!(received[0].json(), json!({"seen": {"id": 7}}));
    // The example's watcher left nothing behind: its queue went with its connection, and it
    // declared no retry or dead-letter queue.
    for queue in ["", ".retry", ".dead"] {
        let queue = format!("send_order_watch.seen{queue}");
        assert_eq!(broker.queue_state(&queue).await, None, "{queue} is left");
    }
    service.signal(SIGTERM);
    let status = service.wait_exit(BOUND).expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", service.output());
}
