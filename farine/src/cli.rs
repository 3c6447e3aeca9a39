//! The command line of a service binary: what `farine::main!()` runs.
//!
//! `farine --start=mymodule` (the launcher in `farine-cli`) builds package `mymodule` and runs
//! its binary with the same arguments, so this is the command line users see. A built binary can
//! also be run directly (`mymodule --config /etc/farine.ini`), as a container image would.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use clap::builder::TypedValueParser;

use crate::config::{self, Config, Section};
use crate::log::LogFormat;
use crate::operate::{self, Command};
use crate::registry::ServiceEntry;
use crate::runtime::Runtime;

/// Exit status: the services ran and stopped cleanly on SIGINT/SIGTERM.
pub const EXIT_OK: u8 = 0;
/// Exit status: a runtime failure (the broker cannot be reached, a handler cannot start).
pub const EXIT_FAILURE: u8 = 1;
/// Exit status: the command line is wrong (unknown flag, unknown module).
pub const EXIT_USAGE: u8 = 2;
/// Exit status: the configuration is wrong (missing file, section or key, bad value).
pub const EXIT_CONFIG: u8 = 3;

/// The flags of a farine service binary.
#[derive(Debug, Parser)]
#[command(name = "farine", version, about = "Runs farine services.")]
pub struct Args {
    /// The module(s) to start: the package of the services. Repeatable or comma-separated;
    /// a service binary starts its own module when the flag is absent.
    #[arg(long, value_delimiter = ',', value_name = "MODULE")]
    pub start: Vec<String>,
    /// The INI file (default: $FARINE_INI, else /etc/farine.ini).
    #[arg(long, value_name = "PATH", global = true)]
    pub config: Option<PathBuf>,
    /// Lists the services and their handlers (exchange, queue, routing key) and exits.
    #[arg(long)]
    pub list: bool,
    /// Prints the services' handlers, queues and bindings as a table, and exits.
    #[arg(long)]
    pub describe: bool,
    /// Prints the AsyncAPI 3.0 document of the services as the config resolves them, and exits.
    #[arg(long)]
    pub asyncapi: bool,
    /// The AsyncAPI document's format.
    #[arg(long, value_name = "FORMAT", default_value = "yaml", value_parser = ["yaml", "json"], requires = "asyncapi")]
    pub format: String,
    /// Writes the AsyncAPI document to FILE instead of standard output.
    #[arg(long, value_name = "FILE", requires = "asyncapi")]
    pub output: Option<PathBuf>,
    /// Validates the config, connects to each AMQP node and database the services use, prints
    /// each round-trip time, and exits 0 (all reachable) or 1.
    #[arg(long)]
    pub check: bool,
    /// Deprecated: `dead-letters replay HANDLER`, which it stands for.
    #[arg(long, value_name = "HANDLER", hide = true)]
    pub replay_dead_letters: Option<String>,
    /// Log level or filter: error, warn, info, debug, trace, or a tracing filter such as
    /// `farine=debug`. Default: $RUST_LOG, else info (for a command: else warn).
    #[arg(long, value_name = "LEVEL", global = true)]
    pub log_level: Option<String>,
    /// Log format: text, or json (one JSON object per line). Default: `log_format` in the
    /// config's [DEFAULT], else $FARINE_LOG_FORMAT, else text.
    #[arg(
        long,
        value_name = "FORMAT",
        global = true,
        value_parser = clap::builder::PossibleValuesParser::new(["text", "json"])
            .try_map(|value| value.parse::<LogFormat>()),
    )]
    pub log_format: Option<LogFormat>,
    /// An operator's command instead of running the services.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Runs the binary of module `module` (its package name) with the process's arguments,
/// applying `migrations` at start to each database the services use, with `layers` around
/// every handler call and send (what
/// `farine::main!(layers = [...])` passes).
pub fn main_with(
    module: &'static str,
    version: &'static str,
    migrations: &'static [crate::db::EmbeddedMigration],
    layers: Vec<std::sync::Arc<dyn crate::handler::Layer>>,
) -> ExitCode {
    let args = Args::parse();
    ExitCode::from(run((module, version), migrations, layers, args))
}

fn run(
    (module, version): (&'static str, &'static str),
    migrations: &'static [crate::db::EmbeddedMigration],
    layers: Vec<std::sync::Arc<dyn crate::handler::Layer>>,
    args: Args,
) -> u8 {
    let filter = match crate::log::level_filter(args.log_level.as_deref()) {
        Ok(filter) => filter,
        Err(message) => {
            eprintln!("farine: {message}");
            return EXIT_USAGE;
        }
    };
    if let Some(unknown) = args.start.iter().find(|name| name.as_str() != module) {
        eprintln!(
            "farine: unknown module `{unknown}`; this binary runs module `{module}` (available: {module})"
        );
        return EXIT_USAGE;
    }
    let command = match (args.command, &args.replay_dead_letters) {
        (Some(command), _) => Some(command),
        (None, Some(handler)) => {
            eprintln!("farine: {}", operate::REPLAY_FLAG_DEPRECATED);
            Some(Command::replay(handler.clone()))
        }
        (None, None) => None,
    };
    if let Some(command) = command {
        let options = operate::Options {
            config: args.config.as_deref(),
            log_level: args.log_level.as_deref(),
            log_format: args.log_format,
            module: Some(module),
        };
        return operate::run(command, options);
    }
    // The config before the log, which may take its format from it; nothing logs before this.
    let path = config::resolve_path(args.config.as_deref());
    let loaded = Config::load(&path);
    let format = log_format(args.log_format, loaded.as_ref().ok());
    crate::log::install(filter, format.as_ref().copied().unwrap_or_default());
    if args.list {
        print!("{}", list(module, loaded.as_ref().ok()));
        if let Err(e) = &loaded {
            eprintln!("farine: showing defaults: {e}");
        } else if let Err(e) = &format {
            eprintln!("farine: {e}");
        }
        return EXIT_OK;
    }
    if args.describe {
        print!("{}", describe(module, loaded.as_ref().ok()));
        if let Err(e) = &loaded {
            eprintln!("farine: showing defaults: {e}");
        }
        return EXIT_OK;
    }
    // A config error: under --check a failed check on stdout, else on stderr, exit status 3.
    let refused = |e: &dyn std::fmt::Display| {
        if args.check {
            println!("config {}: {e}", path.display());
            println!("check failed");
            EXIT_FAILURE
        } else {
            eprintln!("farine: {e}");
            EXIT_CONFIG
        }
    };
    let config = match loaded {
        Ok(config) => config,
        Err(e) => return refused(&e),
    };
    if let Err(e) = format {
        return refused(&e);
    }
    if args.asyncapi {
        return asyncapi(
            module,
            version,
            &config,
            &args.format,
            args.output.as_deref(),
        );
    }
    let (mut builder, described) = match crate::runtime::tokio_builder(&config) {
        Ok(chosen) => chosen,
        Err(e) => return refused(&e),
    };
    let runtime = match builder.build() {
        Ok(runtime) => {
            tracing::info!(runtime = %described, "tokio runtime built");
            runtime
        }
        Err(e) => {
            eprintln!("farine: cannot start the async runtime: {e}");
            return EXIT_FAILURE;
        }
    };
    if args.check {
        return runtime.block_on(async move {
            let (ok, lines) = Runtime::new(config).module(module).check().await;
            for line in lines {
                println!("{line}");
            }
            println!("{}", if ok { "check passed" } else { "check failed" });
            if ok { EXIT_OK } else { EXIT_FAILURE }
        });
    }
    runtime.block_on(async move {
        // Signals first: a SIGTERM during start-up stops the process cleanly once started.
        let signals = crate::runtime::shutdown::Signals::install();
        let runtime = layers.into_iter().fold(
            Runtime::new(config).module(module).migrations(migrations),
            Runtime::layer_arc,
        );
        match runtime.start().await {
            Ok(running) => match running.run_until(signals).await {
                Ok(()) => EXIT_OK,
                Err(e) => {
                    eprintln!("farine: {e}");
                    EXIT_FAILURE
                }
            },
            Err(e) => {
                tracing::error!(error = %e, "farine could not start");
                eprintln!("farine: {e}");
                if e.is_config() {
                    EXIT_CONFIG
                } else {
                    EXIT_FAILURE
                }
            }
        }
    })
}

/// The environment variable that gives the log format when neither the flag nor the config does.
const LOG_FORMAT_VARIABLE: &str = "FARINE_LOG_FORMAT";

/// The log's format: `--log-format`, else `log_format` in the config's `[DEFAULT]`, else
/// `$FARINE_LOG_FORMAT`, else text. An error names where a value that is not a format came
/// from. The config's value is checked even when the flag wins over it, as the rest of the
/// config is.
fn log_format(flag: Option<LogFormat>, config: Option<&Config>) -> Result<LogFormat, String> {
    let configured = match config {
        Some(config) => configured_log_format(config)?,
        None => None,
    };
    if let Some(format) = flag.or(configured) {
        return Ok(format);
    }
    let value = match std::env::var(LOG_FORMAT_VARIABLE) {
        Ok(value) => value,
        Err(std::env::VarError::NotPresent) => return Ok(LogFormat::Text),
        Err(std::env::VarError::NotUnicode(raw)) => raw.to_string_lossy().into_owned(),
    };
    value.parse().map_err(|_| {
        format!(
            "environment variable {LOG_FORMAT_VARIABLE} is {value:?}; expected {}",
            LogFormat::ACCEPTED
        )
    })
}

/// `log_format` of the config's `[DEFAULT]`, when set. In a service's own section it is an
/// error: the process has one log, whichever of its services the section is for.
fn configured_log_format(config: &Config) -> Result<Option<LogFormat>, String> {
    for name in config.section_names() {
        if config.own_keys(name).any(|key| key == "log_format") {
            let section = config.section(name).map_err(|e| e.to_string())?;
            let value = section.get_str("log_format").map_err(|e| e.to_string())?;
            return Err(section
                .invalid(
                    "log_format",
                    &value.unwrap_or_default(),
                    "no value in a service's section: the process has one log, set `log_format` in [DEFAULT]",
                )
                .to_string());
        }
    }
    let defaults = config.defaults();
    let Some(value) = defaults.get_str("log_format").map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    value.parse().map(Some).map_err(|_| {
        defaults
            .invalid("log_format", &value, LogFormat::ACCEPTED)
            .to_string()
    })
}

/// `--asyncapi`: the document, as YAML or JSON, on standard output or in `output`.
fn asyncapi(
    module: &str,
    version: &str,
    config: &Config,
    format: &str,
    output: Option<&std::path::Path>,
) -> u8 {
    let document = match crate::asyncapi::document(module, version, config) {
        Ok(document) => document,
        Err(e) => {
            eprintln!("farine: {e}");
            return EXIT_CONFIG;
        }
    };
    let text = match format {
        "json" => format!("{document:#}\n"),
        _ => crate::asyncapi::to_yaml(&document),
    };
    match output {
        None => {
            print!("{text}");
            EXIT_OK
        }
        Some(path) => match std::fs::write(path, text) {
            Ok(()) => EXIT_OK,
            Err(e) => {
                eprintln!("farine: cannot write {}: {e}", path.display());
                EXIT_FAILURE
            }
        },
    }
}

/// A service's state in the config and the section its handlers are described with: its
/// own, or (no config, no section) the defaults, what an empty section resolves to.
fn resolved(entry: &ServiceEntry, config: Option<&Config>) -> (&'static str, Option<Section>) {
    let section = config.and_then(|c| entry.section(c).ok());
    let enabled = section
        .as_ref()
        .map(|s| s.get_or("enabled", true).unwrap_or(true));
    let state = match (config, enabled) {
        (Some(_), None) => "no config section",
        (_, Some(false)) => "disabled",
        _ => "enabled",
    };
    let section = section.or_else(|| {
        let fallback = Config::from_ini(&format!("[{}]\n", entry.name), "defaults").ok()?;
        entry.section(&fallback).ok()
    });
    (state, section)
}

/// The `--describe` table: one row per handler, its exchange, routing key (a binding key for
/// a consumer), queue and the rest of its description.
pub fn describe(module: &str, config: Option<&Config>) -> String {
    use std::fmt::Write;
    let header = [
        "SERVICE",
        "HANDLER",
        "KIND",
        "EXCHANGE",
        "ROUTING KEY",
        "QUEUE",
        "DETAILS",
    ];
    let mut rows: Vec<[String; 7]> = vec![header.map(String::from)];
    for entry in ServiceEntry::all() {
        let (state, section) = resolved(entry, config);
        let Some(section) = section else { continue };
        for described in entry.describe(&section) {
            let service = if state == "enabled" {
                entry.name.to_string()
            } else {
                format!("{} ({state})", entry.name)
            };
            let kind = described.kind.as_str().to_string();
            let row = match described.description {
                Ok(d) => {
                    let mut details = d.settings.clone();
                    if let Some(queue) = &d.queue {
                        let mut flags = vec![if queue.durable {
                            "durable"
                        } else {
                            "transient"
                        }];
                        if queue.exclusive {
                            flags.push("exclusive");
                        }
                        if queue.auto_delete {
                            flags.push("auto-delete");
                        }
                        let arguments = queue
                            .arguments
                            .iter()
                            .map(|(name, value)| format!("{name}={value}"));
                        details.insert(
                            0,
                            flags
                                .into_iter()
                                .map(String::from)
                                .chain(arguments)
                                .collect::<Vec<_>>()
                                .join(" "),
                        );
                    }
                    details.push(format!("fn({}) -> {}", d.takes, d.gives));
                    [
                        service,
                        d.handler.to_string(),
                        kind,
                        d.exchange
                            .as_ref()
                            .map_or("-".into(), |e| format!("{} ({})", e.name, e.kind)),
                        d.routing_key.clone().unwrap_or_else(|| "-".into()),
                        d.queue.as_ref().map_or("-".into(), |q| q.name.clone()),
                        details.join("; "),
                    ]
                }
                Err(e) => [
                    service,
                    described.handler.to_string(),
                    kind,
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    format!("config error: {e}"),
                ],
            };
            // Names come from the file as written: one holding a URI keeps no password.
            rows.push(row.map(|cell| crate::config::redact::redact_uri(&cell)));
        }
    }
    let mut widths = [0; 7];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "module {module} (config: {})",
        config.map_or("not loaded, defaults shown", |c| c.file())
    );
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:width$}  ");
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

/// The `--list` text: every service of the binary with its handlers, as the config resolves them.
pub fn list(module: &str, config: Option<&Config>) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "module {module} (config: {})",
        config.map_or("not loaded, defaults shown", |c| c.file())
    );
    for entry in ServiceEntry::all() {
        let (state, section) = resolved(entry, config);
        let _ = writeln!(
            out,
            "service {} ({}, section [{}], {state})",
            entry.name, entry.type_name, entry.name
        );
        let Some(section) = section else {
            continue;
        };
        for described in entry.describe(&section) {
            let _ = match described.description {
                // Names come from the file as written: one holding a URI keeps no password.
                Ok(description) => writeln!(
                    out,
                    "  {}",
                    crate::config::redact::redact_uri(&description.to_string())
                ),
                Err(e) => writeln!(
                    out,
                    "  {} {}: {e}",
                    described.kind.as_str(),
                    described.handler
                ),
            };
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::from_ini(text, "test.ini").expect("test config parses")
    }

    #[test]
    fn the_log_format_flag_wins_over_the_configs_default_section() {
        let json = config("[DEFAULT]\nlog_format = json\n[relay]\n");
        assert_eq!(log_format(None, Some(&json)), Ok(LogFormat::Json));
        assert_eq!(
            log_format(Some(LogFormat::Text), Some(&json)),
            Ok(LogFormat::Text)
        );
        let text = config("[DEFAULT]\nlog_format = TEXT\n");
        assert_eq!(
            log_format(Some(LogFormat::Json), Some(&text)),
            Ok(LogFormat::Json)
        );
        assert_eq!(log_format(None, Some(&text)), Ok(LogFormat::Text));
    }

    #[test]
    fn a_log_format_that_is_not_a_format_or_is_in_a_services_section_is_refused() {
        let wrong = config("[DEFAULT]\nlog_format = yaml\n");
        let refused = log_format(None, Some(&wrong)).unwrap_err();
        assert!(
            refused.contains(
                "section [DEFAULT]: option `log_format` is \"yaml\"; expected text or json"
            ),
            "{refused}"
        );
        assert!(
            log_format(Some(LogFormat::Json), Some(&wrong)).is_err(),
            "the flag does not hide a wrong value in the file"
        );
        let misplaced = config("[relay]\nlog_format = json\n");
        let refused = log_format(None, Some(&misplaced)).unwrap_err();
        assert!(
            refused.contains("section [relay]: option `log_format`")
                && refused.contains("set `log_format` in [DEFAULT]"),
            "{refused}"
        );
    }
}
