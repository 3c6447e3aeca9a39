//! The shutdown signal a handler can ask for: the process is stopping, finish what is in hand.

use tokio_util::sync::CancellationToken;

/// Tells an `#[execute]` method that the process is stopping. Cheap to clone.
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
