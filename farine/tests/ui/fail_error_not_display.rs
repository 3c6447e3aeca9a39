use farine::consume;

pub struct Opaque;

#[derive(Default)]
pub struct Fails;

#[farine::service]
impl Fails {
    #[consume(exchange = "orders", routing_key = "order.created")]
    async fn on_order(&self, _order: serde_json::Value) -> Result<(), Opaque> {
        Ok(())
    }
}

fn main() {}
