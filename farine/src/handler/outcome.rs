//! How a handler call ended, whatever the handler kind: what the generated code reports and
//! what each kind turns into an ack, a reply, a retry or a failed run.

use std::fmt::Display;

use crate::decode::DecodeError;

/// How a handler call ended: what the generated code reports, and what a layer sees and may
/// return instead (`farine::layer`).
#[derive(Debug)]
#[non_exhaustive]
pub enum Outcome {
    /// It succeeded: the message is acked, the event done, the run over.
    Done,
    /// It failed with this error: retried, or dead-lettered after the last attempt.
    Failed(String),
    /// The body (or event data) does not decode into the handler's type.
    Undecodable(DecodeError),
    /// The call was refused, with this reason: by an extractor (`FromCall` returned a
    /// `Rejection`; the handler did not run) or by a layer. Running it again would not help: a
    /// message goes to the dead-letter queue at once, an event is skipped, an RPC call gets an
    /// error reply.
    Rejected(String),
}

impl Outcome {
    /// Why the call did not succeed; `None` when it did.
    pub(crate) fn error(&self) -> Option<String> {
        match self {
            Outcome::Done => None,
            Outcome::Failed(text) | Outcome::Rejected(text) => Some(text.clone()),
            Outcome::Undecodable(error) => Some(error.to_string()),
        }
    }

    /// Records this outcome of a call that started at `started`, what an SSE event's or an
    /// `#[execute]` run's call ends with: its duration, and the end of its span (`ok`, or
    /// `error` with the reason). A consumed message's ends after its settlement instead.
    pub(crate) fn observed(
        &self,
        observer: &crate::observe::Observer,
        started: std::time::Instant,
        span: Option<crate::observe::trace::CallSpan>,
    ) {
        if let Some(metrics) = &observer.metrics {
            metrics.took(started.elapsed());
        }
        if let Some(mut span) = span {
            span.failed(|| self.error());
            span.end(match self {
                Outcome::Done => "ok",
                _ => "error",
            });
        }
    }
}

/// What a `#[consume]` handler may return: `()` or `Result<(), E>` with a displayable `E`.
#[diagnostic::on_unimplemented(
    message = "a #[consume] handler returns `Result<(), E>` with E: Display, or nothing; `{Self}` is neither",
    label = "Ok acks the message, Err retries it: return `Result<(), E>` where E: Display"
)]
pub trait IntoOutcome {
    fn into_outcome(self) -> Outcome;
}

impl IntoOutcome for () {
    fn into_outcome(self) -> Outcome {
        Outcome::Done
    }
}

impl<E: Display> IntoOutcome for Result<(), E> {
    fn into_outcome(self) -> Outcome {
        match self {
            Ok(()) => Outcome::Done,
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }
}

/// The text of a panic payload (`panic!("...")` gives a `&str` or a `String`).
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_string()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic with a non-text payload".to_string()
    }
}
