//! Supervision against the real broker: a handler whose channel breaks comes back, alone, and
//! the health endpoint reports it down while it waits to restart.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{BOUND, start_error};
use farine::config::Config;
use farine::{Runtime, Shutdown, consume, execute};
use farine_test_support::proxy::Proxy;
use farine_test_support::{Broker, free_port, http_get, unique, wait_until};
use lapin::options::QueueDeleteOptions;
use serde_json::{Value, json};
use tokio::sync::Notify;

static FRAGILE: AtomicUsize = AtomicUsize::new(0);
static STEADY: AtomicUsize = AtomicUsize::new(0);

#[derive(Default)]
struct Restartable;

#[farine::service(name = "restartable")]
impl Restartable {
    #[consume(exchange = "x", routing_key = "fragile")]
    async fn fragile(&self, _body: Value) {
        FRAGILE.fetch_add(1, Ordering::SeqCst);
    }

    #[consume(exchange = "x", routing_key = "steady")]
    async fn steady(&self, _body: Value) {
        STEADY.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_whose_queue_is_deleted_restarts_and_its_neighbour_never_stops() {
    let broker = Broker::connect().await;
    let exchange = unique("restart-x");
    let (fragile, steady) = (unique("restart-fragile"), unique("restart-steady"));
    let config = common::config(
        &broker,
        "restartable",
        &[
            ("exchange", &exchange),
            ("fragile.queue", &fragile),
            ("steady.queue", &steady),
        ],
    );
    let running = Runtime::new(config)
        .services(["restartable"])
        .start()
        .await
        .expect("starts");

    // The broker cancels the consumer of a deleted queue: the handler's task ends and restarts.
    broker
        .channel()
        .queue_delete(fragile.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("queue deleted");
    broker.publish_json(&exchange, "steady", &json!({})).await;
    assert!(
        wait_until(BOUND, || STEADY.load(Ordering::SeqCst) == 1).await,
        "the neighbour kept handling messages"
    );
    // The restart declared the queue again and consumes it.
    assert!(broker.wait_for_consumers(&fragile, 1, BOUND).await);
    broker.publish_json(&exchange, "fragile", &json!({})).await;
    assert!(wait_until(BOUND, || FRAGILE.load(Ordering::SeqCst) == 1).await);
    running.stop().await;
}

static THROUGH_PROXY: AtomicUsize = AtomicUsize::new(0);

#[derive(Default)]
struct Reconnecting;

#[farine::service(name = "reconnecting")]
impl Reconnecting {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn count(&self, _body: Value) {
        THROUGH_PROXY.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_is_reopened_and_the_consumer_resumes() {
    let broker = Broker::connect().await;
    let (exchange, queue) = (unique("reconnect-x"), unique("reconnect-q"));
    let proxy = Proxy::to_broker().await;
    let text = format!(
        "[reconnecting]\namqp_uri = {}\ncount.exchange = {exchange}\ncount.queue = {queue}\n",
        broker.uri_via(proxy.addr())
    );
    let config = Config::from_ini(&text, "test.ini").unwrap();
    let running = Runtime::new(config)
        .services(["reconnecting"])
        .start()
        .await
        .expect("starts");
    broker.publish_json(&exchange, "rk", &json!({})).await;
    assert!(wait_until(BOUND, || THROUGH_PROXY.load(Ordering::SeqCst) == 1).await);

    proxy.cut();
    assert!(
        broker.wait_for_consumers(&queue, 0, BOUND).await,
        "the broker saw the cut"
    );
    assert!(
        broker.wait_for_consumers(&queue, 1, BOUND).await,
        "farine came back"
    );
    broker.publish_json(&exchange, "rk", &json!({})).await;
    assert!(wait_until(BOUND, || THROUGH_PROXY.load(Ordering::SeqCst) == 2).await);
    running.stop().await;
}

static STALLED: AtomicUsize = AtomicUsize::new(0);

#[derive(Default)]
struct Stalled;

#[farine::service(name = "stalled")]
impl Stalled {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn count(&self, _body: Value) {
        STALLED.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_stops_answering_cannot_hang_start_up_or_shutdown() {
    let broker = Broker::connect().await;
    let (exchange, queue) = (unique("stall-x"), unique("stall-q"));
    let proxy = Proxy::to_broker().await;
    let text = format!(
        "[stalled]\namqp_uri = {}\ncount.exchange = {exchange}\ncount.queue = {queue}\nconnect_timeout = 1\ndrain_timeout = 1\n",
        broker.uri_via(proxy.addr())
    );
    let config = Config::from_ini(&text, "test.ini").unwrap();

    // Start-up against a stalled broker fails, bounded by the 1-second connect_timeout rather
    // than hanging.
    proxy.stall();
    let started = std::time::Instant::now();
    let error = start_error(config.clone(), "stalled", "no answer, no start").await;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "{error}"
    );
    proxy.resume();
    proxy.cut();

    // Shutdown against a broker that stalls while running ends within its bound.
    let running = Runtime::new(config)
        .services(["stalled"])
        .start()
        .await
        .expect("starts");
    broker.publish_json(&exchange, "rk", &json!({})).await;
    assert!(wait_until(BOUND, || STALLED.load(Ordering::SeqCst) == 1).await);
    proxy.stall();
    let stopping = std::time::Instant::now();
    tokio::time::timeout(std::time::Duration::from_secs(20), running.stop())
        .await
        .expect("stop is bounded");
    assert!(stopping.elapsed() < std::time::Duration::from_secs(15));
    proxy.resume();
}

static PROBED_RUNS: AtomicUsize = AtomicUsize::new(0);
static FAIL_PROBED: Notify = Notify::const_new();

#[derive(Default)]
struct Probed;

#[farine::service(name = "sup_probed")]
impl Probed {
    /// The first run fails when the test says so; the next ones run until shutdown.
    #[execute]
    async fn work(&self, shutdown: Shutdown) -> Result<(), String> {
        if PROBED_RUNS.fetch_add(1, Ordering::SeqCst) == 0 {
            tokio::select! {
                _ = FAIL_PROBED.notified() => return Err("the first run fails".into()),
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
        shutdown.cancelled().await;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_is_503_while_a_failed_handler_waits_to_restart_and_live_stays_200() {
    let broker = Broker::connect().await;
    let port = free_port();
    let health = format!("127.0.0.1:{port}");
    let config = common::config(
        &broker,
        "sup_probed",
        &[("health_addr", &health), ("restart_delay", "3s")],
    );
    let running = Runtime::new(config)
        .services(["sup_probed"])
        .start()
        .await
        .expect("starts");
    let (status, body) = http_get(port, "/ready").await.expect("health answers");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"sup_probed.work\":\"up\""), "{body}");

    let failed = Instant::now();
    FAIL_PROBED.notify_one();
    let (mut down, mut live) = (Vec::new(), Vec::new());
    loop {
        assert!(
            failed.elapsed() < BOUND,
            "ready went down and came back within {BOUND:?}: {down:?}"
        );
        let (status, body) = http_get(port, "/ready").await.expect("health answers");
        live.push(http_get(port, "/live").await.map(|r| r.0));
        if status == 503 {
            assert!(body.contains("\"sup_probed.work\":\"down\""), "{body}");
            down.push(failed.elapsed());
        } else if status == 200 && !down.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let back = failed.elapsed();
    running.stop().await;
    assert_eq!(PROBED_RUNS.load(Ordering::SeqCst), 2, "restarted once");
    assert!(
        back >= Duration::from_secs(3),
        "not ready for the whole restart_delay: back after {back:?}"
    );
    assert!(
        live.len() > 10 && live.iter().all(|s| *s == Some(200)),
        "{live:?}"
    );
}
