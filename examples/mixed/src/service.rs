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
