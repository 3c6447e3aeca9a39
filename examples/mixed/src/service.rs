//! The Python framework README's overview example: a service that listens to an HTTP stream and sends each event on over
//! RPC, to `examples/rpc`'s `server`.

use farine::BoxError;
use farine::rpc::RpcError;
use farine::{Publisher, publish};
use rpc::ServerApiClient;
use serde_json::{Value, json};

/// For each event, asks `server` to repeat its data twice and publishes the answer to exchange
/// `mixed` (routing key `answer`) as `{"data": ..., "answer": ...}`.
#[derive(Default)]
pub struct Mixed;

#[farine::service]
impl Mixed {
    #[farine::stream::http]
    async fn get(&self, data: String) -> Result<(), BoxError> {
        let answer = self.send(data.clone()).await?;
        self.report(&json!({ "data": data, "answer": answer })).await?;
        Ok(())
    }

    #[farine::rpc::client("server")]
    async fn send(&self, rpc: ServerApiClient, data: String) -> Result<String, RpcError> {
        rpc.repeat(data, 2).await
    }

    #[publish(exchange = "mixed", routing_key = "answer")]
    async fn report(&self, publisher: Publisher, answer: &Value) -> Result<(), farine::PublishError> {
        publisher.publish(answer).await
    }
}

/// `mixed` with its RPC target replaced by a stub service, on farine's in-memory broker and
/// an in-memory event stream.
#[cfg(test)]
mod tests {
    use farine::testing::TestBroker;
    use serde_json::{Value, json};

    /// Stands in for `examples/rpc`'s `server`: answers `repeat` with a marked text.
    #[derive(Default)]
    pub struct StubServer;

    #[farine::service(name = "server")]
    impl StubServer {
        #[farine::rpc::method]
        async fn repeat(&self, text: String, times: u32) -> String {
            format!("stub:{text}x{times}")
        }
    }

    #[tokio::test]
    async fn each_event_goes_through_the_rpc_target_and_is_reported() {
        let kit = TestBroker::new();
        let feed = kit.feed("events");
        let running = kit
            .start("[mixed]\nstart_from = end\n[server]\n")
            .set("mixed", "endpoint", feed.endpoint())
            .start()
            .await
            .expect("mixed and the stub start");
        feed.wait_for_readers(1).await;
        feed.send(Some("1"), "", "hello");
        let report = kit.next_published("mixed", "answer").await;
        assert_eq!(
            report.json::<Value>(),
            json!({ "data": "hello", "answer": "stub:hellox2" })
        );
        running.stop().await;
    }
}
