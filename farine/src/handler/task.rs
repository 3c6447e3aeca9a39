//! A handler task as the runtime supervises it: each handler kind turns its plan into a
//! [`Task`], whose factory starts one run at a time; the supervisor restarts failed runs.

use std::fmt::Display;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::{CallScope, Ready};

/// Why one run of a handler task ended.
#[derive(Debug)]
pub(crate) struct TaskError {
    pub cause: String,
    /// The broker connection went away: not the task's fault.
    pub connection_lost: bool,
}

impl TaskError {
    pub fn new(cause: impl Display, connection_lost: bool) -> Self {
        Self {
            cause: cause.to_string(),
            connection_lost,
        }
    }
}

impl Display for TaskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.cause)
    }
}

/// One run of a handler task.
pub(crate) type TaskRun = BoxFuture<'static, Result<(), TaskError>>;

/// Starts one run of a handler task; each run is told its readiness.
pub(crate) type TaskFactory = Box<dyn FnMut(Ready) -> TaskRun + Send>;

/// A handler task, ready to be supervised.
pub(crate) struct Task {
    pub service: &'static str,
    pub handler: &'static str,
    /// The longest a stop may take: draining its calls, then its broker round trips.
    pub stop_bound: Duration,
    pub start: TaskFactory,
}

/// Whether the transport a task's calls publish through is up now: a run that failed while it
/// was down (a publish that timed out) is the outage's doing, not the handler's.
pub(crate) type Connected = std::sync::Arc<dyn Fn() -> bool + Send + Sync>;

/// What every handler task of a runtime runs with.
#[derive(Clone)]
pub(crate) struct TaskEnv {
    /// The runtime's scope, entered by every call.
    pub scope: CallScope,
    /// Cancelled when the runtime stops.
    pub shutdown: CancellationToken,
    /// The layers every call goes through.
    pub layers: super::Layers,
    /// The runtime's metrics and tracer.
    pub observe: crate::observe::Observe,
}
