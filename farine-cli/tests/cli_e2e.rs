//! End to end through the real `farine` launcher: the promises of the README's "Reference:
//! command line" (replaying dead letters, exit statuses 3 and 4, `--log-level`, `log_format`,
//! SIGINT, `--manifest-path`, `--release`) and of "Reference: configuration" (environment
//! overrides, no password in `--list` or in any log line).

mod common;

use common::{BOUND, START_BOUND, workspace};
use std::path::{Path, PathBuf};
use std::process::Command;

use farine_test_support::process::{self, Process, SIGINT, SIGTERM};
use farine_test_support::proxy::Proxy;
use farine_test_support::{Broker, Database, IniFile, Received, free_port, unique, vhost};
use lapin::options::BasicGetOptions;
use lapin::types::AMQPValue;
use serde_json::{Value, json};

/// The launcher, run from the workspace, logging at `info` unless a test says otherwise.
fn farine(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_farine"));
    command
        .args(args)
        .current_dir(workspace())
        .env_remove("FARINE_INI")
        .env("RUST_LOG", "info");
    command
}

/// A config for `relay` in the test's vhost, with exchanges and a queue of the test's own.
fn own_topology(broker: &Broker, extra: &str) -> (IniFile, String, String, String) {
    let (orders, audit, queue) = (unique("orders"), unique("audit"), unique("relay"));
    let ini = IniFile::new(&format!(
        "[DEFAULT]\namqp_uri = {}\n\n[relay]\nrelay.exchange = {orders}\nrelay.queue = {queue}\nseen.exchange = {audit}\n{extra}",
        broker.uri()
    ));
    (ini, orders, audit, queue)
}

/// The messages now in `queue`, left in it: taken without an ack on a channel of their own,
/// which closing gives back to the queue.
async fn peek(broker: &Broker, queue: &str) -> Vec<Received> {
    let channel = broker
        .connection()
        .create_channel()
        .await
        .expect("a channel");
    let mut seen = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await
        .expect("basic.get")
    {
        let delivery = message.delivery;
        seen.push(Received {
            body: delivery.data,
            properties: delivery.properties,
            routing_key: delivery.routing_key.to_string(),
            exchange: delivery.exchange.to_string(),
        });
    }
    channel
        .close(200, "peeked".into())
        .await
        .expect("channel closed");
    seen
}

/// The `x-farine-attempt` header of a message, when it has one.
fn attempt(message: &Received) -> Option<i64> {
    let headers = message.properties.headers().as_ref()?;
    match headers.inner().get("x-farine-attempt")? {
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        other => panic!("x-farine-attempt is not a number: {other:?}"),
    }
}

fn body_text(message: &Received) -> String {
    String::from_utf8_lossy(&message.body).into_owned()
}

// --- dead-letters replay (and the deprecated --replay-dead-letters) ----------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_dead_letters_moves_them_back_to_the_queue_with_a_fresh_attempt_count_and_prints_how_many()
 {
    let broker = Broker::connect().await;
    // Nothing is bound to the audit exchange yet and publishes are mandatory: each relay fails
    // with NoRoute, is retried once, and the order goes to the dead-letter queue.
    let (ini, orders, audit, queue) = own_topology(
        &broker,
        "mandatory = true\nretry_delay = 100ms\nmax_attempts = 2\n",
    );
    let path = ini.path.display().to_string();
    let dead = format!("{queue}.dead");
    let mut service = Process::spawn(farine(&["--start=pubsub", "--config", &path]));
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
    service.signal(SIGTERM);
    let status = service.wait_exit(BOUND).expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", service.output());

    let before = peek(&broker, &dead).await;
    let orders_attempts: Vec<_> = before
        .iter()
        .filter(|m| m.body.starts_with(b"{\"id\""))
        .map(attempt)
        .collect();
    assert_eq!(
        orders_attempts,
        vec![Some(2), Some(2)],
        "each order failed its two attempts"
    );
    assert!(broker.wait_for_ready(&dead, 3, BOUND).await, "given back");

    // One with the command, then the rest with the deprecated flag it replaced.
    let replay = farine(&[
        "--start=pubsub",
        "dead-letters",
        "replay",
        "relay.relay",
        "--limit",
        "1",
        "--config",
        &path,
    ])
    .output()
    .expect("runs");
    let stdout = String::from_utf8_lossy(&replay.stdout);
    let stderr = String::from_utf8_lossy(&replay.stderr);
    assert_eq!(replay.status.code(), Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("replayed 1 dead letter(s) from {dead} to {queue}")),
        "{stdout}{stderr}"
    );
    let replay = farine(&[
        "--start=pubsub",
        "--replay-dead-letters",
        "relay.relay",
        "--config",
        &path,
    ])
    .output()
    .expect("runs");
    let stdout = String::from_utf8_lossy(&replay.stdout);
    let stderr = String::from_utf8_lossy(&replay.stderr);
    assert_eq!(replay.status.code(), Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("replayed 2 dead letter(s) from {dead} to {queue}")),
        "{stdout}{stderr}"
    );
    assert!(
        stderr.contains("--replay-dead-letters is deprecated"),
        "{stderr}"
    );
    assert!(
        broker.wait_for_ready(&queue, 3, BOUND).await,
        "back in the queue"
    );
    assert_eq!(broker.queue_state(&dead).await.map(|s| s.0), Some(0));
    let after = peek(&broker, &queue).await;
    let mut bodies: Vec<_> = after.iter().map(body_text).collect();
    bodies.sort();
    assert_eq!(
        bodies,
        vec!["{\"id\":1}", "{\"id\":2}", "{not json"],
        "the same bodies"
    );
    for message in &after {
        assert!(
            attempt(message).unwrap_or(1) == 1,
            "a fresh attempt count, not {:?}, for {}",
            attempt(message),
            body_text(message)
        );
    }

    // With the cause fixed (a queue bound to audit), the service relays the replayed orders;
    // the body that never decodes goes back to the dead letters.
    let observer = broker.bind_queue(&audit, "order.seen").await;
    let mut service = Process::spawn(farine(&["--start=pubsub", "--config", &path]));
    let relayed = broker.wait_for_messages(&observer, 2, START_BOUND).await;
    let mut seen: Vec<Value> = relayed.iter().map(Received::json).collect();
    seen.sort_by_key(|v| v["seen"]["id"].as_u64());
    assert_eq!(
        seen,
        vec![json!({"seen": {"id": 1}}), json!({"seen": {"id": 2}})],
        "{}",
        service.output()
    );
    assert!(
        broker.wait_for_ready(&dead, 1, BOUND).await,
        "{}",
        service.output()
    );
    service.signal(SIGTERM);
    let status = service.wait_exit(BOUND).expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", service.output());
}

// --- exit status 3: configuration -------------------------------------------------------------

#[test]
fn a_configuration_error_exits_3_before_connecting_and_names_what_is_wrong() {
    // The broker named here does not exist: a status 1 would mean farine tried to connect
    // before it checked the config.
    let uri = format!("amqp://guest:guest@127.0.0.1:{}", free_port());
    let cases: [(&str, &str, &[&str]); 5] = [
        (
            "pubsub",
            "[other]\n",
            &[
                "no service of module `pubsub` to start",
                "`relay` has no section [relay]",
            ],
        ),
        (
            "pubsub",
            "[relay]\nprefetch_count = lots\n",
            &["section [relay]", "option `prefetch_count` is \"lots\""],
        ),
        (
            "pubsub",
            "[relay]\nretry_delay = soon\n",
            &["section [relay]", "option `retry_delay` is \"soon\""],
        ),
        (
            "pubsub",
            "[relay]\nenabled = false\n",
            &[
                "no service of module `pubsub` to start",
                "`relay` is disabled (enabled = false)",
            ],
        ),
        (
            "sse",
            "[listener]\n",
            &["section [listener]", "option `endpoint` is missing"],
        ),
    ];
    for (module, body, expected) in cases {
        let ini = IniFile::new(&format!("[DEFAULT]\namqp_uri = {uri}\n\n{body}"));
        let path = ini.path.display().to_string();
        let output = farine(&[&format!("--start={module}"), "--config", &path])
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(3), "{body}: {stderr}");
        assert!(stderr.contains(&path), "{body}: names the file: {stderr}");
        for needle in expected {
            assert!(stderr.contains(needle), "{body}: {needle}: {stderr}");
        }
    }
}

// --- exit status 4, --manifest-path, --release ------------------------------------------------

/// A directory of the test's own under the temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> Self {
        let path = std::env::temp_dir().join(unique(prefix));
        std::fs::create_dir_all(&path).expect("temp dir made");
        Self(path.canonicalize().expect("temp dir path"))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0)
            && !std::thread::panicking()
        {
            panic!("removing {}: {e}", self.0.display());
        }
    }
}

/// A Cargo workspace of the test's own, small enough to build in seconds (in release mode
/// too): a stand-in library named `farine` (the launcher takes a package depending on
/// `farine` with a binary for a module), module `hello`, whose binary prints the path it runs
/// from and its arguments, and module `broken`, which does not compile.
fn tiny_workspace() -> TempDir {
    let dir = TempDir::new("tiny-workspace");
    let files = [
        (
            "Cargo.toml",
            "[workspace]\nmembers = [\"farine\", \"hello\", \"broken\"]\nresolver = \"2\"\n",
        ),
        (
            "farine/Cargo.toml",
            "[package]\nname = \"farine\"\nversion = \"0.0.0\"\nedition = \"2021\"\n",
        ),
        ("farine/src/lib.rs", ""),
        (
            "hello/Cargo.toml",
            "[package]\nname = \"hello\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\n[dependencies]\nfarine = { path = \"../farine\" }\n",
        ),
        (
            "hello/src/main.rs",
            "fn main() {\n    let exe = std::env::current_exe().expect(\"exe\");\n    println!(\"hello runs {}\", exe.display());\n    let args: Vec<String> = std::env::args().skip(1).collect();\n    println!(\"hello args {}\", args.join(\" \"));\n}\n",
        ),
        (
            "broken/Cargo.toml",
            "[package]\nname = \"broken\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\n[dependencies]\nfarine = { path = \"../farine\" }\n",
        ),
        (
            "broken/src/main.rs",
            "fn main() {\n    let this_does_not: u8 = \"compile\";\n}\n",
        ),
    ];
    for (path, text) in files {
        let path = dir.0.join(path);
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("dir made");
        std::fs::write(&path, text).expect("file written");
    }
    dir
}

/// The launcher run from `cwd`, which is in no Cargo workspace, building into the target
/// directory of the workspace it is given.
fn farine_from(cwd: &Path, args: &[&str]) -> Command {
    let mut command = farine(args);
    command
        .current_dir(cwd)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR");
    command
}

#[test]
fn manifest_path_names_the_workspace_when_farine_runs_outside_it() {
    let elsewhere = TempDir::new("elsewhere");
    let output = farine_from(&elsewhere.0, &["--start=pubsub", "--list"])
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not inside a Cargo workspace"), "{stderr}");

    let manifest = workspace().join("Cargo.toml");
    let output = farine_from(
        &elsewhere.0,
        &[
            "--start=pubsub",
            "--list",
            "--manifest-path",
            &manifest.display().to_string(),
        ],
    )
    .output()
    .expect("runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("service relay (Relay, section [relay]"),
        "{stdout}{stderr}"
    );
}

#[test]
fn release_builds_the_module_in_release_mode_and_is_not_passed_to_it() {
    let tiny = tiny_workspace();
    let elsewhere = TempDir::new("elsewhere");
    let manifest = tiny.0.join("Cargo.toml").display().to_string();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "--start=hello",
            "--config",
            "some.ini",
            "--manifest-path",
            &manifest,
        ];
        args.extend_from_slice(extra);
        let output = farine_from(&elsewhere.0, &args).output().expect("runs");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert_eq!(output.status.code(), Some(0), "{stdout}{stderr}");
        stdout
    };

    let release = run(&["--release"]);
    let built = tiny.0.join("target/release/hello").display().to_string();
    assert!(
        release.contains(&format!("hello runs {built}\n")),
        "{release}"
    );
    assert!(
        release.contains("hello args --start=hello --config=some.ini\n"),
        "the launcher's own flags stay with it: {release}"
    );

    let debug = run(&[]);
    let built = tiny.0.join("target/debug/hello").display().to_string();
    assert!(debug.contains(&format!("hello runs {built}\n")), "{debug}");
}

#[test]
fn a_module_cargo_cannot_build_exits_4() {
    let tiny = tiny_workspace();
    let manifest = tiny.0.join("Cargo.toml").display().to_string();
    let output = farine_from(
        &tiny.0,
        &["--start=broken", "--manifest-path", &manifest, "--list"],
    )
    .output()
    .expect("runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("cargo could not build module `broken`"),
        "{stderr}"
    );
    // cargo's own diagnostic reaches the user.
    assert!(stderr.contains("mismatched types"), "{stderr}");
}

// --- --log-level --------------------------------------------------------------------------------

/// Starts pubsub with `args` and `RUST_LOG` (unset when `None`), waits until it consumes (by
/// the broker: its log may not say so), stops it; returns everything it printed.
async fn run_with_logging(args: &[&str], rust_log: Option<&str>) -> String {
    let broker = Broker::connect().await;
    let (ini, _, _, queue) = own_topology(&broker, "");
    let path = ini.path.display().to_string();
    let mut all = vec!["--start=pubsub", "--config", &path];
    all.extend_from_slice(args);
    let mut command = farine(&all);
    match rust_log {
        Some(filter) => command.env("RUST_LOG", filter),
        None => command.env_remove("RUST_LOG"),
    };
    let mut process = Process::spawn(command);
    assert!(
        broker.wait_for_consumers(&queue, 1, START_BOUND).await,
        "{}",
        process.output()
    );
    process.signal(SIGTERM);
    let status = process.wait_exit(BOUND).expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", process.output());
    process.output()
}

/// Lines of farine's log (tracing's format: time, level, target) at `level`.
fn log_lines<'a>(output: &'a str, level: &str) -> Vec<&'a str> {
    output
        .lines()
        .filter(|line| line.split_whitespace().nth(1) == Some(level))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_level_warn_hides_info_and_debug_lines_and_wins_over_rust_log() {
    let output = run_with_logging(&["--log-level=warn"], Some("debug")).await;
    assert!(!output.contains("consuming"), "{output}");
    assert!(log_lines(&output, "INFO").is_empty(), "{output}");
    assert!(log_lines(&output, "DEBUG").is_empty(), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_level_debug_shows_debug_lines_and_wins_over_rust_log() {
    let output = run_with_logging(&["--log-level=debug"], Some("warn")).await;
    assert!(output.contains("consuming"), "{output}");
    assert!(!log_lines(&output, "DEBUG").is_empty(), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_level_takes_a_tracing_filter() {
    // lapin's debug lines, and nothing of farine's below warn.
    let output = run_with_logging(&["--log-level", "warn,lapin=debug"], None).await;
    let debug = log_lines(&output, "DEBUG");
    assert!(!debug.is_empty(), "{output}");
    assert!(debug.iter().all(|l| l.contains(" lapin")), "{output}");
    assert!(!output.contains("consuming"), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_log_level_the_level_is_rust_log_else_info() {
    let output = run_with_logging(&[], Some("warn")).await;
    assert!(!output.contains("consuming"), "RUST_LOG=warn: {output}");

    let output = run_with_logging(&[], None).await;
    assert!(output.contains("consuming"), "info: {output}");
    assert!(log_lines(&output, "DEBUG").is_empty(), "info: {output}");
}

// --- log_format ---------------------------------------------------------------------------------

/// The pubsub example's binary, built with cargo as the launcher builds it: run directly, its
/// output is its own (the launcher's build prints cargo's progress on the same stderr).
fn pubsub_binary() -> PathBuf {
    let output = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "--package",
            "pubsub",
            "--bin",
            "pubsub",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(workspace())
        .output()
        .expect("cargo runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|message| {
            message["reason"] == "compiler-artifact" && message["target"]["name"] == "pubsub"
        })
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
        .expect("cargo reports the pubsub binary")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_format_json_prints_every_line_as_a_json_object_and_no_password() {
    let broker = Broker::connect().await;
    // A user of the test's own, so that its password is text nothing else contains.
    let user = RabbitUser(unique("json-user"));
    let amqp_password = unique("amqp-pw");
    vhost::create_user(broker.vhost(), &user.0, &amqp_password).expect("user made");
    let (orders, audit, queue) = (unique("orders"), unique("audit"), unique("relay"));
    let ini = IniFile::new(&format!(
        "[DEFAULT]\namqp_uri = amqp://{}:{amqp_password}@{}/{}\nlog_format = json\n\n[relay]\nrelay.exchange = {orders}\nrelay.queue = {queue}\nseen.exchange = {audit}\n",
        user.0,
        farine_test_support::broker_addr(),
        broker.vhost(),
    ));
    let path = ini.path.display().to_string();
    let mut command = Command::new(pubsub_binary());
    command
        .args(["--config", &path, "--log-level=trace"])
        .env_remove("FARINE_LOG_FORMAT");
    let mut process = Process::spawn(command);
    assert!(
        broker.wait_for_consumers(&queue, 1, START_BOUND).await,
        "{}",
        process.output()
    );
    let observer = broker.bind_queue(&audit, "order.seen").await;
    broker
        .publish_json(&orders, "order.created", &json!({"id": 1}))
        .await;
    assert_eq!(broker.wait_for_messages(&observer, 1, BOUND).await.len(), 1);
    process.signal(SIGTERM);
    let status = process.wait_exit(BOUND).expect("exits after SIGTERM");
    let output = process.output();
    assert_eq!(status.code(), Some(0), "{output}");

    // Its log is all it prints: every line is one JSON object.
    let lines: Vec<Value> = output
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    for line in &lines {
        for key in ["timestamp", "level", "target"] {
            assert!(line[key].is_string(), "no {key}: {line}");
        }
        assert!(line["fields"]["message"].is_string(), "no message: {line}");
    }
    let messages: Vec<&str> = lines
        .iter()
        .filter_map(|line| line["fields"]["message"].as_str())
        .collect();
    assert!(messages.iter().any(|m| m.contains("consuming")), "{output}");
    assert!(
        lines.iter().any(|line| line["level"] == "TRACE"),
        "it logged at trace"
    );
    assert!(!output.contains("\u{1b}["), "no colour: {output}");
    assert_no_secret(&output, &amqp_password, "the AMQP password");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_format_that_is_not_text_or_json_is_refused_naming_where_it_came_from() {
    let broker = Broker::connect().await;
    let config = |extra: &str| {
        IniFile::new(&format!(
            "[DEFAULT]\namqp_uri = {}\n{extra}\n[relay]\n",
            broker.uri()
        ))
    };

    // On the command line: a usage error, from the launcher and from the binary alike.
    let plain = config("");
    let path = plain.path.display().to_string();
    let launcher = farine(&["--start=pubsub", "--config", &path, "--log-format", "yaml"])
        .output()
        .expect("runs");
    let binary = Command::new(pubsub_binary())
        .args(["--config", &path, "--log-format=yaml"])
        .output()
        .expect("runs");
    for output in [launcher, binary] {
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("yaml") && stderr.contains("text") && stderr.contains("json"),
            "{stderr}"
        );
    }

    // In the config or the environment: a config error, before connecting.
    let cases = [
        (
            "log_format = yaml",
            None,
            "section [DEFAULT]: option `log_format` is \"yaml\"; expected text or json",
        ),
        (
            "[other]\nlog_format = json",
            None,
            "section [other]: option `log_format` is \"json\"; expected no value in a service's section",
        ),
        (
            "",
            Some("yaml"),
            "environment variable FARINE_LOG_FORMAT is \"yaml\"; expected text or json",
        ),
    ];
    for (extra, variable, expected) in cases {
        let ini = config(extra);
        let path = ini.path.display().to_string();
        let mut command = farine(&["--start=pubsub", "--config", &path]);
        match variable {
            Some(value) => command.env("FARINE_LOG_FORMAT", value),
            None => command.env_remove("FARINE_LOG_FORMAT"),
        };
        let output = command.output().expect("runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(3), "{extra}: {stderr}");
        assert!(stderr.contains(expected), "{extra}: {stderr}");
    }
}

// --- SIGINT -------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_stops_a_single_module_cleanly_with_exit_status_0() {
    let broker = Broker::connect().await;
    let (ini, _, _, queue) = own_topology(&broker, "");
    let path = ini.path.display().to_string();
    let mut process = Process::spawn(farine(&["--start=pubsub", "--config", &path]));
    assert!(
        process.wait_for_output("consuming", START_BOUND),
        "{}",
        process.output()
    );
    // The launcher replaced itself with the module: the signal reaches the module directly.
    let exe = std::fs::read_link(format!("/proc/{}/exe", process.pid())).expect("its exe");
    assert!(
        exe.display().to_string().contains("pubsub"),
        "the process runs {}",
        exe.display()
    );
    assert!(process::children(process.pid()).is_empty());

    process.signal(SIGINT);
    let status = process.wait_exit(BOUND).expect("exits after SIGINT");
    let output = process.output();
    assert_eq!(status.code(), Some(0), "{output}");
    assert!(output.contains("signal=\"SIGINT\""), "{output}");
    assert!(output.contains("stopped"), "{output}");
    assert!(broker.wait_for_consumers(&queue, 0, BOUND).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_to_a_multi_module_launcher_is_forwarded_to_each_module_and_it_exits_0() {
    let broker = Broker::connect().await;
    let (ini, _, _, queue) = own_topology(&broker, "");
    let path = ini.path.display().to_string();
    let mut launcher = Process::spawn(farine(&["--start=pubsub,pubsub", "--config", &path]));
    assert!(
        launcher.wait_for_lines("consuming", 2, START_BOUND),
        "{}",
        launcher.output()
    );
    assert!(broker.wait_for_consumers(&queue, 2, BOUND).await);

    // To the launcher alone (not its process group): the modules hear of it from the launcher.
    launcher.signal(SIGINT);
    let status = launcher.wait_exit(BOUND).expect("exits after SIGINT");
    let output = launcher.output();
    assert_eq!(status.code(), Some(0), "{output}");
    assert_eq!(
        output.matches("signal=\"SIGINT\"").count(),
        2,
        "each module got SIGINT: {output}"
    );
    assert!(!output.contains("exited with status"), "{output}");
    assert!(broker.wait_for_consumers(&queue, 0, BOUND).await);
}

// --- no password in --list or in any log line ---------------------------------------------------

/// How lapin's trace lines print a byte string: `[112, 119, ...]`.
fn as_byte_list(text: &str) -> String {
    text.bytes()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Asserts `output` holds `secret` neither as text nor as a list of bytes.
fn assert_no_secret(output: &str, secret: &str, what: &str) {
    if let Some(line) = output.lines().find(|l| l.contains(secret)) {
        panic!("{what} appears in:\n{line}");
    }
    let bytes = as_byte_list(secret);
    if let Some(line) = output.lines().find(|l| l.contains(&bytes)) {
        panic!("{what} appears, as bytes, in:\n{line}");
    }
}

#[test]
fn list_shows_passwords_as_stars_where_it_shows_a_value() {
    let (amqp_password, db_password) = (unique("amqp-pw"), unique("db-pw"));
    // Two bad values, each shown in place of its handler: one refers to db_password, one
    // holds a URI with a password.
    let ini = IniFile::new(&format!(
        "[DEFAULT]\namqp_uri = amqp://guest:{amqp_password}@127.0.0.1:5672\ndb_password = {db_password}\n\n[relay]\nrelay.prefetch_count = %(db_password)s\nseen.exchange_type = amqp://guest:{amqp_password}@elsewhere:5672\n"
    ));
    let path = ini.path.display().to_string();
    let output = farine(&["--start=pubsub", "--list", "--config", &path])
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let all = format!("{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(output.status.code(), Some(0), "{all}");
    assert!(
        stdout.contains("consume relay: ") && stdout.contains("prefetch_count` is \"****\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("publish seen: ")
            && stdout.contains("\"amqp://guest:****@elsewhere:5672\""),
        "{stdout}"
    );
    assert_no_secret(&all, &amqp_password, "the AMQP password");
    assert_no_secret(&all, &db_password, "db_password");
}

/// A RabbitMQ user of the test's own, deleted on drop.
struct RabbitUser(String);

impl Drop for RabbitUser {
    fn drop(&mut self) {
        if let Err(e) = vhost::delete_user(&self.0)
            && !std::thread::panicking()
        {
            panic!("{e}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_logging_at_trace_never_prints_a_password_through_start_reconnection_and_stop() {
    let broker = Broker::connect().await;
    let database = Database::create().await;
    // A user of the test's own, so that its password is text nothing else contains (guest's
    // is its user name).
    let user = RabbitUser(unique("cli-user"));
    let (amqp_password, db_password) = (unique("amqp-pw"), unique("db-pw"));
    vhost::create_user(broker.vhost(), &user.0, &amqp_password).expect("user made");
    let proxy = Proxy::to_broker().await;
    let (orders, audit, queue) = (unique("orders"), unique("audit"), unique("relay"));
    let ini = IniFile::new(&format!(
        "[DEFAULT]\namqp_uri = amqp://{}:{amqp_password}@{}/{}\n{}db_password = {db_password}\n\n[relay]\nrelay.exchange = {orders}\nrelay.queue = {queue}\nseen.exchange = {audit}\n",
        user.0,
        proxy.addr(),
        broker.vhost(),
        database.ini_keys(),
    ));
    let path = ini.path.display().to_string();
    let mut process = Process::spawn(farine(&[
        "--start=pubsub",
        "--config",
        &path,
        "--log-level=trace",
    ]));
    assert!(
        process.wait_for_output("consuming", START_BOUND),
        "{}",
        process.output()
    );
    let observer = broker.bind_queue(&audit, "order.seen").await;
    broker
        .publish_json(&orders, "order.created", &json!({"id": 1}))
        .await;
    assert_eq!(broker.wait_for_messages(&observer, 1, BOUND).await.len(), 1);

    proxy.cut();
    assert!(
        process.wait_for_output("reconnected to the AMQP broker", BOUND),
        "{}",
        process.output()
    );
    assert!(
        process.wait_for_lines("consuming", 2, BOUND),
        "{}",
        process.output()
    );
    broker
        .publish_json(&orders, "order.created", &json!({"id": 2}))
        .await;
    assert_eq!(broker.wait_for_messages(&observer, 1, BOUND).await.len(), 1);

    process.signal(SIGTERM);
    let status = process.wait_exit(BOUND).expect("exits after SIGTERM");
    let output = process.output();
    assert_eq!(status.code(), Some(0), "{output}");
    assert!(
        !log_lines(&output, "TRACE").is_empty(),
        "it logged at trace"
    );
    assert!(
        output.contains("connection to the AMQP broker is lost"),
        "{output}"
    );
    assert_no_secret(&output, &amqp_password, "the AMQP password");
    assert_no_secret(&output, &db_password, "db_password");
}

// --- FARINE__<SECTION>__<KEY> -------------------------------------------------------------------

#[test]
fn environment_overrides_set_a_sections_key_a_handlers_key_and_default_keys() {
    let ini = IniFile::new("[DEFAULT]\nmax_attempts = 2\n\n[relay]\nprefetch_count = 3\n");
    let path = ini.path.display().to_string();
    let output = farine(&["--start=pubsub", "--list", "--config", &path])
        .env("FARINE__RELAY__PREFETCH_COUNT", "7")
        // Taken literally: in the file, `%4` would be a broken interpolation.
        .env("FARINE__RELAY__RELAY__QUEUE", "orders%41")
        .env("FARINE__DEFAULT__MAX_ATTEMPTS", "5")
        // Names are case-insensitive.
        .env("Farine__Relay__Seen__Routing_Key", "order.Noticed")
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains(
            "consume relay: exchange orders (direct), routing key \"order.created\", queue orders%41, prefetch 7, retries orders%41.retry (x5), dead letters orders%41.dead"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("publish seen: exchange audit (direct), routing key \"order.Noticed\""),
        "{stdout}"
    );
}

#[test]
fn a_default_override_is_inherited_only_where_the_section_does_not_set_the_key() {
    let list = |ini: &str| {
        let ini = IniFile::new(ini);
        let path = ini.path.display().to_string();
        let output = farine(&["--start=pubsub", "--list", "--config", &path])
            .env("FARINE__DEFAULT__PREFETCH_COUNT", "9")
            .output()
            .expect("runs");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let inherited = list("[DEFAULT]\nprefetch_count = 2\n\n[relay]\n");
    assert!(inherited.contains("prefetch 9,"), "{inherited}");
    let own = list("[relay]\nprefetch_count = 3\n");
    assert!(own.contains("prefetch 3,"), "{own}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_connects_to_the_amqp_uri_of_the_environment_not_the_files() {
    let broker = Broker::connect().await;
    let (orders, audit, queue) = (unique("orders"), unique("audit"), unique("relay"));
    // Nothing listens where the file points.
    let ini = IniFile::new(&format!(
        "[DEFAULT]\namqp_uri = amqp://guest:guest@127.0.0.1:{}/nowhere\n\n[relay]\nrelay.exchange = {orders}\nrelay.queue = {queue}\nseen.exchange = {audit}\n",
        free_port()
    ));
    let path = ini.path.display().to_string();
    // Percent-encoded, as a URI may be: no `%%` needed in the environment.
    let uri = broker.uri().replace("farine-test-", "farine%2Dtest-");
    assert_ne!(uri, broker.uri());
    let mut command = farine(&["--start=pubsub", "--config", &path]);
    command.env("FARINE__DEFAULT__AMQP_URI", &uri);
    let mut process = Process::spawn(command);
    assert!(
        process.wait_for_output("consuming", START_BOUND),
        "{}",
        process.output()
    );
    let observer = broker.bind_queue(&audit, "order.seen").await;
    broker
        .publish_json(&orders, "order.created", &json!({"id": 3}))
        .await;
    let received = broker.wait_for_messages(&observer, 1, BOUND).await;
    assert_eq!(received.len(), 1, "{}", process.output());
    assert_eq!(received[0].json(), json!({"seen": {"id": 3}}));

    process.signal(SIGTERM);
    let status = process.wait_exit(BOUND).expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", process.output());
}

// --- the tokio runtime ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_and_worker_threads_choose_the_services_runtime_and_a_bad_choice_exits_3() {
    let broker = Broker::connect().await;
    for (setting, shown) in [
        ("runtime = current_thread", "runtime=current_thread"),
        (
            "worker_threads = 3",
            "runtime=multi_thread, 3 worker threads",
        ),
    ] {
        let (ini, orders, audit, _) = own_topology(&broker, "");
        let text = std::fs::read_to_string(&ini.path).unwrap();
        let text = text.replacen("[DEFAULT]\n", &format!("[DEFAULT]\n{setting}\n"), 1);
        std::fs::write(&ini.path, text).unwrap();
        let path = ini.path.display().to_string();
        let mut process = Process::spawn(farine(&["--start=pubsub", "--config", &path]));
        assert!(
            process.wait_for_output("consuming", START_BOUND),
            "{}",
            process.output()
        );
        assert!(process.output().contains(shown), "{}", process.output());
        let observer = broker.bind_queue(&audit, "order.seen").await;
        broker
            .publish_json(&orders, "order.created", &json!({"id": 1}))
            .await;
        let relayed = broker.wait_for_messages(&observer, 1, BOUND).await;
        assert_eq!(relayed[0].json(), json!({"seen": {"id": 1}}));
        process.signal(SIGTERM);
        let status = process.wait_exit(BOUND).expect("exits");
        assert_eq!(status.code(), Some(0), "{}", process.output());
    }

    for (setting, expected) in [
        ("runtime = fibers", "option `runtime` is \"fibers\""),
        (
            "runtime = current_thread\nworker_threads = 2",
            "option `worker_threads`",
        ),
        (
            "worker_threads = 1000000000",
            "a whole number from 1 to 1024",
        ),
    ] {
        let ini = IniFile::new(&format!(
            "[DEFAULT]\namqp_uri = {}\n{setting}\n[relay]\n",
            broker.uri()
        ));
        let path = ini.path.display().to_string();
        let output = farine(&["--start=pubsub", "--config", &path])
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(3), "{stderr}");
        assert!(stderr.contains(expected), "{stderr}");
    }
}
