//! The broker's behaviour, one statement per test, through the client API a caller uses.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{
    BasicProperties, ChannelState, Confirmation, ConnectionState, ErrorKind, ExchangeKind,
};
use tokio::time::Instant;

use super::*;

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in entries {
        table.insert((*key).into(), value.clone());
    }
    table
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

async fn open(broker: &Broker, name: &str) -> (Connection, Channel) {
    let connection = broker.connect(name);
    let channel = connection.create_channel().await.unwrap();
    (connection, channel)
}

async fn queue(channel: &Channel, name: &str, arguments: FieldTable) {
    channel
        .queue_declare(name, QueueDeclareOptions::default(), arguments)
        .await
        .unwrap();
}

async fn exchange(channel: &Channel, name: &str, kind: ExchangeKind) {
    channel
        .exchange_declare(
            name,
            kind,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
}

async fn bind(channel: &Channel, queue: &str, exchange: &str, key: &str) {
    channel
        .queue_bind(
            queue,
            exchange,
            key,
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
}

async fn publish_with(
    channel: &Channel,
    exchange: &str,
    key: &str,
    body: &str,
    properties: BasicProperties,
) -> lapin::Result<Confirmation> {
    channel
        .basic_publish(
            exchange,
            key,
            BasicPublishOptions::default(),
            body.as_bytes(),
            properties,
        )
        .await?
        .await
}

async fn publish(channel: &Channel, exchange: &str, key: &str, body: &str) {
    publish_with(channel, exchange, key, body, BasicProperties::default())
        .await
        .unwrap();
}

async fn consume(channel: &Channel, queue: &str) -> Consumer {
    channel
        .basic_consume(
            queue,
            "",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap()
}

async fn next(consumer: &mut Consumer) -> Delivery {
    tokio::time::timeout(Duration::from_secs(60), consumer.next())
        .await
        .expect("a delivery within 60 s")
        .expect("the stream is open")
        .expect("a delivery, not an error")
}

/// Whether the consumer receives nothing more without time passing.
async fn nothing_more(consumer: &mut Consumer) -> bool {
    tokio::time::timeout(Duration::from_millis(1), consumer.next())
        .await
        .is_err()
}

fn body(delivery: &Delivery) -> &str {
    std::str::from_utf8(&delivery.data).unwrap()
}

fn ready(broker: &Broker, queue: &str) -> Vec<String> {
    broker
        .peek(queue)
        .into_iter()
        .map(|(_, body)| String::from_utf8(body).unwrap())
        .collect()
}

fn code(error: &lapin::Error) -> u16 {
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => amqp.get_id(),
        other => panic!("not a protocol error: {other:?}"),
    }
}

fn reply(error: &lapin::Error) -> String {
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => amqp.get_message().to_string(),
        other => panic!("not a protocol error: {other:?}"),
    }
}

fn x_death(properties: &BasicProperties) -> Vec<FieldTable> {
    let headers = properties.headers().clone().unwrap_or_default();
    match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(array)) => array
            .as_slice()
            .iter()
            .map(|v| match v {
                AMQPValue::FieldTable(t) => t.clone(),
                other => panic!("x-death entry {other:?}"),
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn header<'a>(table: &'a FieldTable, key: &str) -> &'a AMQPValue {
    table
        .inner()
        .get(key)
        .unwrap_or_else(|| panic!("no {key} in {table:?}"))
}

// ----- routing -----

#[tokio::test]
async fn direct_exchange_routes_by_exact_key() {
    let broker = Broker::new();
    let (_c, ch) = open(&broker, "t").await;
    exchange(&ch, "orders", ExchangeKind::Direct).await;
    queue(&ch, "created", FieldTable::default()).await;
    queue(&ch, "all", FieldTable::default()).await;
    bind(&ch, "created", "orders", "order.created").await;
    bind(&ch, "all", "orders", "order.created").await;
    bind(&ch, "all", "orders", "order.deleted").await;
    publish(&ch, "orders", "order.created", "1").await;
    publish(&ch, "orders", "order.deleted", "2").await;
    publish(&ch, "orders", "order", "3").await;
    assert_eq!(ready(&broker, "created"), ["1"]);
    assert_eq!(ready(&broker, "all"), ["1", "2"]);
    let journal = broker.journal();
    assert_eq!(
        journal[0].outcome,
        PublishOutcome::Routed(vec!["created".into(), "all".into()])
    );
    assert_eq!(journal[2].outcome, PublishOutcome::Dropped);
}

#[tokio::test]
async fn topic_exchange_matches_star_and_hash_words() {
    let broker = Broker::new();
    let (_c, ch) = open(&broker, "t").await;
    exchange(&ch, "events", ExchangeKind::Topic).await;
    for (name, key) in [
        ("everything", "#"),
        ("a_hash_b", "a.#.b"),
        ("a_star", "a.*"),
        ("star_b", "*.b"),
    ] {
        queue(&ch, name, FieldTable::default()).await;
        bind(&ch, name, "events", key).await;
    }
    for key in ["", "a", "a.b", "a.x.y.b", "a.x", "b"] {
        publish(&ch, "events", key, key).await;
    }
    assert_eq!(
        ready(&broker, "everything"),
        ["", "a", "a.b", "a.x.y.b", "a.x", "b"]
    );
    // `#` between two words matches zero words too.
    assert_eq!(ready(&broker, "a_hash_b"), ["a.b", "a.x.y.b"]);
    assert_eq!(ready(&broker, "a_star"), ["a.b", "a.x"]);
    assert_eq!(ready(&broker, "star_b"), ["a.b"]);
}

#[tokio::test]
async fn fanout_exchange_ignores_the_key() {
    let broker = Broker::new();
    let (_c, ch) = open(&broker, "t").await;
    exchange(&ch, "fan", ExchangeKind::Fanout).await;
    queue(&ch, "a", FieldTable::default()).await;
    queue(&ch, "b", FieldTable::default()).await;
    bind(&ch, "a", "fan", "").await;
    bind(&ch, "b", "fan", "whatever").await;
    publish(&ch, "fan", "some.key", "m").await;
    assert_eq!(ready(&broker, "a"), ["m"]);
    assert_eq!(ready(&broker, "b"), ["m"]);
}

#[tokio::test]
async fn headers_exchange_matches_all_or_any() {
    let broker = Broker::new();
    let (_c, ch) = open(&broker, "t").await;
    exchange(&ch, "docs", ExchangeKind::Headers).await;
    queue(&ch, "all", FieldTable::default()).await;
    queue(&ch, "any", FieldTable::default()).await;
    let all = table(&[
        ("x-match", text("all")),
        ("format", text("pdf")),
        ("pages", AMQPValue::LongInt(2)),
    ]);
    let any = table(&[
        ("x-match", text("any")),
        ("format", text("pdf")),
        ("pages", AMQPValue::LongInt(2)),
    ]);
    ch.queue_bind("all", "docs", "", Default::default(), all)
        .await
        .unwrap();
    ch.queue_bind("any", "docs", "", Default::default(), any)
        .await
        .unwrap();
    let with =
        |entries: &[(&str, AMQPValue)]| BasicProperties::default().with_headers(table(entries));
    publish_with(
        &ch,
        "docs",
        "",
        "both",
        with(&[
            ("format", text("pdf")),
            ("pages", AMQPValue::LongLongInt(2)),
        ]),
    )
    .await
    .unwrap();
    publish_with(&ch, "docs", "", "one", with(&[("format", text("pdf"))]))
        .await
        .unwrap();
    publish_with(&ch, "docs", "", "none", with(&[("format", text("doc"))]))
        .await
        .unwrap();
    publish(&ch, "docs", "", "no headers").await;
    assert_eq!(ready(&broker, "all"), ["both"]);
    assert_eq!(ready(&broker, "any"), ["both", "one"]);
    let bad = table(&[("x-match", text("some"))]);
    let error = ch
        .queue_bind("all", "docs", "", Default::default(), bad)
        .await
        .unwrap_err();
    assert_eq!(code(&error), 406);
}

#[tokio::test]
async fn a_queue_gets_a_message_once_however_many_bindings_match() {
    let broker = Broker::new();
    let (_c, ch) = open(&broker, "t").await;
    exchange(&ch, "events", ExchangeKind::Topic).await;
    queue(&ch, "q", FieldTable::default()).await;
    bind(&ch, "q", "events", "a.*").await;
    bind(&ch, "q", "events", "#").await;
    bind(&ch, "q", "events", "a.b").await;
    publish(&ch, "events", "a.b", "m").await;
    assert_eq!(ready(&broker, "q"), ["m"]);
}

#[tokio::test]
async fn default_exchange_routes_by_queue_name_and_cannot_be_bound_or_declared() {
    let broker = Broker::new();
    let (_c, ch) = open(&broker, "t").await;
    queue(&ch, "q", FieldTable::default()).await;
    publish(&ch, "", "q", "m").await;
    publish(&ch, "", "nowhere", "lost").await;
    assert_eq!(ready(&broker, "q"), ["m"]);
    let error = ch
        .queue_bind("q", "", "q", Default::default(), FieldTable::default())
        .await
        .unwrap_err();
    assert_eq!(code(&error), 403);
    let (_c, ch) = open(&broker, "t2").await;
    let error = ch
        .exchange_declare(
            "",
            ExchangeKind::Direct,
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&error), 403);
    let names: Vec<String> = broker.exchanges().into_iter().map(|(n, _)| n).collect();
    for name in ["", "amq.direct", "amq.fanout", "amq.headers", "amq.topic"] {
        assert!(names.iter().any(|n| n == name), "{name} in {names:?}");
    }
}

// ----- delivery -----

#[tokio::test(start_paused = true)]
async fn prefetch_bounds_unacked_deliveries_per_consumer() {
    let broker = Broker::new();
    let (_c, ch) = open(&broker, "t").await;
    queue(&ch, "q", FieldTable::default()).await;
    for i in 1..=5 {
        publish(&ch, "", "q", &i.to_string()).await;
    }
    ch.basic_qos(2, BasicQosOptions::default()).await.unwrap();
    let mut consumer = consume(&ch, "q").await;
    let first = next(&mut consumer).await;
    let second = next(&mut consumer).await;
    assert_eq!((body(&first), body(&second)), ("1", "2"));
    assert!(nothing_more(&mut consumer).await);
    let stats = broker.queue_depth("q").unwrap();
    assert_eq!(
        stats,
        QueueStats {
            ready: 3,
            unacked: 2,
            consumers: 1
        }
    );
    assert!(first.acker.ack(BasicAckOptions::default()).await.unwrap());
    let third = next(&mut consumer).await;
    assert_eq!(body(&third), "3");
    assert_eq!(third.delivery_tag, 3);
    assert!(nothing_more(&mut consumer).await);
    assert_eq!(broker.queue_depth("q").unwrap().unacked, 2);
}

#[tokio::test(start_paused = true)]
async fn consumers_take_turns() {
    let broker = Broker::new();
    let (_c, ch) = open(&broker, "t").await;
    queue(&ch, "q", FieldTable::default()).await;
    let mut a = consume(&ch, "q").await;
    let mut b = consume(&ch, "q").await;
    for i in 1..=4 {
        publish(&ch, "", "q", &i.to_string()).await;
    }
    assert_eq!(body(&next(&mut a).await), "1");
    assert_eq!(body(&next(&mut b).await), "2");
    assert_eq!(body(&next(&mut a).await), "3");
    assert_eq!(body(&next(&mut b).await), "4");
}

#[tokio::test(start_paused = true)]
async fn nack_with_requeue_puts_the_message_back_first_marked_redelivered() {
    let broker = Broker::new();
    let (_c, ch) = open(&broker, "t").await;
    queue(&ch, "q", FieldTable::default()).await;
    publish(&ch, "", "q", "1").await;
    publish(&ch, "", "q", "2").await;
    ch.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let mut consumer = consume(&ch, "q").await;
    let first = next(&mut consumer).await;
    assert!(!first.redelivered);
    first
        .acker
        .nack(BasicNackOptions {
            multiple: false,
            requeue: true,
        })
        .await
        .unwrap();
    let again = next(&mut consumer).await;
    assert_eq!(body(&again), "1");
    assert!(again.redelivered);
    assert_eq!(again.delivery_tag, 2);
    again
        .acker
        .reject(BasicRejectOptions { requeue: true })
        .await
        .unwrap();
    let third = next(&mut consumer).await;
    assert_eq!((body(&third), third.redelivered), ("1", true));
}

#[tokio::test(start_paused = true)]
async fn nack_without_requeue_dead_letters_with_x_death() {
    let broker = Broker::new();
    let (_c, ch) = open(&broker, "t").await;
    exchange(&ch, "work", ExchangeKind::Direct).await;
    exchange(&ch, "dlx", ExchangeKind::Fanout).await;
    queue(&ch, "q", table(&[("x-dead-letter-exchange", text("dlx"))])).await;
    queue(&ch, "q.dead", FieldTable::default()).await;
    bind(&ch, "q", "work", "job").await;
    bind(&ch, "q.dead", "dlx", "").await;
    let properties = BasicProperties::default()
        .with_headers(table(&[("tenant", text("a"))]))
        .with_message_id("m-1".into());
    publish_with(&ch, "work", "job", "payload", properties)
        .await
        .unwrap();
    let mut consumer = consume(&ch, "q").await;
    let delivery = next(&mut consumer).await;
    delivery
        .acker
        .nack(BasicNackOptions {
            multiple: false,
            requeue: false,
        })
        .await
        .unwrap();
    let mut dead = consume(&ch, "q.dead").await;
    let letter = next(&mut dead).await;
    assert_eq!(body(&letter), "payload");
    assert_eq!(letter.exchange.as_str(), "dlx");
    assert_eq!(letter.routing_key.as_str(), "job");
    assert_eq!(
        letter.properties.message_id().as_ref().map(|s| s.as_str()),
        Some("m-1")
    );
    let deaths = x_death(&letter.properties);
    assert_eq!(deaths.len(), 1);
    let death = &deaths[0];
    assert_eq!(header(death, "count"), &AMQPValue::LongLongInt(1));
    assert_eq!(header(death, "reason"), &text("rejected"));
    assert_eq!(header(death, "queue"), &text("q"));
    assert_eq!(header(death, "exchange"), &text("work"));
    assert!(matches!(header(death, "time"), AMQPValue::Timestamp(_)));
    assert_eq!(
        header(death, "routing-keys"),
        &AMQPValue::FieldArray(vec![text("job")].into())
    );
    let headers = letter.properties.headers().clone().unwrap();
    assert_eq!(header(&headers, "x-first-death-reason"), &text("rejected"));
    assert_eq!(header(&headers, "x-first-death-queue"), &text("q"));
    assert_eq!(header(&headers, "x-first-death-exchange"), &text("work"));
    assert_eq!(header(&headers, "tenant"), &text("a"));
    assert_eq!(broker.queue_depth("q").unwrap().unacked, 0);
}

#[tokio::test(start_paused = true)]
async fn reject_without_dead_letter_exchange_drops_the_message() {
    let broker = Broker::new();
    let (_c, ch) = open(&broker, "t").await;
    queue(&ch, "q", FieldTable::default()).await;
    publish(&ch, "", "q", "m").await;
    let got = ch
        .basic_get("q", BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.message_count, 0);
    got.acker
        .reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    assert_eq!(
        broker.queue_depth("q").unwrap(),
        QueueStats {
            ready: 0,
            unacked: 0,
            consumers: 0
        }
    );
}

#[tokio::test(start_paused = true)]
async fn ack_multiple_settles_every_earlier_tag() {
    let broker = Broker::new();
    let (_c, ch) = open(&broker, "t").await;
    queue(&ch, "q", FieldTable::default()).await;
    for i in 1..=4 {
        publish(&ch, "", "q", &i.to_string()).await;
    }
    let mut consumer = consume(&ch, "q").await;
    let mut deliveries = Vec::new();
    for _ in 0..4 {
        deliveries.push(next(&mut consumer).await);
    }
    ch.basic_ack(3, BasicAckOptions { multiple: true })
        .await
        .unwrap();
    assert_eq!(broker.queue_depth("q").unwrap().unacked, 1);
    // Tag 2 went with tag 3: settling it again is RabbitMQ's channel error.
    let error = deliveries[1]
        .acker
        .ack(BasicAckOptions::default())
        .await
        .unwrap_err();
    assert_eq!(code(&error), 406);
    assert_eq!(
        reply(&error),
        "PRECONDITION_FAILED - unknown delivery tag 2"
    );
    assert!(!ch.is_open());
    // The channel is closed: the last one was requeued, its acker reports it unsettled.
    assert!(
        !deliveries[3]
            .acker
            .ack(BasicAckOptions::default())
            .await
            .unwrap()
    );
    assert_eq!(ready(&broker, "q"), ["4"]);
}

#[tokio::test(start_paused = true)]
async fn settling_twice_is_an_unknown_delivery_tag() {
    let broker = Broker::new();
    let (_c, ch) = open(&broker, "t").await;
    queue(&ch, "q", FieldTable::default()).await;
    publish(&ch, "", "q", "m").await;
    let mut consumer = consume(&ch, "q").await;
    let delivery = next(&mut consumer).await;
    assert!(delivery.ack(BasicAckOptions::default()).await.unwrap());
    let error = delivery.ack(BasicAckOptions::default()).await.unwrap_err();
    assert_eq!(
        reply(&error),
        "PRECONDITION_FAILED - unknown delivery tag 1"
    );
    assert_eq!(ch.state(), ChannelState::Closed);
    // The closed channel's consumer ended.
    assert!(consumer.next().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn no_ack_consumers_get_messages_settled_at_once() {
    let broker = Broker::new();
    let (_c, ch) = open(&broker, "t").await;
    queue(&ch, "q", FieldTable::default()).await;
    ch.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let mut consumer = ch
        .basic_consume(
            "q",
            "mine",
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(consumer.tag(), "mine");
    for i in 1..=3 {
        publish(&ch, "", "q", &i.to_string()).await;
    }
    for i in 1..=3 {
        assert_eq!(body(&next(&mut consumer).await), i.to_string());
    }
    assert_eq!(broker.queue_depth("q").unwrap().unacked, 0);
}

#[tokio::test(start_paused = true)]
async fn basic_get_takes_the_oldest_ready_message() {
    let broker = Broker::new();
    let (_c, ch) = open(&broker, "t").await;
    queue(&ch, "q", FieldTable::default()).await;
    assert!(
        ch.basic_get("q", BasicGetOptions::default())
            .await
            .unwrap()
            .is_none()
    );
    publish(&ch, "", "q", "1").await;
    publish(&ch, "", "q", "2").await;
    let got = ch
        .basic_get("q", BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    assert_eq!((body(&got.delivery), got.message_count), ("1", 1));
    let got = ch
        .basic_get("q", BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(body(&got), "2");
    assert_eq!(broker.queue_depth("q").unwrap().unacked, 1);
    got.acker.ack(BasicAckOptions::default()).await.unwrap();
    assert_eq!(broker.queue_depth("q").unwrap().unacked, 0);
}

#[tokio::test(start_paused = true)]
async fn cancel_stops_deliveries_and_leaves_unacked_until_settled() {
    let broker = Broker::new();
    let (_c, ch) = open(&broker, "t").await;
    queue(&ch, "q", FieldTable::default()).await;
    publish(&ch, "", "q", "1").await;
    let mut consumer = consume(&ch, "q").await;
    let delivery = next(&mut consumer).await;
    ch.basic_cancel(consumer.tag(), BasicCancelOptions::default())
        .await
        .unwrap();
    assert!(consumer.next().await.is_none());
    publish(&ch, "", "q", "2").await;
    assert_eq!(
        broker.queue_depth("q").unwrap(),
        QueueStats {
            ready: 1,
            unacked: 1,
            consumers: 0
        }
    );
    assert!(delivery.ack(BasicAckOptions::default()).await.unwrap());
    assert_eq!(broker.queue_depth("q").unwrap().unacked, 0);
}

#[tokio::test(start_paused = true)]
async fn an_exclusive_consumer_keeps_others_away() {
    let broker = Broker::new();
    let (_c, ch) = open(&broker, "t").await;
    queue(&ch, "q", FieldTable::default()).await;
    let _only = ch
        .basic_consume(
            "q",
            "",
            BasicConsumeOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let (_c2, other) = open(&broker, "t2").await;
    let error = other
        .basic_consume(
            "q",
            "",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&error), 403);
    assert_eq!(
        reply(&error),
        "ACCESS_REFUSED - queue 'q' in vhost '/' in exclusive use"
    );
}

#[tokio::test(start_paused = true)]
async fn closing_a_channel_requeues_its_unacked_messages_as_redelivered() {
    let broker = Broker::new();
    let (connection, ch) = open(&broker, "t").await;
    queue(&ch, "q", FieldTable::default()).await;
    for i in 1..=3 {
        publish(&ch, "", "q", &i.to_string()).await;
    }
    ch.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let mut consumer = consume(&ch, "q").await;
    let first = next(&mut consumer).await;
    first.ack(BasicAckOptions::default()).await.unwrap();
    let _second = next(&mut consumer).await;
    ch.close(200, "bye").await.unwrap();
    assert!(consumer.next().await.is_none());
    assert_eq!(ready(&broker, "q"), ["2", "3"]);
    let error = ch
        .basic_get("q", BasicGetOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(
        error.kind(),
        ErrorKind::InvalidChannelState(ChannelState::Closed, _)
    ));
    let again = connection.create_channel().await.unwrap();
    let mut consumer = consume(&again, "q").await;
    let redelivered = next(&mut consumer).await;
    assert_eq!((body(&redelivered), redelivered.redelivered), ("2", true));
    let fresh = next(&mut consumer).await;
    assert_eq!((body(&fresh), fresh.redelivered), ("3", false));
}

#[tokio::test(start_paused = true)]
async fn killed_connections_end_consumers_with_an_error() {
    let broker = Broker::new();
    let (connection, ch) = open(&broker, "svc").await;
    queue(&ch, "q", FieldTable::default()).await;
    publish(&ch, "", "q", "m").await;
    let mut consumer = consume(&ch, "q").await;
    let _unacked = next(&mut consumer).await;
    assert_eq!(broker.connections(), ["svc"]);
    broker.kill_connections();
    let error = consumer.next().await.unwrap().unwrap_err();
    assert!(error.is_io_error(), "{error}");
    assert!(consumer.next().await.is_none());
    tokio::time::timeout(Duration::from_secs(1), connection.closed())
        .await
        .unwrap();
    assert_eq!(connection.state(), ConnectionState::Error);
    assert_eq!(ch.state(), ChannelState::Error);
    assert!(broker.connections().is_empty());
    let error = connection.create_channel().await.unwrap_err();
    assert!(matches!(
        error.kind(),
        ErrorKind::InvalidConnectionState(ConnectionState::Error)
    ));
    assert_eq!(ready(&broker, "q"), ["m"]);
}

// ----- confirms and returns -----

#[tokio::test]
async fn confirms_ack_routed_messages_and_return_unroutable_mandatory_ones() {
    let broker = Broker::new();
    let (_c, ch) = open(&broker, "t").await;
    queue(&ch, "q", FieldTable::default()).await;
    let confirmation = publish_with(&ch, "", "q", "m", BasicProperties::default())
        .await
        .unwrap();
    assert_eq!(confirmation, Confirmation::NotRequested);
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirmation = publish_with(&ch, "", "q", "m", BasicProperties::default())
        .await
        .unwrap();
    assert_eq!(confirmation, Confirmation::Ack(None));
    let confirmation = publish_with(
        &ch,
        "amq.direct",
        "nobody",
        "lost",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    assert_eq!(confirmation, Confirmation::Ack(None));
    let returned = ch
        .basic_publish(
            "amq.direct",
            "nobody",
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            b"back",
            BasicProperties::default().with_message_id("id".into()),
        )
        .await
        .unwrap()
        .await
        .unwrap()
        .take_message()
        .expect("returned");
    assert_eq!(returned.reply_code, 312);
    assert_eq!(returned.reply_text.as_str(), "NO_ROUTE");
    assert_eq!(returned.delivery.data, b"back");
    assert_eq!(returned.delivery.exchange.as_str(), "amq.direct");
    assert_eq!(returned.delivery.routing_key.as_str(), "nobody");
    assert_eq!(
        returned
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some("id")
    );
    let outcomes: Vec<PublishOutcome> = broker.journal().into_iter().map(|p| p.outcome).collect();
    assert_eq!(
        outcomes,
        [
            PublishOutcome::Routed(vec!["q".into()]),
            PublishOutcome::Routed(vec!["q".into()]),
            PublishOutcome::Dropped,
            PublishOutcome::Returned,
        ]
    );
}

#[tokio::test]
async fn publishing_to_a_missing_exchange_closes_the_channel_with_not_found() {
    let broker = Broker::new();
    let (_c, ch) = open(&broker, "t").await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let error = publish_with(&ch, "nope", "k", "m", BasicProperties::default())
        .await
        .unwrap_err();
    assert_eq!(code(&error), 404);
    assert_eq!(reply(&error), "NOT_FOUND - no exchange 'nope' in vhost '/'");
    assert!(!ch.is_open());
    let error = ch
        .basic_publish("", "q", Default::default(), b"m", Default::default())
        .await
        .unwrap_err();
    assert!(matches!(
        error.kind(),
        ErrorKind::InvalidChannelState(ChannelState::Closed, _)
    ));
    assert!(matches!(
        broker.journal()[0].outcome,
        PublishOutcome::Failed(_)
    ));
}

#[tokio::test]
async fn a_full_reject_publish_queue_nacks() {
    let broker = Broker::new();
    let (_c, ch) = open(&broker, "t").await;
    queue(
        &ch,
        "q",
        table(&[
            ("x-max-length", AMQPValue::ShortShortUInt(1)),
            ("x-overflow", text("reject-publish")),
        ]),
    )
    .await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let first = publish_with(&ch, "", "q", "1", BasicProperties::default()).await;
    assert_eq!(first.unwrap(), Confirmation::Ack(None));
    let second = publish_with(&ch, "", "q", "2", BasicProperties::default()).await;
    assert_eq!(second.unwrap(), Confirmation::Nack(None));
    assert_eq!(ready(&broker, "q"), ["1"]);
}

#[tokio::test]
async fn wait_for_publish_sees_past_and_future_publishes() {
    let broker = Broker::new();
    let (_c, ch) = open(&broker, "t").await;
    publish(&ch, "amq.topic", "a", "1").await;
    let (index, found) = broker.wait_for_publish(0, |p| p.routing_key == "a").await;
    assert_eq!((index, found.body.as_slice()), (0, b"1".as_slice()));
    let waiter = {
        let broker = broker.clone();
        tokio::spawn(async move { broker.wait_for_publish(1, |p| p.routing_key == "b").await })
    };
    tokio::task::yield_now().await;
    publish(&ch, "amq.topic", "c", "2").await;
    publish(&ch, "amq.topic", "b", "3").await;
    let (index, found) = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((index, found.body.as_slice()), (2, b"3".as_slice()));
}

// ----- time -----

#[tokio::test(start_paused = true)]
async fn queue_ttl_dead_letters_on_its_own() {
    let broker = Broker::new();
    let (_c, ch) = open(&broker, "t").await;
    queue(
        &ch,
        "q",
        table(&[
            ("x-message-ttl", AMQPValue::LongInt(10_000)),
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text("q.expired")),
        ]),
    )
    .await;
    queue(&ch, "q.expired", FieldTable::default()).await;
    let start = Instant::now();
    publish(&ch, "", "q", "m").await;
    let mut expired = consume(&ch, "q.expired").await;
    let letter = next(&mut expired).await;
    assert_eq!(start.elapsed(), Duration::from_secs(10));
    assert_eq!(body(&letter), "m");
    let deaths = x_death(&letter.properties);
    assert_eq!(header(&deaths[0], "reason"), &text("expired"));
    assert_eq!(header(&deaths[0], "queue"), &text("q"));
    assert_eq!(ready(&broker, "q"), Vec::<String>::new());
}

#[tokio::test(start_paused = true)]
async fn the_smaller_of_queue_and_message_ttl_applies() {
    let broker = Broker::new();
    let (_c, ch) = open(&broker, "t").await;
    let dead_lettered = |ttl: i32| {
        table(&[
            ("x-message-ttl", AMQPValue::LongInt(ttl)),
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text("expired")),
        ])
    };
    queue(&ch, "long", dead_lettered(10_000)).await;
    queue(&ch, "short", dead_lettered(1_000)).await;
    queue(&ch, "expired", FieldTable::default()).await;
    let start = Instant::now();
    let expiring = |ms: &str| BasicProperties::default().with_expiration(ms.into());
    publish_with(&ch, "", "long", "message ttl 2s", expiring("2000"))
        .await
        .unwrap();
    publish_with(&ch, "", "short", "queue ttl 1s", expiring("5000"))
        .await
        .unwrap();
    let mut expired = consume(&ch, "expired").await;
    let first = next(&mut expired).await;
    assert_eq!(body(&first), "queue ttl 1s");
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    let second = next(&mut expired).await;
    assert_eq!(body(&second), "message ttl 2s");
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    // The dead-lettered copy has no expiration; the x-death entry keeps the original.
    assert!(second.properties.expiration().is_none());
    assert_eq!(
        header(&x_death(&second.properties)[0], "original-expiration"),
        &text("2000")
    );
}

#[tokio::test(start_paused = true)]
async fn a_message_ttl_without_dead_letter_exchange_drops_it() {
    let broker = Broker::new();
    let (_c, ch) = open(&broker, "t").await;
    queue(&ch, "q", FieldTable::default()).await;
    publish_with(
        &ch,
        "",
        "q",
        "m",
        BasicProperties::default().with_expiration("500".into()),
    )
    .await
    .unwrap();
    assert_eq!(broker.queue_depth("q").unwrap().ready, 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(broker.queue_depth("q").unwrap().ready, 0);
}

#[tokio::test(start_paused = true)]
async fn a_retry_queue_sends_messages_back_with_a_growing_death_count() {
    let broker = Broker::new();
    let (_c, ch) = open(&broker, "svc").await;
    queue(&ch, "q", FieldTable::default()).await;
    queue(
        &ch,
        "q.retry",
        table(&[
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text("q")),
        ]),
    )
    .await;
    let mut consumer = consume(&ch, "q").await;
    let start = Instant::now();
    publish_with(
        &ch,
        "",
        "q.retry",
        "job",
        BasicProperties::default().with_expiration("1000".into()),
    )
    .await
    .unwrap();
    let first = next(&mut consumer).await;
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    assert_eq!(first.routing_key.as_str(), "q");
    let deaths = x_death(&first.properties);
    assert_eq!(deaths.len(), 1);
    assert_eq!(header(&deaths[0], "count"), &AMQPValue::LongLongInt(1));
    assert_eq!(header(&deaths[0], "queue"), &text("q.retry"));
    assert_eq!(header(&deaths[0], "reason"), &text("expired"));
    assert_eq!(header(&deaths[0], "exchange"), &text(""));
    assert_eq!(
        header(&deaths[0], "routing-keys"),
        &AMQPValue::FieldArray(vec![text("q.retry")].into())
    );
    // The handler fails again: back to the retry queue, headers kept.
    publish_with(
        &ch,
        "",
        "q.retry",
        "job",
        first.properties.clone().with_expiration("1000".into()),
    )
    .await
    .unwrap();
    first.ack(BasicAckOptions::default()).await.unwrap();
    let second = next(&mut consumer).await;
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    let deaths = x_death(&second.properties);
    assert_eq!(deaths.len(), 1);
    assert_eq!(header(&deaths[0], "count"), &AMQPValue::LongLongInt(2));
    let headers = second.properties.headers().clone().unwrap();
    assert_eq!(header(&headers, "x-first-death-queue"), &text("q.retry"));
}

#[tokio::test(start_paused = true)]
async fn a_queue_expiring_into_itself_drops_the_message_as_a_cycle() {
    let broker = Broker::new();
    let (_c, ch) = open(&broker, "t").await;
    queue(
        &ch,
        "loop",
        table(&[
            ("x-message-ttl", AMQPValue::LongInt(100)),
            ("x-dead-letter-exchange", text("")),
        ]),
    )
    .await;
    publish(&ch, "", "loop", "m").await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(broker.queue_depth("loop").unwrap().ready, 0);
}

#[tokio::test(start_paused = true)]
async fn an_unused_queue_with_x_expires_is_deleted() {
    let broker = Broker::new();
    let (_c, ch) = open(&broker, "t").await;
    queue(&ch, "q", table(&[("x-expires", AMQPValue::LongInt(1000))])).await;
    let consumer = consume(&ch, "q").await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(broker.queue_depth("q").is_some());
    ch.basic_cancel(consumer.tag(), Default::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(999)).await;
    assert!(broker.queue_depth("q").is_some());
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert!(broker.queue_depth("q").is_none());
}

// ----- limits -----

#[tokio::test(start_paused = true)]
async fn max_length_drops_the_oldest_message_to_the_dead_letter_exchange() {
    let broker = Broker::new();
    let (_c, ch) = open(&broker, "t").await;
    queue(
        &ch,
        "q",
        table(&[
            ("x-max-length", AMQPValue::LongLongInt(2)),
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text("overflow")),
        ]),
    )
    .await;
    queue(&ch, "overflow", FieldTable::default()).await;
    queue(
        &ch,
        "plain",
        table(&[("x-max-length", AMQPValue::LongInt(1))]),
    )
    .await;
    for i in 1..=4 {
        publish(&ch, "", "q", &i.to_string()).await;
        publish(&ch, "", "plain", &i.to_string()).await;
    }
    assert_eq!(ready(&broker, "q"), ["3", "4"]);
    assert_eq!(ready(&broker, "plain"), ["4"]);
    assert_eq!(ready(&broker, "overflow"), ["1", "2"]);
    let (properties, _) = broker.peek("overflow").remove(0);
    assert_eq!(header(&x_death(&properties)[0], "reason"), &text("maxlen"));
}

// ----- declarations -----

#[tokio::test]
async fn passive_declare_of_a_missing_queue_is_not_found() {
    let broker = Broker::new();
    let (_c, ch) = open(&broker, "t").await;
    let error = ch
        .queue_declare(
            "ghost",
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&error), 404);
    assert_eq!(reply(&error), "NOT_FOUND - no queue 'ghost' in vhost '/'");
    assert!(!ch.is_open());
    let (_c, ch) = open(&broker, "t2").await;
    queue(&ch, "q", FieldTable::default()).await;
    publish(&ch, "", "q", "m").await;
    let declared = ch
        .queue_declare(
            "q",
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        (declared.message_count(), declared.consumer_count()),
        (1, 0)
    );
    let error = ch
        .exchange_declare(
            "ghost",
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        reply(&error),
        "NOT_FOUND - no exchange 'ghost' in vhost '/'"
    );
}

#[tokio::test]
async fn redeclaring_an_exchange_with_another_type_fails_and_closes_the_channel() {
    let broker = Broker::new();
    let (connection, ch) = open(&broker, "t").await;
    exchange(&ch, "x", ExchangeKind::Topic).await;
    exchange(&ch, "x", ExchangeKind::Topic).await;
    let error = ch
        .exchange_declare(
            "x",
            ExchangeKind::Fanout,
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&error), 406);
    assert_eq!(
        reply(&error),
        "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'x' in vhost '/': received 'fanout' but current is 'topic'"
    );
    assert_eq!(ch.state(), ChannelState::Closed);
    let error = ch
        .queue_declare("q", Default::default(), FieldTable::default())
        .await
        .unwrap_err();
    assert!(matches!(
        error.kind(),
        ErrorKind::InvalidChannelState(ChannelState::Closed, _)
    ));
    assert!(connection.is_open());
    let ch = connection.create_channel().await.unwrap();
    let error = ch
        .exchange_declare(
            "amq.mine",
            ExchangeKind::Direct,
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&error), 403);
    assert_eq!(
        reply(&error),
        "ACCESS_REFUSED - exchange name 'amq.mine' contains reserved prefix 'amq.*'"
    );
    let ch = connection.create_channel().await.unwrap();
    let error = ch
        .exchange_declare(
            "x",
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        reply(&error),
        "PRECONDITION_FAILED - inequivalent arg 'durable' for exchange 'x' in vhost '/': received 'true' but current is 'false'"
    );
}

#[tokio::test]
async fn redeclaring_a_queue_with_other_arguments_is_precondition_failed() {
    let broker = Broker::new();
    let (connection, ch) = open(&broker, "t").await;
    queue(
        &ch,
        "q",
        table(&[("x-message-ttl", AMQPValue::LongLongInt(1000))]),
    )
    .await;
    // Same value, another integer type: equivalent.
    queue(
        &ch,
        "q",
        table(&[("x-message-ttl", AMQPValue::ShortUInt(1000))]),
    )
    .await;
    let error = ch
        .queue_declare(
            "q",
            Default::default(),
            table(&[("x-message-ttl", AMQPValue::LongLongInt(2000))]),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&error), 406);
    assert_eq!(
        reply(&error),
        "PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue 'q' in vhost '/': received the value '2000' of type 'long' but current is the value '1000' of type 'long'"
    );
    assert!(!ch.is_open());
    let ch = connection.create_channel().await.unwrap();
    let error = ch
        .queue_declare(
            "q",
            QueueDeclareOptions::durable(),
            table(&[("x-message-ttl", AMQPValue::LongInt(1000))]),
        )
        .await
        .unwrap_err();
    assert_eq!(
        reply(&error),
        "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'q' in vhost '/': received 'true' but current is 'false'"
    );
    let ch = connection.create_channel().await.unwrap();
    let error = ch
        .queue_declare("amq.q", Default::default(), FieldTable::default())
        .await
        .unwrap_err();
    assert_eq!(code(&error), 403);
    let ch = connection.create_channel().await.unwrap();
    let error = ch
        .queue_declare(
            "quorum",
            Default::default(),
            table(&[("x-queue-type", text("quorum"))]),
        )
        .await
        .unwrap_err();
    assert_eq!(
        reply(&error),
        "PRECONDITION_FAILED - invalid property 'non-durable' for queue 'quorum' in vhost '/'"
    );
}

#[tokio::test]
async fn an_exclusive_queue_is_locked_to_its_connection_and_deleted_with_it() {
    let broker = Broker::new();
    let (owner, ch) = open(&broker, "owner").await;
    ch.queue_declare(
        "mine",
        QueueDeclareOptions::exclusive(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let (_other, other) = open(&broker, "other").await;
    let error = other
        .basic_consume("mine", "", Default::default(), FieldTable::default())
        .await
        .unwrap_err();
    assert_eq!(code(&error), 405);
    assert!(
        reply(&error).starts_with(
            "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue 'mine' in vhost '/'"
        ),
        "{}",
        reply(&error)
    );
    // Publishing to it from elsewhere is fine.
    let other = _other.create_channel().await.unwrap();
    publish(&other, "", "mine", "m").await;
    assert_eq!(ready(&broker, "mine"), ["m"]);
    owner.close(200, "bye").await.unwrap();
    assert!(broker.queue_depth("mine").is_none());
    assert!(!owner.is_open());
    assert_eq!(broker.connections(), ["other"]);
}

#[tokio::test(start_paused = true)]
async fn an_auto_delete_queue_goes_with_its_last_consumer() {
    let broker = Broker::new();
    let (_c, ch) = open(&broker, "t").await;
    ch.queue_declare(
        "temp",
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    bind(&ch, "temp", "amq.fanout", "").await;
    let a = consume(&ch, "temp").await;
    let b = consume(&ch, "temp").await;
    ch.basic_cancel(a.tag(), Default::default()).await.unwrap();
    assert!(broker.queue_depth("temp").is_some());
    ch.basic_cancel(b.tag(), Default::default()).await.unwrap();
    assert!(broker.queue_depth("temp").is_none());
    assert!(broker.bindings("amq.fanout").is_empty());
}

#[tokio::test]
async fn server_named_queues_are_unique() {
    let broker = Broker::new();
    let (_c, ch) = open(&broker, "t").await;
    let mut names = std::collections::BTreeSet::new();
    for _ in 0..100 {
        let declared = ch
            .queue_declare("", QueueDeclareOptions::exclusive(), FieldTable::default())
            .await
            .unwrap();
        assert!(
            declared.name().starts_with("amq.gen-"),
            "{}",
            declared.name()
        );
        assert_eq!(declared.name().len(), "amq.gen-".len() + 22);
        assert!(names.insert(declared.name.clone()));
    }
    assert_eq!(broker.queues().len(), 100);
}

#[tokio::test]
async fn deleting_a_queue_ends_its_consumers_and_checks_its_conditions() {
    let broker = Broker::new();
    let (connection, ch) = open(&broker, "t").await;
    queue(&ch, "q", FieldTable::default()).await;
    let mut consumer = consume(&ch, "q").await;
    let error = ch
        .queue_delete(
            "q",
            QueueDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(
        reply(&error),
        "PRECONDITION_FAILED - queue 'q' in vhost '/' in use"
    );
    let ch = connection.create_channel().await.unwrap();
    publish(&ch, "", "q", "m").await;
    // The first channel closed, its consumer with it; the message waits.
    assert!(consumer.next().await.is_none());
    assert_eq!(ch.queue_delete("q", Default::default()).await.unwrap(), 1);
    assert_eq!(ch.queue_delete("q", Default::default()).await.unwrap(), 0);
    assert!(broker.queues().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_consumer_whose_stream_is_dropped_is_cancelled() {
    let broker = Broker::new();
    let (_c, ch) = open(&broker, "t").await;
    queue(&ch, "q", FieldTable::default()).await;
    let dropped = consume(&ch, "q").await;
    let mut kept = consume(&ch, "q").await;
    drop(dropped);
    for i in 1..=2 {
        publish(&ch, "", "q", &i.to_string()).await;
    }
    assert_eq!(body(&next(&mut kept).await), "1");
    assert_eq!(body(&next(&mut kept).await), "2");
    assert_eq!(broker.queue_depth("q").unwrap().consumers, 1);
}

#[test]
fn handles_and_their_futures_can_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>(_: &T) {}
    send_sync::<Broker>();
    send_sync::<Connection>();
    send_sync::<Channel>();
    send_sync::<Consumer>();
    send_sync::<Delivery>();
    send_sync::<Acker>();
    send_sync::<Confirm>();
    send_sync::<Published>();
    let broker = Broker::new();
    let connection = broker.connect("t");
    send(&connection.create_channel());
    send(&connection.closed());
    send(&broker.wait_for_publish(0, |_| true));
}

// ----- streams -----

fn stream_arguments() -> FieldTable {
    table(&[("x-queue-type", text("stream"))])
}

/// Declares stream `name` (durable, as RabbitMQ requires).
async fn stream(channel: &Channel, name: &str) {
    channel
        .queue_declare(name, QueueDeclareOptions::durable(), stream_arguments())
        .await
        .unwrap();
}

/// A consumer of stream `queue` from `offset` (the `x-stream-offset` argument, if any); the
/// channel needs a prefetch first.
async fn read_stream(channel: &Channel, queue: &str, offset: Option<AMQPValue>) -> Consumer {
    let arguments = offset.map_or_else(FieldTable::default, |offset| {
        table(&[("x-stream-offset", offset)])
    });
    channel
        .basic_consume(queue, "", BasicConsumeOptions::default(), arguments)
        .await
        .unwrap()
}

fn offset_of(delivery: &Delivery) -> &AMQPValue {
    header(
        delivery.properties.headers().as_ref().expect("headers"),
        "x-stream-offset",
    )
}

#[tokio::test]
async fn a_stream_must_be_durable_shared_and_kept_and_is_redeclared_as_others() {
    let broker = Broker::new();
    let (connection, ch) = open(&broker, "t").await;
    for (options, property) in [
        (QueueDeclareOptions::default(), "non-durable"),
        (
            QueueDeclareOptions {
                durable: true,
                exclusive: true,
                ..Default::default()
            },
            "exclusive-owner",
        ),
        (
            QueueDeclareOptions {
                durable: true,
                auto_delete: true,
                ..Default::default()
            },
            "auto-delete",
        ),
    ] {
        let ch = connection.create_channel().await.unwrap();
        let error = ch
            .queue_declare("s", options, stream_arguments())
            .await
            .unwrap_err();
        assert_eq!(code(&error), 406);
        assert_eq!(
            reply(&error),
            format!(
                "PRECONDITION_FAILED - invalid property '{property}' for queue 's' in vhost '/'"
            )
        );
    }
    let with_age = table(&[
        ("x-queue-type", text("stream")),
        ("x-max-age", text("7D")),
        ("x-max-length-bytes", AMQPValue::LongLongInt(1_000_000)),
    ]);
    ch.queue_declare("s", QueueDeclareOptions::durable(), with_age.clone())
        .await
        .unwrap();
    ch.queue_declare("s", QueueDeclareOptions::durable(), with_age)
        .await
        .unwrap();
    let error = ch
        .queue_declare("s", QueueDeclareOptions::durable(), stream_arguments())
        .await
        .unwrap_err();
    assert!(
        reply(&error).starts_with("PRECONDITION_FAILED - inequivalent arg 'x-max-age'"),
        "{error}"
    );
    let ch = connection.create_channel().await.unwrap();
    let error = ch
        .queue_declare(
            "s",
            QueueDeclareOptions::durable(),
            table(&[
                ("x-queue-type", text("quorum")),
                ("x-max-age", text("7D")),
                ("x-max-length-bytes", AMQPValue::LongLongInt(1_000_000)),
            ]),
        )
        .await
        .unwrap_err();
    assert!(
        reply(&error).starts_with("PRECONDITION_FAILED - inequivalent arg 'x-queue-type'"),
        "{error}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_stream_numbers_its_messages_and_keeps_them_when_read() {
    let broker = Broker::new();
    let (_c, ch) = open(&broker, "t").await;
    stream(&ch, "s").await;
    for i in 0..3 {
        publish(&ch, "", "s", &format!("m{i}")).await;
    }
    ch.basic_qos(10, BasicQosOptions::default()).await.unwrap();
    let mut consumer = read_stream(&ch, "s", Some(text("first"))).await;
    for i in 0..3 {
        let delivery = next(&mut consumer).await;
        assert_eq!(body(&delivery), format!("m{i}"));
        assert_eq!(offset_of(&delivery), &AMQPValue::LongLongInt(i));
        assert!(!delivery.redelivered);
        assert!(
            delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .unwrap()
        );
    }
    assert!(nothing_more(&mut consumer).await);
    // Read and acked, still there; a passive declare counts neither messages nor consumers,
    // as RabbitMQ's does for a stream.
    assert_eq!(ready(&broker, "s"), ["m0", "m1", "m2"]);
    let declared = ch
        .queue_declare(
            "s",
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!((declared.message_count, declared.consumer_count), (0, 0));
    assert_eq!(broker.queue_depth("s").unwrap().consumers, 1);
    // A message appended later comes to the consumer at the next offset.
    publish(&ch, "", "s", "m3").await;
    let delivery = next(&mut consumer).await;
    assert_eq!(offset_of(&delivery), &AMQPValue::LongLongInt(3));
}

#[tokio::test(start_paused = true)]
async fn a_stream_consumer_starts_where_x_stream_offset_says() {
    let broker = Broker::new();
    let (_c, ch) = open(&broker, "t").await;
    stream(&ch, "s").await;
    publish(&ch, "", "s", "m0").await;
    publish(&ch, "", "s", "m1").await;
    tokio::time::advance(Duration::from_secs(10)).await;
    let later = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 5;
    publish(&ch, "", "s", "m2").await;
    publish(&ch, "", "s", "m3").await;
    ch.basic_qos(10, BasicQosOptions::default()).await.unwrap();
    let cases = [
        (Some(text("first")), vec!["m0", "m1", "m2", "m3"]),
        (Some(text("last")), vec!["m3"]),
        (Some(text("next")), vec![]),
        (None, vec![]),
        (Some(AMQPValue::LongLongInt(2)), vec!["m2", "m3"]),
        (Some(AMQPValue::ShortShortUInt(1)), vec!["m1", "m2", "m3"]),
        (Some(AMQPValue::LongLongInt(99)), vec![]),
        (
            Some(AMQPValue::LongLongInt(-4)),
            vec!["m0", "m1", "m2", "m3"],
        ),
        (Some(AMQPValue::Timestamp(later)), vec!["m2", "m3"]),
        (Some(AMQPValue::Timestamp(0)), vec!["m0", "m1", "m2", "m3"]),
    ];
    for (offset, expected) in cases {
        let mut consumer = read_stream(&ch, "s", offset.clone()).await;
        let mut got = Vec::new();
        while let Ok(Some(Ok(delivery))) =
            tokio::time::timeout(Duration::from_millis(1), consumer.next()).await
        {
            got.push(body(&delivery).to_string());
        }
        assert_eq!(got, expected, "from {offset:?}");
    }
    let error = ch
        .basic_consume(
            "s",
            "",
            BasicConsumeOptions::default(),
            table(&[("x-stream-offset", text("middle"))]),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&error), 406);
}

#[tokio::test(start_paused = true)]
async fn every_stream_consumer_reads_every_message_within_its_prefetch() {
    let broker = Broker::new();
    let (_c, ch) = open(&broker, "t").await;
    stream(&ch, "s").await;
    for i in 0..4 {
        publish(&ch, "", "s", &i.to_string()).await;
    }
    ch.basic_qos(2, BasicQosOptions::default()).await.unwrap();
    let mut one = read_stream(&ch, "s", Some(text("first"))).await;
    let mut two = read_stream(&ch, "s", Some(text("first"))).await;
    let (a0, a1) = (next(&mut one).await, next(&mut one).await);
    let (b0, b1) = (next(&mut two).await, next(&mut two).await);
    assert_eq!([body(&a0), body(&a1)], ["0", "1"]);
    assert_eq!([body(&b0), body(&b1)], ["0", "1"]);
    assert!(nothing_more(&mut one).await && nothing_more(&mut two).await);
    assert_eq!(
        broker.queue_depth("s").unwrap(),
        QueueStats {
            ready: 2,
            unacked: 4,
            consumers: 2
        },
        "each consumer has two to go"
    );
    // An ack, a nack and a reject each give a place back; nothing is requeued.
    assert!(a0.acker.ack(BasicAckOptions::default()).await.unwrap());
    assert_eq!(body(&next(&mut one).await), "2");
    let requeue = BasicNackOptions {
        requeue: true,
        ..Default::default()
    };
    assert!(b0.acker.nack(requeue).await.unwrap());
    assert!(
        b1.acker
            .reject(BasicRejectOptions::default())
            .await
            .unwrap()
    );
    assert_eq!(body(&next(&mut two).await), "2");
    assert_eq!(body(&next(&mut two).await), "3");
    assert!(nothing_more(&mut one).await && nothing_more(&mut two).await);
    assert_eq!(ready(&broker, "s"), ["0", "1", "2", "3"]);
    // A cancelled consumer is forgotten: its unacked deliveries settle without effect.
    ch.basic_cancel(one.tag(), BasicCancelOptions::default())
        .await
        .unwrap();
    assert!(a1.acker.ack(BasicAckOptions::default()).await.unwrap());
    assert_eq!(broker.queue_depth("s").unwrap().consumers, 1);
}

#[tokio::test]
async fn a_stream_refuses_basic_get_and_consumers_without_prefetch_or_acks() {
    let broker = Broker::new();
    let (connection, ch) = open(&broker, "t").await;
    stream(&ch, "s").await;
    let error = ch
        .basic_consume(
            "s",
            "",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&error), 406);
    assert_eq!(
        reply(&error),
        "PRECONDITION_FAILED - consumer prefetch count is not set for 'queue 's' in vhost '/''"
    );
    assert!(!ch.is_open());
    assert!(connection.is_open());
    let ch = connection.create_channel().await.unwrap();
    ch.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let error = ch
        .basic_consume(
            "s",
            "",
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&error), 540);
    assert!(!connection.is_open());
    let (connection, ch) = open(&broker, "t2").await;
    let error = ch
        .basic_get("s", BasicGetOptions::default())
        .await
        .unwrap_err();
    assert_eq!(code(&error), 540);
    assert_eq!(
        reply(&error),
        "NOT_IMPLEMENTED - basic.get not supported by stream queues queue 's' in vhost '/'"
    );
    assert!(!connection.is_open());
}
