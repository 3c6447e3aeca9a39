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
