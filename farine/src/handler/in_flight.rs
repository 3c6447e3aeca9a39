//! The calls a handler task has under way, and how they are waited for when it stops.

use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use tokio::task::JoinSet;

/// The handler calls a consuming task has under way.
///
/// A consumer spawns each call as a task of its own (`Tasks`): calls run in parallel on every
/// worker thread, which a consumer's work (decoding, database writes) can use. An RPC server
/// polls its calls within its own task (`Local`): a call's reply then goes out without the
/// cross-thread wake-up a spawned task costs, which is most of an RPC's latency on a loaded
/// machine (`BENCHMARKS.md`); calls still run concurrently, and a method that computes for long
/// belongs in `spawn_blocking`.
pub(crate) enum InFlight {
    Tasks(JoinSet<()>),
    Local(futures_util::stream::FuturesUnordered<BoxFuture<'static, ()>>),
}

impl InFlight {
    pub fn push(&mut self, call: impl std::future::Future<Output = ()> + Send + 'static) {
        match self {
            InFlight::Tasks(tasks) => {
                tasks.spawn(call);
            }
            InFlight::Local(calls) => {
                // A panic that escaped the call's own guard must not end the server's loop.
                let guarded =
                    futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(call));
                calls.push(Box::pin(async move {
                    let _ = guarded.await;
                }));
            }
        }
    }

    /// The next call to finish (`None` when there is none).
    pub async fn next(&mut self) -> Option<()> {
        match self {
            InFlight::Tasks(tasks) => tasks.join_next().await.map(|_| ()),
            InFlight::Local(calls) => calls.next().await,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            InFlight::Tasks(tasks) => tasks.len(),
            InFlight::Local(calls) => calls.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits for the calls under way to finish, for at most `drain_timeout`; logs how many
    /// were still running then.
    pub async fn drain(
        &mut self,
        drain_timeout: Duration,
        service: &'static str,
        handler: &'static str,
    ) {
        let drained = tokio::time::timeout(drain_timeout, async {
            while self.next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                service,
                handler,
                unfinished = self.len(),
                ?drain_timeout,
                "handlers still running at the end of the drain timeout are stopped; their messages are not settled and come back"
            );
        }
    }

    /// Stops every call still under way.
    pub async fn stop(&mut self) {
        match self {
            InFlight::Tasks(tasks) => tasks.shutdown().await,
            InFlight::Local(calls) => calls.clear(),
        }
    }
}
