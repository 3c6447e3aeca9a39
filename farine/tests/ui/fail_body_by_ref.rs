use farine::consume;

#[derive(Default)]
pub struct Borrows;

#[farine::service]
impl Borrows {
    #[consume(exchange = "orders", routing_key = "order.created")]
    async fn on_order(&self, _order: &serde_json::Value) {}
}

fn main() {}
