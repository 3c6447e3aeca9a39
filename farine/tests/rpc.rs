//! RPC against the real broker: results, streams, errors, timeouts, concurrency, cancellation,
//! injected clients, and the wire format spoken by hand on either side.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{BOUND, serve};
use farine::rpc::{Args, CallOptions, Client, ErrorKind, RpcError, Stream, StreamExt, stream};
use farine_test_support::{Broker, unique, wait_until};
use futures_util::future::join_all;
use lapin::BasicProperties;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::types::{FieldTable, ShortString};
use serde_json::{Value, json};

async fn client(broker: &Broker, service: &str) -> Client {
    Client::connect(&broker.uri(), service, BOUND)
        .await
        .expect("client connects")
}

// ---------------------------------------------------------------------------------------------

/// The same calculator under a name of each test's own, so that no test's calls can reach
/// another's server even when they share a process and a vhost (`cargo test` without nextest).
macro_rules! calc_service {
    ($($ty:ident => $name:literal),* $(,)?) => {$(
#[derive(Default)]
struct $ty;

#[farine::service(name = $name)]
impl $ty {
    #[farine::rpc::method]
    async fn add(&self, a: i64, b: i64) -> i64 {
        a + b
    }

    #[farine::rpc::method]
    async fn greet(&self, name: String, greeting: Option<String>) -> String {
        format!("{}, {name}", greeting.as_deref().unwrap_or("hello"))
    }

    #[farine::rpc::method]
    async fn nothing(&self) {}

    #[farine::rpc::method]
    fn numbers(&self, n: u32) -> impl Stream<Item = u32> + Send {
        stream::iter(0..n)
    }

    #[farine::rpc::method]
    fn until_odd(&self, items: Vec<u32>) -> impl Stream<Item = Result<u32, String>> + Send {
        stream::iter(items.into_iter().map(|n| {
            if n % 2 == 1 {
                Err(format!("{n} is odd"))
            } else {
                Ok(n)
            }
        }))
    }

    #[farine::rpc::method]
    async fn fail(&self, message: String) -> Result<u32, String> {
        Err(message)
    }

    #[farine::rpc::method]
    async fn boom(&self) -> u32 {
        panic!("boom on purpose")
    }

    #[farine::rpc::method]
    async fn slow(&self, ms: u64) -> u64 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        ms
    }
}
    )*};
}

calc_service! {
    CalcArgs => "rpc_calc_args",
    CalcStream => "rpc_calc_stream",
    CalcErrors => "rpc_calc_errors",
    CalcBadArgs => "rpc_calc_bad_args",
    CalcMissing => "rpc_calc_missing",
    CalcTimeout => "rpc_calc_timeout",
    CalcMany => "rpc_calc_many",
    CalcByHand => "rpc_calc_by_hand",
    CalcBehindFront => "rpc_calc_front",
    CalcQuorum => "rpc_calc_quorum",
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_queue_type_quorum_the_servers_queue_is_a_quorum_queue_that_serves_calls() {
    let broker = Broker::connect().await;
    let running = serve(&broker, "rpc_calc_quorum", "rpc.queue_type = quorum\n").await;
    let calc = client(&broker, "rpc_calc_quorum").await;
    assert_eq!(calc.call::<i64>("add", (2, 40)).await.unwrap(), 42);
    let streamed: Vec<u32> = calc
        .stream::<u32>("numbers", (3,))
        .await
        .unwrap()
        .map(Result::unwrap)
        .collect()
        .await;
    assert_eq!(streamed, [0, 1, 2]);
    let info = broker.queue_info("rpc_calc_quorum");
    assert_eq!(info["type"], "quorum", "{info}");
    assert_eq!(info["durable"], true, "{info}");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_maps_positional_and_keyword_arguments_and_returns_the_result() {
    let broker = Broker::connect().await;
    let running = serve(&broker, "rpc_calc_args", "").await;
    let calc = client(&broker, "rpc_calc_args").await;

    assert_eq!(calc.call::<i64>("add", (2, 40)).await.unwrap(), 42);
    let by_name = Args::new().kwarg("b", 1).kwarg("a", 2);
    assert_eq!(calc.call::<i64>("add", by_name).await.unwrap(), 3);
    let mixed = Args::new().arg("ada").kwarg("greeting", "hi");
    assert_eq!(
        calc.call::<String>("greet", mixed).await.unwrap(),
        "hi, ada"
    );
    // An `Option` parameter may be left out; protocol flags (`__stream__`) are ignored.
    let flagged = Args::new().arg("bob").kwarg("__stream__", true);
    assert_eq!(
        calc.call::<String>("greet", flagged).await.unwrap(),
        "hello, bob"
    );
    calc.call::<()>("nothing", ()).await.unwrap();
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_call_yields_each_item_in_order_then_ends() {
    let broker = Broker::connect().await;
    let running = serve(&broker, "rpc_calc_stream", "").await;
    let calc = client(&broker, "rpc_calc_stream").await;

    let items: Vec<u32> = calc
        .stream::<u32>("numbers", (5,))
        .await
        .unwrap()
        .map(|item| item.unwrap())
        .collect()
        .await;
    assert_eq!(items, vec![0, 1, 2, 3, 4]);
    let empty: Vec<_> = calc
        .stream::<u32>("numbers", (0,))
        .await
        .unwrap()
        .collect()
        .await;
    assert!(empty.is_empty());

    // An `Err` item ends the stream with a remote error after the items before it.
    let mut results = calc
        .stream::<u32>("until_odd", (vec![2, 4, 5, 6],))
        .await
        .unwrap();
    assert_eq!(results.next().await.unwrap().unwrap(), 2);
    assert_eq!(results.next().await.unwrap().unwrap(), 4);
    let error = results.next().await.unwrap().unwrap_err();
    assert!(error.to_string().contains("5 is odd"), "{error}");
    assert!(results.next().await.is_none());
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_and_panics_come_back_as_remote_errors_and_the_server_keeps_serving() {
    let broker = Broker::connect().await;
    let running = serve(&broker, "rpc_calc_errors", "").await;
    let calc = client(&broker, "rpc_calc_errors").await;

    match calc.call::<u32>("fail", ("boom",)).await.unwrap_err() {
        RpcError::Remote {
            service,
            method,
            kind,
            message,
        } => {
            assert_eq!(
                (service.as_str(), method.as_str()),
                ("rpc_calc_errors", "fail")
            );
            assert_eq!(kind, Some(ErrorKind::Remote));
            assert_eq!(message, "boom");
        }
        other => panic!("expected a remote error, got {other:?}"),
    }
    match calc.call::<u32>("boom", ()).await.unwrap_err() {
        RpcError::Remote { kind, message, .. } => {
            assert_eq!(kind, Some(ErrorKind::Panic));
            assert!(message.contains("boom on purpose"), "{message}");
        }
        other => panic!("expected a remote error, got {other:?}"),
    }
    assert_eq!(
        calc.call::<i64>("add", (1, 1)).await.unwrap(),
        2,
        "still serving"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_are_an_error_reply_naming_the_parameter() {
    let broker = Broker::connect().await;
    let running = serve(&broker, "rpc_calc_bad_args", "").await;
    let calc = client(&broker, "rpc_calc_bad_args").await;

    let param = |error: RpcError| match error {
        RpcError::BadArguments { param, message, .. } => (param, message),
        other => panic!("expected bad arguments, got {other:?}"),
    };
    let (p, m) = param(calc.call::<i64>("add", (1,)).await.unwrap_err());
    assert_eq!(p.as_deref(), Some("b"), "{m}");
    assert!(m.contains("missing argument `b`"));
    let (p, m) = param(calc.call::<i64>("add", (1, 2, 3)).await.unwrap_err());
    assert_eq!(p, None);
    assert!(m.contains("takes 2 argument(s), got 3"), "{m}");
    let (p, _) = param(
        calc.call::<i64>("add", Args::new().arg(1).kwarg("c", 2))
            .await
            .unwrap_err(),
    );
    assert_eq!(p.as_deref(), Some("c"));
    let (p, _) = param(
        calc.call::<i64>("add", Args::new().arg(1).kwarg("a", 2))
            .await
            .unwrap_err(),
    );
    assert_eq!(p.as_deref(), Some("a"), "given twice");
    let (p, m) = param(calc.call::<i64>("add", ("one", 2)).await.unwrap_err());
    assert_eq!(p.as_deref(), Some("a"));
    assert!(m.contains("i64"), "{m}");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_to_a_missing_method_or_service_fails_at_once() {
    let broker = Broker::connect().await;
    let running = serve(&broker, "rpc_calc_missing", "").await;
    let calc = client(&broker, "rpc_calc_missing").await;

    // Known from the broker's answer, well before the calls' minute-long timeout.
    let patient = CallOptions::timeout(Duration::from_secs(60));
    let started = Instant::now();
    let error = calc
        .call_with::<Value>("nosuchmethod", (), patient)
        .await
        .unwrap_err();
    assert!(matches!(error, RpcError::NoSuchMethod { .. }), "{error}");
    assert!(started.elapsed() < Duration::from_secs(30));

    let nobody = client(&broker, &unique("rpc-nobody")).await;
    let started = Instant::now();
    let error = nobody
        .call_with::<Value>("anything", (), patient)
        .await
        .unwrap_err();
    assert!(matches!(error, RpcError::NoSuchService { .. }), "{error}");
    assert!(started.elapsed() < Duration::from_secs(30));
    // The client still works for its next call after the broker closed its channel.
    assert!(matches!(
        nobody.call::<Value>("anything", ()).await.unwrap_err(),
        RpcError::NoSuchService { .. }
    ));
    assert_eq!(calc.call::<i64>("add", (1, 2)).await.unwrap(), 3);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_times_out_at_its_timeout_and_its_late_reply_leaves_nothing_behind() {
    let broker = Broker::connect().await;
    let running = serve(&broker, "rpc_calc_timeout", "").await;
    let calc = client(&broker, "rpc_calc_timeout").await;

    // The call gives up at its timeout, long before the reply it waits for would come.
    let started = Instant::now();
    let error = calc
        .call_with::<u64>(
            "slow",
            (3000,),
            CallOptions::timeout(Duration::from_millis(200)),
        )
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    assert!(matches!(error, RpcError::Timeout { .. }), "{error}");
    assert!(
        elapsed >= Duration::from_millis(200) && elapsed < Duration::from_millis(3000),
        "{elapsed:?}"
    );
    assert_eq!(calc.calls_in_flight(), 0);
    // The late reply arrives while the next call waits: it is dropped, and the client goes on.
    assert_eq!(calc.call::<u64>("slow", (3500,)).await.unwrap(), 3500);
    assert_eq!(calc.calls_in_flight(), 0);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_calls_through_one_client_each_get_their_own_answer() {
    let broker = Broker::connect().await;
    let running = serve(&broker, "rpc_calc_many", "prefetch_count = 64\n").await;
    let calc = client(&broker, "rpc_calc_many").await;

    let calls = (0..64i64).map(|n| {
        let calc = calc.clone();
        async move { (n, calc.call::<i64>("add", (n, 1000)).await) }
    });
    for (n, result) in join_all(calls).await {
        assert_eq!(result.unwrap(), n + 1000);
    }
    assert_eq!(calc.calls_in_flight(), 0);
    running.stop().await;
}

// ---------------------------------------------------------------------------------------------

static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
static MAX_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
static RELEASED: AtomicBool = AtomicBool::new(false);

#[derive(Default)]
struct Bounded;

#[farine::service(name = "rpc_bounded")]
impl Bounded {
    /// Stays in flight until the test releases the calls (or a bound passes).
    #[farine::rpc::method]
    async fn hold(&self) -> usize {
        let now = IN_FLIGHT.fetch_add(1, Ordering::SeqCst) + 1;
        MAX_IN_FLIGHT.fetch_max(now, Ordering::SeqCst);
        wait_until(BOUND, || RELEASED.load(Ordering::SeqCst)).await;
        IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
        now
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_served_concurrently_up_to_prefetch_count() {
    let broker = Broker::connect().await;
    let running = serve(&broker, "rpc_bounded", "prefetch_count = 4\n").await;
    let bounded = client(&broker, "rpc_bounded").await;
    let calls: Vec<_> = (0..12)
        .map(|_| {
            let bounded = bounded.clone();
            tokio::spawn(async move { bounded.call::<usize>("hold", ()).await.unwrap() })
        })
        .collect();
    // Four calls are served at once while the other eight wait in the broker, not delivered.
    assert!(
        wait_until(BOUND, || IN_FLIGHT.load(Ordering::SeqCst) == 4).await,
        "four calls in flight"
    );
    let deadline = tokio::time::Instant::now() + BOUND;
    while broker.queue_state("rpc_bounded").await.map(|s| s.0) != Some(8) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "eight calls wait in the queue"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(IN_FLIGHT.load(Ordering::SeqCst), 4);
    RELEASED.store(true, Ordering::SeqCst);
    for call in calls {
        call.await.expect("the call's task");
    }
    running.stop().await;
    assert_eq!(MAX_IN_FLIGHT.load(Ordering::SeqCst), 4);
}

// ---------------------------------------------------------------------------------------------

static PRODUCED: AtomicUsize = AtomicUsize::new(0);
static STREAM_STOPPED: AtomicBool = AtomicBool::new(false);

/// Sets [`STREAM_STOPPED`] when the server drops the stream.
struct StopFlag;

impl Drop for StopFlag {
    fn drop(&mut self) {
        STREAM_STOPPED.store(true, Ordering::SeqCst);
    }
}

#[derive(Default)]
struct Endless;

#[farine::service(name = "rpc_endless")]
impl Endless {
    #[farine::rpc::method]
    fn ticks(&self) -> impl Stream<Item = usize> + Send {
        let flag = StopFlag;
        stream::unfold(flag, |flag| async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            Some((PRODUCED.fetch_add(1, Ordering::SeqCst), flag))
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_stream_stops_the_server_producing_it() {
    let broker = Broker::connect().await;
    let running = serve(&broker, "rpc_endless", "").await;
    let endless = client(&broker, "rpc_endless").await;

    let mut ticks = endless.stream::<usize>("ticks", ()).await.unwrap();
    for _ in 0..3 {
        ticks.next().await.unwrap().unwrap();
    }
    assert!(!STREAM_STOPPED.load(Ordering::SeqCst));
    drop(ticks);
    assert!(
        wait_until(BOUND, || STREAM_STOPPED.load(Ordering::SeqCst)).await,
        "the server stopped the stream"
    );
    let produced = PRODUCED.load(Ordering::SeqCst);
    assert_eq!(endless.calls_in_flight(), 0);
    running.stop().await;
    assert!(
        produced < 1000,
        "stopped within a bounded number of items: {produced}"
    );
}

// ---------------------------------------------------------------------------------------------

static GONE_STOPPED: AtomicBool = AtomicBool::new(false);

struct GoneFlag;

impl Drop for GoneFlag {
    fn drop(&mut self) {
        GONE_STOPPED.store(true, Ordering::SeqCst);
    }
}

#[derive(Default)]
struct Orphaned;

#[farine::service(name = "rpc_orphaned")]
impl Orphaned {
    #[farine::rpc::method]
    fn ticks(&self) -> impl Stream<Item = u32> + Send {
        stream::unfold(GoneFlag, |flag| async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            Some((1, flag))
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_dies_mid_stream_stops_the_server_producing_it() {
    let broker = Broker::connect().await;
    let running = serve(&broker, "rpc_orphaned", "").await;

    // A hand-written caller on a connection of its own, which then dies without a word.
    let caller = lapin::Connection::connect(&broker.uri(), Default::default())
        .await
        .unwrap();
    let channel = caller.create_channel().await.unwrap();
    let (reply_queue, mut replies) = farine_test_support::reply_queue(&channel).await;
    channel
        .basic_publish(
            "rpc_orphaned".into(),
            "rpc_orphaned__ticks".into(),
            BasicPublishOptions::default(),
            br#"{"args": [], "kwargs": {}}"#,
            BasicProperties::default()
                .with_reply_to(reply_queue.clone())
                .with_correlation_id(ShortString::from("c-1")),
        )
        .await
        .unwrap();
    for _ in 0..2 {
        tokio::time::timeout(BOUND, replies.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
    caller.close(200, "the caller dies".into()).await.unwrap();

    assert!(
        wait_until(BOUND, || GONE_STOPPED.load(Ordering::SeqCst)).await,
        "the server noticed the caller's reply queue is gone"
    );
    running.stop().await;
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_written_client_following_the_protocol_doc_gets_the_same_answers() {
    let broker = Broker::connect().await;
    let running = serve(&broker, "rpc_calc_by_hand", "").await;

    let connection = lapin::Connection::connect(&broker.uri(), Default::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let (reply_queue, mut replies) = farine_test_support::reply_queue(&channel).await;
    let call = |method: &str, body: Value, id: &str| {
        let channel = channel.clone();
        let (method, id, reply_to) = (
            format!("rpc_calc_by_hand__{method}"),
            id.to_string(),
            reply_queue.clone(),
        );
        async move {
            channel
                .basic_publish(
                    "rpc_calc_by_hand".into(),
                    method.as_str().into(),
                    BasicPublishOptions::default(),
                    &serde_json::to_vec(&body).unwrap(),
                    BasicProperties::default()
                        .with_reply_to(reply_to)
                        .with_correlation_id(ShortString::from(id))
                        .with_content_type("application/json".into()),
                )
                .await
                .unwrap();
        }
    };
    let mut next = async || {
        let delivery = tokio::time::timeout(BOUND, replies.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let id = delivery
            .properties
            .correlation_id()
            .clone()
            .unwrap()
            .to_string();
        (id, serde_json::from_slice::<Value>(&delivery.data).unwrap())
    };

    call("add", json!({"args": [20, 22], "kwargs": {}}), "a").await;
    assert_eq!(
        next().await,
        ("a".into(), json!({"body": 42, "__end__": false}))
    );
    assert_eq!(next().await, ("a".into(), json!({"__end__": true})));

    call("numbers", json!({"args": [], "kwargs": {"n": 2}}), "b").await;
    assert_eq!(next().await.1, json!({"body": 0, "__end__": false}));
    assert_eq!(next().await.1, json!({"body": 1, "__end__": false}));
    assert_eq!(next().await.1, json!({"__end__": true}));

    call("fail", json!({"args": ["boom"]}), "c").await;
    let (id, reply) = next().await;
    assert_eq!(id, "c");
    assert_eq!(reply["__except__"], "boom");
    assert_eq!(reply["error"]["kind"], "remote");

    call("add", json!({"args": [1]}), "d").await;
    let (_, reply) = next().await;
    assert_eq!(reply["error"]["kind"], "bad_arguments");
    assert_eq!(reply["error"]["param"], "b");

    // A caller that reads one result says so (`type = farine.single`): no end marker follows.
    channel
        .basic_publish(
            "rpc_calc_by_hand".into(),
            "rpc_calc_by_hand__add".into(),
            BasicPublishOptions::default(),
            br#"{"args": [2, 3], "kwargs": {}}"#,
            BasicProperties::default()
                .with_reply_to(reply_queue.clone())
                .with_correlation_id(ShortString::from("e"))
                .with_type(ShortString::from("farine.single")),
        )
        .await
        .unwrap();
    assert_eq!(
        next().await,
        ("e".into(), json!({"body": 5, "__end__": false}))
    );
    call("add", json!({"args": [3, 4]}), "f").await;
    assert_eq!(
        next().await,
        ("f".into(), json!({"body": 7, "__end__": false})),
        "the next reply is the next call's, not an end marker for `e`"
    );
    assert_eq!(next().await, ("f".into(), json!({"__end__": true})));
    connection.close(200, "done".into()).await.unwrap();
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_farine_client_understands_a_hand_written_responder() {
    let broker = Broker::connect().await;
    let service = unique("rpc-raw");
    broker
        .declare_exchange(&service, lapin::ExchangeKind::Direct)
        .await;
    let queue = broker
        .bind_queue(&service, &format!("{service}__echo"))
        .await;
    let channel = broker.connection().create_channel().await.unwrap();
    let channel_for_replies = channel.clone();
    let mut requests = channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    // A responder in the style of baguette-messaging: items, then the end marker; or a bare
    // `__except__` traceback without farine's `error` object; each reply published to the
    // service's exchange with the reply queue's name as the routing key, as its server does
    // (farine's go through the default exchange). It reports each request's argument and
    // `type` property.
    let (seen, mut types) = tokio::sync::mpsc::unbounded_channel();
    let exchange = service.clone();
    let responder = tokio::spawn(async move {
        while let Some(Ok(request)) = requests.next().await {
            let body: Value = serde_json::from_slice(&request.data).unwrap();
            let _ = seen.send((
                body["args"][0].clone(),
                request.properties.kind().as_ref().map(|t| t.to_string()),
            ));
            let reply_to = request.properties.reply_to().clone().unwrap();
            let correlation = request.properties.correlation_id().clone().unwrap();
            let replies: Vec<Value> = match body["args"][0].as_str() {
                Some("raise") => vec![json!({"__except__": "Traceback: ValueError: nope"})],
                Some("many") => vec![
                    json!({"body": "a", "__end__": false}),
                    json!({"body": "b", "__end__": false}),
                    json!({"__end__": true}),
                ],
                _ => vec![
                    json!({"body": body["args"][0], "__end__": false}),
                    json!({"__end__": true}),
                ],
            };
            for reply in replies {
                channel_for_replies
                    .basic_publish(
                        exchange.as_str().into(),
                        reply_to.as_str().into(),
                        BasicPublishOptions::default(),
                        &serde_json::to_vec(&reply).unwrap(),
                        BasicProperties::default().with_correlation_id(correlation.clone()),
                    )
                    .await
                    .unwrap();
            }
        }
    });

    let raw = client(&broker, &service).await;
    assert_eq!(raw.call::<String>("echo", ("hi",)).await.unwrap(), "hi");
    let items: Vec<String> = raw
        .stream::<String>("echo", ("many",))
        .await
        .unwrap()
        .map(Result::unwrap)
        .collect()
        .await;
    assert_eq!(items, vec!["a", "b"]);
    match raw.call::<String>("echo", ("raise",)).await.unwrap_err() {
        RpcError::Remote { kind, message, .. } => {
            assert_eq!(kind, None);
            assert!(message.contains("ValueError: nope"));
        }
        other => panic!("expected a remote error, got {other:?}"),
    }
    // A call for one result says so in its `type`; a stream's request does not.
    let mut seen = Vec::new();
    while let Ok(request) = types.try_recv() {
        seen.push(request);
    }
    assert_eq!(
        seen,
        vec![
            (json!("hi"), Some("farine.single".to_string())),
            (json!("many"), None),
            (json!("raise"), Some("farine.single".to_string())),
        ]
    );
    responder.abort();
}

// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Front;

#[farine::service(name = "rpc_front")]
impl Front {
    #[farine::rpc::method]
    async fn total(&self, values: Vec<i64>) -> Result<i64, RpcError> {
        let mut sum = 0;
        for value in values {
            sum = self.add(sum, value).await?;
        }
        Ok(sum)
    }

    /// Callers leave the client out.
    #[farine::rpc::client("rpc_calc_front")]
    async fn add(&self, calc: Client, a: i64, b: i64) -> Result<i64, RpcError> {
        calc.call("add", (a, b)).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_calls_another_through_the_client_farine_injects() {
    let broker = Broker::connect().await;
    let calc = serve(&broker, "rpc_calc_front", "").await;
    let front = serve(&broker, "rpc_front", "rpc_timeout = 5\n").await;
    let caller = client(&broker, "rpc_front").await;
    assert_eq!(
        caller
            .call::<i64>("total", (vec![1, 2, 3, 4],))
            .await
            .unwrap(),
        10
    );
    front.stop().await;
    calc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_client_outside_a_running_service_says_so() {
    let error = Front.add(1, 2).await.unwrap_err();
    assert!(matches!(error, RpcError::NotRunning { .. }), "{error}");
    assert!(error.to_string().contains("add_with"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_that_goes_away_after_it_was_checked_is_still_reported_as_no_such_method() {
    let broker = Broker::connect().await;
    let service = unique("rpc-route");
    broker
        .declare_exchange(&service, lapin::ExchangeKind::Direct)
        .await;
    let routing_key = format!("{service}__echo");
    let queue = broker.bind_queue(&service, &routing_key).await;
    let channel = broker.connection().create_channel().await.unwrap();
    let replies = channel.clone();
    let mut requests = channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Some(Ok(request)) = requests.next().await {
            let body: Value = serde_json::from_slice(&request.data).unwrap();
            let reply = json!({"body": body["args"][0], "__end__": false});
            let _ = replies
                .basic_publish(
                    "".into(),
                    request
                        .properties
                        .reply_to()
                        .clone()
                        .unwrap()
                        .as_str()
                        .into(),
                    BasicPublishOptions::default(),
                    &serde_json::to_vec(&reply).unwrap(),
                    BasicProperties::default()
                        .with_correlation_id(request.properties.correlation_id().clone().unwrap()),
                )
                .await;
        }
    });
    let timeout = Duration::from_secs(3);
    let client = Client::connect(&broker.uri(), &service, timeout)
        .await
        .unwrap();
    // The first call checks the route (with a confirm); the next ones trust it for a second.
    assert_eq!(client.call::<u32>("echo", (1,)).await.unwrap(), 1);
    assert_eq!(client.call::<u32>("echo", (2,)).await.unwrap(), 2);

    broker
        .channel()
        .queue_unbind(
            queue.as_str().into(),
            service.as_str().into(),
            routing_key.as_str().into(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    // Within the trusted second the request goes without a check: the error is known at the
    // timeout, and still says what it is (on a slow machine the second may be over, and the
    // check tells at once: the same error).
    let error = client.call::<u32>("echo", (3,)).await.unwrap_err();
    assert!(matches!(error, RpcError::NoSuchMethod { .. }), "{error}");
    // Once the second is over, the route is checked again: known from the confirm, before the
    // timeout.
    tokio::time::sleep(farine::__private::amqp::ROUTE_CHECK_INTERVAL).await;
    let started = Instant::now();
    let error = client.call::<u32>("echo", (4,)).await.unwrap_err();
    assert!(matches!(error, RpcError::NoSuchMethod { .. }), "{error}");
    assert!(
        started.elapsed() < timeout,
        "from the confirm, not the timeout"
    );
}
