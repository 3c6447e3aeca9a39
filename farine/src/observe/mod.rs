//! What a service shows the people who run it: Prometheus metrics (`metrics`), W3C trace context
//! carried across services with a `tracing` span per handler call (`trace`), and, with the
//! `otlp` feature, those spans exported over OTLP (`otlp`). A floor layer: it knows nothing of
//! AMQP, handlers or the runtime; they call into it (`docs/observability.md`).

pub(crate) mod metrics;
#[cfg(feature = "otlp")]
pub(crate) mod otlp;
mod process;
pub(crate) mod trace;

use metrics::HandlerMetrics;
pub(crate) use metrics::Metrics;

/// What a runtime observes of its handlers: the metrics (`metrics = true`, the default) and
/// the tracer (`tracing = true`, the default).
#[derive(Debug, Clone, Default)]
pub(crate) struct Observe {
    pub metrics: Option<std::sync::Arc<Metrics>>,
    pub tracer: trace::Tracer,
}

impl Observe {
    /// What the calls of `service`'s `handler` are observed with.
    pub fn handler(&self, service: &'static str, handler: &'static str) -> Observer {
        Observer {
            metrics: self
                .metrics
                .as_ref()
                .map(|metrics| metrics.handler(service, handler)),
            tracer: self.tracer.clone(),
        }
    }
}

/// What one handler's calls are observed with: its metrics, when the runtime keeps them, and
/// the runtime's tracer.
#[derive(Debug, Clone, Default)]
pub(crate) struct Observer {
    pub metrics: Option<HandlerMetrics>,
    pub tracer: trace::Tracer,
}
