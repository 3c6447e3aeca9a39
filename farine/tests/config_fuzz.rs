//! Bad config never panics: INI files built from farine's own keys and hostile values (huge
//! and negative numbers, durations past what a `Duration` holds, names and vhosts longer than
//! AMQP carries, broken interpolation, stray syntax) go through everything that reads a config
//! without a broker: parsing, `--list`, and the plan `--check` makes before it connects. Each
//! must give a value or a clear error, never a panic or a hang.
//!
//! A bounded fuzz run (proptest) in every test run; more cases locally with
//! `PROPTEST_CASES=20000 cargo nextest run -p farine --test config_fuzz`.

use std::time::Duration;

use farine::config::Config;
use farine::rpc::{Client, RpcError};
use farine::{PublishError, Publisher, Runtime, execute, publish};
use proptest::prelude::*;
use serde_json::Value;

/// One handler of every kind, so that every key is read by something.
#[derive(Default)]
struct Fuzzed;

#[farine::service(name = "fuzzed")]
impl Fuzzed {
    #[farine::consume(exchange = "fuzz_x", routing_key = "rk")]
    async fn take(&self, _body: Value) {}

    #[publish(exchange = "fuzz_x", routing_key = "rk")]
    async fn send(&self, publisher: Publisher, body: &Value) -> Result<(), PublishError> {
        publisher.publish(body).await
    }

    #[farine::rpc::method]
    async fn echo(&self, text: String) -> String {
        text
    }

    #[farine::rpc::client("fuzzed")]
    async fn ask(&self, client: Client, text: String) -> Result<String, RpcError> {
        client.call("echo", (text,)).await
    }

    #[farine::stream::http]
    async fn on_event(&self, _data: String) {}

    #[execute]
    async fn work(&self) {}
}

/// The stream handler's required key, so that a case goes past it to the keys after.
const ENDPOINT: &str = "endpoint = http://127.0.0.1:1/events";

const HANDLERS: &[&str] = &[
    "take", "send", "echo", "ask", "on_event", "work", "rpc", "nope",
];

/// Values that broke, or could break, a reader of numbers, durations, names or URIs.
fn hostile_value() -> impl Strategy<Value = String> {
    let long = |n: usize| "x".repeat(n);
    prop_oneof![
        Just(String::new()),
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("1e300".to_string()),
        Just("-1e300".to_string()),
        Just("99999999999999999999999".to_string()),
        Just("18446744073709551616".to_string()),
        Just("1.8e19".to_string()),
        Just("4294967296".to_string()),
        Just("65536".to_string()),
        Just("NaN".to_string()),
        Just("inf".to_string()),
        Just("1e300h".to_string()),
        Just("1e17h".to_string()),
        Just("0.0000000001ms".to_string()),
        Just("%(x)s".to_string()),
        Just("%(x)s%(x)s%(x)s".to_string()),
        Just("%(self)s".to_string()),
        Just("%".to_string()),
        Just("%(".to_string()),
        Just(long(256)),
        Just(long(70_000)),
        Just(format!("amqp://guest:secret@127.0.0.1:1/{}", long(300))),
        Just("amqp://guest:secret@127.0.0.1:1/%2f".to_string()),
        Just("amqp://guest:secret@127.0.0.1:99999".to_string()),
        Just("amqp://:@/".to_string()),
        Just("amqps://guest:secret@127.0.0.1:1,".to_string()),
        Just("postgres://u:secret@127.0.0.1:1/db".to_string()),
        Just("none".to_string()),
        Just("a = b, = c".to_string()),
        Just(format!("{} = 1", long(300))),
        Just("x-max-length = 99999999999999999999999".to_string()),
        Just("\u{0}\u{7f}é🙂".to_string()),
        Just("[".to_string()),
        Just("300.300.300.300:99999".to_string()),
        "[ -~]{0,40}",
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|n| n.to_string()),
    ]
}

fn line() -> impl Strategy<Value = String> {
    // Every key farine reads, bare and scoped to a handler.
    let keys = farine::__private::config_keys();
    let key = prop_oneof![
        3 => proptest::sample::select(keys.clone()).prop_map(str::to_string),
        2 => (proptest::sample::select(HANDLERS), proptest::sample::select(keys))
            .prop_map(|(handler, key)| format!("{handler}.{key}")),
        1 => Just("x".to_string()),
        1 => "[a-z_.]{1,12}",
    ];
    prop_oneof![
        8 => (key, hostile_value()).prop_map(|(k, v)| format!("{k} = {v}")),
        1 => Just("  continued".to_string()),
        1 => "[ -~]{0,30}",
    ]
}

/// A file with `[DEFAULT]` and the service's section, each a few hostile lines.
fn ini() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(line(), 0..6),
        proptest::collection::vec(line(), 0..10),
    )
        .prop_map(|(defaults, own)| {
            format!(
                "[DEFAULT]\namqp_uri = amqp://guest:secret@127.0.0.1:1\n{}\n[fuzzed]\n{ENDPOINT}\n{}\n",
                defaults.join("\n"),
                own.join("\n")
            )
        })
}

/// Reads `text` as farine would: parse, list, plan (the plan is made before any connection;
/// connections go to a closed port and fail at once). Never panics; never prints the password.
fn read_everything(runtime: &tokio::runtime::Runtime, text: &str) {
    let Ok(config) = Config::from_ini(text, "fuzz.ini") else {
        return;
    };
    let listed = farine::__private::list("fuzz", Some(&config));
    assert!(
        !listed.contains("secret"),
        "--list printed a password:\n{listed}"
    );
    let checked = runtime.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(60),
            Runtime::new(config).services(["fuzzed"]).check(),
        )
        .await
    });
    let (_, lines) = checked.expect("--check hung on a bad config");
    for line in lines {
        assert!(
            !line.contains("secret"),
            "--check printed a password: {line}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        // 1024 in every run (about a second); PROPTEST_CASES for a longer hunt.
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(1024),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn no_config_makes_farine_panic_hang_or_leak(text in ini()) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        read_everything(&runtime, &text);
    }
}

/// The cases the fuzzing first found, each an error naming its key, not a panic.
#[test]
fn values_past_what_farine_can_hold_are_errors_naming_the_key() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let long = "q".repeat(256);
    let cases = [
        ("retry_delay = 1e300", "retry_delay"),
        ("drain_timeout = 99999999999999999999999", "drain_timeout"),
        ("x = 1e300\nrestart_delay = %(x)s", "restart_delay"),
        ("rpc_timeout = 1e17h", "rpc_timeout"),
        (&*format!("take.queue = {long}"), "queue"),
        (&*format!("exchange = {long}"), "exchange"),
        (&*format!("routing_key = {long}"), "routing_key"),
        (&*format!("take.retry_queue = {long}"), "retry_queue"),
        (&*format!("queue_arguments = {long} = 1"), "queue_arguments"),
        (&*format!("rpc_queue = {long}"), "rpc_queue"),
        (
            &*format!("amqp_uri = amqp://guest:secret@127.0.0.1:1/{long}"),
            "amqp_uri",
        ),
    ];
    for (line, key) in cases {
        let text = format!("[fuzzed]\n{ENDPOINT}\n{line}\n");
        let config = Config::from_ini(&text, "bad.ini").unwrap();
        let (ok, lines) = runtime.block_on(Runtime::new(config).services(["fuzzed"]).check());
        let text = lines.join("\n");
        assert!(!ok, "{line}: accepted:\n{text}");
        assert!(
            text.contains(key),
            "{line}: the error does not name `{key}`:\n{text}"
        );
        assert!(!text.contains("secret"), "{line}: a password in:\n{text}");
        assert!(!text.contains("panick"), "{line}: {text}");
    }
}
