//! One scenario suite, two brokers: each scenario runs unchanged against the real RabbitMQ (a
//! vhost of its own) and against the test kit's in-memory broker, and must give the same
//! outcome on both. The scenarios drive the broker through farine's own transport (the same
//! code the handlers run on), so nothing here knows which broker it talks to.
//!
//! The cases (listed in `farine/src/docs/testing.md`): routing by each exchange type, the
//! prefetch bound, retries with a delay then the dead-letter queue, queue TTL dead-lettering,
//! mandatory returns, RPC (a result, NoSuchMethod, a streaming call cancelled by its caller; on
//! one queue and on a queue per method), a stop that drains the call in flight, and a stream
//! read by two handlers, from `first` and from an offset.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use farine::__private::amqp::{Channel, Connector, DeclaredQueue};
use farine::config::Config;
use farine::rpc::{RpcError, Stream, StreamExt};
use farine::testing::TestBroker;
use farine::{Runtime, StreamOffset, consume};
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
    assert_stream_dropped(&rpc_queue).await;
    assert_eq!(
        client
            .call::<i64>("add", (1, 1))
            .await
            .expect("still serving"),
        2
    );
    running.stop().await;
}

/// Waits, within the bound, until the server dropped the stream of call `run` its caller
/// cancelled.
async fn assert_stream_dropped(run: &str) {
    let stopped = tokio::time::timeout(BOUND, async {
        while !STREAM_DROPPED
            .lock()
            .unwrap()
            .iter()
            .any(|dropped| dropped == run)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(
        stopped.is_ok(),
        "the server never dropped the cancelled stream"
    );
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
    assert_stream_dropped(&run).await;
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

// --- stream queues -----------------------------------------------------------------------------

/// What each reader read, as (n, offset), by (run, reader): a run is the stream's name.
type StreamReads = BTreeMap<(String, &'static str), Vec<(u64, u64)>>;

static STREAM_READS: Mutex<StreamReads> = Mutex::new(BTreeMap::new());

fn stream_read(body: &Value, reader: &'static str, offset: StreamOffset) {
    STREAM_READS
        .lock()
        .unwrap()
        .entry((run_of(body), reader))
        .or_default()
        .push((body["n"].as_u64().unwrap_or(u64::MAX), offset.0));
}

/// What `reader` read in run `run`, by offset (up to `prefetch_count` are handled at once).
fn stream_reads(run: &str, reader: &'static str) -> Vec<(u64, u64)> {
    let mut reads = STREAM_READS
        .lock()
        .unwrap()
        .get(&(run.to_string(), reader))
        .cloned()
        .unwrap_or_default();
    reads.sort_by_key(|(_, offset)| *offset);
    reads
}

#[derive(Default)]
struct StreamFromFirst;

#[farine::service(name = "scenario_stream_first")]
impl StreamFromFirst {
    #[consume(exchange = "set-by-config", routing_key = "rk")]
    async fn read(&self, body: Value, offset: StreamOffset) {
        stream_read(&body, "from_first", offset);
    }
}

/// A second service on the same stream (two handlers of one service may not share a queue).
#[derive(Default)]
struct StreamFromTwo;

#[farine::service(name = "scenario_stream_two")]
impl StreamFromTwo {
    #[consume(exchange = "set-by-config", routing_key = "rk")]
    async fn read(&self, body: Value, offset: StreamOffset) {
        stream_read(&body, "from_two", offset);
    }
}

/// Whether, within the bound, the handlers of run `run` have read exactly these (n, offset).
async fn read_all(run: &str, from_first: &[(u64, u64)], from_two: &[(u64, u64)]) -> bool {
    tokio::time::timeout(BOUND, async {
        while stream_reads(run, "from_first") != from_first
            || stream_reads(run, "from_two") != from_two
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .is_ok()
}

on_both!(a_stream_is_read_whole_by_each_handler_from_its_start);

async fn a_stream_is_read_whole_by_each_handler_from_its_start(target: Target) {
    let (exchange, queue) = (unique("scenario-stream-x"), unique("scenario-stream-q"));
    let (_connector, channel) = target.channel().await;
    channel
        .exchange_declare(
            &exchange,
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("exchange declared");
    channel
        .queue_declare(
            &queue,
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            table(&[("x-queue-type", text("stream"))]),
        )
        .await
        .expect("stream declared");
    bind(&channel, &queue, &exchange, "rk", FieldTable::default()).await;
    let message = |n: u64| format!("{{\"run\": \"{queue}\", \"n\": {n}}}");
    for n in 0..3 {
        let body = message(n);
        publish(
            &channel,
            &exchange,
            "rk",
            body.as_bytes(),
            BasicProperties::default(),
            true,
        )
        .await;
    }
    // One runtime per reader: farine refuses two handlers of one runtime on one queue.
    let mut running = Vec::new();
    for (service, start_from) in [
        ("scenario_stream_first", "first"),
        ("scenario_stream_two", "2"),
    ] {
        let keys = format!(
            "[{service}]\nread.exchange = {exchange}\nread.exchange_type = direct\n\
             read.queue = {queue}\nread.queue_type = stream\nread.start_from = {start_from}\n"
        );
        running.push(
            Runtime::new(target.config(&keys))
                .services([service])
                .start()
                .await
                .expect("starts"),
        );
    }
    assert!(
        read_all(&queue, &[(0, 0), (1, 1), (2, 2)], &[(2, 2)]).await,
        "from first: 0, 1, 2; from offset 2: 2 (read: {:?}, {:?})",
        stream_reads(&queue, "from_first"),
        stream_reads(&queue, "from_two")
    );
    // A message appended later goes to both, at the next offset.
    publish(
        &channel,
        &exchange,
        "rk",
        message(3).as_bytes(),
        BasicProperties::default(),
        true,
    )
    .await;
    assert!(
        read_all(&queue, &[(0, 0), (1, 1), (2, 2), (3, 3)], &[(2, 2), (3, 3)]).await,
        "both read the new message (read: {:?}, {:?})",
        stream_reads(&queue, "from_first"),
        stream_reads(&queue, "from_two")
    );
    for running in running {
        running.stop().await;
    }
    // Read, acked, and still there: a stream keeps what it is read.
    assert_eq!(
        ready(&channel, &queue).await,
        0,
        "a stream counts no ready message"
    );
}

/// The reply text of the broker's refusal of `what`, its vhost named `/` (the real broker's
/// is the scenario's own).
fn refusal<T>(result: lapin::Result<T>, what: &str) -> String {
    match result.map_err(|error| error.kind().clone()) {
        Err(lapin::ErrorKind::ProtocolError(amqp)) => {
            let text = amqp.get_message().to_string();
            let mut parts = text.split("in vhost '");
            let mut out = parts.next().unwrap_or_default().to_string();
            for part in parts {
                out += "in vhost '/";
                out += part.find('\'').map_or(part, |end| &part[end..]);
            }
            out
        }
        Err(other) => panic!("{what}: not a refusal from the broker: {other:?}"),
        Ok(_) => panic!("{what}: not refused"),
    }
}

on_both!(a_stream_refuses_what_rabbitmq_refuses);

async fn a_stream_refuses_what_rabbitmq_refuses(target: Target) {
    let queue = unique("scenario-stream-rules");
    let stream = || table(&[("x-queue-type", text("stream"))]);
    let (_connector, channel) = target.channel().await;
    let error = refusal(
        channel
            .queue_declare(&queue, QueueDeclareOptions::default(), stream())
            .await,
        "a non-durable stream is refused",
    );
    assert_eq!(
        error,
        format!(
            "PRECONDITION_FAILED - invalid property 'non-durable' for queue '{queue}' in vhost '/'"
        )
    );
    for (options, property) in [
        (
            QueueDeclareOptions {
                durable: true,
                exclusive: true,
                ..Default::default()
            },
            "exclusive-owner",
        ),
        (
            QueueDeclareOptions {
                durable: true,
                auto_delete: true,
                ..Default::default()
            },
            "auto-delete",
        ),
    ] {
        let (_connector, channel) = target.channel().await;
        let error = refusal(
            channel.queue_declare(&queue, options, stream()).await,
            property,
        );
        assert_eq!(
            error,
            format!(
                "PRECONDITION_FAILED - invalid property '{property}' for queue '{queue}' in vhost '/'"
            )
        );
    }
    let (_connector, channel) = target.channel().await;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(&queue, durable, stream())
        .await
        .expect("stream declared");
    let aged = table(&[("x-queue-type", text("stream")), ("x-max-age", text("7D"))]);
    let error = refusal(
        channel.queue_declare(&queue, durable, aged).await,
        "another x-max-age",
    );
    assert_eq!(
        error,
        format!(
            "PRECONDITION_FAILED - inequivalent arg 'x-max-age' for queue '{queue}' in vhost '/': received the value '7D' of type 'longstr' but current is none"
        )
    );
    let (_connector, channel) = target.channel().await;
    let error = refusal(
        channel
            .basic_consume(
                &queue,
                "",
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await,
        "a consumer without prefetch is refused",
    );
    assert_eq!(
        error,
        format!(
            "PRECONDITION_FAILED - consumer prefetch count is not set for 'queue '{queue}' in vhost '/''"
        )
    );
    let (_connector, channel) = target.channel().await;
    let error = refusal(
        channel.basic_get(&queue, BasicGetOptions::default()).await,
        "basic.get is refused",
    );
    assert_eq!(
        error,
        format!(
            "NOT_IMPLEMENTED - basic.get not supported by stream queues queue '{queue}' in vhost '/'"
        )
    );
    let (_connector, channel) = target.channel().await;
    channel
        .basic_qos(5, BasicQosOptions::default())
        .await
        .expect("qos");
    let _consumer = channel
        .basic_consume(
            &queue,
            "",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("a consumer with a prefetch");
    let declared = declared(&channel, &queue).await;
    assert_eq!(
        (declared.message_count, declared.consumer_count),
        (0, 0),
        "a passive declare of a stream counts neither messages nor consumers"
    );
    let error = refusal(
        channel
            .basic_consume(
                &queue,
                "",
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await,
        "an automatic-ack consumer is refused",
    );
    assert_eq!(
        error,
        format!(
            "NOT_IMPLEMENTED - automatic acknowledgement not supported by stream queues queue '{queue}' in vhost '/'"
        )
    );
}
