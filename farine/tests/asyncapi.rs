//! The AsyncAPI document of services declared here, as `--asyncapi` writes it: what it says of
//! each handler kind, payload types with and without a JSON Schema (a type without one compiles
//! and is shown as any JSON, with a note), the names the config gives, no credentials; and the
//! official parser (`@asyncapi/parser`) finds no error in it, as YAML or JSON. No broker.

use farine::config::Config;
use farine::rpc::Client;
use farine::{PublishError, Publisher, consume, publish, rpc};
use farine_test_support::asyncapi::validate;
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// A body with a schema, nesting another named type and an enum.
#[derive(Deserialize, Serialize, schemars::JsonSchema)]
struct Order {
    id: u64,
    lines: Vec<Line>,
    state: State,
}

#[derive(Deserialize, Serialize, schemars::JsonSchema)]
struct Line {
    sku: String,
    quantity: u32,
}

#[derive(Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
enum State {
    Open,
    Paid,
}

/// A body without a schema: no `JsonSchema`, and nothing asks for one.
#[derive(Deserialize)]
struct Legacy {
    #[allow(dead_code)]
    anything: Value,
}

#[derive(Default)]
struct Shop;

#[farine::service]
impl Shop {
    #[consume(exchange = "orders", routing_key = "order.*")]
    async fn order(&self, order: Order, message: farine::Message) -> Result<(), PublishError> {
        let _ = message;
        self.paid(&order).await
    }

    #[consume(exchange = "legacy", routing_key = "old")]
    async fn legacy(&self, legacy: Legacy) {
        let _ = legacy;
    }

    #[publish(exchange = "payments", routing_key = "order.paid")]
    async fn paid(&self, publisher: Publisher, order: &Order) -> Result<(), PublishError> {
        publisher.publish(order).await
    }

    #[publish(exchange = "payments", routing_key = "note")]
    async fn note(&self, publisher: Publisher, id: u64, text: String) -> Result<(), PublishError> {
        publisher.publish(&json!({ "id": id, "text": text })).await
    }

    #[rpc::method]
    async fn total(&self, order: Order, discount: Option<u32>) -> Result<u64, String> {
        Ok(order.lines.len() as u64 - u64::from(discount.unwrap_or(0)))
    }

    #[rpc::method]
    fn lines(&self, id: u64) -> impl Stream<Item = Line> + Send + use<> {
        let _ = id;
        futures_util::stream::empty()
    }

    #[rpc::client("stock")]
    async fn reserve(&self, stock: Client, sku: String) -> Result<u32, farine::rpc::RpcError> {
        stock
            .call("reserve", farine::rpc::Args::new().arg(sku))
            .await
    }
}

/// A second service, on the exchange and routing key `Shop::paid` publishes to.
#[derive(Default)]
struct Audit;

#[farine::service]
impl Audit {
    #[consume(exchange = "payments", routing_key = "order.paid")]
    async fn paid(&self, order: Order) {
        let _ = order;
    }
}

/// The document of this test binary's services, as `config` resolves them.
fn document(config: &str) -> Value {
    let config = Config::from_ini(config, "asyncapi-test.ini").expect("the config parses");
    farine::__private::asyncapi_document("shop", "1.2.3", &config).expect("a document")
}

fn config() -> String {
    "[DEFAULT]\namqp_uri = amqp://shopper:s3cret-pw@10.1.2.3:5673/shop\n\n[shop]\norder.exchange = shop-orders\norder.exchange_type = topic\norder.queue_arguments = x-queue-type = quorum\n".to_string()
}

#[test]
fn each_handler_kind_is_an_operation_on_the_channel_of_its_exchange_and_routing_key() {
    let doc = document(&config());
    assert_eq!(doc["asyncapi"], "3.0.0");
    assert_eq!(doc["info"]["title"], "shop");
    assert_eq!(doc["info"]["version"], "1.2.3");

    // The config's names, not only the attribute's.
    let orders = &doc["channels"]["shop-orders.order._"];
    assert_eq!(orders["address"], "order.*", "{orders:#}");
    let binding = &orders["bindings"]["amqp"];
    assert_eq!(binding["is"], "routingKey");
    assert_eq!(binding["exchange"]["name"], "shop-orders");
    assert_eq!(binding["exchange"]["type"], "topic");
    assert_eq!(binding["exchange"]["durable"], true);
    assert_eq!(binding["exchange"]["vhost"], "shop");
    let queue = &binding["x-farine-queues"][0];
    assert_eq!(queue["name"], "shop.order");
    assert_eq!(queue["arguments"]["x-queue-type"], "quorum");

    let operation = |id: &str| doc["operations"][id].clone();
    assert_eq!(operation("shop.order")["action"], "receive");
    assert_eq!(
        operation("shop.order")["channel"]["$ref"],
        "#/channels/shop-orders.order._"
    );
    assert_eq!(operation("shop.paid")["action"], "send");
    assert_eq!(
        operation("shop.paid")["channel"]["$ref"],
        "#/channels/payments.order.paid"
    );
    assert_eq!(operation("shop.total")["action"], "receive");
    assert_eq!(
        operation("shop.total")["channel"]["$ref"],
        "#/channels/shop.shop__total"
    );
    assert_eq!(
        operation("shop.total")["reply"]["channel"]["$ref"],
        "#/channels/farine.rpc.reply"
    );
    assert_eq!(
        operation("shop.total")["reply"]["address"]["location"],
        "$message.header#/reply_to"
    );
    assert_eq!(operation("shop.reserve")["action"], "send");
    assert_eq!(
        doc["channels"]["stock.rpc"]["address"], "stock__{method}",
        "a client's requests go to the methods of the service it calls"
    );
    // No credentials: the server is the host and port.
    assert_eq!(doc["servers"]["amqp"]["host"], "10.1.2.3:5673");
    assert_eq!(doc["servers"]["amqp"]["protocol"], "amqp");
    assert_eq!(doc["servers"]["amqp"]["pathname"], "/shop");
    let text = doc.to_string();
    assert!(
        !text.contains("s3cret-pw") && !text.contains("shopper"),
        "no credentials in the document"
    );
}

#[test]
fn typed_payloads_have_their_json_schema_and_untyped_ones_an_open_schema_with_a_note() {
    let doc = document(&config());
    let messages = &doc["components"]["messages"];
    let schemas = &doc["components"]["schemas"];
    // The consumed body: a named type, referenced; its nested types are there too.
    assert_eq!(
        messages["shop.order"]["payload"]["$ref"],
        "#/components/schemas/Order"
    );
    assert_eq!(
        schemas["Order"]["properties"]["id"]["type"], "integer",
        "{:#}",
        schemas["Order"]
    );
    assert_eq!(
        schemas["Order"]["properties"]["lines"]["items"]["$ref"],
        "#/components/schemas/Line"
    );
    assert_eq!(schemas["Line"]["properties"]["sku"]["type"], "string");
    assert_eq!(schemas["State"]["enum"], json!(["open", "paid"]));
    // What a publish method sends: its one parameter after the publisher.
    assert_eq!(
        messages["shop.paid"]["payload"]["$ref"],
        "#/components/schemas/Order"
    );
    // A type without a schema: any JSON, and the note names it.
    let legacy = &messages["shop.legacy"];
    assert_eq!(legacy["payload"]["x-farine-rust-type"], "Legacy");
    assert!(
        legacy["description"]
            .as_str()
            .is_some_and(|d| d.contains("`Legacy` has no JSON Schema")),
        "{legacy:#}"
    );
    // Several parameters after the publisher: nothing says what is sent.
    assert_eq!(messages["shop.note"]["payload"], json!({}));
    // RPC: the envelope once, each method's arguments and reply typed on it.
    for envelope in [
        "farine.rpc.request",
        "farine.rpc.reply",
        "farine.rpc.end",
        "farine.rpc.error",
    ] {
        assert!(messages[envelope].is_object(), "{envelope} is a component");
    }
    let request = &messages["shop.total.request"]["payload"]["allOf"];
    assert_eq!(
        request[0]["$ref"],
        "#/components/schemas/farine.rpc.Request"
    );
    let kwargs = &request[1]["properties"]["kwargs"]["properties"];
    assert_eq!(kwargs["order"]["$ref"], "#/components/schemas/Order");
    assert_eq!(
        request[1]["properties"]["args"]["items"][1], kwargs["discount"],
        "positional and keyword arguments have the same schema"
    );
    let reply = &messages["shop.total.reply"]["payload"]["allOf"][1];
    assert_eq!(reply["properties"]["body"]["type"], "integer", "{reply:#}");
    let streamed = &messages["shop.lines.reply"]["payload"]["allOf"][1];
    assert_eq!(
        streamed["properties"]["body"]["$ref"], "#/components/schemas/Line",
        "each item of a stream"
    );
    let replies: Vec<&str> = doc["operations"]["shop.total"]["reply"]["messages"]
        .as_array()
        .expect("reply messages")
        .iter()
        .filter_map(|m| m["$ref"].as_str())
        .collect();
    assert_eq!(
        replies,
        [
            "#/channels/farine.rpc.reply/messages/shop.total.reply",
            "#/channels/farine.rpc.reply/messages/farine.rpc.end",
            "#/channels/farine.rpc.reply/messages/farine.rpc.error",
        ]
    );
}

#[test]
fn the_official_parser_finds_no_error_in_the_document_as_yaml_or_json() {
    let doc = document(&config());
    let dir = std::env::temp_dir().join(format!(
        "farine-asyncapi-{}",
        farine_test_support::unique("doc")
    ));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let yaml = dir.join("shop.yaml");
    let json_file = dir.join("shop.json");
    std::fs::write(&yaml, farine::__private::to_yaml(&doc)).expect("written");
    std::fs::write(&json_file, format!("{doc:#}")).expect("written");
    let validation = validate(&[&yaml, &json_file]);
    std::fs::remove_dir_all(&dir).ok();
    validation.assert_clean();
}

#[test]
fn the_yaml_form_reads_back_as_the_same_document() {
    // The parser reads YAML; what it reads must be what the JSON form says. Node's YAML
    // reader is not at hand without the parser, so read it back through the parser's own
    // package (js-yaml, one of its dependencies) in a one-line script.
    let doc = document(&config());
    let dir = std::env::temp_dir().join(format!(
        "farine-asyncapi-{}",
        farine_test_support::unique("yaml")
    ));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let yaml = dir.join("shop.yaml");
    std::fs::write(&yaml, farine::__private::to_yaml(&doc)).expect("written");
    let package = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/asyncapi");
    let output = std::process::Command::new("node")
        .args([
            "--input-type=module",
            "-e",
            "import {readFileSync} from 'node:fs'; import yaml from 'js-yaml'; process.stdout.write(JSON.stringify(yaml.load(readFileSync(process.argv[1], 'utf8'))));",
        ])
        .arg(&yaml)
        .current_dir(&package)
        .output()
        .expect("node runs");
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let read: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(read, doc);
}

#[test]
fn a_disabled_service_or_one_without_a_section_is_left_out_and_none_left_is_an_error() {
    let config = Config::from_ini("[other]\n", "none.ini").expect("parses");
    let refused = farine::__private::asyncapi_document("shop", "1", &config)
        .expect_err("no service configured");
    assert!(
        refused.to_string().contains("no service of module `shop`"),
        "{refused}"
    );
    let disabled = Config::from_ini("[shop]\nenabled = false\n", "off.ini").expect("parses");
    assert!(farine::__private::asyncapi_document("shop", "1", &disabled).is_err());
}

#[test]
fn services_on_one_broker_share_a_channel_and_on_another_broker_get_their_own() {
    let shared = document(&format!("{}\n[audit]\n", config()));
    let channel = &shared["channels"]["payments.order.paid"];
    let messages: Vec<&String> = channel["messages"]
        .as_object()
        .expect("messages")
        .keys()
        .collect();
    assert_eq!(messages, ["audit.paid", "shop.paid"], "{channel:#}");
    assert_eq!(
        channel["bindings"]["amqp"]["x-farine-queues"][0]["name"],
        "audit.paid"
    );
    assert!(shared["channels"].get("payments.order.paid-2").is_none());

    // [audit] on another broker: its own server and channel.
    let apart = document(&format!(
        "{}\n[audit]\namqp_uri = amqp://10.9.9.9:5672/audit\n",
        config()
    ));
    let channels = &apart["channels"];
    let servers = |id: &str| channels[id]["servers"][0]["$ref"].clone();
    assert_eq!(
        apart["operations"]["audit.paid"]["channel"]["$ref"],
        "#/channels/payments.order.paid"
    );
    assert_eq!(
        apart["operations"]["shop.paid"]["channel"]["$ref"],
        "#/channels/payments.order.paid-2"
    );
    assert_ne!(
        servers("payments.order.paid"),
        servers("payments.order.paid-2")
    );
    assert_eq!(
        channels["payments.order.paid"]["bindings"]["amqp"]["exchange"]["vhost"],
        "audit"
    );
    assert_eq!(
        channels["payments.order.paid-2"]["bindings"]["amqp"]["exchange"]["vhost"],
        "shop"
    );
}

#[test]
fn an_amqp_uri_that_is_not_one_is_a_config_error() {
    let config =
        Config::from_ini("[shop]\namqp_uri = http://broker:5672\n", "bad.ini").expect("parses");
    let refused =
        farine::__private::asyncapi_document("shop", "1", &config).expect_err("not an AMQP URI");
    assert!(refused.to_string().contains("`amqp_uri`"), "{refused}");
}

#[test]
fn rpc_requests_allow_protocol_flags_and_a_stream_says_its_items_are_replies() {
    let doc = document(&config());
    let kwargs = &doc["components"]["messages"]["shop.total.request"]["payload"]["allOf"][1]["properties"]
        ["kwargs"];
    assert_eq!(kwargs["additionalProperties"], false);
    assert!(
        kwargs["patternProperties"]["^__.+__$"].is_object(),
        "{kwargs:#}"
    );
    let summary = |id: &str| doc["components"]["messages"][id]["summary"].clone();
    assert!(
        summary("shop.lines.reply")
            .as_str()
            .is_some_and(|s| s.contains("One item of the stream")),
        "{}",
        summary("shop.lines.reply")
    );
    assert!(
        summary("shop.total.reply")
            .as_str()
            .is_some_and(|s| s.starts_with("The result")),
        "{}",
        summary("shop.total.reply")
    );
}

#[test]
fn with_rpc_queue_per_method_the_document_and_the_list_name_each_methods_own_queue() {
    let queues = |config: &str| {
        let doc = document(config);
        ["shop__total", "shop__lines"].map(|key| {
            doc["channels"][format!("shop.{key}")]["bindings"]["amqp"]["x-farine-queues"][0]["name"]
                .clone()
        })
    };
    assert_eq!(queues(&config()), [json!("shop"), json!("shop")]);
    let per_method = format!("{}rpc_queue_per_method = true\n", config());
    assert_eq!(
        queues(&per_method),
        [json!("shop__total"), json!("shop__lines")]
    );
    // `--list` (and `--describe`, from the same descriptions).
    let listed = |text: &str| {
        let config = Config::from_ini(text, "asyncapi-test.ini").expect("the config parses");
        farine::__private::list("shop", Some(&config))
    };
    assert!(listed(&config()).contains(r#"routing key "shop__total", queue shop,"#));
    assert!(listed(&per_method).contains(r#"routing key "shop__total", queue shop__total,"#));
}
