//! The shutdown signal a handler can ask for: the process is stopping, finish what is in hand.

use tokio_util::sync::CancellationToken;

/// Tells a handler that the process is stopping: take it as a parameter (any handler kind), or
/// ask [`Shutdown::current`] during a call. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    token: CancellationToken,
}

impl Shutdown {
    /// A shutdown signal of its own (tests; call [`Shutdown::trigger`] to fire it).
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn from_token(token: CancellationToken) -> Self {
        Self { token }
    }

    /// The signal of the runtime the current handler call runs in (outside a call, one that
    /// never fires).
    pub fn current() -> Self {
        super::CallScope::current_shutdown()
            .map(Self::from_token)
            .unwrap_or_default()
    }

    /// Waits until the process is stopping.
    pub async fn cancelled(&self) {
        self.token.cancelled().await;
    }

    /// True once the process is stopping.
    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Fires the signal.
    pub fn trigger(&self) {
        self.token.cancel();
    }
}
