//! W3C trace context (`traceparent`, `tracestate`) across services, and a `tracing` span for
//! each handler call.
//!
//! A handler call continues the trace of what it handles: same trace id, a span id of its own,
//! the sender's span as its parent; a message without a trace starts one. While the call runs,
//! its context is the task's current one ([`current`]), so that whatever it publishes or calls
//! over RPC carries `traceparent: 00-<trace id>-<the call's span id>-<flags>` on. The ids are
//! made here (random, from the standard library's hasher keys): no OpenTelemetry SDK is needed
//! to carry a trace, and with the `otlp` feature the same spans are exported as they are.

use std::future::Future;
use std::sync::Arc;
#[cfg(feature = "otlp")]
use std::time::{Instant, SystemTime};

use tracing::Instrument;

/// The header names of the W3C Trace Context specification, as AMQP headers.
pub(crate) const TRACEPARENT: &str = "traceparent";
pub(crate) const TRACESTATE: &str = "tracestate";

/// Where a call is in a trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SpanContext {
    pub trace_id: u128,
    pub span_id: u64,
    /// The trace flags (`01`: sampled).
    pub flags: u8,
    /// The vendors' `tracestate`, carried on as it came.
    pub state: Option<Arc<str>>,
}

impl SpanContext {
    /// A new trace, sampled.
    pub fn root() -> Self {
        Self {
            trace_id: random_nonzero_u128(),
            span_id: random_nonzero_u64(),
            flags: 1,
            state: None,
        }
    }

    /// A span of the same trace, its own id.
    pub fn child(&self) -> Self {
        Self {
            trace_id: self.trace_id,
            span_id: random_nonzero_u64(),
            flags: self.flags,
            state: self.state.clone(),
        }
    }

    /// Parses a `traceparent` header (`00-<32 hex>-<16 hex>-<2 hex>`), with the `tracestate`
    /// that came with it. `None` for anything else, an all-zero id included, as the
    /// specification says (the call then starts a trace of its own). A version above `00` is
    /// read as `00` when its first four fields are there.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        let mut parts = traceparent.trim().split('-');
        let version = parts.next()?;
        let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
        if version.len() != 2
            || version.eq_ignore_ascii_case("ff")
            || (version == "00" && parts.next().is_some())
            || trace.len() != 32
            || span.len() != 16
            || flags.len() != 2
            || ![version, trace, span, flags].iter().all(|part| {
                part.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            })
        {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let span_id = u64::from_str_radix(span, 16).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        if trace_id == 0 || span_id == 0 {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            flags,
            state: tracestate
                .map(str::trim)
                .filter(|state| !state.is_empty() && state.len() <= 512)
                .map(Arc::from),
        })
    }

    /// The `traceparent` header naming this span as the parent.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

tokio::task_local! {
    static CURRENT: SpanContext;
}

/// The trace context of the handler call this task runs, when there is one.
pub(crate) fn current() -> Option<SpanContext> {
    CURRENT.try_with(Clone::clone).ok()
}

/// A random id, never zero (W3C: an all-zero id is invalid). Each `RandomState` has keys of its
/// own: a hash of nothing under new keys is a random 64-bit value.
fn random_nonzero_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    loop {
        let value = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        if value != 0 {
            return value;
        }
    }
}

fn random_nonzero_u128() -> u128 {
    (u128::from(random_nonzero_u64()) << 64) | u128::from(random_nonzero_u64())
}

/// How a call relates to its caller, for an exported span: a consumed message, a served RPC
/// request, or work of the service's own (an SSE event, an `#[execute]` run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SpanKind {
    Consumer,
    Server,
    Internal,
}

/// A runtime's tracing: whether calls carry traces and open spans (`tracing`, on by default),
/// and where finished spans go (`otlp_endpoint`, with the `otlp` feature).
#[derive(Debug, Clone, Default)]
pub(crate) struct Tracer {
    on: bool,
    #[cfg(feature = "otlp")]
    export: Option<super::otlp::Exporter>,
}

impl Tracer {
    pub fn new(on: bool) -> Self {
        Self {
            on,
            #[cfg(feature = "otlp")]
            export: None,
        }
    }

    #[cfg(feature = "otlp")]
    pub fn exporting(mut self, export: Option<super::otlp::Exporter>) -> Self {
        self.export = export;
        self
    }

    /// The span of one handler call, continuing the trace `parent` gives (that of what it
    /// handles; asked only when tracing is on) or starting one; `None` when tracing is off.
    pub fn start(
        &self,
        call: CallSpec<'_>,
        parent: impl FnOnce() -> Option<SpanContext>,
    ) -> Option<CallSpan> {
        if !self.on {
            return None;
        }
        let parent = parent();
        let context = parent
            .as_ref()
            .map_or_else(SpanContext::root, SpanContext::child);
        let span = tracing::info_span!(
            "call",
            service = call.service,
            handler = call.handler,
            kind = call.kind_name,
            queue = call.queue,
            message_id = call.message_id,
            trace_id = %format_args!("{:032x}", context.trace_id),
            span_id = %format_args!("{:016x}", context.span_id),
            outcome = tracing::field::Empty,
        );
        Some(CallSpan {
            span,
            context,
            #[cfg(feature = "otlp")]
            exporting: self.export.clone().map(|export| Exporting {
                export,
                attributes: super::otlp::Attributes::new(&call),
                parent_span_id: parent.map(|parent| parent.span_id),
                started: Instant::now(),
                started_at: SystemTime::now(),
                error: None,
            }),
        })
    }
}

/// What a call span is named after.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallSpec<'a> {
    pub service: &'static str,
    pub handler: &'static str,
    /// `consume`, `rpc`, `sse`, `execute`.
    pub kind_name: &'static str,
    #[cfg_attr(not(feature = "otlp"), allow(dead_code))]
    pub span_kind: SpanKind,
    /// The queue (or SSE endpoint) the call's input came from; empty for a run.
    pub queue: &'a str,
    pub message_id: Option<&'a str>,
}

/// The span of one handler call, open until [`CallSpan::end`].
#[derive(Debug)]
pub(crate) struct CallSpan {
    span: tracing::Span,
    context: SpanContext,
    /// What the exported span needs beside the ids, when spans are exported.
    #[cfg(feature = "otlp")]
    exporting: Option<Exporting>,
}

#[cfg(feature = "otlp")]
#[derive(Debug)]
struct Exporting {
    export: super::otlp::Exporter,
    attributes: super::otlp::Attributes,
    parent_span_id: Option<u64>,
    started: Instant,
    started_at: SystemTime,
    error: Option<String>,
}

impl CallSpan {
    /// Runs `call` inside the span, its context the task's current one.
    pub fn run<F: Future>(&self, call: F) -> impl Future<Output = F::Output> + use<F> {
        CURRENT
            .scope(self.context.clone(), call)
            .instrument(self.span.clone())
    }

    /// Notes why the call failed, for the exported span; `error` is asked only when spans are
    /// exported.
    pub fn failed(&mut self, error: impl FnOnce() -> Option<String>) {
        #[cfg(feature = "otlp")]
        if let Some(exporting) = &mut self.exporting {
            exporting.error = error();
        }
        #[cfg(not(feature = "otlp"))]
        let _ = error;
    }

    /// Ends the span with the call's outcome (`ok`, `retry`, `dead`, `error`, ...).
    pub fn end(self, outcome: &'static str) {
        self.span.record("outcome", outcome);
        #[cfg(feature = "otlp")]
        if let Some(exporting) = self.exporting {
            exporting.export.send(super::otlp::Finished {
                context: self.context,
                parent_span_id: exporting.parent_span_id,
                start: exporting.started_at,
                end: exporting.started_at + exporting.started.elapsed(),
                attributes: exporting.attributes,
                outcome,
                error: exporting.error,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_is_read_and_written_as_the_w3c_specification_says() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parsed = SpanContext::parse(text, Some("rojo=00f067aa0ba902b7")).unwrap();
        assert_eq!(parsed.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(parsed.span_id, 0x00f067aa0ba902b7);
        assert_eq!(parsed.flags, 1);
        assert_eq!(parsed.state.as_deref(), Some("rojo=00f067aa0ba902b7"));
        assert_eq!(parsed.traceparent(), text);
        let child = parsed.child();
        assert_eq!(child.trace_id, parsed.trace_id);
        assert_ne!(child.span_id, parsed.span_id);
        assert_eq!(child.state, parsed.state);
        // A later version with more fields is read as version 00.
        assert!(SpanContext::parse(&format!("01{}-extra", &text[2..]), None).is_some());
    }

    #[test]
    fn a_malformed_or_all_zero_traceparent_is_ignored() {
        for bad in [
            "",
            "00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bg-01",
        ] {
            assert_eq!(SpanContext::parse(bad, None), None, "{bad}");
        }
    }

    #[test]
    fn roots_are_distinct_and_never_zero() {
        let (a, b) = (SpanContext::root(), SpanContext::root());
        assert_ne!(a.trace_id, b.trace_id);
        assert_ne!(a.span_id, b.span_id);
        assert!(a.trace_id != 0 && a.span_id != 0);
    }
}
