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
