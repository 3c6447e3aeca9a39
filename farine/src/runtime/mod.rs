//! The runtime: from a [`Config`] and the registered services to supervised handler tasks.
//!
//! [`Runtime::start`] plans every enabled service from its section (`plan`: a disabled service
//! is skipped and the log says so; whatever the config gets wrong is refused before anything is
//! opened), then opens, in order (`running`): one AMQP connection per broker URI (one per
//! process in the usual case, named after the services it carries), the publishers and RPC
//! clients of `#[publish]` and `#[rpc::client]` methods, one pool per database, and one
//! supervised task per handler, each built by its kind (`consume`, the RPC server, `sse`,
//! `execute`) and spawned through the same path. It returns once every handler runs, or with
//! the first error, after closing whatever it had opened. [`Running::stop`] drains and closes.

pub(crate) mod check;
pub(crate) mod context;
mod health;
mod plan;
mod running;
pub(crate) mod shutdown;
pub(crate) mod supervisor;

use std::sync::Arc;

use crate::amqp::connection::{ConnectError, Connector};
use crate::amqp::publisher::PublishError;
use crate::config::{Config, ConfigError};
use crate::handler::{Layer, Layers};
use plan::ServicePlan;

pub(crate) use plan::connector_settings;
pub use running::{RunError, Running};
pub use supervisor::ServiceFailed;

/// The most `worker_threads` farine starts (each is an OS thread with its own run queue).
const MAX_WORKER_THREADS: usize = 1024;

/// The broker farine connects to when no `amqp_uri` is configured.
pub const DEFAULT_AMQP_URI: &str = "amqp://guest:guest@127.0.0.1:5672";

/// Why the runtime could not start. Never contains a password.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("no service to start: {0}")]
    NothingToStart(String),
    #[error("{0}")]
    UnknownHandler(String),
    #[error("service `{service}` could not be built: {cause}")]
    Build { service: String, cause: String },
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("service `{service}`, publisher `{method}`: {source}")]
    Publisher {
        service: String,
        method: String,
        #[source]
        source: Box<PublishError>,
    },
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Database(#[from] crate::db::DbError),
    #[error("database {database}: {cause}")]
    Migrations { database: String, cause: String },
    #[error("cannot serve the health endpoint on {addr} (health_addr): {cause}")]
    Health {
        addr: std::net::SocketAddr,
        cause: String,
    },
    #[error("service `{service}`, handler `{handler}` could not start: {cause}")]
    Handler {
        service: String,
        handler: String,
        cause: String,
    },
}

impl StartError {
    /// True for errors in the configuration (the CLI exits with its config error code),
    /// including any error from a service's `init` function, which builds it from its section.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            StartError::Config(_)
                | StartError::NothingToStart(_)
                | StartError::Conflict(_)
                | StartError::UnknownHandler(_)
                | StartError::Build { .. }
        )
    }
}

/// Where a `#[consume]` handler's dead letters are: its queue, its dead-letter queue, and the
/// broker (`amqp_uri`, connection settings) of its service.
#[derive(Debug, Clone)]
pub(crate) struct DeadLetterQueues {
    pub service: String,
    pub handler: String,
    pub queue: String,
    pub dead_letter_queue: String,
    pub amqp_uri: String,
    pub connector: crate::amqp::connection::ConnectorSettings,
}

/// A runtime to be started.
pub struct Runtime {
    config: Config,
    module: String,
    only: Option<Vec<String>>,
    migrations: &'static [crate::db::EmbeddedMigration],
    layers: Vec<Arc<dyn Layer>>,
}

impl Runtime {
    /// A runtime for every service linked into this binary.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            module: crate::amqp::connection::program_name(),
            only: None,
            migrations: &[],
            layers: Vec::new(),
        }
    }

    /// The migrations to apply at start to each database the services use (what
    /// `farine::main!()` embeds from the package's `migrations/` folder).
    pub fn migrations(mut self, migrations: &'static [crate::db::EmbeddedMigration]) -> Self {
        self.migrations = migrations;
        self
    }

    /// Puts `layer` around every handler call and send of the runtime's services, inside the
    /// layers added before it (`farine::layer`).
    pub fn layer(self, layer: impl Layer) -> Self {
        self.layer_arc(Arc::new(layer))
    }

    /// [`Runtime::layer`] with a layer already shared.
    pub fn layer_arc(mut self, layer: Arc<dyn Layer>) -> Self {
        self.layers.push(layer);
        self
    }

    /// Names the module (the package) in the connection name; by default the program's name.
    pub fn module(mut self, module: impl Into<String>) -> Self {
        self.module = module.into();
        self
    }

    /// Starts only the services with these names (default: every registered service).
    pub fn services<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.only = Some(names.into_iter().map(Into::into).collect());
        self
    }

    fn plan(&self) -> Result<Vec<ServicePlan>, StartError> {
        plan::plan(&self.config, &self.module, self.only.as_deref())
    }

    /// What `--check` does: validates the config (every service's section, as start-up would;
    /// a key farine does not read is an error here, a warning at start), then opens a connection to each broker node and each database the services use and
    /// measures it. Returns one line per check and whether all passed. Nothing is declared
    /// and no message is consumed.
    pub async fn check(self) -> (bool, Vec<String>) {
        let plans = match self.plan() {
            Ok(plans) => plans,
            Err(e) => return (false, vec![format!("config {}: {e}", self.config.file())]),
        };
        let names: Vec<_> = plans.iter().map(|p| p.entry.name).collect();
        // A misspelt key is a warning at start and an error here.
        let unknown = plan::unknown_keys(&self.config, self.only.as_deref());
        if !unknown.is_empty() {
            return (
                false,
                unknown.into_iter().map(|u| format!("config {u}")).collect(),
            );
        }
        let mut lines = vec![format!(
            "config {}: ok (services: {})",
            self.config.file(),
            names.join(", ")
        )];
        let targets = plans
            .iter()
            .map(|plan| check::Target {
                amqp_uri: plan.amqp_uri.clone(),
                connector: plan.connector.clone(),
                db: plan.db.clone(),
            })
            .collect();
        let (ok, more) = check::connections(&self.module, targets).await;
        lines.extend(more);
        (ok, lines)
    }

    /// What `farine dead-letters replay service.handler` does: moves the messages now in the
    /// handler's dead-letter queue back to its queue, with a fresh attempt count. Returns how
    /// many moved, and the two queues.
    pub async fn replay_dead_letters(
        self,
        target: &str,
    ) -> Result<(u64, String, String), StartError> {
        let found = self.dead_letter_queues(target)?;
        let connector = Connector::with_settings(
            found.amqp_uri.clone(),
            crate::amqp::connection::connection_name(&self.module, "replay of dead letters"),
            found.connector.clone(),
        );
        let moved = crate::amqp::dead_letter::replay(
            &connector,
            &found.dead_letter_queue,
            &found.queue,
            None,
        )
        .await
        .map_err(|e| StartError::Handler {
            service: found.service.clone(),
            handler: found.handler.clone(),
            cause: e.to_string(),
        });
        connector.close().await;
        Ok((moved?, found.dead_letter_queue, found.queue))
    }

    /// The queue and dead-letter queue of `#[consume]` handler `target` (`service.handler`, or
    /// `handler` alone in a binary of one service) as the config resolves them, and the broker
    /// they are on. A config error when no such handler is planned (the error lists those
    /// there are) or it has no dead-letter queue (`dead_letter_queue = none`).
    pub(crate) fn dead_letter_queues(&self, target: &str) -> Result<DeadLetterQueues, StartError> {
        let plans = self.plan()?;
        let found = plans.iter().find_map(|plan| {
            plan.consumers().find_map(|consumer| {
                let name = format!("{}.{}", consumer.service, consumer.handler);
                (name == target || (plans.len() == 1 && consumer.handler == target))
                    .then_some((plan, consumer))
            })
        });
        let Some((plan, consumer)) = found else {
            let known: Vec<_> = plans
                .iter()
                .flat_map(ServicePlan::consumers)
                .map(|c| format!("{}.{}", c.service, c.handler))
                .collect();
            return Err(StartError::UnknownHandler(format!(
                "no #[consume] handler `{target}` (there are: {})",
                known.join(", ")
            )));
        };
        let Some(dead) = &consumer.dead_letter_queue else {
            return Err(StartError::UnknownHandler(format!(
                "handler `{target}` has no farine dead-letter queue (dead_letter_queue = none)"
            )));
        };
        Ok(DeadLetterQueues {
            service: consumer.service.to_string(),
            handler: consumer.handler.to_string(),
            queue: consumer.queue.name.clone(),
            dead_letter_queue: dead.name.clone(),
            amqp_uri: plan.amqp_uri.clone(),
            connector: plan.connector.clone(),
        })
    }

    /// Starts every enabled service; returns once every handler runs (consuming, serving,
    /// listening, executing). A start that fails part-way closes what it had opened
    /// (connections, publishers, pools, tasks) before it returns the error.
    pub async fn start(self) -> Result<Running, StartError> {
        let plans = self.plan()?;
        for unknown in plan::unknown_keys(&self.config, self.only.as_deref()) {
            tracing::warn!("{unknown}");
        }
        let mut running = Running::new();
        let layers = Layers::new(self.layers);
        match running
            .open(&self.module, self.migrations, layers, plans)
            .await
        {
            Ok(()) => Ok(running),
            Err(error) => {
                running.stop().await;
                Err(error)
            }
        }
    }
}

/// The tokio runtime a service binary runs on, from the config: `runtime = multi_thread` (the
/// default; `worker_threads` threads, default one per core) or `current_thread` (every task on
/// the main thread: no cross-thread wake-ups, the lowest latency for a service that a single core
/// serves). Read from the section of each service of the binary that has one (so `[DEFAULT]`
/// applies); two services that ask for different runtimes are a config error.
///
/// Returns the builder and how it was chosen, for the log (`current_thread`,
/// `multi_thread, 4 worker threads`).
pub fn tokio_builder(config: &Config) -> Result<(tokio::runtime::Builder, String), StartError> {
    let mut chosen: Option<(&'static str, String, Option<std::num::NonZeroUsize>)> = None;
    for entry in crate::registry::ServiceEntry::all() {
        let Ok(section) = entry.section(config) else {
            continue;
        };
        // A disabled service does not run: it has no say.
        if !section.get_or("enabled", true)? {
            continue;
        }
        let kind = section
            .get_str("runtime")?
            .map(|text| text.trim().to_ascii_lowercase())
            .unwrap_or_else(|| "multi_thread".to_string());
        if kind != "multi_thread" && kind != "current_thread" {
            return Err(section
                .invalid("runtime", &kind, "multi_thread or current_thread")
                .into());
        }
        let threads = section.get::<std::num::NonZeroUsize>("worker_threads")?;
        if let Some(n) = threads.filter(|n| n.get() > MAX_WORKER_THREADS) {
            return Err(section
                .invalid(
                    "worker_threads",
                    &n.to_string(),
                    format!("a whole number from 1 to {MAX_WORKER_THREADS}"),
                )
                .into());
        }
        if threads.is_some() && kind == "current_thread" {
            return Err(section
                .invalid(
                    "worker_threads",
                    &threads.map(|n| n.to_string()).unwrap_or_default(),
                    "no value with runtime = current_thread (it runs on one thread)",
                )
                .into());
        }
        match &chosen {
            Some((other, other_kind, other_threads))
                if *other_kind != kind || *other_threads != threads =>
            {
                return Err(StartError::Conflict(format!(
                    "services `{other}` and `{}` of one process ask for different runtimes ({other_kind}{} and {kind}{}): set `runtime` and `worker_threads` once, in [DEFAULT]",
                    entry.name,
                    other_threads
                        .map(|n| format!(", {n} threads"))
                        .unwrap_or_default(),
                    threads
                        .map(|n| format!(", {n} threads"))
                        .unwrap_or_default(),
                )));
            }
            Some(_) => {}
            None => chosen = Some((entry.name, kind, threads)),
        }
    }
    let mut builder = match &chosen {
        Some((_, kind, _)) if kind == "current_thread" => {
            tokio::runtime::Builder::new_current_thread()
        }
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let mut described = chosen
        .as_ref()
        .map_or_else(|| "multi_thread".to_string(), |(_, kind, _)| kind.clone());
    if let Some((_, _, Some(threads))) = chosen {
        builder.worker_threads(threads.get());
        described.push_str(&format!(", {threads} worker threads"));
    }
    builder.enable_all();
    Ok((builder, described))
}
