//! The sse example: each event of the configured Server-Sent-Events endpoint goes to RabbitMQ.

use farine::stream::Event;
use farine::{PublishError, Publisher, publish};
use serde_json::{Value, json};

/// Publishes each event as `{"id": "<event id>", "data": <event data>}` to exchange `sse`
/// (routing key `event`). Data that is JSON is sent as JSON, other data as a string.
#[derive(Default)]
pub struct Listener;

#[farine::service]
impl Listener {
    #[farine::stream::http]
    async fn on_event(&self, data: String, event: Event) -> Result<(), PublishError> {
        let data = serde_json::from_str(&data).unwrap_or(Value::String(data));
        self.forward(&json!({ "id": event.id(), "data": data })).await
    }

    #[publish(exchange = "sse", routing_key = "event")]
    async fn forward(&self, publisher: Publisher, event: &Value) -> Result<(), PublishError> {
        publisher.publish(event).await
    }
}

/// The listener fed by an in-memory event stream instead of an HTTP server, on farine's
/// in-memory broker.
#[cfg(test)]
mod tests {
    use farine::testing::TestBroker;
    use serde_json::{Value, json};

    #[tokio::test]
    async fn each_event_is_forwarded_with_its_id_and_a_reconnect_resumes_after_the_last() {
        let kit = TestBroker::new();
        let feed = kit.feed("events");
        feed.send(Some("1"), "", r#"{"n": 1}"#);
        let running = kit
            .start("[listener]\nstart_from = beginning\n")
            .set("listener", "endpoint", feed.endpoint())
            .start()
            .await
            .expect("listener starts");
        let first = kit.next_published("sse", "event").await;
        assert_eq!(first.json::<Value>(), json!({ "id": "1", "data": { "n": 1 } }));
        feed.send(Some("2"), "", "plain text");
        let second = kit.next_published("sse", "event").await;
        assert_eq!(second.json::<Value>(), json!({ "id": "2", "data": "plain text" }));
        // The server drops the connection; what it sends next reaches the listener once.
        feed.disconnect();
        feed.send(Some("3"), "", "after the cut");
        let third = kit.next_published("sse", "event").await;
        assert_eq!(third.json::<Value>(), json!({ "id": "3", "data": "after the cut" }));
        assert_eq!(
            kit.journal().iter().filter(|p| p.exchange == "sse").count(),
            3,
            "nothing twice"
        );
        running.stop().await;
    }
}
