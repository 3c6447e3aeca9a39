//! The command line of a service binary: what `farine::main!()` runs.
//!
//! `farine --start=mymodule` (the launcher in `farine-cli`) builds package `mymodule` and runs
//! its binary with the same arguments, so this is the command line users see. A built binary can
//! also be run directly (`mymodule --config /etc/farine.ini`), as a container image would.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use crate::config::{self, Config};
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
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Lists the services and their handlers (exchange, queue, routing key) and exits.
    #[arg(long)]
    pub list: bool,
    /// Validates the config, connects to each AMQP node and database the services use, prints
    /// each round-trip time, and exits 0 (all reachable) or 1.
    #[arg(long)]
    pub check: bool,
    /// Moves the messages in a handler's dead-letter queue (`<queue>.dead`) back to its queue
    /// with a fresh attempt count, then exits. HANDLER is `service.handler`.
    #[arg(long, value_name = "HANDLER")]
    pub replay_dead_letters: Option<String>,
    /// Log level or filter: error, warn, info, debug, trace, or a tracing filter such as
    /// `farine=debug`. Default: $RUST_LOG, else info.
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
}

/// Runs the binary of module `module` (its package name) with the process's arguments,
/// applying `migrations` at start to each database the services use, with `layers` around
/// every handler call and send (what
/// `farine::main!(layers = [...])` passes).
pub fn main_with(
    module: &'static str,
    migrations: &'static [crate::db::EmbeddedMigration],
    layers: Vec<std::sync::Arc<dyn crate::handler::Layer>>,
) -> ExitCode {
    let args = Args::parse();
    ExitCode::from(run(module, migrations, layers, args))
}

fn run(
    module: &'static str,
    migrations: &'static [crate::db::EmbeddedMigration],
    layers: Vec<std::sync::Arc<dyn crate::handler::Layer>>,
    args: Args,
) -> u8 {
    if let Err(message) = crate::log::init_with(args.log_level.as_deref()) {
        eprintln!("farine: {message}");
        return EXIT_USAGE;
    }
    if let Some(unknown) = args.start.iter().find(|name| name.as_str() != module) {
        eprintln!(
            "farine: unknown module `{unknown}`; this binary runs module `{module}` (available: {module})"
        );
        return EXIT_USAGE;
    }
    let path = config::resolve_path(args.config.as_deref());
    let loaded = Config::load(&path);
    if args.list {
        print!("{}", list(module, loaded.as_ref().ok()));
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
    if let Some(target) = args.replay_dead_letters {
        return runtime.block_on(async move {
            match Runtime::new(config)
                .module(module)
                .replay_dead_letters(&target)
                .await
            {
                Ok((moved, from, to)) => {
                    println!("replayed {moved} dead letter(s) from {from} to {to}");
                    EXIT_OK
                }
                Err(e) => {
                    eprintln!("farine: {e}");
                    if e.is_config() {
                        EXIT_CONFIG
                    } else {
                        EXIT_FAILURE
                    }
                }
            }
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
        let section = config.and_then(|c| entry.section(c).ok());
        let enabled = section
            .as_ref()
            .map(|s| s.get_or("enabled", true).unwrap_or(true));
        let state = match (config, enabled) {
            (Some(_), None) => "no config section",
            (_, Some(false)) => "disabled",
            _ => "enabled",
        };
        let _ = writeln!(
            out,
            "service {} ({}, section [{}], {state})",
            entry.name, entry.type_name, entry.name
        );
        // Without a config, or a section, the defaults: what an empty section resolves to.
        let fallback = Config::from_ini(&format!("[{}]\n", entry.name), "defaults").ok();
        let default_section = fallback.as_ref().and_then(|c| entry.section(c).ok());
        let Some(section) = section.as_ref().or(default_section.as_ref()) else {
            continue;
        };
        for described in entry.describe(section) {
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
