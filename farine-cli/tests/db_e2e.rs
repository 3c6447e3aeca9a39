//! End to end: `farine --start=db` keeps a ledger in PostgreSQL, applying each entry once,
//! even with duplicates and a SIGKILL in the middle of a batch.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use farine::rpc::Client;
use farine_test_support::process::{Process, SIGKILL, SIGTERM};
use farine_test_support::{Broker, Database, IniFile, unique};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, ExchangeKind};
use serde_json::json;

const START_BOUND: Duration = Duration::from_secs(300);
const BOUND: Duration = Duration::from_secs(30);

fn start_db(ini: &IniFile) -> Process {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_farine"));
    command
        .args(["--start=db", "--config"])
        .arg(&ini.path)
        .current_dir(workspace)
        .env("RUST_LOG", "info");
    let process = Process::spawn(command);
    assert!(
        process.wait_for_lines("serving RPC", 1, START_BOUND)
            && process.wait_for_output("consuming", BOUND),
        "farine --start=db started:\n{}",
        process.output()
    );
    process
}

/// Entry `i` of a batch: accounts `a0`..`a9`, amounts 1..=7, message id `<batch>-<i>`.
fn entry(batch: &str, i: u32) -> (String, i64, String) {
    (
        format!("a{}", i % 10),
        i64::from(i % 7 + 1),
        format!("{batch}-{i}"),
    )
}

async fn publish(broker: &Broker, exchange: &str, batch: &str, range: std::ops::Range<u32>) {
    for i in range {
        let (account, amount, id) = entry(batch, i);
        let body = serde_json::to_vec(&json!({"account": account, "amount": amount})).unwrap();
        let properties = BasicProperties::default().with_message_id(ShortString::from(id));
        broker
            .publish_with(exchange, "entry", &body, properties.clone())
            .await;
        // Every fifth entry is published twice, with the same message id.
        if i % 5 == 0 {
            broker
                .publish_with(exchange, "entry", &body, properties)
                .await;
        }
    }
}

/// The messages ready in `queue` (not delivered to a consumer).
async fn ready(broker: &Broker, queue: &str) -> u32 {
    broker.queue_state(queue).await.expect("the queue exists").0
}

fn expected(batch: &str, count: u32) -> BTreeMap<String, i64> {
    let mut balances = BTreeMap::new();
    for i in 0..count {
        let (account, amount, _) = entry(batch, i);
        *balances.entry(account).or_insert(0) += amount;
    }
    balances
}

/// Asks `balance` for every account until the answers match, within the bound.
async fn wait_for_balances(
    broker: &Broker,
    expected: &BTreeMap<String, i64>,
) -> BTreeMap<String, i64> {
    let ledger = Client::connect(&broker.uri(), "ledger", Duration::from_secs(10))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        let mut balances = BTreeMap::new();
        for account in expected.keys() {
            let balance: i64 = ledger.call("balance", (account,)).await.unwrap();
            balances.insert(account.clone(), balance);
        }
        if &balances == expected || tokio::time::Instant::now() >= deadline {
            return balances;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ini(broker: &Broker, database: &Database, exchange: &str, queue: &str) -> IniFile {
    IniFile::new(&format!(
        "[DEFAULT]\namqp_uri = {}\n[ledger]\n{}entry.inbox = true\nentry.exchange = {exchange}\nentry.queue = {queue}\nprefetch_count = 20\n",
        broker.uri(),
        database.ini_keys()
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_entries_with_duplicates_give_the_right_balances_each_id_applied_once() {
    let broker = Broker::connect().await;
    let database = Database::create().await;
    let (exchange, queue) = (unique("ledger"), unique("ledger-entries"));
    broker
        .declare_exchange(&exchange, ExchangeKind::Direct)
        .await;
    let ini = ini(&broker, &database, &exchange, &queue);
    let mut process = start_db(&ini);

    publish(&broker, &exchange, "one", 0..1000).await;
    let want = expected("one", 1000);
    assert_eq!(
        wait_for_balances(&broker, &want).await,
        want,
        "{}",
        process.output()
    );

    process.signal(SIGTERM);
    assert_eq!(process.wait_exit(BOUND).and_then(|s| s.code()), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_in_the_middle_of_a_batch_then_a_restart_still_gives_the_right_balances() {
    let broker = Broker::connect().await;
    let database = Database::create().await;
    let (exchange, queue) = (unique("ledger"), unique("ledger-entries"));
    broker
        .declare_exchange(&exchange, ExchangeKind::Direct)
        .await;
    // The whole batch waits in the ledger's queue before farine starts: 1000 entries, 200 of
    // them twice.
    broker
        .declare_bound_queue(&queue, &exchange, "entry", FieldTable::default())
        .await;
    publish(&broker, &exchange, "two", 0..1000).await;
    let total = 1200;
    assert_eq!(ready(&broker, &queue).await, total);

    let ini = ini(&broker, &database, &exchange, &queue);
    let mut first = start_db(&ini);
    // Kill it once it has settled a hundred entries, while it works through the rest.
    let deadline = tokio::time::Instant::now() + BOUND;
    while ready(&broker, &queue).await > total - 100 {
        assert!(tokio::time::Instant::now() < deadline, "{}", first.output());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.signal(SIGKILL);
    first.wait_exit(BOUND).expect("killed");
    // The kill landed mid-batch: once the broker took back what was in flight (at most the
    // prefetch of 20), part of the batch is done and part still queued.
    assert!(broker.wait_for_consumers(&queue, 0, BOUND).await);
    let left = ready(&broker, &queue).await;
    assert!(
        left > 0 && left <= total - 100 + 20,
        "{left} of {total} entries left after the kill"
    );

    let mut second = start_db(&ini);
    let want = expected("two", 1000);
    assert_eq!(
        wait_for_balances(&broker, &want).await,
        want,
        "{}",
        second.output()
    );
    second.signal(SIGTERM);
    assert_eq!(second.wait_exit(BOUND).and_then(|s| s.code()), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_while_reading_a_stream_then_a_restart_applies_each_entry_once() {
    let broker = Broker::connect().await;
    let database = Database::create().await;
    let (exchange, queue) = (unique("ledger"), unique("ledger-stream"));
    broker
        .declare_exchange(&exchange, ExchangeKind::Direct)
        .await;
    // The whole batch is in the stream before farine starts: 1000 entries, 200 of them twice.
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("stream".into()),
    );
    broker
        .declare_bound_queue(&queue, &exchange, "entry", arguments)
        .await;
    publish(&broker, &exchange, "three", 0..1000).await;

    let ini = IniFile::new(&format!(
        "{}entry.queue_type = stream\nentry.start_from = first\n",
        std::fs::read_to_string(&ini(&broker, &database, &exchange, &queue).path).unwrap()
    ));
    let mut first = start_db(&ini);
    // Kill it once it has applied a hundred entries, while it works through the rest.
    let deadline = tokio::time::Instant::now() + BOUND;
    while database.count("SELECT count(*) FROM farine_inbox").await < 100 {
        assert!(tokio::time::Instant::now() < deadline, "{}", first.output());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.signal(SIGKILL);
    first.wait_exit(BOUND).expect("killed");
    let applied = database.count("SELECT count(*) FROM farine_inbox").await;
    assert!(
        applied < 1000,
        "the kill landed mid-stream ({applied} applied)"
    );

    // The restart reads on from the saved position, which may be behind what was applied:
    // the inbox skips those.
    let mut second = start_db(&ini);
    let want = expected("three", 1000);
    assert_eq!(
        wait_for_balances(&broker, &want).await,
        want,
        "{}",
        second.output()
    );
    assert_eq!(
        database.count("SELECT count(*) FROM farine_inbox").await,
        1000
    );
    second.signal(SIGTERM);
    assert_eq!(second.wait_exit(BOUND).and_then(|s| s.code()), Some(0));
    // The position was saved at the stop: past the 1200th message (offsets 0..1199).
    assert_eq!(
        database
            .count("SELECT split_part(position, '@', 2)::bigint FROM farine_checkpoint")
            .await,
        1200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_refuses_stops_start_up_naming_it_but_never_its_password() {
    let broker = Broker::connect().await;
    // The local server trusts local connections, so the refusal is staged on a port where no
    // database listens; the password must not appear whatever the cause.
    let ini = IniFile::new(&format!(
        "[DEFAULT]\namqp_uri = {}\n[ledger]\ndb_connector = postgres\ndb_host = 127.0.0.1\ndb_port = 1\ndb_name = test\ndb_user = postgres\ndb_password = p4ss-w0rd-secret\ndb_timeout = 2\n",
        broker.uri()
    ));
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_farine"))
        .args(["--start=db", "--config"])
        .arg(&ini.path)
        .current_dir(workspace)
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("host 127.0.0.1 port 1 database test user postgres"),
        "{stderr}"
    );
    assert!(!stderr.contains("p4ss-w0rd-secret"), "{stderr}");
}
