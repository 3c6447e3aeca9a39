//! End to end: `farine --check` (the launcher alone, and a module's binary), and a service
//! process that loses its broker connection and logs its way back.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use farine_test_support::process::{Process, SIGTERM};
use farine_test_support::proxy::Proxy;
use farine_test_support::{Broker, Database, IniFile, free_port, unique};
use serde_json::json;

/// The first start builds the pubsub example with cargo: give it time.
const START_BOUND: Duration = Duration::from_secs(300);
const BOUND: Duration = Duration::from_secs(15);

fn farine(args: &[&str]) -> Command {
    let workspace: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace is farine-cli's parent")
        .to_path_buf();
    let mut command = Command::new(env!("CARGO_BIN_EXE_farine"));
    command
        .args(args)
        .current_dir(workspace)
        .env_remove("FARINE_INI")
        .env("RUST_LOG", "info");
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn farine_check_connects_to_the_broker_and_the_database_and_prints_round_trips() {
    let broker = Broker::connect().await;
    let database = Database::create().await;
    let ini = IniFile::new(&format!(
        "[DEFAULT]\namqp_uri = {}\n{}\n[relay]\n",
        broker.uri(),
        database.ini_keys()
    ));
    let path = ini.path.display().to_string();
    let mut process = Process::spawn(farine(&["--check", "--config", &path]));
    let status = process.wait_exit(BOUND).expect("--check ends");
    let output = process.output();
    assert_eq!(status.code(), Some(0), "{output}");
    assert!(output.contains("amqp 127.0.0.1:5672: ok"), "{output}");
    assert!(
        output.contains(&format!(
            "postgres postgres@127.0.0.1:5432/{}: ok",
            database.name
        )),
        "{output}"
    );
    assert!(output.contains("round trip"), "{output}");
    assert!(output.contains("check passed"), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn farine_check_against_a_stopped_broker_exits_1_within_seconds_naming_host_and_port() {
    let port = free_port();
    let ini = IniFile::new(&format!(
        "[DEFAULT]\namqp_uri = amqp://guest:s3cret-pw@127.0.0.1:{port}\nconnect_timeout = 60\n\n[relay]\n"
    ));
    let path = ini.path.display().to_string();
    let started = Instant::now();
    let mut process = Process::spawn(farine(&["--check", "--config", &path]));
    let status = process.wait_exit(BOUND).expect("--check ends");
    let output = process.output();
    assert_eq!(status.code(), Some(1), "{output}");
    // The refused connection ends the check, not the minute-long connect_timeout.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        output.contains(&format!("127.0.0.1:{port}")) && output.contains("FAILED"),
        "{output}"
    );
    assert!(!output.contains("s3cret-pw"), "no password: {output}");
    assert!(output.contains("check failed"), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn farine_start_check_validates_the_services_config_before_connecting() {
    let broker = Broker::connect().await;
    let good = IniFile::new(&format!(
        "[DEFAULT]\namqp_uri = {}\n\n[relay]\n",
        broker.uri()
    ));
    let path = good.path.display().to_string();
    let mut process = Process::spawn(farine(&["--start=pubsub", "--check", "--config", &path]));
    let status = process.wait_exit(START_BOUND).expect("--check ends");
    let output = process.output();
    assert_eq!(status.code(), Some(0), "{output}");
    assert!(output.contains("ok (services: relay)"), "{output}");
    assert!(output.contains("amqp 127.0.0.1:5672: ok"), "{output}");

    let bad = IniFile::new(&format!(
        "[DEFAULT]\namqp_uri = {}\n\n[relay]\nprefetch_count = lots\n",
        broker.uri()
    ));
    let path = bad.path.display().to_string();
    let mut process = Process::spawn(farine(&["--start=pubsub", "--check", "--config", &path]));
    let status = process.wait_exit(START_BOUND).expect("--check ends");
    let output = process.output();
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(output.contains("prefetch_count"), "{output}");
    assert!(!output.contains("amqp 127.0.0.1:5672: ok"), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misspelt_key_fails_check_and_is_a_warning_naming_the_closest_key_at_start() {
    let broker = Broker::connect().await;
    let (orders, queue) = (unique("orders"), unique("relay"));
    let ini = IniFile::new(&format!(
        "[DEFAULT]\namqp_uri = {}\n\n[relay]\nrelay.exchange = {orders}\nrelay.queue = {queue}\nprefetch_cout = 5\nrelay.exchnge = foo\n",
        broker.uri()
    ));
    let path = ini.path.display().to_string();
    let mut process = Process::spawn(farine(&["--start=pubsub", "--check", "--config", &path]));
    let status = process.wait_exit(START_BOUND).expect("--check ends");
    let output = process.output();
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(
        output.contains("[relay]: unknown key `prefetch_cout` (did you mean `prefetch_count`?)"),
        "{output}"
    );
    assert!(
        output.contains(
            "[relay]: unknown key `relay.exchnge`: handler `relay` has no key `exchnge` (did you mean `exchange`?)"
        ),
        "{output}"
    );
    assert!(!output.contains("config ok"), "{output}");

    // At start the same keys are warnings, and the service runs.
    let mut process = Process::spawn(farine(&["--start=pubsub", "--config", &path]));
    assert!(
        process.wait_for_output("consuming", START_BOUND),
        "{}",
        process.output()
    );
    process.signal(SIGTERM);
    let status = process.wait_exit(BOUND).expect("exits");
    let output = process.output();
    assert_eq!(status.code(), Some(0), "{output}");
    let warnings: Vec<_> = output
        .lines()
        .filter(|line| line.contains("WARN") && line.contains("unknown key"))
        .collect();
    assert_eq!(warnings.len(), 2, "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn farine_start_pubsub_logs_a_lost_connection_and_its_reconnection_and_relays_again() {
    let broker = Broker::connect().await;
    let (orders, audit, queue) = (unique("orders"), unique("audit"), unique("relay"));
    let proxy = Proxy::to_broker().await;
    let ini = IniFile::new(&format!(
        "[DEFAULT]\namqp_uri = {}\n\n[relay]\nrelay.exchange = {orders}\nrelay.queue = {queue}\nseen.exchange = {audit}\n",
        broker.uri_via(proxy.addr())
    ));
    let path = ini.path.display().to_string();
    let mut process = Process::spawn(farine(&["--start=pubsub", "--config", &path]));
    assert!(
        process.wait_for_output("consuming", START_BOUND),
        "{}",
        process.output()
    );
    let observer = broker.bind_queue(&audit, "order.seen").await;

    proxy.cut();
    assert!(
        process.wait_for_output("reconnected to the AMQP broker", BOUND),
        "{}",
        process.output()
    );
    assert!(
        process.wait_for_lines("consuming", 2, BOUND),
        "the consumer resumed:\n{}",
        process.output()
    );
    broker
        .publish_json(&orders, "order.created", &json!({"id": 9}))
        .await;
    let received = broker.wait_for_messages(&observer, 1, BOUND).await;
    assert_eq!(received.len(), 1, "{}", process.output());
    assert_eq!(received[0].json(), json!({"seen": {"id": 9}}));
    let output = process.output();
    assert!(
        output.contains("connection to the AMQP broker is lost"),
        "the loss is logged:\n{output}"
    );

    process.signal(SIGTERM);
    let status = process.wait_exit(BOUND).expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", process.output());
}
