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

/// The ticker on farine's in-memory broker, on tokio's paused clock: its one-second interval
/// passes at once.
#[cfg(test)]
mod tests {
    use farine::testing::TestBroker;
    use serde_json::{Value, json};

    #[tokio::test(start_paused = true)]
    async fn ticks_once_a_second_counting_up() {
        let kit = TestBroker::new();
        let running = kit.start("[ticker]\n").start().await.expect("ticker starts");
        let started = tokio::time::Instant::now();
        for n in 1..=3 {
            let tick = kit.next_published("ticks", "tick").await;
            assert_eq!(tick.json::<Value>(), json!({ "tick": n }));
        }
        let elapsed = started.elapsed();
        assert!(
            elapsed >= std::time::Duration::from_secs(2) && elapsed < std::time::Duration::from_secs(3),
            "three ticks take two intervals: {elapsed:?}"
        );
        running.stop().await;
    }
}
