use farine::consume;

pub struct NotJson;

#[derive(Default)]
pub struct Decodes;

#[farine::service]
impl Decodes {
    #[consume(exchange = "orders", routing_key = "order.created")]
    async fn on_order(&self, _order: NotJson) {}
}

fn main() {}
