//! A standalone program that uses farine: it publishes `{"id": <n>}` to exchange `orders`
//! (routing key `order.created`) with [`Publisher::connect`], and prints what the `pubsub`
//! service relays to `audit` in return, received by a small service it runs in-process. Start
//! the service first (`farine --start=pubsub --config etc/farine.ini`), then
//! `cargo run -p pubsub --example send_order [n]`. The broker is `$AMQP_URI`, else the local
//! one; it lists the connections as `send_order: ... (farine, pid ...)`.

use std::sync::OnceLock;
use std::time::Duration;

use farine::config::Config;
use farine::{Message, Publisher, Runtime, consume};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// Where the watcher hands what it receives to `main`.
static SEEN: OnceLock<mpsc::UnboundedSender<String>> = OnceLock::new();

/// Receives what `pubsub` relays to `audit`, on a queue of its own that goes away with it.
#[derive(Default)]
struct Watch;

#[farine::service(name = "send_order_watch")]
impl Watch {
    #[consume(exchange = "audit", routing_key = "order.seen")]
    async fn seen(&self, event: Value, message: &Message) {
        let kind = message.content_type().unwrap_or("no content type");
        let line = format!(
            "received from audit ({}, {kind}): {event}",
            message.routing_key()
        );
        if let Some(seen) = SEEN.get() {
            let _ = seen.send(line);
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // farine's log on stderr, warnings and errors only (`farine::log::init()` follows RUST_LOG).
    farine::log::init_with(Some("warn"), farine::log::LogFormat::Text)?;
    let uri =
        std::env::var("AMQP_URI").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into());
    let id: u64 = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);

    // The watcher first, so that its queue is bound before the service relays anything: not
    // durable, deleted when it disconnects, no retry or dead-letter queue.
    let (tx, mut seen) = mpsc::unbounded_channel();
    SEEN.set(tx).expect("set once");
    let config = Config::from_ini(
        &format!(
            "[DEFAULT]\namqp_uri = {uri}\n\n[send_order_watch]\nqueue_durable = false\n\
             queue_auto_delete = true\nretry_queue = none\ndead_letter_queue = none\n"
        ),
        "send_order",
    )?;
    let watching = Runtime::new(config).start().await?;

    let orders = Publisher::connect(&uri, "orders", "order.created").await?;
    let order = json!({ "id": id });
    // Returns once the broker has confirmed the message.
    orders.publish(&order).await?;
    println!("sent to orders (order.created): {order}");
    orders.close().await;

    let relayed = tokio::time::timeout(Duration::from_secs(10), seen.recv()).await;
    watching.stop().await;
    match relayed {
        Ok(Some(line)) => println!("{line}"),
        _ => {
            return Err(
                "nothing arrived on audit within 10 s: is `farine --start=pubsub` running?".into(),
            );
        }
    }
    Ok(())
}
