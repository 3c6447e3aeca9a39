use farine::{Message, PublishError, Publisher, consume, publish};
use serde_json::Value;

#[derive(Default)]
pub struct Shop;

#[farine::service]
impl Shop {
    #[consume(exchange = "orders", routing_key = "order.created", queue = "shop.orders")]
    async fn on_order(&self, order: Value, message: Message) -> Result<(), PublishError> {
        let _ = message.routing_key();
        self.notify(&order).await
    }

    #[farine::consume(exchange = "orders", routing_key = "order.cancelled")]
    async fn on_cancel(&self, _order: Value) {}

    #[consume(exchange = "raw")]
    async fn raw(&self, message: &Message) -> Result<(), std::io::Error> {
        let _ = message.body();
        Ok(())
    }

    #[publish(exchange = "notifications", routing_key = "order")]
    pub async fn notify(&self, publisher: Publisher, order: &Value) -> Result<(), PublishError> {
        publisher.publish(order).await
    }

    fn plain_method(&self) {}
}

fn main() {
    Shop.plain_method();
}
