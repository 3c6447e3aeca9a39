use farine::consume;

pub struct Loose;

impl Loose {
    #[consume(exchange = "orders", routing_key = "order.created")]
    async fn on_order(&self, _order: serde_json::Value) {}
}

fn main() {}
