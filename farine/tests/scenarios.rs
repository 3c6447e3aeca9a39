//! One scenario suite, two brokers: each scenario runs unchanged against the real RabbitMQ (a
//! vhost of its own) and against the test kit's in-memory broker, and must give the same
//! outcome on both. The scenarios drive the broker through farine's own transport (the same
//! code the handlers run on), so nothing here knows which broker it talks to.
//!
//! The cases (listed in `farine/src/docs/testing.md`): routing by each exchange type, the
//! prefetch bound, retries with a delay then the dead-letter queue, queue TTL dead-lettering,
//! mandatory returns, RPC (a result, NoSuchMethod, a streaming call cancelled by its caller; on
//! one queue and on a queue per method), and a stop that drains the call in flight.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use farine::__private::amqp::{Channel, Connector, DeclaredQueue};
use farine::config::Config;
use farine::rpc::{RpcError, Stream, StreamExt};
use farine::testing::TestBroker;
use farine::{Runtime, consume};
use farine_test_support::{Broker, unique};
use futures_util::stream;
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Confirmation, ExchangeKind};
use serde_json::Value;
use tokio::sync::Notify;

const BOUND: Duration = Duration::from_secs(10);

/// The broker a scenario runs on.
enum Target {
    Real(Box<Broker>),
    Memory(TestBroker),
}

impl Target {
    fn uri(&self) -> String {
        match self {
            Target::Real(broker) => broker.uri(),
            Target::Memory(kit) => kit.uri(),
        }
    }

    /// A channel in confirm mode, through farine's transport.
    async fn channel(&self) -> (Arc<Connector>, Channel) {
        let connector = Arc::new(Connector::new(self.uri(), "farine scenario", BOUND));
        let conn = connector.connection().await.expect("the broker answers");
        let channel = conn.create_channel().await.expect("a channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        (connector, channel)
    }

    fn config(&self, text: &str) -> Config {
        let text = format!("[DEFAULT]\namqp_uri = {}\n{text}", self.uri());
        Config::from_ini(&text, "scenario.ini").expect("the scenario's config parses")
    }
}

macro_rules! on_both {
    ($scenario:ident) => {
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn real_rabbitmq() {
                super::$scenario(super::Target::Real(Box::new(
                    farine_test_support::Broker::connect().await,
                )))
                .await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn in_memory() {
                super::$scenario(super::Target::Memory(farine::testing::TestBroker::new())).await;
            }
        }
    };
}

async fn declare_queue(channel: &Channel, name: &str, arguments: FieldTable) {
    channel
        .queue_declare(
            name,
            QueueDeclareOptions {
                auto_delete: false,
                ..Default::default()
            },
            arguments,
        )
        .await
        .expect("queue declared");
}

async fn bind(channel: &Channel, queue: &str, exchange: &str, key: &str, arguments: FieldTable) {
    channel
        .queue_bind(queue, exchange, key, QueueBindOptions::default(), arguments)
        .await
        .expect("bound");
}

/// Publishes and waits for the broker's confirm; answers whether it was returned.
async fn publish(
    channel: &Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    properties: BasicProperties,
    mandatory: bool,
) -> Confirmation {
    channel
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions {
                mandatory,
                immediate: false,
            },
            body,
            properties,
        )
        .await
        .expect("published")
        .await
        .expect("confirmed")
}

/// What a passive declare of `queue` answers (it must exist).
async fn declared(channel: &Channel, queue: &str) -> DeclaredQueue {
    channel
        .queue_declare(
            queue,
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the queue exists")
}

/// Ready messages in `queue`.
async fn ready(channel: &Channel, queue: &str) -> u32 {
    declared(channel, queue).await.message_count
}

/// Consumers of `queue`.
async fn consumers(channel: &Channel, queue: &str) -> u32 {
    declared(channel, queue).await.consumer_count
}

async fn wait_ready(channel: &Channel, queue: &str, n: u32) {
    let reached = tokio::time::timeout(BOUND, async {
        while ready(channel, queue).await < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        reached.is_ok(),
        "queue `{queue}` never held {n} messages: {}",
        ready(channel, queue).await
    );
}

fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in pairs {
        table.insert((*key).into(), value.clone());
    }
    table
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(value.into())
}

// --- routing ---------------------------------------------------------------------------------

on_both!(routing_by_each_exchange_type);

async fn routing_by_each_exchange_type(target: Target) {
    let (_connector, channel) = target.channel().await;
    let x = |kind: &str| unique(&format!("scenario-{kind}"));
    let (direct, topic, fanout, headers) = (x("direct"), x("topic"), x("fanout"), x("headers"));
    for (name, kind) in [
        (&direct, ExchangeKind::Direct),
        (&topic, ExchangeKind::Topic),
        (&fanout, ExchangeKind::Fanout),
        (&headers, ExchangeKind::Headers),
    ] {
        channel
            .exchange_declare(
                name,
                kind,
                ExchangeDeclareOptions {
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("exchange declared");
    }
    let q = |label: &str| unique(&format!("scenario-{label}"));
    let queues: BTreeMap<&str, String> = [
        "direct-a",
        "one-word",
        "any-depth",
        "all",
        "fan-1",
        "fan-2",
        "match-all",
        "match-any",
    ]
    .into_iter()
    .map(|label| (label, q(label)))
    .collect();
    for queue in queues.values() {
        declare_queue(&channel, queue, FieldTable::default()).await;
    }
    bind(
        &channel,
        &queues["direct-a"],
        &direct,
        "a",
        FieldTable::default(),
    )
    .await;
    bind(
        &channel,
        &queues["one-word"],
        &topic,
        "order.*",
        FieldTable::default(),
    )
    .await;
    bind(
        &channel,
        &queues["any-depth"],
        &topic,
        "order.#",
        FieldTable::default(),
    )
    .await;
    bind(&channel, &queues["all"], &topic, "#", FieldTable::default()).await;
    bind(
        &channel,
        &queues["fan-1"],
        &fanout,
        "ignored",
        FieldTable::default(),
    )
    .await;
    bind(
        &channel,
        &queues["fan-2"],
        &fanout,
        "",
        FieldTable::default(),
    )
    .await;
    let wanted = [("format", text("pdf")), ("lang", text("fr"))];
    let with = |mode: &str| {
        let mut pairs = vec![("x-match", text(mode))];
        pairs.extend(wanted.iter().cloned());
        table(&pairs)
    };
    bind(&channel, &queues["match-all"], &headers, "", with("all")).await;
    bind(&channel, &queues["match-any"], &headers, "", with("any")).await;

    let plain = BasicProperties::default;
    let headed =
        |pairs: &[(&str, AMQPValue)]| BasicProperties::default().with_headers(table(pairs));
    let mut returned = Vec::new();
    for (exchange, key, properties) in [
        (&direct, "a", plain()),
        (&direct, "b", plain()),
        (&topic, "order", plain()),
        (&topic, "order.created", plain()),
        (&topic, "order.created.eu", plain()),
        (&topic, "invoice.sent", plain()),
        (&fanout, "anything", plain()),
        (&headers, "", headed(&[("format", text("pdf"))])),
        (
            &headers,
            "",
            headed(&[("format", text("pdf")), ("lang", text("fr"))]),
        ),
        (&headers, "", headed(&[("format", text("txt"))])),
    ] {
        if let Confirmation::Ack(Some(_)) =
            publish(&channel, exchange, key, b"{}", properties, true).await
        {
            returned.push(key.to_string());
        }
    }
    let mut counts = BTreeMap::new();
    for (label, queue) in &queues {
        counts.insert(*label, ready(&channel, queue).await);
    }
    let expected: BTreeMap<&str, u32> = [
        ("direct-a", 1),
        // `order.*`: exactly one more word.
        ("one-word", 1),
        // `order.#`: zero or more more words.
        ("any-depth", 3),
        ("all", 4),
        ("fan-1", 1),
        ("fan-2", 1),
        ("match-all", 1),
        ("match-any", 2),
    ]
    .into_iter()
    .collect();
    assert_eq!(counts, expected);
    // Mandatory publishes no queue took come back: direct `b` and headers `txt`.
    assert_eq!(returned, ["b", ""]);
}

// --- prefetch --------------------------------------------------------------------------------

on_both!(prefetch_bounds_the_unacked_deliveries);

async fn prefetch_bounds_the_unacked_deliveries(target: Target) {
    let (_connector, channel) = target.channel().await;
    let queue = unique("scenario-prefetch");
    declare_queue(&channel, &queue, FieldTable::default()).await;
    for n in 0..5 {
        publish(
            &channel,
            "",
            &queue,
            format!("{n}").as_bytes(),
            BasicProperties::default(),
            false,
        )
        .await;
    }
    let (_consumer_connector, consuming) = target.channel().await;
    consuming
        .basic_qos(2, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut deliveries = consuming
        .basic_consume(
            &queue,
            "",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consuming");
    let mut held = Vec::new();
    for _ in 0..2 {
        let delivery = tokio::time::timeout(BOUND, deliveries.next())
            .await
            .expect("a delivery")
            .expect("the stream lives")
            .expect("a delivery");
        held.push(delivery);
    }
    // Two out, unacked: the other three wait in the queue.
    wait_ready(&channel, &queue, 3).await;
    assert_eq!(ready(&channel, &queue).await, 3);
    let bodies: Vec<_> = held.iter().map(|d| d.data.clone()).collect();
    assert_eq!(bodies, [b"0".to_vec(), b"1".to_vec()]);
    // One acked: exactly one more comes.
    held.remove(0)
        .acker
        .ack(BasicAckOptions::default())
        .await
        .expect("acked");
    let third = tokio::time::timeout(BOUND, deliveries.next())
        .await
        .expect("a third delivery")
        .expect("the stream lives")
        .expect("a delivery");
    assert_eq!(third.data, b"2");
    wait_ready(&channel, &queue, 2).await;
    assert!(!third.redelivered);
    drop((held, third, deliveries));
    let _ = consuming.close(200, "done").await;
}

// --- retries, then the dead-letter queue ------------------------------------------------------

/// Calls per run (the body's `run`): the two brokers' runs may share a process.
static FAILED_CALLS: Mutex<BTreeMap<String, u32>> = Mutex::new(BTreeMap::new());

fn run_of(body: &Value) -> String {
    body["run"].as_str().unwrap_or_default().to_string()
}

#[derive(Default)]
struct AlwaysFails;

#[farine::service(name = "scenario_fails")]
impl AlwaysFails {
    #[consume(exchange = "set-by-config", routing_key = "work")]
    async fn work(&self, body: Value) -> Result<(), String> {
        *FAILED_CALLS
            .lock()
            .unwrap()
            .entry(run_of(&body))
            .or_default() += 1;
        Err("always".to_string())
    }
}

on_both!(a_failing_message_is_retried_with_a_delay_then_dead_lettered);

async fn a_failing_message_is_retried_with_a_delay_then_dead_lettered(target: Target) {
    let (exchange, queue) = (unique("scenario-fail-x"), unique("scenario-fail-q"));
    let config = target.config(&format!(
        "[scenario_fails]\nmax_attempts = 3\nretry_delay = 0.05\nwork.exchange = {exchange}\nwork.queue = {queue}\n"
    ));
    let running = Runtime::new(config)
        .services(["scenario_fails"])
        .start()
        .await
        .expect("starts");
    let (_connector, channel) = target.channel().await;
    let body = format!("{{\"run\": \"{queue}\"}}");
    publish(
        &channel,
        &exchange,
        "work",
        body.as_bytes(),
        BasicProperties::default(),
        true,
    )
    .await;
    let dead = format!("{queue}.dead");
    wait_ready(&channel, &dead, 1).await;
    assert_eq!(
        FAILED_CALLS.lock().unwrap().get(&queue),
        Some(&3),
        "three attempts"
    );
    let letter = channel
        .basic_get(&dead, BasicGetOptions { no_ack: true })
        .await
        .expect("get")
        .expect("the dead letter");
    let headers = letter.properties.headers().clone().unwrap_or_default();
    assert_eq!(
        headers.inner().get(farine::amqp::ATTEMPT_HEADER),
        Some(&AMQPValue::LongUInt(3))
    );
    assert_eq!(letter.data, body.as_bytes());
    assert_eq!(ready(&channel, &queue).await, 0);
    assert_eq!(ready(&channel, &format!("{queue}.retry")).await, 0);
    running.stop().await;
}

// --- TTL ---------------------------------------------------------------------------------------

on_both!(an_expired_message_is_dead_lettered_with_its_death);

async fn an_expired_message_is_dead_lettered_with_its_death(target: Target) {
    let (_connector, channel) = target.channel().await;
    let (queue, dead) = (unique("scenario-ttl"), unique("scenario-ttl-dead"));
    declare_queue(&channel, &dead, FieldTable::default()).await;
    declare_queue(
        &channel,
        &queue,
        table(&[
            ("x-message-ttl", AMQPValue::LongInt(50)),
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text(&dead)),
        ]),
    )
    .await;
    publish(
        &channel,
        "",
        &queue,
        b"late",
        BasicProperties::default(),
        true,
    )
    .await;
    wait_ready(&channel, &dead, 1).await;
    assert_eq!(ready(&channel, &queue).await, 0);
    let letter = channel
        .basic_get(&dead, BasicGetOptions { no_ack: true })
        .await
        .expect("get")
        .expect("the expired message");
    let headers = letter.properties.headers().clone().unwrap_or_default();
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        panic!("no x-death: {headers:?}");
    };
    let Some(AMQPValue::FieldTable(death)) = deaths.as_slice().first() else {
        panic!("an empty x-death: {deaths:?}");
    };
    let field = |name: &str| death.inner().get(name).cloned();
    assert_eq!(field("reason"), Some(text("expired")));
    assert_eq!(field("queue"), Some(text(&queue)));
    assert_eq!(field("count"), Some(AMQPValue::LongLongInt(1)));
}

// --- RPC ---------------------------------------------------------------------------------------

/// The runs whose stream the server dropped.
static STREAM_DROPPED: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct DropFlag(String);

impl Drop for DropFlag {
    fn drop(&mut self) {
        STREAM_DROPPED.lock().unwrap().push(self.0.clone());
    }
}

#[derive(Default)]
struct Calculator;

#[farine::service(name = "scenario_calc")]
impl Calculator {
    #[farine::rpc::method]
    async fn add(&self, a: i64, b: i64) -> i64 {
        a + b
    }

    /// Counts up forever, one number every 10 ms, until the caller cancels.
    #[farine::rpc::method]
    fn forever(&self, run: String) -> impl Stream<Item = u64> + Send {
        stream::unfold((0u64, DropFlag(run)), |(n, flag)| async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Some((n, (n + 1, flag)))
        })
    }
}

on_both!(rpc_answers_refuses_unknown_methods_and_stops_a_cancelled_stream);

async fn rpc_answers_refuses_unknown_methods_and_stops_a_cancelled_stream(target: Target) {
    let rpc_queue = unique("scenario-calc");
    let config = target.config(&format!("[scenario_calc]\nrpc_queue = {rpc_queue}\n"));
    let running = Runtime::new(config)
        .services(["scenario_calc"])
        .start()
        .await
        .expect("starts");
    let client = farine::rpc::Client::connect(&target.uri(), "scenario_calc", BOUND)
        .await
        .expect("client");
    let sum: i64 = client.call("add", (2, 3)).await.expect("add");
    assert_eq!(sum, 5);
    match client.call::<Value>("subtract", (2, 3)).await {
        Err(RpcError::NoSuchMethod { method, .. }) => assert_eq!(method, "subtract"),
        other => panic!("expected NoSuchMethod, got {other:?}"),
    }
    let mut numbers = client
        .stream::<u64>("forever", (&rpc_queue,))
        .await
        .expect("stream");
    for expected in 0..3 {
        assert_eq!(
            numbers.next().await.expect("an item").expect("a number"),
            expected
        );
    }
    drop(numbers);
    let stopped = tokio::time::timeout(BOUND, async {
        while !STREAM_DROPPED.lock().unwrap().contains(&rpc_queue) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(
        stopped.is_ok(),
        "the server never dropped the cancelled stream"
    );
    assert_eq!(
        client
            .call::<i64>("add", (1, 1))
            .await
            .expect("still serving"),
        2
    );
    running.stop().await;
}

on_both!(rpc_with_a_queue_per_method_serves_each_method_from_its_own_queue);

/// `rpc_queue_per_method = true`: a consumer on each method's queue, the service's one queue
/// not declared, calls and cancellations as before, every consumer cancelled on stop.
async fn rpc_with_a_queue_per_method_serves_each_method_from_its_own_queue(target: Target) {
    let config = target.config("[scenario_calc]\nrpc_queue_per_method = true\n");
    let running = Runtime::new(config)
        .services(["scenario_calc"])
        .start()
        .await
        .expect("starts");
    let (_connector, channel) = target.channel().await;
    for queue in ["scenario_calc__add", "scenario_calc__forever"] {
        assert_eq!(consumers(&channel, queue).await, 1, "{queue}");
    }
    let client = farine::rpc::Client::connect(&target.uri(), "scenario_calc", BOUND)
        .await
        .expect("client");
    assert_eq!(client.call::<i64>("add", (2, 3)).await.expect("add"), 5);
    let run = unique("scenario-per-method");
    let mut numbers = client
        .stream::<u64>("forever", (&run,))
        .await
        .expect("stream");
    assert_eq!(numbers.next().await.expect("an item").expect("a number"), 0);
    drop(numbers);
    let stopped = tokio::time::timeout(BOUND, async {
        while !STREAM_DROPPED.lock().unwrap().contains(&run) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(
        stopped.is_ok(),
        "the server never dropped the cancelled stream"
    );
    assert_eq!(client.call::<i64>("add", (1, 1)).await.expect("add"), 2);
    running.stop().await;
    for queue in ["scenario_calc__add", "scenario_calc__forever"] {
        assert_eq!(
            consumers(&channel, queue).await,
            0,
            "{queue} after the stop"
        );
    }
}

// --- stop drains the call in flight -----------------------------------------------------------

/// Per run: the handler started, may finish, finished.
#[derive(Default)]
struct Gate {
    started: Notify,
    release: Notify,
    finished: AtomicBool,
}

static GATES: Mutex<BTreeMap<String, Arc<Gate>>> = Mutex::new(BTreeMap::new());

fn gate(run: &str) -> Arc<Gate> {
    GATES
        .lock()
        .unwrap()
        .entry(run.to_string())
        .or_default()
        .clone()
}

#[derive(Default)]
struct Slow;

#[farine::service(name = "scenario_slow")]
impl Slow {
    #[consume(exchange = "set-by-config", routing_key = "slow")]
    async fn slow(&self, body: Value) {
        let gate = gate(&run_of(&body));
        gate.started.notify_one();
        gate.release.notified().await;
        gate.finished.store(true, Ordering::SeqCst);
    }
}

on_both!(a_stop_lets_the_call_in_flight_finish_and_acks_it);

async fn a_stop_lets_the_call_in_flight_finish_and_acks_it(target: Target) {
    let (exchange, queue) = (unique("scenario-slow-x"), unique("scenario-slow-q"));
    let config = target.config(&format!(
        "[scenario_slow]\ndrain_timeout = 10\nslow.exchange = {exchange}\nslow.queue = {queue}\n"
    ));
    let running = Runtime::new(config)
        .services(["scenario_slow"])
        .start()
        .await
        .expect("starts");
    let (_connector, channel) = target.channel().await;
    let gate = gate(&queue);
    let body = format!("{{\"run\": \"{queue}\"}}");
    publish(
        &channel,
        &exchange,
        "slow",
        body.as_bytes(),
        BasicProperties::default(),
        true,
    )
    .await;
    tokio::time::timeout(BOUND, gate.started.notified())
        .await
        .expect("the handler starts");
    let stopping = tokio::spawn(running.stop());
    // The stop is under way once the consumer is cancelled; it then waits for the handler.
    let cancelled = tokio::time::timeout(BOUND, async {
        while consumers(&channel, &queue).await > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(cancelled.is_ok(), "the stop cancels the consumer");
    assert!(
        !stopping.is_finished(),
        "the stop waits for the call in flight"
    );
    gate.release.notify_one();
    tokio::time::timeout(BOUND, stopping)
        .await
        .expect("the stop ends once the call is done")
        .expect("the stop task");
    assert!(gate.finished.load(Ordering::SeqCst));
    // Acked, not requeued: nothing is left in the queue.
    assert_eq!(ready(&channel, &queue).await, 0);
}
