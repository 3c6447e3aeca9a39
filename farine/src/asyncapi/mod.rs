//! The AsyncAPI 3.0 document of a module's services, as its config resolves them:
//! `farine --start=MODULE --asyncapi`. Everything comes from the registry (each handler's
//! exchange, routing key and queue, as `--list` resolves them) and from the JSON Schemas of the
//! handlers' Rust types (`handler::schema`); nothing is written by hand but the RPC envelope.
//!
//! The mapping (`docs/asyncapi.md` says it for users):
//! - a server per AMQP node the services connect to (no credentials);
//! - a channel per exchange and routing key a handler consumes from or publishes to (AMQP
//!   channel binding `is: routingKey`, with the exchange, and the queues the module's
//!   consumers bind there under `x-farine-queues`);
//! - an RPC method's requests on the channel of its routing key (`<service>__<method>` on
//!   exchange `<service>`), a `#[rpc::client]`'s on the channel of the service it calls
//!   (address `<service>__{method}`), replies on one reply channel (the caller's reply queue,
//!   through the default exchange);
//! - `receive` operations for `#[consume]` and `#[rpc::method]`, `send` for `#[publish]` and
//!   `#[rpc::client]`, the RPC ones with a `reply`;
//! - a message per handler, its payload the JSON Schema of its type (draft 7, named types under
//!   `components/schemas`), or an open schema that names a type without one; the RPC envelope
//!   (request, reply item, end marker, error) once, in `components`.
//!
//! `#[stream::http]` and `#[execute]` handlers touch no broker channel: they are not in the
//! document (what they publish is, through their `#[publish]` methods).

mod yaml;

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::config::{Config, ConfigError};
use crate::handler::schema::{Payload, Payloads, Schemas};
use crate::handler::{Description, ExchangeDescription, HandlerKind, QueueDescription};
use crate::registry::{HandlerInfo, ServiceEntry};

pub use yaml::to_yaml;

/// The version of the AMQP bindings objects the document uses.
const BINDING_VERSION: &str = "0.3.0";
/// The id of the channel every RPC reply goes to.
const REPLY_CHANNEL: &str = "farine.rpc.reply";
/// The reusable messages of the RPC envelope.
const RPC_REQUEST: &str = "farine.rpc.request";
const RPC_REPLY: &str = "farine.rpc.reply";
const RPC_END: &str = "farine.rpc.end";
const RPC_ERROR: &str = "farine.rpc.error";

/// Why no document could be made.
#[derive(Debug, thiserror::Error)]
pub enum AsyncApiError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Nothing(String),
}

/// The AsyncAPI 3.0 document of the services of module `module` (version `version`) that
/// `config` starts: those with a section that are not disabled.
pub fn document(module: &str, version: &str, config: &Config) -> Result<Value, AsyncApiError> {
    let mut builder = Builder::default();
    let mut described = Vec::new();
    for entry in ServiceEntry::all() {
        if !config.has_section(entry.name) {
            continue;
        }
        let section = entry.section(config)?;
        if !section.get_or("enabled", true)? {
            continue;
        }
        let uri = section
            .get_str("amqp_uri")?
            .unwrap_or_else(|| crate::runtime::DEFAULT_AMQP_URI.to_string());
        let servers = builder.servers(&uri).map_err(|cause| {
            section.invalid(
                "amqp_uri",
                &uri,
                format!("amqp://user:password@host:port/vhost (or amqps://), several separated by commas: {cause}"),
            )
        })?;
        let payloads: BTreeMap<_, _> = entry.payloads(&mut builder.schemas).into_iter().collect();
        let handlers = entry.handlers();
        let targets: BTreeMap<_, _> = handlers
            .iter()
            .filter_map(|info| match info {
                HandlerInfo::RpcClient { name, spec } => Some((*name, spec.service)),
                _ => None,
            })
            .collect();
        let streams = |handler: &str| {
            handlers.iter().any(|info| {
                matches!(info, HandlerInfo::Rpc { name, spec } if *name == handler && spec.stream)
            })
        };
        for handler in entry.describe(&section) {
            let description = handler.description?;
            let payloads = payloads.get(handler.handler).cloned().unwrap_or_default();
            match handler.kind {
                HandlerKind::Consume | HandlerKind::Publish => {
                    builder.message_handler(&description, &payloads, &servers)
                }
                HandlerKind::RpcMethod => {
                    builder.rpc_method(&description, &payloads, streams(handler.handler), &servers)
                }
                HandlerKind::RpcClient => {
                    let target = targets.get(handler.handler).copied().unwrap_or_default();
                    builder.rpc_client(&description, target, &servers)
                }
                _ => {}
            }
        }
        described.push(entry.name);
    }
    if described.is_empty() {
        return Err(AsyncApiError::Nothing(format!(
            "no service of module `{module}` is configured in {}: a service is described when the file has a section named after it",
            config.file()
        )));
    }
    Ok(builder.finish(module, version, &described, config.file()))
}

/// An AMQP node the document names: its URI without credentials, its server id, its vhost.
struct Node {
    key: String,
    id: String,
    vhost: String,
}

/// The parts of the document as they are gathered.
#[derive(Default)]
struct Builder {
    schemas: Schemas,
    /// Server id -> server object.
    servers: BTreeMap<String, Value>,
    /// The nodes named so far, in order of first use.
    nodes: Vec<Node>,
    channels: BTreeMap<String, Map<String, Value>>,
    /// (servers, exchange, routing key) -> channel id.
    channel_ids: BTreeMap<(String, String, String), String>,
    operations: BTreeMap<String, Value>,
    messages: BTreeMap<String, Value>,
    /// An RPC method or client is described: the envelope and reply channel go in.
    rpc: bool,
}

impl Builder {
    /// The ids of the servers of `uri` (each node of a cluster), added when new.
    fn servers(&mut self, uri: &str) -> Result<Vec<String>, String> {
        if crate::amqp::connection::memory_name(uri).is_some() {
            // The test kit's in-memory broker: no server to name.
            return Ok(Vec::new());
        }
        let nodes = crate::amqp::connection::parse_nodes(uri)?;
        let mut ids = Vec::new();
        for node in nodes {
            let scheme = match node.scheme {
                lapin::uri::AMQPScheme::AMQP => "amqp",
                lapin::uri::AMQPScheme::AMQPS => "amqps",
            };
            let host = format!("{}:{}", node.authority.host, node.authority.port);
            let key = format!("{scheme}://{host}/{}", node.vhost);
            if let Some(known) = self.nodes.iter().find(|known| known.key == key) {
                ids.push(known.id.clone());
                continue;
            }
            let id = match self.nodes.len() {
                0 => "amqp".to_string(),
                n => format!("amqp-{}", n + 1),
            };
            let mut server = json!({
                "host": host,
                "protocol": scheme,
                "protocolVersion": "0.9.1",
                "description": format!("RabbitMQ node (virtual host `{}`)", node.vhost),
            });
            if node.vhost != "/" {
                server["pathname"] = Value::from(format!("/{}", node.vhost));
            }
            self.servers.insert(id.clone(), server);
            self.nodes.push(Node {
                key,
                id: id.clone(),
                vhost: node.vhost,
            });
            ids.push(id);
        }
        Ok(ids)
    }

    /// The channel of `exchange` and `address` (a routing key), made when new; its id.
    fn channel(
        &mut self,
        exchange: &ExchangeDescription,
        address: &str,
        servers: &[String],
    ) -> String {
        self.named_channel(
            &format!("{}.{address}", exchange.name),
            exchange,
            address,
            servers,
        )
    }

    /// [`Self::channel`], its id made from `name` when it is new.
    fn named_channel(
        &mut self,
        name: &str,
        exchange: &ExchangeDescription,
        address: &str,
        servers: &[String],
    ) -> String {
        // The same names on another broker or virtual host are another exchange.
        let key = (
            servers.join(","),
            exchange.name.clone(),
            address.to_string(),
        );
        if let Some(id) = self.channel_ids.get(&key) {
            return id.clone();
        }
        let id = unique(&identifier(name), |id| {
            self.channels.contains_key(id) || id == REPLY_CHANNEL
        });
        let kind = match exchange.kind.as_str() {
            kind @ ("topic" | "direct" | "fanout" | "headers") => kind,
            _ => "direct",
        };
        let mut channel = Map::new();
        channel.insert("address".into(), Value::from(address));
        channel.insert(
            "description".into(),
            Value::from(format!(
                "Routing key `{address}` on the {} exchange `{}`.",
                exchange.kind, exchange.name
            )),
        );
        channel.insert("messages".into(), json!({}));
        channel.insert(
            "bindings".into(),
            json!({ "amqp": {
                "is": "routingKey",
                "exchange": {
                    "name": exchange.name,
                    "type": kind,
                    "durable": exchange.durable,
                    "autoDelete": exchange.auto_delete,
                    "vhost": self.vhost(servers),
                },
                "bindingVersion": BINDING_VERSION,
            }}),
        );
        if !servers.is_empty() {
            channel.insert(
                "servers".into(),
                servers
                    .iter()
                    .map(|id| json!({ "$ref": format!("#/servers/{id}") }))
                    .collect(),
            );
        }
        self.channels.insert(id.clone(), channel);
        self.channel_ids.insert(key, id.clone());
        id
    }

    /// The virtual host of the first of `servers`.
    fn vhost(&self, servers: &[String]) -> String {
        servers
            .first()
            .and_then(|id| self.nodes.iter().find(|known| known.id == *id))
            .map_or_else(|| "/".to_string(), |known| known.vhost.clone())
    }

    /// Lists `queue`, which `consumer` reads, among the queues bound to `channel` (its AMQP
    /// binding's `x-farine-queues`).
    fn add_queue(&mut self, channel: &str, queue: &QueueDescription, consumer: String) {
        let Some(binding) = self
            .channels
            .get_mut(channel)
            .and_then(|c| c.get_mut("bindings"))
            .and_then(|b| b.get_mut("amqp"))
            .and_then(Value::as_object_mut)
        else {
            return;
        };
        let entry = json!({
            "name": queue.name,
            "durable": queue.durable,
            "exclusive": queue.exclusive,
            "autoDelete": queue.auto_delete,
            "arguments": queue.arguments,
            "consumer": consumer,
        });
        match binding
            .entry("x-farine-queues")
            .or_insert_with(|| json!([]))
        {
            Value::Array(queues) => queues.push(entry),
            other => *other = json!([entry]),
        }
    }

    /// An id for a message or operation made of `name`, not yet taken in `map` nor one of
    /// the envelope's.
    fn fresh(name: &str, map: &BTreeMap<String, Value>) -> String {
        unique(&identifier(name), |id| {
            map.contains_key(id) || [RPC_REQUEST, RPC_REPLY, RPC_END, RPC_ERROR].contains(&id)
        })
    }

    /// Puts `message` (a component) on `channel` under its id; the reference an operation uses.
    fn on_channel(&mut self, channel: &str, message: &str) -> Value {
        if let Some(messages) = self
            .channels
            .get_mut(channel)
            .and_then(|c| c.get_mut("messages"))
            .and_then(Value::as_object_mut)
        {
            messages.insert(
                message.to_string(),
                json!({ "$ref": format!("#/components/messages/{message}") }),
            );
        }
        json!({ "$ref": format!("#/channels/{channel}/messages/{message}") })
    }

    /// A `#[consume]` handler (`receive`) or a `#[publish]` method (`send`).
    fn message_handler(
        &mut self,
        description: &Description,
        payloads: &Payloads,
        servers: &[String],
    ) {
        let Some(exchange) = &description.exchange else {
            return;
        };
        let routing_key = description.routing_key.clone().unwrap_or_default();
        let channel = self.channel(exchange, &routing_key, servers);
        let name = format!("{}.{}", description.service, description.handler);
        let id = Self::fresh(&name, &self.messages);
        let consumes = description.kind == HandlerKind::Consume;
        let mut message = json!({
            "name": description.handler,
            "title": format!("{}.{}", description.service, description.handler),
            "contentType": "application/json",
        });
        match &payloads.body {
            Some(payload) => self.payload(&mut message, payload),
            None => {
                message["payload"] = json!({});
                message["description"] = Value::from(if consumes {
                    "The handler takes no body."
                } else {
                    "What the method sends is not named by its signature (one parameter after the publisher): any JSON."
                });
            }
        }
        if let (true, Some(queue)) = (consumes, &description.queue) {
            let consumer = format!("{}.{}", description.service, description.handler);
            self.add_queue(&channel, queue, consumer);
        }
        self.messages.insert(id.clone(), message);
        let reference = self.on_channel(&channel, &id);
        self.operation(description, consumes, &channel, reference, None);
    }

    /// An `#[rpc::method]`: `receive` its requests on its routing key's channel, reply on the
    /// reply channel.
    fn rpc_method(
        &mut self,
        description: &Description,
        payloads: &Payloads,
        streams: bool,
        servers: &[String],
    ) {
        let Some(exchange) = &description.exchange else {
            return;
        };
        self.rpc = true;
        let routing_key = description.routing_key.clone().unwrap_or_default();
        let channel = self.channel(exchange, &routing_key, servers);
        let name = format!("{}.{}", description.service, description.handler);
        if let Some(queue) = &description.queue {
            let consumer = format!("{} (RPC server)", description.service);
            self.add_queue(&channel, queue, consumer);
        }
        // The request: the envelope, its arguments typed.
        let mut items = Vec::new();
        let mut properties = Map::new();
        for (name, payload) in &payloads.arguments {
            let schema = self.schema_of(payload);
            items.push(schema.clone());
            properties.insert((*name).to_string(), schema);
        }
        let count = items.len();
        let request = Self::fresh(&format!("{name}.request"), &self.messages);
        self.messages.insert(
            request.clone(),
            json!({
                "name": format!("{}.request", description.handler),
                "title": format!("Call of {}.{}", description.service, description.handler),
                "summary": format!("The arguments of `{}`, positional (`args`, in order) or by name (`kwargs`).", description.handler),
                "contentType": "application/json",
                "correlationId": { "location": "$message.header#/correlation_id" },
                "payload": {
                    "allOf": [
                        { "$ref": "#/components/schemas/farine.rpc.Request" },
                        {
                            "type": "object",
                            "properties": {
                                "args": { "type": "array", "items": items, "maxItems": count, "additionalItems": false },
                                "kwargs": {
                                    "type": "object",
                                    "properties": properties,
                                    // Protocol flags (`__stream__`) are allowed beside the names.
                                    "patternProperties": { "^__.+__$": {} },
                                    "additionalProperties": false,
                                },
                            },
                        },
                    ],
                },
            }),
        );
        let reference = self.on_channel(&channel, &request);
        // The reply: each item (the result, for a unary method) typed, then the end marker.
        let reply = Self::fresh(&format!("{name}.reply"), &self.messages);
        let body = payloads
            .reply
            .as_ref()
            .map_or_else(|| json!({}), |payload| self.schema_of(payload));
        self.messages.insert(
            reply.clone(),
            json!({
                "name": format!("{}.reply", description.handler),
                "title": format!("Reply of {}.{}", description.service, description.handler),
                "summary": if streams {
                    "One item of the stream; the end marker follows the last."
                } else {
                    "The result; the end marker follows unless the call was made with `type = farine.single`."
                },
                "contentType": "application/json",
                "correlationId": { "location": "$message.header#/correlation_id" },
                "payload": {
                    "allOf": [
                        { "$ref": "#/components/schemas/farine.rpc.Reply" },
                        { "type": "object", "properties": { "body": body } },
                    ],
                },
            }),
        );
        let replies = self.reply_channel(&[&reply]);
        self.operation(description, true, &channel, reference, Some(replies));
    }

    /// A `#[rpc::client]` method: `send` requests to the methods of service `target`.
    fn rpc_client(&mut self, description: &Description, target: &str, servers: &[String]) {
        self.rpc = true;
        let exchange = ExchangeDescription {
            name: target.to_string(),
            kind: "direct".into(),
            durable: true,
            auto_delete: false,
        };
        let address = format!("{target}__{{method}}");
        let channel = self.named_channel(&format!("{target}.rpc"), &exchange, &address, servers);
        if let Some(channel) = self.channels.get_mut(&channel) {
            channel.insert(
                "parameters".into(),
                json!({ "method": { "description": format!("The method of `{target}` called.") } }),
            );
        }
        let reference = self.on_channel(&channel, RPC_REQUEST);
        let replies = self.reply_channel(&[RPC_REPLY]);
        self.operation(description, false, &channel, reference, Some(replies));
    }

    /// The handler's operation: `receive` (acked) or `send` of `message` (a reference) on
    /// `channel`, with an RPC `reply`.
    fn operation(
        &mut self,
        description: &Description,
        receives: bool,
        channel: &str,
        message: Value,
        reply: Option<Value>,
    ) {
        let name = format!("{}.{}", description.service, description.handler);
        let mut operation = json!({
            "action": if receives { "receive" } else { "send" },
            "channel": { "$ref": format!("#/channels/{channel}") },
            "title": name,
            "summary": summary(description),
            "messages": [message],
        });
        if receives {
            operation["bindings"] =
                json!({ "amqp": { "ack": true, "bindingVersion": BINDING_VERSION } });
        }
        if let Some(reply) = reply {
            operation["reply"] = reply;
        }
        let id = Self::fresh(&name, &self.operations);
        self.operations.insert(id, operation);
    }

    /// The reply channel, with `messages` and the envelope's end marker and error on it; the
    /// `reply` object of an RPC operation.
    fn reply_channel(&mut self, messages: &[&str]) -> Value {
        if !self.channels.contains_key(REPLY_CHANNEL) {
            let mut channel = Map::new();
            channel.insert("address".into(), Value::Null);
            channel.insert(
                "description".into(),
                Value::from("The caller's reply queue (server-named, exclusive, auto-delete), reached through the default exchange with its name as the routing key: the request's `reply_to`."),
            );
            channel.insert("messages".into(), json!({}));
            channel.insert(
                "bindings".into(),
                json!({ "amqp": {
                    "is": "routingKey",
                    "exchange": { "name": "", "type": "default" },
                    "bindingVersion": BINDING_VERSION,
                }}),
            );
            self.channels.insert(REPLY_CHANNEL.to_string(), channel);
        }
        let references: Vec<Value> = messages
            .iter()
            .chain([&RPC_END, &RPC_ERROR])
            .map(|message| self.on_channel(REPLY_CHANNEL, message))
            .collect();
        json!({
            "address": {
                "location": "$message.header#/reply_to",
                "description": "The request's `reply_to` property.",
            },
            "channel": { "$ref": format!("#/channels/{REPLY_CHANNEL}") },
            "messages": references,
        })
    }

    /// The schema of `payload`: its own, or an open one naming the Rust type.
    fn schema_of(&self, payload: &Payload) -> Value {
        match payload {
            Payload::Schema(Value::Bool(true)) => json!({}),
            Payload::Schema(schema) => schema.clone(),
            Payload::Open(written) => json!({
                "description": format!("Any JSON (the Rust type `{written}` has no JSON Schema)."),
                "x-farine-rust-type": written,
            }),
        }
    }

    /// `message`'s payload from `payload`, with a note for a type without a schema.
    fn payload(&self, message: &mut Value, payload: &Payload) {
        message["payload"] = self.schema_of(payload);
        if let Payload::Open(written) = payload {
            message["description"] = Value::from(format!(
                "The Rust type `{written}` has no JSON Schema: any JSON is shown. Derive `schemars::JsonSchema` on it for its schema."
            ));
        }
    }

    fn finish(mut self, module: &str, version: &str, services: &[&str], file: &str) -> Value {
        let mut schemas = self.schemas.take_definitions();
        let mut messages: Map<String, Value> =
            std::mem::take(&mut self.messages).into_iter().collect();
        if self.rpc {
            envelope(&mut schemas, &mut messages);
        }
        let mut document = json!({
            "asyncapi": "3.0.0",
            "info": {
                "title": module,
                "version": version,
                "description": format!(
                    "The services of module `{module}` ({}), as {file} configures them. Generated by farine {} (`farine --start={module} --asyncapi`).",
                    services.join(", "),
                    env!("CARGO_PKG_VERSION"),
                ),
            },
            "defaultContentType": "application/json",
            "servers": self.servers,
            "channels": self.channels,
            "operations": self.operations,
            "components": {
                "messages": messages,
            },
        });
        if !schemas.is_empty() {
            document["components"]["schemas"] = Value::Object(schemas);
        }
        document
    }
}

/// The RPC envelope, once: its schemas and its reusable messages.
fn envelope(schemas: &mut Map<String, Value>, messages: &mut Map<String, Value>) {
    schemas.insert(
        "farine.rpc.Request".into(),
        json!({
            "type": "object",
            "description": "An RPC request: positional arguments in `args`, the others by name in `kwargs`; either may be left out. Keyword arguments named `__x__` are protocol flags, ignored by servers.",
            "properties": {
                "args": { "type": "array", "default": [] },
                "kwargs": { "type": "object", "default": {} },
            },
        }),
    );
    schemas.insert(
        "farine.rpc.Reply".into(),
        json!({
            "type": "object",
            "description": "A result, or one item of a streamed result.",
            "required": ["body", "__end__"],
            "properties": { "body": {}, "__end__": { "const": false } },
        }),
    );
    schemas.insert(
        "farine.rpc.End".into(),
        json!({
            "type": "object",
            "description": "The end of a call's replies: nothing follows.",
            "required": ["__end__"],
            "properties": { "__end__": { "const": true } },
            "additionalProperties": false,
        }),
    );
    schemas.insert(
        "farine.rpc.Error".into(),
        json!({
            "type": "object",
            "description": "The call failed; nothing follows. `__except__` is what baguette-messaging peers read; `error` is farine's.",
            "required": ["__except__"],
            "properties": {
                "__except__": { "type": "string" },
                "error": {
                    "type": "object",
                    "required": ["kind", "message"],
                    "properties": {
                        "kind": { "type": "string", "enum": ["remote", "panic", "bad_arguments", "unknown_method", "bad_request"] },
                        "message": { "type": "string" },
                        "service": { "type": "string" },
                        "method": { "type": "string" },
                        "param": { "type": "string" },
                    },
                },
            },
        }),
    );
    let correlation = json!({ "location": "$message.header#/correlation_id" });
    for (id, name, schema, summary) in [
        (
            RPC_REQUEST,
            "request",
            "Request",
            "An RPC request to any method of the service (published with `reply_to`, `correlation_id` and `mandatory`).",
        ),
        (RPC_REPLY, "reply", "Reply", "A result or stream item."),
        (RPC_END, "end", "End", "The end marker of a call's replies."),
        (
            RPC_ERROR,
            "error",
            "Error",
            "The error reply of a failed call.",
        ),
    ] {
        messages.insert(
            id.into(),
            json!({
                "name": name,
                "title": format!("farine RPC {name}"),
                "summary": summary,
                "contentType": "application/json",
                "correlationId": correlation,
                "payload": { "$ref": format!("#/components/schemas/farine.rpc.{schema}") },
            }),
        );
    }
}

/// What an operation's summary says: the handler as `--list` prints it.
fn summary(description: &Description) -> String {
    crate::config::redact::redact_uri(&description.to_string())
}

/// `text` as an id the document's keys and references accept: letters, digits, `.`, `-` and
/// `_`, any other character `_`.
fn identifier(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `id`, or `id-2`, `id-3`, ... the first that is not `taken`.
fn unique(id: &str, taken: impl Fn(&str) -> bool) -> String {
    if !taken(id) {
        return id.to_string();
    }
    (2..)
        .map(|n| format!("{id}-{n}"))
        .find(|candidate| !taken(candidate))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_keep_what_references_accept_and_replace_the_rest() {
        assert_eq!(identifier("orders.order.created"), "orders.order.created");
        assert_eq!(identifier("a/b {c}*#"), "a_b__c___");
        assert_eq!(unique("a", |id| id == "a" || id == "a-2"), "a-3");
    }
}
