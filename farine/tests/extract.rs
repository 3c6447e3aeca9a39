//! Handler parameters are taken from the call through `FromCall`, whatever their names: a body
//! type of the user's named `Message`, an extractor of the user's own (refusing a message sends
//! it to the dead-letter queue with the reason), the headers, and the database of the call.

mod common;

use std::sync::Mutex;

use common::{BOUND, config};
use farine::db::sqlx;
use farine::{Db, DbCallError, FromCall, Headers, Rejection, Runtime, consume};
use farine_test_support::{Broker, Database, unique, wait_until};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::json;

/// The user's own body type, named like farine's message handle.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
struct Message {
    id: u64,
}

/// The tenant a message is for, from its `x-tenant` header.
#[derive(Debug, Clone, PartialEq)]
struct Tenant(String);

impl FromCall<farine::Message> for Tenant {
    fn from_call(message: &farine::Message) -> Result<Self, Rejection> {
        match message.header("x-tenant") {
            Some(AMQPValue::LongString(tenant)) => Ok(Tenant(tenant.to_string())),
            _ => Err(Rejection::new("the message has no x-tenant header")),
        }
    }
}

static SEEN: Mutex<Vec<(Message, Tenant, Option<String>)>> = Mutex::new(Vec::new());

#[derive(Default)]
struct Tenanted;

#[farine::service(name = "extract_tenanted")]
impl Tenanted {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn on_order(&self, order: Message, tenant: Tenant, headers: &Headers) {
        let trace = headers.text("x-trace").map(str::to_string);
        SEEN.lock().unwrap().push((order, tenant, trace));
    }
}

fn with_headers(pairs: &[(&str, &str)]) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (name, value) in pairs {
        headers.insert((*name).into(), AMQPValue::LongString((*value).into()));
    }
    BasicProperties::default().with_headers(headers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_named_message_and_an_extractor_of_the_users_own_are_given_to_the_handler() {
    let broker = Broker::connect().await;
    let (exchange, queue) = (unique("tenant-x"), unique("tenant-q"));
    let config = config(
        &broker,
        "extract_tenanted",
        &[("on_order.exchange", &exchange), ("on_order.queue", &queue)],
    );
    let running = Runtime::new(config)
        .services(["extract_tenanted"])
        .start()
        .await
        .expect("starts");

    let body = serde_json::to_vec(&json!({"id": 7})).unwrap();
    let headers = with_headers(&[("x-tenant", "acme"), ("x-trace", "t-1")]);
    broker.publish_with(&exchange, "rk", &body, headers).await;
    // No tenant: the extractor refuses the message, which goes to the dead-letter queue at
    // once with the reason, without the handler being called.
    let body = serde_json::to_vec(&json!({"id": 8})).unwrap();
    broker
        .publish_with(&exchange, "rk", &body, BasicProperties::default())
        .await;
    let dead = broker
        .wait_for_messages(&format!("{queue}.dead"), 1, BOUND)
        .await;
    assert!(wait_until(BOUND, || !SEEN.lock().unwrap().is_empty()).await);
    running.stop().await;

    assert_eq!(
        *SEEN.lock().unwrap(),
        vec![(
            Message { id: 7 },
            Tenant("acme".into()),
            Some("t-1".to_string())
        )]
    );
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].json(), json!({"id": 8}));
    let headers = dead[0].properties.headers().clone().unwrap_or_default();
    let text = |name: &str| match headers.inner().get(name) {
        Some(AMQPValue::LongString(text)) => text.to_string(),
        other => format!("{other:?}"),
    };
    assert_eq!(text("x-farine-error"), "the message has no x-tenant header");
    assert_eq!(text("x-farine-reason"), "rejected");
    assert_eq!(broker.queue_state(&queue).await, Some((0, 0)));
}

#[derive(Debug, serde::Deserialize)]
struct Entry {
    account: String,
    amount: i64,
}

#[derive(Default)]
struct Booking;

#[farine::service(name = "extract_booking")]
impl Booking {
    /// The database of the call as a parameter, inside the transaction farine opened.
    #[consume(exchange = "x", routing_key = "entry")]
    async fn book(&self, entry: Entry, db: Db) -> Result<(), DbCallError> {
        let mut conn = db.conn().await?;
        sqlx::query("INSERT INTO booked (account, amount) VALUES ($1, $2)")
            .bind(&entry.account)
            .bind(entry.amount)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_asks_for_db_writes_through_the_calls_transaction() {
    let broker = Broker::connect().await;
    let database = Database::create().await;
    let url = format!("postgres://postgres@127.0.0.1:5432/{}", database.name);
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query("CREATE TABLE booked (account text, amount bigint)")
        .execute(&pool)
        .await
        .unwrap();
    let (exchange, queue) = (unique("book-x"), unique("book-q"));
    let keys = database.ini_keys();
    let mut options: Vec<(&str, &str)> = keys
        .lines()
        .filter_map(|line| line.split_once(" = "))
        .collect();
    options.extend([
        ("book.exchange", exchange.as_str()),
        ("book.queue", queue.as_str()),
        ("book.transaction", "true"),
    ]);
    let running = Runtime::new(config(&broker, "extract_booking", &options))
        .services(["extract_booking"])
        .start()
        .await
        .expect("starts");
    broker
        .publish_json(&exchange, "entry", &json!({"account": "a1", "amount": 5}))
        .await;
    let deadline = tokio::time::Instant::now() + BOUND;
    let booked: Vec<(String, i64)> = loop {
        let rows = sqlx::query_as("SELECT account, amount FROM booked")
            .fetch_all(&pool)
            .await
            .unwrap();
        if !rows.is_empty() || tokio::time::Instant::now() >= deadline {
            break rows;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    running.stop().await;
    pool.close().await;
    assert_eq!(booked, vec![("a1".to_string(), 5)]);
    assert_eq!(broker.queue_state(&queue).await, Some((0, 0)));
}
