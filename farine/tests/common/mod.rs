//! Shared by the integration tests of this crate.
#![allow(dead_code)]

use std::time::Duration;

use farine::config::Config;
use farine_test_support::Broker;

/// A bound for conditions that should hold within moments on a healthy broker.
pub const BOUND: Duration = Duration::from_secs(10);

/// A config with a `[service]` section holding the test vhost's `amqp_uri` and `options`.
pub fn config(broker: &Broker, service: &str, options: &[(&str, &str)]) -> Config {
    let mut text = format!("[{service}]\namqp_uri = {}\n", broker.uri());
    for (key, value) in options {
        text.push_str(&format!("{key} = {value}\n"));
    }
    Config::from_ini(&text, "test.ini").expect("test config parses")
}

/// Starts `service` in the test's vhost, its section holding `extra` (INI lines) besides the
/// `amqp_uri`.
pub async fn serve(broker: &Broker, service: &str, extra: &str) -> farine::Running {
    let text = format!("[{service}]\namqp_uri = {}\n{extra}", broker.uri());
    farine::Runtime::new(Config::from_ini(&text, "test.ini").unwrap())
        .services([service])
        .start()
        .await
        .expect("starts")
}

/// Starts `service` from `config` and returns why start-up failed; panics with `expected` (what
/// should have refused it) when it started.
pub async fn start_error(config: Config, service: &str, expected: &str) -> farine::StartError {
    farine::Runtime::new(config)
        .services([service])
        .start()
        .await
        .err()
        .unwrap_or_else(|| panic!("started, but expected {expected}"))
}
