//! In-process event streams for `#[stream::http]` handlers: an endpoint `memory://<name>` reads
//! the feed of that name instead of an HTTP server. The test kit sends events into a feed; the
//! handler's task reads it as it reads a server's stream, Last-Event-ID included: a reader that
//! names an id gets the events after it (all of them for `0` or an id the feed never sent), a
//! reader without one gets what is sent from then on.

#![cfg_attr(not(feature = "testing"), allow(dead_code))]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use eventsource_client as es;
use futures_util::stream::BoxStream;
use tokio::sync::watch;

/// A named, in-process event stream with its history.
#[derive(Clone)]
pub struct Feed {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    state: Mutex<State>,
    /// Bumped on every change: a reader waits on it.
    changed: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    /// Every event sent, each with its `lastEventId` at the time it was sent.
    events: Vec<es::Event>,
    /// The id set last (an event without an id carries it on).
    last_id: Option<String>,
    /// Ends the streams open now (a disconnect); readers opened later are not affected.
    generation: u64,
    /// Readers open now.
    readers: usize,
}

static FEEDS: Mutex<Option<HashMap<String, Weak<Inner>>>> = Mutex::new(None);

impl Feed {
    /// The feed named `name`, made when no feed of that name is alive.
    pub fn named(name: &str) -> Self {
        let mut feeds = FEEDS.lock().unwrap_or_else(|e| e.into_inner());
        let feeds = feeds.get_or_insert_with(HashMap::new);
        feeds.retain(|_, feed| feed.strong_count() > 0);
        if let Some(inner) = feeds.get(name).and_then(Weak::upgrade) {
            return Self { inner };
        }
        let inner = Arc::new(Inner {
            name: name.to_string(),
            state: Mutex::default(),
            changed: watch::channel(0).0,
        });
        feeds.insert(name.to_string(), Arc::downgrade(&inner));
        Self { inner }
    }

    /// The feed's name (its endpoint is `memory://<name>`).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The endpoint a handler reads this feed from.
    pub fn endpoint(&self) -> String {
        format!("memory://{}", self.inner.name)
    }

    /// Sends an event: `id` (none: the id of the event before), its type (`message` when
    /// empty) and data.
    pub fn send(&self, id: Option<&str>, event_type: &str, data: &str) {
        self.change(|state| {
            if let Some(id) = id {
                state.last_id = Some(id.to_string());
            }
            state.events.push(es::Event {
                event_type: if event_type.is_empty() {
                    "message".to_string()
                } else {
                    event_type.to_string()
                },
                data: data.to_string(),
                id: state.last_id.clone(),
                retry: None,
            });
        });
    }

    /// Ends the streams open now, as a server that drops its connections: their handlers
    /// reconnect with the id of the last event they finished.
    pub fn disconnect(&self) {
        self.change(|state| state.generation += 1);
    }

    /// How many handlers read the feed now.
    pub fn readers(&self) -> usize {
        self.lock().readers
    }

    /// Waits until at least `n` handlers read the feed.
    pub async fn wait_for_readers(&self, n: usize) {
        let mut changed = self.inner.changed.subscribe();
        while self.readers() < n {
            if changed.changed().await.is_err() {
                return;
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn change(&self, change: impl FnOnce(&mut State)) {
        change(&mut self.lock());
        self.inner.changed.send_modify(|n| *n += 1);
    }

    /// A reader's stream, from after `last_event_id` (see the module's documentation).
    pub(crate) fn read(&self, last_event_id: Option<&str>) -> BoxStream<'static, es::Event> {
        let (next, generation) = {
            let mut state = self.lock();
            state.readers += 1;
            let next = match last_event_id {
                None => state.events.len(),
                Some(id) => state
                    .events
                    .iter()
                    .rposition(|event| event.id.as_deref() == Some(id))
                    .map_or(0, |at| {
                        // After the last event carrying that id (events without an id of
                        // their own carry it too).
                        at + 1
                    }),
            };
            (next, state.generation)
        };
        self.inner.changed.send_modify(|n| *n += 1);
        let reader = Reader { feed: self.clone() };
        let changed = self.inner.changed.subscribe();
        Box::pin(futures_util::stream::unfold(
            (reader, changed, next),
            move |(reader, mut changed, mut next)| async move {
                loop {
                    {
                        let state = reader.feed.lock();
                        if state.generation != generation {
                            return None;
                        }
                        if let Some(event) = state.events.get(next) {
                            next += 1;
                            let event = event.clone();
                            drop(state);
                            return Some((event, (reader, changed, next)));
                        }
                    }
                    if changed.changed().await.is_err() {
                        return None;
                    }
                }
            },
        ))
    }
}

/// Counts a reader while its stream lives.
struct Reader {
    feed: Feed,
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.feed
            .change(|state| state.readers = state.readers.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn data(events: &[es::Event]) -> Vec<&str> {
        events.iter().map(|e| e.data.as_str()).collect()
    }

    #[tokio::test]
    async fn a_reader_resumes_after_the_id_it_names_and_a_live_reader_sees_only_what_follows() {
        let feed = Feed::named("feed-resume-test");
        feed.send(Some("1"), "", "a");
        feed.send(None, "tick", "b");
        feed.send(Some("2"), "", "c");
        let mut from_start = feed.read(Some("0"));
        let mut after_one = feed.read(Some("1"));
        let mut live = feed.read(None);
        assert_eq!(feed.readers(), 3);
        feed.send(Some("3"), "", "d");
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(from_start.next().await.unwrap());
        }
        assert_eq!(data(&got), ["a", "b", "c", "d"]);
        assert_eq!(
            got[1].id.as_deref(),
            Some("1"),
            "an event without an id carries the last"
        );
        assert_eq!(got[1].event_type, "tick");
        assert_eq!(after_one.next().await.unwrap().data, "c");
        assert_eq!(live.next().await.unwrap().data, "d");
        feed.disconnect();
        assert!(
            live.next().await.is_none(),
            "a disconnect ends the open streams"
        );
        drop((from_start, after_one, live));
        assert_eq!(feed.readers(), 0);
    }
}
