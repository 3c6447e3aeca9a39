//! `#[publish]` and `Publisher` against the real broker: confirms, properties, typed failures.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{BOUND, config};
use farine::__private::amqp::Connector;
use farine::__private::amqp::ExchangeSettings;
use farine::__private::amqp::PublisherSettings;
use farine::amqp::ExchangeKind;
use farine::{BrokerError, PublishError, PublishOptions, Publisher, Runtime, consume, publish};
use farine_test_support::proxy::Proxy;
use farine_test_support::{Broker, unique, wait_until};
use serde_json::{Value, json};

#[derive(Default)]
struct Forwarder;

#[farine::service(name = "forwarder")]
impl Forwarder {
    #[consume(exchange = "in", routing_key = "rk")]
    async fn on_input(&self, body: Value) -> Result<(), PublishError> {
        self.forward(&json!({ "forwarded": body })).await
    }

    /// Callers leave the publisher out.
    #[publish(exchange = "out", routing_key = "forwarded")]
    async fn forward(&self, publisher: Publisher, event: &Value) -> Result<(), PublishError> {
        publisher.publish(event).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_method_called_without_its_publisher_sends_persistent_json() {
    let broker = Broker::connect().await;
    let (input, output, queue) = (unique("fwd-in"), unique("fwd-out"), unique("fwd-q"));
    let config = config(
        &broker,
        "forwarder",
        &[
            ("on_input.exchange", &input),
            ("on_input.queue", &queue),
            ("forward.exchange", &output),
        ],
    );
    let running = Runtime::new(config)
        .services(["forwarder"])
        .start()
        .await
        .expect("starts");
    // The publisher declared its exchange at start: bind an observer to it.
    let observer = broker.bind_queue(&output, "forwarded").await;

    broker.publish_json(&input, "rk", &json!({"id": 1})).await;
    let received = broker.wait_for_messages(&observer, 1, BOUND).await;
    running.stop().await;

    assert_eq!(received.len(), 1);
    let message = &received[0];
    assert_eq!(message.json(), json!({"forwarded": {"id": 1}}));
    assert_eq!(message.routing_key, "forwarded");
    assert_eq!(
        message
            .properties
            .content_type()
            .as_ref()
            .map(|s| s.as_str()),
        Some("application/json")
    );
    assert_eq!(*message.properties.delivery_mode(), Some(2), "persistent");
}

/// Never started by any test, so no runtime of this process knows its publisher.
#[derive(Default)]
struct NeverStarted;

#[farine::service(name = "never_started")]
impl NeverStarted {
    #[publish(exchange = "nowhere", routing_key = "rk")]
    async fn forward(&self, publisher: Publisher, event: &Value) -> Result<(), PublishError> {
        publisher.publish(event).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_method_outside_a_running_service_returns_not_running_not_a_hang() {
    let error = NeverStarted
        .forward(&json!({}))
        .await
        .expect_err("no runtime runs `never_started`");
    assert!(matches!(error, PublishError::NotRunning { .. }), "{error}");
    assert!(error.to_string().contains("forward_with"), "{error}");
}

#[derive(Default)]
struct Announcer;

#[farine::service(name = "announcer")]
impl Announcer {
    #[publish(exchange = "x", routing_key = "announced")]
    async fn announce(&self, publisher: Publisher, event: &Value) -> Result<(), PublishError> {
        publisher.publish(event).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_a_handler_each_publish_method_finds_the_runtime_that_runs_its_service() {
    let broker = Broker::connect().await;
    let (forwarded, announced) = (unique("two-fwd"), unique("two-ann"));
    // Two runtimes in one process, each running one service; the second started last.
    let first = Runtime::new(config(&broker, "forwarder", &[("exchange", &forwarded)]))
        .services(["forwarder"])
        .start()
        .await
        .expect("first starts");
    let second = Runtime::new(config(&broker, "announcer", &[("exchange", &announced)]))
        .services(["announcer"])
        .start()
        .await
        .expect("second starts");
    let forwarded_to = broker.bind_queue(&forwarded, "forwarded").await;
    let announced_to = broker.bind_queue(&announced, "announced").await;

    Forwarder
        .forward(&json!({"from": "first"}))
        .await
        .expect("the first runtime publishes for forwarder");
    Announcer
        .announce(&json!({"from": "second"}))
        .await
        .expect("the second runtime publishes for announcer");
    let one = broker.wait_for_messages(&forwarded_to, 1, BOUND).await;
    let two = broker.wait_for_messages(&announced_to, 1, BOUND).await;
    assert_eq!(one[0].json(), json!({"from": "first"}));
    assert_eq!(two[0].json(), json!({"from": "second"}));

    // Once a runtime stops, its service's methods are not running any more.
    second.stop().await;
    let error = Announcer.announce(&json!({})).await.expect_err("stopped");
    assert!(matches!(error, PublishError::NotRunning { .. }), "{error}");
    Forwarder
        .forward(&json!({"still": true}))
        .await
        .expect("the first runtime still runs");
    first.stop().await;
}

/// A standalone publisher (see [`standalone`]) on a fresh exchange `<name>-...` in `broker`'s
/// vhost, its exchange declared, and the name of a queue bound to it with `rk` that
/// observes what it sends.
async fn observed(
    broker: &Broker,
    name: &str,
    uri: String,
    timeout: Duration,
) -> (Publisher, String) {
    let exchange = unique(name);
    let publisher = standalone(uri, &exchange, timeout);
    publisher.prepare().await.expect("declares the exchange");
    let observer = broker.bind_queue(&exchange, "rk").await;
    (publisher, observer)
}

fn standalone(uri: String, exchange: &str, timeout: Duration) -> Publisher {
    let connector = Arc::new(Connector::new(uri, "farine publish test", BOUND));
    let exchange = ExchangeSettings {
        name: exchange.to_string(),
        kind: ExchangeKind::Direct,
        durable: true,
        auto_delete: false,
        arguments: Default::default(),
    };
    Publisher::new(
        connector,
        exchange,
        "rk",
        PublisherSettings {
            timeout,
            ..Default::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_with_variant_takes_an_explicit_publisher_outside_any_runtime() {
    let broker = Broker::connect().await;
    let (publisher, observer) = observed(&broker, "with-x", broker.uri(), BOUND).await;
    Forwarder
        .forward_with(publisher, &json!({"direct": true}))
        .await
        .expect("published");
    let received = broker.wait_for_messages(&observer, 1, BOUND).await;
    assert_eq!(received[0].json(), json!({"direct": true}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_publishes_from_one_publisher_are_in_flight_together_and_all_confirmed() {
    let broker = Broker::connect().await;
    let proxy = Proxy::to_broker().await;
    let (publisher, observer) =
        observed(&broker, "many-x", broker.uri_via(proxy.addr()), BOUND).await;
    // No confirm can come back: the proxy passes what farine sends, nothing the broker says.
    proxy.stall_replies();
    let sends: Vec<_> = (0..500)
        .map(|n| {
            let publisher = publisher.clone();
            tokio::spawn(async move { publisher.publish(&json!({"n": n})).await })
        })
        .collect();
    // All 500 reach the broker while none has its confirm: they are in flight together, not
    // one after the other's confirm.
    let deadline = tokio::time::Instant::now() + BOUND;
    while broker.queue_state(&observer).await.map(|s| s.0) != Some(500) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the publishes did not all reach the broker before their confirms"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        sends.iter().all(|send| !send.is_finished()),
        "no publish completes before its confirm"
    );
    proxy.resume();
    for send in sends {
        send.await
            .expect("the publish task")
            .expect("every publish confirmed");
    }
    let received = broker.wait_for_messages(&observer, 500, BOUND).await;
    assert_eq!(received.len(), 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mandatory_publish_nobody_receives_is_a_typed_no_route_error_naming_exchange_and_key() {
    let broker = Broker::connect().await;
    let exchange = unique("unroutable-x");
    let publisher = standalone(broker.uri(), &exchange, BOUND);
    let error = publisher
        .publish_with(
            &json!({}),
            PublishOptions::new()
                .mandatory(true)
                .routing_key("nobody.listens"),
        )
        .await
        .expect_err("no queue is bound");
    assert!(
        matches!(&error, PublishError::Broker(BrokerError::NoRoute { exchange: e, routing_key })
            if *e == exchange && routing_key == "nobody.listens"),
        "{error}"
    );
    assert_eq!(error.broker().and_then(BrokerError::code), Some(312));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_stops_answering_gives_a_timeout_error_within_the_bound() {
    let broker = Broker::connect().await;
    let exchange = unique("stall-x");
    let proxy = Proxy::to_broker().await;
    let publisher = standalone(
        broker.uri_via(proxy.addr()),
        &exchange,
        Duration::from_millis(500),
    );
    publisher
        .publish(&json!({"n": 1}))
        .await
        .expect("first publish");

    proxy.stall();
    let started = Instant::now();
    let error = publisher
        .publish(&json!({"n": 2}))
        .await
        .expect_err("the broker does not answer");
    assert!(matches!(error, PublishError::Timeout { .. }), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "bounded by publish_timeout"
    );
    proxy.resume();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_during_a_cut_waits_for_the_reconnection_and_goes_through() {
    let broker = Broker::connect().await;
    let proxy = Proxy::to_broker().await;
    let (publisher, observer) = observed(
        &broker,
        "cut-x",
        broker.uri_via(proxy.addr()),
        Duration::from_secs(5),
    )
    .await;
    publisher
        .publish(&json!({"n": 1}))
        .await
        .expect("before the cut");

    proxy.cut();
    // Every publish after the cut goes through: it waits for farine to reconnect (within
    // publish_timeout) and sends again what the cut interrupted.
    for n in 2..=4 {
        publisher
            .publish(&json!({ "n": n }))
            .await
            .expect("the publish waits for the reconnection and is confirmed");
    }
    // Every publish was confirmed, so all are in the queue by now; the one the cut interrupted
    // may be there twice (at-least-once), which is why the rest is drained too.
    let mut received = broker.wait_for_messages(&observer, 4, BOUND).await;
    received.extend(broker.drain(&observer).await);
    let mut ns: Vec<_> = received
        .iter()
        .map(|m| m.json()["n"].as_i64().unwrap())
        .collect();
    ns.sort();
    ns.dedup();
    assert_eq!(ns, [1, 2, 3, 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_gets_a_unique_message_id_unless_it_brings_its_own() {
    let broker = Broker::connect().await;
    let (publisher, observer) = observed(&broker, "ids-x", broker.uri(), BOUND).await;
    publisher.publish(&json!(1)).await.unwrap();
    publisher.publish(&json!(2)).await.unwrap();
    let own = PublishOptions::new().message_id("mine");
    publisher.publish_with(&json!(3), own).await.unwrap();
    let received = broker.wait_for_messages(&observer, 3, BOUND).await;
    let ids: Vec<String> = received
        .iter()
        .map(|m| {
            m.properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string())
                .unwrap_or_default()
        })
        .collect();
    assert!(!ids[0].is_empty() && ids[0] != ids[1], "{ids:?}");
    assert_eq!(ids[2], "mine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_message_properties_reach_the_consumer() {
    let broker = Broker::connect().await;
    let (publisher, observer) = observed(&broker, "props-x", broker.uri(), BOUND).await;
    let options = PublishOptions::new()
        .message_type("order.created")
        .correlation_id("c-1")
        .reply_to("replies")
        .expiration(Duration::from_secs(60))
        .priority(3);
    publisher.publish_with(&json!(1), options).await.unwrap();
    publisher.publish(&json!(2)).await.unwrap();
    let received = broker.wait_for_messages(&observer, 2, BOUND).await;
    let text = |value: &Option<lapin::types::ShortString>| value.as_ref().map(|s| s.to_string());
    let first = &received[0].properties;
    assert_eq!(text(first.kind()).as_deref(), Some("order.created"));
    assert_eq!(text(first.correlation_id()).as_deref(), Some("c-1"));
    assert_eq!(text(first.reply_to()).as_deref(), Some("replies"));
    assert_eq!(text(first.expiration()).as_deref(), Some("60000"));
    assert_eq!(*first.priority(), Some(3));
    assert_eq!(
        text(first.content_type()).as_deref(),
        Some("application/json")
    );
    let second = &received[1].properties;
    assert_eq!(*second.kind(), None, "no type unless one is given");
    assert_eq!(*second.correlation_id(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routing_key_or_property_longer_than_amqp_carries_is_an_error_and_the_publisher_goes_on()
{
    let broker = Broker::connect().await;
    let (publisher, observer) = observed(&broker, "long-x", broker.uri(), BOUND).await;
    let long = "k".repeat(256);
    let cases = [
        (
            "routing key",
            PublishOptions::new().routing_key(long.clone()),
        ),
        ("message id", PublishOptions::new().message_id(long.clone())),
        (
            "correlation id",
            PublishOptions::new().correlation_id(long.clone()),
        ),
    ];
    for (field, options) in cases {
        let error = publisher
            .publish_with(&json!(0), options)
            .await
            .expect_err("refused before it reaches the broker");
        assert!(
            matches!(&error, PublishError::TooLong { field: f, length: 256, .. } if *f == field),
            "{error}"
        );
    }
    publisher.publish(&json!(1)).await.expect("still publishes");
    let received = broker.wait_for_messages(&observer, 1, BOUND).await;
    assert_eq!(received[0].json(), json!(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_connect_gives_a_standalone_program_a_publisher_named_after_it() {
    let broker = Broker::connect().await;
    let exchange = unique("standalone-x");
    broker
        .declare_exchange(&exchange, ExchangeKind::Topic)
        .await;
    let observer = broker.bind_queue(&exchange, "order.created").await;
    let publisher = Publisher::connect(&broker.uri(), &exchange, "order.created")
        .await
        .expect("connects");
    publisher
        .publish(&json!({"id": 1}))
        .await
        .expect("confirmed");
    let received = broker.wait_for_messages(&observer, 1, BOUND).await;
    assert_eq!(received[0].json(), json!({"id": 1}));
    assert_eq!(received[0].routing_key, "order.created");

    // The broker shows the connection under this program's name (the test binary's).
    let program = std::env::current_exe().unwrap();
    let program = program.file_stem().unwrap().to_string_lossy();
    let expected = format!(
        "{program}: publisher to {exchange} (farine, pid {})",
        std::process::id()
    );
    let named = wait_until(BOUND, || {
        broker.farine_connections() == vec![expected.clone()]
    })
    .await;
    assert!(
        named,
        "{:?} is not [{expected}]",
        broker.farine_connections()
    );

    publisher.close().await;
    assert!(
        wait_until(BOUND, || broker.farine_connections().is_empty()).await,
        "close() closes the publisher's own connection"
    );
    assert!(publisher.publish(&json!(2)).await.is_err(), "closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_connect_with_a_wrong_password_is_an_error_without_the_password() {
    let broker = Broker::connect().await;
    let uri = broker
        .uri()
        .replacen("guest:guest", "guest:not-the-password", 1);
    let error = Publisher::connect(&uri, "anything", "rk")
        .await
        .expect_err("refused");
    let text = error.to_string();
    assert!(!text.contains("not-the-password"), "{text}");
    assert!(error.broker().is_some(), "a broker error: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_connect_refuses_names_and_a_content_type_longer_than_amqp_carries() {
    let broker = Broker::connect().await;
    let long = "x".repeat(300);
    for (exchange, routing_key, field) in [
        (long.as_str(), "rk", "exchange name"),
        ("x", long.as_str(), "routing key"),
    ] {
        let error = Publisher::connect(&broker.uri(), exchange, routing_key)
            .await
            .expect_err("too long");
        assert!(
            matches!(&error, PublishError::TooLong { field: f, length: 300, .. } if *f == field),
            "{error}"
        );
    }
    let (publisher, _observer) = observed(&broker, "ctype-x", broker.uri(), BOUND).await;
    let error = publisher
        .publish_bytes(b"x", PublishOptions::new().content_type(long.clone()))
        .await
        .expect_err("too long");
    assert!(
        matches!(
            &error,
            PublishError::TooLong {
                field: "content type",
                ..
            }
        ),
        "{error}"
    );
}
