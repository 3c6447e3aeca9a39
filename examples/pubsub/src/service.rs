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

/// The service tested as a user tests theirs: in-process, on farine's in-memory broker (no
/// RabbitMQ, no network).
#[cfg(test)]
mod tests {
    use farine::testing::TestBroker;
    use serde_json::{Value, json};

    #[tokio::test]
    async fn each_order_is_relayed_to_audit() {
        let kit = TestBroker::new();
        let running = kit.start("[relay]\n").start().await.expect("relay starts");
        for id in 1..=3 {
            kit.publish("orders", "order.created", &json!({ "id": id }))
                .await
                .expect("the relay's queue takes the order");
        }
        for id in 1..=3 {
            let seen = kit.next_published("audit", "order.seen").await;
            assert_eq!(seen.json::<Value>(), json!({ "seen": { "id": id } }));
        }
        running.stop().await;
    }

    #[tokio::test]
    async fn an_order_that_is_not_an_object_is_dead_lettered_with_why() {
        let kit = TestBroker::new();
        let running = kit.start("[relay]\n").start().await.expect("relay starts");
        kit.publish("orders", "order.created", &json!([1, 2]))
            .await
            .expect("the relay's queue takes it");
        kit.wait_settled("relay.relay", farine::testing::WAIT).await;
        let dead = kit.dead_letters("relay.relay.dead");
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert_eq!(dead[0].reason.as_deref(), Some("undecodable"));
        assert_eq!(dead[0].body, b"[1,2]");
        assert!(kit.journal().iter().all(|p| p.exchange != "audit"));
        running.stop().await;
    }
}
