//! Exchanges and queues: what farine declares for each handler, and how the config changes it.
//!
//! The defaults are the Python framework's: exchanges are `direct`, durable and not auto-deleted; queues are
//! durable; each `#[consume]` handler has a queue of its own named `<service>.<handler>`, so two
//! handlers of a service never take each other's messages while several processes of one service
//! share each queue as competing consumers. `docs/topology.md` is the full account.

use lapin::ExchangeKind;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};

use super::transport::{Channel, Consumer};

use super::error::{BrokerError, Resource};
use crate::config::{ConfigError, HandlerSection};

/// An exchange as farine declares it.
#[derive(Debug, Clone, PartialEq)]
pub struct ExchangeSettings {
    pub name: String,
    pub kind: ExchangeKind,
    pub durable: bool,
    pub auto_delete: bool,
    /// `exchange_arguments` (`alternate-exchange`, ...).
    pub arguments: FieldTable,
}

/// A queue as farine declares it, and how it is bound.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSettings {
    pub name: String,
    pub durable: bool,
    pub auto_delete: bool,
    pub exclusive: bool,
    /// `queue_arguments` (`x-queue-type`, `x-message-ttl`, `x-max-length`,
    /// `x-dead-letter-exchange`, ...).
    pub arguments: FieldTable,
    /// `binding_arguments`: the match arguments of a headers-exchange binding (`x-match`, and
    /// the headers to match).
    pub binding_arguments: FieldTable,
}

/// The longest name AMQP can carry (exchange, queue, routing key, argument name): a short string.
pub const MAX_NAME_BYTES: usize = 255;

/// `name` (the value of option `key`, or made from it) when AMQP can carry it; else an error
/// naming the option, rather than a panic where lapin builds the frame.
pub(crate) fn amqp_name(
    handler: &HandlerSection<'_>,
    key: &str,
    name: String,
) -> Result<String, ConfigError> {
    if name.len() <= MAX_NAME_BYTES {
        return Ok(name);
    }
    let expected = format!(
        "a name of at most {MAX_NAME_BYTES} bytes (AMQP's limit); this one is {} bytes",
        name.len()
    );
    Err(handler.section().invalid(key, &name, expected))
}

/// The value of `key`, a queue name that only a handler may set (`<handler>.<key>`): the
/// handler's own value, else `None`. In the service's section such a name is refused, since
/// handlers sharing a queue take each other's messages, and one inherited from `[DEFAULT]`
/// (which other programs may share) is not taken. With `none_allowed`, `none` may be set for
/// the whole service or in `[DEFAULT]`, and is returned as it is.
pub(crate) fn handler_queue_name(
    handler: &HandlerSection<'_>,
    key: &str,
    none_allowed: bool,
) -> Result<Option<String>, ConfigError> {
    if let Some(name) = handler.get_own_str(key)? {
        return Ok(Some(name));
    }
    let Some(text) = handler.get_str(key)? else {
        return Ok(None);
    };
    if none_allowed && is_none(&text) {
        return Ok(Some(text));
    }
    if !handler.section().is_own(key) {
        return Ok(None);
    }
    let expected = format!(
        "{}a name set for one handler: `{}.{key} = ...` (handlers sharing a queue take each other's messages)",
        if none_allowed { "none, or " } else { "" },
        handler.handler()
    );
    Err(handler.section().invalid(key, &text, expected))
}

/// True for `none` (any case, spaces around): no such queue.
pub(crate) fn is_none(text: &str) -> bool {
    text.trim().eq_ignore_ascii_case("none")
}

fn parse_kind(handler: &HandlerSection<'_>) -> Result<ExchangeKind, ConfigError> {
    let Some(text) = handler.get_str("exchange_type")? else {
        return Ok(ExchangeKind::Direct);
    };
    match text.trim().to_ascii_lowercase().as_str() {
        "direct" => Ok(ExchangeKind::Direct),
        "topic" => Ok(ExchangeKind::Topic),
        "fanout" => Ok(ExchangeKind::Fanout),
        "headers" => Ok(ExchangeKind::Headers),
        _ => Err(handler.section().invalid(
            "exchange_type",
            &text,
            "one of direct, topic, fanout, headers",
        )),
    }
}

/// An argument table as JSON (for descriptions): integers, booleans, strings and nested
/// tables as such; other AMQP values as their text.
pub(crate) fn arguments_json(table: &FieldTable) -> serde_json::Map<String, serde_json::Value> {
    fn json(value: &AMQPValue) -> serde_json::Value {
        use serde_json::Value;
        match value {
            AMQPValue::Boolean(b) => Value::Bool(*b),
            AMQPValue::ShortShortInt(n) => Value::from(*n),
            AMQPValue::ShortShortUInt(n) => Value::from(*n),
            AMQPValue::ShortInt(n) => Value::from(*n),
            AMQPValue::ShortUInt(n) => Value::from(*n),
            AMQPValue::LongInt(n) => Value::from(*n),
            AMQPValue::LongUInt(n) => Value::from(*n),
            AMQPValue::LongLongInt(n) => Value::from(*n),
            AMQPValue::Float(n) => Value::from(*n),
            AMQPValue::Double(n) => Value::from(*n),
            AMQPValue::ShortString(s) => Value::from(s.as_str()),
            AMQPValue::LongString(s) => Value::from(s.to_string()),
            AMQPValue::FieldTable(table) => Value::Object(arguments_json(table)),
            AMQPValue::FieldArray(items) => items.as_slice().iter().map(json).collect(),
            other => Value::from(format!("{other:?}")),
        }
    }
    table
        .inner()
        .iter()
        .map(|(name, value)| (name.to_string(), json(value)))
        .collect()
}

/// The type of a queue farine declares (`queue_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    /// RabbitMQ's default: one node holds it.
    Classic,
    /// Replicated over the cluster's nodes (Raft): survives the loss of a minority of them.
    Quorum,
    /// An append-only log, replicated as a quorum queue is: reading does not remove, each
    /// consumer reads from a position of its own (`start_from`). For `#[consume]` only.
    Stream,
}

impl QueueType {
    /// Its `x-queue-type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
            QueueType::Stream => "stream",
        }
    }
}

/// `queue_type` of the handler (or its service, or `[DEFAULT]`), when set.
pub(crate) fn queue_type(handler: &HandlerSection<'_>) -> Result<Option<QueueType>, ConfigError> {
    let Some(text) = handler.get_str("queue_type")? else {
        return Ok(None);
    };
    match text.trim().to_ascii_lowercase().as_str() {
        "classic" => Ok(Some(QueueType::Classic)),
        "quorum" => Ok(Some(QueueType::Quorum)),
        "stream" => Ok(Some(QueueType::Stream)),
        _ => Err(handler
            .section()
            .invalid("queue_type", &text, "classic, quorum or stream")),
    }
}

/// An argument table from config: `name = value` pairs, one per line or separated by commas.
/// A whole number is sent as a signed 64-bit integer (what RabbitMQ expects of `x-message-ttl`
/// or `x-max-length`), `true`/`false` as a boolean, anything else as a string; a value in
/// double quotes is always a string (`format = "42"`).
pub fn parse_arguments(handler: &HandlerSection<'_>, key: &str) -> Result<FieldTable, ConfigError> {
    let mut table = FieldTable::default();
    let Some(text) = handler.get_str(key)? else {
        return Ok(table);
    };
    for pair in text
        .split(['\n', ','])
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let Some((name, value)) = pair.split_once('=') else {
            return Err(handler.section().invalid(
                key,
                &text,
                "`name = value` pairs, one per line or separated by commas",
            ));
        };
        let (name, value) = (name.trim(), value.trim());
        if name.is_empty() {
            return Err(handler
                .section()
                .invalid(key, &text, "an argument name before each `=`"));
        }
        let name = amqp_name(handler, key, name.to_string())?;
        table.insert(name.into(), argument_value(value));
    }
    Ok(table)
}

/// One value of an argument table (see [`parse_arguments`]): a whole number as a signed 64-bit
/// integer, `true`/`false` as a boolean, a value in double quotes or anything else as a string.
pub(crate) fn argument_value(value: &str) -> AMQPValue {
    if let Some(quoted) = value
        .strip_prefix('"')
        .and_then(|rest| rest.strip_suffix('"'))
    {
        return AMQPValue::LongString(quoted.into());
    }
    if let Ok(number) = value.parse::<i64>() {
        return AMQPValue::LongLongInt(number);
    }
    match value {
        "true" => AMQPValue::Boolean(true),
        "false" => AMQPValue::Boolean(false),
        _ => AMQPValue::LongString(value.into()),
    }
}

impl ExchangeSettings {
    /// The default exchange (`""`): it routes by queue name and is never declared.
    pub fn default_exchange() -> Self {
        Self {
            name: String::new(),
            kind: ExchangeKind::Direct,
            durable: true,
            auto_delete: false,
            arguments: FieldTable::default(),
        }
    }

    /// The exchange of a handler: `exchange` (name, overriding the attribute's), `exchange_type`,
    /// `exchange_durable`, `exchange_auto_delete`, `exchange_arguments`.
    pub fn from_config(handler: &HandlerSection<'_>, declared: &str) -> Result<Self, ConfigError> {
        Ok(Self {
            name: amqp_name(
                handler,
                "exchange",
                handler
                    .get_str("exchange")?
                    .unwrap_or_else(|| declared.to_string()),
            )?,
            kind: parse_kind(handler)?,
            durable: handler.get_or("exchange_durable", true)?,
            auto_delete: handler.get_or("exchange_auto_delete", false)?,
            arguments: parse_arguments(handler, "exchange_arguments")?,
        })
    }

    /// Declares the exchange on `channel`, a channel to `broker` (`host:port`, for errors). The
    /// default exchange, `""`, needs no declaration.
    pub async fn declare(&self, channel: &Channel, broker: &str) -> Result<(), BrokerError> {
        if self.name.is_empty() {
            return Ok(());
        }
        let options = ExchangeDeclareOptions {
            durable: self.durable,
            auto_delete: self.auto_delete,
            ..Default::default()
        };
        channel
            .exchange_declare(
                &self.name,
                self.kind.clone(),
                options,
                self.arguments.clone(),
            )
            .await
            .map_err(|e| BrokerError::from_lapin(&e, Resource::Exchange(self.name.clone()), broker))
    }

    /// The exchange type as the broker names it.
    pub fn kind_name(&self) -> &str {
        match &self.kind {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Headers => "headers",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Custom(name) => name,
        }
    }
}

impl QueueSettings {
    /// The queue of a handler: `<handler>.queue` (default: the attribute's, else
    /// `<service>.<handler>`), `queue_durable`, `queue_auto_delete`, `queue_exclusive`,
    /// `queue_arguments`, `binding_arguments`. The name is read only handler-scoped: a `queue`
    /// shared by several handlers would make them take each other's messages.
    pub fn from_config(
        handler: &HandlerSection<'_>,
        declared: Option<&str>,
        default_name: String,
    ) -> Result<Self, ConfigError> {
        let name = match handler_queue_name(handler, "queue", false)? {
            Some(name) => name,
            None => declared.map(str::to_string).unwrap_or(default_name),
        };
        Self::named(handler, amqp_name(handler, "queue", name)?)
    }

    /// A queue named `name` with the handler's other queue options (`queue_durable`, ...,
    /// `binding_arguments`): the RPC server's, whose name is `rpc_queue`.
    pub fn named(handler: &HandlerSection<'_>, name: String) -> Result<Self, ConfigError> {
        let mut queue = Self {
            name,
            durable: handler.get_or("queue_durable", true)?,
            auto_delete: handler.get_or("queue_auto_delete", false)?,
            exclusive: handler.get_or("queue_exclusive", false)?,
            arguments: parse_arguments(handler, "queue_arguments")?,
            binding_arguments: parse_arguments(handler, "binding_arguments")?,
        };
        if let Some(kind) = queue_type(handler)? {
            queue.set_type(handler, kind, "queue_arguments")?;
            if kind != QueueType::Classic {
                for (key, wrong, value) in [
                    ("queue_durable", !queue.durable, "false"),
                    ("queue_auto_delete", queue.auto_delete, "true"),
                    ("queue_exclusive", queue.exclusive, "true"),
                ] {
                    if wrong {
                        return Err(handler.section().invalid(
                            key,
                            value,
                            format!(
                                "the default with queue_type = {0}: a {0} queue is durable, shared and kept",
                                kind.as_str()
                            ),
                        ));
                    }
                }
            }
        }
        Ok(queue)
    }

    /// Puts `x-queue-type = kind` in the queue's arguments; an error naming `arguments_key`
    /// when that table gives another type.
    pub(crate) fn set_type(
        &mut self,
        handler: &HandlerSection<'_>,
        kind: QueueType,
        arguments_key: &str,
    ) -> Result<(), ConfigError> {
        let wanted = AMQPValue::LongString(kind.as_str().into());
        match self.arguments.inner().get("x-queue-type") {
            Some(AMQPValue::LongString(given)) if given.to_string() == kind.as_str() => Ok(()),
            Some(other) => Err(handler.section().invalid(
                "queue_type",
                kind.as_str(),
                format!("the queue type {arguments_key} gives ({other:?}), or leave x-queue-type out of {arguments_key}"),
            )),
            None => {
                self.arguments.insert("x-queue-type".into(), wanted);
                Ok(())
            }
        }
    }

    /// A plain durable queue of farine's own (a retry or dead-letter queue) with `arguments`.
    pub(crate) fn companion(name: String, durable: bool, arguments: FieldTable) -> Self {
        Self {
            name,
            durable,
            auto_delete: false,
            exclusive: false,
            arguments,
            binding_arguments: FieldTable::default(),
        }
    }

    /// Declares the queue on `channel` (a channel to `broker`).
    pub async fn declare(&self, channel: &Channel, broker: &str) -> Result<(), BrokerError> {
        let options = QueueDeclareOptions {
            durable: self.durable,
            auto_delete: self.auto_delete,
            exclusive: self.exclusive,
            ..Default::default()
        };
        channel
            .queue_declare(&self.name, options, self.arguments.clone())
            .await
            .map(|_| ())
            .map_err(|e| BrokerError::from_lapin(&e, Resource::Queue(self.name.clone()), broker))
    }

    /// Declares the queue and binds it to `exchange` with `routing_key` (and the binding
    /// arguments).
    pub async fn declare_and_bind(
        &self,
        channel: &Channel,
        broker: &str,
        exchange: &ExchangeSettings,
        routing_key: &str,
    ) -> Result<(), BrokerError> {
        self.declare(channel, broker).await?;
        if exchange.name.is_empty() {
            // Every queue is bound to the default exchange by its name already.
            return Ok(());
        }
        channel
            .queue_bind(
                &self.name,
                &exchange.name,
                routing_key,
                QueueBindOptions::default(),
                self.binding_arguments.clone(),
            )
            .await
            .map_err(|e| {
                let binding = Resource::Binding {
                    queue: self.name.clone(),
                    exchange: exchange.name.clone(),
                    routing_key: routing_key.to_string(),
                };
                BrokerError::from_lapin(&e, binding, broker)
            })
    }
}

/// A queue of this connection alone: server-named, exclusive, auto-deleted, consumed without
/// acks. An RPC caller's reply queue and an RPC server's control queue are such queues.
pub(crate) async fn private_queue(
    channel: &Channel,
) -> lapin::Result<(lapin::types::ShortString, Consumer)> {
    let queue = channel
        .queue_declare(
            "",
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let consumer = channel
        .basic_consume(
            queue.name.as_str(),
            "",
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok((queue.name, consumer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn defaults_follow_the_seed() {
        let config = Config::from_ini("[svc]\n", "f.ini").unwrap();
        let section = config.section("svc").unwrap();
        let handler = section.handler("on_order");
        let exchange = ExchangeSettings::from_config(&handler, "orders").unwrap();
        assert_eq!(exchange.name, "orders");
        assert_eq!(exchange.kind, ExchangeKind::Direct);
        assert!(exchange.durable && !exchange.auto_delete);
        let queue = QueueSettings::from_config(&handler, None, "svc.on_order".into()).unwrap();
        assert_eq!(queue.name, "svc.on_order");
        assert!(queue.durable && !queue.auto_delete && !queue.exclusive);
    }

    #[test]
    fn the_section_and_the_handler_scope_override_the_defaults() {
        let text = "[svc]\nexchange_type = topic\non_order.queue = mine\non_order.exchange = o2\nexchange_durable = no\nqueue = shared\n";
        let config = Config::from_ini(text, "f.ini").unwrap();
        let section = config.section("svc").unwrap();
        let handler = section.handler("on_order");
        let exchange = ExchangeSettings::from_config(&handler, "orders").unwrap();
        assert_eq!(exchange.name, "o2");
        assert_eq!(exchange.kind, ExchangeKind::Topic);
        assert!(!exchange.durable);
        let queue = QueueSettings::from_config(&handler, Some("attr"), "x".into()).unwrap();
        assert_eq!(queue.name, "mine");
        // A section-wide `queue` is refused: handlers would share it.
        let other = section.handler("other");
        let error = QueueSettings::from_config(&other, Some("attr"), "x".into()).unwrap_err();
        assert!(error.to_string().contains("`other.queue = ...`"), "{error}");
    }

    #[test]
    fn arguments_are_typed_integers_booleans_and_strings_one_per_line_or_comma_separated() {
        let text = "[svc]\nqueue_arguments =\n    x-queue-type = quorum\n    x-max-length = 1000\nh.binding_arguments = x-match = all, format = \"42\", draft = false\n";
        let config = Config::from_ini(text, "f.ini").unwrap();
        let section = config.section("svc").unwrap();
        let queue = QueueSettings::from_config(&section.handler("h"), None, "q".into()).unwrap();
        let args = queue.arguments.inner();
        assert_eq!(
            args.get("x-queue-type"),
            Some(&AMQPValue::LongString("quorum".into()))
        );
        assert_eq!(
            args.get("x-max-length"),
            Some(&AMQPValue::LongLongInt(1000))
        );
        let binding = queue.binding_arguments.inner();
        assert_eq!(
            binding.get("x-match"),
            Some(&AMQPValue::LongString("all".into()))
        );
        assert_eq!(
            binding.get("format"),
            Some(&AMQPValue::LongString("42".into()))
        );
        assert_eq!(binding.get("draft"), Some(&AMQPValue::Boolean(false)));
        // Another handler has the section's queue arguments but not h's binding.
        let other = QueueSettings::from_config(&section.handler("o"), None, "o".into()).unwrap();
        assert!(other.binding_arguments.inner().is_empty());
        assert_eq!(other.arguments, queue.arguments);
    }

    #[test]
    fn an_argument_without_a_value_is_a_config_error_naming_the_key() {
        let config = Config::from_ini("[svc]\nqueue_arguments = x-max-length\n", "f.ini").unwrap();
        let section = config.section("svc").unwrap();
        let err = QueueSettings::from_config(&section.handler("h"), None, "q".into())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("queue_arguments") && err.contains("name = value"),
            "{err}"
        );
    }

    #[test]
    fn an_unknown_exchange_type_is_a_config_error_listing_the_valid_ones() {
        let config = Config::from_ini("[svc]\nexchange_type = fan-out\n", "f.ini").unwrap();
        let section = config.section("svc").unwrap();
        let err = ExchangeSettings::from_config(&section.handler("h"), "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("exchange_type") && err.contains("direct, topic, fanout, headers"));
    }
}
