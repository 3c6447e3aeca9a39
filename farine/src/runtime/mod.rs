//! The runtime: from a [`Config`] and the registered services to supervised handler tasks.
//!
//! [`Runtime::start`] reads each service's section (a disabled service is skipped and the log
//! says so), builds the service, opens one AMQP connection per broker URI (one per process in
//! the usual case, named after the services it carries), prepares every `#[publish]` method's
//! publisher, and starts one supervised task per `#[consume]` handler. It returns once every
//! handler is consuming, or with the first error. [`Running::stop`] drains and closes.

pub mod check;
pub(crate) mod context;
mod health;
pub mod shutdown;
pub(crate) mod supervisor;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::amqp::connection::{ConnectError, Connector, ConnectorSettings};
use crate::amqp::consuming::ConsumeError;
use crate::amqp::publisher::{PublishError, Publisher, PublisherSettings};
use crate::amqp::topology::ExchangeSettings;
use crate::config::{Config, ConfigError, Section};
use crate::consume::{self as consumer, ConsumerPlan};
use crate::db::DbSettings;
use crate::db::checkpoint::Checkpoint;
use crate::execute::{self, BoundExecute, ExecutePlan};
use crate::handler::Ready;
use crate::registry::{BoundConsumer, HandlerInfo, ServiceEntry};
use crate::rpc::Client;
use crate::rpc::server::{self as rpc_server, BoundRpc, RpcServerPlan};
use crate::sse::{self, BoundSse, Position, SsePlan};
use context::Shared;
use supervisor::{Policy, ServiceFailed, TaskError};

/// The broker farine connects to when no `amqp_uri` is configured.
pub const DEFAULT_AMQP_URI: &str = "amqp://guest:guest@127.0.0.1:5672";

/// Why the runtime could not start. Never contains a password.
#[derive(Debug, thiserror::Error)]
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

/// A runtime to be started.
pub struct Runtime {
    config: Config,
    module: String,
    only: Option<Vec<String>>,
    migrations: &'static [crate::db::EmbeddedMigration],
}

struct ServicePlan {
    entry: &'static ServiceEntry,
    consumers: Vec<(BoundConsumer, ConsumerPlan)>,
    rpc: Option<(RpcServerPlan, Vec<(&'static str, BoundRpc)>)>,
    publishers: Vec<(&'static str, ExchangeSettings, String, PublisherSettings)>,
    rpc_clients: Vec<(&'static str, &'static str, Duration)>,
    executes: Vec<(BoundExecute, ExecutePlan)>,
    listeners: Vec<(BoundSse, SsePlan)>,
    /// The restart policy of each handler task, by handler name (`rpc` for the RPC server).
    policies: std::collections::HashMap<&'static str, Policy>,
    db: Option<DbSettings>,
    amqp_uri: String,
    connector: ConnectorSettings,
    /// `health_addr`: where liveness and readiness are served over HTTP.
    health_addr: Option<std::net::SocketAddr>,
}

impl Runtime {
    /// A runtime for every service linked into this binary.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            module: env!("CARGO_PKG_NAME").to_string(),
            only: None,
            migrations: &[],
        }
    }

    /// The migrations to apply at start to each database the services use (what
    /// `farine::main!()` embeds from the package's `migrations/` folder).
    pub fn migrations(mut self, migrations: &'static [crate::db::EmbeddedMigration]) -> Self {
        self.migrations = migrations;
        self
    }

    /// Names the module (the package) in the connection name.
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
        let entries: Vec<_> = ServiceEntry::all()
            .into_iter()
            .filter(|entry| {
                self.only
                    .as_ref()
                    .is_none_or(|only| only.iter().any(|name| name == entry.name))
            })
            .collect();
        if let Some(only) = &self.only
            && let Some(missing) = only
                .iter()
                .find(|name| !entries.iter().any(|entry| entry.name == name.as_str()))
        {
            let known: Vec<_> = ServiceEntry::all().iter().map(|e| e.name).collect();
            return Err(StartError::NothingToStart(format!(
                "no service named `{missing}` in this binary (it has: {})",
                known.join(", ")
            )));
        }
        if let Some(pair) = entries.windows(2).find(|pair| pair[0].name == pair[1].name) {
            return Err(StartError::Conflict(format!(
                "two services are named `{}` ({} in {} and {} in {}): rename one with #[farine::service(name = \"...\")]",
                pair[0].name,
                pair[0].type_name,
                pair[0].module_path,
                pair[1].type_name,
                pair[1].module_path
            )));
        }
        let mut plans = Vec::new();
        for entry in entries {
            let section = self.config.section(entry.name)?;
            if !section.get_or("enabled", true)? {
                tracing::info!(
                    service = entry.name,
                    "service is disabled in the config (enabled = false); not started"
                );
                continue;
            }
            plans.push(plan_service(entry, &section)?);
        }
        let mut queues: BTreeMap<&str, (&str, &str)> = BTreeMap::new();
        for plan in &plans {
            let rpc_queue = plan
                .rpc
                .iter()
                .map(|(rpc, _)| (&rpc.queue.name, (rpc.service, "rpc")));
            let consumer_queues = plan
                .consumers
                .iter()
                .map(|(_, c)| (&c.queue.name, (c.service, c.handler)));
            for (queue, owner) in consumer_queues.chain(rpc_queue) {
                let consumer_queue = queue;
                if let Some((service, handler)) = queues.insert(consumer_queue, owner) {
                    return Err(StartError::Conflict(format!(
                        "handlers `{service}.{handler}` and `{}.{}` would consume the same queue `{}` and take each other's messages: give one another `<handler>.queue`",
                        owner.0, owner.1, consumer_queue
                    )));
                }
            }
        }
        if plans.is_empty() {
            return Err(StartError::NothingToStart(format!(
                "every service of module `{}` is disabled in {}",
                self.module,
                self.config.file()
            )));
        }
        Ok(plans)
    }

    /// What `--check` does: validates the config (every service's section, as start-up would),
    /// then opens a connection to each broker node and each database the services use and
    /// measures it. Returns one line per check and whether all passed. Nothing is declared
    /// and no message is consumed.
    pub async fn check(self) -> (bool, Vec<String>) {
        let plans = match self.plan() {
            Ok(plans) => plans,
            Err(e) => return (false, vec![format!("config {}: {e}", self.config.file())]),
        };
        let names: Vec<_> = plans.iter().map(|p| p.entry.name).collect();
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

    /// What `--replay-dead-letters service.handler` does: moves the messages now in the
    /// handler's dead-letter queue back to its queue, with a fresh attempt count. Returns how
    /// many moved, and the two queues.
    pub async fn replay_dead_letters(
        self,
        target: &str,
    ) -> Result<(u64, String, String), StartError> {
        let plans = self.plan()?;
        let found = plans.iter().find_map(|plan| {
            plan.consumers.iter().find_map(|(_, consumer)| {
                let name = format!("{}.{}", consumer.service, consumer.handler);
                (name == target || (plans.len() == 1 && consumer.handler == target))
                    .then_some((plan, consumer))
            })
        });
        let Some((plan, consumer)) = found else {
            let known: Vec<_> = plans
                .iter()
                .flat_map(|plan| plan.consumers.iter())
                .map(|(_, c)| format!("{}.{}", c.service, c.handler))
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
        let connector = Connector::with_settings(
            plan.amqp_uri.clone(),
            format!("farine {} replay (pid {})", self.module, std::process::id()),
            plan.connector.clone(),
        );
        let moved = crate::amqp::dead_letter::replay(&connector, &dead.name, &consumer.queue.name)
            .await
            .map_err(|e| StartError::Handler {
                service: consumer.service.to_string(),
                handler: consumer.handler.to_string(),
                cause: e.to_string(),
            })?;
        connector.close().await;
        Ok((moved, dead.name.clone(), consumer.queue.name.clone()))
    }

    /// Starts every enabled service; returns once all handlers are consuming.
    pub async fn start(self) -> Result<Running, StartError> {
        let plans = self.plan()?;

        // One connection per broker URI, named after the services it carries.
        // (The first service of a URI gives its connection settings, but the longest timeout.)
        let mut by_uri: BTreeMap<String, (Vec<&'static str>, ConnectorSettings)> = BTreeMap::new();
        for plan in &plans {
            let slot = by_uri
                .entry(plan.amqp_uri.clone())
                .or_insert((Vec::new(), plan.connector.clone()));
            slot.0.push(plan.entry.name);
            slot.1.connect_timeout = slot.1.connect_timeout.max(plan.connector.connect_timeout);
        }
        let mut connectors = BTreeMap::new();
        for (uri, (services, settings)) in by_uri {
            let name = format!(
                "farine {}: {} (pid {})",
                self.module,
                services.join(", "),
                std::process::id()
            );
            let connector = Arc::new(Connector::with_settings(uri.clone(), name, settings));
            connector.connection().await?;
            connectors.insert(uri, connector);
        }

        let mut shared = Shared::default();
        for plan in &plans {
            let connector = connectors[&plan.amqp_uri].clone();
            for (method, exchange, routing_key, settings) in &plan.publishers {
                let publisher = Publisher::new(
                    connector.clone(),
                    exchange.clone(),
                    routing_key.clone(),
                    settings.clone(),
                );
                publisher
                    .prepare()
                    .await
                    .map_err(|source| StartError::Publisher {
                        service: plan.entry.name.to_string(),
                        method: method.to_string(),
                        source: Box::new(source),
                    })?;
                shared
                    .publishers
                    .insert((plan.entry.name, *method), publisher);
            }
            for (method, target, timeout) in &plan.rpc_clients {
                let client = Client::new(connector.clone(), *target, *timeout);
                shared
                    .rpc_clients
                    .insert((plan.entry.name, *method), client);
            }
        }
        let shared = Arc::new(shared);
        context::install(&shared);
        let scope = context::scope(&shared);

        // One pool per database; the connection is checked now, so a wrong password stops
        // start-up here with a message naming host, port, database and user.
        let mut pools: BTreeMap<String, crate::db::PgPool> = BTreeMap::new();
        for plan in &plans {
            if let Some(db) = &plan.db
                && !pools.contains_key(&db.describe())
            {
                let pool = db.connect().await?;
                tracing::info!(database = %db.describe(), "connected to PostgreSQL");
                if !self.migrations.is_empty() {
                    crate::db::migrate(&pool, self.migrations)
                        .await
                        .map_err(|e| StartError::Migrations {
                            database: db.describe(),
                            cause: e.to_string(),
                        })?;
                    tracing::info!(database = %db.describe(), migrations = self.migrations.len(), "migrations applied");
                }
                pools.insert(db.describe(), pool);
            }
            // The inbox table, where a service of this database asks for it.
            if let Some(db) = &plan.db
                && plan.consumers.iter().any(|(_, c)| c.inbox)
            {
                crate::db::call::create_inbox(&pools[&db.describe()])
                    .await
                    .map_err(|e| StartError::Migrations {
                        database: db.describe(),
                        cause: format!("cannot create farine_inbox: {e}"),
                    })?;
            }
        }

        let shutdown = CancellationToken::new();
        let (failed, failures) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = JoinSet::new();
        let mut pending = Vec::new();
        let mut health_handlers = Vec::new();
        let health_addrs: std::collections::BTreeSet<std::net::SocketAddr> =
            plans.iter().filter_map(|plan| plan.health_addr).collect();
        let mut stop_bound = Duration::ZERO;
        for mut plan in plans {
            let connector = connectors[&plan.amqp_uri].clone();
            if let Some(db) = &plan.db {
                let pool = pools[&db.describe()].clone();
                let call_db = |transaction: bool, inbox: Option<crate::db::call::Inbox>| {
                    Some(Arc::new(crate::db::call::CallDb {
                        pool: pool.clone(),
                        transaction,
                        inbox,
                    }))
                };
                for (_, consumer) in &mut plan.consumers {
                    let inbox = consumer.inbox.then_some(crate::db::call::Inbox {
                        service: consumer.service,
                        handler: consumer.handler,
                    });
                    consumer.db = call_db(consumer.transaction, inbox);
                }
                for (_, execute) in &mut plan.executes {
                    execute.db = call_db(execute.transaction, None);
                }
                for (_, listener) in &mut plan.listeners {
                    listener.db = call_db(listener.transaction, None);
                }
                if let Some((rpc, _)) = &mut plan.rpc {
                    rpc.db = call_db(false, None);
                }
            }
            let policy = |handler: &str| plan.policies.get(handler).copied();
            let mut spawn = |service: &'static str, handler: &'static str, task: TaskFactory| {
                let (ready, started) = Ready::new();
                let Some(policy) = policy(handler) else {
                    return;
                };
                tasks.spawn(supervisor::supervise(
                    service,
                    handler,
                    policy,
                    shutdown.clone(),
                    ready.clone(),
                    failed.clone(),
                    task,
                ));
                health_handlers.push((service, handler, ready));
                pending.push((service, handler, started));
            };
            let token = shutdown.clone();
            if let Some((rpc_plan, methods)) = plan.rpc {
                let service = rpc_plan.service;
                let handlers = plan.entry.handlers();
                let methods: Vec<rpc_server::Method> = methods
                    .into_iter()
                    .map(|(name, call)| rpc_server::Method {
                        routing_key: crate::rpc::wire::routing_key(service, name),
                        name,
                        call,
                        streams: handlers.iter().any(|info| {
                            matches!(info, HandlerInfo::Rpc { name: n, spec } if *n == name && spec.stream)
                        }),
                    })
                    .collect();
                stop_bound = stop_bound.max(rpc_plan.drain_timeout + rpc_plan.op_timeout * 3);
                let (methods, rpc_plan) = (Arc::new(methods), Arc::new(rpc_plan));
                let (connector, scope, token) = (connector.clone(), scope.clone(), token.clone());
                spawn(
                    service,
                    "rpc",
                    Box::new(move |ready| {
                        let run = rpc_server::run(
                            rpc_plan.clone(),
                            connector.clone(),
                            methods.clone(),
                            scope.clone(),
                            token.clone(),
                            ready,
                        );
                        let connector = connector.clone();
                        Box::pin(
                            async move { run.await.map_err(|e| consume_failure(e, &connector)) },
                        )
                    }),
                );
            }
            for (bound, consumer_plan) in plan.consumers {
                stop_bound =
                    stop_bound.max(consumer_plan.drain_timeout + consumer_plan.op_timeout * 3);
                let consumer_plan = Arc::new(consumer_plan);
                let (service, handler) = (consumer_plan.service, consumer_plan.handler);
                let (connector, scope, token) = (connector.clone(), scope.clone(), token.clone());
                let call = bound.call;
                spawn(
                    service,
                    handler,
                    Box::new(move |ready| {
                        let run = consumer::run(
                            consumer_plan.clone(),
                            connector.clone(),
                            call.clone(),
                            scope.clone(),
                            token.clone(),
                            ready,
                        );
                        let connector = connector.clone();
                        Box::pin(
                            async move { run.await.map_err(|e| consume_failure(e, &connector)) },
                        )
                    }),
                );
            }
            for (call, execute_plan) in plan.executes {
                stop_bound = stop_bound.max(execute_plan.drain_timeout + Duration::from_secs(1));
                let execute_plan = Arc::new(execute_plan);
                let (service, handler) = (execute_plan.service, execute_plan.handler);
                let (connector, scope, token) = (connector.clone(), scope.clone(), token.clone());
                spawn(
                    service,
                    handler,
                    Box::new(move |ready| {
                        let connector = connector.clone();
                        let run = execute::run(
                            execute_plan.clone(),
                            call.clone(),
                            scope.clone(),
                            token.clone(),
                            ready,
                        );
                        // A run that failed while the broker was away (a publish that timed out)
                        // is the outage's doing, not the handler's.
                        Box::pin(async move {
                            run.await
                                .map_err(|e| TaskError::new(e, !connector.is_connected()))
                        })
                    }),
                );
            }
            for (call, sse_plan) in plan.listeners {
                let checkpoint = match (&plan.db, sse_plan.use_checkpoint) {
                    (Some(db), true) => {
                        let pool = pools[&db.describe()].clone();
                        let opened = Checkpoint::open(pool, sse_plan.service, sse_plan.handler)
                            .await
                            .map_err(|e| StartError::Handler {
                                service: sse_plan.service.to_string(),
                                handler: sse_plan.handler.to_string(),
                                cause: format!("cannot prepare the checkpoint table: {e}"),
                            })?;
                        Some(opened)
                    }
                    _ => None,
                };
                // A listener finishes the event in hand: give it a drain like the other handlers.
                stop_bound = stop_bound.max(Duration::from_secs(30));
                let position = Position::new(checkpoint);
                let sse_plan = Arc::new(sse_plan);
                let (service, handler) = (sse_plan.service, sse_plan.handler);
                let (connector, scope, token) = (connector.clone(), scope.clone(), token.clone());
                spawn(
                    service,
                    handler,
                    Box::new(move |ready| {
                        let connector = connector.clone();
                        let run = sse::run(
                            sse_plan.clone(),
                            call.clone(),
                            position.clone(),
                            scope.clone(),
                            token.clone(),
                            ready,
                        );
                        // A run that failed while the broker was away (a publish that timed out)
                        // is the outage's doing, not the handler's.
                        Box::pin(async move {
                            run.await
                                .map_err(|e| TaskError::new(e, !connector.is_connected()))
                        })
                    }),
                );
            }
        }
        stop_bound += Duration::from_secs(1);

        let connectors: Vec<Arc<Connector>> = connectors.into_values().collect();
        let health = Arc::new(health::Health {
            handlers: health_handlers,
            connectors: connectors.clone(),
        });
        for addr in health_addrs {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => {
                    tracing::info!(%addr, "health endpoint: GET /live, GET /ready");
                    tasks.spawn(health::serve(listener, health.clone(), shutdown.clone()));
                }
                Err(e) => {
                    shutdown.cancel();
                    tasks.shutdown().await;
                    for connector in &connectors {
                        connector.close().await;
                    }
                    return Err(StartError::Health {
                        addr,
                        cause: e.to_string(),
                    });
                }
            }
        }
        let running = Running {
            shutdown,
            tasks,
            shared,
            connectors,
            health,
            stop_bound,
            failures,
        };
        for (service, handler, started) in pending {
            let failure = match started.await {
                Ok(Ok(())) => continue,
                Ok(Err(cause)) => cause,
                Err(_) => "the task stopped before it started".to_string(),
            };
            running.stop().await;
            return Err(StartError::Handler {
                service: service.to_string(),
                handler: handler.to_string(),
                cause: failure,
            });
        }
        Ok(running)
    }
}

fn plan_service(
    entry: &'static ServiceEntry,
    section: &Section,
) -> Result<ServicePlan, StartError> {
    let amqp_uri = section
        .get_str("amqp_uri")?
        .unwrap_or_else(|| DEFAULT_AMQP_URI.to_string());
    if let Err(cause) = crate::amqp::connection::parse_nodes(&amqp_uri) {
        return Err(StartError::Config(section.invalid(
            "amqp_uri",
            &amqp_uri,
            format!("amqp://user:password@host:port/vhost (or amqps://), several separated by commas: {cause}"),
        )));
    }
    let connector = connector_settings(section)?;
    let health_addr = match section.get_str("health_addr")? {
        None => None,
        Some(text) if text.trim().is_empty() || text.trim() == "off" => None,
        Some(text) => Some(text.trim().parse().map_err(|_| {
            section.invalid(
                "health_addr",
                &text,
                "host:port, such as 127.0.0.1:8080 (or off)",
            )
        })?),
    };
    let max_message_bytes = section.get_or(
        "max_message_bytes",
        crate::amqp::publisher::DEFAULT_MAX_MESSAGE_BYTES,
    )?;
    let mut publishers = Vec::new();
    let mut rpc_clients = Vec::new();
    for info in entry.handlers() {
        if let HandlerInfo::RpcClient { name, spec } = info {
            let timeout = section
                .handler(name)
                .get_or("rpc_timeout", crate::rpc::client::DEFAULT_TIMEOUT)?;
            rpc_clients.push((name, spec.service, timeout));
        }
        if let HandlerInfo::Publish { name, spec } = info {
            let scoped = section.handler(name);
            let exchange = ExchangeSettings::from_config(&scoped, spec.exchange)?;
            let routing_key = scoped
                .get_str("routing_key")?
                .unwrap_or_else(|| spec.routing_key.to_string());
            let settings = PublisherSettings {
                persistent: scoped.get_or("persistent", true)?,
                timeout: scoped.get_or("publish_timeout", Duration::from_secs(10))?,
                declare_exchange: true,
                mandatory: scoped.get_or("mandatory", false)?,
                max_message_bytes: scoped.get_or("max_message_bytes", max_message_bytes)?,
                ..PublisherSettings::default()
            };
            publishers.push((name, exchange, routing_key, settings));
        }
    }
    let bound = entry
        .build(section)
        .map_err(|e| match e.downcast::<ConfigError>() {
            // `section.require(..)?` in an `init` function is a config error like any other.
            Ok(config) => StartError::Config(*config),
            Err(e) => StartError::Build {
                service: entry.name.to_string(),
                cause: e.to_string(),
            },
        })?;
    let rpc = if bound.rpc.is_empty() {
        None
    } else {
        let methods = bound.rpc.iter().map(|(name, _)| *name).collect();
        Some((
            RpcServerPlan::from_config(entry.name, methods, section)?,
            bound.rpc,
        ))
    };
    let executes = bound
        .executes
        .into_iter()
        .map(|(name, call)| Ok((call, ExecutePlan::from_config(entry.name, name, section)?)))
        .collect::<Result<Vec<_>, ConfigError>>()?;
    let listeners = bound
        .listeners
        .into_iter()
        .map(|(name, call)| Ok((call, SsePlan::from_config(entry.name, name, section)?)))
        .collect::<Result<Vec<_>, ConfigError>>()?;
    let db = DbSettings::from_config(section)?;
    for info in entry.handlers() {
        if let HandlerInfo::Rpc { name, .. } = info
            && section.handler(name).get_or("transaction", false)?
        {
            // Replies are sent during the call, before a commit could happen.
            return Err(StartError::Config(section.invalid(
                &format!("{name}.transaction"),
                "true",
                "no transaction for an RPC method (its replies go out during the call): open one with Db::current().begin()",
            )));
        }
    }
    if db.is_none() {
        let transactional = consumers_need_db(&entry.handlers(), section)?;
        if let Some(handler) = transactional {
            return Err(StartError::Config(section.invalid(
                &format!("{handler}.transaction"),
                "true",
                "a database: `transaction` and `inbox` need db_connector and the db_* keys",
            )));
        }
    }
    let mut policies = std::collections::HashMap::new();
    policies.insert("rpc", Policy::from_config(&section.handler("rpc"))?);
    for info in entry.handlers() {
        policies.insert(
            info.name(),
            Policy::from_config(&section.handler(info.name()))?,
        );
    }
    let consumers = bound
        .consumers
        .into_iter()
        .map(|bound| {
            let plan = ConsumerPlan::from_config(entry.name, bound.name, &bound.spec, section)?;
            Ok((bound, plan))
        })
        .collect::<Result<Vec<_>, ConfigError>>()?;
    Ok(ServicePlan {
        entry,
        consumers,
        rpc,
        publishers,
        rpc_clients,
        executes,
        listeners,
        policies,
        db,
        amqp_uri,
        connector,
        health_addr,
    })
}

/// The connection settings of a service's section: `connect_timeout`, `amqp_heartbeat`,
/// `amqp_node_selector`, `amqp_reconnect_delay`, `amqp_reconnect_delay_max`,
/// `amqp_tls_ca_file`.
pub(crate) fn connector_settings(section: &Section) -> Result<ConnectorSettings, ConfigError> {
    let defaults = ConnectorSettings::default();
    let selector = match section.get_str("amqp_node_selector")? {
        None => defaults.selector,
        Some(text) => text
            .parse()
            .map_err(|expected: String| section.invalid("amqp_node_selector", &text, expected))?,
    };
    let tls_ca = match section.get_str("amqp_tls_ca_file")? {
        None => None,
        Some(path) => Some(std::fs::read_to_string(path.trim()).map_err(|e| {
            section.invalid(
                "amqp_tls_ca_file",
                &path,
                format!("a readable PEM file of CA certificates ({e})"),
            )
        })?),
    };
    Ok(ConnectorSettings {
        connect_timeout: section.get_or("connect_timeout", defaults.connect_timeout)?,
        heartbeat: section.get_or("amqp_heartbeat", defaults.heartbeat)?,
        selector,
        reconnect_delay: section.get_or("amqp_reconnect_delay", defaults.reconnect_delay)?,
        reconnect_delay_max: section
            .get_or("amqp_reconnect_delay_max", defaults.reconnect_delay_max)?,
        tls_ca,
    })
}

/// A started runtime.
pub struct Running {
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
    shared: Arc<Shared>,
    connectors: Vec<Arc<Connector>>,
    stop_bound: Duration,
    failures: tokio::sync::mpsc::UnboundedReceiver<ServiceFailed>,
    health: Arc<health::Health>,
}

/// A task factory: each call starts one run of a handler's task.
type TaskFactory =
    Box<dyn FnMut(Ready) -> futures_util::future::BoxFuture<'static, Result<(), TaskError>> + Send>;

/// A consuming task's failure, marked as a lost connection when it was one (or when the
/// connection is gone now): those do not count against the restart limit.
fn consume_failure(error: ConsumeError, connector: &Connector) -> TaskError {
    let lost = match &error {
        // Refused credentials are no outage: they count, so the service fails in the end.
        ConsumeError::Connect(ConnectError::LoginRefused { .. } | ConnectError::BadUri(_)) => false,
        other => other.connection_lost() || !connector.is_connected(),
    };
    TaskError::new(error, lost)
}

/// Why a running runtime stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A handler failed more often than its restart policy allows.
    #[error(transparent)]
    ServiceFailed(#[from] ServiceFailed),
}

/// How long closing a publisher's channel may wait for the broker.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

impl Running {
    /// True when every broker connection is open and every handler task is up: what
    /// `GET /ready` of the health endpoint answers.
    pub fn is_ready(&self) -> bool {
        self.health.readiness().0
    }

    /// A token that stops the runtime when cancelled (as a signal would).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops taking messages, lets in-flight handlers finish within their drain timeout, then
    /// closes the publishers and the connection.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let joined = tokio::time::timeout(self.stop_bound, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if joined.is_err() {
            tracing::warn!(after = ?self.stop_bound, "handler tasks did not stop in time; they are aborted");
            self.tasks.shutdown().await;
        }
        for publisher in self.shared.publishers.values() {
            publisher.close_within(CLOSE_TIMEOUT).await;
        }
        for connector in &self.connectors {
            connector.close().await;
        }
        context::uninstall(&self.shared);
        tracing::info!("stopped");
    }

    /// Runs until SIGINT or SIGTERM (or the shutdown token), then stops; or until a handler
    /// fails more often than its restart policy allows, then stops and returns the failure.
    pub async fn run_until_signal(self) -> Result<(), RunError> {
        self.run_until(shutdown::Signals::install()).await
    }

    /// As [`Running::run_until_signal`], with signal handlers installed earlier (before
    /// start-up, as the command line does).
    pub async fn run_until(mut self, mut signals: shutdown::Signals) -> Result<(), RunError> {
        let token = self.shutdown.clone();
        let failure = tokio::select! {
            name = signals.recv() => {
                tracing::info!(signal = name, "stopping: draining in-flight handlers");
                None
            }
            _ = token.cancelled() => {
                tracing::info!("stopping: draining in-flight handlers");
                None
            }
            Some(failure) = self.failures.recv() => {
                tracing::error!(error = %failure, "stopping: a service failed");
                Some(failure)
            }
        };
        self.stop().await;
        match failure {
            Some(failure) => Err(failure.into()),
            None => Ok(()),
        }
    }
}

/// The first handler of a service without a database whose config asks for a transaction or
/// an inbox.
fn consumers_need_db(
    handlers: &[HandlerInfo],
    section: &Section,
) -> Result<Option<&'static str>, ConfigError> {
    for handler in handlers {
        let scoped = section.handler(handler.name());
        if scoped.get_or("transaction", false)? || scoped.get_or("inbox", false)? {
            return Ok(Some(handler.name()));
        }
    }
    Ok(None)
}
