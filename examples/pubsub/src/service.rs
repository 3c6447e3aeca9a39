//! The pubsub example: `Relay` consumes orders and publishes, for each, `{"seen": <order>}`.

use farine::{PublishError, Publisher, consume, publish};
use serde_json::{Map, Value, json};

/// Relays every JSON object published to `orders` (routing key `order.created`) to `audit`
/// (routing key `order.seen`) as `{"seen": <the object>}`.
#[derive(Default)]
pub struct Relay;

#[farine::service]
impl Relay {
    /// A body that is not a JSON object is rejected (and logged) by farine before this runs.
    #[consume(exchange = "orders", routing_key = "order.created")]
    async fn relay(&self, order: Map<String, Value>) -> Result<(), PublishError> {
        self.seen(&json!({ "seen": order })).await
    }

    /// Callers leave the publisher out: `self.seen(&event)`; farine supplies it.
    #[publish(exchange = "audit", routing_key = "order.seen")]
    async fn seen(&self, publisher: Publisher, event: &Value) -> Result<(), PublishError> {
        publisher.publish(event).await
    }
}
