//! The ticker example: an `#[execute]` method that farine runs again every `interval`.

use std::sync::atomic::{AtomicU64, Ordering};

use farine::{PublishError, Publisher, execute, publish};
use serde_json::{Value, json};

/// Publishes `{"tick": n}` to exchange `ticks` (routing key `tick`), n counting up from 1, once
/// per run, a second apart: the attribute carries the interval the example relies on, and
/// `[ticker] interval` (or `tick.interval`) in the config overrides it.
#[derive(Default)]
pub struct Ticker {
    ticks: AtomicU64,
}

#[farine::service]
impl Ticker {
    #[execute(interval = "1s")]
    async fn tick(&self) -> Result<(), PublishError> {
        let n = self.ticks.fetch_add(1, Ordering::Relaxed) + 1;
        self.send(&json!({ "tick": n })).await
    }

    #[publish(exchange = "ticks", routing_key = "tick")]
    async fn send(&self, publisher: Publisher, tick: &Value) -> Result<(), PublishError> {
        publisher.publish(tick).await
    }
}
