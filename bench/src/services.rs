//! The farine side of each workload: ordinary services, as a user would write them.

use std::sync::atomic::{AtomicUsize, Ordering};

use farine::rpc::{Client, RpcError};
use farine::{PublishError, Publisher, Shutdown, consume, execute, publish};
use serde_json::Value;
use tokio::sync::Notify;

/// W1: messages handled so far, and a wake-up for whoever waits for the last one.
pub static CONSUMED: AtomicUsize = AtomicUsize::new(0);
pub static CONSUMED_ALL: Notify = Notify::const_new();
pub static CONSUME_TARGET: AtomicUsize = AtomicUsize::new(usize::MAX);

/// W1: decodes each order from JSON and returns `Ok`.
#[derive(Default)]
pub struct BenchConsumer;

#[farine::service(name = "bench_consumer")]
impl BenchConsumer {
    #[consume(exchange = "farine-bench.w1", routing_key = "order.created")]
    async fn on_order(&self, order: Value) -> Result<(), String> {
        if order.is_null() {
            return Err("an empty order".into());
        }
        if CONSUMED.fetch_add(1, Ordering::Relaxed) + 1 == CONSUME_TARGET.load(Ordering::Relaxed) {
            CONSUMED_ALL.notify_one();
        }
        Ok(())
    }
}

/// W2, W3: an echo method.
#[derive(Default)]
pub struct BenchEcho;

#[farine::service(name = "bench_echo")]
impl BenchEcho {
    #[farine::rpc::method]
    async fn echo(&self, value: Value) -> Value {
        value
    }
}

/// W4: a `#[publish]` method.
#[derive(Default)]
pub struct BenchPublisher;

#[farine::service(name = "bench_publisher")]
impl BenchPublisher {
    #[publish(exchange = "farine-bench.w4", routing_key = "w4")]
    pub async fn send(&self, publisher: Publisher, value: &Value) -> Result<(), PublishError> {
        publisher.publish(value).await
    }
}

/// Idle memory: one handler of each kind.
#[derive(Default)]
pub struct BenchIdle;

#[farine::service(name = "bench_idle")]
impl BenchIdle {
    #[consume(exchange = "farine-bench.idle", routing_key = "idle")]
    async fn on_message(&self, _body: Value) {}

    #[publish(exchange = "farine-bench.idle", routing_key = "out")]
    async fn out(&self, publisher: Publisher, value: &Value) -> Result<(), PublishError> {
        publisher.publish(value).await
    }

    #[farine::rpc::method]
    async fn ping(&self) -> u32 {
        1
    }

    #[farine::rpc::client("bench_echo")]
    async fn ask(&self, echo: Client, value: Value) -> Result<Value, RpcError> {
        echo.call("echo", (value,)).await
    }

    #[execute]
    async fn idle(&self, shutdown: Shutdown) {
        shutdown.cancelled().await;
    }

    #[farine::stream::http]
    async fn on_event(&self, _data: Value) {}
}

/// Start-up: a service with five handlers.
#[derive(Default)]
pub struct BenchStartup;

#[farine::service(name = "bench_startup")]
impl BenchStartup {
    #[consume(exchange = "farine-bench.startup", routing_key = "a")]
    async fn first(&self, _body: Value) {}

    #[consume(exchange = "farine-bench.startup", routing_key = "b")]
    async fn second(&self, _body: Value) {}

    #[consume(exchange = "farine-bench.startup", routing_key = "c")]
    async fn third(&self, _body: Value) {}

    #[farine::rpc::method]
    async fn status(&self) -> u32 {
        0
    }

    #[publish(exchange = "farine-bench.startup", routing_key = "out")]
    async fn out(&self, publisher: Publisher, value: &Value) -> Result<(), PublishError> {
        publisher.publish(value).await
    }
}
