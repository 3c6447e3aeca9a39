//! Supervision: every handler task runs under a loop that restarts it when it fails.
//!
//! A task that returns an error or panics is restarted after a delay that doubles from
//! `restart_delay` up to `restart_delay_max`, and falls back to the minimum once a run lasted
//! `STABLE_AFTER`. A failure of one task touches no other: each has its own loop. A task that
//! fails before it ever got ready (its first start) is not restarted: the start-up reports it.
//! A task that fails more than `max_restarts` times within `restart_window` is not restarted
//! either: the service is failed, the runtime stops and the process exits non-zero, so the
//! orchestrator notices instead of a silent flapping. A task that ends with `Ok` is done (an
//! `#[execute]` method with `restart = false`). A task that stopped because the broker
//! connection went away is restarted too, but not counted against `max_restarts`: it waits for
//! the reconnection, which has a backoff of its own, so a broker restart or a network cut
//! never fails a service. `docs/supervision.md` describes the model.

use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, HandlerSection};
use crate::handler::{Ready, TaskError, panic_message};

const STABLE_AFTER: Duration = Duration::from_secs(60);

/// How a handler's task is restarted, from the config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    pub delay_min: Duration,
    pub delay_max: Duration,
    pub max_restarts: u32,
    pub window: Duration,
}

impl Default for Policy {
    /// `restart_delay` (100 ms), `restart_delay_max` (30 s), `max_restarts` (5),
    /// `restart_window` (60 s).
    fn default() -> Self {
        Self {
            delay_min: Duration::from_millis(100),
            delay_max: Duration::from_secs(30),
            max_restarts: 5,
            window: Duration::from_secs(60),
        }
    }
}

impl Policy {
    /// The handler's keys, else the defaults.
    pub fn from_config(handler: &HandlerSection<'_>) -> Result<Self, ConfigError> {
        let defaults = Self::default();
        Ok(Self {
            delay_min: handler.get_or("restart_delay", defaults.delay_min)?,
            delay_max: handler.get_or("restart_delay_max", defaults.delay_max)?,
            max_restarts: handler.get_or("max_restarts", defaults.max_restarts)?,
            window: handler.get_or("restart_window", defaults.window)?,
        })
    }
}

/// A handler that failed more often than its policy allows.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "service `{service}`, handler `{handler}` failed {failures} times within {window:?} (more than max_restarts = {max_restarts}); last cause: {cause}"
)]
#[non_exhaustive]
pub struct ServiceFailed {
    pub service: &'static str,
    pub handler: &'static str,
    pub failures: usize,
    pub max_restarts: u32,
    pub window: Duration,
    pub cause: String,
}

/// Runs `task` until `shutdown`, restarting it with backoff whenever it fails, until it fails
/// more often than `policy` allows (reported on `failed`).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn supervise<F, Fut>(
    service: &'static str,
    handler: &'static str,
    policy: Policy,
    metrics: Option<std::sync::Arc<crate::observe::Metrics>>,
    shutdown: CancellationToken,
    ready: Ready,
    failed: mpsc::UnboundedSender<ServiceFailed>,
    mut task: F,
) where
    F: FnMut(Ready) -> Fut,
    Fut: Future<Output = Result<(), TaskError>>,
{
    let mut delay = policy.delay_min;
    let mut failures: VecDeque<Instant> = VecDeque::new();
    loop {
        let started = Instant::now();
        let result = AssertUnwindSafe(task(ready.clone())).catch_unwind().await;
        ready.down();
        if shutdown.is_cancelled() {
            return;
        }
        let (cause, connection_lost) = match result {
            Ok(Ok(())) => return,
            Ok(Err(e)) => (e.cause, e.connection_lost),
            Err(panic) => (format!("panicked: {}", panic_message(&*panic)), false),
        };
        if ready.pending() {
            ready.signal(Err(cause));
            return;
        }
        if connection_lost {
            // Not counted: the next run waits for the reconnection (with its own backoff).
            tracing::warn!(service, handler, cause = %cause, "the broker connection is lost; the handler resumes once farine reconnected");
            tokio::select! {
                _ = tokio::time::sleep(policy.delay_min) => {}
                _ = shutdown.cancelled() => return,
            }
            continue;
        }
        let now = Instant::now();
        failures.push_back(now);
        while failures
            .front()
            .is_some_and(|at| now.duration_since(*at) > policy.window)
        {
            failures.pop_front();
        }
        if failures.len() > policy.max_restarts as usize {
            let failure = ServiceFailed {
                service,
                handler,
                failures: failures.len(),
                max_restarts: policy.max_restarts,
                window: policy.window,
                cause,
            };
            tracing::error!(service, handler, error = %failure, "handler failed too often: the service is failed");
            let _ = failed.send(failure);
            return;
        }
        if started.elapsed() >= STABLE_AFTER {
            delay = policy.delay_min;
        }
        tracing::warn!(service, handler, cause = %cause, restart_in = ?delay, failures = failures.len(), "handler task failed; restarting");
        if let Some(metrics) = &metrics {
            metrics.restarted(service, handler);
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return,
        }
        delay = (delay * 2).min(policy.delay_max);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// The start and end of each run of a task that fails on every run, the 7th after
    /// `STABLE_AFTER` and a second, the 8th ending the supervision with `Ok`.
    async fn runs_of_a_task_stable_once(policy: Policy) -> Vec<(Instant, Instant)> {
        let runs = Arc::new(Mutex::new(Vec::new()));
        let (ready, _started) = Ready::new();
        let (failed, _failures) = mpsc::unbounded_channel();
        let recorded = runs.clone();
        supervise(
            "svc",
            "task",
            policy,
            None,
            CancellationToken::new(),
            ready,
            failed,
            move |ready: Ready| {
                let runs = recorded.clone();
                async move {
                    ready.signal(Ok(()));
                    let started = Instant::now();
                    let run = runs.lock().unwrap().len() + 1;
                    if run == 7 {
                        tokio::time::sleep(STABLE_AFTER + Duration::from_secs(1)).await;
                    }
                    runs.lock().unwrap().push((started, Instant::now()));
                    if run == 8 {
                        return Ok(());
                    }
                    Err(TaskError::new(format!("run {run} fails"), false))
                }
            },
        )
        .await;
        runs.lock().unwrap().clone()
    }

    #[tokio::test(start_paused = true)]
    async fn the_restart_delay_doubles_to_its_cap_and_falls_back_after_a_stable_run() {
        let policy = Policy {
            delay_min: Duration::from_millis(100),
            delay_max: Duration::from_secs(30),
            max_restarts: 100,
            window: Duration::from_secs(3600),
        };
        let runs = runs_of_a_task_stable_once(policy).await;
        let gaps: Vec<_> = runs.windows(2).map(|w| w[1].0 - w[0].1).collect();
        let ms = Duration::from_millis;
        // 0.1, 0.2, ... 3.2 s after the quick failures; after the minute-long run, 0.1 s again
        // (6.4 s without the fall-back).
        assert_eq!(
            gaps,
            vec![
                ms(100),
                ms(200),
                ms(400),
                ms(800),
                ms(1600),
                ms(3200),
                ms(100)
            ]
        );

        let capped = runs_of_a_task_stable_once(Policy {
            delay_max: ms(400),
            ..policy
        })
        .await;
        let gaps: Vec<_> = capped.windows(2).map(|w| w[1].0 - w[0].1).collect();
        assert_eq!(
            gaps,
            vec![
                ms(100),
                ms(200),
                ms(400),
                ms(400),
                ms(400),
                ms(400),
                ms(100)
            ]
        );
    }
}
