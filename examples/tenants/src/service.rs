//! The tenants example: orders of several tenants, each tagged with an `x-tenant` header.
//!
//! - `Tenant` is a parameter of the example's own: farine takes it from each message through
//!   `FromCall`, as it takes the body. A message without the header is refused: it goes to the
//!   dead-letter queue at once, with the reason, and the handler never sees it.
//! - `Timing` is a layer (`farine::main!(layers = [service::Timing])`): every handler call and
//!   every send goes through it, and it logs how long each took.

use std::time::Instant;

use farine::amqp::AMQPValue;
use farine::layer::{BoxFuture, CallInfo, Layer, Next, Outcome, SendInfo};
use farine::{FromCall, Message, PublishError, Publisher, Rejection, consume, publish};
use serde_json::{Value, json};

/// An order, as the shop publishes it.
#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
pub struct Order {
    pub id: u64,
}

/// The tenant a message is for, from its `x-tenant` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant(pub String);

impl FromCall<Message> for Tenant {
    fn from_call(message: &Message) -> Result<Self, Rejection> {
        match message.header("x-tenant") {
            Some(AMQPValue::LongString(tenant)) if !tenant.as_bytes().is_empty() => {
                Ok(Tenant(tenant.to_string()))
            }
            _ => Err(Rejection::new("the message has no x-tenant header")),
        }
    }
}

/// Acknowledges every order to `tenant-audit` as `{"tenant": ..., "order": <id>}`.
#[derive(Default)]
pub struct Tenants;

#[farine::service]
impl Tenants {
    #[consume(exchange = "tenant-orders", routing_key = "order.created")]
    async fn on_order(&self, order: Order, tenant: Tenant) -> Result<(), PublishError> {
        self.seen(&json!({ "tenant": tenant.0, "order": order.id }))
            .await
    }

    #[publish(exchange = "tenant-audit", routing_key = "order.seen")]
    async fn seen(&self, publisher: Publisher, event: &Value) -> Result<(), PublishError> {
        publisher.publish(event).await
    }
}

/// Logs how long each handler call and each send took.
pub struct Timing;

impl Layer for Timing {
    fn call<'a>(&'a self, call: &'a CallInfo<'a>, next: Next<'a, Outcome>) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            let started = Instant::now();
            let outcome = next.run().await;
            let ok = matches!(outcome, Outcome::Done);
            tracing::info!(service = call.service, handler = call.handler, ok, took = ?started.elapsed(), "call timed");
            outcome
        })
    }

    fn send<'a>(&'a self, send: &'a SendInfo, next: Next<'a, ()>) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let started = Instant::now();
            next.run().await;
            tracing::info!(service = send.service, method = send.method, took = ?started.elapsed(), "send timed");
        })
    }
}
