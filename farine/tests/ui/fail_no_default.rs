use farine::consume;

pub struct NeedsArgs {
    _port: u16,
}

#[farine::service]
impl NeedsArgs {
    #[consume(exchange = "orders", routing_key = "order.created")]
    async fn on_order(&self, _order: serde_json::Value) {}
}

fn main() {}
