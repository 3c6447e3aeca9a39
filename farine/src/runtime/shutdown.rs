//! The signals that stop a farine process: SIGINT (Ctrl-C) and SIGTERM.
//!
//! [`Signals::install`] takes them over at once (before start-up, so a SIGTERM that arrives
//! while the runtime starts is not lost and does not kill the process half-started); the
//! runtime then waits on them.

/// SIGINT and SIGTERM, taken over from their default action.
pub struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    /// Takes over SIGINT and SIGTERM now. Must be called inside a tokio runtime.
    pub fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Self {
                term: signal(SignalKind::terminate()).ok(),
                int: signal(SignalKind::interrupt()).ok(),
            }
        }
        #[cfg(not(unix))]
        {
            Self {}
        }
    }

    /// Waits for SIGINT or SIGTERM and returns the signal's name.
    pub async fn recv(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            if let (Some(term), Some(int)) = (self.term.as_mut(), self.int.as_mut()) {
                return tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                };
            }
        }
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}
