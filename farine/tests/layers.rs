//! Middleware: every handler call of every kind, and every send, goes through the runtime's
//! layers, in the order they were added; a layer can refuse a call.

mod common;

use std::sync::Mutex;
use std::time::Duration;

use common::{BOUND, config};
use farine::layer::{BoxFuture, CallInfo, HandlerKind, Layer, Next, Outcome, SendInfo};
use farine::rpc::{Client, RpcError};
use farine::{Message, PublishError, Publisher, Runtime, Shutdown, consume, execute, publish};
use farine_test_support::sse::SseServer;
use farine_test_support::{Broker, unique, wait_until};
use serde_json::{Value, json};

/// What a layer saw: `(layer, "call" or "send", handler, kind, detail)`.
type Seen = (
    &'static str,
    &'static str,
    &'static str,
    HandlerKind,
    String,
);

static SEEN: Mutex<Vec<Seen>> = Mutex::new(Vec::new());

/// Records each call and send, and refuses consumed messages whose routing key is `forbidden`.
struct Recorder(&'static str);

impl Layer for Recorder {
    fn call<'a>(
        &'a self,
        call: &'a CallInfo<'a>,
        next: Next<'a, Outcome>,
    ) -> BoxFuture<'a, Outcome> {
        let detail = call
            .payload::<Message>()
            .map(|message| message.routing_key().to_string())
            .or_else(|| {
                call.payload::<farine::stream::Event>()
                    .map(|e| e.data().to_string())
            })
            .unwrap_or_default();
        Box::pin(async move {
            let refuse = detail == "forbidden" || detail.ends_with("__secret");
            SEEN.lock()
                .unwrap()
                .push((self.0, "call", call.handler, call.kind, detail));
            if refuse {
                return Outcome::Rejected("the recorder refuses it".into());
            }
            next.run().await
        })
    }

    fn send<'a>(&'a self, send: &'a SendInfo, next: Next<'a, ()>) -> BoxFuture<'a, ()> {
        SEEN.lock()
            .unwrap()
            .push((self.0, "send", send.method, send.kind, String::new()));
        next.run()
    }
}

static HANDLED: Mutex<Vec<String>> = Mutex::new(Vec::new());

#[derive(Default)]
struct Layered;

#[farine::service(name = "layers_probe")]
impl Layered {
    #[consume(exchange = "x", routing_key = "#")]
    async fn take(&self, body: Value, message: &Message) -> Result<(), String> {
        self.tell(&body).await.map_err(|e| e.to_string())?;
        let answer = self.ask(message.routing_key().to_string()).await;
        HANDLED
            .lock()
            .unwrap()
            .push(answer.map_err(|e| e.to_string())?);
        Ok(())
    }

    #[publish(exchange = "out", routing_key = "told")]
    async fn tell(&self, publisher: Publisher, body: &Value) -> Result<(), PublishError> {
        publisher.publish(body).await
    }

    #[farine::rpc::method]
    async fn echo(&self, text: String) -> String {
        text
    }

    /// Refused by the recorder: never runs.
    #[farine::rpc::method]
    async fn secret(&self) -> String {
        HANDLED.lock().unwrap().push("secret".into());
        "the secret".into()
    }

    #[farine::rpc::client("layers_probe")]
    async fn ask(&self, client: Client, text: String) -> Result<String, RpcError> {
        client.call("echo", (text,)).await
    }

    #[farine::stream::http]
    async fn on_event(&self, data: String) {
        HANDLED.lock().unwrap().push(data);
    }

    #[execute]
    async fn work(&self, shutdown: Shutdown) {
        HANDLED.lock().unwrap().push("work".into());
        shutdown.cancelled().await;
    }
}

fn seen(filter: impl Fn(&Seen) -> bool) -> Vec<String> {
    SEEN.lock()
        .unwrap()
        .iter()
        .filter(|entry| filter(entry))
        .map(|(layer, what, handler, kind, detail)| {
            format!("{layer} {what} {handler} {} {detail}", kind.as_str())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_and_send_goes_through_the_layers_in_order_and_a_layer_can_refuse_one() {
    let broker = Broker::connect().await;
    let server = SseServer::start(1, &[]).await;
    let (exchange, queue, out) = (unique("layers-x"), unique("layers-q"), unique("layers-out"));
    let config = config(
        &broker,
        "layers_probe",
        &[
            ("take.exchange", &exchange),
            ("take.queue", &queue),
            ("exchange_type", "topic"),
            ("tell.exchange", &out),
            ("endpoint", &server.url()),
            ("start_from", "beginning"),
            ("drain_timeout", "1"),
        ],
    );
    let running = Runtime::new(config)
        .layer(Recorder("outer"))
        .layer(Recorder("inner"))
        .services(["layers_probe"])
        .start()
        .await
        .expect("starts");
    broker
        .publish_json(&exchange, "allowed", &json!({"n": 1}))
        .await;
    broker
        .publish_json(&exchange, "forbidden", &json!({"n": 2}))
        .await;
    let dead = broker
        .wait_for_messages(&format!("{queue}.dead"), 1, BOUND)
        .await;
    assert!(
        wait_until(BOUND, || HANDLED.lock().unwrap().len() == 3).await,
        "{:?} {:?}",
        HANDLED.lock().unwrap(),
        SEEN.lock().unwrap()
    );
    // An RPC call a layer refuses is answered at once with an error reply carrying the reason,
    // long before the client's timeout.
    let client = Client::connect(&broker.uri(), "layers_probe", Duration::from_secs(60))
        .await
        .expect("client connects");
    let started = std::time::Instant::now();
    let refused = client.call::<String>("secret", ()).await.unwrap_err();
    assert!(
        matches!(&refused, RpcError::Remote { message, .. } if message.contains("the recorder refuses it")),
        "{refused}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    running.stop().await;

    // The refused message never reached the handler: it went to the dead letters, at once.
    let mut handled = HANDLED.lock().unwrap().clone();
    handled.sort();
    assert_eq!(handled, vec!["allowed", "work", "{\"n\": 1}"]);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].json(), json!({"n": 2}));

    // Each kind of call, through both layers, the first added outside.
    for (handler, kind, detail) in [
        ("take", "consume", "allowed"),
        ("on_event", "stream::http", "{\"n\": 1}"),
        ("work", "execute", ""),
        ("echo", "rpc", "layers_probe__echo"),
    ] {
        let calls = seen(|(_, what, h, _, d)| *what == "call" && *h == handler && d == detail);
        assert_eq!(
            calls,
            vec![
                format!("outer call {handler} {kind} {detail}"),
                format!("inner call {handler} {kind} {detail}"),
            ],
            "{:?}",
            SEEN.lock().unwrap()
        );
    }
    // The refusal by the outer layer: the inner one never saw the call.
    assert_eq!(
        seen(|(_, _, _, _, d)| d == "forbidden"),
        vec!["outer call take consume forbidden"]
    );
    // Sends: the #[publish] method and the #[rpc::client] method.
    for (method, kind) in [("tell", "publish"), ("ask", "rpc client")] {
        assert_eq!(
            seen(|(_, what, m, _, _)| *what == "send" && *m == method),
            vec![
                format!("outer send {method} {kind} "),
                format!("inner send {method} {kind} "),
            ]
        );
    }
}
