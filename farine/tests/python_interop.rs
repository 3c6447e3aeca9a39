//! farine beside the real Python farine (baguette-messaging 0.19, on Python 2.7), on the real
//! broker, in both directions: RPC (unary, streamed, failing) from a farine client to a Python
//! server and from a Python client to a farine server (on its one queue and with
//! `rpc_queue_per_method`), a farine and a Python server of one service sharing its calls, and
//! messages published by one and consumed by the other.
//!
//! The Python side is `tests/python/` run by the environment `scripts/python-farine` makes
//! (`target/python-farine`, or `$FARINE_PYTHON_ENV`). Without it (no Python 2.7 on the machine)
//! each test prints why it is skipped and returns; `scripts/test` builds it first and sets
//! `FARINE_PYTHON_ENV`, under which a missing environment fails the tests instead.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use common::serve;
use farine::rpc::{Args, CallOptions, Client, RpcError, Stream, StreamExt, stream};
use farine::{BrokerError, Message, Resource, consume};
use farine_test_support::process::Process;
use farine_test_support::{Broker, IniFile, wait_until};
use futures_util::future::join_all;
use serde_json::{Value, json};

/// A Python process's start (an interpreter, kombu, gevent) on a loaded machine.
const PYTHON_START: Duration = Duration::from_secs(30);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate is in the workspace")
        .to_path_buf()
}

/// The Python farine environment, or `None` after printing why the test is skipped.
fn python_env(test: &str) -> Option<PathBuf> {
    let required = std::env::var_os("FARINE_PYTHON_ENV");
    let dir = required
        .clone()
        .map_or_else(|| workspace().join("target/python-farine"), PathBuf::from);
    if dir.join("python").is_file() {
        return Some(dir);
    }
    assert!(
        required.is_none(),
        "FARINE_PYTHON_ENV is {}, which holds no Python farine environment: run scripts/python-farine",
        dir.display()
    );
    eprintln!(
        "SKIPPED {test}: no Python farine environment at {} (baguette-messaging 0.19 needs Python 2.7): run scripts/python-farine to make it",
        dir.display()
    );
    None
}

/// The Python side of a test: its interpreter and a `farine.ini` for the test's vhost with the
/// sections of the Python services and clients.
struct Python {
    env: PathBuf,
    ini: IniFile,
}

impl Python {
    fn new(env: PathBuf, broker: &Broker) -> Self {
        let ini = IniFile::new(&format!(
            "[DEFAULT]\namqp_uri = {}\n\n[pycalc]\n[rscalc]\n[shared]\n[pyconsumer]\n[pypub]\n",
            broker.uri()
        ));
        Self { env, ini }
    }

    fn command(&self, script: &str, args: &[&str]) -> Command {
        let dir = workspace().join("tests/python");
        let mut command = Command::new(self.env.join("python"));
        command
            .arg(dir.join(script))
            .args(args)
            .current_dir(&dir)
            .env("FARINE_INI", &self.ini.path)
            .env("PYTHONUNBUFFERED", "1");
        command
    }

    /// Starts the Python services of module `module` (`tests/python/<module>/service.py`).
    fn serve(&self, module: &str) -> Process {
        Process::spawn(self.command("serve.py", &[module]))
    }

    /// Runs `script` to its end and returns what it printed on lines starting with `prefix`.
    fn run(&self, script: &str, args: &[&str], prefix: &str) -> Vec<String> {
        let mut process = Process::spawn(self.command(script, args));
        let status = process.wait_exit(PYTHON_START * 2);
        let output = process.output();
        assert!(
            status.is_some_and(|s| s.success()),
            "{script} {args:?} failed ({status:?}):\n{output}"
        );
        output
            .lines()
            .filter_map(|line| line.strip_prefix(prefix))
            .map(str::to_string)
            .collect()
    }

    /// Calls `service` with Python farine's client: one JSON value per call.
    fn call(&self, service: &str, calls: &Value) -> Vec<Value> {
        self.run("call.py", &[service, &calls.to_string()], "RESULT ")
            .iter()
            .map(|line| serde_json::from_str(line).expect("call.py prints JSON"))
            .collect()
    }
}

/// Waits until each of `queues` has `consumers` consumers.
async fn wait_for_consumers(broker: &Broker, queues: &[&str], consumers: u32, python: &Process) {
    for queue in queues {
        assert!(
            broker
                .wait_for_consumers(queue, consumers, PYTHON_START)
                .await,
            "queue {queue} did not get {consumers} consumer(s); the Python side printed:\n{}",
            python.output()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The farine services of the tests.

/// The calculator a Python client calls: the same methods as the Python `pycalc`.
#[derive(Default)]
struct RsCalc;

#[farine::service(name = "rscalc")]
impl RsCalc {
    #[farine::rpc::method]
    async fn add(&self, a: i64, b: i64) -> i64 {
        a + b
    }

    #[farine::rpc::method]
    async fn greet(&self, name: String, greeting: Option<String>) -> Value {
        json!({ "text": format!("{}, {name}", greeting.as_deref().unwrap_or("hello")) })
    }

    #[farine::rpc::method]
    fn letters(&self, text: String) -> impl Stream<Item = String> + Send {
        let letters: Vec<String> = text.chars().map(String::from).collect();
        stream::iter(letters)
    }

    #[farine::rpc::method]
    async fn fail(&self, message: String) -> Result<u32, String> {
        Err(message)
    }
}

/// The calls the farine half of service `shared` ran.
static RUST_RAN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// The farine half of service `shared`; `tests/python/pyshared` is the Python half.
#[derive(Default)]
struct Shared;

#[farine::service(name = "shared")]
impl Shared {
    #[farine::rpc::method]
    async fn work(&self, n: u32) -> Value {
        RUST_RAN.lock().unwrap().push(n);
        tokio::time::sleep(Duration::from_millis(20)).await;
        json!({ "by": "rust", "n": n })
    }
}

/// A message as the farine consumer received it: body, exchange, routing key, content type.
type Received = (Value, String, String, Option<String>);

/// What the farine consumer received from Python.
static FROM_PYTHON: Mutex<Vec<Received>> = Mutex::new(Vec::new());

#[derive(Default)]
struct RsConsumer;

#[farine::service(name = "rsconsumer")]
impl RsConsumer {
    #[consume(exchange = "py_events", routing_key = "made")]
    async fn made(&self, body: Value, message: &Message) {
        FROM_PYTHON.lock().unwrap().push((
            body,
            message.exchange().to_string(),
            message.routing_key().to_string(),
            message.content_type().map(str::to_string),
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// A farine client, a Python server.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_farine_client_gets_results_streams_and_typed_errors_from_a_python_server() {
    let Some(env) =
        python_env("a_farine_client_gets_results_streams_and_typed_errors_from_a_python_server")
    else {
        return;
    };
    let broker = Broker::connect().await;
    let python = Python::new(env, &broker);
    let server = python.serve("pycalc");
    let queues = [
        "pycalc__add",
        "pycalc__greet",
        "pycalc__letters",
        "pycalc__fail",
    ];
    wait_for_consumers(&broker, &queues, 1, &server).await;
    let pycalc = Client::connect(&broker.uri(), "pycalc", PYTHON_START)
        .await
        .expect("client connects");

    // Unary, positional and keyword arguments.
    assert_eq!(pycalc.call::<i64>("add", (2, 40)).await.unwrap(), 42);
    let greeting: Value = pycalc
        .call(
            "greet",
            Args::new().kwarg("name", "ana").kwarg("greeting", "hi"),
        )
        .await
        .unwrap();
    assert_eq!(greeting, json!({ "text": "hi, ana" }));

    // A generator is a stream: one reply per item, then the end marker.
    let letters: Vec<String> = pycalc
        .stream::<String>("letters", ("abc",))
        .await
        .unwrap()
        .map(|item| item.expect("an item"))
        .collect()
        .await;
    assert_eq!(letters, ["a", "b", "c"]);
    // The same generator read as one result: its first item (the rest is dropped).
    assert_eq!(
        pycalc.call::<String>("letters", ("xyz",)).await.unwrap(),
        "x"
    );

    // A Python exception is a Remote error carrying the traceback, read back as class and
    // message.
    let error = pycalc
        .call::<Value>("fail", ("no such user: ana",))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, RpcError::Remote { kind: None, message, .. } if message.contains("Traceback")),
        "{error:?}"
    );
    assert_eq!(
        error.python_exception(),
        Some(("ValueError", "no such user: ana")),
        "{error:?}"
    );

    // A method the Python service does not have: known at once, not a timeout.
    let missing = pycalc.call::<Value>("nope", ()).await.unwrap_err();
    assert!(
        matches!(missing, RpcError::NoSuchMethod { .. }),
        "{missing:?}"
    );

    // The Python server stopped: its queues stay, without a consumer, and a call that gets no
    // answer says which queue nobody consumes.
    drop(server);
    assert!(
        broker
            .wait_for_consumers("pycalc__add", 0, PYTHON_START)
            .await
    );
    let unanswered = pycalc
        .call_with::<i64>("add", (1, 2), CallOptions::timeout(Duration::from_secs(1)))
        .await
        .unwrap_err();
    match &unanswered {
        RpcError::Broker { error, .. } => assert_eq!(
            **error,
            BrokerError::NoConsumers {
                resource: Resource::Queue("pycalc__add".to_string())
            }
        ),
        other => panic!("expected NoConsumers naming pycalc__add, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// A Python client, a farine server.

/// Calls the farine `rscalc` (started with `extra` config) with Python farine's client.
async fn a_python_client_calls_rscalc(test: &str, extra: &str) -> Option<Broker> {
    let env = python_env(test)?;
    let broker = Broker::connect().await;
    let running = serve(&broker, "rscalc", extra).await;
    let python = Python::new(env, &broker);
    let results = python.call(
        "rscalc",
        &json!([
            { "method": "add", "args": [2, 40] },
            { "method": "greet", "kwargs": { "name": "ana", "greeting": "hi" } },
            { "method": "greet", "args": ["bo"] },
            { "method": "letters", "args": ["abc"], "stream": true },
            { "method": "fail", "args": ["no such user: ana"] },
            // Python farine's client skips a falsy body (`elif result.get('body')`): 0 is no
            // result to it (docs/rpc-protocol.md).
            { "method": "add", "args": [0, 0] },
        ]),
    );
    assert_eq!(
        results,
        [
            json!({ "ok": 42 }),
            json!({ "ok": { "text": "hi, ana" } }),
            json!({ "ok": { "text": "hello, bo" } }),
            json!({ "ok": ["a", "b", "c"] }),
            // Python farine raises RPCError with the reply's `__except__`: farine's message.
            json!({ "error": "no such user: ana" }),
            json!({ "no_result": true }),
        ]
    );
    running.stop().await;
    Some(broker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_calls_a_farine_server_on_its_one_queue() {
    let Some(broker) =
        a_python_client_calls_rscalc("a_python_client_calls_a_farine_server_on_its_one_queue", "")
            .await
    else {
        return;
    };
    assert!(broker.queue_state("rscalc").await.is_some());
    assert!(broker.queue_state("rscalc__add").await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_calls_a_farine_server_with_a_queue_per_method() {
    let Some(broker) = a_python_client_calls_rscalc(
        "a_python_client_calls_a_farine_server_with_a_queue_per_method",
        "rpc_queue_per_method = true\n",
    )
    .await
    else {
        return;
    };
    // Python farine's queues, declared as it declares them: durable, kept, no arguments.
    for method in ["add", "greet", "letters", "fail"] {
        let queue = broker.queue_info(&format!("rscalc__{method}"));
        assert_eq!(queue["durable"], json!(true), "{queue}");
        assert_eq!(queue["auto_delete"], json!(false), "{queue}");
        assert_eq!(queue["exclusive"], json!(false), "{queue}");
        assert_eq!(queue["arguments"], json!({}), "{queue}");
    }
    assert!(broker.queue_state("rscalc").await.is_none());
}

// ---------------------------------------------------------------------------------------------
// A farine and a Python server of one service.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn farine_and_python_servers_of_one_service_share_its_calls_each_run_once() {
    let Some(env) =
        python_env("farine_and_python_servers_of_one_service_share_its_calls_each_run_once")
    else {
        return;
    };
    const CALLS: u32 = 60;
    let broker = Broker::connect().await;
    // Two calls at a time on the farine side, one on the Python side (its prefetch).
    let running = serve(
        &broker,
        "shared",
        "rpc_queue_per_method = true\nrpc.prefetch_count = 2\n",
    )
    .await;
    let python = Python::new(env, &broker);
    // The Python half declares the same queue the farine half did: no PRECONDITION_FAILED.
    let server = python.serve("pyshared");
    wait_for_consumers(&broker, &["shared__work"], 2, &server).await;

    let shared = Client::connect(&broker.uri(), "shared", PYTHON_START)
        .await
        .expect("client connects");
    let replies = join_all((0..CALLS).map(|n| {
        let shared = shared.clone();
        async move { shared.call::<Value>("work", (n,)).await }
    }))
    .await;
    let mut answered_by = (Vec::new(), Vec::new());
    for (n, reply) in replies.into_iter().enumerate() {
        let reply = reply.unwrap_or_else(|e| panic!("call {n}: {e}"));
        assert_eq!(reply["n"], json!(n), "{reply}");
        match reply["by"].as_str() {
            Some("rust") => answered_by.0.push(n as u32),
            Some("python") => answered_by.1.push(n as u32),
            _ => panic!("call {n}: {reply}"),
        }
    }

    // What each side ran (not only what it answered): every call once, on one side.
    let python_count = answered_by.1.len();
    assert!(
        server.wait_for_lines("EXECUTED", python_count, PYTHON_START),
        "{}",
        server.output()
    );
    let python_ran: Vec<u32> = server
        .output()
        .lines()
        .filter_map(|line| line.strip_prefix("EXECUTED ")?.parse().ok())
        .collect();
    let mut rust_ran = RUST_RAN.lock().unwrap().clone();
    rust_ran.sort_unstable();
    let mut sorted_python = python_ran.clone();
    sorted_python.sort_unstable();
    assert_eq!(
        rust_ran, answered_by.0,
        "farine ran exactly what it answered"
    );
    assert_eq!(
        sorted_python, answered_by.1,
        "Python ran exactly what it answered"
    );
    let all: BTreeSet<u32> = rust_ran.iter().chain(&python_ran).copied().collect();
    assert_eq!(all.len(), CALLS as usize, "no call ran twice");
    assert_eq!(rust_ran.len() + python_ran.len(), CALLS as usize);
    assert!(
        !rust_ran.is_empty() && !python_ran.is_empty(),
        "both served some: farine {}, Python {}",
        rust_ran.len(),
        python_ran.len()
    );
    eprintln!(
        "{CALLS} calls: farine ran {}, Python ran {}",
        rust_ran.len(),
        python_ran.len()
    );
    running.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Publish and consume.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_publishes_and_a_farine_consumer_receives() {
    let Some(env) = python_env("python_publishes_and_a_farine_consumer_receives") else {
        return;
    };
    let broker = Broker::connect().await;
    let running = serve(&broker, "rsconsumer", "").await;
    let python = Python::new(env, &broker);
    let event = json!({ "id": 7, "name": "crème", "tags": ["a", "b"], "nested": { "ok": true } });
    // Python farine declares exchange `py_events` as farine did (direct, durable), then publishes.
    let printed = python.run(
        "publish.py",
        &["py_events", "made", &event.to_string(), "pypub"],
        "PUBLISHED",
    );
    assert_eq!(printed.len(), 1);
    assert!(
        wait_until(common::BOUND, || !FROM_PYTHON.lock().unwrap().is_empty()).await,
        "the farine consumer received nothing"
    );
    let received = FROM_PYTHON.lock().unwrap().clone();
    assert_eq!(
        received,
        [(
            event,
            "py_events".to_string(),
            "made".to_string(),
            Some("application/json".to_string())
        )]
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn farine_publishes_and_a_python_consumer_receives() {
    let Some(env) = python_env("farine_publishes_and_a_python_consumer_receives") else {
        return;
    };
    let broker = Broker::connect().await;
    let python = Python::new(env, &broker);
    let consumer = python.serve("pyconsumer");
    // Python farine names a consumer's queue after its routing key.
    wait_for_consumers(&broker, &["made"], 1, &consumer).await;

    let event = json!({ "id": 8, "name": "crème", "tags": ["a", "b"], "nested": { "ok": true } });
    let publisher = farine::Publisher::connect(&broker.uri(), "to_python", "made")
        .await
        .expect("publisher connects");
    publisher.publish(&event).await.expect("published");
    publisher.close().await;

    assert!(
        consumer.wait_for_output("RECEIVED ", PYTHON_START),
        "the Python consumer received nothing:\n{}",
        consumer.output()
    );
    let output = consumer.output();
    let line = output
        .lines()
        .find_map(|line| line.strip_prefix("RECEIVED "))
        .expect("a RECEIVED line");
    let received: Value = serde_json::from_str(line).expect("JSON");
    assert_eq!(
        received,
        json!({
            "body": event,
            "exchange": "to_python",
            "routing_key": "made",
            "content_type": "application/json",
        })
    );
}
