//! The log of a program that uses farine: one call sets it up.
//!
//! A service binary (`farine::main!()`) sets it up itself, from `--log-level` or `RUST_LOG`,
//! and in the format `--log-format`, `log_format` in `[DEFAULT]` or `FARINE_LOG_FORMAT` gives. A
//! standalone program (a tool that publishes with `Publisher::connect` or calls with
//! `rpc::Client::connect`) calls [`init`] first:
//! lines go to standard error, at the level `RUST_LOG` gives (else `info`), in colour on a
//! terminal; lapin's trace-level line for each frame it writes is left out whatever the level,
//! because the frame that opens a connection carries the password. A program with a
//! `tracing` subscriber of its own skips this: farine logs through `tracing`.

use std::str::FromStr;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum LogFormat {
    /// One line of text per event, for a person at a terminal (`text`).
    #[default]
    Text,
    /// One JSON object per line, for a log collector (`json`): `timestamp`, `level`, `target`,
    /// `fields` (the message as `fields.message`, and the event's fields), `span` (the current
    /// span's fields) and `spans` (every span the event is in, outermost first). Never in colour.
    Json,
}

impl LogFormat {
    /// The values [`LogFormat::from_str`] accepts, for error messages.
    pub(crate) const ACCEPTED: &'static str = "text or json";
}

impl FromStr for LogFormat {
    type Err = String;

    /// `text` or `json`, in any case.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err(format!(
                "{value:?} is not a log format; expected {}",
                Self::ACCEPTED
            )),
        }
    }
}

/// Sets up the log at the level `RUST_LOG` gives, else `info`, as text. Does nothing when the
/// program already has a `tracing` subscriber.
pub fn init() {
    // `None` never fails: a bad RUST_LOG falls back to `info`.
    let _ = init_with(None, LogFormat::Text);
}

/// Sets up the log at `filter` (a level, `debug`, or a `tracing` filter,
/// `farine=debug,info`), else as [`init`], in `format`; an error when `filter` is neither.
pub fn init_with(filter: Option<&str>, format: LogFormat) -> Result<(), String> {
    install(level_filter(filter)?, format);
    Ok(())
}

/// The filter `filter` names (a level or a `tracing` filter), else `RUST_LOG`'s, else `info`;
/// an error when `filter` is neither a level nor a filter.
pub(crate) fn level_filter(filter: Option<&str>) -> Result<EnvFilter, String> {
    match filter {
        Some(level) => EnvFilter::try_new(level)
            .map_err(|e| format!("--log-level {level:?} is not a level or filter: {e}")),
        None => Ok(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))),
    }
}

/// Sets up the log with `filter`, in `format`, on standard error; does nothing when the program
/// already has a `tracing` subscriber.
pub(crate) fn install(filter: EnvFilter, format: LogFormat) {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let lines = match format {
        LogFormat::Text => lines
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
        LogFormat::Json => lines
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_ansi(false)
            .boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::filter::filter_fn(|event| {
            !is_written_frame(event)
        }))
        .with(lines)
        .try_init();
}

/// lapin's trace line for each frame it writes (`will write to buffer`, field `next_msg`):
/// kept out of the log whatever the level, because the `connection.start-ok` frame carries the
/// user's password (its SASL `response`, printed as bytes).
fn is_written_frame(event: &tracing::Metadata<'_>) -> bool {
    event.target() == "lapin::io_loop" && event.fields().field("next_msg").is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_format_is_text_or_json_in_any_case_and_nothing_else() {
        assert_eq!("text".parse(), Ok(LogFormat::Text));
        assert_eq!(" JSON ".parse(), Ok(LogFormat::Json));
        let refused = "yaml".parse::<LogFormat>().unwrap_err();
        assert!(refused.contains("text or json"), "{refused}");
    }
}
