//! `#[stream::http]` against a local SSE server: order and resume across cuts, start positions,
//! headers, error policy, and checkpoints in PostgreSQL across restarts.

mod common;

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{BOUND, start_error};
use farine::Runtime;
use farine::config::Config;
use farine::stream::Event;
use farine_test_support::sse::SseServer;
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
