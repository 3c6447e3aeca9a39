//! End to end: `farine --start=sse`, `--start=ticker`, `--start=rpc,mixed` and a module that
//! fails on every run, as real processes against the real broker (and PostgreSQL).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use farine_test_support::process::{Process, SIGTERM};
use farine_test_support::sse::SseServer;
use farine_test_support::{Broker, Database, IniFile, unique};
use lapin::ExchangeKind;
use serde_json::json;

const START_BOUND: Duration = Duration::from_secs(300);
const BOUND: Duration = Duration::from_secs(15);

fn farine(args: &[&str]) -> Process {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_farine"));
    command
        .args(args)
        .current_dir(workspace)
        .env("RUST_LOG", "info");
    Process::spawn(command)
}

/// `farine --start=sse` with its own exchange and SSE server; returns the observer queue.
async fn start_sse(broker: &Broker, server: &SseServer, extra: &str) -> (Process, IniFile, String) {
    let exchange = unique("sse");
    broker
        .declare_exchange(&exchange, ExchangeKind::Direct)
        .await;
    let observer = broker.bind_queue(&exchange, "event").await;
    let ini = IniFile::new(&format!(
        "[DEFAULT]\namqp_uri = {}\n[listener]\nendpoint = {}\nstart_from = beginning\nreconnect_delay = 10ms\nforward.exchange = {exchange}\n{extra}",
        broker.uri(),
        server.url()
    ));
    let path = ini.path.display().to_string();
    let process = farine(&["--start=sse", "--config", &path]);
    assert!(
        process.wait_for_output("listening", START_BOUND),
        "{}",
        process.output()
    );
    (process, ini, observer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn farine_start_sse_relays_exactly_the_100_events_in_order_across_two_cuts() {
    let broker = Broker::connect().await;
    let server = SseServer::start(100, &[30, 70]).await;
    let (mut process, _ini, observer) = start_sse(&broker, &server, "").await;

    let received = broker.wait_for_messages(&observer, 100, BOUND).await;
    let expected: Vec<_> = (1..=100)
        .map(|n| json!({"id": n.to_string(), "data": {"n": n}}))
        .collect();
    let got: Vec<_> = received.iter().map(|m| m.json()).collect();
    assert_eq!(got, expected, "{}", process.output());
    assert!(
        broker.drain(&observer).await.is_empty(),
        "no duplicate after the 100"
    );
    assert_eq!(server.requests().len(), 3, "two cuts, two resumes");

    process.signal(SIGTERM);
    let status = process.wait_exit(BOUND).and_then(|s| s.code());
    assert_eq!(status, Some(0), "{}", process.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn farine_start_sse_with_a_database_resumes_after_a_restart_where_it_stopped() {
    let broker = Broker::connect().await;
    let database = Database::create().await;
    let server = SseServer::start(50, &[]).await;
    let (mut first, ini, observer) = start_sse(&broker, &server, &database.ini_keys()).await;
    assert_eq!(
        broker.wait_for_messages(&observer, 50, BOUND).await.len(),
        50
    );
    first.signal(SIGTERM);
    assert_eq!(first.wait_exit(BOUND).and_then(|s| s.code()), Some(0));

    server.publish_up_to(100);
    let path = ini.path.display().to_string();
    let mut second = farine(&["--start=sse", "--config", &path]);
    let rest = broker.wait_for_messages(&observer, 50, BOUND).await;
    let ids: Vec<_> = rest.iter().map(|m| m.json()["id"].clone()).collect();
    let expected: Vec<_> = (51..=100).map(|n| json!(n.to_string())).collect();
    assert_eq!(ids, expected, "{}", second.output());
    assert_eq!(server.requests().last(), Some(&Some("50".to_string())));
    second.signal(SIGTERM);
    assert_eq!(second.wait_exit(BOUND).and_then(|s| s.code()), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn farine_start_ticker_ticks_once_a_second_and_stops_without_waiting_out_the_drain_timeout() {
    let broker = Broker::connect().await;
    let exchange = unique("ticks");
    broker
        .declare_exchange(&exchange, ExchangeKind::Direct)
        .await;
    let observer = broker.bind_queue(&exchange, "tick").await;
    let ini = IniFile::new(&format!(
        "[DEFAULT]\namqp_uri = {}\n[ticker]\nsend.exchange = {exchange}\n",
        broker.uri()
    ));
    let path = ini.path.display().to_string();
    let mut process = farine(&["--start=ticker", "--config", &path]);
    let ticks = broker.wait_for_messages(&observer, 3, START_BOUND).await;
    let got: Vec<_> = ticks.iter().map(|m| m.json()).collect();
    assert_eq!(
        got,
        vec![json!({"tick": 1}), json!({"tick": 2}), json!({"tick": 3})]
    );
    // Three ticks take at least the two intervals between them.
    let started = Instant::now();
    let more = broker.wait_for_messages(&observer, 2, BOUND).await;
    assert_eq!(more.len(), 2);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "a tick a second"
    );

    // The method watches its Shutdown: it ends at once instead of being waited for until the
    // 30-second drain_timeout.
    let stopping = Instant::now();
    process.signal(SIGTERM);
    let status = process.wait_exit(BOUND).expect("exits");
    assert_eq!(status.code(), Some(0), "{}", process.output());
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "{:?}",
        stopping.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_that_fails_on_every_run_exits_non_zero_naming_service_and_handler() {
    let broker = Broker::connect().await;
    let ini = IniFile::new(&format!(
        "[DEFAULT]\namqp_uri = {}\n[crashy]\nrestart_delay = 20ms\nmax_restarts = 3\n",
        broker.uri()
    ));
    let path = ini.path.display().to_string();
    let mut process = farine(&["--start=crashy", "--config", &path]);
    let status = process.wait_exit(START_BOUND).expect("exits by itself");
    assert_eq!(status.code(), Some(1), "{}", process.output());
    let output = process.output();
    assert!(
        output.contains("service `crashy`, handler `work` failed 4 times"),
        "{output}"
    );
    assert_eq!(
        output.matches("handler task failed; restarting").count(),
        3,
        "each restart is logged: {output}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn farine_start_rpc_and_mixed_an_sse_event_goes_through_rpc() {
    let broker = Broker::connect().await;
    let server = SseServer::start(2, &[]).await;
    let exchange = unique("mixed");
    broker
        .declare_exchange(&exchange, ExchangeKind::Direct)
        .await;
    let observer = broker.bind_queue(&exchange, "answer").await;
    let ini = IniFile::new(&format!(
        "[DEFAULT]\namqp_uri = {}\n[server]\n[client]\n[mixed]\nendpoint = {}\nstart_from = beginning\nreport.exchange = {exchange}\nrpc_timeout = 10\n",
        broker.uri(),
        server.url()
    ));
    let path = ini.path.display().to_string();
    let mut process = farine(&["--start=rpc,mixed", "--config", &path]);
    let answers = broker.wait_for_messages(&observer, 2, START_BOUND).await;
    let got: Vec<_> = answers.iter().map(|m| m.json()).collect();
    assert_eq!(
        got,
        vec![
            json!({"data": "{\"n\": 1}", "answer": "{\"n\": 1}{\"n\": 1}"}),
            json!({"data": "{\"n\": 2}", "answer": "{\"n\": 2}{\"n\": 2}"}),
        ],
        "{}",
        process.output()
    );
    process.signal(SIGTERM);
    let status = process.wait_exit(BOUND).and_then(|s| s.code());
    assert_eq!(status, Some(0), "{}", process.output());
}
