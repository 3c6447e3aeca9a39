//! A parameter type that is neither a body (serde::Deserialize) nor an extractor
//! (farine::FromCall) is an error at that parameter.

pub struct Tenant(pub String);

#[derive(Default)]
pub struct Orders;

#[farine::service]
impl Orders {
    #[farine::consume(exchange = "orders")]
    async fn on_order(&self, _order: serde_json::Value, _tenant: Tenant) {}
}

fn main() {}
