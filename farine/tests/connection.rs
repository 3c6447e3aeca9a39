//! The process's connection, as the broker sees it.

mod common;

use farine::config::Config;
use farine::{Runtime, consume};
use farine_test_support::{Broker, unique};
use serde_json::Value;

#[derive(Default)]
struct Billing;

#[farine::service(name = "conn_billing")]
impl Billing {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn bill(&self, _body: Value) {}
}

#[derive(Default)]
struct Shipping;

#[farine::service(name = "conn_shipping")]
impl Shipping {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn ship(&self, _body: Value) {}
}

/// The `connection_name` client property of every connection the broker has, via rabbitmqctl.
fn connection_names() -> Vec<String> {
    let rabbitmqctl = ["/usr/sbin/rabbitmqctl", "/usr/lib/rabbitmq/bin/rabbitmqctl"]
        .into_iter()
        .find(|path| std::path::Path::new(path).exists())
        .unwrap_or("rabbitmqctl");
    let output = std::process::Command::new(rabbitmqctl)
        .args([
            "list_connections",
            "-q",
            "--formatter",
            "json",
            "client_properties",
        ])
        .output()
        .expect("rabbitmqctl (installed with rabbitmq-server) runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let connections: Vec<Value> = serde_json::from_slice(&output.stdout).expect("JSON");
    connections
        .iter()
        .filter_map(|c| {
            c["client_properties"]
                .as_array()?
                .iter()
                .find(|p| p[0] == "connection_name")
                .and_then(|p| p[2].as_str().map(str::to_string))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_on_one_broker_share_one_connection_named_after_them() {
    let broker = Broker::connect().await;
    let exchange = unique("conn-x");
    let (q1, q2) = (unique("conn-q1"), unique("conn-q2"));
    let text = format!(
        "[DEFAULT]\namqp_uri = {}\nexchange = {exchange}\n[conn_billing]\nbill.queue = {q1}\n[conn_shipping]\nship.queue = {q2}\n",
        broker.uri()
    );
    let running = Runtime::new(Config::from_ini(&text, "test.ini").unwrap())
        .module("shop")
        .services(["conn_billing", "conn_shipping"])
        .start()
        .await
        .expect("starts");
    let names = tokio::task::spawn_blocking(connection_names).await.unwrap();
    running.stop().await;

    let ours: Vec<_> = names
        .iter()
        .filter(|name| name.contains("conn_billing") || name.contains("conn_shipping"))
        .collect();
    assert_eq!(
        ours,
        vec![&format!(
            "shop: conn_billing, conn_shipping (farine, pid {})",
            std::process::id()
        )],
        "{names:?}"
    );
}
