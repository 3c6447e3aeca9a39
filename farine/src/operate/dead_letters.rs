//! `farine dead-letters list|replay|purge SERVICE.HANDLER [--limit N]`.
//!
//! Which queue: a service binary knows its handlers, so it takes the handler's queue and
//! dead-letter queue from the runtime's plan (the attribute's `queue`, the config's
//! `<handler>.queue`, `dead_letter_queue`), as a start would. The launcher without `--start`
//! links no service: it resolves the names from the config's section for the service (else
//! `[DEFAULT]`) with the default naming, `<service>.<handler>` and `<queue>.dead`, and when
//! that queue does not exist says so and points at `--start=MODULE` (the queue may be named in
//! the code). Each operation takes the messages there when it starts, at most `--limit`, from
//! the head of the queue (`amqp::dead_letter`).

use super::parse;
use super::{Broker, BrokerArgs, Failure, Options, load_config, print_line};
use crate::amqp::connection::Connector;
use crate::amqp::dead_letter::{self, DeadLetter};
use crate::amqp::error::{BrokerError, Resource};
use crate::config::Config;
use crate::runtime::{DeadLetterQueues, Runtime};

/// The most characters of a body `list` prints; the rest is left out and its size given.
const MAX_BODY_CHARS: usize = 500;

/// What to do with a handler's dead letters.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Action {
    /// Prints each dead letter (error, attempts, time, routing key, body) and leaves it in
    /// the queue, in its place.
    List(Target),
    /// Moves dead letters back to the handler's queue, with a fresh attempt count; prints how
    /// many.
    Replay(Target),
    /// Deletes dead letters; prints how many.
    Purge(Target),
}

/// The handler whose dead letters an [`Action`] works on, and how many.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// The `#[consume]` handler: `service.handler` (a service binary of one service also takes
    /// `handler` alone).
    #[arg(value_name = "SERVICE.HANDLER")]
    pub(super) handler: String,
    /// At most N dead letters, from the head of the queue (default: all there now).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub(super) limit: Option<u64>,
    #[command(flatten)]
    pub(super) broker: BrokerArgs,
}

impl Action {
    fn target(&self) -> &Target {
        match self {
            Action::List(target) | Action::Replay(target) | Action::Purge(target) => target,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Action::List(_) => "list",
            Action::Replay(_) => "replay",
            Action::Purge(_) => "purge",
        }
    }

    /// The command line of this action, for a module's binary.
    pub(super) fn arguments(&self) -> Vec<String> {
        let target = self.target();
        let mut out = vec!["dead-letters".to_string(), self.name().to_string()];
        if let Some(limit) = target.limit {
            out.push(format!("--limit={limit}"));
        }
        if let Some(uri) = &target.broker.amqp_uri {
            out.push(format!("--amqp-uri={uri}"));
        }
        // After `--`, a handler is never read as a flag.
        out.extend(["--".to_string(), target.handler.clone()]);
        out
    }
}

/// Finds the handler's queues, connects to their broker and does `action`.
pub(super) async fn run(action: Action, options: &Options<'_>) -> Result<(), Failure> {
    let target = action.target();
    let config = load_config(options.config)?;
    let found = match options.module {
        Some(module) => Runtime::new(config.clone())
            .module(module)
            .dead_letter_queues(&target.handler)
            .map_err(|e| {
                if e.is_config() {
                    Failure::config(e)
                } else {
                    Failure::failed(e)
                }
            })?,
        None => from_config(&config, &target.handler)?,
    };
    let broker = match target.broker.amqp_uri {
        Some(_) => Broker {
            settings: found.connector.clone(),
            ..Broker::choose(&target.broker, None)?
        },
        None => Broker {
            uri: found.amqp_uri.clone(),
            settings: found.connector.clone(),
        },
    };
    let purpose = format!("farine dead-letters {} {}", action.name(), target.handler);
    let connector = broker.connect(options, &purpose).await?;
    let done = match &action {
        Action::List(target) => list(&connector, &found, target.limit).await,
        Action::Replay(target) => replay(&connector, &found, target.limit).await,
        Action::Purge(target) => purge(&connector, &found, target.limit).await,
    };
    connector.close().await;
    done.map_err(|error| match error {
        Done::Broker(error) => explain(error, &found, options.module.is_none(), &config),
        Done::Output(failure) => failure,
    })
}

/// Why an action stopped: the broker, or standard output.
enum Done {
    Broker(BrokerError),
    Output(Failure),
}

impl From<BrokerError> for Done {
    fn from(error: BrokerError) -> Self {
        Done::Broker(error)
    }
}

impl From<Failure> for Done {
    fn from(failure: Failure) -> Self {
        Done::Output(failure)
    }
}

/// The queues of `handler` (`service.handler`) as the config names them, for the launcher,
/// which links no service: the service's section (else `[DEFAULT]`) and the default naming.
fn from_config(config: &Config, handler: &str) -> Result<DeadLetterQueues, Failure> {
    let member = parse::member(handler, "handler").map_err(|e| {
        Failure::usage(format!(
            "dead letters of `{handler}`: {e} (`handler` alone needs --start=MODULE)"
        ))
    })?;
    let section = if config.has_section(&member.service) {
        config.section(&member.service)?
    } else {
        config.defaults()
    };
    let (queue, dead) = crate::consume::queue_names(&section, &member.service, &member.name, None)?;
    let Some(dead_letter_queue) = dead else {
        return Err(Failure::config(format!(
            "handler `{handler}` has no farine dead-letter queue (dead_letter_queue = none in {})",
            config.file()
        )));
    };
    let amqp_uri = super::configured_uri(&section)?;
    Ok(DeadLetterQueues {
        service: member.service,
        handler: member.name,
        queue,
        dead_letter_queue,
        amqp_uri,
        connector: crate::runtime::connector_settings(&section)?,
    })
}

/// The failure for a broker error, naming the handler; a dead-letter queue that does not
/// exist gets what to do about it.
fn explain(
    error: BrokerError,
    found: &DeadLetterQueues,
    from_config: bool,
    config: &Config,
) -> Failure {
    let handler = format!("{}.{}", found.service, found.handler);
    let missing = matches!(
        &error,
        BrokerError::NotFound { resource: Resource::Queue(name), .. } if *name == found.dead_letter_queue
    );
    if !missing {
        return Failure::failed(format!("dead letters of `{handler}`: {error}"));
    }
    if from_config {
        Failure::failed(format!(
            "dead letters of `{handler}`: {error}; the name comes from {} ([{}], else [DEFAULT]) and the default naming: queue `<service>.<handler>` unless `<handler>.queue` is set, dead letters in `<queue>.dead`. If the handler's queue is named in the code (#[consume(queue = \"...\")]), or the handler does not exist, run with --start=MODULE: the module's binary knows its handlers",
            config.file(),
            found.service
        ))
    } else {
        Failure::failed(format!(
            "dead letters of `{handler}`: {error}; the service declares it when it starts: has it run against this broker?"
        ))
    }
}

/// Prints the dead letters, which stay in the queue.
async fn list(
    connector: &Connector,
    found: &DeadLetterQueues,
    limit: Option<u64>,
) -> Result<(), Done> {
    let (waiting, letters) = dead_letter::peek(connector, &found.dead_letter_queue, limit).await?;
    if waiting == 0 {
        print_line(&format!("no dead letters in {}", found.dead_letter_queue))?;
        return Ok(());
    }
    let shown = if (letters.len() as u64) < u64::from(waiting) {
        format!(", the first {} shown", letters.len())
    } else {
        String::new()
    };
    print_line(&format!(
        "{waiting} dead letter(s) in {}{shown} (left in the queue)",
        found.dead_letter_queue
    ))?;
    for (index, letter) in letters.iter().enumerate() {
        print_line(&describe(index + 1, letter))?;
    }
    Ok(())
}

async fn replay(
    connector: &Connector,
    found: &DeadLetterQueues,
    limit: Option<u64>,
) -> Result<(), Done> {
    let moved =
        dead_letter::replay(connector, &found.dead_letter_queue, &found.queue, limit).await?;
    print_line(&format!(
        "replayed {moved} dead letter(s) from {} to {}",
        found.dead_letter_queue, found.queue
    ))?;
    Ok(())
}

async fn purge(
    connector: &Connector,
    found: &DeadLetterQueues,
    limit: Option<u64>,
) -> Result<(), Done> {
    let purged = dead_letter::purge(connector, &found.dead_letter_queue, limit).await?;
    print_line(&format!(
        "purged {purged} dead letter(s) from {}",
        found.dead_letter_queue
    ))?;
    Ok(())
}

/// Dead letter number `number` as `list` prints it: a line of when, how often and why, then
/// its error, origin and body, indented.
fn describe(number: usize, letter: &DeadLetter) -> String {
    let when = letter
        .failed_at
        .map_or("at an unknown time".to_string(), |at| {
            format!("at {}", utc(at))
        });
    let attempts = letter
        .attempts
        .map_or("unknown".to_string(), |n| n.to_string());
    let reason = letter
        .reason
        .as_deref()
        .map_or(String::new(), |reason| format!(" ({reason})"));
    let error = letter.error.as_deref().unwrap_or("unknown");
    let exchange = match letter.exchange.as_str() {
        "" => "the default exchange".to_string(),
        name => format!("exchange {name}"),
    };
    // JSON goes without saying; another content type is shown.
    let kind = match letter.content_type.as_deref() {
        None | Some("application/json") => String::new(),
        Some(kind) => format!(" ({kind})"),
    };
    format!(
        "#{number} failed {when}, attempts: {attempts}{reason}\n   error: {}\n   routing key: {} ({exchange})\n   body{kind}: {}",
        error.replace('\n', "\n          "),
        letter.routing_key,
        body_text(&letter.body)
    )
}

/// A body as text on one line: control characters escaped, cut after [`MAX_BODY_CHARS`].
fn body_text(body: &[u8]) -> String {
    if body.is_empty() {
        return "(empty)".to_string();
    }
    let text = String::from_utf8_lossy(body);
    let mut out = String::new();
    for (count, c) in text.chars().enumerate() {
        if count == MAX_BODY_CHARS {
            out.push_str(&format!("... ({} bytes in all)", body.len()));
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// `seconds` since the Unix epoch as a UTC date and time: `2023-11-14 22:13:20 UTC`.
fn utc(seconds: u64) -> String {
    let days = i64::try_from(seconds / 86_400).unwrap_or(i64::MAX / 2);
    let in_day = seconds % 86_400;
    // Howard Hinnant's days-to-civil: the proleptic Gregorian calendar, in eras of 400 years.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        in_day / 3_600,
        in_day % 3_600 / 60,
        in_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_is_printed_as_a_utc_date_and_time() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20 UTC");
        assert_eq!(utc(4_102_444_799), "2099-12-31 23:59:59 UTC");
    }

    #[test]
    fn a_body_is_one_line_cut_when_long() {
        assert_eq!(body_text(br#"{"id":1}"#), r#"{"id":1}"#);
        assert_eq!(body_text(b"a\nb\tc"), r"a\nb\tc");
        assert_eq!(body_text(b""), "(empty)");
        let long = body_text(&[b'x'; 600]);
        assert!(
            long.starts_with(&"x".repeat(MAX_BODY_CHARS))
                && long.ends_with("... (600 bytes in all)"),
            "{long}"
        );
    }

    #[test]
    fn a_dead_letter_is_described_with_its_error_attempts_time_and_origin() {
        let letter = DeadLetter {
            error: Some("no route".into()),
            reason: Some("failed".into()),
            attempts: Some(2),
            failed_at: Some(1_700_000_000),
            exchange: "orders".into(),
            routing_key: "order.created".into(),
            content_type: Some("application/json".into()),
            body: br#"{"id":1}"#.to_vec(),
        };
        assert_eq!(
            describe(1, &letter),
            "#1 failed at 2023-11-14 22:13:20 UTC, attempts: 2 (failed)\n   error: no route\n   routing key: order.created (exchange orders)\n   body: {\"id\":1}"
        );
        let bare = DeadLetter {
            error: None,
            reason: None,
            attempts: None,
            failed_at: None,
            exchange: String::new(),
            routing_key: "q.dead".into(),
            content_type: None,
            body: Vec::new(),
        };
        assert_eq!(
            describe(2, &bare),
            "#2 failed at an unknown time, attempts: unknown\n   error: unknown\n   routing key: q.dead (the default exchange)\n   body: (empty)"
        );
    }

    #[test]
    fn an_action_is_forwarded_with_its_handler_after_the_flags() {
        let action = Action::List(Target {
            handler: "relay.relay".into(),
            limit: Some(2),
            broker: BrokerArgs {
                amqp_uri: Some("amqp://h".into()),
            },
        });
        assert_eq!(
            action.arguments(),
            [
                "dead-letters",
                "list",
                "--limit=2",
                "--amqp-uri=amqp://h",
                "--",
                "relay.relay"
            ]
        );
    }

    #[test]
    fn the_launcher_names_the_queues_from_the_section_else_by_default() {
        let config = Config::from_ini(
            "[DEFAULT]\namqp_uri = amqp://u:p@broker:5672\n[relay]\nrelay.queue = orders\nother.dead_letter_queue = none\n",
            "test.ini",
        )
        .expect("parses");
        let found = from_config(&config, "relay.relay").expect("found");
        assert_eq!(
            (found.queue.as_str(), found.dead_letter_queue.as_str()),
            ("orders", "orders.dead")
        );
        assert_eq!(found.amqp_uri, "amqp://u:p@broker:5672");
        let default = from_config(&config, "billing.charge").expect("found");
        assert_eq!(
            (default.queue.as_str(), default.dead_letter_queue.as_str()),
            ("billing.charge", "billing.charge.dead")
        );
        let none = from_config(&config, "relay.other").unwrap_err();
        assert_eq!(none.code, super::super::EXIT_CONFIG);
        assert!(
            none.message.contains("dead_letter_queue = none"),
            "{}",
            none.message
        );
        let bare = from_config(&config, "relay").unwrap_err();
        assert_eq!(bare.code, super::super::EXIT_USAGE);
    }
}
