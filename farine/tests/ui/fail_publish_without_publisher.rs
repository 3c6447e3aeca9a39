use farine::publish;

#[derive(Default)]
pub struct Sends;

#[farine::service]
impl Sends {
    #[publish(exchange = "audit", routing_key = "seen")]
    async fn seen(&self, event: &serde_json::Value) {
        let _ = event;
    }
}

fn main() {}
