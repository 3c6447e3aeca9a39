//! The scope every handler call runs in: the running runtime that owns the handler.
//!
//! The generated code of a `#[publish]` or `#[rpc::client]` method asks its runtime for the
//! method's publisher or client; calls run inside their runtime's scope so that the lookup is
//! exact even with several runtimes in one process. The scope is opaque here: the runtime puts
//! in it what it wants found (`runtime::context`), and handler kinds only enter it.

use std::any::Any;
use std::future::Future;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

/// The scope of one running runtime: what the runtime put in it, and its shutdown signal. Cheap
/// to clone: one reference count (entered for every call).
#[derive(Clone)]
pub(crate) struct CallScope(Arc<Inner>);

struct Inner {
    value: Arc<dyn Any + Send + Sync>,
    shutdown: CancellationToken,
}

tokio::task_local! {
    static CURRENT: CallScope;
}

impl CallScope {
    /// A scope holding `value`, for a runtime stopped by `shutdown`.
    pub fn new<T: Any + Send + Sync>(value: Arc<T>, shutdown: CancellationToken) -> Self {
        Self(Arc::new(Inner { value, shutdown }))
    }

    /// Runs `future` inside this scope.
    pub fn enter<F: Future>(&self, future: F) -> impl Future<Output = F::Output> + use<F> {
        CURRENT.scope(self.clone(), future)
    }

    /// `find` applied to the value of the scope the current call runs in, when there is one
    /// and it is a `T`.
    pub fn with_current<T: Any, R>(find: impl FnOnce(&T) -> Option<R>) -> Option<R> {
        CURRENT
            .try_with(|scope| scope.0.value.downcast_ref::<T>().and_then(find))
            .ok()
            .flatten()
    }

    /// The shutdown signal of the runtime the current call runs in.
    pub fn current_shutdown() -> Option<CancellationToken> {
        CURRENT.try_with(|scope| scope.0.shutdown.clone()).ok()
    }
}
