//! What a service shows the people who run it: Prometheus metrics at `GET /metrics` that equal
//! what happened, and W3C trace context carried from a message into everything its handler
//! sends, with the spans exported over OTLP to a receiver this test runs.

mod common;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use common::{BOUND, config};
use farine::layer::{BoxFuture, CallInfo, Layer, Next, Outcome};
use farine::rpc::{Client, RpcError};
use farine::{Message, PublishError, Publisher, Runtime, consume, publish};
use farine_test_support::proxy::Proxy;
use farine_test_support::{Broker, free_port, http_get, unique, wait_until};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Value, json};

/// The samples of a scrape: `name{labels}` → value.
fn scrape_text(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

async fn scrape(port: u16) -> BTreeMap<String, f64> {
    let (status, body) = http_get(port, "/metrics").await.expect("/metrics answers");
    assert_eq!(status, 200, "{body}");
    scrape_text(&body)
}

/// Waits until `sample` has `value` on `/metrics`; the last scrape when it never does.
async fn wait_for_sample(port: u16, sample: &str, value: f64) -> BTreeMap<String, f64> {
    let deadline = std::time::Instant::now() + BOUND;
    loop {
        let samples = scrape(port).await;
        if samples.get(sample) == Some(&value) || std::time::Instant::now() > deadline {
            return samples;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Default)]
struct Counted;

#[farine::service(name = "metrics_probe")]
impl Counted {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn take(&self, body: Value) -> Result<(), String> {
        if body["fail"] == json!(true) {
            return Err(format!("order {} fails", body["n"]));
        }
        self.tell(&body).await.map_err(|e| e.to_string())
    }

    #[publish(exchange = "out", routing_key = "told")]
    async fn tell(&self, publisher: Publisher, body: &Value) -> Result<(), PublishError> {
        publisher.publish(body).await
    }

    #[farine::rpc::method]
    async fn double(&self, n: i64) -> i64 {
        n * 2
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_counters_and_histograms_on_metrics_equal_what_was_handled() {
    let broker = Broker::connect().await;
    let (exchange, queue, out) = (unique("m-x"), unique("m-q"), unique("m-out"));
    let port = free_port();
    let health = format!("127.0.0.1:{port}");
    let config = config(
        &broker,
        "metrics_probe",
        &[
            ("take.exchange", &exchange),
            ("take.queue", &queue),
            ("tell.exchange", &out),
            ("max_attempts", "2"),
            ("retry_delay", "20ms"),
            ("health_addr", &health),
        ],
    );
    let running = Runtime::new(config)
        .services(["metrics_probe"])
        .start()
        .await
        .expect("starts");
    let relayed = broker.bind_queue(&out, "told").await;

    // 100 messages, every tenth failing: 90 handled, 10 retried once then dead-lettered.
    let orders: Vec<Value> = (0..100)
        .map(|n| json!({"n": n, "fail": n % 10 == 0}))
        .collect();
    broker.publish_json_batch(&exchange, "rk", &orders).await;
    let dead = broker
        .wait_for_messages(&format!("{queue}.dead"), 10, BOUND)
        .await;
    assert_eq!(dead.len(), 10);
    assert_eq!(
        broker.wait_for_messages(&relayed, 90, BOUND).await.len(),
        90
    );

    let client = Client::connect(&broker.uri(), "metrics_probe", BOUND)
        .await
        .expect("client connects");
    for n in 0..50 {
        assert_eq!(client.call::<i64>("double", (n,)).await.unwrap(), n * 2);
    }

    let labels = |outcome: &str| {
        format!(
            "farine_messages_total{{service=\"metrics_probe\",handler=\"take\",outcome=\"{outcome}\"}}"
        )
    };
    let samples = wait_for_sample(
        port,
        "farine_rpc_requests_total{service=\"metrics_probe\",method=\"double\",outcome=\"ok\"}",
        50.0,
    )
    .await;
    let value = |name: &str| samples.get(name).copied();
    assert_eq!(value(&labels("ok")), Some(90.0), "{samples:#?}");
    assert_eq!(value(&labels("retry")), Some(10.0));
    assert_eq!(value(&labels("dead")), Some(10.0));
    assert_eq!(value(&labels("rejected")), Some(0.0));
    assert_eq!(value(&labels("duplicate")), Some(0.0));
    // One handler call per delivery: 100, and the 10 retries.
    assert_eq!(
        value("farine_handler_duration_seconds_count{service=\"metrics_probe\",handler=\"take\"}"),
        Some(110.0)
    );
    assert_eq!(
        value(
            "farine_handler_duration_seconds_bucket{service=\"metrics_probe\",handler=\"take\",le=\"+Inf\"}"
        ),
        Some(110.0)
    );
    assert_eq!(
        value(
            "farine_handler_duration_seconds_count{service=\"metrics_probe\",handler=\"double\"}"
        ),
        Some(50.0)
    );
    assert_eq!(
        value(
            "farine_rpc_requests_total{service=\"metrics_probe\",method=\"double\",outcome=\"error\"}"
        ),
        Some(0.0)
    );
    assert_eq!(
        value(&format!(
            "farine_published_total{{exchange=\"{out}\",outcome=\"ok\"}}"
        )),
        Some(90.0)
    );
    assert_eq!(value("farine_amqp_connected"), Some(1.0));
    assert_eq!(value("farine_amqp_reconnects_total"), Some(0.0));
    assert!(value("process_resident_memory_bytes").is_some_and(|b| b > 0.0));
    assert!(value("process_cpu_seconds_total").is_some());

    // The exposition is Prometheus's text format 0.0.4: `# TYPE` for each family, counters
    // named with `_total`.
    let (_, text) = http_get(port, "/metrics").await.unwrap();
    assert!(
        text.contains("# TYPE farine_messages_total counter"),
        "{text}"
    );
    assert!(text.contains("# TYPE farine_handler_duration_seconds histogram"));
    assert!(
        !text.contains("# EOF"),
        "OpenMetrics' end marker is not 0.0.4"
    );
    running.stop().await;
}

#[derive(Default)]
struct Reconnecting;

#[farine::service(name = "metrics_reconnect_probe")]
impl Reconnecting {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn take(&self, _body: Value) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnection_shows_as_disconnected_then_connected_and_is_counted() {
    let broker = Broker::connect().await;
    let proxy = Proxy::to_broker().await;
    let port = free_port();
    let health = format!("127.0.0.1:{port}");
    let text = format!(
        "[metrics_reconnect_probe]\namqp_uri = {}\ntake.exchange = {}\ntake.queue = {}\namqp_heartbeat = 1\nconnect_timeout = 1\nhealth_addr = {health}\n",
        broker.uri_via(proxy.addr()),
        unique("mr-x"),
        unique("mr-q"),
    );
    let config = farine::config::Config::from_ini(&text, "test.ini").expect("parses");
    let running = Runtime::new(config)
        .services(["metrics_reconnect_probe"])
        .start()
        .await
        .expect("starts");
    let samples = scrape(port).await;
    assert_eq!(samples.get("farine_amqp_connected"), Some(&1.0));
    assert_eq!(samples.get("farine_amqp_reconnects_total"), Some(&0.0));

    // No bytes pass: the missed heartbeats tell farine the connection is dead, and it cannot
    // connect again until the proxy passes bytes.
    proxy.stall();
    let samples = wait_for_sample(port, "farine_amqp_connected", 0.0).await;
    assert_eq!(
        samples.get("farine_amqp_connected"),
        Some(&0.0),
        "{samples:#?}"
    );
    proxy.resume();
    let samples = wait_for_sample(port, "farine_amqp_reconnects_total", 1.0).await;
    assert_eq!(samples.get("farine_amqp_reconnects_total"), Some(&1.0));
    assert!(wait_until(BOUND, || running.is_ready()).await);
    let samples = scrape(port).await;
    assert_eq!(samples.get("farine_amqp_connected"), Some(&1.0));
    running.stop().await;
    proxy.stop().await;
}

/// The `traceparent` of each RPC request the server took.
static RPC_TRACEPARENTS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Records the `traceparent` header of RPC requests.
struct RequestHeaders;

impl Layer for RequestHeaders {
    fn call<'a>(
        &'a self,
        call: &'a CallInfo<'a>,
        next: Next<'a, Outcome>,
    ) -> BoxFuture<'a, Outcome> {
        if call.handler == "echo"
            && let Some(message) = call.payload::<Message>()
            && let Some(AMQPValue::LongString(text)) = message.header("traceparent")
        {
            RPC_TRACEPARENTS.lock().unwrap().push(text.to_string());
        }
        next.run()
    }
}

#[derive(Default)]
struct Traced;

#[farine::service(name = "trace_probe")]
impl Traced {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn take(&self, body: Value) -> Result<(), String> {
        self.tell(&body).await.map_err(|e| e.to_string())?;
        self.ask("hello".to_string())
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }

    #[publish(exchange = "out", routing_key = "told")]
    async fn tell(&self, publisher: Publisher, body: &Value) -> Result<(), PublishError> {
        publisher.publish(body).await
    }

    #[farine::rpc::client("trace_probe")]
    async fn ask(&self, client: Client, text: String) -> Result<String, RpcError> {
        client.call("echo", (text,)).await
    }

    #[farine::rpc::method]
    async fn echo(&self, text: String) -> String {
        text
    }
}

/// `(trace id, span id)` of a `traceparent`.
fn ids(traceparent: &str) -> (String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    assert_eq!(parts[0], "00");
    (parts[1].to_string(), parts[2].to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_s_trace_goes_on_into_what_its_handler_publishes_and_calls() {
    let broker = Broker::connect().await;
    let (exchange, queue, out) = (unique("t-x"), unique("t-q"), unique("t-out"));
    let receiver = otlp::Receiver::start().await;
    let port = free_port();
    let config = config(
        &broker,
        "trace_probe",
        &[
            ("take.exchange", &exchange),
            ("take.queue", &queue),
            ("tell.exchange", &out),
            ("health_addr", &format!("127.0.0.1:{port}")),
            ("otlp_endpoint", &receiver.url()),
        ],
    );
    let running = Runtime::new(config)
        .layer(RequestHeaders)
        .services(["trace_probe"])
        .start()
        .await
        .expect("starts");
    let relayed = broker.bind_queue(&out, "told").await;

    let (trace, parent) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(format!("00-{trace}-{parent}-01").into()),
    );
    headers.insert(
        "tracestate".into(),
        AMQPValue::LongString("vendor=abc".into()),
    );
    broker
        .publish_with(
            &exchange,
            "rk",
            br#"{"n": 1}"#,
            BasicProperties::default().with_headers(headers),
        )
        .await;
    // A message without a trace starts one.
    broker.publish_json(&exchange, "rk", &json!({"n": 2})).await;

    let onward = broker.wait_for_messages(&relayed, 2, BOUND).await;
    assert_eq!(onward.len(), 2);
    let traceparent = |received: &farine_test_support::Received| match received
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("traceparent").cloned())
    {
        Some(AMQPValue::LongString(text)) => text.to_string(),
        other => panic!("no traceparent on the onward message: {other:?}"),
    };
    let first = onward.iter().find(|m| m.json()["n"] == 1).unwrap();
    let second = onward.iter().find(|m| m.json()["n"] == 2).unwrap();
    let (onward_trace, consume_span) = ids(&traceparent(first));
    assert_eq!(
        onward_trace, trace,
        "the onward message continues the trace"
    );
    assert_ne!(consume_span, parent, "with the handler's own span id");
    match first
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("tracestate").cloned())
    {
        Some(AMQPValue::LongString(text)) => assert_eq!(text.to_string(), "vendor=abc"),
        other => panic!("tracestate not carried on: {other:?}"),
    }
    let (new_trace, _) = ids(&traceparent(second));
    assert_ne!(new_trace, trace);

    // The RPC request of the first call carries the same trace and the handler's span.
    assert!(wait_until(BOUND, || RPC_TRACEPARENTS.lock().unwrap().len() == 2).await);
    let requests = RPC_TRACEPARENTS.lock().unwrap().clone();
    assert!(
        requests.contains(&format!("00-{trace}-{consume_span}-01")),
        "{requests:?}"
    );

    // The receiver gets the spans, each linked to its parent: the message's sender, then the
    // consume span for the RPC method.
    let spans = receiver.wait_for_spans(&onward_trace, 2, BOUND).await;
    let consume = spans
        .iter()
        .find(|s| s["name"] == "consume trace_probe.take")
        .unwrap_or_else(|| panic!("{spans:#?}"));
    assert_eq!(consume["spanId"], consume_span.as_str());
    assert_eq!(consume["parentSpanId"], parent);
    assert_eq!(consume["kind"], 5);
    assert_eq!(consume["traceState"], "vendor=abc");
    let served = spans
        .iter()
        .find(|s| s["name"] == "rpc trace_probe.echo")
        .unwrap_or_else(|| panic!("{spans:#?}"));
    assert_eq!(served["parentSpanId"], consume_span.as_str());
    assert_eq!(served["kind"], 2);
    assert_ne!(served["spanId"], consume["spanId"]);
    assert_eq!(served["status"]["code"], 1);

    // The RPC client's side is counted too.
    let samples = scrape(port).await;
    assert_eq!(
        samples.get(
            "farine_rpc_client_duration_seconds_count{service=\"trace_probe\",method=\"echo\"}"
        ),
        Some(&2.0),
        "{samples:#?}"
    );
    running.stop().await;
}

/// An OTLP/HTTP receiver: takes `POST /v1/traces` with JSON bodies and keeps every span.
mod otlp {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use serde_json::Value;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    pub struct Receiver {
        port: u16,
        spans: Arc<Mutex<Vec<Value>>>,
    }

    impl Receiver {
        pub async fn start() -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let spans: Arc<Mutex<Vec<Value>>> = Arc::default();
            let kept = spans.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let kept = kept.clone();
                    tokio::spawn(async move {
                        let mut stream = BufReader::new(stream);
                        loop {
                            let mut length = 0;
                            let mut line = String::new();
                            let mut request_line = String::new();
                            if stream.read_line(&mut request_line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            loop {
                                line.clear();
                                stream.read_line(&mut line).await.unwrap();
                                if line == "\r\n" {
                                    break;
                                }
                                if let Some((name, value)) = line.split_once(':')
                                    && name.eq_ignore_ascii_case("content-length")
                                {
                                    length = value.trim().parse().unwrap();
                                }
                            }
                            let mut body = vec![0; length];
                            stream.read_exact(&mut body).await.unwrap();
                            assert!(
                                request_line.starts_with("POST /v1/traces "),
                                "{request_line}"
                            );
                            let request: Value = serde_json::from_slice(&body).unwrap();
                            for resource in request["resourceSpans"].as_array().unwrap() {
                                for scope in resource["scopeSpans"].as_array().unwrap() {
                                    for span in scope["spans"].as_array().unwrap() {
                                        let mut span = span.clone();
                                        span["service.name"] = resource["resource"]["attributes"]
                                            [0]["value"]["stringValue"]
                                            .clone();
                                        kept.lock().unwrap().push(span);
                                    }
                                }
                            }
                            let answer = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
                            stream.get_mut().write_all(answer.as_bytes()).await.unwrap();
                        }
                    });
                }
            });
            Self { port, spans }
        }

        pub fn url(&self) -> String {
            format!("http://127.0.0.1:{}", self.port)
        }

        /// The spans of `trace` once there are at least `count` of them.
        pub async fn wait_for_spans(
            &self,
            trace: &str,
            count: usize,
            bound: Duration,
        ) -> Vec<Value> {
            let deadline = std::time::Instant::now() + bound;
            loop {
                let spans: Vec<Value> = self
                    .spans
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|span| span["traceId"] == trace)
                    .cloned()
                    .collect();
                if spans.len() >= count || std::time::Instant::now() > deadline {
                    return spans;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
