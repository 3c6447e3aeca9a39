#[derive(Default)]
pub struct Orders;

#[farine::service]
impl Orders {
    #[farine::consume(exchange = "orders")]
    async fn on_order(&self, _message: &mut farine::Message) {}
}

fn main() {}
