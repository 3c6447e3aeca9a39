use farine::consume;

#[derive(Default)]
pub struct Nowhere;

#[farine::service]
impl Nowhere {
    #[consume(routing_key = "order.created")]
    async fn on_order(&self, _order: serde_json::Value) {}
}

fn main() {}
