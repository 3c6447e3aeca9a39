//! Two services: `Server` answers RPC calls; `Client` calls it through an injected, typed client.

use std::time::Duration;

use farine::rpc::{RpcError, Stream, StreamExt, stream};
use rpc::{ServerApi, ServerApiClient};

/// Service `server` (section `[server]`).
#[derive(Default)]
pub struct Server;

#[farine::service(implements = ServerApi)]
impl Server {
    #[farine::rpc::method]
    async fn repeat(&self, text: String, times: u32) -> String {
        text.repeat(times as usize)
    }

    #[farine::rpc::method]
    async fn fail(&self, message: String) -> Result<(), String> {
        Err(message)
    }

    #[farine::rpc::method]
    fn count(&self, n: u32) -> impl Stream<Item = u32> + Send {
        stream::iter(0..n)
    }

    #[farine::rpc::method]
    async fn sleep(&self, ms: u64) -> u64 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        ms
    }
}

/// Service `client` (section `[client]`): calls `server` for its own callers.
#[derive(Default)]
pub struct Client;

#[farine::service]
impl Client {
    /// `text` in capitals, twice, as `server` repeats it.
    #[farine::rpc::method]
    async fn shout(&self, text: String) -> Result<String, RpcError> {
        self.repeat_on_server(text.to_uppercase(), 2).await
    }

    /// The items of `server.count(n)`, collected.
    #[farine::rpc::method]
    async fn count_on_server(&self, n: u32) -> Result<Vec<u32>, RpcError> {
        self.collect_count(n).await
    }

    /// Callers leave the client out: farine supplies the one of service `server`.
    #[farine::rpc::client("server")]
    async fn repeat_on_server(
        &self,
        server: ServerApiClient,
        text: String,
        times: u32,
    ) -> Result<String, RpcError> {
        server.repeat(text, times).await
    }

    #[farine::rpc::client("server")]
    async fn collect_count(&self, server: ServerApiClient, n: u32) -> Result<Vec<u32>, RpcError> {
        let mut items = server.count(n).await?;
        let mut collected = Vec::new();
        while let Some(item) = items.next().await {
            collected.push(item?);
        }
        Ok(collected)
    }
}

/// Both services tested in-process on farine's in-memory broker: `client` calls `server`
/// through the broker, as in production.
#[cfg(test)]
mod tests {
    use farine::rpc::{RpcError, StreamExt};
    use farine::testing::TestBroker;

    #[tokio::test]
    async fn server_answers_unary_streaming_and_failing_calls() {
        let kit = TestBroker::new();
        let running = kit.start("[server]\n").start().await.expect("server starts");
        let server = kit.client("server").await;
        let repeated: String = server.call("repeat", ("ab", 2)).await.expect("repeat");
        assert_eq!(repeated, "abab");
        let items: Vec<u32> = server
            .stream::<u32>("count", (3,))
            .await
            .expect("count")
            .map(|item| item.expect("an item"))
            .collect()
            .await;
        assert_eq!(items, [0, 1, 2]);
        match server.call::<()>("fail", ("boom",)).await {
            Err(RpcError::Remote { message, .. }) => assert_eq!(message, "boom"),
            other => panic!("expected the server's error, got {other:?}"),
        }
        match server.call::<()>("nope", ()).await {
            Err(RpcError::NoSuchMethod { method, .. }) => assert_eq!(method, "nope"),
            other => panic!("expected NoSuchMethod, got {other:?}"),
        }
        running.stop().await;
    }

    #[tokio::test]
    async fn client_calls_server_over_the_broker() {
        let kit = TestBroker::new();
        let running = kit
            .start("[server]\n[client]\n")
            .start()
            .await
            .expect("both start");
        let client = kit.client("client").await;
        let shout: String = client.call("shout", ("hi",)).await.expect("shout");
        assert_eq!(shout, "HIHI");
        let counted: Vec<u32> = client.call("count_on_server", (4,)).await.expect("count");
        assert_eq!(counted, [0, 1, 2, 3]);
        running.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_to_a_service_nobody_runs_fails_at_once() {
        let kit = TestBroker::new();
        let running = kit.start("[client]\n").start().await.expect("client starts");
        let client = kit.client("client").await;
        match client.call::<String>("shout", ("hi",)).await {
            Err(RpcError::Remote { message, .. }) => {
                assert!(message.contains("server"), "{message}")
            }
            other => panic!("expected the client's error naming `server`, got {other:?}"),
        }
        running.stop().await;
    }
}
