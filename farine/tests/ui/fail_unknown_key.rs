use farine::consume;

#[derive(Default)]
pub struct Typo;

#[farine::service]
impl Typo {
    #[consume(exchange = "orders", routingkey = "order.created")]
    async fn on_order(&self, _order: serde_json::Value) {}
}

fn main() {}
