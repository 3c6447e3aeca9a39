//! Parameters are taken from the call whatever their names: a body type named `Message`, a
//! body by reference, the message handle, the headers, the database, the shutdown signal, an
//! extractor of the user's own, and SSE and #[execute] parameters.

use farine::stream::{Event, EventId, EventType};
use farine::{Db, FromCall, Headers, Rejection, Shutdown};

/// The user's own body type, named like farine's handle.
#[derive(serde::Deserialize)]
pub struct Message {
    pub id: u64,
}

pub struct Tenant(pub String);

impl FromCall<farine::Message> for Tenant {
    fn from_call(message: &farine::Message) -> Result<Self, Rejection> {
        match message.header("x-tenant") {
            Some(farine::amqp::AMQPValue::LongString(tenant)) => Ok(Tenant(tenant.to_string())),
            _ => Err(Rejection::new("no x-tenant header")),
        }
    }
}

#[derive(Default)]
pub struct Shop;

#[farine::service]
impl Shop {
    #[farine::consume(exchange = "orders")]
    async fn on_order(&self, order: Message, tenant: Tenant, headers: Headers, db: Db) {
        let _ = (order.id, tenant.0, headers.text("x-tenant"), db.pool().is_ok());
    }

    #[farine::consume(exchange = "orders")]
    async fn by_ref(&self, order: &Message, message: &farine::Message, shutdown: Shutdown) {
        let _ = (order.id, message.body(), shutdown.is_cancelled());
    }

    #[farine::consume(exchange = "ticks")]
    async fn nothing(&self) {}

    #[farine::stream::http]
    async fn on_event(&self, data: String, id: EventId, kind: EventType, event: &Event) {
        let _ = (data, id.0, kind.0, event.data());
    }

    #[farine::execute]
    async fn work(&self, shutdown: Shutdown, db: Db) {
        let _ = (shutdown.is_cancelled(), db.pool().is_ok());
    }
}

fn main() {}
