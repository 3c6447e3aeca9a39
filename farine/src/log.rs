//! The log of a program that uses farine: one call sets it up.
//!
//! A service binary (`farine::main!()`) sets it up itself, from `--log-level` or `RUST_LOG`. A
//! standalone program (a tool that publishes with `Publisher::connect` or calls with
//! `rpc::Client::connect`) calls [`init`] first:
//! lines go to standard error, at the level `RUST_LOG` gives (else `info`), in colour on a
//! terminal; lapin's trace-level line for each frame it writes is left out whatever the level,
//! because the frame that opens a connection carries the password. A program with a
//! `tracing` subscriber of its own skips this: farine logs through `tracing`.

/// Sets up the log at the level `RUST_LOG` gives, else `info`. Does nothing when the program
/// already has a `tracing` subscriber.
pub fn init() {
    // `None` never fails: a bad RUST_LOG falls back to `info`.
    let _ = init_with(None);
}

/// Sets up the log at `filter` (a level, `debug`, or a `tracing` filter,
/// `farine=debug,info`), else as [`init`]; an error when `filter` is neither.
pub fn init_with(filter: Option<&str>) -> Result<(), String> {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = match filter {
        Some(level) => EnvFilter::try_new(level)
            .map_err(|e| format!("--log-level {level:?} is not a level or filter: {e}"))?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .finish()
        .with(tracing_subscriber::filter::filter_fn(|event| {
            !is_written_frame(event)
        }))
        .try_init();
    Ok(())
}

/// lapin's trace line for each frame it writes (`will write to buffer`, field `next_msg`):
/// kept out of the log whatever the level, because the `connection.start-ok` frame carries the
/// user's password (its SASL `response`, printed as bytes).
fn is_written_frame(event: &tracing::Metadata<'_>) -> bool {
    event.target() == "lapin::io_loop" && event.fields().field("next_msg").is_some()
}
