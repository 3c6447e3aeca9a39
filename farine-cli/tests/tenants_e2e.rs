//! End to end: `farine --start=tenants`, the example of a parameter of the user's own (the
//! tenant, from a header) and of a layer (a timing line per call).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use farine_test_support::process::{Process, SIGTERM};
use farine_test_support::{Broker, IniFile, unique};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ExchangeKind};
use serde_json::json;

const START_BOUND: Duration = Duration::from_secs(300);
const BOUND: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_takes_the_tenant_from_a_header_refuses_a_message_without_and_times_each_call() {
    let broker = Broker::connect().await;
    let (orders, audit, queue) = (unique("orders"), unique("audit"), unique("tenants"));
    broker.declare_exchange(&audit, ExchangeKind::Direct).await;
    let observer = broker.bind_queue(&audit, "order.seen").await;
    let ini = IniFile::new(&format!(
        "[DEFAULT]\namqp_uri = {}\n[tenants]\non_order.exchange = {orders}\non_order.queue = {queue}\nseen.exchange = {audit}\n",
        broker.uri()
    ));
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_farine"));
    command
        .args(["--start=tenants", "--config"])
        .arg(&ini.path)
        .current_dir(workspace)
        .env("RUST_LOG", "info");
    let mut process = Process::spawn(command);
    assert!(
        process.wait_for_output("consuming", START_BOUND),
        "{}",
        process.output()
    );

    let mut headers = FieldTable::default();
    headers.insert("x-tenant".into(), AMQPValue::LongString("acme".into()));
    let body = serde_json::to_vec(&json!({"id": 1})).unwrap();
    broker
        .publish_with(
            &orders,
            "order.created",
            &body,
            BasicProperties::default().with_headers(headers),
        )
        .await;
    let body = serde_json::to_vec(&json!({"id": 2})).unwrap();
    broker
        .publish_with(&orders, "order.created", &body, BasicProperties::default())
        .await;

    let seen = broker.wait_for_messages(&observer, 1, BOUND).await;
    assert_eq!(seen.len(), 1, "{}", process.output());
    assert_eq!(seen[0].json(), json!({"tenant": "acme", "order": 1}));
    let dead = broker
        .wait_for_messages(&format!("{queue}.dead"), 1, BOUND)
        .await;
    assert_eq!(dead.len(), 1, "{}", process.output());
    assert_eq!(dead[0].json(), json!({"id": 2}));
    // The layer timed both calls (the refused one too) and the send.
    assert!(
        process.wait_for_lines("call timed", 2, BOUND)
            && process.wait_for_lines("send timed", 1, BOUND),
        "{}",
        process.output()
    );
    let output = process.output();
    assert!(
        output.contains("handler=\"on_order\" ok=true")
            && output.contains("handler=\"on_order\" ok=false"),
        "{output}"
    );

    process.signal(SIGTERM);
    let status = process.wait_exit(BOUND).expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", process.output());
}
