//! `#[stream::http]` against a local SSE server: order and resume across cuts and silent
//! connections, start positions, events without an id, headers, error policy, and checkpoints
//! in PostgreSQL across restarts.

mod common;

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{BOUND, start_error};
use farine::Runtime;
use farine::config::Config;
use farine::stream::Event;
use farine_test_support::sse::{SseOptions, SseServer};
use farine_test_support::{Broker, Database, wait_until};
use serde::Deserialize;

fn config(broker: &Broker, service: &str, options: &str) -> Config {
    let text = format!("[{service}]\namqp_uri = {}\n{options}", broker.uri());
    Config::from_ini(&text, "test.ini").unwrap()
}

#[derive(Deserialize)]
struct Number {
    n: u32,
}

static SEEN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

#[derive(Default)]
struct Ordered;

#[farine::service(name = "sse_ordered")]
impl Ordered {
    #[farine::stream::http]
    async fn on_number(&self, number: Number) {
        SEEN.lock().unwrap().push(number.n);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_in_order_across_two_cuts_with_no_gap_and_no_duplicate() {
    let broker = Broker::connect().await;
    let server = SseServer::start(100, &[30, 70]).await;
    let options = format!(
        "endpoint = {}\nstart_from = beginning\nreconnect_delay = 10ms\n",
        server.url()
    );
    let running = Runtime::new(config(&broker, "sse_ordered", &options))
        .services(["sse_ordered"])
        .start()
        .await
        .expect("starts");
    assert!(wait_until(BOUND, || SEEN.lock().unwrap().len() >= 100).await);
    running.stop().await;
    assert_eq!(*SEEN.lock().unwrap(), (1..=100).collect::<Vec<_>>());
    assert_eq!(
        server.requests(),
        vec![Some("0".into()), Some("30".into()), Some("70".into())],
        "each reconnect resumed after the last event handled"
    );
}

static RAW: Mutex<Vec<(String, Option<String>, String)>> = Mutex::new(Vec::new());

#[derive(Default)]
struct Raw;

#[farine::service(name = "sse_raw")]
impl Raw {
    #[farine::stream::http]
    async fn on_text(&self, data: String, event: Event) {
        RAW.lock().unwrap().push((
            data,
            event.id().map(str::to_string),
            event.event_type().to_string(),
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_string_handler_gets_the_raw_data_and_the_event_handle_and_headers_are_sent() {
    let broker = Broker::connect().await;
    let server = SseServer::start(2, &[]).await;
    let options = format!(
        "endpoint = {}\nstart_from = 1\nheaders =\n    Authorization: Bearer s3cret\n    X-Tenant: acme\n",
        server.url()
    );
    let running = Runtime::new(config(&broker, "sse_raw", &options))
        .services(["sse_raw"])
        .start()
        .await
        .expect("starts");
    assert!(wait_until(BOUND, || RAW.lock().unwrap().len() == 1).await);
    running.stop().await;
    assert_eq!(
        RAW.lock().unwrap()[0],
        (
            r#"{"n": 2}"#.to_string(),
            Some("2".to_string()),
            "number".to_string()
        )
    );
    let head = &server.request_heads()[0];
    assert!(
        head.contains("Bearer s3cret") && head.contains("acme"),
        "{head}"
    );
    assert_eq!(
        server.requests(),
        vec![Some("1".into())],
        "start_from = an id"
    );
}

static FLAKY: Mutex<Vec<u32>> = Mutex::new(Vec::new());

#[derive(Default)]
struct Flaky;

#[farine::service(name = "sse_flaky")]
impl Flaky {
    #[farine::stream::http]
    async fn on_number(&self, number: Number) -> Result<(), String> {
        FLAKY.lock().unwrap().push(number.n);
        if number.n == 2 {
            return Err("event 2 always fails".into());
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_event_is_retried_up_to_max_attempts_then_skipped() {
    let broker = Broker::connect().await;
    let server = SseServer::start(3, &[]).await;
    let options = format!(
        "endpoint = {}\nstart_from = beginning\nretry_delay = 10ms\nmax_attempts = 3\non_error = skip\n",
        server.url()
    );
    let running = Runtime::new(config(&broker, "sse_flaky", &options))
        .services(["sse_flaky"])
        .start()
        .await
        .expect("starts");
    assert!(wait_until(BOUND, || FLAKY.lock().unwrap().contains(&3)).await);
    running.stop().await;
    assert_eq!(*FLAKY.lock().unwrap(), vec![1, 2, 2, 2, 3]);
}

static STOPPER: Mutex<Vec<u32>> = Mutex::new(Vec::new());

#[derive(Default)]
struct Stopper;

#[farine::service(name = "sse_stopper")]
impl Stopper {
    #[farine::stream::http]
    async fn on_number(&self, number: Number) -> Result<(), String> {
        let mut seen = STOPPER.lock().unwrap();
        seen.push(number.n);
        let failures = seen.iter().filter(|n| **n == 2).count();
        if number.n == 2 && failures <= 2 {
            return Err("event 2 fails twice".into());
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_on_error_stop_the_task_restarts_from_the_failed_event() {
    let broker = Broker::connect().await;
    let server = SseServer::start(3, &[]).await;
    let options = format!(
        "endpoint = {}\nstart_from = beginning\nmax_attempts = 1\non_error = stop\nrestart_delay = 10ms\n",
        server.url()
    );
    let running = Runtime::new(config(&broker, "sse_stopper", &options))
        .services(["sse_stopper"])
        .start()
        .await
        .expect("starts");
    assert!(wait_until(BOUND, || STOPPER.lock().unwrap().contains(&3)).await);
    running.stop().await;
    assert_eq!(*STOPPER.lock().unwrap(), vec![1, 2, 2, 2, 3]);
    // The restarts resumed after event 1, the last one handled.
    assert_eq!(
        server.requests(),
        vec![Some("0".into()), Some("1".into()), Some("1".into())]
    );
}

static CHECKPOINTED: Mutex<Vec<u32>> = Mutex::new(Vec::new());

#[derive(Default)]
struct Checkpointed;

#[farine::service(name = "sse_checkpointed")]
impl Checkpointed {
    #[farine::stream::http]
    async fn on_number(&self, number: Number) {
        CHECKPOINTED.lock().unwrap().push(number.n);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_database_a_restarted_service_resumes_after_the_last_event_handled() {
    let broker = Broker::connect().await;
    let database = Database::create().await;
    let server = SseServer::start(40, &[]).await;
    let options = format!(
        "endpoint = {}\nstart_from = beginning\ndb_connector = postgres\ndb_host = 127.0.0.1\ndb_name = {}\ndb_user = postgres\n",
        server.url(),
        database.name
    );
    let first = Runtime::new(config(&broker, "sse_checkpointed", &options))
        .services(["sse_checkpointed"])
        .start()
        .await
        .expect("starts");
    assert!(wait_until(BOUND, || CHECKPOINTED.lock().unwrap().len() == 40).await);
    first.stop().await;

    // A new runtime has no position in memory: it reads the checkpoint.
    server.publish_up_to(60);
    let second = Runtime::new(config(&broker, "sse_checkpointed", &options))
        .services(["sse_checkpointed"])
        .start()
        .await
        .expect("starts again");
    assert!(wait_until(BOUND, || CHECKPOINTED.lock().unwrap().len() >= 60).await);
    second.stop().await;
    assert_eq!(*CHECKPOINTED.lock().unwrap(), (1..=60).collect::<Vec<_>>());
    assert_eq!(server.requests(), vec![Some("0".into()), Some("40".into())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_stops_start_up_naming_it_but_never_the_password() {
    let broker = Broker::connect().await;
    let server = SseServer::start(1, &[]).await;
    let options = format!(
        "endpoint = {}\ndb_connector = postgres\ndb_host = 127.0.0.1\ndb_port = 1\ndb_name = test\ndb_user = postgres\ndb_password = hunter2-secret\ndb_timeout = 2\n",
        server.url()
    );
    let error = start_error(
        config(&broker, "sse_checkpointed", &options),
        "sse_checkpointed",
        "cannot connect",
    )
    .await;
    let text = error.to_string();
    assert!(
        text.contains("host 127.0.0.1 port 1 database test user postgres"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
}

static UNUSED: AtomicUsize = AtomicUsize::new(0);

#[derive(Default)]
struct Unconfigured;

#[farine::service(name = "sse_unconfigured")]
impl Unconfigured {
    #[farine::stream::http]
    async fn on_event(&self, _data: String) {
        UNUSED.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_without_endpoint_is_a_config_error_naming_the_key() {
    let broker = Broker::connect().await;
    let error = start_error(
        config(&broker, "sse_unconfigured", ""),
        "sse_unconfigured",
        "no endpoint",
    )
    .await;
    assert!(error.is_config(), "{error}");
    assert!(error.to_string().contains("`endpoint`"), "{error}");
}

static SILENCED: Mutex<Vec<(u32, Instant)>> = Mutex::new(Vec::new());

#[derive(Default)]
struct Silenced;

#[farine::service(name = "sse_silenced")]
impl Silenced {
    #[farine::stream::http]
    async fn on_number(&self, number: Number) {
        SILENCED.lock().unwrap().push((number.n, Instant::now()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_dropped_after_read_timeout_and_resumed_after_the_last_event_handled()
 {
    let broker = Broker::connect().await;
    // After event 4 the server sends nothing more on that connection, yet keeps it open.
    let server = SseServer::start_with(
        8,
        SseOptions {
            stalls: vec![4],
            ..SseOptions::default()
        },
    )
    .await;
    let options = format!(
        "endpoint = {}\nstart_from = beginning\nreconnect_delay = 10ms\nread_timeout = 1s\n",
        server.url()
    );
    let running = Runtime::new(config(&broker, "sse_silenced", &options))
        .services(["sse_silenced"])
        .start()
        .await
        .expect("starts");
    assert!(
        wait_until(BOUND, || SILENCED.lock().unwrap().len() >= 8).await,
        "the events after the silence arrived: {:?}",
        server.requests()
    );
    assert!(
        wait_until(BOUND, || server.stalled_connections_closed() == 1).await,
        "the silent connection was closed"
    );
    running.stop().await;
    let seen = SILENCED.lock().unwrap().clone();
    let numbers: Vec<u32> = seen.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        numbers,
        (1..=8).collect::<Vec<_>>(),
        "none lost, none twice"
    );
    assert_eq!(
        server.requests(),
        vec![Some("0".into()), Some("4".into())],
        "the reconnection resumed after event 4, the last one handled"
    );
    let silence = seen[4].1 - seen[3].1;
    assert!(
        silence >= Duration::from_secs(1),
        "dropped only after read_timeout: {silence:?}"
    );
}

static KEPT_ALIVE: Mutex<Vec<u32>> = Mutex::new(Vec::new());

#[derive(Default)]
struct KeptAlive;

#[farine::service(name = "sse_kept_alive")]
impl KeptAlive {
    #[farine::stream::http]
    async fn on_number(&self, number: Number) {
        KEPT_ALIVE.lock().unwrap().push(number.n);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_comments_more_frequent_than_read_timeout_keep_a_quiet_connection_open() {
    let broker = Broker::connect().await;
    let server = SseServer::start_with(
        2,
        SseOptions {
            keep_alive: Some(Duration::from_millis(200)),
            ..SseOptions::default()
        },
    )
    .await;
    let options = format!(
        "endpoint = {}\nstart_from = beginning\nreconnect_delay = 10ms\nread_timeout = 1s\n",
        server.url()
    );
    let running = Runtime::new(config(&broker, "sse_kept_alive", &options))
        .services(["sse_kept_alive"])
        .start()
        .await
        .expect("starts");
    assert!(wait_until(BOUND, || KEPT_ALIVE.lock().unwrap().len() == 2).await);
    // Three read timeouts with nothing but comments on the wire.
    tokio::time::sleep(Duration::from_secs(3)).await;
    server.publish_up_to(3);
    assert!(wait_until(BOUND, || KEPT_ALIVE.lock().unwrap().len() == 3).await);
    running.stop().await;
    assert_eq!(*KEPT_ALIVE.lock().unwrap(), vec![1, 2, 3]);
    assert_eq!(
        server.requests(),
        vec![Some("0".into())],
        "one connection, never dropped"
    );
}

static UNNUMBERED: Mutex<Vec<u32>> = Mutex::new(Vec::new());

#[derive(Default)]
struct Unnumbered;

#[farine::service(name = "sse_unnumbered")]
impl Unnumbered {
    #[farine::stream::http]
    async fn on_number(&self, number: Number) {
        UNNUMBERED.lock().unwrap().push(number.n);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_without_an_id_are_handled_but_do_not_move_the_position() {
    let broker = Broker::connect().await;
    // Events 5 and 6 carry no id; the connection is cut after 6.
    let server = SseServer::start_with(
        7,
        SseOptions {
            cuts: vec![6],
            without_id: vec![5, 6],
            ..SseOptions::default()
        },
    )
    .await;
    let options = format!(
        "endpoint = {}\nstart_from = beginning\nreconnect_delay = 10ms\n",
        server.url()
    );
    let running = Runtime::new(config(&broker, "sse_unnumbered", &options))
        .services(["sse_unnumbered"])
        .start()
        .await
        .expect("starts");
    assert!(wait_until(BOUND, || UNNUMBERED.lock().unwrap().contains(&7)).await);
    running.stop().await;
    assert_eq!(
        server.requests(),
        vec![Some("0".into()), Some("4".into())],
        "the position stayed at event 4, the last one with an id"
    );
    // So the server sent 5 and 6 again after the reconnection.
    assert_eq!(*UNNUMBERED.lock().unwrap(), vec![1, 2, 3, 4, 5, 6, 5, 6, 7]);
}

static UNNUMBERED_FIRST: Mutex<Vec<u32>> = Mutex::new(Vec::new());

#[derive(Default)]
struct UnnumberedFirst;

#[farine::service(name = "sse_unnumbered_first")]
impl UnnumberedFirst {
    #[farine::stream::http]
    async fn on_number(&self, number: Number) {
        UNNUMBERED_FIRST.lock().unwrap().push(number.n);
    }
}

/// Runs `sse_unnumbered_first` from `start_from` (none: the default) against a server whose
/// first event after that position has no id and is followed by a cut; returns the events
/// handled (once `last` was) and the `Last-Event-ID` of each request.
async fn unnumbered_first_event(
    broker: &Broker,
    start_from: Option<&str>,
    first: u32,
    last: u32,
) -> (Vec<u32>, Vec<Option<String>>) {
    UNNUMBERED_FIRST.lock().unwrap().clear();
    let server = SseServer::start_with(
        last,
        SseOptions {
            cuts: vec![first],
            without_id: vec![first],
            ..SseOptions::default()
        },
    )
    .await;
    let mut options = format!("endpoint = {}\nreconnect_delay = 10ms\n", server.url());
    if let Some(start_from) = start_from {
        options.push_str(&format!("start_from = {start_from}\n"));
    }
    let running = Runtime::new(config(broker, "sse_unnumbered_first", &options))
        .services(["sse_unnumbered_first"])
        .start()
        .await
        .expect("starts");
    assert!(wait_until(BOUND, || UNNUMBERED_FIRST.lock().unwrap().contains(&last)).await);
    running.stop().await;
    let handled = UNNUMBERED_FIRST.lock().unwrap().clone();
    (handled, server.requests())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_without_an_id_before_any_with_one_leaves_the_start_position() {
    let broker = Broker::connect().await;

    // start_from = end (the default): no Last-Event-ID, before and after the cut.
    let (handled, requests) = unnumbered_first_event(&broker, None, 1, 3).await;
    assert_eq!(requests, vec![None, None]);
    assert_eq!(handled, vec![1, 1, 2, 3]);

    // start_from = an id: that id, before and after the cut.
    let (handled, requests) = unnumbered_first_event(&broker, Some("5"), 6, 8).await;
    assert_eq!(requests, vec![Some("5".into()), Some("5".into())]);
    assert_eq!(handled, vec![6, 6, 7, 8]);
}
