//! Publishes `{"id": 1}` to exchange `orders` (routing key `order.created`) and prints what the
//! running `pubsub` service publishes to `audit` in return. Start the service first:
//! `farine --start=pubsub --config etc/farine.ini`, then `cargo run -p pubsub --example send_order`.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let uri =
        std::env::var("AMQP_URI").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into());
    let connection = Connection::connect(&uri, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;

    // A queue of our own on `audit`, gone when we disconnect.
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
    channel
        .queue_bind(
            queue.name().clone(),
            "audit".into(),
            "order.seen".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut audit = channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;

    let order = br#"{"id": 1}"#;
    channel
        .basic_publish(
            "orders".into(),
            "order.created".into(),
            BasicPublishOptions::default(),
            order,
            BasicProperties::default().with_content_type("application/json".into()),
        )
        .await?
        .await?;
    println!(
        "sent to orders (order.created): {}",
        String::from_utf8_lossy(order)
    );

    let delivery = tokio::time::timeout(Duration::from_secs(10), audit.next())
        .await
        .map_err(|_| "nothing arrived on audit within 10 s: is `farine --start=pubsub` running?")?
        .ok_or("the audit consumer was cancelled")??;
    println!(
        "received from audit ({}, {}): {}",
        delivery.routing_key,
        delivery
            .properties
            .content_type()
            .as_ref()
            .map_or("no content type", |c| c.as_str()),
        String::from_utf8_lossy(&delivery.data)
    );
    connection.close(200, "done".into()).await?;
    Ok(())
}
