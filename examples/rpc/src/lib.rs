//! The interface of the `server` service, declared once: the server implements it
//! (`#[farine::service(implements = ServerApi)]`) and callers use the generated
//! [`ServerApiClient`]. A wrong argument or result type is a compile error on either side.

use farine::rpc::Stream;

/// The RPC methods of service `server`.
#[farine::rpc::interface(service = "server")]
pub trait ServerApi {
    /// `text` repeated `times` times.
    async fn repeat(&self, text: String, times: u32) -> String;
    /// Always fails, with `message` as the error.
    async fn fail(&self, message: String) -> Result<(), String>;
    /// Streams 0, 1, ..., n-1.
    fn count(&self, n: u32) -> impl Stream<Item = u32> + Send;
    /// Waits `ms` milliseconds, then returns `ms`.
    async fn sleep(&self, ms: u64) -> u64;
}
