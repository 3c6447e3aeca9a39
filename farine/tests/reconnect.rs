//! Reconnection against the real broker, with a fault-injecting proxy of the test's own between
//! farine and RabbitMQ (cut, stall, restore): consumers under load, heartbeats, RPC calls in
//! flight, cluster nodes, health, TLS.

mod common;

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{BOUND, start_error};
use farine::__private::amqp::{Connector, ConnectorSettings, NodeSelector};
use farine::config::Config;
use farine::rpc::{Client, RpcError};
use farine::{Runtime, consume};
use farine_test_support::proxy::Proxy;
use farine_test_support::tls::{TlsProxy, cert_path};
use farine_test_support::{Broker, free_port, http_get, unique, wait_until};
use serde_json::{Value, json};

/// A config whose `[service]` section has `amqp_uri` and `options`.
fn config(service: &str, amqp_uri: &str, options: &[(&str, &str)]) -> Config {
    let mut text = format!("[{service}]\namqp_uri = {amqp_uri}\n");
    for (key, value) in options {
        text.push_str(&format!("{key} = {value}\n"));
    }
    Config::from_ini(&text, "test.ini").expect("test config parses")
}

// ---------------------------------------------------------------------------------------------

static HANDLED: Mutex<Option<HashMap<u64, u32>>> = Mutex::new(None);
static CALLS: AtomicU64 = AtomicU64::new(0);

fn distinct() -> usize {
    HANDLED.lock().unwrap().as_ref().map_or(0, HashMap::len)
}

#[derive(Default)]
struct LoadProbe;

#[farine::service(name = "load_probe")]
impl LoadProbe {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn on_message(&self, body: Value) {
        tokio::time::sleep(Duration::from_millis(1)).await;
        let id = body["id"].as_u64().unwrap_or(u64::MAX);
        *HANDLED
            .lock()
            .unwrap()
            .get_or_insert_with(HashMap::new)
            .entry(id)
            .or_default() += 1;
        CALLS.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_consumed_across_two_cuts_are_all_handled_none_lost() {
    const TOTAL: u64 = 10_000;
    const PREFETCH: u64 = 10;
    let broker = Broker::connect().await;
    let (exchange, queue) = (unique("load-x"), unique("load-q"));
    let proxy = Proxy::to_broker().await;
    let config = config(
        "load_probe",
        &broker.uri_via(proxy.addr()),
        &[
            ("on_message.exchange", &exchange),
            ("on_message.queue", &queue),
            ("prefetch_count", &PREFETCH.to_string()),
        ],
    );
    // Declare the topology, then stop, so that the whole load waits in the queue.
    Runtime::new(config.clone())
        .services(["load_probe"])
        .start()
        .await
        .expect("starts")
        .stop()
        .await;
    for id in 0..TOTAL {
        broker
            .publish_json(
                &exchange,
                "rk",
                &json!({ "id": id, "pad": "0123456789abcdef" }),
            )
            .await;
    }

    let running = Runtime::new(config)
        .services(["load_probe"])
        .start()
        .await
        .expect("starts");
    for (cut, after) in [(1, 2_000), (2, 5_000)] {
        assert!(
            wait_until(Duration::from_secs(60), || distinct() >= after).await,
            "{} handled before cut {cut}",
            distinct()
        );
        proxy.cut();
    }
    let all = wait_until(Duration::from_secs(120), || distinct() == TOTAL as usize).await;
    assert!(
        all,
        "every message handled after two cuts: {} of {TOTAL}",
        distinct()
    );
    assert!(
        broker.wait_for_consumers(&queue, 1, BOUND).await,
        "the consumer is back"
    );
    running.stop().await;
    // Stopping requeues whatever is unacked: an empty queue now means every message was acked.
    assert_eq!(
        broker.queue_state(&queue).await,
        Some((0, 0)),
        "nothing was left unacked"
    );
    // Duplicates only where the guarantees say: messages in flight (at most the prefetch) when
    // a cut lost their ack.
    let duplicates = CALLS.load(Ordering::SeqCst) - TOTAL;
    assert!(
        duplicates <= 2 * PREFETCH,
        "{duplicates} duplicates for two cuts with prefetch {PREFETCH}"
    );
}

// ---------------------------------------------------------------------------------------------

static STALL_SEEN: Mutex<Vec<u64>> = Mutex::new(Vec::new());

#[derive(Default)]
struct StallProbe;

#[farine::service(name = "stall_probe")]
impl StallProbe {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn on_message(&self, body: Value) {
        STALL_SEEN
            .lock()
            .unwrap()
            .push(body["n"].as_u64().unwrap_or(0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_broker_is_detected_by_heartbeats_readiness_drops_and_farine_resumes_when_it_answers()
 {
    let broker = Broker::connect().await;
    let (exchange, queue) = (unique("stall-x"), unique("stall-q"));
    let proxy = Proxy::to_broker().await;
    let port = free_port();
    let health = format!("127.0.0.1:{port}");
    let config = config(
        "stall_probe",
        &broker.uri_via(proxy.addr()),
        &[
            ("on_message.exchange", &exchange),
            ("on_message.queue", &queue),
            ("amqp_heartbeat", "1"),
            ("connect_timeout", "1"),
            ("health_addr", &health),
        ],
    );
    let running = Runtime::new(config)
        .services(["stall_probe"])
        .start()
        .await
        .expect("starts");
    let (status, body) = http_get(port, "/ready").await.expect("health answers");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"stall_probe.on_message\":\"up\""), "{body}");
    assert_eq!(http_get(port, "/live").await.map(|r| r.0), Some(200));
    broker.publish_json(&exchange, "rk", &json!({"n": 1})).await;
    assert!(wait_until(BOUND, || STALL_SEEN.lock().unwrap().len() == 1).await);

    proxy.stall();
    // No bytes pass: only the missed heartbeats tell farine the connection is dead.
    let mut not_ready = false;
    for _ in 0..200 {
        if !running.is_ready() {
            not_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(not_ready, "the stall was detected within 10 s");
    let (status, body) = http_get(port, "/ready").await.expect("health answers");
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        http_get(port, "/live").await.map(|r| r.0),
        Some(200),
        "still live"
    );

    proxy.resume();
    broker.publish_json(&exchange, "rk", &json!({"n": 2})).await;
    assert!(
        wait_until(Duration::from_secs(30), || STALL_SEEN.lock().unwrap().len()
            == 2)
        .await,
        "consuming again after the broker answers"
    );
    assert!(wait_until(BOUND, || running.is_ready()).await);
    assert_eq!(http_get(port, "/ready").await.map(|r| r.0), Some(200));
    running.stop().await;
    assert_eq!(*STALL_SEEN.lock().unwrap(), vec![1, 2]);
}

// ---------------------------------------------------------------------------------------------

static SLOW_STARTED: AtomicBool = AtomicBool::new(false);

#[derive(Default)]
struct RpcProbe;

#[farine::service(name = "reconnect_rpc_probe")]
impl RpcProbe {
    #[farine::rpc::method]
    async fn slow(&self) -> u32 {
        SLOW_STARTED.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(3)).await;
        1
    }

    #[farine::rpc::method]
    async fn echo(&self, n: u32) -> u32 {
        n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rpc_call_in_flight_when_the_connection_drops_fails_at_once_and_the_next_call_goes_through()
 {
    let broker = Broker::connect().await;
    let service = "reconnect_rpc_probe";
    let server = Runtime::new(config(service, &broker.uri(), &[]))
        .services([service])
        .start()
        .await
        .expect("the server starts");
    let proxy = Proxy::to_broker().await;
    let client = Client::connect(
        &broker.uri_via(proxy.addr()),
        service,
        Duration::from_secs(20),
    )
    .await
    .expect("the client connects");
    assert_eq!(client.call::<u32>("echo", (7,)).await.unwrap(), 7);

    let in_flight = {
        let client = client.clone();
        tokio::spawn(async move { client.call::<u32>("slow", ()).await })
    };
    assert!(wait_until(BOUND, || SLOW_STARTED.load(Ordering::SeqCst)).await);
    let cut_at = std::time::Instant::now();
    proxy.cut();
    let result = in_flight.await.unwrap();
    assert!(
        matches!(&result, Err(RpcError::Connection { cause, .. }) if cause.contains("lost")),
        "{result:?}"
    );
    assert!(
        cut_at.elapsed() < Duration::from_secs(5),
        "failed at the cut, not at the 20 s timeout"
    );
    assert_eq!(
        client
            .call::<u32>("echo", (8,))
            .await
            .expect("after the reconnection"),
        8
    );
    assert_eq!(client.calls_in_flight(), 0);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------

static NODE_SEEN: Mutex<Vec<u64>> = Mutex::new(Vec::new());

#[derive(Default)]
struct NodeProbe;

#[farine::service(name = "node_probe")]
impl NodeProbe {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn on_message(&self, body: Value) {
        NODE_SEEN
            .lock()
            .unwrap()
            .push(body["n"].as_u64().unwrap_or(0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_several_nodes_farine_skips_a_dead_one_and_moves_on_when_its_node_fails() {
    let broker = Broker::connect().await;
    let (exchange, queue) = (unique("nodes-x"), unique("nodes-q"));
    let (first, second) = (Proxy::to_broker().await, Proxy::to_broker().await);
    let dead = format!("amqp://guest:guest@127.0.0.1:{}", free_port());
    let nodes = format!(
        "{dead}, {}, {}",
        broker.uri_via(first.addr()),
        broker.uri_via(second.addr())
    );
    let config = config(
        "node_probe",
        &nodes,
        &[
            ("on_message.exchange", &exchange),
            ("on_message.queue", &queue),
            ("amqp_node_selector", "in_order"),
        ],
    );
    let running = Runtime::new(config)
        .services(["node_probe"])
        .start()
        .await
        .expect("starts on the first live node");
    assert!(first.connections() >= 1 && second.connections() == 0);
    broker.publish_json(&exchange, "rk", &json!({"n": 1})).await;
    assert!(wait_until(BOUND, || NODE_SEEN.lock().unwrap().len() == 1).await);

    first.stop().await; // that node is gone for good
    assert!(
        wait_until(BOUND, || second.connections() >= 1).await,
        "moved on to the next node"
    );
    assert!(broker.wait_for_consumers(&queue, 1, BOUND).await);
    broker.publish_json(&exchange, "rk", &json!({"n": 2})).await;
    assert!(wait_until(BOUND, || NODE_SEEN.lock().unwrap().len() == 2).await);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_random_selector_spreads_connections_over_the_nodes() {
    let broker = Broker::connect().await;
    let (a, b) = (Proxy::to_broker().await, Proxy::to_broker().await);
    let nodes = format!("{},{}", broker.uri_via(a.addr()), broker.uri_via(b.addr()));
    // Each connector picks independently: 16 picks all landing on one node would be a 1 in
    // 32768 chance.
    for _ in 0..16 {
        let connector = Connector::with_settings(
            nodes.clone(),
            "farine selector test",
            ConnectorSettings {
                selector: NodeSelector::Random,
                ..Default::default()
            },
        );
        connector.connection().await.expect("a node answers");
        connector.close().await;
    }
    assert_eq!(a.connections() + b.connections(), 16);
    assert!(
        a.connections() >= 1 && b.connections() >= 1,
        "{} / {}",
        a.connections(),
        b.connections()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_no_node_answers_the_error_names_each_host_and_port() {
    let (one, two) = (free_port(), free_port());
    let connector = Connector::new(
        format!("amqp://guest:s3cret@127.0.0.1:{one},amqp://guest:s3cret@127.0.0.1:{two}"),
        "farine nodes test",
        BOUND,
    );
    let error = connector
        .connection()
        .await
        .expect_err("nothing listens")
        .to_string();
    assert!(
        error.contains(&format!("127.0.0.1:{one}")) && error.contains(&format!("127.0.0.1:{two}")),
        "{error}"
    );
    assert!(!error.contains("s3cret"), "{error}");
}

// ---------------------------------------------------------------------------------------------

static TLS_SEEN: Mutex<Vec<Value>> = Mutex::new(Vec::new());

#[derive(Default)]
struct TlsProbe;

#[farine::service(name = "tls_probe")]
impl TlsProbe {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn on_message(&self, body: Value) {
        TLS_SEEN.lock().unwrap().push(body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_works_with_the_configured_ca_and_an_unknown_certificate_is_refused() {
    let broker = Broker::connect().await;
    let (exchange, queue) = (unique("tls-x"), unique("tls-q"));
    let front = TlsProxy::to_broker().await;
    let ca = cert_path("ca.pem").display().to_string();
    let options = [
        ("on_message.exchange", exchange.as_str()),
        ("on_message.queue", queue.as_str()),
        ("connect_timeout", "5"),
    ];

    // Without the CA the certificate is not trusted: no connection.
    let error = start_error(
        config("tls_probe", &broker.amqps_uri_via(front.port()), &options),
        "tls_probe",
        "an unknown certificate is refused",
    )
    .await;
    // Refused for the certificate, by the TLS front's address: not any other connection error.
    let text = error.to_string();
    assert!(
        text.contains(&format!("localhost:{}", front.port()))
            && text.contains("invalid peer certificate: UnknownIssuer"),
        "{text}"
    );

    let mut with_ca = options.to_vec();
    with_ca.push(("amqp_tls_ca_file", &ca));
    let running = Runtime::new(config(
        "tls_probe",
        &broker.amqps_uri_via(front.port()),
        &with_ca,
    ))
    .services(["tls_probe"])
    .start()
    .await
    .expect("starts over TLS");
    broker
        .publish_json(&exchange, "rk", &json!({"tls": true}))
        .await;
    assert!(wait_until(BOUND, || TLS_SEEN.lock().unwrap().len() == 1).await);
    running.stop().await;
    assert_eq!(TLS_SEEN.lock().unwrap()[0], json!({"tls": true}));
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnection_after_rounds_that_failed_is_counted_as_one() {
    let broker = Broker::connect().await;
    let proxy = Proxy::to_broker().await;
    let connector = Connector::with_settings(
        broker.uri_via(proxy.addr()),
        "reconnect-count",
        ConnectorSettings {
            connect_timeout: Duration::from_millis(300),
            ..Default::default()
        },
    );
    let first = connector.connection().await.expect("connects");
    assert_eq!(connector.reconnects(), 0);
    // The connection is cut, and the broker does not answer the next round.
    proxy.stall();
    proxy.cut();
    assert!(wait_until(BOUND, || !first.is_connected()).await);
    assert!(
        connector.connection().await.is_err(),
        "no answer: the round fails"
    );
    proxy.resume();
    connector.connection().await.expect("reconnects");
    // What the RPC client's route check and the metric read: one reconnection.
    assert_eq!(connector.reconnects(), 1);
    connector.close().await;
}
