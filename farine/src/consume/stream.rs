//! `queue_type = stream`: a `#[consume]` handler reading a RabbitMQ stream queue, a catch-up
//! subscription as photon-pump's (`docs/consuming.md`, "Stream queues").
//!
//! A stream keeps its messages: reading does not remove them, and each consumer reads from a
//! position of its own, given at `basic.consume` by the argument `x-stream-offset`. The broker
//! numbers the messages (header `x-stream-offset`), so the consumer knows where it is:
//! - the first start reads from `start_from` (`first`, `last`, `next`, an offset, or an RFC 3339
//!   time);
//! - then it resumes after the last message handled: kept in memory across restarts of the
//!   task (a lost connection), and in the service's database (table `farine_checkpoint`, as an
//!   SSE listener's position) across restarts of the process. Over AMQP 0-9-1 RabbitMQ keeps
//!   no position for a consumer (its offset tracking is the stream protocol's);
//! - up to `prefetch_count` messages are handled at once, so the position saved is the one
//!   below which every message is done: a message still in flight at a stop is read again at
//!   the next start. With `inbox = true` a message is handled once even across a crash.
//!
//! Nothing can be put back into a stream: a failed message is retried in place, after
//! `retry_delay`, up to `max_attempts` calls, then copied to the dead-letter queue; the
//! position moves past it either way. Acks only give the consumer credit.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use lapin::types::{AMQPValue, FieldTable};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Call, Companions, ConsumerPlan, observe, settle};
use crate::amqp::message::Message;
use crate::config::{ConfigError, HandlerSection};
use crate::db::checkpoint::Checkpoint;
use crate::handler::{FromCall, Outcome, Rejection};
use crate::observe::metrics::MessageOutcome;

/// The header in which the broker gives each message's offset in the stream.
const OFFSET_HEADER: &str = "x-stream-offset";

/// Where a stream consumer starts when no position was kept (`start_from`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StartFrom {
    /// The oldest message the stream still holds.
    First,
    /// The last chunk of messages written (a few of the latest messages).
    Last,
    /// Only messages written after the consumer started (the default).
    Next,
    /// The message at this offset, and on.
    Offset(u64),
    /// The messages written from this time on (seconds since the epoch; RabbitMQ finds the
    /// chunk, so a few earlier ones may come too).
    Timestamp(u64),
}

impl StartFrom {
    fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        Some(match text.to_ascii_lowercase().as_str() {
            "first" => StartFrom::First,
            "last" => StartFrom::Last,
            "next" => StartFrom::Next,
            _ if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) => {
                StartFrom::Offset(text.parse().ok()?)
            }
            _ => StartFrom::Timestamp(rfc3339_seconds(text)?),
        })
    }

    /// Its `x-stream-offset` consumer argument.
    fn argument(self) -> AMQPValue {
        match self {
            StartFrom::First => AMQPValue::LongString("first".into()),
            StartFrom::Last => AMQPValue::LongString("last".into()),
            StartFrom::Next => AMQPValue::LongString("next".into()),
            StartFrom::Offset(offset) => {
                AMQPValue::LongLongInt(i64::try_from(offset).unwrap_or(i64::MAX))
            }
            StartFrom::Timestamp(seconds) => AMQPValue::Timestamp(seconds),
        }
    }
}

impl std::fmt::Display for StartFrom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartFrom::First => f.write_str("first"),
            StartFrom::Last => f.write_str("last"),
            StartFrom::Next => f.write_str("next"),
            StartFrom::Offset(offset) => write!(f, "offset {offset}"),
            StartFrom::Timestamp(seconds) => write!(f, "{seconds} s after the epoch"),
        }
    }
}

/// Seconds since the epoch of an RFC 3339 time (`2026-12-05T10:00:00Z`, `...+01:00`; a
/// fraction of a second is dropped).
fn rfc3339_seconds(text: &str) -> Option<u64> {
    /// The number of exactly `digits` ASCII digits.
    fn number(part: &str, digits: usize) -> Option<i64> {
        (part.len() == digits && part.bytes().all(|b| b.is_ascii_digit()))
            .then(|| part.parse().ok())
            .flatten()
    }
    let (date, time) = text.split_once(['T', 't', ' '])?;
    let mut date_parts = date.splitn(3, '-');
    let (year, month, day) = (
        number(date_parts.next()?, 4)?,
        number(date_parts.next()?, 2)?,
        number(date_parts.next()?, 2)?,
    );
    let (clock, offset) = if let Some(clock) = time.strip_suffix(['Z', 'z']) {
        (clock, 0)
    } else {
        let at = time.rfind(['+', '-'])?;
        let (clock, zone) = time.split_at(at);
        let (hours, minutes) = zone[1..].split_once(':')?;
        let (hours, minutes) = (number(hours, 2)?, number(minutes, 2)?);
        if hours > 23 || minutes > 59 {
            return None;
        }
        let minutes = hours * 60 + minutes;
        (
            clock,
            if zone.starts_with('-') {
                -minutes
            } else {
                minutes
            },
        )
    };
    let clock = match clock.split_once('.') {
        Some((whole, fraction))
            if !fraction.is_empty() && fraction.bytes().all(|b| b.is_ascii_digit()) =>
        {
            whole
        }
        Some(_) => return None,
        None => clock,
    };
    let mut clock_parts = clock.splitn(3, ':');
    let (hour, minute, second) = (
        number(clock_parts.next()?, 2)?,
        number(clock_parts.next()?, 2)?,
        number(clock_parts.next()?, 2)?,
    );
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days_in_month = match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        1..=12 => 31,
        _ => return None,
    };
    if !(1..=days_in_month).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    // Days since 1970-01-01 of a date in the proleptic Gregorian calendar (H. Hinnant).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    let seconds = days * 86_400 + hour * 3_600 + minute * 60 + second - offset * 60;
    u64::try_from(seconds).ok()
}

/// A stream consumer's settings (`queue_type = stream`), and its position.
#[derive(Debug, Clone)]
pub(crate) struct StreamPlan {
    pub start_from: StartFrom,
    /// `checkpoint = false`: the position is not saved in the database.
    pub use_checkpoint: bool,
    pub position: Position,
}

impl StreamPlan {
    /// `<handler>.start_from` and `checkpoint` of a stream consumer; `<handler>.start_from` or
    /// `<handler>.checkpoint` of any other is an error (it has no position). `start_from` is
    /// read for the handler only: the service's is its SSE listeners', whose values mean
    /// something else (`beginning`, an event id).
    pub fn from_config(
        handler: &HandlerSection<'_>,
        stream: bool,
    ) -> Result<Option<Self>, ConfigError> {
        let scoped = |key: &str| format!("{}.{key}", handler.handler());
        if !stream {
            for key in ["start_from", "checkpoint"] {
                if let Some(text) = handler.get_own_str(key)? {
                    return Err(handler.section().invalid(
                        &scoped(key),
                        &text,
                        format!("no {key}: only a stream queue (queue_type = stream) is read from a position"),
                    ));
                }
            }
            return Ok(None);
        }
        let start_from = match handler.get_own_str("start_from")? {
            None => StartFrom::Next,
            Some(text) => StartFrom::parse(&text).ok_or_else(|| {
                handler.section().invalid(
                    &scoped("start_from"),
                    &text,
                    "first, last, next, an offset (a whole number) or an RFC 3339 time (2026-12-05T10:00:00Z)",
                )
            })?,
        };
        Ok(Some(Self {
            start_from,
            use_checkpoint: handler.get_or("checkpoint", true)?,
            position: Position::default(),
        }))
    }
}

/// The offset of a message in its stream queue, as a `#[consume]` parameter: the broker's
/// `x-stream-offset` header. A message from any other queue has none: asking for it is a
/// rejection (the message is dead-lettered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamOffset(pub u64);

impl FromCall<Message> for StreamOffset {
    fn from_call(message: &Message) -> Result<Self, Rejection> {
        offset_of(message).map(StreamOffset).ok_or_else(|| {
            Rejection::new(
                "the message has no x-stream-offset: it was not read from a stream queue",
            )
        })
    }
}

/// The offset the broker gave `message`, if it came from a stream.
pub(super) fn offset_of(message: &Message) -> Option<u64> {
    match message.header(OFFSET_HEADER)? {
        AMQPValue::LongLongInt(n) => u64::try_from(n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(n)),
        AMQPValue::Timestamp(n) => Some(n),
        _ => None,
    }
}

/// Where a stream consumer resumes: in memory across runs of its task, in the database (when
/// the service has one) across processes.
#[derive(Debug, Clone, Default)]
pub(crate) struct Position {
    /// The offset to resume at, once a run has ended.
    next: Arc<Mutex<Option<u64>>>,
    /// When the first run of this process started at `next` or `last` (seconds since the
    /// epoch): a later run that has no offset yet (nothing came) starts from then, not from
    /// the stream's end again, which would skip what came meanwhile.
    opened_at: Arc<Mutex<Option<u64>>>,
    checkpoint: Option<Checkpoint>,
}

impl Position {
    pub fn with_checkpoint(checkpoint: Checkpoint) -> Self {
        Self {
            checkpoint: Some(checkpoint),
            ..Self::default()
        }
    }

    /// The consumer argument of this run, and the offset below which deliveries are skipped
    /// (the broker starts at the chunk that holds the offset asked for).
    async fn start(
        &self,
        plan: &ConsumerPlan,
        stream: &StreamPlan,
    ) -> Result<(FieldTable, u64), String> {
        let mut from = self.next.lock().ok().and_then(|next| *next);
        if from.is_none()
            && let Some(checkpoint) = &self.checkpoint
            && let Some(saved) = tokio::time::timeout(plan.op_timeout, checkpoint.load())
                .await
                .map_err(|_| format!("no answer within {:?}", plan.op_timeout))?
                .map_err(|e| e.to_string())?
        {
            from = parse_saved(&saved, &plan.queue.name);
            if from.is_none() {
                tracing::warn!(
                    service = plan.service,
                    handler = plan.handler,
                    saved = %saved,
                    queue = %plan.queue.name,
                    start_from = %stream.start_from,
                    "the checkpoint is not one of this stream: starting from start_from"
                );
            }
        }
        let start = match (from, stream.start_from) {
            (Some(offset), _) => StartFrom::Offset(offset),
            (None, StartFrom::Next | StartFrom::Last) => {
                let mut opened = self.opened_at.lock().map_err(|e| e.to_string())?;
                match *opened {
                    // A second before, for the clock's granularity: a duplicate rather than
                    // a message lost.
                    Some(at) => StartFrom::Timestamp(at.saturating_sub(1)),
                    None => {
                        *opened = Some(
                            std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .map_or(0, |since| since.as_secs()),
                        );
                        stream.start_from
                    }
                }
            }
            (None, start_from) => start_from,
        };
        let skip_below = match start {
            StartFrom::Offset(offset) => offset,
            _ => 0,
        };
        let mut arguments = FieldTable::default();
        arguments.insert(OFFSET_HEADER.into(), start.argument());
        tracing::debug!(service = plan.service, handler = plan.handler, start = %start, "reading the stream");
        Ok((arguments, skip_below))
    }

    /// Keeps `next` as where the next run starts, and saves it.
    async fn keep(&self, plan: &ConsumerPlan, next: u64) {
        if let Ok(mut kept) = self.next.lock() {
            *kept = Some(next);
        }
        self.save(plan, next).await;
    }

    async fn save(&self, plan: &ConsumerPlan, next: u64) {
        let Some(checkpoint) = &self.checkpoint else {
            return;
        };
        let position = format!("{}@{next}", plan.queue.name);
        let saved = tokio::time::timeout(plan.op_timeout, checkpoint.save(&position)).await;
        if let Some(e) = match saved {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no answer within {:?}", plan.op_timeout)),
        } {
            // The next save carries the position further; a restart meanwhile reads again
            // what was handled since the last save (handled once with the inbox).
            tracing::warn!(service = plan.service, handler = plan.handler, error = %e, "could not save the stream's position");
        }
    }
}

/// The offset of a saved position `<queue>@<offset>`, if it is one of `queue`.
fn parse_saved(saved: &str, queue: &str) -> Option<u64> {
    let (of, offset) = saved.rsplit_once('@')?;
    (of == queue).then(|| offset.parse().ok()).flatten()
}

/// The offsets of one run: those in flight, and from where a new run resumes.
pub(crate) struct Run {
    track: Mutex<Track>,
    /// Where to resume, each time it moves: the checkpoint writer follows it.
    resume: watch::Sender<Option<u64>>,
    skip_below: u64,
    /// Deliveries skipped because they are below `skip_below`.
    skipped: std::sync::atomic::AtomicU64,
}

/// Skipped deliveries past which a run warns: more than a chunk's worth means the position
/// is far ahead of the stream (deleted and declared again, say).
const SKIPPED_WARNING: u64 = 10_000;

#[derive(Default)]
struct Track {
    in_flight: BTreeSet<u64>,
    /// One past the highest offset taken.
    end: Option<u64>,
}

impl Track {
    fn resume_at(&self) -> Option<u64> {
        self.in_flight.first().copied().or(self.end)
    }
}

/// What to do with a delivery from the stream.
pub(crate) enum Admit {
    /// Handle it: its offset (`None`: a message without one, which does not move the
    /// position).
    Handle(Option<u64>),
    /// Already handled (before the position started): only ack it.
    Skip,
}

impl Run {
    /// Opens the run: the arguments of its `basic.consume`.
    pub async fn open(
        plan: &ConsumerPlan,
        stream: &StreamPlan,
    ) -> Result<(Arc<Self>, FieldTable), String> {
        let (arguments, skip_below) = stream.position.start(plan, stream).await?;
        let run = Arc::new(Self {
            track: Mutex::default(),
            resume: watch::Sender::new(None),
            skip_below,
            skipped: std::sync::atomic::AtomicU64::new(0),
        });
        Ok((run, arguments))
    }

    /// Takes a delivery: its offset, to handle, or a skip.
    pub fn admit(&self, plan: &ConsumerPlan, message: &Message) -> Admit {
        let Some(offset) = offset_of(message) else {
            return Admit::Handle(None);
        };
        if offset < self.skip_below {
            let skipped = self
                .skipped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1;
            if skipped == SKIPPED_WARNING {
                tracing::warn!(
                    service = plan.service,
                    handler = plan.handler,
                    queue = %plan.queue.name,
                    position = self.skip_below,
                    offset,
                    "{SKIPPED_WARNING} messages skipped below the saved position: if the stream was deleted and declared again, delete the handler's row of farine_checkpoint (with the service stopped) to read it from start_from"
                );
            }
            return Admit::Skip;
        }
        if let Ok(mut track) = self.track.lock() {
            track.in_flight.insert(offset);
            track.end = Some(track.end.map_or(offset + 1, |end| end.max(offset + 1)));
        }
        Admit::Handle(Some(offset))
    }

    /// `offset` is done (handled, or dead-lettered).
    fn done(&self, offset: u64) {
        let resume = match self.track.lock() {
            Ok(mut track) => {
                track.in_flight.remove(&offset);
                track.resume_at()
            }
            Err(_) => return,
        };
        // Forward only: two handlers finishing at once may get here out of order.
        self.resume.send_if_modified(|current| {
            let moved = resume > *current;
            if moved {
                *current = resume;
            }
            moved
        });
    }

    /// Saves the position each time it moves, until `stop` (a save under way is finished
    /// first, so that it cannot land after the last).
    pub fn checkpoint_writer(
        self: &Arc<Self>,
        plan: Arc<ConsumerPlan>,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let mut moved = self.resume.subscribe();
        tokio::spawn(async move {
            let Some(stream) = &plan.stream else { return };
            loop {
                tokio::select! {
                    biased;
                    () = stop.cancelled() => return,
                    changed = moved.changed() => if changed.is_err() { return },
                }
                let next = *moved.borrow_and_update();
                if let Some(next) = next {
                    stream.position.save(&plan, next).await;
                }
            }
        })
    }

    /// Ends the run: where the next starts (below the messages still in flight, which are
    /// read again), kept and saved.
    pub async fn close(&self, plan: &ConsumerPlan) {
        let resume = self.track.lock().ok().and_then(|track| track.resume_at());
        if let (Some(stream), Some(next)) = (&plan.stream, resume) {
            stream.position.keep(plan, next).await;
        }
    }
}

/// Handles one message of the stream at `offset`: retried in place on failure, then
/// dead-lettered; the offset is done when the message is, and not when the process stops
/// first (it is read again at the next start).
pub(crate) async fn handle(
    plan: Arc<ConsumerPlan>,
    message: Message,
    offset: Option<u64>,
    call: Call,
    run: Arc<Run>,
    companions: Arc<Companions>,
    shutdown: CancellationToken,
) {
    let mut attempt = 1;
    let mut handled: BoxFuture<'static, Outcome> = call(message.clone());
    loop {
        let (outcome, observed) = observe(&plan, &message, handled).await;
        if let Outcome::Failed(error) = &outcome
            && attempt < plan.max_attempts
            && !message.is_settled()
        {
            tracing::warn!(
                service = plan.service,
                handler = plan.handler,
                offset = offset.unwrap_or_default(),
                attempt,
                error = %error,
                retry_in = ?plan.retry_delay,
                "handler failed: the stream's message will be retried in place"
            );
            observed.end(&plan, MessageOutcome::Retry);
            tokio::select! {
                () = tokio::time::sleep(plan.retry_delay) => {}
                // Not done: read again at the next start.
                () = shutdown.cancelled() => return,
            }
            attempt += 1;
            handled = call(message.clone());
            continue;
        }
        let settled = settle(&plan, &message, outcome, attempt, &companions, &shutdown).await;
        observed.end(&plan, settled);
        // A dead letter whose copy the stop interrupted is not done: read again at the next
        // start.
        if settled != MessageOutcome::Retry
            && let Some(offset) = offset
        {
            run.done(offset);
        }
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_from_reads_names_offsets_and_rfc3339_times() {
        assert_eq!(StartFrom::parse("first"), Some(StartFrom::First));
        assert_eq!(StartFrom::parse(" Last "), Some(StartFrom::Last));
        assert_eq!(StartFrom::parse("next"), Some(StartFrom::Next));
        assert_eq!(StartFrom::parse("900"), Some(StartFrom::Offset(900)));
        assert_eq!(
            StartFrom::parse("1970-01-01T00:00:00Z"),
            Some(StartFrom::Timestamp(0))
        );
        assert_eq!(
            StartFrom::parse("2026-12-05T10:00:00Z"),
            Some(StartFrom::Timestamp(1_796_464_800))
        );
        assert_eq!(
            StartFrom::parse("2026-12-05T11:30:00.250+01:30"),
            Some(StartFrom::Timestamp(1_796_464_800))
        );
        assert_eq!(
            StartFrom::parse("2024-02-29t10:00:00z"),
            Some(StartFrom::Timestamp(1_709_200_800))
        );
        assert_eq!(
            StartFrom::parse("2000-02-29T23:59:59-00:00"),
            Some(StartFrom::Timestamp(951_868_799))
        );
        for wrong in [
            "",
            "beginning",
            "-5",
            "2026-13-01T00:00:00Z",
            "2026-12-05",
            "12:00",
        ] {
            assert_eq!(StartFrom::parse(wrong), None, "{wrong:?}");
        }
    }

    #[test]
    fn the_argument_is_a_name_a_long_or_a_timestamp() {
        assert_eq!(
            StartFrom::First.argument(),
            AMQPValue::LongString("first".into())
        );
        assert_eq!(StartFrom::Offset(7).argument(), AMQPValue::LongLongInt(7));
        assert_eq!(StartFrom::Timestamp(9).argument(), AMQPValue::Timestamp(9));
    }

    #[test]
    fn the_position_a_run_saves_only_moves_forward() {
        let run = Run {
            track: Mutex::default(),
            resume: watch::Sender::new(None),
            skip_below: 0,
            skipped: std::sync::atomic::AtomicU64::new(0),
        };
        {
            let mut track = run.track.lock().unwrap();
            for offset in [10, 11, 12] {
                track.in_flight.insert(offset);
                track.end = Some(offset + 1);
            }
        }
        run.done(11);
        assert_eq!(*run.resume.borrow(), Some(10), "10 is still in flight");
        run.done(10);
        assert_eq!(*run.resume.borrow(), Some(12));
        // A later position already sent (by a handler that finished after) is not undone.
        run.resume.send_replace(Some(20));
        run.done(12);
        assert_eq!(*run.resume.borrow(), Some(20));
    }

    #[tokio::test]
    async fn a_run_after_one_that_saw_no_offset_starts_from_when_the_first_began_not_next() {
        let config =
            crate::config::Config::from_ini("[svc]\nread.queue_type = stream\n", "test.ini")
                .unwrap();
        let spec = super::super::ConsumeSpec {
            exchange: "x",
            routing_key: "rk",
            queue: None,
        };
        let section = config.section("svc").unwrap();
        let plan = ConsumerPlan::from_config("svc", "read", &spec, &section).unwrap();
        let stream = plan.stream.clone().unwrap();
        assert_eq!(stream.start_from, StartFrom::Next);
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let (first, _) = stream.position.start(&plan, &stream).await.unwrap();
        assert_eq!(
            first.inner()[OFFSET_HEADER],
            AMQPValue::LongString("next".into())
        );
        let (second, _) = stream.position.start(&plan, &stream).await.unwrap();
        let AMQPValue::Timestamp(at) = second.inner()[OFFSET_HEADER] else {
            panic!("{second:?}");
        };
        assert!(at + 1 >= before && at < before + 2, "{at} against {before}");
        // Once a run has an offset, the next starts there.
        stream.position.keep(&plan, 42).await;
        let (third, skip_below) = stream.position.start(&plan, &stream).await.unwrap();
        assert_eq!(third.inner()[OFFSET_HEADER], AMQPValue::LongLongInt(42));
        assert_eq!(skip_below, 42);
    }

    #[test]
    fn a_saved_position_counts_only_for_its_own_stream() {
        assert_eq!(parse_saved("orders.events@401", "orders.events"), Some(401));
        assert_eq!(parse_saved("a@b@7", "a@b"), Some(7));
        assert_eq!(parse_saved("other@401", "orders.events"), None);
        assert_eq!(parse_saved("orders.events@x", "orders.events"), None);
    }

    #[test]
    fn the_run_resumes_below_the_messages_in_flight() {
        let mut track = Track::default();
        assert_eq!(track.resume_at(), None);
        for offset in [10, 11, 12] {
            track.in_flight.insert(offset);
            track.end = Some(offset + 1);
        }
        track.in_flight.remove(&11);
        assert_eq!(track.resume_at(), Some(10));
        track.in_flight.remove(&10);
        assert_eq!(track.resume_at(), Some(12));
        track.in_flight.remove(&12);
        assert_eq!(track.resume_at(), Some(13));
    }
}
