//! A stream consumer under the test kit, as a user's test would write it: the in-memory broker
//! keeps the stream's log, numbers its messages and lets a failed one be retried in place, with
//! time that passes at once under `start_paused`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use farine::testing::TestBroker;
use farine::{StreamOffset, consume};
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize)]
struct Numbered {
    n: u64,
}

/// What the reader handled: n -> (offset, calls).
static HANDLED: Mutex<BTreeMap<u64, (u64, u32)>> = Mutex::new(BTreeMap::new());

#[derive(Default)]
struct Reader;

#[farine::service(name = "kit_stream_reader")]
impl Reader {
    #[consume(exchange = "events", routing_key = "rk")]
    async fn read(&self, body: Numbered, offset: StreamOffset) -> Result<(), String> {
        let mut handled = HANDLED.lock().unwrap();
        let entry = handled.entry(body.n).or_insert((offset.0, 0));
        entry.1 += 1;
        if body.n == 1 {
            return Err("one is refused".to_string());
        }
        Ok(())
    }
}

const INI: &str = "\
[kit_stream_reader]
max_attempts = 3
retry_delay = 30
read.exchange_type = direct
read.queue = kit.events
read.queue_type = stream
read.start_from = first
";

#[tokio::test(start_paused = true)]
async fn a_stream_reader_gets_every_offset_and_retries_a_failure_in_place() {
    let kit = TestBroker::new();
    let running = kit
        .start(INI)
        .services(["kit_stream_reader"])
        .start()
        .await
        .expect("the reader starts on the in-memory broker");
    for n in 0..3 {
        kit.publish("events", "rk", &json!({ "n": n }))
            .await
            .expect("the stream takes it");
    }
    // Two retries 30 s apart pass at once; then the failed message is copied aside.
    kit.wait_settled("kit.events", Duration::from_secs(600))
        .await;
    assert_eq!(
        *HANDLED.lock().unwrap(),
        BTreeMap::from([(0, (0, 1)), (1, (1, 3)), (2, (2, 1))]),
        "n -> (offset, calls)"
    );
    let dead = kit.dead_letters("kit.events.dead");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason.as_deref(), Some("failed"));
    assert_eq!(dead[0].body, br#"{"n":1}"#);
    // Read, and still in the stream.
    let depth = kit.queue("kit.events").expect("the stream exists");
    assert_eq!((depth.ready, depth.unacked, depth.consumers), (0, 0, 1));
    running.stop().await;
}
