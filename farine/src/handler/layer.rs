//! Middleware: an ordered list of layers around every handler call (a consumed message, an RPC
//! call, an SSE event, an `#[execute]` run) and every send (a call of a `#[publish]` or
//! `#[rpc::client]` method). The seat of timing, metrics and tracing for both, and of timeouts
//! and auth for calls (a send layer observes: it cannot stop or bound a send).
//!
//! A call layer is around the whole call: the inbox, the call's transaction and its commit
//! included, so the outcome it sees is the one that settles the message.
//!
//! A small trait of farine's own rather than tower's `Layer`/`Service`: tower's services are
//! polled for readiness and cloned per call, which a message does not need; here a runtime
//! without layers pays one branch per call, and a call through `n` layers `n + 1` boxed
//! futures.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::future::BoxFuture;

use super::{HandlerKind, Outcome};

/// A layer around handler calls and sends. Both methods default to passing through: implement
/// the one you need. Add layers with `Runtime::layer` or `farine::main!(layers = [...])`; the
/// first added is the outermost.
///
/// ```
/// use farine::layer::{BoxFuture, CallInfo, Layer, Next, Outcome};
///
/// /// Logs how long each handler call took (with the `tracing` crate).
/// struct Timing;
///
/// impl Layer for Timing {
///     fn call<'a>(&'a self, call: &'a CallInfo<'a>, next: Next<'a, Outcome>) -> BoxFuture<'a, Outcome> {
///         Box::pin(async move {
///             let started = std::time::Instant::now();
///             let outcome = next.run().await;
///             let took = started.elapsed();
///             println!("{}.{} took {took:?}", call.service, call.handler);
///             outcome
///         })
///     }
/// }
/// ```
pub trait Layer: Send + Sync + 'static {
    /// Around one handler call: run `next` to go on (to the next layer, then the handler), or
    /// return an outcome of your own without running it to refuse the call.
    fn call<'a>(
        &'a self,
        call: &'a CallInfo<'a>,
        next: Next<'a, Outcome>,
    ) -> BoxFuture<'a, Outcome> {
        let _ = call;
        next.run()
    }

    /// Around one send. A send layer observes: the send happens whether it runs `next` or not.
    fn send<'a>(&'a self, send: &'a SendInfo, next: Next<'a, ()>) -> BoxFuture<'a, ()> {
        let _ = send;
        next.run()
    }
}

/// The handler call a layer is around.
#[non_exhaustive]
pub struct CallInfo<'a> {
    pub service: &'static str,
    pub handler: &'static str,
    pub kind: HandlerKind,
    /// What the call handles: a `farine::Message`, a `farine::stream::Event`, ...
    payload: &'a (dyn Any + Send + Sync),
}

impl<'a> CallInfo<'a> {
    pub(crate) fn new(
        service: &'static str,
        handler: &'static str,
        kind: HandlerKind,
        payload: &'a (dyn Any + Send + Sync),
    ) -> Self {
        Self {
            service,
            handler,
            kind,
            payload,
        }
    }

    /// What the call handles, when it is a `T`: `call.payload::<farine::Message>()` for a
    /// consumed message, `farine::stream::Event` for an SSE event.
    pub fn payload<T: Any>(&self) -> Option<&T> {
        self.payload.downcast_ref()
    }
}

/// The send a layer is around: a call of a `#[publish]` method (`kind` is `Publish`) or of an
/// `#[rpc::client]` method (`RpcClient`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SendInfo {
    pub service: &'static str,
    pub method: &'static str,
    pub kind: HandlerKind,
}

impl SendInfo {
    pub(crate) fn new(service: &'static str, method: &'static str, kind: HandlerKind) -> Self {
        Self {
            service,
            method,
            kind,
        }
    }
}

/// The rest of the chain: the next layers, then the call itself.
pub struct Next<'a, T> {
    rest: &'a [Arc<dyn Layer>],
    step: Step<'a>,
    inner: Pin<&'a mut (dyn Future<Output = T> + Send + 'a)>,
}

/// What a `Next` is in front of.
#[derive(Clone, Copy)]
enum Step<'a> {
    Call(&'a CallInfo<'a>),
    Send(&'a SendInfo),
}

impl<'a> Next<'a, Outcome> {
    /// Runs the rest of the chain.
    pub fn run(self) -> BoxFuture<'a, Outcome> {
        match (self.rest.split_first(), self.step) {
            (Some((layer, rest)), Step::Call(call)) => layer.call(
                call,
                Next {
                    rest,
                    step: self.step,
                    inner: self.inner,
                },
            ),
            _ => Box::pin(self.inner),
        }
    }
}

impl<'a> Next<'a, ()> {
    /// Runs the rest of the chain.
    pub fn run(self) -> BoxFuture<'a, ()> {
        match (self.rest.split_first(), self.step) {
            (Some((layer, rest)), Step::Send(send)) => layer.send(
                send,
                Next {
                    rest,
                    step: self.step,
                    inner: self.inner,
                },
            ),
            _ => Box::pin(self.inner),
        }
    }
}

/// A runtime's layers, in order. Cheap to clone.
#[doc(hidden)]
#[derive(Clone, Default)]
pub struct Layers(Arc<[Arc<dyn Layer>]>);

impl std::fmt::Debug for Layers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Layers({})", self.0.len())
    }
}

impl Layers {
    pub fn new(layers: Vec<Arc<dyn Layer>>) -> Self {
        Self(layers.into())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `handled` (a call of `service`'s `handler`, of `kind`, handling `payload`) through every
    /// layer; without layers, `handled` as it is (one branch, nothing allocated).
    pub async fn around<P, F>(
        &self,
        (service, handler, kind): (&'static str, &'static str, HandlerKind),
        payload: &P,
        handled: F,
    ) -> Outcome
    where
        P: Any + Send + Sync,
        F: Future<Output = Outcome> + Send,
    {
        if self.is_empty() {
            return handled.await;
        }
        // A layer that panics fails the call, as a handler that panics does; it takes down
        // neither the task nor its neighbours.
        let layered = self.call(CallInfo::new(service, handler, kind, payload), handled);
        match futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(layered)).await {
            Ok(outcome) => outcome,
            Err(panic) => Outcome::Failed(format!(
                "a layer panicked: {}",
                super::panic_message(&*panic)
            )),
        }
    }

    /// `handled` (a handler call) through every layer.
    async fn call<F>(&self, call: CallInfo<'_>, handled: F) -> Outcome
    where
        F: Future<Output = Outcome> + Send,
    {
        let handled = std::pin::pin!(handled);
        Next {
            rest: &self.0,
            step: Step::Call(&call),
            inner: handled,
        }
        .run()
        .await
    }

    /// `sent` (a send) through every layer; it runs even when a layer did not run it.
    pub async fn send<F: Future + Send>(&self, send: SendInfo, sent: F) -> F::Output
    where
        F::Output: Send,
    {
        let mut sending = std::pin::pin!(futures_util::future::maybe_done(sent));
        Next {
            rest: &self.0,
            step: Step::Send(&send),
            inner: sending.as_mut(),
        }
        .run()
        .await;
        // Done already when the layers ran it; polled to its end here when one did not.
        sending.as_mut().await;
        match sending.as_mut().take_output() {
            Some(output) => output,
            None => unreachable!("a send that completed holds its output until taken"),
        }
    }
}
