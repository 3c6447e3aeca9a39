//! What a service's config decides against the real broker: an `init` function building the
//! service from its section, publishes the broker refuses, RPC replies over
//! `max_message_bytes`, and per-method RPC client timeouts.

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{BOUND, config, start_error};
use farine::config::{Config, Section};
use farine::rpc::{Client, RpcError};
use farine::{PublishError, Publisher, Running, Runtime, Shutdown, execute, publish};
use farine_test_support::{Broker, unique, wait_until};
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------

/// Built by [`greeter_from_config`] only: it has no `Default`.
struct Greeter {
    greeting: String,
}

/// Reads the service's own `greeting` key; refuses `greeting = silence` with an error of its
/// own (not a `ConfigError`).
fn greeter_from_config(
    section: &Section,
) -> Result<Greeter, Box<dyn std::error::Error + Send + Sync>> {
    let greeting: String = section.require("greeting")?;
    if greeting == "silence" {
        return Err(format!("a greeter cannot greet with {greeting:?}").into());
    }
    Ok(Greeter { greeting })
}

#[farine::service(name = "cfg_greeter", init = greeter_from_config)]
impl Greeter {
    #[farine::rpc::method]
    async fn greet(&self, name: String) -> String {
        format!("{}, {name}", self.greeting)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_with_init_is_built_by_it_from_its_own_config_keys() {
    let broker = Broker::connect().await;
    let running = Runtime::new(config(&broker, "cfg_greeter", &[("greeting", "bonjour")]))
        .services(["cfg_greeter"])
        .start()
        .await
        .expect("starts");
    let greeter = Client::connect(&broker.uri(), "cfg_greeter", BOUND)
        .await
        .expect("client connects");
    let greeting = greeter.call::<String>("greet", ("ada",)).await;
    running.stop().await;
    assert_eq!(greeting.unwrap(), "bonjour, ada");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_error_from_init_stops_start_up_naming_the_section_and_the_key() {
    let broker = Broker::connect().await;
    let error = start_error(
        config(&broker, "cfg_greeter", &[]),
        "cfg_greeter",
        "init to fail: `greeting` is missing",
    )
    .await;
    assert!(error.is_config(), "{error}");
    let message = error.to_string();
    assert!(
        message.contains("[cfg_greeter]") && message.contains("`greeting`"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_error_from_init_stops_start_up_as_a_config_error_naming_the_service() {
    let broker = Broker::connect().await;
    let error = start_error(
        config(&broker, "cfg_greeter", &[("greeting", "silence")]),
        "cfg_greeter",
        "init to refuse `greeting = silence`",
    )
    .await;
    let message = error.to_string();
    assert!(
        message.contains("cfg_greeter") && message.contains("cannot greet with \"silence\""),
        "{message}"
    );
    assert!(error.is_config(), "{error}");
}

// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct NackProbe;

#[farine::service(name = "cfg_nack_probe")]
impl NackProbe {
    #[publish(exchange = "x", routing_key = "rk")]
    async fn send(&self, publisher: Publisher, event: &Value) -> Result<(), PublishError> {
        publisher.publish(event).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_the_broker_nacks_returns_nacked_naming_the_exchange() {
    let broker = Broker::connect().await;
    let exchange = unique("nack-x");
    let running = Runtime::new(config(
        &broker,
        "cfg_nack_probe",
        &[("send.exchange", &exchange)],
    ))
    .services(["cfg_nack_probe"])
    .start()
    .await
    .expect("starts");
    // The only queue bound holds one message and refuses publishes beyond that: the broker
    // nacks them.
    let queue = unique("nack-full");
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
    arguments.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    broker
        .channel()
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            arguments,
        )
        .await
        .expect("queue declared");
    broker
        .channel()
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "rk".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("queue bound");

    let first = NackProbe.send(&json!({"n": 1})).await;
    let second = NackProbe.send(&json!({"n": 2})).await;
    running.stop().await;

    first.expect("the first publish fills the queue");
    match second {
        Err(PublishError::Nacked {
            exchange: nacked,
            routing_key,
        }) => assert_eq!((nacked, routing_key.as_str()), (exchange, "rk")),
        other => panic!("expected Nacked, got {other:?}"),
    }
    assert_eq!(broker.queue_state(&queue).await.map(|s| s.0), Some(1));
}

// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct BigReplies;

#[farine::service(name = "cfg_big_replies")]
impl BigReplies {
    #[farine::rpc::method]
    async fn text(&self, len: usize) -> String {
        "a".repeat(len)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rpc_result_over_max_message_bytes_is_an_error_reply_and_the_server_goes_on() {
    let broker = Broker::connect().await;
    let running = Runtime::new(config(
        &broker,
        "cfg_big_replies",
        &[("max_message_bytes", "1000")],
    ))
    .services(["cfg_big_replies"])
    .start()
    .await
    .expect("starts");
    let server = Client::connect(&broker.uri(), "cfg_big_replies", BOUND)
        .await
        .expect("client connects");

    let small = server.call::<String>("text", (10,)).await;
    let started = Instant::now();
    let big = server.call::<String>("text", (5000,)).await;
    let answered_in = started.elapsed();
    let after = server.call::<String>("text", (20,)).await;
    running.stop().await;

    assert_eq!(small.unwrap(), "a".repeat(10));
    match big {
        Err(RpcError::Remote { message, .. }) => {
            assert!(message.contains("max_message_bytes"), "{message}")
        }
        other => panic!("expected an error reply, got {other:?}"),
    }
    assert!(
        answered_in < BOUND,
        "answered, not left to the caller's timeout"
    );
    assert_eq!(after.unwrap(), "a".repeat(20), "the server goes on serving");
}

// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct SlowServer;

#[farine::service(name = "cfg_slow_server")]
impl SlowServer {
    #[farine::rpc::method]
    async fn sleep(&self, ms: u64) -> u64 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        ms
    }
}

/// What the impatient caller's call gave, and how long it took.
static ASKED: Mutex<Option<(Result<u64, RpcError>, Duration)>> = Mutex::new(None);

#[derive(Default)]
struct Impatient;

#[farine::service(name = "cfg_impatient")]
impl Impatient {
    #[farine::rpc::client("cfg_slow_server")]
    async fn ask(&self, server: Client) -> Result<u64, RpcError> {
        server.call("sleep", (600_000,)).await
    }

    /// Calls `ask` once, records the outcome, then idles until shutdown.
    #[execute]
    async fn once(&self, shutdown: Shutdown) {
        let started = Instant::now();
        let result = self.ask().await;
        *ASKED.lock().unwrap() = Some((result, started.elapsed()));
        shutdown.cancelled().await;
    }
}

async fn start(broker: &Broker, service: &str, options: &str) -> Running {
    let text = format!("[{service}]\namqp_uri = {}\n{options}", broker.uri());
    Runtime::new(Config::from_ini(&text, "test.ini").expect("parses"))
        .services([service])
        .start()
        .await
        .expect("starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_methods_own_rpc_timeout_wins_over_the_services() {
    let broker = Broker::connect().await;
    // A call still in flight when either side stops is dropped at once.
    let server = start(&broker, "cfg_slow_server", "drain_timeout = 100ms\n").await;
    let caller = start(
        &broker,
        "cfg_impatient",
        "rpc_timeout = 120\nask.rpc_timeout = 1\ndrain_timeout = 100ms\n",
    )
    .await;
    // Far longer than the method's second, far shorter than the service's two minutes.
    let answered = wait_until(Duration::from_secs(30), || ASKED.lock().unwrap().is_some()).await;
    caller.stop().await;
    server.stop().await;

    assert!(answered, "the call did not end within 30 s");
    let (result, elapsed) = ASKED.lock().unwrap().take().unwrap();
    match result {
        Err(RpcError::Timeout { after, method, .. }) => {
            assert_eq!(after, Duration::from_secs(1), "the method's timeout");
            assert_eq!(method, "sleep");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(
        elapsed >= Duration::from_millis(1000),
        "timed out after {elapsed:?}, before the bound"
    );
}
