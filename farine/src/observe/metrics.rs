//! The runtime's metrics, in Prometheus's registry (`prometheus-client`, the Prometheus
//! project's own crate: no global registry, so two runtimes in one process keep their own
//! counts, and handles resolved once per handler make a count one atomic add), exposed in the
//! text format 0.0.4 at `GET /metrics` of the health listener.
//!
//! Label values come from the program (service, handler, method and exchange names, the
//! outcomes below), never from a message: the number of series is bounded by the code.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A metric's labels: `(name, value)`, the names from the code.
type Labels = Vec<(&'static str, String)>;

type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

/// The buckets of every duration histogram, in seconds: 100 µs to 10 s.
const BUCKETS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// What the connections report at each scrape: whether all are open, and how many times they
/// were opened again after a loss.
pub(crate) type ConnectionState = Arc<dyn Fn() -> (bool, u64) + Send + Sync>;

/// The metrics of one runtime.
pub(crate) struct Metrics {
    registry: Registry,
    messages: Family<Labels, Counter>,
    handler_duration: Histograms,
    rpc_requests: Family<Labels, Counter>,
    rpc_client_duration: Histograms,
    rpc_client_errors: Family<Labels, Counter>,
    published: Family<Labels, Counter>,
    restarts: Family<Labels, Counter>,
    sse_events: Family<Labels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// The broker connections' gauge and counter, read at each scrape.
struct Connections(ConnectionState);

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Connections")
    }
}

impl Collector for Connections {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (connected, reconnects) = (self.0)();
        let gauge = ConstGauge::new(i64::from(connected));
        gauge.encode(encoder.encode_descriptor(
            "farine_amqp_connected",
            "1 while every AMQP connection of the runtime is open, else 0",
            None,
            gauge.metric_type(),
        )?)?;
        let counter = ConstCounter::new(reconnects);
        counter.encode(encoder.encode_descriptor(
            "farine_amqp_reconnects",
            "AMQP connections opened again after a loss",
            None,
            counter.metric_type(),
        )?)?;
        Ok(())
    }
}

impl Metrics {
    /// A registry with every farine metric, the process's where the platform gives them, and
    /// the connections' state read from `connections` at each scrape.
    pub fn new(connections: ConnectionState) -> Self {
        let mut registry = Registry::default();
        let messages = Family::default();
        registry.register(
            "farine_messages",
            "Messages consumed, by how each ended: ok, retry, dead, duplicate (inbox), rejected (undecodable or refused)",
            messages.clone(),
        );
        let handler_duration = Histograms::new_with_constructor(histogram);
        registry.register(
            "farine_handler_duration_seconds",
            "Duration of handler calls (consumed messages, RPC methods, SSE events, execute runs)",
            handler_duration.clone(),
        );
        let rpc_requests = Family::default();
        registry.register(
            "farine_rpc_requests",
            "RPC requests served, by outcome: ok, error",
            rpc_requests.clone(),
        );
        let rpc_client_duration = Histograms::new_with_constructor(histogram);
        registry.register(
            "farine_rpc_client_duration_seconds",
            "Duration of RPC calls made by #[rpc::client] methods, from the request to the reply",
            rpc_client_duration.clone(),
        );
        let rpc_client_errors = Family::default();
        registry.register(
            "farine_rpc_client_errors",
            "RPC calls made by #[rpc::client] methods that failed, by kind",
            rpc_client_errors.clone(),
        );
        let published = Family::default();
        registry.register(
            "farine_published",
            "Messages published by #[publish] methods, by outcome: ok, returned, nacked, error",
            published.clone(),
        );
        let restarts = Family::default();
        registry.register(
            "farine_handler_restarts",
            "Handler tasks restarted after a failure",
            restarts.clone(),
        );
        let sse_events = Family::default();
        registry.register(
            "farine_sse_events",
            "Server-Sent Events handled",
            sse_events.clone(),
        );
        registry.register_collector(Box::new(Connections(connections)));
        registry.register_collector(Box::new(super::process::Process::new()));
        Self {
            registry,
            messages,
            handler_duration,
            rpc_requests,
            rpc_client_duration,
            rpc_client_errors,
            published,
            restarts,
            sse_events,
        }
    }

    /// Every metric in the Prometheus text format 0.0.4.
    pub fn render(&self) -> String {
        let mut text = String::with_capacity(8192);
        // Writing to a String does not fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry);
        text
    }

    /// The handles of one handler, resolved once.
    pub fn handler(&self, service: &'static str, handler: &'static str) -> HandlerMetrics {
        let labels = |outcome: &'static str| {
            vec![
                ("service", service.to_string()),
                ("handler", handler.to_string()),
                ("outcome", outcome.to_string()),
            ]
        };
        let names = vec![
            ("service", service.to_string()),
            ("handler", handler.to_string()),
        ];
        HandlerMetrics {
            outcomes: MessageOutcome::ALL
                .map(|outcome| self.messages.get_or_create_owned(&labels(outcome.label()))),
            duration: self.handler_duration.get_or_create_owned(&names),
            sse_events: self.sse_events.get_or_create_owned(&names),
        }
    }

    /// The handles of one RPC server's methods, resolved once.
    pub fn rpc_method(&self, service: &'static str, method: &str) -> RpcMethodMetrics {
        let labels = |outcome: &str| {
            vec![
                ("service", service.to_string()),
                ("method", method.to_string()),
                ("outcome", outcome.to_string()),
            ]
        };
        RpcMethodMetrics {
            ok: self.rpc_requests.get_or_create_owned(&labels("ok")),
            error: self.rpc_requests.get_or_create_owned(&labels("error")),
            duration: self.handler_duration.get_or_create_owned(&vec![
                ("service", service.to_string()),
                ("handler", method.to_string()),
            ]),
        }
    }

    /// The handles of the publisher of one exchange, resolved once.
    pub fn publisher(&self, exchange: &str) -> PublishMetrics {
        let counter = |outcome: &str| {
            self.published.get_or_create_owned(&vec![
                ("exchange", exchange.to_string()),
                ("outcome", outcome.to_string()),
            ])
        };
        PublishMetrics {
            ok: counter("ok"),
            returned: counter("returned"),
            nacked: counter("nacked"),
            error: counter("error"),
        }
    }

    /// Counts a restart of a handler task.
    pub fn restarted(&self, service: &'static str, handler: &'static str) {
        self.restarts
            .get_or_create(&vec![
                ("service", service.to_string()),
                ("handler", handler.to_string()),
            ])
            .inc();
    }

    /// Records an RPC call made to `service`'s `method`: how long it took and, when it failed,
    /// the kind of failure.
    pub fn rpc_call(&self, service: &str, method: &str, took: Duration, error: Option<&str>) {
        let mut labels = vec![
            ("service", service.to_string()),
            ("method", method.to_string()),
        ];
        self.rpc_client_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        if let Some(kind) = error {
            labels.push(("kind", kind.to_string()));
            self.rpc_client_errors.get_or_create(&labels).inc();
        }
    }
}

/// How a consumed message ended, for `farine_messages_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MessageOutcome {
    Ok,
    Retry,
    Dead,
    Duplicate,
    Rejected,
}

impl MessageOutcome {
    const ALL: [MessageOutcome; 5] = [
        MessageOutcome::Ok,
        MessageOutcome::Retry,
        MessageOutcome::Dead,
        MessageOutcome::Duplicate,
        MessageOutcome::Rejected,
    ];

    pub fn label(self) -> &'static str {
        match self {
            MessageOutcome::Ok => "ok",
            MessageOutcome::Retry => "retry",
            MessageOutcome::Dead => "dead",
            MessageOutcome::Duplicate => "duplicate",
            MessageOutcome::Rejected => "rejected",
        }
    }
}

/// One handler's handles.
#[derive(Debug, Clone)]
pub(crate) struct HandlerMetrics {
    outcomes: [Counter; 5],
    duration: Histogram,
    #[cfg_attr(not(feature = "sse"), allow(dead_code))]
    sse_events: Counter,
}

impl HandlerMetrics {
    pub fn message(&self, outcome: MessageOutcome) {
        self.outcomes[outcome as usize].inc();
    }

    pub fn took(&self, took: Duration) {
        self.duration.observe(took.as_secs_f64());
    }

    #[cfg_attr(not(feature = "sse"), allow(dead_code))]
    pub fn sse_event(&self) {
        self.sse_events.inc();
    }
}

/// One RPC method's handles.
#[derive(Debug, Clone)]
pub(crate) struct RpcMethodMetrics {
    ok: Counter,
    error: Counter,
    duration: Histogram,
}

impl RpcMethodMetrics {
    pub fn served(&self, took: Duration, failed: bool) {
        self.duration.observe(took.as_secs_f64());
        if failed { &self.error } else { &self.ok }.inc();
    }
}

/// One publisher's handles.
#[derive(Debug, Clone)]
pub(crate) struct PublishMetrics {
    pub ok: Counter,
    pub returned: Counter,
    pub nacked: Counter,
    pub error: Counter,
}
