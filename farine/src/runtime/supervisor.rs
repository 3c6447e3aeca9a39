//! Supervision: every handler task runs under a loop that restarts it when it fails.
//!
//! A task that returns an error or panics is restarted after a delay that doubles from
//! `RESTART_DELAY_MIN` up to `RESTART_DELAY_MAX`, and falls back to the minimum once a run lasted
//! `STABLE_AFTER`. A failure of one task touches no other: each has its own loop. A task that
//! fails before it ever got ready (its first start) is not restarted: the start-up reports it.
//! `docs/supervision.md` describes the model.

use std::fmt::Display;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::amqp::consumer::panic_message;

const RESTART_DELAY_MIN: Duration = Duration::from_millis(100);
const RESTART_DELAY_MAX: Duration = Duration::from_secs(30);
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// The first start's result: `Err` carries the cause.
pub(crate) type Started = Result<(), String>;

/// Tells the start-up, once, whether a task's first start succeeded.
#[derive(Clone)]
pub(crate) struct Ready {
    slot: Arc<Mutex<Option<oneshot::Sender<Started>>>>,
}

impl Ready {
    pub fn new() -> (Self, oneshot::Receiver<Started>) {
        let (tx, rx) = oneshot::channel();
        (
            Self {
                slot: Arc::new(Mutex::new(Some(tx))),
            },
            rx,
        )
    }

    /// Reports the first start's result; later calls do nothing.
    pub fn signal(&self, result: Started) {
        let sender = self.slot.lock().ok().and_then(|mut slot| slot.take());
        if let Some(sender) = sender {
            let _ = sender.send(result);
        }
    }

    fn pending(&self) -> bool {
        self.slot.lock().map(|slot| slot.is_some()).unwrap_or(false)
    }
}

/// Runs `task` until `shutdown`, restarting it with backoff whenever it fails.
pub(crate) async fn supervise<F, Fut, E>(
    service: &'static str,
    handler: &'static str,
    shutdown: CancellationToken,
    ready: Ready,
    mut task: F,
) where
    F: FnMut(Ready) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let mut delay = RESTART_DELAY_MIN;
    loop {
        let started = Instant::now();
        let result = AssertUnwindSafe(task(ready.clone())).catch_unwind().await;
        if shutdown.is_cancelled() {
            return;
        }
        let cause = match result {
            Ok(Ok(())) => "the task ended".to_string(),
            Ok(Err(e)) => e.to_string(),
            Err(panic) => format!("panicked: {}", panic_message(&*panic)),
        };
        if ready.pending() {
            ready.signal(Err(cause));
            return;
        }
        if started.elapsed() >= STABLE_AFTER {
            delay = RESTART_DELAY_MIN;
        }
        tracing::warn!(service, handler, cause = %cause, restart_in = ?delay, "handler task failed; restarting");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return,
        }
        delay = (delay * 2).min(RESTART_DELAY_MAX);
    }
}
