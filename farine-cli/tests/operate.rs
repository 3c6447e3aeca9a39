//! End to end: the operator's commands through the real `farine` launcher and the real
//! broker: `farine call` against the running rpc example, `farine publish` to the running
//! pubsub example, `farine dead-letters list|replay|purge` on the pubsub example's dead letters,
//! and no password in anything they print.

mod common;

use common::{BOUND, START_BOUND, start_rpc, workspace};
use std::process::Command;
use std::time::{Duration, Instant};

use farine_test_support::process::{Process, SIGTERM};
use farine_test_support::{Broker, IniFile, free_port, unique};
use lapin::ExchangeKind;
use lapin::types::AMQPValue;
use serde_json::json;

/// The launcher, run from the workspace, with no config from the environment and farine's
/// default log level for commands.
fn farine(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_farine"));
    command
        .args(args)
        .current_dir(workspace())
        .env_remove("FARINE_INI")
        .env_remove("RUST_LOG");
    command
}

/// What a command did.
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Ran {
    fn both(&self) -> String {
        format!("stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr)
    }
}

/// Runs `command` to its end.
fn ran(mut command: Command) -> Ran {
    let started = Instant::now();
    let output = command.output().expect("the launcher runs");
    Ran {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        took: started.elapsed(),
    }
}

// --- farine call --------------------------------------------------------------------------------

fn stop(mut process: Process) {
    process.signal(SIGTERM);
    let status = process.wait_exit(BOUND).expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", process.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_prints_a_result_a_stream_line_by_line_and_a_methods_error_on_stderr() {
    let broker = Broker::connect().await;
    let rpc = start_rpc(&broker);
    let uri = broker.uri();

    // The broker from the config (its [DEFAULT], overridden by the environment), with
    // --config after the subcommand.
    let mut command = farine(&[
        "call",
        "server.repeat",
        r#"["ab", 2]"#,
        "--config",
        "etc/farine.ini",
    ]);
    command.env("FARINE__DEFAULT__AMQP_URI", &uri);
    let repeated = ran(command);
    assert_eq!(repeated.code, Some(0), "{}", repeated.both());
    assert_eq!(repeated.stdout, "\"abab\"\n", "{}", repeated.both());

    let by_name = ran(farine(&[
        "call",
        "server.repeat",
        "--kwargs",
        r#"{"text": "xy", "times": 3}"#,
        "--amqp-uri",
        &uri,
    ]));
    assert_eq!(by_name.code, Some(0), "{}", by_name.both());
    assert_eq!(by_name.stdout, "\"xyxyxy\"\n");

    let streamed = ran(farine(&["call", "server.count", "[3]", "--amqp-uri", &uri]));
    assert_eq!(streamed.code, Some(0), "{}", streamed.both());
    assert_eq!(streamed.stdout, "0\n1\n2\n", "one line per item");

    let failed = ran(farine(&[
        "call",
        "server.fail",
        r#"["boom"]"#,
        "--amqp-uri",
        &uri,
    ]));
    assert_eq!(failed.code, Some(1), "{}", failed.both());
    assert_eq!(failed.stdout, "", "nothing on stdout");
    assert!(
        failed.stderr.contains("server.fail failed: boom"),
        "{}",
        failed.both()
    );

    let late = ran(farine(&[
        "call",
        "server.sleep",
        "[5000]",
        "--timeout",
        "0.5",
        "--amqp-uri",
        &uri,
    ]));
    assert_eq!(late.code, Some(1), "{}", late.both());
    assert!(
        late.stderr
            .contains("server.sleep did not answer within 500ms"),
        "{}",
        late.both()
    );
    assert!(late.took < Duration::from_secs(5), "{:?}", late.took);

    stop(rpc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_of_an_unknown_method_or_service_fails_within_a_second_naming_it() {
    let broker = Broker::connect().await;
    let rpc = start_rpc(&broker);
    let uri = broker.uri();

    let method = ran(farine(&["call", "server.nosuchmethod", "--amqp-uri", &uri]));
    assert_eq!(method.code, Some(1), "{}", method.both());
    assert!(
        method
            .stderr
            .contains("service `server` has no method `nosuchmethod`"),
        "{}",
        method.both()
    );
    assert!(method.took < Duration::from_secs(1), "{:?}", method.took);

    // At warn, as a service logs: the broker closing the channel of the call (404) is no
    // lost connection.
    let service = ran(farine(&[
        "call",
        "nosuchservice.repeat",
        "--amqp-uri",
        &uri,
        "--log-level",
        "warn,lapin=off",
    ]));
    assert_eq!(service.code, Some(1), "{}", service.both());
    assert!(
        service
            .stderr
            .contains("no service `nosuchservice` is listening"),
        "{}",
        service.both()
    );
    assert!(service.took < Duration::from_secs(1), "{:?}", service.took);
    // (lapin itself may still, rarely, take the channel's close racing its own for a
    // connection error, with another cause: only the 404 must not read as a loss.)
    assert!(
        !service.stderr.lines().any(|line| {
            line.contains("connection to the AMQP broker is lost") && line.contains("NOT_FOUND")
        }),
        "{}",
        service.both()
    );

    stop(rpc);
}

#[test]
fn call_arguments_that_are_not_a_json_array_or_object_exit_2() {
    for (args, expected) in [
        (vec!["call", "server.repeat", r#"["ab", 2"#], "not JSON"),
        (
            vec!["call", "server.repeat", r#"{"text": "ab"}"#],
            "expected a JSON array",
        ),
        (
            vec!["call", "server.repeat", "--kwargs", "[1]"],
            "expected a JSON object",
        ),
        (vec!["call", "server", "[]"], "SERVICE.METHOD"),
        (
            vec!["call", "server.repeat", "--timeout", "0"],
            "more than zero",
        ),
    ] {
        let refused = ran(farine(&args));
        assert_eq!(refused.code, Some(2), "{args:?}: {}", refused.both());
        assert!(
            refused.stderr.contains(expected),
            "{args:?}: {}",
            refused.both()
        );
    }
}

// --- farine publish -----------------------------------------------------------------------------

/// A config for `relay` in the test's vhost, with exchanges and a queue of the test's own.
fn own_topology(broker: &Broker, extra: &str) -> (IniFile, String, String, String) {
    let (orders, audit, queue) = (unique("orders"), unique("audit"), unique("relay"));
    let ini = IniFile::new(&format!(
        "[DEFAULT]\namqp_uri = {}\n\n[relay]\nrelay.exchange = {orders}\nrelay.queue = {queue}\nseen.exchange = {audit}\n{extra}",
        broker.uri()
    ));
    (ini, orders, audit, queue)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_is_confirmed_relayed_by_the_pubsub_example_and_carries_its_headers() {
    let broker = Broker::connect().await;
    let (ini, orders, audit, _) = own_topology(&broker, "");
    let path = ini.path.display().to_string();
    let service = Process::spawn(farine(&["--start=pubsub", "--config", &path]));
    assert!(
        service.wait_for_output("consuming", START_BOUND),
        "{}",
        service.output()
    );
    let observer = broker.bind_queue(&audit, "order.seen").await;

    let published = ran(farine(&[
        "publish",
        &orders,
        "order.created",
        r#"{"id":1}"#,
        "--config",
        &path,
    ]));
    assert_eq!(published.code, Some(0), "{}", published.both());
    assert_eq!(
        published.stdout,
        format!("published to {orders} with routing key order.created (confirmed)\n")
    );
    let relayed = broker.wait_for_messages(&observer, 1, BOUND).await;
    assert_eq!(
        relayed.iter().map(|m| m.json()).collect::<Vec<_>>(),
        vec![json!({"seen": {"id": 1}})],
        "{}",
        service.output()
    );

    // Straight to the observer, with headers: typed as the config's argument tables are.
    let with_headers = ran(farine(&[
        "publish",
        &audit,
        "order.seen",
        r#"{"id": 2}"#,
        "--header",
        "x-tenant=acme",
        "--header",
        "count=3",
        "--header",
        r#"code="007""#,
        "--config",
        &path,
    ]));
    assert_eq!(with_headers.code, Some(0), "{}", with_headers.both());
    let received = broker.wait_for_messages(&observer, 1, BOUND).await;
    let [message] = received.as_slice() else {
        panic!("one message: {received:?}");
    };
    assert_eq!(message.body, br#"{"id": 2}"#, "the body as written");
    let properties = &message.properties;
    assert_eq!(
        properties.content_type().as_ref().map(|c| c.as_str()),
        Some("application/json")
    );
    assert_eq!(*properties.delivery_mode(), Some(2), "persistent");
    let headers = properties.headers().clone().unwrap_or_default();
    let header = |name: &str| headers.inner().get(name).cloned();
    assert_eq!(
        header("x-tenant"),
        Some(AMQPValue::LongString("acme".into()))
    );
    assert_eq!(header("count"), Some(AMQPValue::LongLongInt(3)));
    assert_eq!(header("code"), Some(AMQPValue::LongString("007".into())));

    stop(service);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_reports_no_route_a_missing_exchange_and_a_body_that_is_not_json() {
    let broker = Broker::connect().await;
    let uri = broker.uri();
    let exchange = unique("unbound");
    broker
        .declare_exchange(&exchange, ExchangeKind::Direct)
        .await;

    let returned = ran(farine(&[
        "publish",
        &exchange,
        "nobody.binds",
        "{}",
        "--amqp-uri",
        &uri,
    ]));
    assert_eq!(returned.code, Some(1), "{}", returned.both());
    assert!(
        returned.stderr.contains(&format!(
            "no queue is bound to exchange `{exchange}` for routing key `nobody.binds` (312 NO_ROUTE)"
        )),
        "{}",
        returned.both()
    );

    let missing = unique("missing");
    let absent = ran(farine(&[
        "publish",
        &missing,
        "rk",
        "{}",
        "--amqp-uri",
        &uri,
    ]));
    assert_eq!(absent.code, Some(1), "{}", absent.both());
    assert!(
        absent.stderr.contains(&format!(
            "exchange `{missing}` does not exist (404 NOT_FOUND)"
        )),
        "{}",
        absent.both()
    );

    let not_json = ran(farine(&["publish", &exchange, "rk", "{id: 1}"]));
    assert_eq!(not_json.code, Some(2), "{}", not_json.both());
    assert!(
        not_json.stderr.contains("the body is not JSON"),
        "{}",
        not_json.both()
    );
    let bad_header = ran(farine(&["publish", &exchange, "rk", "{}", "--header", "x"]));
    assert_eq!(bad_header.code, Some(2), "{}", bad_header.both());
    assert!(
        bad_header.stderr.contains("NAME=VALUE"),
        "{}",
        bad_header.both()
    );
}

// --- farine dead-letters ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_in_place_then_replayed_and_purged_up_to_a_limit() {
    let broker = Broker::connect().await;
    // Nothing is bound to the audit exchange and publishes are mandatory: each relay fails
    // with NoRoute, is retried once, and the order goes to the dead-letter queue.
    let (ini, orders, _, queue) = own_topology(
        &broker,
        "mandatory = true\nretry_delay = 100ms\nmax_attempts = 2\n",
    );
    let path = ini.path.display().to_string();
    let dead = format!("{queue}.dead");
    let service = Process::spawn(farine(&["--start=pubsub", "--config", &path]));
    assert!(
        service.wait_for_output("consuming", START_BOUND),
        "{}",
        service.output()
    );
    for id in [1, 2] {
        broker
            .publish_json(&orders, "order.created", &json!({ "id": id }))
            .await;
    }
    broker.publish(&orders, "order.created", b"{not json").await;
    assert!(
        broker.wait_for_ready(&dead, 3, BOUND).await,
        "three dead letters:\n{}",
        service.output()
    );
    stop(service);

    // Listed by the module's binary, which knows the handler's queues.
    let listed = ran(farine(&[
        "--start=pubsub",
        "dead-letters",
        "list",
        "relay.relay",
        "--config",
        &path,
    ]));
    assert_eq!(listed.code, Some(0), "{}", listed.both());
    let out = &listed.stdout;
    assert!(
        out.starts_with(&format!("3 dead letter(s) in {dead} (left in the queue)\n")),
        "{out}"
    );
    for expected in [
        "#1 failed at 20",
        "#3 failed at 20",
        "attempts: 2 (failed)",
        "attempts: 1 (undecodable)",
        "error: no queue is bound to exchange",
        &format!("routing key: order.created (exchange {orders})"),
        r#"body: {"id":1}"#,
        r#"body: {"id":2}"#,
        "body: {not json",
    ] {
        assert!(out.contains(expected), "`{expected}` in:\n{out}");
    }
    assert!(broker.wait_for_ready(&dead, 3, BOUND).await, "still there");
    let again = ran(farine(&[
        "--start=pubsub",
        "dead-letters",
        "list",
        "relay.relay",
        "--config",
        &path,
    ]));
    assert_eq!(again.stdout, listed.stdout, "the same, in the same order");

    // The launcher alone finds the queue from the config.
    let first = ran(farine(&[
        "dead-letters",
        "list",
        "relay.relay",
        "--limit",
        "1",
        "--config",
        &path,
    ]));
    assert_eq!(first.code, Some(0), "{}", first.both());
    assert!(
        first.stdout.starts_with(&format!(
            "3 dead letter(s) in {dead}, the first 1 shown (left in the queue)\n#1 failed at"
        )),
        "{}",
        first.both()
    );
    assert!(!first.stdout.contains("#2"), "{}", first.both());
    assert!(broker.wait_for_ready(&dead, 3, BOUND).await, "still there");

    let replayed = ran(farine(&[
        "dead-letters",
        "replay",
        "relay.relay",
        "--limit",
        "1",
        "--config",
        &path,
    ]));
    assert_eq!(replayed.code, Some(0), "{}", replayed.both());
    assert_eq!(
        replayed.stdout,
        format!("replayed 1 dead letter(s) from {dead} to {queue}\n")
    );
    assert!(broker.wait_for_ready(&queue, 1, BOUND).await, "one back");
    assert!(broker.wait_for_ready(&dead, 2, BOUND).await, "two left");

    let purged = ran(farine(&[
        "--start=pubsub",
        "dead-letters",
        "purge",
        "relay.relay",
        "--config",
        &path,
    ]));
    assert_eq!(purged.code, Some(0), "{}", purged.both());
    assert_eq!(
        purged.stdout,
        format!("purged 2 dead letter(s) from {dead}\n")
    );
    assert!(broker.wait_for_ready(&dead, 0, BOUND).await, "none left");
    assert!(
        broker.wait_for_ready(&queue, 1, BOUND).await,
        "the replayed one"
    );
    let empty = ran(farine(&[
        "dead-letters",
        "list",
        "relay.relay",
        "--config",
        &path,
    ]));
    assert_eq!(empty.code, Some(0), "{}", empty.both());
    assert_eq!(empty.stdout, format!("no dead letters in {dead}\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_of_an_unknown_handler_is_a_clear_error() {
    let broker = Broker::connect().await;
    let (ini, _, _, _) = own_topology(&broker, "");
    let path = ini.path.display().to_string();

    // The module's binary knows its handlers: a config error listing them.
    let known = ran(farine(&[
        "--start=pubsub",
        "dead-letters",
        "list",
        "relay.nope",
        "--config",
        &path,
    ]));
    assert_eq!(known.code, Some(3), "{}", known.both());
    assert!(
        known
            .stderr
            .contains("no #[consume] handler `relay.nope` (there are: relay.relay)"),
        "{}",
        known.both()
    );

    // The launcher alone can only find that the queue does not exist, and says what to do.
    let guessed = ran(farine(&[
        "dead-letters",
        "purge",
        "relay.nope",
        "--config",
        &path,
    ]));
    assert_eq!(guessed.code, Some(1), "{}", guessed.both());
    for expected in [
        "queue `relay.nope.dead` does not exist (404 NOT_FOUND)",
        "--start=MODULE",
    ] {
        assert!(guessed.stderr.contains(expected), "{}", guessed.both());
    }
}

// --- no password --------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_command_prints_the_password_of_the_broker_uri() {
    let broker = Broker::connect().await;
    assert!(broker.uri().contains("guest:guest@"), "{}", broker.uri());
    // A password of its own where nothing logs in: it must appear nowhere, in any form.
    let password = unique("pw");
    let closed = format!(
        "amqp://operator:{password}@127.0.0.1:{}/{}",
        free_port(),
        broker.vhost()
    );
    let not_a_uri = format!("amqp:operator:{password}@host");
    let unreachable = IniFile::new(&format!("[DEFAULT]\namqp_uri = {closed}\n[relay]\n"));
    let unreachable = unreachable.path.display().to_string();
    let reachable = IniFile::new(&format!("[DEFAULT]\namqp_uri = {}\n", broker.uri()));
    let reachable = reachable.path.display().to_string();
    let queue = broker.bind_queue("amq.direct", "nobody").await;
    let at_trace = ["--log-level", "trace"];
    let runs: Vec<(Vec<&str>, i32)> = vec![
        (vec!["call", "server.repeat", "--config", &unreachable], 1),
        (vec!["call", "server.repeat", "--amqp-uri", &closed], 1),
        (
            vec!["publish", "orders", "rk", "{}", "--config", &unreachable],
            1,
        ),
        (
            vec![
                "dead-letters",
                "list",
                "relay.relay",
                "--config",
                &unreachable,
            ],
            1,
        ),
        (
            vec![
                "dead-letters",
                "replay",
                "relay.relay",
                "--config",
                &reachable,
                "--amqp-uri",
                &closed,
            ],
            1,
        ),
        (vec!["call", "server.repeat", "--amqp-uri", &not_a_uri], 2),
        // Through a login, at the most verbose level.
        (vec!["publish", "", &queue, "{}", "--config", &reachable], 0),
    ];
    for (args, code) in runs {
        let mut args = args;
        args.extend(at_trace);
        let run = ran(farine(&args));
        assert_eq!(run.code, Some(code), "{args:?}: {}", run.both());
        assert!(
            !run.both().contains(&password) && !run.both().contains("guest:guest"),
            "{args:?} printed the password: {}",
            run.both()
        );
    }
}
