//! The typed broker errors, each produced against the real broker, and the AMQP model read
//! from config (arguments, headers bindings, mandatory, message size).

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{BOUND, config, start_error};
use farine::__private::amqp::PublisherSettings;
use farine::__private::amqp::{Channel, ExchangeSettings, QueueSettings};
use farine::__private::amqp::{ConnectError, Connector};
use farine::rpc::{Client, RpcError};
use farine::{BrokerError, PublishError, Publisher, Resource, Runtime, consume, publish};
use farine_test_support::proxy::Proxy;
use farine_test_support::{Broker, unique, wait_until};
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ExchangeKind};
use serde_json::{Value, json};

fn exchange(name: &str) -> ExchangeSettings {
    ExchangeSettings {
        name: name.to_string(),
        ..ExchangeSettings::default_exchange()
    }
}

/// The URI of `broker`'s vhost with the password `not-the-password`.
fn wrong_password(broker: &Broker) -> String {
    broker.uri().replacen(":guest@", ":not-the-password@", 1)
}

fn publisher(uri: String, exchange_name: &str, settings: PublisherSettings) -> Publisher {
    let connector = Arc::new(Connector::new(uri, "farine broker-error test", BOUND));
    Publisher::new(connector, exchange(exchange_name), "rk", settings)
}

// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct TypeProbe;

#[farine::service(name = "type_probe")]
impl TypeProbe {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn on_message(&self, _body: Value) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declaring_an_existing_exchange_with_another_type_is_precondition_failed_naming_it() {
    let broker = Broker::connect().await;
    let (name, queue) = (unique("typed-x"), unique("typed-q"));
    broker.declare_exchange(&name, ExchangeKind::Topic).await;

    let channel = broker.connection().create_channel().await.unwrap();
    let error = exchange(&name)
        .declare(&Channel::Lapin(channel), "local")
        .await
        .expect_err("it exists as a topic exchange");
    assert!(
        matches!(&error, BrokerError::PreconditionFailed { resource: Resource::Exchange(n), text }
            if *n == name && text.contains("type")),
        "{error}"
    );
    assert!(error.to_string().contains(&format!("exchange `{name}`")));
    assert_eq!(error.code(), Some(406));

    // Through a service, start-up stops with the same error, naming the handler.
    let config = config(
        &broker,
        "type_probe",
        &[("on_message.exchange", &name), ("on_message.queue", &queue)],
    );
    let error = start_error(config, "type_probe", "start-up fails").await;
    let text = error.to_string();
    assert!(
        text.contains("on_message") && text.contains(&format!("exchange `{name}`")),
        "{text}"
    );
    assert!(text.contains("406 PRECONDITION_FAILED"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserved_amq_name_is_access_refused_naming_the_exchange() {
    let broker = Broker::connect().await;
    let name = format!("amq.{}", unique("reserved"));
    let channel = broker.connection().create_channel().await.unwrap();
    let error = exchange(&name)
        .declare(&Channel::Lapin(channel), "local")
        .await
        .expect_err("amq. is reserved");
    assert!(
        matches!(&error, BrokerError::AccessRefused { resource: Resource::Exchange(n), .. } if *n == name),
        "{error}"
    );
    assert_eq!(error.code(), Some(403));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_to_an_exchange_that_does_not_exist_is_not_found_naming_it() {
    let broker = Broker::connect().await;
    let missing = unique("missing-x");
    let publisher = publisher(
        broker.uri(),
        &missing,
        PublisherSettings {
            declare_exchange: false,
            ..Default::default()
        },
    );
    let error = publisher
        .publish(&json!({}))
        .await
        .expect_err("no such exchange");
    assert!(
        matches!(error.broker(), Some(BrokerError::NotFound { resource: Resource::Exchange(n), .. }) if *n == missing),
        "{error}"
    );
    // The channel the broker closed is replaced: the publisher keeps working once the
    // exchange exists.
    broker
        .declare_exchange(&missing, ExchangeKind::Direct)
        .await;
    publisher
        .publish(&json!({}))
        .await
        .expect("works on a new channel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declaring_a_queue_another_connection_holds_exclusively_is_resource_locked() {
    let broker = Broker::connect().await;
    let queue = unique("locked-q");
    broker
        .channel()
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the test holds the queue exclusively");

    let other = lapin::Connection::connect(&broker.uri(), Default::default())
        .await
        .unwrap();
    let channel = other.create_channel().await.unwrap();
    let settings = QueueSettings {
        name: queue.clone(),
        durable: false,
        auto_delete: false,
        exclusive: false,
        arguments: FieldTable::default(),
        binding_arguments: FieldTable::default(),
    };
    let error = settings
        .declare(&Channel::Lapin(channel), "local")
        .await
        .expect_err("locked by the test's connection");
    assert!(
        matches!(&error, BrokerError::ResourceLocked { resource: Resource::Queue(q), .. } if *q == queue),
        "{error}"
    );
    assert_eq!(error.code(), Some(405));
    let _ = other.close(200, "done".into()).await;
}

/// Leaves what a stopped RPC server of `service` leaves, its exchange and `queue` bound with
/// `<service>__ping` and no consumer, then calls `ping`: the error, which names `queue`.
async fn call_nobody_consumes(broker: &Broker, service: &str, queue: &str) -> RpcError {
    broker.declare_exchange(service, ExchangeKind::Direct).await;
    broker
        .channel()
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    broker
        .channel()
        .queue_bind(
            queue.into(),
            service.into(),
            format!("{service}__ping").as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let client = Client::connect(&broker.uri(), service, Duration::from_millis(500))
        .await
        .unwrap();
    let error = client
        .call::<Value>("ping", ())
        .await
        .expect_err("nobody serves it");
    match &error {
        RpcError::Broker { error: broker, .. } => assert_eq!(
            **broker,
            BrokerError::NoConsumers {
                resource: Resource::Queue(queue.to_string())
            }
        ),
        other => panic!("expected NoConsumers naming {queue}, got {other}"),
    }
    error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_to_a_service_whose_queue_nobody_consumes_is_no_consumers_naming_the_queue() {
    let broker = Broker::connect().await;
    // A stopped farine server: its queue is `<service>`.
    let service = unique("stopped-svc");
    let error = call_nobody_consumes(&broker, &service, &service).await;
    assert!(error.to_string().contains("313 NO_CONSUMERS"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_baguette_messaging_server_is_no_consumers_naming_its_per_method_queue() {
    let broker = Broker::connect().await;
    // A stopped Python farine server: one queue per method, `<service>__<method>`, bound with
    // its own name; no queue `<service>`.
    let service = unique("stopped-py");
    call_nobody_consumes(&broker, &service, &format!("{service}__ping")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_when_the_broker_is_gone_is_connection_broken_naming_it_within_the_bound() {
    let broker = Broker::connect().await;
    let name = unique("gone-x");
    let proxy = Proxy::to_broker().await;
    let addr = proxy.addr();
    let publisher = publisher(
        broker.uri_via(proxy.addr()),
        &name,
        PublisherSettings {
            timeout: Duration::from_secs(1),
            ..Default::default()
        },
    );
    publisher.publish(&json!({"n": 1})).await.expect("before");

    proxy.stop().await; // every connection closed, and nothing listens there any more
    let started = Instant::now();
    let error = publisher
        .publish(&json!({"n": 2}))
        .await
        .expect_err("the broker is gone");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "bounded by the 1-second publish_timeout, not hanging"
    );
    match error.broker() {
        Some(BrokerError::ConnectionBroken { broker, .. }) => {
            assert!(broker.contains(&addr.to_string()), "{error}")
        }
        _ => panic!("expected ConnectionBroken, got {error}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_names_the_user_and_the_broker_but_not_the_password() {
    let broker = Broker::connect().await;
    let connector = Connector::new(wrong_password(&broker), "farine login test", BOUND);
    let error = connector.connection().await.expect_err("wrong password");
    let text = error.to_string();
    assert!(
        matches!(&error, ConnectError::LoginRefused { user, .. } if user == "guest"),
        "{text}"
    );
    assert!(
        text.contains("127.0.0.1:5672") && !text.contains("not-the-password"),
        "{text}"
    );
    let broker_error: BrokerError = error.into();
    assert_eq!(broker_error.code(), Some(403));
}

// ---------------------------------------------------------------------------------------------

static TTL_SEEN: Mutex<Vec<Value>> = Mutex::new(Vec::new());

#[derive(Default)]
struct ArgsProbe;

#[farine::service(name = "args_probe")]
impl ArgsProbe {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn on_message(&self, body: Value) {
        TTL_SEEN.lock().unwrap().push(body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_arguments_from_config_reach_the_broker_and_a_quorum_queue_consumes() {
    let broker = Broker::connect().await;
    let (name, queue) = (unique("args-x"), unique("args-q"));
    let config = config(
        &broker,
        "args_probe",
        &[
            ("on_message.exchange", &name),
            ("on_message.queue", &queue),
            ("exchange_type", "topic"),
            (
                "queue_arguments",
                "x-queue-type = quorum, x-max-length = 1000, x-message-ttl = 60000",
            ),
        ],
    );
    let running = Runtime::new(config)
        .services(["args_probe"])
        .start()
        .await
        .expect("starts");
    broker.publish_json(&name, "rk", &json!({"n": 1})).await;
    assert!(wait_until(BOUND, || TTL_SEEN.lock().unwrap().len() == 1).await);
    running.stop().await;

    // The broker holds the queue as a quorum queue with those arguments.
    let info = broker.queue_info(&queue);
    assert_eq!(info["type"], "quorum", "{info}");
    assert_eq!(info["arguments"]["x-max-length"], 1000, "{info}");
    assert_eq!(info["arguments"]["x-message-ttl"], 60000, "{info}");
    // Declaring it without them is refused.
    let channel = broker.connection().create_channel().await.unwrap();
    let refused = channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect_err("inequivalent arguments");
    assert!(
        refused.to_string().contains("PRECONDITION_FAILED"),
        "{refused}"
    );
    // The exchange is a topic exchange: an active declare as topic is accepted, as direct refused
    // (a passive declare would ignore the type).
    let declare = |kind: ExchangeKind| {
        let (broker, name) = (&broker, &name);
        async move {
            broker
                .connection()
                .create_channel()
                .await
                .unwrap()
                .exchange_declare(
                    name.as_str().into(),
                    kind,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
        }
    };
    declare(ExchangeKind::Topic)
        .await
        .expect("the exchange is a topic exchange");
    let refused = declare(ExchangeKind::Direct)
        .await
        .expect_err("not a direct exchange");
    assert!(
        refused.to_string().contains("PRECONDITION_FAILED"),
        "{refused}"
    );
}

// ---------------------------------------------------------------------------------------------

static PDFS: Mutex<Vec<u64>> = Mutex::new(Vec::new());

#[derive(Default)]
struct HeadersProbe;

#[farine::service(name = "headers_probe")]
impl HeadersProbe {
    #[consume(exchange = "x")]
    async fn on_pdf(&self, body: Value) {
        PDFS.lock().unwrap().push(body["n"].as_u64().unwrap_or(0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_headers_exchange_binding_takes_its_match_arguments_from_config() {
    let broker = Broker::connect().await;
    let (name, queue) = (unique("headers-x"), unique("headers-q"));
    let config = config(
        &broker,
        "headers_probe",
        &[
            ("on_pdf.exchange", &name),
            ("on_pdf.queue", &queue),
            ("exchange_type", "headers"),
            ("on_pdf.binding_arguments", "x-match = all, format = pdf"),
        ],
    );
    let running = Runtime::new(config)
        .services(["headers_probe"])
        .start()
        .await
        .expect("starts");
    for (n, format) in [(1, "pdf"), (2, "txt"), (3, "pdf")] {
        let mut headers = FieldTable::default();
        headers.insert("format".into(), AMQPValue::LongString(format.into()));
        let body = serde_json::to_vec(&json!({ "n": n })).unwrap();
        broker
            .publish_with(
                &name,
                "",
                &body,
                BasicProperties::default().with_headers(headers),
            )
            .await;
    }
    assert!(wait_until(BOUND, || PDFS.lock().unwrap().len() == 2).await);
    running.stop().await;
    // Deliveries are handled concurrently: in either order.
    let mut pdfs = PDFS.lock().unwrap().clone();
    pdfs.sort_unstable();
    assert_eq!(pdfs, vec![1, 3], "only the messages whose headers match");
}

// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct MandatoryProbe;

#[farine::service(name = "mandatory_probe")]
impl MandatoryProbe {
    #[publish(exchange = "x", routing_key = "nobody")]
    async fn announce(&self, publisher: Publisher, value: &Value) -> Result<(), PublishError> {
        publisher.publish(value).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mandatory_from_config_turns_an_unroutable_publish_into_no_route() {
    let broker = Broker::connect().await;
    let name = unique("mandatory-x");
    let config = config(
        &broker,
        "mandatory_probe",
        &[("announce.exchange", &name), ("announce.mandatory", "true")],
    );
    let running = Runtime::new(config)
        .services(["mandatory_probe"])
        .start()
        .await
        .expect("starts");
    let error = MandatoryProbe
        .announce(&json!({}))
        .await
        .expect_err("no queue is bound");
    running.stop().await;
    assert!(
        matches!(error.broker(), Some(BrokerError::NoRoute { exchange, routing_key }) if *exchange == name && routing_key == "nobody"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_max_message_bytes_is_refused_before_the_broker_sees_it() {
    let broker = Broker::connect().await;
    let name = unique("size-x");
    let publisher = publisher(
        broker.uri(),
        &name,
        PublisherSettings {
            max_message_bytes: 1024,
            ..Default::default()
        },
    );
    publisher.prepare().await.unwrap();
    let observer = broker.bind_queue(&name, "rk").await;
    let big = "x".repeat(2000);
    let error = publisher
        .publish(&json!({ "big": big }))
        .await
        .expect_err("over the limit");
    assert!(
        matches!(error, PublishError::TooLarge { size, limit: 1024, .. } if size > 2000),
        "{error}"
    );
    assert!(error.to_string().contains("max_message_bytes"), "{error}");
    // Nothing reached the broker, and the publisher still works.
    publisher.publish(&json!({"small": true})).await.unwrap();
    let received = broker
        .wait_for_messages(&observer, 2, Duration::from_secs(1))
        .await;
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].json(), json!({"small": true}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_is_not_retried_and_a_closed_connector_fails_a_publish_at_once() {
    let broker = Broker::connect().await;
    let connector = Connector::new(wrong_password(&broker), "farine login test", BOUND);
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let error = connector
        .connection_until(Some(deadline))
        .await
        .expect_err("wrong password");
    assert!(
        matches!(error, ConnectError::LoginRefused { .. }),
        "{error}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "not retried until the minute-long deadline"
    );

    let name = unique("closed-x");
    let connector = Arc::new(Connector::new(broker.uri(), "farine closed test", BOUND));
    let publisher = Publisher::new(
        connector.clone(),
        exchange(&name),
        "rk",
        PublisherSettings {
            timeout: Duration::from_secs(60),
            ..Default::default()
        },
    );
    publisher
        .publish(&json!(1))
        .await
        .expect("before the close");
    connector.close().await;
    let started = Instant::now();
    let error = publisher.publish(&json!(2)).await.expect_err("closed");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "no waiting out the minute-long publish_timeout for a reconnection that cannot come: {error}"
    );
}
