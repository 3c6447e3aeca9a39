//! `queue_type = stream` against the real broker: catch-up from a position (`start_from`),
//! the offset as a parameter, the position kept in PostgreSQL across restarts, several
//! services each reading the whole stream, and failures retried in place.

mod common;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{BOUND, config, start_error};
use farine::config::Config;
use farine::{Runtime, Shutdown, StreamOffset, consume};
use farine_test_support::proxy::Proxy;
use farine_test_support::{Broker, Database, unique, wait_until};
use lapin::ExchangeKind;
use lapin::types::{AMQPValue, FieldTable};
use serde::Deserialize;
use serde_json::{Value, json};

/// The bound for a thousand messages through the broker, handled one by one.
const LONG: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Deserialize)]
struct Numbered {
    n: u64,
}

/// What a reader handled: how many times each message (by its number `n`), and at which
/// offset.
#[derive(Default)]
struct Handled(BTreeMap<u64, (usize, u64)>);

impl Handled {
    fn record(store: &Mutex<Handled>, n: u64, offset: u64) {
        let mut handled = store.lock().unwrap();
        let entry = handled.0.entry(n).or_insert((0, offset));
        entry.0 += 1;
    }

    fn count(store: &Mutex<Handled>) -> usize {
        store.lock().unwrap().0.len()
    }

    fn has(store: &Mutex<Handled>, n: u64) -> bool {
        store.lock().unwrap().0.contains_key(&n)
    }

    /// How many calls there were, counting each message as often as it was handled.
    fn calls(store: &Mutex<Handled>) -> usize {
        store
            .lock()
            .unwrap()
            .0
            .values()
            .map(|(times, _)| times)
            .sum()
    }

    /// The numbers handled, however often.
    fn numbers(store: &Mutex<Handled>) -> Vec<u64> {
        store.lock().unwrap().0.keys().copied().collect()
    }

    /// The numbers handled; each must have been handled once, at the offset of its number.
    fn once_each(store: &Mutex<Handled>) -> Vec<u64> {
        let handled = store.lock().unwrap();
        for (n, (times, offset)) in &handled.0 {
            assert_eq!(*times, 1, "message {n} handled {times} times");
            assert_eq!(n, offset, "message {n} is at offset {n} of the stream");
        }
        handled.0.keys().copied().collect()
    }

    fn take(store: &Mutex<Handled>) -> Vec<u64> {
        let list = Self::once_each(store);
        store.lock().unwrap().0.clear();
        list
    }
}

/// Declares stream `queue`, bound to direct exchange `exchange` with `rk`, as the service
/// will (so messages can be there before it starts), and publishes `n` = `from..to` to it.
async fn stream_with(broker: &Broker, exchange: &str, queue: &str, from: u64, to: u64) {
    broker
        .declare_exchange(exchange, ExchangeKind::Direct)
        .await;
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("stream".into()),
    );
    broker
        .declare_bound_queue(queue, exchange, "rk", arguments)
        .await;
    publish(broker, exchange, from, to).await;
}

async fn publish(broker: &Broker, exchange: &str, from: u64, to: u64) {
    let values: Vec<Value> = (from..to).map(|n| json!({ "n": n })).collect();
    broker.publish_json_batch(exchange, "rk", &values).await;
}

/// A reader's keys: the stream and where to start.
fn reader(exchange: &str, queue: &str, start_from: &str) -> Vec<(String, String)> {
    [
        ("read.exchange", exchange),
        ("read.exchange_type", "direct"),
        ("read.routing_key", "rk"),
        ("read.queue", queue),
        ("read.queue_type", "stream"),
        ("read.start_from", start_from),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_string(), value.to_string()))
    .collect()
}

/// A config whose `[service]` section reaches the broker at `amqp_uri`, with `extra` INI lines
/// (a database's keys, say) and the reader's `keys`.
fn reader_config_at(
    service: &str,
    amqp_uri: &str,
    extra: &str,
    keys: &[(String, String)],
) -> Config {
    let mut text = format!("[{service}]\namqp_uri = {amqp_uri}\n{extra}");
    for (key, value) in keys {
        text.push_str(&format!("{key} = {value}\n"));
    }
    Config::from_ini(&text, "test.ini").expect("test config parses")
}

fn reader_config(broker: &Broker, service: &str, keys: &[(String, String)]) -> Config {
    reader_config_at(service, &broker.uri(), "", keys)
}

fn reader_config_with_db(
    broker: &Broker,
    service: &str,
    database: &Database,
    keys: &[(String, String)],
) -> Config {
    reader_config_at(service, &broker.uri(), &database.ini_keys(), keys)
}

/// A service `$name` (type `$service`) whose handler `read` records in `$store` the number and
/// the offset of each message it handles.
macro_rules! recording_reader {
    ($service:ident, $name:tt, $store:ident) => {
        static $store: Mutex<Handled> = Mutex::new(Handled(BTreeMap::new()));

        #[derive(Default)]
        struct $service;

        #[farine::service(name = $name)]
        impl $service {
            #[consume(exchange = "set-by-config", routing_key = "rk")]
            async fn read(&self, body: Numbered, offset: StreamOffset) {
                Handled::record(&$store, body.n, offset.0);
            }
        }
    };
}

async fn start(config: Config, service: &str) -> farine::Running {
    Runtime::new(config)
        .services([service])
        .start()
        .await
        .expect("starts")
}

// ---------------------------------------------------------------------------------------------

recording_reader!(ReaderA, "stream_reader_a", FIRST_A);
recording_reader!(ReaderB, "stream_reader_b", FIRST_B);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_first_two_services_each_read_the_whole_stream_once() {
    let broker = Broker::connect().await;
    let (exchange, queue) = (unique("stream-x"), unique("stream-q"));
    stream_with(&broker, &exchange, &queue, 0, 1000).await;
    let keys = reader(&exchange, &queue, "first");
    let a = start(
        reader_config(&broker, "stream_reader_a", &keys),
        "stream_reader_a",
    )
    .await;
    assert!(
        wait_until(LONG, || Handled::count(&FIRST_A) == 1000).await,
        "the first reader handled the 1,000 messages ({})",
        Handled::count(&FIRST_A)
    );
    // Reading took nothing away: a second service, started now, reads them all too.
    let b = start(
        reader_config(&broker, "stream_reader_b", &keys),
        "stream_reader_b",
    )
    .await;
    assert!(
        wait_until(LONG, || Handled::count(&FIRST_B) == 1000).await,
        "the second reader handled the 1,000 messages ({})",
        Handled::count(&FIRST_B)
    );
    a.stop().await;
    b.stop().await;
    let all: Vec<u64> = (0..1000).collect();
    assert_eq!(Handled::once_each(&FIRST_A), all);
    assert_eq!(Handled::once_each(&FIRST_B), all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_services_of_one_process_may_read_one_stream() {
    let broker = Broker::connect().await;
    let (exchange, queue) = (unique("stream-x"), unique("stream-q"));
    stream_with(&broker, &exchange, &queue, 0, 10).await;
    let keys = reader(&exchange, &queue, "first");
    let mut text = String::new();
    for service in ["stream_reader_a", "stream_reader_b"] {
        text.push_str(&format!("[{service}]\namqp_uri = {}\n", broker.uri()));
        for (key, value) in &keys {
            text.push_str(&format!("{key} = {value}\n"));
        }
    }
    // Readers of a stream do not take each other's messages: no conflict, unlike a queue.
    let running = Runtime::new(Config::from_ini(&text, "test.ini").unwrap())
        .services(["stream_reader_a", "stream_reader_b"])
        .start()
        .await
        .expect("starts");
    assert!(
        wait_until(BOUND, || Handled::count(&FIRST_A) == 10
            && Handled::count(&FIRST_B) == 10)
        .await
    );
    running.stop().await;
    assert_eq!(Handled::once_each(&FIRST_A), (0..10).collect::<Vec<_>>());
    assert_eq!(Handled::once_each(&FIRST_B), (0..10).collect::<Vec<_>>());
}

// ---------------------------------------------------------------------------------------------

static RESUMED: Mutex<Handled> = Mutex::new(Handled(BTreeMap::new()));
/// While set, the reader holds the messages from 400 on until the stop, and fails them then.
static HOLD_AT_400: AtomicBool = AtomicBool::new(true);

#[derive(Default)]
struct Resuming;

#[farine::service(name = "stream_resuming")]
impl Resuming {
    #[consume(exchange = "set-by-config", routing_key = "rk")]
    async fn read(
        &self,
        body: Numbered,
        offset: StreamOffset,
        shutdown: Shutdown,
    ) -> Result<(), String> {
        if body.n >= 400 && HOLD_AT_400.load(Ordering::SeqCst) {
            shutdown.cancelled().await;
            return Err("stopped before it was done".to_string());
        }
        Handled::record(&RESUMED, body.n, offset.0);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_after_400_a_reader_resumes_from_its_checkpoint_with_the_other_600() {
    let broker = Broker::connect().await;
    let database = Database::create().await;
    let (exchange, queue) = (unique("stream-x"), unique("stream-q"));
    stream_with(&broker, &exchange, &queue, 0, 1000).await;
    let keys = reader(&exchange, &queue, "first");
    let service = "stream_resuming";

    let first = start(
        reader_config_with_db(&broker, service, &database, &keys),
        service,
    )
    .await;
    assert!(
        wait_until(LONG, || Handled::count(&RESUMED) == 400).await,
        "the first run handled 0..400 ({})",
        Handled::count(&RESUMED)
    );
    // The messages from 400 on are held (the broker delivers a stream by chunks, so several
    // are in flight); the stop ends them undone.
    first.stop().await;
    assert_eq!(Handled::take(&RESUMED), (0..400).collect::<Vec<_>>());

    HOLD_AT_400.store(false, Ordering::SeqCst);
    let second = start(
        reader_config_with_db(&broker, service, &database, &keys),
        service,
    )
    .await;
    assert!(
        wait_until(LONG, || Handled::has(&RESUMED, 999)).await,
        "the second run reached the end ({})",
        Handled::count(&RESUMED)
    );
    // One more message: everything before it came first, so nothing else is on its way.
    publish(&broker, &exchange, 1000, 1001).await;
    assert!(wait_until(BOUND, || Handled::has(&RESUMED, 1000)).await);
    second.stop().await;
    assert_eq!(
        Handled::once_each(&RESUMED),
        (400..=1000).collect::<Vec<_>>(),
        "the second run handled the other 600 (and the new one), none twice"
    );
}

// ---------------------------------------------------------------------------------------------

recording_reader!(From900, "stream_from_900", FROM_900);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_offset_900_a_reader_handles_the_last_100() {
    let broker = Broker::connect().await;
    let (exchange, queue) = (unique("stream-x"), unique("stream-q"));
    stream_with(&broker, &exchange, &queue, 0, 1000).await;
    let keys = reader(&exchange, &queue, "900");
    let running = start(
        reader_config(&broker, "stream_from_900", &keys),
        "stream_from_900",
    )
    .await;
    assert!(
        wait_until(LONG, || Handled::has(&FROM_900, 999)).await,
        "reached the end ({})",
        Handled::count(&FROM_900)
    );
    running.stop().await;
    // The broker starts at the chunk that holds offset 900: what comes before is skipped.
    assert_eq!(
        Handled::once_each(&FROM_900),
        (900..1000).collect::<Vec<_>>()
    );
}

// ---------------------------------------------------------------------------------------------

recording_reader!(FromNext, "stream_from_next", FROM_NEXT);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_next_a_reader_handles_only_what_comes_after_it_started() {
    let broker = Broker::connect().await;
    let (exchange, queue) = (unique("stream-x"), unique("stream-q"));
    stream_with(&broker, &exchange, &queue, 0, 1000).await;
    let keys = reader(&exchange, &queue, "next");
    // Started: its `basic.consume` was answered, so the broker placed it at the stream's end.
    let running = start(
        reader_config(&broker, "stream_from_next", &keys),
        "stream_from_next",
    )
    .await;
    publish(&broker, &exchange, 1000, 1005).await;
    assert!(
        wait_until(BOUND, || Handled::has(&FROM_NEXT, 1004)).await,
        "the new messages were handled"
    );
    running.stop().await;
    assert_eq!(
        Handled::once_each(&FROM_NEXT),
        (1000..1005).collect::<Vec<_>>()
    );
}

// ---------------------------------------------------------------------------------------------

recording_reader!(AcrossCut, "stream_across_cut", ACROSS_CUT);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_lost_connection_a_reader_resumes_where_it_was_not_from_start_from() {
    let broker = Broker::connect().await;
    let (exchange, queue) = (unique("stream-x"), unique("stream-q"));
    stream_with(&broker, &exchange, &queue, 0, 1000).await;
    let proxy = Proxy::to_broker().await;
    // No database: the position is kept in memory across the task's restarts.
    let config = reader_config_at(
        "stream_across_cut",
        &broker.uri_via(proxy.addr()),
        "",
        &reader(&exchange, &queue, "first"),
    );
    let running = start(config, "stream_across_cut").await;
    assert!(wait_until(LONG, || Handled::count(&ACROSS_CUT) >= 300).await);
    proxy.cut();
    assert!(
        wait_until(LONG, || Handled::count(&ACROSS_CUT) == 1000).await,
        "every message handled after the cut ({})",
        Handled::count(&ACROSS_CUT)
    );
    running.stop().await;
    // Read again: only what was in flight at the cut; from `first` it would be 300 or more.
    let again = Handled::calls(&ACROSS_CUT) - 1000;
    assert!(again < 300, "{again} messages handled twice");
}

// ---------------------------------------------------------------------------------------------

recording_reader!(NothingYet, "stream_nothing_yet", NOTHING_YET);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_from_next_that_lost_its_connection_before_any_message_misses_none_meanwhile() {
    let broker = Broker::connect().await;
    let (exchange, queue) = (unique("stream-x"), unique("stream-q"));
    let proxy = Proxy::to_broker().await;
    let config = reader_config_at(
        "stream_nothing_yet",
        &broker.uri_via(proxy.addr()),
        "",
        &reader(&exchange, &queue, "next"),
    );
    let running = start(config, "stream_nothing_yet").await;
    // The messages are written while the reader's connection passes nothing (the proxy may
    // let a read under way through), then it is cut: a reader that never saw an offset must
    // not start at the stream's end again (`consume::stream` has the unit test of that).
    proxy.stall();
    publish(&broker, &exchange, 0, 3).await;
    proxy.cut();
    proxy.resume();
    assert!(
        wait_until(BOUND, || Handled::count(&NOTHING_YET) == 3).await,
        "the messages written during the outage were handled ({})",
        Handled::count(&NOTHING_YET)
    );
    running.stop().await;
    // At least once: a message whose handler ended as the connection broke is read again.
    assert_eq!(Handled::numbers(&NOTHING_YET), [0, 1, 2]);
}

// ---------------------------------------------------------------------------------------------

recording_reader!(Inboxed, "stream_inboxed", INBOXED);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_inbox_a_stream_read_again_runs_no_message_twice() {
    use farine::db::sqlx;
    let broker = Broker::connect().await;
    let database = Database::create().await;
    let (exchange, queue) = (unique("stream-x"), unique("stream-q"));
    // Messages without a message id: the inbox knows them by their offset.
    stream_with(&broker, &exchange, &queue, 0, 20).await;
    let mut keys = reader(&exchange, &queue, "first");
    keys.push(("read.inbox".into(), "true".into()));
    let service = "stream_inboxed";
    let config = || reader_config_with_db(&broker, service, &database, &keys);
    let first = start(config(), service).await;
    assert!(wait_until(BOUND, || Handled::count(&INBOXED) == 20).await);
    first.stop().await;

    // The position put back to the stream's start: everything is delivered again.
    let mut conn = database.connect().await;
    let rewound = sqlx::query("UPDATE farine_checkpoint SET position = $1")
        .bind(format!("{queue}@0"))
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(rewound.rows_affected(), 1);
    publish(&broker, &exchange, 20, 21).await;
    let second = start(config(), service).await;
    assert!(wait_until(BOUND, || Handled::has(&INBOXED, 20)).await);
    second.stop().await;
    assert_eq!(Handled::once_each(&INBOXED), (0..=20).collect::<Vec<_>>());
    let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM farine_inbox")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(recorded, 21);
}

// ---------------------------------------------------------------------------------------------

static UNSAVED: Mutex<Vec<u64>> = Mutex::new(Vec::new());

#[derive(Default)]
struct Unsaved;

#[farine::service(name = "stream_unsaved")]
impl Unsaved {
    #[consume(exchange = "set-by-config", routing_key = "rk")]
    async fn read(&self, body: Numbered) {
        UNSAVED.lock().unwrap().push(body.n);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_declares_its_stream_and_with_checkpoint_false_each_start_begins_at_start_from()
{
    let broker = Broker::connect().await;
    let database = Database::create().await;
    let (exchange, queue) = (unique("stream-x"), unique("stream-q"));
    let mut keys = reader(&exchange, &queue, "first");
    keys.push(("read.checkpoint".into(), "false".into()));
    let service = "stream_unsaved";
    let config = || reader_config_with_db(&broker, service, &database, &keys);
    let first = start(config(), service).await;
    assert_eq!(
        broker.queue_info(&queue)["type"],
        "stream",
        "declared a stream"
    );
    publish(&broker, &exchange, 0, 5).await;
    assert!(wait_until(BOUND, || UNSAVED.lock().unwrap().len() == 5).await);
    first.stop().await;
    let second = start(config(), service).await;
    assert!(
        wait_until(BOUND, || UNSAVED.lock().unwrap().len() == 10).await,
        "read again from the first message"
    );
    second.stop().await;
    let mut read = UNSAVED.lock().unwrap().clone();
    read.sort_unstable();
    assert_eq!(read, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]);
}

// ---------------------------------------------------------------------------------------------

static ATTEMPTS: Mutex<BTreeMap<u64, usize>> = Mutex::new(BTreeMap::new());

#[derive(Default)]
struct Failing;

#[farine::service(name = "stream_failing")]
impl Failing {
    /// Message 3 always fails, message 5 fails once.
    #[consume(exchange = "set-by-config", routing_key = "rk")]
    async fn read(&self, body: Numbered) -> Result<(), String> {
        let attempt = {
            let mut attempts = ATTEMPTS.lock().unwrap();
            let attempt = attempts.entry(body.n).or_default();
            *attempt += 1;
            *attempt
        };
        match (body.n, attempt) {
            (3, _) | (5, 1) => Err(format!("message {} fails", body.n)),
            _ => Ok(()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_message_is_retried_in_place_then_dead_lettered_and_the_reader_goes_on() {
    let broker = Broker::connect().await;
    let (exchange, queue) = (unique("stream-x"), unique("stream-q"));
    stream_with(&broker, &exchange, &queue, 0, 10).await;
    let mut keys = reader(&exchange, &queue, "first");
    keys.push(("read.max_attempts".into(), "3".into()));
    keys.push(("read.retry_delay".into(), "10ms".into()));
    let running = start(
        reader_config(&broker, "stream_failing", &keys),
        "stream_failing",
    )
    .await;
    let dead = format!("{queue}.dead");
    assert!(
        broker.wait_for_ready(&dead, 1, BOUND).await,
        "message 3 was dead-lettered"
    );
    assert!(wait_until(BOUND, || ATTEMPTS.lock().unwrap().len() == 10).await);
    running.stop().await;
    let attempts = ATTEMPTS.lock().unwrap().clone();
    assert_eq!(attempts[&3], 3, "retried in place up to max_attempts");
    assert_eq!(attempts[&5], 2, "a failure then a success");
    assert!(
        attempts
            .iter()
            .all(|(n, times)| [3, 5].contains(n) || *times == 1)
    );
    let letter = broker.get(&dead).await.expect("the dead letter");
    assert_eq!(letter.json(), json!({"n": 3}));
    // Its offset was the stream's: a replay appends it anew, where the broker gives another.
    let headers = letter.properties.headers().clone().unwrap_or_default();
    assert_eq!(
        headers.inner().get("x-farine-attempt"),
        Some(&AMQPValue::LongUInt(3)),
        "the attempts made in place"
    );
    assert!(
        !headers.inner().contains_key("x-stream-offset"),
        "{headers:?}"
    );
    // No retry queue: nothing can be put back into a stream.
    let (queues, _) = broker.declared();
    assert!(!queues.contains(&format!("{queue}.retry")), "{queues:?}");
}

// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct NoRpc;

#[farine::service(name = "stream_no_rpc")]
impl NoRpc {
    #[farine::rpc::method]
    async fn answer(&self) -> u32 {
        42
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_settings_that_cannot_work_are_config_errors() {
    let broker = Broker::connect().await;
    let cases: [(&[(&str, &str)], &str); 4] = [
        (&[("read.start_from", "first")], "queue_type = stream"),
        (
            &[
                ("read.queue_type", "stream"),
                ("read.start_from", "yesterday"),
            ],
            "RFC 3339",
        ),
        (
            &[("read.queue_type", "stream"), ("read.retry_queue", "mine")],
            "retries a failed message in place",
        ),
        (
            &[
                ("read.queue_type", "stream"),
                ("read.queue_durable", "false"),
            ],
            "a stream queue is durable",
        ),
    ];
    let error = start_error(
        config(&broker, "stream_no_rpc", &[("rpc.queue_type", "stream")]),
        "stream_no_rpc",
        "rpc.queue_type = stream refused",
    )
    .await;
    assert!(
        error
            .to_string()
            .contains("an RPC queue hands each call to one server"),
        "{error}"
    );
    for (keys, expected) in cases {
        let error = start_error(
            config(&broker, "stream_from_next", keys),
            "stream_from_next",
            expected,
        )
        .await;
        assert!(error.to_string().contains(expected), "{keys:?}: {error}");
    }
}
