//! `farine --start=MODULE --asyncapi` for every example module of the workspace, through the
//! launcher as a user runs it: each document, as YAML and as JSON, passes the official AsyncAPI
//! parser with no error, and names the module's exchanges, queues, routing keys and payload
//! schemas as `etc/farine.ini` configures them. `--describe` shows the same topology as a
//! table. No broker: a document is made from the code and the config alone.

mod common;

use common::workspace;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use farine_test_support::asyncapi::validate;
use farine_test_support::unique;
use serde_json::Value;

/// The launcher, run from the workspace.
fn farine(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_farine"))
        .args(args)
        .current_dir(workspace())
        .env_remove("FARINE_INI")
        .env("RUST_LOG", "warn")
        .output()
        .expect("the launcher runs")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The example modules: those `farine --list` names that live under `examples/` (the
/// others are the tests' fixtures, which `etc/farine.ini` does not configure).
fn examples() -> Vec<String> {
    let listed = farine(&["--list"]);
    assert!(listed.status.success(), "{}", text(&listed));
    String::from_utf8_lossy(&listed.stdout)
        .trim()
        .strip_prefix("modules: ")
        .expect("`modules: a, b`")
        .split(", ")
        .filter(|module| workspace().join("examples").join(module).is_dir())
        .map(str::to_string)
        .collect()
}

/// The document of `module` with the README's config, as JSON.
fn document(module: &str) -> Value {
    let output = farine(&[
        &format!("--start={module}"),
        "--config",
        "etc/farine.ini",
        "--asyncapi",
        "--format",
        "json",
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    serde_json::from_slice(&output.stdout).expect("--format json prints JSON")
}

#[test]
fn every_example_modules_document_passes_the_official_parser_as_yaml_and_json() {
    let modules = examples();
    assert!(modules.len() >= 7, "the examples: {modules:?}");
    let dir = std::env::temp_dir().join(unique("farine-asyncapi"));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let mut files = Vec::new();
    for module in &modules {
        for format in ["yaml", "json"] {
            let file = dir.join(format!("{module}.{format}"));
            let output = farine(&[
                &format!("--start={module}"),
                "--config=etc/farine.ini",
                "--asyncapi",
                &format!("--format={format}"),
                "--output",
                file.to_str().expect("a UTF-8 path"),
            ]);
            assert_eq!(output.status.code(), Some(0), "{module}: {}", text(&output));
            assert!(
                output.stdout.is_empty(),
                "--output writes the file, not stdout"
            );
            files.push(file);
        }
    }
    let paths: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let validation = validate(&paths);
    std::fs::remove_dir_all(&dir).ok();
    validation.assert_clean();
}

#[test]
fn the_db_document_has_the_ledger_topology_and_the_entry_schema() {
    let doc = document("db");
    let channel = &doc["channels"]["ledger.entry"];
    assert_eq!(channel["address"], "entry", "{:#}", doc["channels"]);
    assert_eq!(channel["bindings"]["amqp"]["exchange"]["name"], "ledger");
    assert_eq!(channel["bindings"]["amqp"]["exchange"]["type"], "direct");
    assert_eq!(
        channel["bindings"]["amqp"]["x-farine-queues"][0]["name"],
        "ledger.entry"
    );
    assert_eq!(doc["operations"]["ledger.entry"]["action"], "receive");
    let entry = &doc["components"]["schemas"]["Entry"];
    assert_eq!(
        entry["properties"]["account"]["type"], "string",
        "{entry:#}"
    );
    assert_eq!(
        entry["properties"]["amount"]["type"], "integer",
        "{entry:#}"
    );
    assert_eq!(
        doc["components"]["messages"]["ledger.entry"]["payload"]["$ref"],
        "#/components/schemas/Entry"
    );
    // The RPC method: its request on `ledger__balance`, its typed reply.
    assert_eq!(
        doc["channels"]["ledger.ledger__balance"]["address"],
        "ledger__balance"
    );
    let reply = &doc["components"]["messages"]["ledger.balance.reply"]["payload"]["allOf"][1];
    assert_eq!(reply["properties"]["body"]["type"], "integer");
}

#[test]
fn the_pubsub_document_follows_the_configs_names_and_holds_no_credentials() {
    let dir = std::env::temp_dir().join(unique("farine-asyncapi-ini"));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let ini = dir.join("farine.ini");
    std::fs::write(
        &ini,
        "[DEFAULT]\namqp_uri = amqp://ops:hunter2-pw@broker.internal:5672/prod\n\n[relay]\nrelay.exchange = shop\nrelay.routing_key = order.placed\nseen.exchange = audit-log\n",
    )
    .expect("written");
    let output = farine(&[
        "--start=pubsub",
        "--config",
        ini.to_str().expect("UTF-8"),
        "--asyncapi",
    ]);
    std::fs::remove_dir_all(&dir).ok();
    let yaml = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    assert!(yaml.starts_with("asyncapi: \"3.0.0\"\n"), "YAML by default");
    for expected in [
        "shop.order.placed:",
        "address: \"order.placed\"",
        "name: \"relay.relay\"",
        "audit-log.order.seen:",
        "host: \"broker.internal:5672\"",
        "pathname: \"/prod\"",
    ] {
        assert!(yaml.contains(expected), "{expected} in:\n{yaml}");
    }
    assert!(
        !yaml.contains("hunter2-pw") && !yaml.contains("ops:"),
        "no credentials:\n{yaml}"
    );
}

#[test]
fn describe_prints_each_handler_with_its_exchange_routing_key_and_queue() {
    let output = farine(&["--start=db", "--config", "etc/farine.ini", "--describe"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let table = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("module db"), "{table}");
    let columns = |line: &str| {
        line.split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        columns(lines[1])[..6],
        [
            "SERVICE",
            "HANDLER",
            "KIND",
            "EXCHANGE",
            "ROUTING KEY",
            "QUEUE"
        ]
    );
    let entry = lines
        .iter()
        .find(|line| line.starts_with("ledger") && line.contains(" entry "))
        .unwrap_or_else(|| panic!("a row for ledger.entry:\n{table}"));
    assert_eq!(
        columns(entry)[..6],
        [
            "ledger",
            "entry",
            "consume",
            "ledger (direct)",
            "entry",
            "ledger.entry"
        ],
        "{table}"
    );
    assert!(
        entry.contains("dead letters ledger.entry.dead") && entry.contains("fn(entry: Entry)"),
        "{entry}"
    );
}

#[test]
fn asyncapi_options_without_asyncapi_a_wrong_format_or_two_modules_are_usage_errors() {
    let wrong = farine(&["--start=db", "--asyncapi", "--format", "xml"]);
    assert_eq!(wrong.status.code(), Some(2), "{}", text(&wrong));
    assert!(text(&wrong).contains("xml"), "{}", text(&wrong));
    let alone = farine(&["--start=db", "--format", "json"]);
    assert_eq!(alone.status.code(), Some(2), "{}", text(&alone));
    for flag in ["--asyncapi", "--describe"] {
        let two = farine(&["--start=db,pubsub", flag]);
        assert_eq!(two.status.code(), Some(2), "{}", text(&two));
        assert!(
            text(&two).contains(&format!("{flag} describes one module")),
            "{}",
            text(&two)
        );
    }
}
