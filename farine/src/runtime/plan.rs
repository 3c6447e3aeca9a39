//! From the config and the registered services to a plan: what each enabled service runs (its
//! handler tasks), what it sends (publishers, RPC clients), where (broker, database, health
//! endpoint) and how its tasks restart. Everything a start can refuse for the config is refused
//! here, before anything is opened.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use super::supervisor::Policy;
use super::{DEFAULT_AMQP_URI, StartError};
use crate::amqp::connection::ConnectorSettings;
use crate::amqp::publisher::PublisherSettings;
use crate::amqp::topology::ExchangeSettings;
use crate::config::{Config, ConfigError, Section};
use crate::consume::{self, ConsumerPlan};
use crate::db::DbSettings;
use crate::execute::{BoundExecute, ExecutePlan};
use crate::registry::{BoundHandler, HandlerInfo, ServiceEntry};
use crate::rpc::server::{BoundRpc, RpcServerPlan};
#[cfg(feature = "sse")]
use crate::sse::{BoundSse, SsePlan};

/// One enabled service, planned.
pub(super) struct ServicePlan {
    pub entry: &'static ServiceEntry,
    /// The handlers that run as supervised tasks.
    pub tasks: Vec<Planned>,
    /// `#[publish]` methods: their publishers are prepared at start.
    pub publishers: Vec<PublisherPlan>,
    /// `#[rpc::client]` methods: `(method, service called, timeout)`.
    pub rpc_clients: Vec<(&'static str, &'static str, Duration)>,
    /// The restart policy of each handler task, by handler name (`rpc` for the RPC server).
    pub policies: HashMap<&'static str, Policy>,
    pub db: Option<DbSettings>,
    pub amqp_uri: String,
    pub connector: ConnectorSettings,
    /// `health_addr`: where liveness and readiness are served over HTTP.
    pub health_addr: Option<SocketAddr>,
    /// `metrics` (default on): the service's handlers are counted and timed, shown at
    /// `GET /metrics` of the health endpoint.
    pub metrics: bool,
    /// `tracing` (default on): each call continues the trace of what it handles and opens a
    /// span; what it sends carries the trace on.
    pub tracing: bool,
    /// `otlp_endpoint`: where finished spans are sent over OTLP/HTTP (feature `otlp`).
    #[cfg_attr(not(feature = "otlp"), allow(dead_code))]
    pub otlp_endpoint: Option<String>,
}

/// A handler task of one kind, its plan and its bound function.
pub(super) enum Planned {
    /// Boxed: a consumer's plan is the largest by far.
    Consume(Box<ConsumerPlan>, consume::Call),
    /// The service's RPC server, with its methods: `(name, returns a stream, function)`.
    Rpc(RpcServerPlan, Vec<(&'static str, bool, BoundRpc)>),
    Execute(ExecutePlan, BoundExecute),
    #[cfg(feature = "sse")]
    Sse(SsePlan, BoundSse),
}

/// A `#[publish]` method's publisher, as its section configures it.
pub(super) struct PublisherPlan {
    pub method: &'static str,
    pub exchange: ExchangeSettings,
    pub routing_key: String,
    pub settings: PublisherSettings,
}

impl ServicePlan {
    /// The consumers' plans.
    pub fn consumers(&self) -> impl Iterator<Item = &ConsumerPlan> {
        self.tasks.iter().filter_map(|task| match task {
            Planned::Consume(plan, _) => Some(&**plan),
            _ => None,
        })
    }

    /// The queues the service's tasks consume (and take messages from), with the handler
    /// consuming each. A stream is not one: each of its readers gets all of it.
    fn consumed_queues(&self) -> impl Iterator<Item = (String, (&'static str, &'static str))> {
        self.tasks.iter().flat_map(|task| match task {
            Planned::Consume(plan, _) if plan.stream.is_some() => Vec::new(),
            Planned::Consume(plan, _) => {
                vec![(plan.queue.name.clone(), (plan.service, plan.handler))]
            }
            Planned::Rpc(plan, _) => plan
                .queue_names()
                .into_iter()
                .map(|queue| (queue, (plan.service, "rpc")))
                .collect(),
            Planned::Execute(..) => Vec::new(),
            #[cfg(feature = "sse")]
            Planned::Sse(..) => Vec::new(),
        })
    }
}

/// The plan of each enabled service of `entries` (all when `only` is `None`), or what the config
/// gets wrong.
pub(super) fn plan(
    config: &Config,
    module: &str,
    only: Option<&[String]>,
) -> Result<Vec<ServicePlan>, StartError> {
    let entries: Vec<_> = ServiceEntry::all()
        .into_iter()
        .filter(|entry| only.is_none_or(|only| only.iter().any(|name| name == entry.name)))
        .collect();
    if let Some(only) = only
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
    // Why each service not started was left out, for the error when none is left.
    let mut skipped = Vec::new();
    for entry in entries {
        if !config.has_section(entry.name) {
            tracing::info!(
                service = entry.name,
                file = config.file(),
                "service has no section [{}] in the config; not started",
                entry.name
            );
            skipped.push(format!("`{0}` has no section [{0}]", entry.name));
            continue;
        }
        let section = entry.section(config)?;
        if !section.get_or("enabled", true)? {
            tracing::info!(
                service = entry.name,
                "service is disabled in the config (enabled = false); not started"
            );
            skipped.push(format!("`{}` is disabled (enabled = false)", entry.name));
            continue;
        }
        plans.push(plan_service(entry, &section)?);
    }
    let mut queues: BTreeMap<String, (&str, &str)> = BTreeMap::new();
    for plan in &plans {
        for (queue, owner) in plan.consumed_queues() {
            if let Some((service, handler)) = queues.insert(queue.clone(), owner) {
                return Err(StartError::Conflict(format!(
                    "handlers `{service}.{handler}` and `{}.{}` would consume the same queue `{queue}` and take each other's messages: give one another `<handler>.queue`",
                    owner.0, owner.1
                )));
            }
        }
    }
    if plans.is_empty() && skipped.is_empty() {
        return Err(StartError::NothingToStart(format!(
            "module `{module}` has no service (no #[farine::service] is linked into this binary)"
        )));
    }
    if plans.is_empty() {
        return Err(StartError::NothingToStart(format!(
            "no service of module `{module}` to start in {}: {}; a service starts when the file has a section named after it (it may be empty: [DEFAULT] values are inherited)",
            config.file(),
            skipped.join("; ")
        )));
    }
    Ok(plans)
}

fn plan_service(
    entry: &'static ServiceEntry,
    section: &Section,
) -> Result<ServicePlan, StartError> {
    let amqp_uri = section
        .get_str("amqp_uri")?
        .unwrap_or_else(|| DEFAULT_AMQP_URI.to_string());
    if crate::amqp::connection::memory_name(&amqp_uri).is_none()
        && let Err(cause) = crate::amqp::connection::parse_nodes(&amqp_uri)
    {
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
    let metrics = section.get_or("metrics", true)?;
    let tracing = section.get_or("tracing", true)?;
    let otlp_endpoint = otlp_endpoint(section)?;
    let max_message_bytes = section.get_or(
        "max_message_bytes",
        crate::amqp::publisher::DEFAULT_MAX_MESSAGE_BYTES,
    )?;
    let handlers = entry.handlers();
    let mut publishers = Vec::new();
    let mut rpc_clients = Vec::new();
    for info in &handlers {
        match *info {
            HandlerInfo::RpcClient { name, spec } => {
                let timeout = section
                    .handler(name)
                    .get_or("rpc_timeout", crate::rpc::client::DEFAULT_TIMEOUT)?;
                rpc_clients.push((name, spec.service, timeout));
            }
            HandlerInfo::Publish { name, spec } => {
                let scoped = section.handler(name);
                publishers.push(PublisherPlan {
                    method: name,
                    exchange: ExchangeSettings::from_config(&scoped, spec.exchange)?,
                    routing_key: crate::amqp::topology::amqp_name(
                        &scoped,
                        "routing_key",
                        scoped
                            .get_str("routing_key")?
                            .unwrap_or_else(|| spec.routing_key.to_string()),
                    )?,
                    settings: PublisherSettings {
                        persistent: scoped.get_or("persistent", true)?,
                        timeout: scoped.get_or("publish_timeout", Duration::from_secs(10))?,
                        declare_exchange: true,
                        mandatory: scoped.get_or("mandatory", false)?,
                        max_message_bytes: scoped.get_or("max_message_bytes", max_message_bytes)?,
                        ..PublisherSettings::default()
                    },
                });
            }
            HandlerInfo::Rpc { name, .. }
                if section.handler(name).get_or("transaction", false)? =>
            {
                // Replies are sent during the call, before a commit could happen.
                return Err(StartError::Config(section.invalid(
                    &format!("{name}.transaction"),
                    "true",
                    "no transaction for an RPC method (its replies go out during the call): open one with Db::current().begin()",
                )));
            }
            _ => {}
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
    let service = entry.name;
    let mut tasks = Vec::new();
    let mut methods = Vec::new();
    for handler in bound {
        match handler {
            BoundHandler::Consume { name, spec, call } => tasks.push(Planned::Consume(
                Box::new(ConsumerPlan::from_config(service, name, &spec, section)?),
                call,
            )),
            BoundHandler::Rpc { name, stream, call } => methods.push((name, stream, call)),
            BoundHandler::Execute { name, call } => tasks.push(Planned::Execute(
                ExecutePlan::from_config(service, name, section)?,
                call,
            )),
            #[cfg(feature = "sse")]
            BoundHandler::Sse { name, call } => tasks.push(Planned::Sse(
                SsePlan::from_config(service, name, section)?,
                call,
            )),
        }
    }
    if !methods.is_empty() {
        let names = methods.iter().map(|(name, ..)| *name).collect();
        let server = RpcServerPlan::from_config(service, names, section)?;
        tasks.insert(0, Planned::Rpc(server, methods));
    }
    let db = DbSettings::from_config(section)?;
    if db.is_none()
        && let Some(handler) = needs_db(&handlers, section)?
    {
        return Err(StartError::Config(section.invalid(
            &format!("{handler}.transaction"),
            "true",
            "a database: `transaction` and `inbox` need db_connector and the db_* keys",
        )));
    }
    let mut policies = HashMap::new();
    policies.insert("rpc", Policy::from_config(&section.handler("rpc"))?);
    for info in &handlers {
        policies.insert(
            info.name(),
            Policy::from_config(&section.handler(info.name()))?,
        );
    }
    Ok(ServicePlan {
        entry,
        tasks,
        publishers,
        rpc_clients,
        policies,
        db,
        amqp_uri,
        connector,
        health_addr,
        metrics,
        tracing,
        otlp_endpoint,
    })
}

/// `otlp_endpoint`: an `http://host:port` URL (the OTLP/HTTP receiver; `/v1/traces` is added
/// when the URL has no path), or `off`. A build without the `otlp` feature refuses one rather
/// than ignoring it.
fn otlp_endpoint(section: &Section) -> Result<Option<String>, ConfigError> {
    let Some(text) = section.get_str("otlp_endpoint")? else {
        return Ok(None);
    };
    let text = text.trim();
    if text.is_empty() || text == "off" {
        return Ok(None);
    }
    if !cfg!(feature = "otlp") {
        return Err(section.invalid(
            "otlp_endpoint",
            text,
            "off: this program was built without farine's `otlp` feature",
        ));
    }
    if !text.starts_with("http://") {
        return Err(section.invalid(
            "otlp_endpoint",
            text,
            "an http:// URL of an OTLP/HTTP receiver, such as http://127.0.0.1:4318 (or off)",
        ));
    }
    Ok(Some(text.to_string()))
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

/// The first handler of a service whose config asks for a transaction or an inbox.
fn needs_db(
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

/// The keys of `config` that farine does not read, each as a sentence naming the file, the
/// section and the key, with the closest known key: a misspelt key is otherwise silently
/// ignored. In a service's section every unknown key is reported (only near misses when the
/// service reads keys of its own through `init`); in `[DEFAULT]`, which other programs' services
/// may share, only near misses.
pub(super) fn unknown_keys(config: &Config, only: Option<&[String]>) -> Vec<String> {
    use crate::config::keys;
    let mut found = Vec::new();
    let mut report = |section: &str, key: &str, why: String| {
        found.push(format!(
            "{} [{section}]: unknown key `{key}`{why}; farine ignores it",
            config.file()
        ));
    };
    let hint =
        |near: Option<&str>| near.map_or(String::new(), |n| format!(" (did you mean `{n}`?)"));
    let referenced = config.referenced_keys(crate::config::DEFAULT_SECTION);
    for key in config.own_keys(crate::config::DEFAULT_SECTION) {
        let bare = key.rsplit('.').next().unwrap_or(key);
        if !referenced.contains(key)
            && !keys::all().any(|k| k == bare)
            && let Some(near) = keys::closest(bare, keys::all())
        {
            report("DEFAULT", key, hint(Some(near)));
        }
    }
    let entries = ServiceEntry::all()
        .into_iter()
        .filter(|entry| only.is_none_or(|only| only.iter().any(|name| name == entry.name)));
    for entry in entries {
        let handlers = entry.handlers();
        let has_rpc = handlers
            .iter()
            .any(|h| matches!(h, HandlerInfo::Rpc { .. }));
        // Keys other values refer to (`base = orders`, `queue = %(base)s-relay`) are read.
        let referenced = config.referenced_keys(entry.name);
        // The keys this service reads unscoped: its own, and its handlers' (a key of the
        // section applies to every handler).
        let mut read: Vec<&str> = keys::SERVICE.to_vec();
        for info in &handlers {
            read.extend(handler_keys(info));
        }
        if has_rpc {
            read.extend(keys::RPC_SERVER);
        }
        for key in config.own_keys(entry.name) {
            if referenced.contains(key) {
                continue;
            }
            if !key.contains('.') && !read.contains(&key) && keys::all().any(|k| k == key) {
                // A key farine reads, but not for any handler this service has.
                if !entry.own_keys {
                    report(
                        entry.name,
                        key,
                        format!(": no handler of service `{}` reads it", entry.name),
                    );
                }
                continue;
            }
            let (allowed, bare, scope): (Vec<&str>, &str, Option<&str>) = match key.split_once('.')
            {
                None => (keys::all().collect(), key, None),
                Some(("rpc", bare)) if has_rpc => (keys::RPC_SERVER.to_vec(), bare, Some("rpc")),
                // Keys are lower-cased when read; method names may not be.
                Some((handler, bare)) => match handlers
                    .iter()
                    .find(|h| h.name().eq_ignore_ascii_case(handler))
                {
                    Some(info) => (handler_keys(info).to_vec(), bare, Some(handler)),
                    None => {
                        let names = handlers.iter().map(|h| h.name());
                        let near = names
                            .clone()
                            .find(|n| keys::closest(handler, [*n].into_iter()).is_some());
                        if !entry.own_keys || near.is_some() {
                            let listed: Vec<_> = names.collect();
                            report(
                                entry.name,
                                key,
                                format!(
                                    ": service `{}` has no handler `{handler}`{} (handlers: {})",
                                    entry.name,
                                    hint(near),
                                    listed.join(", ")
                                ),
                            );
                        }
                        continue;
                    }
                },
            };
            if allowed.contains(&bare) {
                continue;
            }
            let near = keys::closest(bare, allowed.iter().copied());
            if entry.own_keys && near.is_none() {
                continue;
            }
            let why = match scope {
                Some(handler) => format!(": handler `{handler}` has no key `{bare}`{}", hint(near)),
                None => hint(near),
            };
            report(entry.name, key, why);
        }
    }
    found
}

/// The keys a handler reads (and its attribute may carry).
fn handler_keys(info: &HandlerInfo) -> &'static [&'static str] {
    use crate::config::keys;
    match info {
        HandlerInfo::Consume { .. } => keys::CONSUME,
        HandlerInfo::Publish { .. } => keys::PUBLISH,
        // Refused unless false (an RPC method's replies go out during the call).
        HandlerInfo::Rpc { .. } => &["transaction"],
        HandlerInfo::RpcClient { .. } => keys::RPC_CLIENT,
        HandlerInfo::Execute { .. } => keys::EXECUTE,
        HandlerInfo::Sse { .. } => keys::STREAM_HTTP,
    }
}
