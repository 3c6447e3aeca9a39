//! Replaying dead letters: what `--replay-dead-letters` does.
//!
//! A message that failed every attempt (or did not decode) waits in its handler's dead-letter
//! queue, `<queue>.dead`, with farine's headers saying why (`docs/consuming.md`). Once the
//! cause is fixed, a replay moves the messages that are there now back to the handler's
//! queue, with a fresh attempt count, each one published with a confirm before its dead
//! letter is acked: a replay interrupted half-way loses nothing (at worst one message is in
//! both queues).

use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;

use super::connection::Connector;
use super::error::{BrokerError, Resource};
use super::message::{
    ATTEMPT_HEADER, ERROR_HEADER, FAILED_AT_HEADER, QUEUE_HEADER, REASON_HEADER, without_expiration,
};

/// Moves the messages now in `dead_letter_queue` back to `queue`; returns how many.
pub async fn replay(
    connector: &Connector,
    dead_letter_queue: &str,
    queue: &str,
) -> Result<u64, BrokerError> {
    let conn = connector.connection().await?;
    let broker = connector.broker();
    let dead = |e: lapin::Error| {
        BrokerError::from_lapin(&e, Resource::Queue(dead_letter_queue.to_string()), &broker)
    };
    let channel = conn.create_channel().await.map_err(dead)?;
    channel
        .confirm_select(Default::default())
        .await
        .map_err(dead)?;
    let waiting = channel
        .queue_declare(
            dead_letter_queue,
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(dead)?
        .message_count;
    let mut moved = 0u64;
    // Only the messages there now: one that fails again comes back behind them.
    while moved < u64::from(waiting) {
        let Some(delivery) = channel
            .basic_get(dead_letter_queue, BasicGetOptions::default())
            .await
            .map_err(dead)?
        else {
            break;
        };
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        let mut fresh = FieldTable::default();
        for (name, value) in headers.inner() {
            let farine_state = [
                ATTEMPT_HEADER,
                ERROR_HEADER,
                REASON_HEADER,
                QUEUE_HEADER,
                FAILED_AT_HEADER,
            ]
            .contains(&name.as_str());
            if !farine_state && name.as_str() != "x-death" {
                fresh.insert(name.clone(), value.clone());
            }
        }
        headers = fresh;
        let properties = without_expiration(&delivery.properties).with_headers(headers);
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &delivery.data,
                properties,
            )
            .await
            .map_err(dead)?
            .await
            .map_err(dead)?;
        if let lapin::Confirmation::Ack(Some(_)) | lapin::Confirmation::Nack(_) = confirm {
            // The queue is gone or refused it: leave the dead letter where it is.
            return Err(BrokerError::NoRoute {
                exchange: String::new(),
                routing_key: queue.to_string(),
            });
        }
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(dead)?;
        moved += 1;
    }
    let _ = channel.close(200, "replay done").await;
    Ok(moved)
}
