use farine::consume;

#[derive(Default)]
pub struct Returns;

#[farine::service]
impl Returns {
    #[consume(exchange = "orders", routing_key = "order.created")]
    async fn on_order(&self, _order: serde_json::Value) -> bool {
        true
    }
}

fn main() {}
