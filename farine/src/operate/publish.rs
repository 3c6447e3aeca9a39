//! `farine publish EXCHANGE ROUTING_KEY BODY_JSON [--header NAME=VALUE]...`.
//!
//! The message goes out as a service's publisher sends it (`application/json`, persistent, a
//! unique `message_id`), with `mandatory` set and a publisher confirm awaited: the command
//! says whether the broker routed it to a queue, not only whether it took it.

use std::time::Duration;

use lapin::types::FieldTable;

use super::parse::{self, Header};
use super::{Broker, BrokerArgs, Failure, Options, print_line};
use crate::amqp::error::{BrokerError, Resource};
use crate::amqp::publisher::{PublishError, PublishOptions, Publisher, PublisherSettings};
use crate::amqp::topology::ExchangeSettings;

/// The bound on the publish, confirm included (the default `publish_timeout`).
const TIMEOUT: Duration = Duration::from_secs(10);

/// The arguments of `farine publish`.
#[derive(Debug, Clone, clap::Args)]
pub struct PublishArgs {
    /// The exchange; '' is the default exchange, which routes to the queue named by the
    /// routing key.
    #[arg(value_name = "EXCHANGE")]
    exchange: String,
    /// The routing key.
    #[arg(value_name = "ROUTING_KEY")]
    routing_key: String,
    /// The body: JSON, sent as written, such as '{"id": 1}'.
    #[arg(value_name = "BODY_JSON", value_parser = parse::json_text)]
    body: String,
    /// A header, repeatable: `x-tenant=acme`. A whole number is sent as an integer, true or
    /// false as a boolean, anything else (or a value in double quotes) as a string.
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = parse::header)]
    headers: Vec<Header>,
    #[command(flatten)]
    broker: BrokerArgs,
}

/// Publishes the message and waits for the confirm; prints where it went.
pub(super) async fn run(args: PublishArgs, options: &Options<'_>) -> Result<(), Failure> {
    let broker = Broker::for_sending(&args.broker, options.config)?;
    let to = match args.exchange.as_str() {
        "" => "the default exchange".to_string(),
        name => name.to_string(),
    };
    let connector = broker
        .connect(options, &format!("farine publish to {to}"))
        .await?;
    let publisher = Publisher::new(
        connector.clone(),
        ExchangeSettings {
            name: args.exchange.clone(),
            ..ExchangeSettings::default_exchange()
        },
        args.routing_key.clone(),
        PublisherSettings {
            persistent: true,
            timeout: TIMEOUT,
            // Declaring it could change nothing but its absence: a missing exchange is an
            // error to report, as the services that consume from it declare it.
            declare_exchange: false,
            mandatory: true,
            ..PublisherSettings::default()
        },
    );
    let mut headers = FieldTable::default();
    for header in args.headers {
        headers.insert(header.name.into(), header.value);
    }
    let options = PublishOptions {
        headers: Some(headers),
        mandatory: Some(true),
        persistent: Some(true),
        ..PublishOptions::default()
    };
    let sent = publisher.publish_bytes(args.body.as_bytes(), options).await;
    publisher.close_within(TIMEOUT).await;
    connector.close().await;
    match sent {
        Ok(()) => print_line(&format!(
            "published to {to} with routing key {} (confirmed)",
            args.routing_key
        )),
        Err(PublishError::Broker(BrokerError::NoRoute { .. })) => Err(Failure::failed(format!(
            "no queue is bound to {} for routing key `{}` (312 NO_ROUTE): the broker returned the message, nobody received it",
            Resource::Exchange(args.exchange.clone()),
            args.routing_key
        ))),
        Err(e) => Err(Failure::failed(e)),
    }
}
