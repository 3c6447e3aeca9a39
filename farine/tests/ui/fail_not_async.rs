use farine::consume;

#[derive(Default)]
pub struct Sync;

#[farine::service]
impl Sync {
    #[consume(exchange = "orders", routing_key = "order.created")]
    fn on_order(&self, _order: serde_json::Value) {}
}

fn main() {}
