//! Each handler kind gives its own parameters: an SSE event is not a parameter of a consumer,
//! a message not one of an SSE listener, and an #[execute] method has no body.

#[derive(Default)]
pub struct Mixed;

#[farine::service]
impl Mixed {
    #[farine::consume(exchange = "orders")]
    async fn on_order(&self, _event: farine::stream::Event) {}

    #[farine::stream::http]
    async fn on_event(&self, _message: farine::Message) {}

    #[farine::execute]
    async fn work(&self, _count: u32) {}
}

fn main() {}
