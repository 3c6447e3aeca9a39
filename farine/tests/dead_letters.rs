//! Failures and poison messages against the real broker: retries through the retry queue,
//! dead letters with their error, replay.

mod common;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use common::{BOUND, config};
use farine::amqp::{ATTEMPT_HEADER, ERROR_HEADER, EXCHANGE_HEADER, QUEUE_HEADER, REASON_HEADER};
use farine::{Message, Runtime, consume};
use farine_test_support::{Broker, Received, unique, wait_until};
use lapin::types::AMQPValue;
use serde_json::{Value, json};

fn header(message: &Received, name: &str) -> Option<AMQPValue> {
    message
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(name).cloned())
}

fn header_text(message: &Received, name: &str) -> String {
    match header(message, name) {
        Some(AMQPValue::LongString(text)) => text.to_string(),
        other => panic!("header {name} is not a string: {other:?}"),
    }
}

fn header_number(message: &Received, name: &str) -> i64 {
    match header(message, name) {
        Some(AMQPValue::LongUInt(n)) => i64::from(n),
        Some(AMQPValue::LongLongInt(n)) => n,
        Some(AMQPValue::LongInt(n)) => i64::from(n),
        other => panic!("header {name} is not a number: {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------

/// The handler's calls, in order: `Ok(n)` for a good message, `Err((attempt, at))` for the
/// poison one. `at` is wall-clock time because the broker times a message's expiration by the
/// wall clock (`os:system_time`): an `Instant` can disagree with it by a step of the system clock
/// (a virtual machine resumed, a time sync), enough to see a retry "early" by the monotonic clock.
static CALLS: Mutex<Vec<Result<u64, (u32, SystemTime)>>> = Mutex::new(Vec::new());

#[derive(Default)]
struct PoisonProbe;

#[farine::service(name = "poison_probe")]
impl PoisonProbe {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn work(&self, body: Value, message: &Message) -> Result<(), String> {
        if body["poison"] == json!(true) {
            CALLS
                .lock()
                .unwrap()
                .push(Err((message.attempt(), SystemTime::now())));
            return Err("poisoned: this message can never be handled".into());
        }
        CALLS
            .lock()
            .unwrap()
            .push(Ok(body["n"].as_u64().unwrap_or(0)));
        Ok(())
    }
}

fn poison_attempts() -> Vec<(u32, SystemTime)> {
    CALLS
        .lock()
        .unwrap()
        .iter()
        .filter_map(|c| c.err())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_always_fails_is_dead_lettered_with_its_error_while_the_messages_behind_it_flow()
 {
    let broker = Broker::connect().await;
    let (exchange, queue) = (unique("poison-x"), unique("poison-q"));
    let config = config(
        &broker,
        "poison_probe",
        &[
            ("work.exchange", &exchange),
            ("work.queue", &queue),
            ("retry_delay", "1s"),
            ("max_attempts", "3"),
            // One message at a time: a retry that waited in the consumer would hold up all the
            // others behind it.
            ("prefetch_count", "1"),
        ],
    );
    let running = Runtime::new(config)
        .services(["poison_probe"])
        .start()
        .await
        .expect("starts");

    broker
        .publish_json(&exchange, "rk", &json!({"poison": true}))
        .await;
    for n in 0..100 {
        broker
            .publish_json(&exchange, "rk", &json!({ "n": n }))
            .await;
    }
    let dead = format!("{queue}.dead");
    let dead_letters = broker.wait_for_messages(&dead, 1, BOUND).await;
    running.stop().await;

    // The hundred messages behind the poison were all handled before its last attempt.
    let calls = CALLS.lock().unwrap().clone();
    let good: Vec<_> = calls.iter().filter_map(|c| c.ok()).collect();
    assert_eq!(good, (0..100).collect::<Vec<_>>());
    let last_poison = calls.iter().rposition(Result::is_err).unwrap();
    let last_good = calls.iter().rposition(Result::is_ok).unwrap();
    assert!(
        last_good < last_poison,
        "the good messages did not wait for the poison's retries"
    );

    // Three attempts, each after retry_delay (waited in the broker's retry queue), no more.
    let attempts = poison_attempts();
    assert_eq!(
        attempts.iter().map(|a| a.0).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    for pair in attempts.windows(2) {
        let gap = pair[1].1.duration_since(pair[0].1).unwrap_or_default();
        assert!(
            gap >= Duration::from_millis(1000),
            "attempt {} came {gap:?} after attempt {}",
            pair[1].0,
            pair[0].0
        );
    }

    assert_eq!(dead_letters.len(), 1, "one dead letter");
    let letter = &dead_letters[0];
    assert_eq!(
        letter.json(),
        json!({"poison": true}),
        "the body is unchanged"
    );
    assert_eq!(header_number(letter, ATTEMPT_HEADER), 3);
    assert!(header_text(letter, ERROR_HEADER).contains("poisoned"));
    assert_eq!(header_text(letter, REASON_HEADER), "failed");
    assert_eq!(header_text(letter, QUEUE_HEADER), queue);
    assert_eq!(header_text(letter, EXCHANGE_HEADER), exchange);
    assert!(
        letter.properties.expiration().is_none(),
        "a dead letter does not expire"
    );
    // Nothing is left behind in the queue or the retry queue.
    assert_eq!(broker.queue_state(&queue).await, Some((0, 0)));
    assert_eq!(
        broker.queue_state(&format!("{queue}.retry")).await,
        Some((0, 0))
    );
}

// ---------------------------------------------------------------------------------------------

static ORDERS: Mutex<Vec<u64>> = Mutex::new(Vec::new());

#[derive(serde::Deserialize)]
struct Order {
    id: u64,
}

#[derive(Default)]
struct ShapeProbe;

#[farine::service(name = "shape_probe")]
impl ShapeProbe {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn on_order(&self, order: Order) -> Result<(), String> {
        ORDERS.lock().unwrap().push(order.id);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_does_not_decode_goes_straight_to_the_dead_letter_queue_with_the_reason() {
    let broker = Broker::connect().await;
    let (exchange, queue) = (unique("shape-x"), unique("shape-q"));
    let config = config(
        &broker,
        "shape_probe",
        &[
            ("on_order.exchange", &exchange),
            ("on_order.queue", &queue),
            ("max_attempts", "5"),
        ],
    );
    let running = Runtime::new(config)
        .services(["shape_probe"])
        .start()
        .await
        .expect("starts");

    broker.publish(&exchange, "rk", b"{not json").await;
    broker
        .publish_json(&exchange, "rk", &json!({"id": 7}))
        .await;
    let dead = broker
        .wait_for_messages(&format!("{queue}.dead"), 1, BOUND)
        .await;
    assert!(wait_until(BOUND, || ORDERS.lock().unwrap().len() == 1).await);
    running.stop().await;

    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].body, b"{not json");
    assert_eq!(header_text(&dead[0], REASON_HEADER), "undecodable");
    assert_eq!(
        header_number(&dead[0], ATTEMPT_HEADER),
        1,
        "not retried: it would fail the same way"
    );
    assert!(header_text(&dead[0], ERROR_HEADER).contains("does not decode"));
    assert_eq!(*ORDERS.lock().unwrap(), vec![7]);
}

// ---------------------------------------------------------------------------------------------

static FIXED: AtomicBool = AtomicBool::new(false);
static REPLAYED: Mutex<Vec<(u64, u32)>> = Mutex::new(Vec::new());

#[derive(Default)]
struct ReplayProbe;

#[farine::service(name = "replay_probe")]
impl ReplayProbe {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn flaky(&self, body: Value, message: &Message) -> Result<(), String> {
        if !FIXED.load(Ordering::SeqCst) {
            return Err("the downstream service is down".into());
        }
        REPLAYED
            .lock()
            .unwrap()
            .push((body["n"].as_u64().unwrap_or(0), message.attempt()));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_dead_letters_sends_them_back_to_the_handler_with_a_fresh_attempt_count() {
    let broker = Broker::connect().await;
    let (exchange, queue) = (unique("replay-x"), unique("replay-q"));
    let options = [
        ("flaky.exchange", exchange.as_str()),
        ("flaky.queue", queue.as_str()),
        ("retry_delay", "20ms"),
        ("max_attempts", "2"),
    ];
    let running = Runtime::new(config(&broker, "replay_probe", &options))
        .services(["replay_probe"])
        .start()
        .await
        .expect("starts");
    for n in 0..3 {
        broker
            .publish_json(&exchange, "rk", &json!({ "n": n }))
            .await;
    }
    let dead = format!("{queue}.dead");
    let deadline = Instant::now() + BOUND;
    while broker.queue_state(&dead).await.map(|s| s.0) != Some(3) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(broker.queue_state(&dead).await.map(|s| s.0), Some(3));

    // The cause is fixed; the dead letters go back.
    FIXED.store(true, Ordering::SeqCst);
    let (moved, from, to) = Runtime::new(config(&broker, "replay_probe", &options))
        .services(["replay_probe"])
        .replay_dead_letters("replay_probe.flaky")
        .await
        .expect("replays");
    assert_eq!(
        (moved, from.as_str(), to.as_str()),
        (3, dead.as_str(), queue.as_str())
    );
    assert!(wait_until(BOUND, || REPLAYED.lock().unwrap().len() == 3).await);
    running.stop().await;
    let mut replayed = REPLAYED.lock().unwrap().clone();
    replayed.sort();
    assert_eq!(
        replayed,
        vec![(0, 1), (1, 1), (2, 1)],
        "each on its first attempt again"
    );
    assert_eq!(broker.queue_state(&dead).await, Some((0, 0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_an_unknown_handler_is_a_config_error_listing_the_handlers() {
    let broker = Broker::connect().await;
    let error = Runtime::new(config(&broker, "replay_probe", &[]))
        .services(["replay_probe"])
        .replay_dead_letters("replay_probe.nope")
        .await
        .expect_err("no such handler");
    assert!(error.is_config(), "{error}");
    assert!(error.to_string().contains("replay_probe.flaky"), "{error}");
}

// ---------------------------------------------------------------------------------------------

static QUORUM_CALLS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

#[derive(Default)]
struct QuorumProbe;

#[farine::service(name = "quorum_probe")]
impl QuorumProbe {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn work(&self, _body: Value, message: &Message) -> Result<(), String> {
        QUORUM_CALLS.lock().unwrap().push(message.attempt());
        Err("always".into())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_quorum_queues_and_at_least_once_dead_lettering_retries_and_dead_letters_work_alike() {
    let broker = Broker::connect().await;
    let (exchange, queue) = (unique("quorum-x"), unique("quorum-q"));
    let config = config(
        &broker,
        "quorum_probe",
        &[
            ("work.exchange", &exchange),
            ("work.queue", &queue),
            ("retry_delay", "50ms"),
            ("max_attempts", "3"),
            ("queue_arguments", "x-queue-type = quorum"),
            (
                "retry_queue_arguments",
                "x-queue-type = quorum, x-dead-letter-strategy = at-least-once, x-overflow = reject-publish",
            ),
            ("dead_letter_queue_arguments", "x-queue-type = quorum"),
        ],
    );
    let running = Runtime::new(config)
        .services(["quorum_probe"])
        .start()
        .await
        .expect("starts with quorum queues");
    broker.publish_json(&exchange, "rk", &json!({"n": 1})).await;
    let dead = broker
        .wait_for_messages(&format!("{queue}.dead"), 1, BOUND)
        .await;
    running.stop().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(*QUORUM_CALLS.lock().unwrap(), vec![1, 2, 3]);
    assert_eq!(header_number(&dead[0], ATTEMPT_HEADER), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_type_quorum_makes_the_queue_its_retries_and_dead_letters_quorum_queues() {
    let broker = Broker::connect().await;
    let (exchange, queue) = (unique("qtype-x"), unique("qtype-q"));
    let config = config(
        &broker,
        "quorum_probe",
        &[
            ("work.exchange", &exchange),
            ("work.queue", &queue),
            ("retry_delay", "50ms"),
            ("max_attempts", "3"),
            ("queue_type", "quorum"),
        ],
    );
    let running = Runtime::new(config)
        .services(["quorum_probe"])
        .start()
        .await
        .expect("starts with quorum queues");
    broker.publish_json(&exchange, "rk", &json!({"n": 1})).await;
    let dead = broker
        .wait_for_messages(&format!("{queue}.dead"), 1, BOUND)
        .await;
    running.stop().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(*QUORUM_CALLS.lock().unwrap(), vec![1, 2, 3]);
    assert_eq!(header_number(&dead[0], ATTEMPT_HEADER), 3);
    for name in [
        queue.clone(),
        format!("{queue}.retry"),
        format!("{queue}.dead"),
    ] {
        let info = broker.queue_info(&name);
        assert_eq!(info["type"], "quorum", "{name}: {info}");
    }
    // Retries go back to the queue at least once: none is lost on the way.
    let retry = broker.queue_info(&format!("{queue}.retry"));
    assert_eq!(
        retry["arguments"]["x-dead-letter-strategy"], "at-least-once",
        "{retry}"
    );
    assert_eq!(
        retry["arguments"]["x-overflow"], "reject-publish",
        "{retry}"
    );
}

#[test]
fn queue_type_is_classic_or_quorum_and_a_quorum_queue_is_durable_shared_and_kept() {
    // The handler as its config resolves it (what `--list` and start-up read).
    let resolve = |extra: &str| {
        let config = farine::config::Config::from_ini(&format!("[quorum_probe]\n{extra}"), "t.ini")
            .expect("parses");
        let entry = farine::__private::ServiceEntry::all()
            .into_iter()
            .find(|entry| entry.name == "quorum_probe")
            .expect("registered");
        let section = entry.section(&config).expect("a section");
        let described = entry.describe(&section).remove(0);
        described.description.map_err(|e| e.to_string())
    };
    for (extra, expected) in [
        ("queue_type = lazy\n", "expected classic, quorum or stream"),
        (
            "queue_type = quorum\nqueue_exclusive = true\n",
            "option `queue_exclusive`",
        ),
        (
            "queue_type = quorum\nqueue_durable = false\n",
            "option `queue_durable`",
        ),
        (
            "queue_type = quorum\nqueue_arguments = x-queue-type = classic\n",
            "leave x-queue-type out of queue_arguments",
        ),
    ] {
        let refused = resolve(extra).expect_err(extra);
        assert!(refused.contains(expected), "{extra}: {refused}");
    }
    let quorum = resolve("queue_type = Quorum\n").expect("resolves");
    let queue = quorum.queue.expect("a queue");
    assert_eq!(queue.arguments["x-queue-type"], "quorum");
    assert!(queue.durable && !queue.exclusive && !queue.auto_delete);
    let classic = resolve("work.queue_type = classic\n").expect("resolves");
    assert_eq!(
        classic.queue.expect("a queue").arguments["x-queue-type"],
        "classic"
    );
}

// ---------------------------------------------------------------------------------------------

static REJECTED_CALLS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

#[derive(Default)]
struct NoDeadLetterQueueProbe;

#[farine::service(name = "no_dlq_probe")]
impl NoDeadLetterQueueProbe {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn work(&self, _body: Value, message: &Message) -> Result<(), String> {
        REJECTED_CALLS.lock().unwrap().push(message.attempt());
        Err("always fails".into())
    }
}

/// The first entry of the broker's `x-death` header: `(reason, queue)`.
fn first_death(message: &Received) -> (String, String) {
    let Some(AMQPValue::FieldArray(deaths)) = header(message, "x-death") else {
        panic!("no x-death header: the broker did not dead-letter this message");
    };
    let Some(AMQPValue::FieldTable(death)) = deaths.as_slice().first() else {
        panic!("an empty x-death header");
    };
    let text = |name: &str| match death.inner().get(name) {
        Some(AMQPValue::LongString(text)) => text.to_string(),
        other => panic!("x-death {name} is not a string: {other:?}"),
    };
    (text("reason"), text("queue"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_dead_letter_queue_none_the_last_failure_is_rejected_to_the_queues_own_dead_letter_exchange()
 {
    let broker = Broker::connect().await;
    let (exchange, queue, dlx) = (unique("nodlq-x"), unique("nodlq-q"), unique("nodlq-dlx"));
    broker
        .declare_exchange(&dlx, lapin::ExchangeKind::Fanout)
        .await;
    let graveyard = broker.bind_queue(&dlx, "").await;
    let arguments = format!("x-dead-letter-exchange = {dlx}");
    let config = config(
        &broker,
        "no_dlq_probe",
        &[
            ("work.exchange", &exchange),
            ("work.queue", &queue),
            ("work.dead_letter_queue", "none"),
            ("work.queue_arguments", &arguments),
            ("retry_delay", "20ms"),
            ("max_attempts", "2"),
        ],
    );
    let running = Runtime::new(config)
        .services(["no_dlq_probe"])
        .start()
        .await
        .expect("starts");
    broker.publish_json(&exchange, "rk", &json!({"n": 1})).await;
    let dead = broker.wait_for_messages(&graveyard, 1, BOUND).await;
    running.stop().await;

    assert_eq!(dead.len(), 1, "the broker dead-lettered the message");
    assert_eq!(dead[0].json(), json!({"n": 1}));
    assert_eq!(
        first_death(&dead[0]),
        ("rejected".to_string(), queue.clone()),
        "rejected (without requeue) from the handler's queue"
    );
    assert_eq!(header_number(&dead[0], ATTEMPT_HEADER), 2);
    assert_eq!(
        *REJECTED_CALLS.lock().unwrap(),
        vec![1, 2],
        "retried as usual first"
    );
    assert_eq!(
        broker.queue_state(&format!("{queue}.dead")).await,
        None,
        "farine declared no dead-letter queue of its own"
    );
    assert_eq!(
        broker.queue_state(&queue).await,
        Some((0, 0)),
        "not requeued"
    );
}

// ---------------------------------------------------------------------------------------------

static RENAMED_CALLS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

#[derive(Default)]
struct RenamedQueuesProbe;

#[farine::service(name = "renamed_queues_probe")]
impl RenamedQueuesProbe {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn work(&self, _body: Value, message: &Message) -> Result<(), String> {
        RENAMED_CALLS.lock().unwrap().push(message.attempt());
        Err("always fails".into())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_retry_and_dead_letter_queue_names_are_the_queues_retries_wait_in_and_dead_letters_end_in()
 {
    let broker = Broker::connect().await;
    let (exchange, queue) = (unique("renamed-x"), unique("renamed-q"));
    let (later, graveyard) = (unique("renamed-later"), unique("renamed-graveyard"));
    let config = config(
        &broker,
        "renamed_queues_probe",
        &[
            ("work.exchange", &exchange),
            ("work.queue", &queue),
            ("work.retry_queue", &later),
            ("work.dead_letter_queue", &graveyard),
            ("retry_delay", "1s"),
            ("max_attempts", "2"),
        ],
    );
    let running = Runtime::new(config)
        .services(["renamed_queues_probe"])
        .start()
        .await
        .expect("starts");
    broker.publish_json(&exchange, "rk", &json!({"n": 1})).await;

    // The failed first attempt waits its retry_delay in the custom retry queue.
    let deadline = Instant::now() + BOUND;
    let mut waited_in_retry_queue = false;
    while Instant::now() < deadline && !waited_in_retry_queue {
        waited_in_retry_queue = broker.queue_state(&later).await == Some((1, 0));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dead = broker.wait_for_messages(&graveyard, 1, BOUND).await;
    running.stop().await;

    assert!(waited_in_retry_queue, "the retry waited in {later}");
    assert_eq!(dead.len(), 1, "the dead letter is in {graveyard}");
    assert_eq!(dead[0].json(), json!({"n": 1}));
    assert_eq!(header_number(&dead[0], ATTEMPT_HEADER), 2);
    assert_eq!(header_text(&dead[0], QUEUE_HEADER), queue);
    assert_eq!(*RENAMED_CALLS.lock().unwrap(), vec![1, 2]);
    for default_name in [format!("{queue}.retry"), format!("{queue}.dead")] {
        assert_eq!(
            broker.queue_state(&default_name).await,
            None,
            "{default_name} was not declared"
        );
    }
    assert_eq!(broker.queue_state(&later).await, Some((0, 0)));
}

// ---------------------------------------------------------------------------------------------

static UNRETRIED_CALLS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

#[derive(Default)]
struct NoRetryProbe;

#[farine::service(name = "no_retry_probe")]
impl NoRetryProbe {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn work(&self, _body: Value, message: &Message) -> Result<(), String> {
        UNRETRIED_CALLS.lock().unwrap().push(message.attempt());
        Err("fails once and for all".into())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_retry_queue_none_a_failure_goes_to_the_dead_letter_queue_at_once_and_no_retry_queue_exists()
 {
    let broker = Broker::connect().await;
    let (exchange, queue) = (unique("noretry-x"), unique("noretry-q"));
    let config = config(
        &broker,
        "no_retry_probe",
        &[
            ("work.exchange", &exchange),
            ("work.queue", &queue),
            ("work.retry_queue", "none"),
            ("max_attempts", "5"),
        ],
    );
    let running = Runtime::new(config)
        .services(["no_retry_probe"])
        .start()
        .await
        .expect("starts");
    assert_eq!(
        broker.queue_state(&format!("{queue}.retry")).await,
        None,
        "no retry queue declared"
    );
    broker.publish_json(&exchange, "rk", &json!({"n": 1})).await;
    let dead = broker
        .wait_for_messages(&format!("{queue}.dead"), 1, BOUND)
        .await;
    running.stop().await;

    assert_eq!(dead[0].json(), json!({"n": 1}));
    assert_eq!(header_number(&dead[0], ATTEMPT_HEADER), 1);
    assert_eq!(
        header_text(&dead[0], ERROR_HEADER),
        "fails once and for all"
    );
    assert_eq!(
        *UNRETRIED_CALLS.lock().unwrap(),
        vec![1],
        "called once, in spite of max_attempts = 5"
    );
    assert_eq!(broker.queue_state(&format!("{queue}.retry")).await, None);
    assert_eq!(broker.queue_state(&queue).await, Some((0, 0)));
}
