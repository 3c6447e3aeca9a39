//! Start-up as one sequence: a start that fails part-way closes what it had opened, whichever
//! step failed, so a library user who retries `start()` leaks nothing.

mod common;

use common::{BOUND, config, start_error};
use farine::{PublishError, Publisher, Runtime, StartError, consume, publish};
use farine_test_support::{Broker, Database, unique, wait_until};
use lapin::ExchangeKind;
use serde_json::Value;

#[derive(Default)]
struct Opener;

#[farine::service(name = "start_opener")]
impl Opener {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn take(&self, _body: Value) {}

    #[publish(exchange = "out", routing_key = "rk")]
    async fn tell(&self, publisher: Publisher, body: &Value) -> Result<(), PublishError> {
        publisher.publish(body).await
    }
}

/// Waits until no farine connection is open in `broker`'s vhost.
async fn no_connection_left(broker: &Broker) -> bool {
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        if broker.farine_connections().is_empty() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_service_shows_its_connection_and_a_stopped_one_none() {
    // What the tests below rely on: the broker lists farine's connection while it runs.
    let broker = Broker::connect().await;
    let (input, output) = (unique("start-in"), unique("start-out"));
    let config = config(
        &broker,
        "start_opener",
        &[("take.exchange", &input), ("tell.exchange", &output)],
    );
    let running = Runtime::new(config)
        .services(["start_opener"])
        .start()
        .await
        .expect("starts");
    assert!(
        wait_until(BOUND, || broker.farine_connections().len() == 1).await,
        "{:?}",
        broker.farine_connections()
    );
    running.stop().await;
    assert!(no_connection_left(&broker).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_whose_publisher_is_refused_closes_its_connection() {
    let broker = Broker::connect().await;
    let (input, output) = (unique("start-in"), unique("start-out"));
    // The publisher's exchange exists as another type: preparing it fails after connecting.
    broker.declare_exchange(&output, ExchangeKind::Topic).await;
    let config = config(
        &broker,
        "start_opener",
        &[("take.exchange", &input), ("tell.exchange", &output)],
    );
    let error = start_error(
        config,
        "start_opener",
        "the publisher's exchange is refused",
    )
    .await;
    assert!(matches!(error, StartError::Publisher { .. }), "{error}");
    assert!(
        no_connection_left(&broker).await,
        "left open: {:?}",
        broker.farine_connections()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_whose_database_is_unreachable_closes_its_connection() {
    let broker = Broker::connect().await;
    let (input, output) = (unique("start-in"), unique("start-out"));
    let config = config(
        &broker,
        "start_opener",
        &[
            ("take.exchange", &input),
            ("tell.exchange", &output),
            ("db_connector", "postgres"),
            ("db_host", "127.0.0.1"),
            ("db_port", "1"),
            ("db_name", "test"),
            ("db_user", "postgres"),
            ("db_timeout", "2"),
        ],
    );
    let error = start_error(config, "start_opener", "no database there").await;
    assert!(matches!(error, StartError::Database(_)), "{error}");
    assert!(
        no_connection_left(&broker).await,
        "left open: {:?}",
        broker.farine_connections()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_whose_handler_cannot_start_closes_its_connection_and_pool() {
    let broker = Broker::connect().await;
    let database = Database::create().await;
    let (input, output) = (unique("start-in"), unique("start-out"));
    // The consumer's exchange exists as another type: the handler's first start fails.
    broker.declare_exchange(&input, ExchangeKind::Topic).await;
    let mut options = vec![
        ("take.exchange", input.as_str()),
        ("tell.exchange", &output),
    ];
    let keys = database.ini_keys();
    let pairs: Vec<(String, String)> = keys
        .lines()
        .filter_map(|line| line.split_once(" = "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    options.extend(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let error = start_error(
        config(&broker, "start_opener", &options),
        "start_opener",
        "the consumer's exchange is refused",
    )
    .await;
    assert!(matches!(error, StartError::Handler { .. }), "{error}");
    assert!(
        no_connection_left(&broker).await,
        "left open: {:?}",
        broker.farine_connections()
    );
    // The pool is closed too: the database can be dropped without forcing (it would wait
    // forever on an open connection; the drop uses FORCE, so count them instead).
    assert_eq!(
        database.connections().await,
        0,
        "pool connections left open"
    );
}
