//! Readiness: whether a handler task's first start succeeded (start-up waits for it) and
//! whether it is up now (the health endpoint's `/ready`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// The first start's result: `Err` carries the cause.
pub(crate) type Started = Result<(), String>;

/// Tells the start-up, once, whether a task's first start succeeded, and the health endpoint,
/// at any time, whether the task is up (consuming, serving, running).
#[derive(Clone)]
pub(crate) struct Ready {
    slot: Arc<Mutex<Option<oneshot::Sender<Started>>>>,
    up: Arc<AtomicBool>,
}

impl Ready {
    pub fn new() -> (Self, oneshot::Receiver<Started>) {
        let (tx, rx) = oneshot::channel();
        (
            Self {
                slot: Arc::new(Mutex::new(Some(tx))),
                up: Arc::new(AtomicBool::new(false)),
            },
            rx,
        )
    }

    /// Reports a start's result: the first one to the start-up; each one to the health state.
    pub fn signal(&self, result: Started) {
        self.up.store(result.is_ok(), Ordering::Release);
        let sender = self.slot.lock().ok().and_then(|mut slot| slot.take());
        if let Some(sender) = sender {
            let _ = sender.send(result);
        }
    }

    /// True between a start that succeeded and the end of that run.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    pub(crate) fn down(&self) {
        self.up.store(false, Ordering::Release);
    }

    /// True until the first start reported its result.
    pub fn pending(&self) -> bool {
        self.slot.lock().map(|slot| slot.is_some()).unwrap_or(false)
    }
}
