//! Exchanges and queues: what farine declares for each handler, and how the config changes it.
//!
//! The defaults follow the seed: exchanges are `direct`, durable and not auto-deleted; queues are
//! durable; each `#[consume]` handler has a queue of its own named `<service>.<handler>`, so two
//! handlers of a service never take each other's messages while several processes of one service
//! share each queue as competing consumers. `docs/topology.md` is the full account.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, ExchangeKind};

use crate::config::{ConfigError, HandlerSection};

/// An exchange as farine declares it.
#[derive(Debug, Clone, PartialEq)]
pub struct ExchangeSettings {
    pub name: String,
    pub kind: ExchangeKind,
    pub durable: bool,
    pub auto_delete: bool,
}

/// A queue as farine declares it.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSettings {
    pub name: String,
    pub durable: bool,
    pub auto_delete: bool,
    pub exclusive: bool,
}

/// A failure to declare or bind, naming what was being declared.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot open a channel: {0}")]
    Channel(String),
    #[error("cannot declare exchange `{exchange}`: {cause}")]
    Exchange { exchange: String, cause: String },
    #[error("cannot declare queue `{queue}`: {cause}")]
    Queue { queue: String, cause: String },
    #[error(
        "cannot bind queue `{queue}` to exchange `{exchange}` with routing key `{routing_key}`: {cause}"
    )]
    Bind {
        queue: String,
        exchange: String,
        routing_key: String,
        cause: String,
    },
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

impl ExchangeSettings {
    /// The default exchange (`""`): it routes by queue name and is never declared.
    pub fn default_exchange() -> Self {
        Self {
            name: String::new(),
            kind: ExchangeKind::Direct,
            durable: true,
            auto_delete: false,
        }
    }

    /// The exchange of a handler: `exchange` (name, overriding the attribute's), `exchange_type`,
    /// `exchange_durable`, `exchange_auto_delete`.
    pub fn from_config(handler: &HandlerSection<'_>, declared: &str) -> Result<Self, ConfigError> {
        Ok(Self {
            name: handler
                .get_str("exchange")?
                .unwrap_or_else(|| declared.to_string()),
            kind: parse_kind(handler)?,
            durable: handler.get_or("exchange_durable", true)?,
            auto_delete: handler.get_or("exchange_auto_delete", false)?,
        })
    }

    /// Declares the exchange (the default exchange, `""`, needs no declaration).
    pub async fn declare(&self, channel: &Channel) -> Result<(), TopologyError> {
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
                self.name.as_str().into(),
                self.kind.clone(),
                options,
                FieldTable::default(),
            )
            .await
            .map_err(|e| TopologyError::Exchange {
                exchange: self.name.clone(),
                cause: e.to_string(),
            })
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
    /// `<service>.<handler>`), `queue_durable`, `queue_auto_delete`, `queue_exclusive`. The name
    /// is read only handler-scoped: a `queue` shared by several handlers would make them take
    /// each other's messages.
    pub fn from_config(
        handler: &HandlerSection<'_>,
        declared: Option<&str>,
        default_name: String,
    ) -> Result<Self, ConfigError> {
        let name = match handler.get_own_str("queue")? {
            Some(name) => name,
            None => declared.map(str::to_string).unwrap_or(default_name),
        };
        Ok(Self {
            name,
            durable: handler.get_or("queue_durable", true)?,
            auto_delete: handler.get_or("queue_auto_delete", false)?,
            exclusive: handler.get_or("queue_exclusive", false)?,
        })
    }

    /// Declares the queue and binds it to `exchange` with `routing_key`.
    pub async fn declare_and_bind(
        &self,
        channel: &Channel,
        exchange: &ExchangeSettings,
        routing_key: &str,
    ) -> Result<(), TopologyError> {
        let options = QueueDeclareOptions {
            durable: self.durable,
            auto_delete: self.auto_delete,
            exclusive: self.exclusive,
            ..Default::default()
        };
        channel
            .queue_declare(self.name.as_str().into(), options, FieldTable::default())
            .await
            .map_err(|e| TopologyError::Queue {
                queue: self.name.clone(),
                cause: e.to_string(),
            })?;
        if exchange.name.is_empty() {
            // Every queue is bound to the default exchange by its name already.
            return Ok(());
        }
        channel
            .queue_bind(
                self.name.as_str().into(),
                exchange.name.as_str().into(),
                routing_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| TopologyError::Bind {
                queue: self.name.clone(),
                exchange: exchange.name.clone(),
                routing_key: routing_key.to_string(),
                cause: e.to_string(),
            })
    }
}

/// A queue of this connection alone: server-named, exclusive, auto-deleted, consumed without
/// acks. An RPC caller's reply queue and an RPC server's control queue are such queues.
pub(crate) async fn private_queue(
    channel: &Channel,
) -> lapin::Result<(lapin::types::ShortString, lapin::Consumer)> {
    let queue = channel
        .queue_declare(
            "".into(),
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
            queue.name().clone(),
            "".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok((queue.name().clone(), consumer))
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
        // A section-wide `queue` is not taken: handlers would share it.
        let other = section.handler("other");
        let queue = QueueSettings::from_config(&other, Some("attr"), "x".into()).unwrap();
        assert_eq!(queue.name, "attr");
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
