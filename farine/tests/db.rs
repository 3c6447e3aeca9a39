//! PostgreSQL against the real server, each test in a database of its own: pool settings,
//! the call's connection and transaction, the inbox, and migrations.

mod common;

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{BOUND, start_error};
use farine::config::Config;
use farine::db::{EmbeddedMigration, sqlx};
use farine::{Db, DbCallError, Runtime, Shutdown, consume, execute};
use farine_test_support::{Broker, Database, unique, wait_until};
use lapin::BasicProperties;
use lapin::types::ShortString;
use serde_json::{Value, json};

fn config(broker: &Broker, service: &str, database: &Database, options: &str) -> Config {
    let text = format!(
        "[{service}]\namqp_uri = {}\n{}{options}",
        broker.uri(),
        database.ini_keys()
    );
    Config::from_ini(&text, "test.ini").unwrap()
}

const NOTES: &[EmbeddedMigration] = &[EmbeddedMigration {
    version: 1,
    description: "notes",
    sql: "CREATE TABLE notes (id text PRIMARY KEY, body text NOT NULL)",
}];

// ---------------------------------------------------------------------------------------------

static MAX_CONNECTIONS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

#[derive(Default)]
struct Pooled;

#[farine::service(name = "db_pooled")]
impl Pooled {
    #[execute]
    async fn inspect(&self, shutdown: Shutdown) -> Result<(), DbCallError> {
        let db = Db::current();
        let options = db.pool()?.options();
        MAX_CONNECTIONS
            .lock()
            .unwrap()
            .push(options.get_max_connections());
        let one: i32 = sqlx::query_scalar("SELECT 1")
            .fetch_one(&mut *db.conn().await?)
            .await?;
        assert_eq!(one, 1);
        shutdown.cancelled().await;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_follows_the_seed_keys_and_a_handler_gets_a_connection() {
    let broker = Broker::connect().await;
    let database = Database::create().await;
    let running = Runtime::new(config(&broker, "db_pooled", &database, "db_max_conn = 3\n"))
        .services(["db_pooled"])
        .start()
        .await
        .expect("starts");
    assert!(wait_until(BOUND, || !MAX_CONNECTIONS.lock().unwrap().is_empty()).await);
    running.stop().await;
    assert_eq!(MAX_CONNECTIONS.lock().unwrap()[0], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_db_connector_is_a_config_error_listing_the_supported_ones() {
    let broker = Broker::connect().await;
    let text = format!(
        "[db_pooled]\namqp_uri = {}\ndb_connector = mysql\n",
        broker.uri()
    );
    let error = start_error(
        Config::from_ini(&text, "test.ini").unwrap(),
        "db_pooled",
        "refused",
    )
    .await;
    assert!(error.is_config(), "{error}");
    assert!(
        error.to_string().contains("supported connectors: postgres"),
        "{error}"
    );
}

// ---------------------------------------------------------------------------------------------

static NOTED: AtomicUsize = AtomicUsize::new(0);

#[derive(Default)]
struct Notes;

#[farine::service(name = "db_notes")]
impl Notes {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn note(&self, body: Value) -> Result<(), String> {
        let db = Db::current();
        let mut conn = db.conn().await.map_err(|e| e.to_string())?;
        sqlx::query("INSERT INTO notes (id, body) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET body = notes.body || '+' || $2")
            .bind(body["id"].as_str().unwrap_or("?"))
            .bind(body["text"].as_str().unwrap_or(""))
            .execute(&mut *conn)
            .await
            .map_err(|e| e.to_string())?;
        drop(conn);
        NOTED.fetch_add(1, Ordering::SeqCst);
        if body["fail"] == true {
            return Err("fails after writing".into());
        }
        Ok(())
    }
}

async fn start_notes(
    database: &Database,
    broker: &Broker,
    options: &str,
) -> (farine::Running, String) {
    let (exchange, queue) = (unique("notes-x"), unique("notes-q"));
    let options = format!(
        "note.exchange = {exchange}\nnote.queue = {queue}\nretry_delay = 10ms\nmax_attempts = 2\n{options}"
    );
    let running = Runtime::new(config(broker, "db_notes", database, &options))
        .services(["db_notes"])
        .migrations(NOTES)
        .start()
        .await
        .expect("starts");
    (running, exchange)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_transaction_ok_commits_and_err_rolls_back_before_the_message_is_settled() {
    let database = Database::create().await;
    let broker = Broker::connect().await;
    let (running, exchange) = start_notes(&database, &broker, "note.transaction = true\n").await;
    broker
        .publish_json(&exchange, "rk", &json!({"id": "kept", "text": "a"}))
        .await;
    broker
        .publish_json(
            &exchange,
            "rk",
            &json!({"id": "lost", "text": "b", "fail": true}),
        )
        .await;
    // One call for `kept`, two attempts for `lost`.
    assert!(wait_until(BOUND, || NOTED.load(Ordering::SeqCst) == 3).await);
    running.stop().await;
    assert_eq!(
        database
            .count("SELECT count(*) FROM notes WHERE id = 'kept'")
            .await,
        1
    );
    assert_eq!(
        database
            .count("SELECT count(*) FROM notes WHERE id = 'lost'")
            .await,
        0,
        "both failed attempts were rolled back"
    );
}

// ---------------------------------------------------------------------------------------------

static INBOXED: AtomicUsize = AtomicUsize::new(0);
static B_FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[derive(Default)]
struct Inboxed;

#[farine::service(name = "db_inboxed")]
impl Inboxed {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn apply(&self, body: Value) -> Result<(), String> {
        let db = Db::current();
        let mut conn = db.conn().await.map_err(|e| e.to_string())?;
        sqlx::query("INSERT INTO notes (id, body) VALUES ($1, 'x') ON CONFLICT (id) DO UPDATE SET body = notes.body || 'x'")
            .bind(body["account"].as_str().unwrap_or("?"))
            .execute(&mut *conn)
            .await
            .map_err(|e| e.to_string())?;
        drop(conn);
        INBOXED.fetch_add(1, Ordering::SeqCst);
        if body["fail_first"] == true && !B_FAILED.swap(true, Ordering::SeqCst) {
            return Err("fails after writing, the first time".into());
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbox_applies_each_message_id_once_under_duplicates_and_retries() {
    let database = Database::create().await;
    let broker = Broker::connect().await;
    let (exchange, queue) = (unique("inbox-x"), unique("inbox-q"));
    let options = format!(
        "apply.exchange = {exchange}\napply.queue = {queue}\napply.inbox = true\nretry_delay = 10ms\n"
    );
    let running = Runtime::new(config(&broker, "db_inboxed", &database, &options))
        .services(["db_inboxed"])
        .migrations(NOTES)
        .start()
        .await
        .expect("starts");
    let with_id = |id: &str| BasicProperties::default().with_message_id(ShortString::from(id));
    // `a` published three times, `b` once but failing on its first attempt.
    for _ in 0..3 {
        broker
            .publish_with(&exchange, "rk", br#"{"account": "a"}"#, with_id("m-a"))
            .await;
    }
    broker
        .publish_with(
            &exchange,
            "rk",
            br#"{"account": "b", "fail_first": true}"#,
            with_id("m-b"),
        )
        .await;
    broker
        .publish_with(
            &exchange,
            "rk",
            br#"{"account": "done"}"#,
            with_id("m-done"),
        )
        .await;
    assert!(broker.wait_for_consumers(&queue, 1, BOUND).await);
    assert!(
        wait_until(BOUND, || INBOXED.load(Ordering::SeqCst) >= 3).await,
        "handled"
    );
    // Wait until every message left the queue (settled), then stop.
    let mut settled = false;
    for _ in 0..500 {
        if broker.queue_state(&queue).await == Some((0, 1))
            && database.count("SELECT count(*) FROM farine_inbox").await == 3
        {
            settled = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    running.stop().await;
    assert!(settled, "all three ids recorded");
    assert_eq!(
        database
            .count("SELECT length(body)::bigint FROM notes WHERE id = 'a'")
            .await,
        1,
        "the duplicates of m-a were not applied again"
    );
    assert_eq!(
        database
            .count("SELECT length(body)::bigint FROM notes WHERE id = 'b'")
            .await,
        1,
        "m-b's failed attempt was rolled back with its inbox row, its retry applied once"
    );
}

// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Migrated;

#[farine::service(name = "db_migrated")]
impl Migrated {
    #[execute]
    async fn idle(&self, shutdown: Shutdown) {
        shutdown.cancelled().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_applied_once_under_two_concurrent_starts() {
    let broker = Broker::connect().await;
    let database = Database::create().await;
    let start = || {
        Runtime::new(config(&broker, "db_migrated", &database, ""))
            .services(["db_migrated"])
            .migrations(NOTES)
            .start()
    };
    let (first, second) = tokio::join!(start(), start());
    let (first, second) = (first.expect("first starts"), second.expect("second starts"));
    first.stop().await;
    second.stop().await;
    assert_eq!(
        database
            .count("SELECT count(*) FROM _sqlx_migrations")
            .await,
        1
    );
    assert_eq!(
        database.count("SELECT count(*) FROM notes").await,
        0,
        "the table exists"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_without_a_database_is_a_config_error() {
    let broker = Broker::connect().await;
    let text = format!(
        "[db_notes]\namqp_uri = {}\nnote.transaction = true\n",
        broker.uri()
    );
    let error = start_error(
        Config::from_ini(&text, "test.ini").unwrap(),
        "db_notes",
        "refused",
    )
    .await;
    assert!(error.is_config(), "{error}");
    assert!(error.to_string().contains("db_connector"), "{error}");
}

#[derive(Default)]
struct Answering;

#[farine::service(name = "db_answering")]
impl Answering {
    #[farine::rpc::method]
    async fn answer(&self) -> u32 {
        42
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_on_an_rpc_method_is_refused_rather_than_ignored() {
    let broker = Broker::connect().await;
    let database = Database::create().await;
    let error = start_error(
        config(
            &broker,
            "db_answering",
            &database,
            "answer.transaction = true\n",
        ),
        "db_answering",
        "refused",
    )
    .await;
    assert!(error.is_config(), "{error}");
    assert!(
        error.to_string().contains("Db::current().begin()"),
        "{error}"
    );
}

// ---------------------------------------------------------------------------------------------

/// `notes`, and `children` whose parent is checked only at COMMIT: a transaction can write an
/// orphan and see its commit fail.
const DEFERRED: &[EmbeddedMigration] = &[
    EmbeddedMigration {
        version: 1,
        description: "notes",
        sql: "CREATE TABLE notes (id text PRIMARY KEY, body text NOT NULL)",
    },
    EmbeddedMigration {
        version: 2,
        description: "parents",
        sql: "CREATE TABLE parents (id text PRIMARY KEY)",
    },
    EmbeddedMigration {
        version: 3,
        description: "children, checked at commit",
        sql: "CREATE TABLE children (id text PRIMARY KEY, parent text NOT NULL \
              REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED)",
    },
    EmbeddedMigration {
        version: 4,
        description: "a parent",
        sql: "INSERT INTO parents (id) VALUES ('known')",
    },
];

/// `(id, attempt)` of each call that wrote its rows and was about to end (return `Ok` or
/// panic).
static WRITTEN: Mutex<Vec<(String, u32)>> = Mutex::new(Vec::new());

#[derive(Default)]
struct Transactional;

#[farine::service(name = "db_transactional")]
impl Transactional {
    /// Writes a note and a child of `parent`, then panics when `panic` is set, else returns Ok.
    #[consume(exchange = "x", routing_key = "rk")]
    async fn write(&self, body: Value, message: &farine::Message) -> Result<(), String> {
        let id = body["id"].as_str().unwrap_or("?").to_string();
        let db = Db::current();
        let mut conn = db.conn().await.map_err(|e| e.to_string())?;
        sqlx::query("INSERT INTO notes (id, body) VALUES ($1, 'written')")
            .bind(&id)
            .execute(&mut *conn)
            .await
            .map_err(|e| e.to_string())?;
        sqlx::query("INSERT INTO children (id, parent) VALUES ($1, $2)")
            .bind(&id)
            .bind(body["parent"].as_str().unwrap_or("known"))
            .execute(&mut *conn)
            .await
            .map_err(|e| e.to_string())?;
        drop(conn);
        WRITTEN.lock().unwrap().push((id, message.attempt()));
        if body["panic"] == true {
            panic!("panics after writing");
        }
        Ok(())
    }
}

/// Starts `db_transactional` in a transaction with two attempts; returns the exchange and the
/// queue.
async fn start_transactional(
    database: &Database,
    broker: &Broker,
) -> (farine::Running, String, String) {
    let (exchange, queue) = (unique("tx-x"), unique("tx-q"));
    let options = format!(
        "write.exchange = {exchange}\nwrite.queue = {queue}\nwrite.transaction = true\n\
         retry_delay = 10ms\nmax_attempts = 2\n"
    );
    let running = Runtime::new(config(broker, "db_transactional", database, &options))
        .services(["db_transactional"])
        .migrations(DEFERRED)
        .start()
        .await
        .expect("starts");
    (running, exchange, queue)
}

fn written(id: &str) -> Vec<u32> {
    WRITTEN
        .lock()
        .unwrap()
        .iter()
        .filter(|(written, _)| written == id)
        .map(|(_, attempt)| *attempt)
        .collect()
}

fn dead_letter_error(letter: &farine_test_support::Received) -> String {
    let headers = letter.properties.headers().clone().unwrap_or_default();
    match headers.inner().get(farine::amqp::ERROR_HEADER) {
        Some(lapin::types::AMQPValue::LongString(text)) => text.to_string(),
        other => panic!("no error header on the dead letter: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_transaction_a_handler_that_panics_after_writing_has_its_writes_rolled_back() {
    let database = Database::create().await;
    let broker = Broker::connect().await;
    let (running, exchange, queue) = start_transactional(&database, &broker).await;
    broker
        .publish_json(&exchange, "rk", &json!({"id": "kept"}))
        .await;
    broker
        .publish_json(&exchange, "rk", &json!({"id": "lost", "panic": true}))
        .await;
    let dead = broker
        .wait_for_messages(&format!("{queue}.dead"), 1, BOUND)
        .await;
    assert!(wait_until(BOUND, || written("kept").len() == 1).await);
    running.stop().await;

    assert_eq!(dead.len(), 1, "the panicking message failed both attempts");
    assert!(dead_letter_error(&dead[0]).contains("panics after writing"));
    assert_eq!(written("lost"), vec![1, 2], "it wrote on each attempt");
    assert_eq!(
        database
            .count("SELECT count(*) FROM notes WHERE id = 'lost'")
            .await,
        0,
        "both attempts' writes were rolled back"
    );
    assert_eq!(
        database
            .count("SELECT count(*) FROM notes WHERE id = 'kept'")
            .await,
        1,
        "the handler that returned Ok was committed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_transaction_a_commit_that_fails_leaves_the_message_unhandled_and_retried() {
    let database = Database::create().await;
    let broker = Broker::connect().await;
    let (running, exchange, queue) = start_transactional(&database, &broker).await;
    broker
        .publish_json(
            &exchange,
            "rk",
            &json!({"id": "adopted", "parent": "known"}),
        )
        .await;
    // Its child row names no parent: the deferred foreign key fails the COMMIT, after the
    // handler returned Ok.
    broker
        .publish_json(
            &exchange,
            "rk",
            &json!({"id": "orphan", "parent": "nobody"}),
        )
        .await;
    let dead = broker
        .wait_for_messages(&format!("{queue}.dead"), 1, BOUND)
        .await;
    assert!(wait_until(BOUND, || written("adopted").len() == 1).await);
    running.stop().await;

    assert_eq!(
        dead.len(),
        1,
        "a failed commit is a failed attempt, not an ack: retried, then dead-lettered"
    );
    assert_eq!(dead[0].json(), json!({"id": "orphan", "parent": "nobody"}));
    assert!(
        dead_letter_error(&dead[0]).contains("commit"),
        "{}",
        dead_letter_error(&dead[0])
    );
    assert_eq!(
        written("orphan"),
        vec![1, 2],
        "the handler returned Ok on both attempts"
    );
    assert_eq!(
        database
            .count("SELECT count(*) FROM notes WHERE id = 'orphan'")
            .await,
        0,
        "the failed commits left no effect"
    );
    assert_eq!(
        database.count("SELECT count(*) FROM children").await,
        1,
        "only the adopted child was committed"
    );
}

// ---------------------------------------------------------------------------------------------

static KEYED: Mutex<Vec<String>> = Mutex::new(Vec::new());

#[derive(Default)]
struct Keyed;

#[farine::service(name = "db_keyed")]
impl Keyed {
    /// Appends `x` to the note of `account`.
    #[consume(exchange = "x", routing_key = "rk")]
    async fn apply(&self, body: Value) -> Result<(), String> {
        let db = Db::current();
        let mut conn = db.conn().await.map_err(|e| e.to_string())?;
        sqlx::query("INSERT INTO notes (id, body) VALUES ($1, 'x') ON CONFLICT (id) DO UPDATE SET body = notes.body || 'x'")
            .bind(body["account"].as_str().unwrap_or("?"))
            .execute(&mut *conn)
            .await
            .map_err(|e| e.to_string())?;
        drop(conn);
        KEYED
            .lock()
            .unwrap()
            .push(body["transfer"].as_str().unwrap_or("?").to_string());
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_inbox_key_the_inbox_identifies_messages_by_that_body_field() {
    let database = Database::create().await;
    let broker = Broker::connect().await;
    let (exchange, queue) = (unique("keyed-x"), unique("keyed-q"));
    // One message at a time, in order: once `last` is applied, the ones before it are settled.
    let options = format!(
        "apply.exchange = {exchange}\napply.queue = {queue}\napply.inbox = true\n\
         apply.inbox_key = transfer\nprefetch_count = 1\n"
    );
    let running = Runtime::new(config(&broker, "db_keyed", &database, &options))
        .services(["db_keyed"])
        .migrations(NOTES)
        .start()
        .await
        .expect("starts");
    let send = |message_id: &str, body: Value| {
        let properties = BasicProperties::default().with_message_id(ShortString::from(message_id));
        let body = serde_json::to_vec(&body).unwrap();
        let broker = &broker;
        let exchange = exchange.clone();
        async move {
            broker
                .publish_with(&exchange, "rk", &body, properties)
                .await
        }
    };
    // t-1 twice under two message ids, t-2 once under a third: all on account `a`.
    send("m-1", json!({"transfer": "t-1", "account": "a"})).await;
    send("m-2", json!({"transfer": "t-1", "account": "a"})).await;
    send("m-3", json!({"transfer": "t-2", "account": "a"})).await;
    send("m-4", json!({"transfer": "last", "account": "last"})).await;
    assert!(
        wait_until(BOUND, || KEYED
            .lock()
            .unwrap()
            .contains(&"last".to_string()))
        .await,
        "handled"
    );
    running.stop().await;

    assert_eq!(
        *KEYED.lock().unwrap(),
        vec!["t-1", "t-2", "last"],
        "the second t-1 was not handled, whatever its message id"
    );
    assert_eq!(
        database
            .count("SELECT length(body)::bigint FROM notes WHERE id = 'a'")
            .await,
        2,
        "t-1 applied once, t-2 once"
    );
    assert_eq!(
        database
            .count("SELECT count(*) FROM farine_inbox WHERE message_id IN ('t-1', 't-2', 'last')")
            .await,
        3,
        "the inbox recorded the field's values"
    );
}
