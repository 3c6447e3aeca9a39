//! A runtime being opened and running: every step of a start in order, each recording what it
//! opened in [`Running`], so that a start that fails part-way is undone by [`Running::stop`].

// Without the `db` feature the pool is a type with no values: what would use one is unused.
#![cfg_attr(not(feature = "db"), allow(unused))]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::StartError;
use super::context::{self, Shared};
use super::health::{self, Health};
use super::plan::{Planned, ServicePlan};
use super::shutdown;
use super::supervisor::{self, Policy, ServiceFailed};
use crate::amqp::connection::{Connector, ConnectorSettings};
use crate::amqp::publisher::Publisher;
use crate::db::PgPool;
use crate::db::call::{CallDb, Inbox};
use crate::db::checkpoint::Checkpoint;
use crate::handler::{Connected, Layers, Ready, Task, TaskEnv};
use crate::observe::trace::Tracer;
use crate::observe::{Metrics, Observe};
use crate::rpc::Client;
use crate::rpc::server::{self as rpc_server, Method};
#[cfg(feature = "sse")]
use crate::sse;
use crate::{consume, execute};

/// How long closing a publisher's channel or a pool may wait.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A started runtime.
pub struct Running {
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
    shared: Arc<Shared>,
    connectors: Vec<Arc<Connector>>,
    pools: Vec<PgPool>,
    /// The longest a stop may take: the slowest task's drain and round trips.
    stop_bound: Duration,
    failed: mpsc::UnboundedSender<ServiceFailed>,
    failures: mpsc::UnboundedReceiver<ServiceFailed>,
    /// The runtime's metrics, when a service keeps them (`metrics`, on by default).
    metrics: Option<Arc<Metrics>>,
    health: Arc<Health>,
}

/// Why a running runtime stopped on its own.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// A handler failed more often than its restart policy allows.
    #[error(transparent)]
    ServiceFailed(#[from] ServiceFailed),
}

/// A task's first start: `(service, handler, its result)`.
type FirstStart = (
    &'static str,
    &'static str,
    tokio::sync::oneshot::Receiver<Result<(), String>>,
);

impl Running {
    /// Nothing opened yet.
    pub(super) fn new() -> Self {
        let (failed, failures) = mpsc::unbounded_channel();
        Self {
            shutdown: CancellationToken::new(),
            tasks: JoinSet::new(),
            shared: Arc::default(),
            connectors: Vec::new(),
            pools: Vec::new(),
            stop_bound: Duration::ZERO,
            failed,
            failures,
            metrics: None,
            health: Arc::new(Health {
                handlers: Vec::new(),
                connectors: Vec::new(),
                metrics: None,
            }),
        }
    }

    /// Opens everything `plans` need, in order, and waits for every task's first start.
    pub(super) async fn open(
        &mut self,
        module: &str,
        migrations: &'static [crate::db::EmbeddedMigration],
        layers: Layers,
        plans: Vec<ServicePlan>,
    ) -> Result<(), StartError> {
        let connectors = self.connect(module, &plans).await?;
        if plans.iter().any(|plan| plan.metrics) {
            let connectors = self.connectors.clone();
            self.metrics = Some(Arc::new(Metrics::new(Arc::new(move || {
                (
                    connectors.iter().all(|c| c.is_connected()),
                    connectors.iter().map(|c| c.reconnects()).sum(),
                )
            }))));
        }
        self.prepare_endpoints(&plans, &connectors, &layers).await?;
        let pools = self.open_databases(&plans, migrations).await?;
        let env = TaskEnv {
            scope: context::scope(&self.shared, self.shutdown.clone()),
            shutdown: self.shutdown.clone(),
            layers,
            observe: Observe {
                metrics: self.metrics.clone(),
                tracer: self.tracer(&plans),
            },
        };
        let health_addrs: BTreeSet<SocketAddr> =
            plans.iter().filter_map(|plan| plan.health_addr).collect();
        let mut readiness = Vec::new();
        let mut first_starts = Vec::new();
        for plan in plans {
            let connector = connectors[&plan.amqp_uri].clone();
            let pool = plan.db.as_ref().map(|db| pools[&db.describe()].clone());
            // The service's own choices: counted or not, traced or not.
            let mut env = env.clone();
            if !plan.metrics {
                env.observe.metrics = None;
            }
            if !plan.tracing {
                env.observe.tracer = Tracer::new(false);
            }
            for (task, policy) in tasks(plan, connector, pool, &env).await? {
                let (ready, first) = Ready::new();
                readiness.push((task.service, task.handler, ready.clone()));
                first_starts.push((task.service, task.handler, first));
                self.spawn(task, policy, ready);
            }
        }
        self.health = Arc::new(Health {
            handlers: readiness,
            connectors: self.connectors.clone(),
            metrics: self
                .metrics
                .clone()
                .map(|metrics| Arc::new(move || metrics.render()) as health::RenderMetrics),
        });
        self.serve_health(health_addrs).await?;
        wait_first_starts(first_starts).await
    }

    /// One connection per broker URI, named after the services it carries. (The first service
    /// of a URI gives its connection settings, but the longest timeout.)
    async fn connect(
        &mut self,
        module: &str,
        plans: &[ServicePlan],
    ) -> Result<BTreeMap<String, Arc<Connector>>, StartError> {
        let mut by_uri: BTreeMap<&str, (Vec<&'static str>, ConnectorSettings)> = BTreeMap::new();
        for plan in plans {
            let slot = by_uri
                .entry(&plan.amqp_uri)
                .or_insert((Vec::new(), plan.connector.clone()));
            slot.0.push(plan.entry.name);
            slot.1.connect_timeout = slot.1.connect_timeout.max(plan.connector.connect_timeout);
        }
        let mut connectors = BTreeMap::new();
        for (uri, (services, settings)) in by_uri {
            let name = crate::amqp::connection::connection_name(module, &services.join(", "));
            let connector = Arc::new(Connector::with_settings(uri.to_string(), name, settings));
            self.connectors.push(connector.clone());
            connector.connection().await?;
            connectors.insert(uri.to_string(), connector);
        }
        Ok(connectors)
    }

    /// The publishers of `#[publish]` methods (each declares its exchange) and the clients of
    /// `#[rpc::client]` methods, where the generated code finds them.
    async fn prepare_endpoints(
        &mut self,
        plans: &[ServicePlan],
        connectors: &BTreeMap<String, Arc<Connector>>,
        layers: &Layers,
    ) -> Result<(), StartError> {
        let mut shared = Shared {
            layers: (!layers.is_empty()).then(|| layers.clone()),
            ..Shared::default()
        };
        let prepared = async {
            for plan in plans {
                let connector = &connectors[&plan.amqp_uri];
                for publisher in &plan.publishers {
                    let metrics = self
                        .metrics
                        .as_ref()
                        .filter(|_| plan.metrics)
                        .map(|metrics| metrics.publisher(&publisher.exchange.name));
                    let prepared = Publisher::observed(
                        connector.clone(),
                        publisher.exchange.clone(),
                        publisher.routing_key.clone(),
                        publisher.settings.clone(),
                        metrics,
                    );
                    shared
                        .publishers
                        .insert((plan.entry.name, publisher.method), prepared.clone());
                    prepared
                        .prepare()
                        .await
                        .map_err(|source| StartError::Publisher {
                            service: plan.entry.name.to_string(),
                            method: publisher.method.to_string(),
                            source: Box::new(source),
                        })?;
                }
                for &(method, target, timeout) in &plan.rpc_clients {
                    shared.rpc_clients.insert(
                        (plan.entry.name, method),
                        Client::observed(
                            connector.clone(),
                            target.to_string(),
                            timeout,
                            self.metrics.clone().filter(|_| plan.metrics),
                        ),
                    );
                }
            }
            Ok(())
        }
        .await;
        // Kept even when a publisher failed: stopping closes the ones already prepared.
        self.shared = Arc::new(shared);
        context::install(&self.shared);
        prepared
    }

    /// One pool per database, checked now (a wrong password stops start-up here, naming host,
    /// port, database and user), with the migrations applied and the inbox table where a
    /// consumer asks for it.
    async fn open_databases(
        &mut self,
        plans: &[ServicePlan],
        migrations: &'static [crate::db::EmbeddedMigration],
    ) -> Result<BTreeMap<String, PgPool>, StartError> {
        let mut pools: BTreeMap<String, PgPool> = BTreeMap::new();
        for plan in plans {
            let Some(db) = &plan.db else { continue };
            let database = db.describe();
            if !pools.contains_key(&database) {
                let pool = db.connect().await?;
                self.pools.push(pool.clone());
                tracing::info!(%database, "connected to PostgreSQL");
                if !migrations.is_empty() {
                    crate::db::migrate(&pool, migrations).await.map_err(|e| {
                        StartError::Migrations {
                            database: database.clone(),
                            cause: e.to_string(),
                        }
                    })?;
                    tracing::info!(%database, migrations = migrations.len(), "migrations applied");
                }
                pools.insert(database.clone(), pool);
            }
            if plan.consumers().any(|consumer| consumer.inbox) {
                crate::db::call::create_inbox(&pools[&database])
                    .await
                    .map_err(|e| StartError::Migrations {
                        database: database.clone(),
                        cause: format!("cannot create farine_inbox: {e}"),
                    })?;
            }
        }
        Ok(pools)
    }

    /// The runtime's tracer: on when a service traces, exporting to the first `otlp_endpoint`.
    fn tracer(&self, plans: &[ServicePlan]) -> Tracer {
        let tracer = Tracer::new(plans.iter().any(|plan| plan.tracing));
        #[cfg(feature = "otlp")]
        let tracer = tracer.exporting(
            plans
                .iter()
                .find_map(|plan| plan.otlp_endpoint.as_deref())
                .map(|endpoint| {
                    crate::observe::otlp::Exporter::start(endpoint, self.shutdown.clone())
                }),
        );
        tracer
    }

    /// Spawns `task` under its supervisor.
    fn spawn(&mut self, task: Task, policy: Policy, ready: Ready) {
        self.stop_bound = self.stop_bound.max(task.stop_bound);
        self.tasks.spawn(supervisor::supervise(
            task.service,
            task.handler,
            policy,
            self.metrics.clone(),
            self.shutdown.clone(),
            ready,
            self.failed.clone(),
            task.start,
        ));
    }

    /// Serves `/live` and `/ready` on each address.
    async fn serve_health(&mut self, addrs: BTreeSet<SocketAddr>) -> Result<(), StartError> {
        for addr in addrs {
            let listener =
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| StartError::Health {
                        addr,
                        cause: e.to_string(),
                    })?;
            tracing::info!(%addr, "health endpoint: GET /live, GET /ready, GET /metrics");
            self.tasks.spawn(health::serve(
                listener,
                self.health.clone(),
                self.shutdown.clone(),
            ));
        }
        Ok(())
    }

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
    /// closes the publishers, the pools and the connections.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let stop_bound = self.stop_bound + Duration::from_secs(1);
        let joined = tokio::time::timeout(stop_bound, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if joined.is_err() {
            tracing::warn!(after = ?stop_bound, "handler tasks did not stop in time; they are aborted");
            self.tasks.shutdown().await;
        }
        for publisher in self.shared.publishers.values() {
            publisher.close_within(CLOSE_TIMEOUT).await;
        }
        for pool in &self.pools {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, pool.close()).await;
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

/// The supervised tasks of one service, each built by its kind, with its restart policy.
async fn tasks(
    plan: ServicePlan,
    connector: Arc<Connector>,
    pool: Option<PgPool>,
    env: &TaskEnv,
) -> Result<Vec<(Task, Policy)>, StartError> {
    let service = plan.entry.name;
    let call_db = |transaction: bool, inbox: Option<Inbox>| {
        pool.as_ref().map(|pool| {
            Arc::new(CallDb {
                pool: pool.clone(),
                transaction,
                inbox,
            })
        })
    };
    let mut tasks = Vec::new();
    for planned in plan.tasks {
        let task = match planned {
            Planned::Consume(mut consumer, call) => {
                let inbox = consumer.inbox.then_some(Inbox {
                    service,
                    handler: consumer.handler,
                });
                consumer.db = call_db(consumer.transaction, inbox);
                if let (Some(stream), Some(pool)) = (&mut consumer.stream, &pool)
                    && stream.use_checkpoint
                {
                    let checkpoint = Checkpoint::open(pool.clone(), service, consumer.handler)
                        .await
                        .map_err(|e| StartError::Handler {
                            service: service.to_string(),
                            handler: consumer.handler.to_string(),
                            cause: format!("cannot prepare the checkpoint table: {e}"),
                        })?;
                    stream.position = consume::Position::with_checkpoint(checkpoint);
                }
                consume::task(*consumer, call, connector.clone(), env)
            }
            Planned::Rpc(mut server, methods) => {
                server.db = call_db(false, None);
                let methods = methods
                    .into_iter()
                    .map(|(name, streams, call)| Method {
                        routing_key: crate::rpc::wire::routing_key(service, name),
                        name,
                        call,
                        streams,
                        metrics: None,
                    })
                    .collect();
                rpc_server::task(server, methods, connector.clone(), env)
            }
            Planned::Execute(mut execute, call) => {
                execute.db = call_db(execute.transaction, None);
                execute::task(execute, call, connected(&connector), env)
            }
            #[cfg(feature = "sse")]
            Planned::Sse(mut listener, call) => {
                listener.db = call_db(listener.transaction, None);
                let checkpoint = match (&pool, listener.use_checkpoint) {
                    (Some(pool), true) => Some(
                        Checkpoint::open(pool.clone(), service, listener.handler)
                            .await
                            .map_err(|e| StartError::Handler {
                                service: service.to_string(),
                                handler: listener.handler.to_string(),
                                cause: format!("cannot prepare the checkpoint table: {e}"),
                            })?,
                    ),
                    _ => None,
                };
                let position = sse::Position::new(checkpoint);
                sse::task(listener, call, position, connected(&connector), env)
            }
        };
        let policy = plan.policies.get(task.handler).copied().unwrap_or_default();
        tasks.push((task, policy));
    }
    Ok(tasks)
}

/// Whether `connector`'s connection is up, as the tasks that do not consume ask it.
fn connected(connector: &Arc<Connector>) -> Connected {
    let connector = connector.clone();
    Arc::new(move || connector.is_connected())
}

/// Waits for each task's first start; the first that failed is the start's error.
async fn wait_first_starts(first_starts: Vec<FirstStart>) -> Result<(), StartError> {
    for (service, handler, first) in first_starts {
        let cause = match first.await {
            Ok(Ok(())) => continue,
            Ok(Err(cause)) => cause,
            Err(_) => "the task stopped before it started".to_string(),
        };
        return Err(StartError::Handler {
            service: service.to_string(),
            handler: handler.to_string(),
            cause,
        });
    }
    Ok(())
}
