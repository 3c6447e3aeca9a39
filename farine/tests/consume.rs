//! `#[consume]` against the real broker: decoding, settlement, failures, topology, concurrency.

mod common;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use common::{BOUND, config, start_error};
use farine::{Message, Runtime, SettleError, StartError, consume};
use farine_test_support::{Broker, unique, wait_until};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde_json::{Value, json};

fn len<T>(store: &Mutex<Vec<T>>) -> usize {
    store.lock().unwrap().len()
}

// ---------------------------------------------------------------------------------------------

static ACKED: Mutex<Vec<Value>> = Mutex::new(Vec::new());

#[derive(Default)]
struct AckProbe;

#[farine::service(name = "ack_probe")]
impl AckProbe {
    #[consume(exchange = "replaced-by-config", routing_key = "rk")]
    async fn on_message(&self, body: Value) -> Result<(), String> {
        ACKED.lock().unwrap().push(body);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumed_message_is_decoded_and_acked_after_handler_returns_ok() {
    let broker = Broker::connect().await;
    let (exchange, queue) = (unique("ack-x"), unique("ack-q"));
    let config = config(
        &broker,
        "ack_probe",
        &[
            ("on_message.exchange", &exchange),
            ("on_message.queue", &queue),
        ],
    );
    let running = Runtime::new(config)
        .services(["ack_probe"])
        .start()
        .await
        .expect("starts");

    broker.publish_json(&exchange, "rk", &json!({"n": 1})).await;
    assert!(
        wait_until(BOUND, || len(&ACKED) == 1).await,
        "handler called"
    );
    assert_eq!(ACKED.lock().unwrap()[0], json!({"n": 1}));

    running.stop().await;
    // Closing the channel requeues anything unacked: an empty queue now means it was acked.
    assert_eq!(broker.queue_state(&queue).await, Some((0, 0)));
}

// ---------------------------------------------------------------------------------------------

/// Wall-clock times: the broker times the retry queue's expiration by the wall clock, which an
/// `Instant` can disagree with by a step of the system clock.
static FAILED_CALLS: Mutex<Vec<(SystemTime, u32)>> = Mutex::new(Vec::new());

#[derive(Default)]
struct FailProbe;

#[farine::service(name = "fail_probe")]
impl FailProbe {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn always_fails(&self, _body: Value, message: &Message) -> Result<(), String> {
        FAILED_CALLS
            .lock()
            .unwrap()
            .push((SystemTime::now(), message.attempt()));
        Err("this handler always fails".into())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_message_is_retried_after_a_delay_up_to_max_attempts_then_dead_lettered() {
    let broker = Broker::connect().await;
    let (exchange, queue) = (unique("fail-x"), unique("fail-q"));
    let config = config(
        &broker,
        "fail_probe",
        &[
            ("always_fails.exchange", &exchange),
            ("always_fails.queue", &queue),
            ("retry_delay", "300ms"),
            ("max_attempts", "3"),
        ],
    );
    let running = Runtime::new(config)
        .services(["fail_probe"])
        .start()
        .await
        .expect("starts");

    broker.publish_json(&exchange, "rk", &json!({"n": 1})).await;
    assert!(
        wait_until(BOUND, || len(&FAILED_CALLS) == 3).await,
        "three attempts"
    );
    let dead = broker
        .wait_for_messages(&format!("{queue}.dead"), 1, BOUND)
        .await;
    running.stop().await;
    // Dead-lettered after the last attempt: stopping requeues anything unsettled, and the
    // queue is empty.
    assert_eq!(broker.queue_state(&queue).await, Some((0, 0)));
    assert_eq!(dead.len(), 1, "in the dead-letter queue");
    assert_eq!(dead[0].json(), json!({"n": 1}));
    let calls = FAILED_CALLS.lock().unwrap().clone();
    let attempts: Vec<_> = calls.iter().map(|(_, attempt)| *attempt).collect();
    assert_eq!(attempts, vec![1, 2, 3], "no hot redelivery loop");
    for pair in calls.windows(2) {
        assert!(
            pair[1].0.duration_since(pair[0].0).unwrap_or_default() >= Duration::from_millis(300),
            "each retry waited for retry_delay: {calls:?}"
        );
    }
}

static FLAKY_CALLS: Mutex<Vec<(bool, u32)>> = Mutex::new(Vec::new());

#[derive(Default)]
struct FlakyProbe;

#[farine::service(name = "flaky_probe")]
impl FlakyProbe {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn fails_once(&self, _body: Value, message: &Message) -> Result<(), String> {
        let mut calls = FLAKY_CALLS.lock().unwrap();
        calls.push((message.redelivered(), message.attempt()));
        if calls.len() == 1 {
            return Err("a transient failure".into());
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_redelivered_by_the_broker_still_gets_its_retries() {
    let broker = Broker::connect().await;
    let (exchange, queue) = (unique("flaky-x"), unique("flaky-q"));
    let config = config(
        &broker,
        "flaky_probe",
        &[
            ("fails_once.exchange", &exchange),
            ("fails_once.queue", &queue),
            ("retry_delay", "10ms"),
        ],
    );
    // Start once to declare the topology, then stop.
    Runtime::new(config.clone())
        .services(["flaky_probe"])
        .start()
        .await
        .expect("starts")
        .stop()
        .await;
    // Deliver the message to a consumer that dies without acking: it comes back redelivered.
    broker.publish_json(&exchange, "rk", &json!({"n": 1})).await;
    let other = broker.connection().create_channel().await.unwrap();
    let taken = other
        .basic_get(
            queue.as_str().into(),
            lapin::options::BasicGetOptions::default(),
        )
        .await
        .unwrap();
    assert!(taken.is_some());
    other
        .close(200, "gone without acking".into())
        .await
        .unwrap();

    let running = Runtime::new(config)
        .services(["flaky_probe"])
        .start()
        .await
        .expect("starts again");
    assert!(
        wait_until(BOUND, || len(&FLAKY_CALLS) == 2).await,
        "retried, not dropped"
    );
    running.stop().await;
    assert_eq!(*FLAKY_CALLS.lock().unwrap(), vec![(true, 1), (false, 2)]);
    assert_eq!(broker.queue_state(&queue).await, Some((0, 0)));
}

// ---------------------------------------------------------------------------------------------

static PANIC_SEEN: Mutex<Vec<u64>> = Mutex::new(Vec::new());
static PANICS: AtomicUsize = AtomicUsize::new(0);

#[derive(Default)]
struct PanicProbe;

#[farine::service(name = "panic_probe")]
impl PanicProbe {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn may_panic(&self, body: Value) -> Result<(), String> {
        if body["panic"] == true {
            PANICS.fetch_add(1, Ordering::SeqCst);
            panic!("the handler panicked on purpose");
        }
        PANIC_SEEN
            .lock()
            .unwrap()
            .push(body["n"].as_u64().unwrap_or(0));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_caught_and_the_consumer_keeps_handling_messages() {
    let broker = Broker::connect().await;
    let (exchange, queue) = (unique("panic-x"), unique("panic-q"));
    let config = config(
        &broker,
        "panic_probe",
        &[
            ("may_panic.exchange", &exchange),
            ("may_panic.queue", &queue),
            ("retry_delay", "50ms"),
            ("max_attempts", "2"),
        ],
    );
    let running = Runtime::new(config)
        .services(["panic_probe"])
        .start()
        .await
        .expect("starts");

    broker
        .publish_json(&exchange, "rk", &json!({"panic": true}))
        .await;
    broker.publish_json(&exchange, "rk", &json!({"n": 2})).await;
    assert!(
        wait_until(BOUND, || PANIC_SEEN.lock().unwrap().contains(&2)).await,
        "the message after the panic was handled"
    );
    // Treated as an error: retried once (max_attempts = 2), failed again, then dead-lettered.
    assert!(wait_until(BOUND, || PANICS.load(Ordering::SeqCst) == 2).await);
    running.stop().await;
    assert_eq!(broker.queue_state(&queue).await, Some((0, 0)));
}

// ---------------------------------------------------------------------------------------------

#[derive(serde::Deserialize, Debug)]
struct Order {
    id: u64,
}

static ORDERS: Mutex<Vec<u64>> = Mutex::new(Vec::new());

#[derive(Default)]
struct DecodeProbe;

#[farine::service(name = "decode_probe")]
impl DecodeProbe {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn on_order(&self, order: Order) -> Result<(), String> {
        ORDERS.lock().unwrap().push(order.id);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_does_not_decode_is_dead_lettered_without_retries_and_never_reaches_the_handler()
 {
    let broker = Broker::connect().await;
    let (exchange, queue) = (unique("decode-x"), unique("decode-q"));
    let config = config(
        &broker,
        "decode_probe",
        &[("on_order.exchange", &exchange), ("on_order.queue", &queue)],
    );
    let running = Runtime::new(config)
        .services(["decode_probe"])
        .start()
        .await
        .expect("starts");

    broker.publish(&exchange, "rk", b"this is not json").await;
    broker
        .publish_json(&exchange, "rk", &json!({"wrong": "shape"}))
        .await;
    broker
        .publish_json(&exchange, "rk", &json!({"id": 7}))
        .await;
    assert!(wait_until(BOUND, || len(&ORDERS) == 1).await);
    let dead = broker
        .wait_for_messages(&format!("{queue}.dead"), 2, BOUND)
        .await;
    running.stop().await;
    assert_eq!(*ORDERS.lock().unwrap(), vec![7]);
    assert_eq!(
        broker.queue_state(&queue).await,
        Some((0, 0)),
        "the bad bodies were not requeued"
    );
    // Deliveries are handled concurrently: the dead letters come in either order.
    let mut bodies: Vec<_> = dead.iter().map(|m| m.body.clone()).collect();
    bodies.sort();
    assert_eq!(
        bodies,
        vec![
            b"this is not json".to_vec(),
            br#"{"wrong":"shape"}"#.to_vec(),
        ]
    );
}

// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
struct Seen {
    n: u64,
    redelivered: bool,
    delivery_tag: u64,
    second_ack_refused: bool,
}

static SETTLED: Mutex<Vec<Seen>> = Mutex::new(Vec::new());

#[derive(Default)]
struct SettleProbe;

#[farine::service(name = "settle_probe")]
impl SettleProbe {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn settles_itself(&self, body: Value, message: Message) -> Result<(), String> {
        let n = body["n"].as_u64().unwrap_or(0);
        let mut second_ack_refused = false;
        if n == 1 && !message.redelivered() {
            message.nack(true).await.map_err(|e| e.to_string())?;
        } else {
            message.ack().await.map_err(|e| e.to_string())?;
            second_ack_refused =
                matches!(message.ack().await, Err(SettleError::AlreadySettled { .. }));
        }
        SETTLED.lock().unwrap().push(Seen {
            n,
            redelivered: message.redelivered(),
            delivery_tag: message.delivery_tag(),
            second_ack_refused,
        });
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_handler_settled_itself_is_not_settled_again() {
    let broker = Broker::connect().await;
    let (exchange, queue) = (unique("settle-x"), unique("settle-q"));
    let config = config(
        &broker,
        "settle_probe",
        &[
            ("settles_itself.exchange", &exchange),
            ("settles_itself.queue", &queue),
            ("prefetch_count", "1"),
        ],
    );
    let running = Runtime::new(config)
        .services(["settle_probe"])
        .start()
        .await
        .expect("starts");

    broker.publish_json(&exchange, "rk", &json!({"n": 1})).await;
    assert!(wait_until(BOUND, || len(&SETTLED) == 2).await);
    broker.publish_json(&exchange, "rk", &json!({"n": 2})).await;
    assert!(wait_until(BOUND, || len(&SETTLED) == 3).await);
    running.stop().await;

    // In delivery order: the first handling may record itself after the redelivery's (it
    // records after its nack, which is what lets the redelivery come).
    let mut seen = SETTLED.lock().unwrap().clone();
    seen.sort_by_key(|s| s.delivery_tag);
    let summary: Vec<_> = seen.iter().map(|s| (s.n, s.redelivered)).collect();
    assert_eq!(summary, vec![(1, false), (1, true), (2, false)]);
    // One channel throughout: a second ack by farine would have closed it (PRECONDITION_FAILED)
    // and the consumer would have restarted with delivery tags from 1 again (tags 1, 1, 2).
    let tags: Vec<_> = seen.iter().map(|s| s.delivery_tag).collect();
    assert_eq!(tags, vec![1, 2, 3]);
    assert!(seen[1].second_ack_refused && seen[2].second_ack_refused);
    assert_eq!(broker.queue_state(&queue).await, Some((0, 0)));
}

// ---------------------------------------------------------------------------------------------

/// (routing key, `x-trace` header, message id, redelivered)
type Metadata = (String, Option<String>, Option<String>, bool);

static METADATA: Mutex<Vec<Metadata>> = Mutex::new(Vec::new());

#[derive(Default)]
struct MetadataProbe;

#[farine::service(name = "metadata_probe")]
impl MetadataProbe {
    #[consume(exchange = "x", routing_key = "order.created")]
    async fn inspect(&self, _body: Value, message: &Message) {
        let trace = match message.header("x-trace") {
            Some(AMQPValue::LongString(text)) => Some(text.to_string()),
            _ => None,
        };
        METADATA.lock().unwrap().push((
            message.routing_key().to_string(),
            trace,
            message.message_id().map(str::to_string),
            message.redelivered(),
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_message_handle_exposes_routing_key_headers_and_properties() {
    let broker = Broker::connect().await;
    let (exchange, queue) = (unique("meta-x"), unique("meta-q"));
    let config = config(
        &broker,
        "metadata_probe",
        &[("inspect.exchange", &exchange), ("inspect.queue", &queue)],
    );
    let running = Runtime::new(config)
        .services(["metadata_probe"])
        .start()
        .await
        .expect("starts");

    let mut headers = FieldTable::default();
    headers.insert("x-trace".into(), AMQPValue::LongString("abc".into()));
    let properties = BasicProperties::default()
        .with_headers(headers)
        .with_message_id(ShortString::from("m-1"));
    broker
        .publish_with(&exchange, "order.created", b"{}", properties)
        .await;
    assert!(wait_until(BOUND, || len(&METADATA) == 1).await);
    running.stop().await;
    assert_eq!(
        METADATA.lock().unwrap()[0],
        (
            "order.created".to_string(),
            Some("abc".to_string()),
            Some("m-1".to_string()),
            false
        )
    );
}

// ---------------------------------------------------------------------------------------------

static FIRST: Mutex<Vec<Value>> = Mutex::new(Vec::new());
static SECOND: Mutex<Vec<Value>> = Mutex::new(Vec::new());

#[derive(Default)]
struct TwoHandlers;

#[farine::service(name = "two_handlers")]
impl TwoHandlers {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn first(&self, body: Value) {
        FIRST.lock().unwrap().push(body);
    }

    #[consume(exchange = "x", routing_key = "rk")]
    async fn second(&self, body: Value) {
        SECOND.lock().unwrap().push(body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_handlers_of_one_service_each_get_every_message_on_their_own_queue() {
    let broker = Broker::connect().await;
    let exchange = unique("two-x");
    let (q1, q2) = (unique("two-q1"), unique("two-q2"));
    let config = config(
        &broker,
        "two_handlers",
        &[
            ("exchange", &exchange),
            ("first.queue", &q1),
            ("second.queue", &q2),
        ],
    );
    let running = Runtime::new(config)
        .services(["two_handlers"])
        .start()
        .await
        .expect("starts");
    for n in 0..5 {
        broker.publish_json(&exchange, "rk", &json!({"n": n})).await;
    }
    assert!(wait_until(BOUND, || len(&FIRST) == 5 && len(&SECOND) == 5).await);
    running.stop().await;
}

// ---------------------------------------------------------------------------------------------

static INSTANCES: AtomicU64 = AtomicU64::new(0);
static COMPETING: Mutex<Vec<(u64, u64)>> = Mutex::new(Vec::new());

struct Competing {
    instance: u64,
}

impl Default for Competing {
    fn default() -> Self {
        Self {
            instance: INSTANCES.fetch_add(1, Ordering::SeqCst),
        }
    }
}

#[farine::service(name = "competing")]
impl Competing {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn work(&self, body: Value) {
        tokio::time::sleep(Duration::from_millis(5)).await;
        COMPETING
            .lock()
            .unwrap()
            .push((self.instance, body["n"].as_u64().unwrap_or(u64::MAX)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_of_one_service_share_its_queue_as_competing_consumers() {
    let broker = Broker::connect().await;
    let (exchange, queue) = (unique("compete-x"), unique("compete-q"));
    let options = [
        ("work.exchange", exchange.as_str()),
        ("work.queue", queue.as_str()),
        ("prefetch_count", "1"),
    ];
    let a = Runtime::new(config(&broker, "competing", &options))
        .services(["competing"])
        .start()
        .await
        .expect("first starts");
    let b = Runtime::new(config(&broker, "competing", &options))
        .services(["competing"])
        .start()
        .await
        .expect("second starts");
    assert!(broker.wait_for_consumers(&queue, 2, BOUND).await);
    for n in 0..40 {
        broker.publish_json(&exchange, "rk", &json!({"n": n})).await;
    }
    assert!(wait_until(BOUND, || len(&COMPETING) >= 40).await);
    a.stop().await;
    b.stop().await;

    let handled = COMPETING.lock().unwrap().clone();
    let mut per_message: BTreeMap<u64, usize> = BTreeMap::new();
    let mut per_instance: BTreeMap<u64, usize> = BTreeMap::new();
    for (instance, n) in &handled {
        *per_message.entry(*n).or_default() += 1;
        *per_instance.entry(*instance).or_default() += 1;
    }
    assert_eq!(per_message.len(), 40, "every message handled");
    assert!(per_message.values().all(|&c| c == 1), "each exactly once");
    assert_eq!(
        per_instance.len(),
        2,
        "both instances took a share: {per_instance:?}"
    );
}

// ---------------------------------------------------------------------------------------------

static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
static MAX_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
static RELEASE: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(0);
static CONCURRENT_DONE: AtomicUsize = AtomicUsize::new(0);

#[derive(Default)]
struct ConcurrencyProbe;

#[farine::service(name = "concurrency_probe")]
impl ConcurrencyProbe {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn slow(&self, _body: Value) {
        let now = IN_FLIGHT.fetch_add(1, Ordering::SeqCst) + 1;
        MAX_IN_FLIGHT.fetch_max(now, Ordering::SeqCst);
        if let Ok(permit) = RELEASE.acquire().await {
            permit.forget();
        }
        IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
        CONCURRENT_DONE.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_to_prefetch_count_messages_are_handled_at_once_and_no_more() {
    let broker = Broker::connect().await;
    let (exchange, queue) = (unique("conc-x"), unique("conc-q"));
    let config = config(
        &broker,
        "concurrency_probe",
        &[
            ("slow.exchange", &exchange),
            ("slow.queue", &queue),
            ("prefetch_count", "3"),
        ],
    );
    let running = Runtime::new(config)
        .services(["concurrency_probe"])
        .start()
        .await
        .expect("starts");
    for n in 0..8 {
        broker.publish_json(&exchange, "rk", &json!({"n": n})).await;
    }
    assert!(wait_until(BOUND, || IN_FLIGHT.load(Ordering::SeqCst) == 3).await);
    // The other five wait in the queue while three handlers hold the prefetch window.
    assert_eq!(broker.queue_state(&queue).await.map(|s| s.0), Some(5));
    RELEASE.add_permits(8);
    assert!(wait_until(BOUND, || CONCURRENT_DONE.load(Ordering::SeqCst) == 8).await);
    running.stop().await;
    assert_eq!(MAX_IN_FLIGHT.load(Ordering::SeqCst), 3);
}

// ---------------------------------------------------------------------------------------------

static DRAINED: AtomicUsize = AtomicUsize::new(0);
static DRAIN_STARTED: AtomicUsize = AtomicUsize::new(0);
static DRAIN_RELEASE: tokio::sync::Notify = tokio::sync::Notify::const_new();

#[derive(Default)]
struct DrainProbe;

#[farine::service(name = "drain_probe")]
impl DrainProbe {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn held(&self, body: Value) {
        DRAIN_STARTED.fetch_add(1, Ordering::SeqCst);
        if body["hold_forever"] == true {
            std::future::pending::<()>().await;
        }
        DRAIN_RELEASE.notified().await;
        DRAINED.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_in_flight_handlers_finish_and_requeues_what_outlives_the_drain_timeout() {
    let broker = Broker::connect().await;
    let (exchange, queue) = (unique("drain-x"), unique("drain-q"));
    let config = config(
        &broker,
        "drain_probe",
        &[
            ("held.exchange", &exchange),
            ("held.queue", &queue),
            ("drain_timeout", "1s"),
        ],
    );
    let running = Runtime::new(config)
        .services(["drain_probe"])
        .start()
        .await
        .expect("starts");
    broker.publish_json(&exchange, "rk", &json!({"n": 1})).await;
    broker
        .publish_json(&exchange, "rk", &json!({"hold_forever": true}))
        .await;
    assert!(wait_until(BOUND, || DRAIN_STARTED.load(Ordering::SeqCst) == 2).await);

    let stopping = tokio::spawn(running.stop());
    // The well-behaved handler finishes during the drain and its message is acked...
    assert!(
        wait_until(BOUND, || {
            DRAIN_RELEASE.notify_waiters();
            DRAINED.load(Ordering::SeqCst) == 1
        })
        .await
    );
    tokio::time::timeout(BOUND, stopping)
        .await
        .expect("stop returns after the drain timeout")
        .expect("stop does not panic");
    // ...the one still running at the drain timeout is stopped and its message requeued.
    assert_eq!(broker.queue_state(&queue).await, Some((1, 0)));
}

// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct DisabledProbe;

#[farine::service(name = "disabled_probe")]
impl DisabledProbe {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn never(&self, _body: Value) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_service_is_not_started() {
    let broker = Broker::connect().await;
    let (exchange, queue) = (unique("disabled-x"), unique("disabled-q"));
    let config = config(
        &broker,
        "disabled_probe",
        &[
            ("enabled", "false"),
            ("never.exchange", &exchange),
            ("never.queue", &queue),
        ],
    );
    let error = start_error(config, "disabled_probe", "nothing to start").await;
    assert!(matches!(error, StartError::NothingToStart(_)), "{error}");
    assert!(error.to_string().contains("disabled"), "{error}");
    // A started consumer declares its exchange and queue: nothing was declared in the vhost.
    assert_eq!(
        broker.declared(),
        (vec![], vec![]),
        "no queue or exchange declared"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_without_its_config_section_does_not_start_and_the_error_names_it() {
    let config = farine::config::Config::from_ini("[other]\n", "test.ini").unwrap();
    let error = start_error(config, "ack_probe", "missing section").await;
    let text = error.to_string();
    assert!(error.is_config(), "{text}");
    assert!(
        text.contains("test.ini") && text.contains("[ack_probe]"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_fails_start_naming_host_and_port_but_not_the_password() {
    let text = "[ack_probe]\namqp_uri = amqp://guest:s3cret-pw@127.0.0.1:1\nconnect_timeout = 60\n";
    let config = farine::config::Config::from_ini(text, "test.ini").unwrap();
    let started = Instant::now();
    let error = start_error(config, "ack_probe", "cannot connect").await;
    let text = error.to_string();
    // The refusal ends start-up, not the minute-long connect_timeout.
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(matches!(error, StartError::Connect(_)), "{text}");
    assert!(text.contains("127.0.0.1:1"), "{text}");
    assert!(!text.contains("s3cret-pw"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_handlers_configured_onto_one_queue_are_refused_at_start() {
    let broker = Broker::connect().await;
    let queue = unique("shared-q");
    let config = config(
        &broker,
        "two_handlers",
        &[("first.queue", &queue), ("second.queue", &queue)],
    );
    let error = start_error(config, "two_handlers", "conflict").await;
    let text = error.to_string();
    assert!(error.is_config(), "{text}");
    assert!(
        text.contains("two_handlers.first")
            && text.contains("two_handlers.second")
            && text.contains(&queue),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefetch_count_or_max_attempts_out_of_range_is_a_config_error_giving_the_range() {
    let broker = Broker::connect().await;
    for (key, value, range) in [
        ("prefetch_count", "0", "from 1 to 65535"),
        ("prefetch_count", "lots", "from 1 to 65535"),
        ("prefetch_count", "65536", "from 1 to 65535"),
        ("max_attempts", "0", "from 1 to 4294967295"),
    ] {
        let config = config(&broker, "ack_probe", &[(key, value)]);
        let error = start_error(config, "ack_probe", "refused").await;
        let text = error.to_string();
        assert!(error.is_config(), "{text}");
        assert!(
            text.contains(&format!("`{key}` is \"{value}\"")) && text.contains(range),
            "{key} = {value}: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_name_set_for_the_whole_service_is_refused_and_none_is_taken_service_wide() {
    let broker = Broker::connect().await;
    for key in ["queue", "retry_queue", "dead_letter_queue"] {
        let config = config(&broker, "ack_probe", &[(key, "shared")]);
        let error = start_error(config, "ack_probe", "a shared queue name").await;
        let text = error.to_string();
        assert!(error.is_config(), "{text}");
        assert!(text.contains(&format!("on_message.{key} = ...")), "{text}");
    }

    // `none` applies to every handler of the service: nothing but the handler's queue.
    let (exchange, queue) = (unique("none-x"), unique("none-q"));
    let config = config(
        &broker,
        "ack_probe",
        &[
            ("on_message.exchange", &exchange),
            ("on_message.queue", &queue),
            ("retry_queue", "none"),
            ("dead_letter_queue", "none"),
        ],
    );
    let running = Runtime::new(config)
        .services(["ack_probe"])
        .start()
        .await
        .expect("starts");
    let declared = broker.declared();
    running.stop().await;
    assert_eq!(declared.0, vec![queue.clone()], "{declared:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_inherited_from_default_are_not_taken_and_keys_used_through_interpolation_are_known()
{
    let broker = Broker::connect().await;
    let (exchange, base) = (unique("inherit-x"), unique("inherit"));
    // [DEFAULT] may be shared with other programs: its queue names are neither taken nor refused.
    let text = format!(
        "[DEFAULT]\namqp_uri = {}\nqueue = legacy\nretry_queue = legacy.retry\n\n[ack_probe]\nbase = {base}\non_message.exchange = {exchange}\non_message.queue = %(base)s-q\n",
        broker.uri()
    );
    let config = farine::config::Config::from_ini(&text, "test.ini").unwrap();
    let (ok, lines) = Runtime::new(config.clone())
        .services(["ack_probe"])
        .check()
        .await;
    assert!(ok, "`base` is read through %(base)s: {lines:?}");
    let running = Runtime::new(config)
        .services(["ack_probe"])
        .start()
        .await
        .expect("starts");
    let declared = broker.declared();
    running.stop().await;
    let queue = format!("{base}-q");
    let mut expected = vec![
        queue.clone(),
        format!("{queue}.dead"),
        format!("{queue}.retry"),
    ];
    expected.sort();
    let mut got = declared.0.clone();
    got.sort();
    assert_eq!(got, expected, "{declared:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_no_handler_of_the_service_reads_fails_check() {
    let broker = Broker::connect().await;
    // `interval` is an #[execute] key: this service has only a consumer.
    let config = config(&broker, "ack_probe", &[("interval", "5")]);
    let (ok, lines) = Runtime::new(config).services(["ack_probe"]).check().await;
    assert!(!ok, "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|line| line.contains("`interval`: no handler of service `ack_probe` reads it")),
        "{lines:?}"
    );
}
