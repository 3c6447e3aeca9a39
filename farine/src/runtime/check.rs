//! `--check`: can this machine reach the broker and the databases the config names?
//!
//! Each AMQP node is connected to and measured (the time to open the connection, and one round
//! trip: a channel opened and closed), each database too (connection, then `SELECT 1`). Every
//! line names the node or database without its password. A service binary checks its own
//! services ([`super::Runtime::check`], which validates their config first); the launcher,
//! without `--start`, checks every section of the file ([`config_file`]).

use std::collections::BTreeSet;
use std::time::Instant;

use crate::amqp::connection::{Connector, ConnectorSettings};
use crate::config::Config;
use crate::db::DbSettings;

/// The connections of one service.
pub struct Target {
    pub amqp_uri: String,
    pub connector: ConnectorSettings,
    pub db: Option<DbSettings>,
}

/// Checks each distinct broker and database of `targets`; `module` names the connections.
pub async fn connections(module: &str, targets: Vec<Target>) -> (bool, Vec<String>) {
    let mut ok = true;
    let mut lines = Vec::new();
    let mut seen = BTreeSet::new();
    for target in &targets {
        if !seen.insert(target.amqp_uri.clone()) {
            continue;
        }
        let connector = Connector::with_settings(
            target.amqp_uri.clone(),
            crate::amqp::connection::connection_name(module, "--check"),
            target.connector.clone(),
        );
        for (node, result) in connector.ping().await {
            match result {
                Ok((opened, round_trip)) => lines.push(format!(
                    "amqp {node}: ok, connected in {opened:.1?}, round trip {round_trip:.1?}"
                )),
                Err(e) => {
                    ok = false;
                    lines.push(format!("amqp {node}: FAILED: {e}"));
                }
            }
        }
    }
    let mut seen = BTreeSet::new();
    for db in targets.iter().filter_map(|target| target.db.as_ref()) {
        if !seen.insert(db.describe()) {
            continue;
        }
        let started = Instant::now();
        let line = match db.connect().await {
            Ok(pool) => {
                let opened = started.elapsed();
                let trip = Instant::now();
                let line = match crate::db::ping(&pool).await {
                    Ok(()) => format!(
                        "postgres {}: ok, connected in {opened:.1?}, round trip {:.1?}",
                        db.describe(),
                        trip.elapsed()
                    ),
                    Err(e) => {
                        ok = false;
                        format!("postgres {}: FAILED: {e}", db.describe())
                    }
                };
                pool.close().await;
                line
            }
            Err(e) => {
                ok = false;
                format!("postgres {}: FAILED: {e}", db.describe())
            }
        };
        lines.push(line);
    }
    (ok, lines)
}

/// Checks the connections named by every section of `config` (`[DEFAULT]` included, so a file
/// with only `[DEFAULT]` is checked too), without any service: the launcher's `--check`.
pub async fn config_file(config: &Config) -> (bool, Vec<String>) {
    let mut sections: Vec<_> = config
        .section_names()
        .map(str::to_string)
        .filter(|name| name != "DEFAULT")
        .collect();
    if sections.is_empty() {
        sections.push("DEFAULT".to_string());
    }
    let mut targets = Vec::new();
    let mut lines = Vec::new();
    for name in &sections {
        let section = if name == "DEFAULT" {
            config.defaults()
        } else {
            match config.section(name) {
                Ok(section) => section,
                Err(e) => return (false, vec![e.to_string()]),
            }
        };
        let read = || -> Result<Target, crate::config::ConfigError> {
            let amqp_uri = section
                .get_str("amqp_uri")?
                .unwrap_or_else(|| super::DEFAULT_AMQP_URI.to_string());
            Ok(Target {
                amqp_uri,
                connector: super::plan::connector_settings(&section)?,
                db: DbSettings::from_config(&section)?,
            })
        };
        match read() {
            Ok(target) => targets.push(target),
            Err(e) => return (false, vec![format!("config {}: {e}", config.file())]),
        }
    }
    lines.push(format!(
        "config {}: ok (sections: {})",
        config.file(),
        sections.join(", ")
    ));
    let (ok, more) = connections("launcher", targets).await;
    lines.extend(more);
    (ok, lines)
}
