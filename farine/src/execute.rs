//! `#[execute]`: a method farine runs, and runs again when it returns.
//!
//! A method that returns is run again (`restart = true`, the default) after `interval`: by
//! default [`DEFAULT_INTERVAL`] (one second), so that a method that returns at once is a
//! ticker, not a busy loop; `interval = 0` is the explicit choice of a tight loop (the Python
//! package's default). With `restart = false` it runs once. The attribute can carry the
//! interval the code relies on, `#[execute(interval = "100ms")]`; the config overrides it. An `Err` or a panic is a failure:
//! the supervisor restarts the method with backoff and counts it against the restart-intensity
//! limit (`docs/supervision.md`). The method may take a [`Shutdown`] to learn that the process
//! is stopping; it then has `drain_timeout` to return before it is stopped.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, Section};
pub use crate::handler::Shutdown;
use crate::handler::{
    CallScope, Connected, Description, HandlerKind, Layers, Outcome, Ready, Task, TaskEnv,
    TaskError, panic_message,
};
use crate::observe::Observer;
use crate::observe::trace::{CallSpec, SpanKind};

/// The pause before a method that returned is run again, when `interval` is not set.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

/// What an `#[execute]` method looks like once the macro wrapped it.
pub(crate) type ExecuteFn<S> = fn(Arc<S>, Run) -> BoxFuture<'static, Outcome>;

pub(crate) type BoundExecute = Arc<dyn Fn(Run) -> BoxFuture<'static, Outcome> + Send + Sync>;

/// One run of an `#[execute]` method: what its parameters are taken from (the shutdown signal,
/// the database of the run, extractors of your own).
#[derive(Clone, Debug)]
pub struct Run {
    shutdown: Shutdown,
}

impl Run {
    pub(crate) fn new(shutdown: Shutdown) -> Self {
        Self { shutdown }
    }

    /// The signal that the process is stopping.
    pub fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }
}

/// How an `#[execute]` method is run, from its section.
#[derive(Debug, Clone)]
pub(crate) struct ExecutePlan {
    pub service: &'static str,
    pub handler: &'static str,
    pub restart: bool,
    pub interval: Duration,
    pub drain_timeout: Duration,
    /// `transaction = true`: each call runs in a transaction, committed when it succeeds.
    pub transaction: bool,
    /// The database of each run, when the service has one (set at start).
    pub db: Option<Arc<crate::db::call::CallDb>>,
    /// The runtime's layers, around each call (set at start).
    pub layers: Layers,
    /// The handler's metrics and the runtime's tracer (set at start).
    pub observer: Observer,
}

impl ExecutePlan {
    pub fn from_config(
        service: &'static str,
        handler: &'static str,
        section: &Section,
    ) -> Result<Self, ConfigError> {
        let scoped = section.handler(handler);
        Ok(Self {
            service,
            handler,
            restart: scoped.get_or("restart", true)?,
            interval: scoped.get_or("interval", DEFAULT_INTERVAL)?,
            drain_timeout: scoped.get_or("drain_timeout", Duration::from_secs(30))?,
            transaction: scoped.get_or("transaction", false)?,
            db: None,
            layers: Layers::default(),
            observer: Observer::default(),
        })
    }
}

/// The supervised task of one `#[execute]` method. A run that failed while the broker was away
/// (a publish that timed out) is the outage's doing, not the method's.
pub(crate) fn task(
    mut plan: ExecutePlan,
    call: BoundExecute,
    connected: Connected,
    env: &TaskEnv,
) -> Task {
    let (service, handler) = (plan.service, plan.handler);
    let stop_bound = plan.drain_timeout + Duration::from_secs(1);
    plan.layers = env.layers.clone();
    plan.observer = env.observe.handler(service, handler);
    let plan = Arc::new(plan);
    let env = env.clone();
    Task {
        service,
        handler,
        stop_bound,
        start: Box::new(move |ready| {
            let run = run(
                plan.clone(),
                call.clone(),
                env.scope.clone(),
                env.shutdown.clone(),
                ready,
            );
            let connected = connected.clone();
            Box::pin(async move { run.await.map_err(|e| TaskError::new(e, !connected())) })
        }),
    }
}

impl ExecutePlan {
    /// The method as `--list` shows it.
    pub(crate) fn describe(&self, signature: (&'static str, &'static str)) -> Description {
        let mut description =
            Description::new(self.service, self.handler, HandlerKind::Execute, signature);
        description.settings = vec![format!("restart {}", self.restart)];
        description
    }
}

/// Why an `#[execute]` method's run failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct ExecuteError(String);

/// Runs the method until shutdown, or once with `restart = false`; `Err` on a failed run.
pub(crate) async fn run(
    plan: Arc<ExecutePlan>,
    call: BoundExecute,
    scope: CallScope,
    shutdown: CancellationToken,
    ready: Ready,
) -> Result<(), ExecuteError> {
    ready.signal(Ok(()));
    tracing::info!(
        service = plan.service,
        handler = plan.handler,
        restart = plan.restart,
        "executing"
    );
    loop {
        let run = Run::new(Shutdown::from_token(shutdown.clone()));
        let (db, handled) = (plan.db.clone(), call(run.clone()));
        let called = async move {
            match crate::db::call::around(db.as_deref(), None, handled).await {
                crate::db::call::Called::Ran(outcome) => outcome,
                crate::db::call::Called::Duplicate => Outcome::Done,
            }
        };
        let kind = (plan.service, plan.handler, HandlerKind::Execute);
        let layers = plan.layers.clone();
        let span = plan.observer.tracer.start(
            CallSpec {
                service: plan.service,
                handler: plan.handler,
                kind_name: "execute",
                span_kind: SpanKind::Internal,
                queue: "",
                message_id: None,
            },
            || None,
        );
        let started = std::time::Instant::now();
        let run = scope.enter(async move { layers.around(kind, &run, called).await });
        let run: futures_util::future::BoxFuture<'_, Outcome> = match &span {
            Some(span) => Box::pin(span.run(run)),
            None => Box::pin(run),
        };
        let mut run = Box::pin(AssertUnwindSafe(run).catch_unwind());
        let result = tokio::select! {
            result = &mut run => result,
            _ = shutdown.cancelled() => match tokio::time::timeout(plan.drain_timeout, run).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::warn!(service = plan.service, handler = plan.handler, "the method did not return within the drain timeout; it is stopped");
                    return Ok(());
                }
            },
        };
        let outcome = result.unwrap_or_else(|panic| {
            Outcome::Failed(format!("panicked: {}", panic_message(&*panic)))
        });
        outcome.observed(&plan.observer, started, span);
        if shutdown.is_cancelled() {
            return Ok(());
        }
        match outcome {
            Outcome::Failed(error)
            | Outcome::Rejected(error)
            | Outcome::Undecodable(crate::decode::DecodeError { cause: error, .. }) => {
                return Err(ExecuteError(error));
            }
            Outcome::Done if !plan.restart => {
                tracing::info!(
                    service = plan.service,
                    handler = plan.handler,
                    "finished (restart = false)"
                );
                return Ok(());
            }
            Outcome::Done => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(plan.interval) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}
