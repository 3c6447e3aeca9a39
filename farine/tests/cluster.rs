//! farine on a real three-node RabbitMQ cluster (`scripts/cluster`): a quorum queue's consumer
//! through the hard loss of its node, RPC through a node loss, competing consumers on three
//! nodes. Long, so run by `scripts/cluster-test` (which sets `FARINE_CLUSTER=1`, starts the
//! cluster and stops it); anywhere else each test prints why it is skipped. Each test prints
//! its figures on lines starting with `cluster figures:` (`docs/reliability.md` quotes them).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use farine::config::{Config, ConfigError, Section};
use farine::rpc::{Client, RpcError};
use farine::{Runtime, consume};
use farine_test_support::cluster::{Cluster, ConfirmingPublisher};
use farine_test_support::{unique, wait_until};
use serde_json::{Value, json};

/// A config whose `[service]` section has `amqp_uri` and `options`.
fn config(service: &str, amqp_uri: &str, options: &[(&str, &str)]) -> Config {
    let mut text = format!("[{service}]\namqp_uri = {amqp_uri}\n");
    for (key, value) in options {
        text.push_str(&format!("{key} = {value}\n"));
    }
    Config::from_ini(&text, "test.ini").expect("test config parses")
}

/// A JSON body `{"id": n, "pad": ...}` for each id.
fn bodies(ids: std::ops::Range<u64>) -> Vec<Vec<u8>> {
    ids.map(|id| {
        json!({ "id": id, "pad": "0123456789abcdef" })
            .to_string()
            .into_bytes()
    })
    .collect()
}

// ---------------------------------------------------------------------------------------------

/// What the failover probe handled: calls per id, and when each call began.
#[derive(Default)]
struct Handled {
    calls: HashMap<u64, u32>,
    starts: Vec<Instant>,
}

static FAILOVER: Mutex<Option<Handled>> = Mutex::new(None);

fn failover<T>(read: impl FnOnce(&Handled) -> T) -> T {
    read(
        FAILOVER
            .lock()
            .unwrap()
            .get_or_insert_with(Handled::default),
    )
}

#[derive(Default)]
struct FailoverProbe;

#[farine::service(name = "cluster_failover")]
impl FailoverProbe {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn on_message(&self, body: Value) {
        let started = Instant::now();
        tokio::time::sleep(Duration::from_millis(1)).await;
        let id = body["id"].as_u64().unwrap_or(u64::MAX);
        let mut handled = FAILOVER.lock().unwrap();
        let handled = handled.get_or_insert_with(Handled::default);
        *handled.calls.entry(id).or_default() += 1;
        handled.starts.push(started);
    }
}

/// The pause the cut caused: the longest gap between two consecutive handler starts from `cut`
/// to `until` (when the node was started again), as (first start after the pause) - `cut`, and
/// how many calls began after the cut but before the pause (deliveries that had reached the
/// client before the node died, or a few taken before the queue's new leader was elected).
fn time_to_resume(starts: &[Instant], cut: Instant, until: Instant) -> (Duration, usize) {
    let mut after: Vec<Instant> = starts
        .iter()
        .copied()
        .filter(|s| *s >= cut && *s < until)
        .collect();
    after.sort();
    let mut previous = cut;
    let (mut widest, mut resumed, mut before) = (Duration::ZERO, cut, 0);
    for (index, start) in after.iter().enumerate() {
        if *start - previous > widest {
            (widest, resumed, before) = (*start - previous, *start, index);
        }
        previous = *start;
    }
    (resumed - cut, before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_queue_consumer_loses_nothing_when_its_node_is_killed_and_started_again() {
    const TOTAL: u64 = 10_000;
    const PREFETCH: u64 = 10;
    let Some(cluster) = Cluster::start(
        "a_quorum_queue_consumer_loses_nothing_when_its_node_is_killed_and_started_again",
    ) else {
        return;
    };
    let (exchange, queue) = (unique("failover-x"), unique("failover-q"));
    // The consumer connects to node 1 and declares its quorum queue there (its leader, unless
    // the broker places it elsewhere); the publisher is on node 3, which stays up.
    let config = config(
        "cluster_failover",
        &cluster.uris_from(1),
        &[
            ("on_message.exchange", &exchange),
            ("on_message.queue", &queue),
            ("queue_type", "quorum"),
            ("prefetch_count", &PREFETCH.to_string()),
            ("connect_timeout", "2"),
        ],
    );
    let running = Runtime::new(config)
        .services(["cluster_failover"])
        .start()
        .await
        .expect("starts on node 1");
    let leader = cluster.leader(1, &queue);
    let mut publisher = ConfirmingPublisher::connect(&cluster.uri(3)).await;
    // Paced (100 messages, then 40 ms) so that publishing goes on through the node's loss and
    // after it (a pace, not a wait: every wait below is on a condition).
    static PUBLISHED: AtomicU64 = AtomicU64::new(0);
    let publishing = {
        let exchange = exchange.clone();
        tokio::spawn(async move {
            for start in (0..TOTAL).step_by(100) {
                publisher
                    .publish_all(
                        &exchange,
                        "rk",
                        bodies(start..(start + 100).min(TOTAL)),
                        100,
                    )
                    .await;
                PUBLISHED.store((start + 100).min(TOTAL), Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            publisher.resent
        })
    };
    let distinct = || failover(|h| h.calls.len());

    assert!(
        wait_until(Duration::from_secs(120), || distinct() >= 3_000).await,
        "{} handled before the kill",
        distinct()
    );
    let cut = Instant::now();
    cluster.kill(1).await;
    let before_cut = distinct();
    let published_at_cut = PUBLISHED.load(Ordering::SeqCst);
    assert!(
        wait_until(Duration::from_secs(120), || distinct()
            >= before_cut + 2_000)
        .await,
        "consuming again after node 1 was killed: {} handled",
        distinct()
    );
    let restarted = Instant::now();
    cluster.start_node(1).await;
    let resent = tokio::time::timeout(Duration::from_secs(180), publishing)
        .await
        .expect("every message is published and confirmed within 3 minutes")
        .expect("the publisher ran");
    assert!(
        wait_until(Duration::from_secs(180), || distinct() == TOTAL as usize).await,
        "every message handled: {} of {TOTAL}",
        distinct()
    );
    running.stop().await;
    // Stopping requeues whatever is unacked: an empty queue means every message was acked.
    assert!(
        cluster
            .wait_for_queue(2, &queue, Duration::from_secs(30), |state| state == (0, 0))
            .await,
        "nothing left in the queue: {:?}",
        cluster.queue_state(2, &queue).await
    );

    let (calls, duplicates, (resume, stragglers)) = failover(|h| {
        let calls: u64 = h.calls.values().map(|&c| u64::from(c)).sum();
        let duplicated = h.calls.values().filter(|&&c| c > 1).count();
        (calls, duplicated, time_to_resume(&h.starts, cut, restarted))
    });
    let duplicates_total = calls - TOTAL;
    println!(
        "cluster figures: failover: {TOTAL} messages published with confirms on node 3, \
         consumer on node 1 (quorum queue leader {}), node 1 SIGKILLed after {before_cut} \
         handled ({published_at_cut} published) and started again: all {TOTAL} handled, \
         {duplicates_total} duplicate calls ({duplicates} ids; prefetch {PREFETCH}), {resent} \
         publishes sent again by the publisher, time to resume {} ms ({stragglers} calls \
         began between the kill and the pause)",
        leader.as_deref().unwrap_or("unknown"),
        resume.as_millis()
    );
    assert!(
        duplicates_total <= PREFETCH + resent,
        "{duplicates_total} duplicates for one node loss with prefetch {PREFETCH} and {resent} \
         publishes sent again"
    );
}

// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct RpcProbe;

#[farine::service(name = "cluster_rpc")]
impl RpcProbe {
    #[farine::rpc::method]
    async fn work(&self, n: u64) -> u64 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        n * 2
    }
}

/// One call of the RPC loop: when it began, how long it took, how it ended.
struct Call {
    started: Instant,
    took: Duration,
    outcome: Result<(), RpcError>,
}

/// Calls `work` in a loop on `client` until `stop`, recording each call.
async fn call_loop(
    client: Client,
    stop: &'static AtomicBool,
    next: &'static AtomicU64,
) -> Vec<Call> {
    let mut calls = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let n = next.fetch_add(1, Ordering::SeqCst);
        let started = Instant::now();
        let result = client.call::<u64>("work", (n,)).await;
        let outcome = match result {
            Ok(doubled) => {
                assert_eq!(doubled, n * 2, "the answer to call {n}");
                Ok(())
            }
            Err(error) => Err(error),
        };
        calls.push(Call {
            started,
            took: started.elapsed(),
            outcome,
        });
    }
    calls
}

static RPC_STOP: AtomicBool = AtomicBool::new(false);
static RPC_NEXT: AtomicU64 = AtomicU64::new(0);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_on_a_quorum_queue_keeps_answering_through_the_loss_of_the_servers_node() {
    const TIMEOUT: Duration = Duration::from_secs(15);
    const CALLERS: usize = 4;
    let Some(cluster) = Cluster::start(
        "rpc_on_a_quorum_queue_keeps_answering_through_the_loss_of_the_servers_node",
    ) else {
        return;
    };
    let service = "cluster_rpc";
    let server = Runtime::new(config(
        service,
        &cluster.uris_from(1),
        &[("rpc.queue_type", "quorum"), ("connect_timeout", "2")],
    ))
    .services([service])
    .start()
    .await
    .expect("the server starts on node 1");
    // A client on the server's node (its calls in flight lose their connection with it) and
    // one on node 3 (its connection stays up).
    let on_node = |first| {
        let uris = cluster.uris_from(first);
        async move {
            Client::connect(&uris, service, TIMEOUT)
                .await
                .expect("the client connects")
        }
    };
    let clients = [(1, on_node(1).await), (3, on_node(3).await)];
    let mut loops = Vec::new();
    for (node, client) in &clients {
        for _ in 0..CALLERS {
            let client = client.clone();
            loops.push((*node, tokio::spawn(call_loop(client, &RPC_STOP, &RPC_NEXT))));
        }
    }
    let next = || RPC_NEXT.load(Ordering::SeqCst);
    assert!(wait_until(Duration::from_secs(30), || next() >= 200).await);
    let cut = Instant::now();
    cluster.kill(1).await;
    let at_cut = next();
    // Calls go on: well past those in flight at the cut.
    assert!(
        wait_until(Duration::from_secs(60), || next() >= at_cut + 400).await,
        "calls go on after node 1 was killed"
    );
    cluster.start_node(1).await;
    let after_restart = next();
    assert!(wait_until(Duration::from_secs(60), || next() >= after_restart + 200).await);
    RPC_STOP.store(true, Ordering::SeqCst);

    let mut figures = Vec::new();
    for (node, task) in loops {
        let calls = tokio::time::timeout(TIMEOUT * 2, task)
            .await
            .expect("every caller stops within two timeouts")
            .expect("the caller ran");
        figures.push((node, calls));
    }
    server.stop().await;
    for node in [1, 3] {
        let calls: Vec<&Call> = figures
            .iter()
            .filter(|(n, _)| *n == node)
            .flat_map(|(_, calls)| calls)
            .collect();
        let failed: Vec<&RpcError> = calls
            .iter()
            .filter_map(|c| c.outcome.as_ref().err())
            .collect();
        for error in &failed {
            assert!(
                matches!(error, RpcError::Connection { .. }),
                "a call through the node loss fails only with Connection, not: {error:?}"
            );
        }
        let longest = calls.iter().map(|c| c.took).max().unwrap_or_default();
        assert!(
            longest <= TIMEOUT + Duration::from_secs(2),
            "no call hangs past its {TIMEOUT:?} timeout: the longest took {longest:?}"
        );
        let first_success_after_cut = calls
            .iter()
            .filter(|c| c.started >= cut && c.outcome.is_ok())
            .map(|c| c.started + c.took)
            .min()
            .expect("calls made after the cut succeed");
        let last = calls
            .iter()
            .max_by_key(|c| c.started)
            .expect("calls were made");
        assert!(last.outcome.is_ok(), "the last call succeeded");
        // Lost: in flight on the connection that died; refused: sent while the queue had no
        // leader the broker knew of (nacked, docs/reliability.md).
        let refused = failed
            .iter()
            .filter(|e| e.to_string().contains("nacked"))
            .count();
        println!(
            "cluster figures: rpc: client on node {node}: {} calls, {} failed with Connection \
             ({} lost in flight, {refused} refused at once), longest {} ms (timeout {} s), first \
             answer to a call made after the kill {} ms after it",
            calls.len(),
            failed.len(),
            failed.len() - refused,
            longest.as_millis(),
            TIMEOUT.as_secs(),
            (first_success_after_cut - cut).as_millis()
        );
    }
}

// ---------------------------------------------------------------------------------------------

static COMPETED: Mutex<Vec<(usize, u64)>> = Mutex::new(Vec::new());

/// One instance of the competing consumer; `instance` (its config key) says which.
struct Competitor {
    instance: usize,
}

fn competitor(section: &Section) -> Result<Competitor, ConfigError> {
    Ok(Competitor {
        instance: section.get_or("instance", 0usize)?,
    })
}

#[farine::service(name = "cluster_compete", init = competitor)]
impl Competitor {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn on_message(&self, body: Value) {
        let id = body["id"].as_u64().unwrap_or(u64::MAX);
        COMPETED.lock().unwrap().push((self.instance, id));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_on_three_nodes_share_one_quorum_queue_each_message_handled_once() {
    const TOTAL: u64 = 3_000;
    let Some(cluster) = Cluster::start(
        "three_instances_on_three_nodes_share_one_quorum_queue_each_message_handled_once",
    ) else {
        return;
    };
    let (exchange, queue) = (unique("compete-x"), unique("compete-q"));
    let mut instances = Vec::new();
    for node in 1..=3 {
        let node_text = node.to_string();
        let config = config(
            "cluster_compete",
            &cluster.uris_from(node),
            &[
                ("on_message.exchange", &exchange),
                ("on_message.queue", &queue),
                ("queue_type", "quorum"),
                ("prefetch_count", "10"),
                ("instance", &node_text),
            ],
        );
        instances.push(
            Runtime::new(config)
                .services(["cluster_compete"])
                .start()
                .await
                .unwrap_or_else(|e| panic!("instance {node} starts: {e}")),
        );
    }
    assert!(
        cluster
            .wait_for_queue(
                1,
                &queue,
                Duration::from_secs(30),
                |(_, consumers)| consumers == 3
            )
            .await,
        "three consumers on the queue"
    );
    let started = Instant::now();
    let mut publisher = ConfirmingPublisher::connect(&cluster.uri(2)).await;
    publisher
        .publish_all(&exchange, "rk", bodies(0..TOTAL), 250)
        .await;
    assert!(
        wait_until(Duration::from_secs(120), || COMPETED.lock().unwrap().len()
            >= TOTAL as usize)
        .await,
        "{} of {TOTAL} handled",
        COMPETED.lock().unwrap().len()
    );
    let took = started.elapsed();
    for instance in instances {
        instance.stop().await;
    }
    // The consumers' removal reaches the queue's leader through Raft: wait for it.
    assert!(
        cluster
            .wait_for_queue(1, &queue, Duration::from_secs(30), |state| state == (0, 0))
            .await,
        "nothing left in the queue, no consumer: {:?}",
        cluster.queue_state(1, &queue).await
    );
    let handled = COMPETED.lock().unwrap().clone();
    let mut per_id: HashMap<u64, u32> = HashMap::new();
    let mut per_instance = [0u64; 3];
    for (instance, id) in &handled {
        *per_id.entry(*id).or_default() += 1;
        per_instance[instance - 1] += 1;
    }
    assert_eq!(per_id.len(), TOTAL as usize, "every message handled");
    assert!(
        per_id.values().all(|&c| c == 1),
        "each exactly once: {} calls for {TOTAL} messages",
        handled.len()
    );
    println!(
        "cluster figures: competing consumers: {TOTAL} messages on one quorum queue, instances \
         on nodes 1, 2, 3 handled {} / {} / {} in {} ms, none twice",
        per_instance[0],
        per_instance[1],
        per_instance[2],
        took.as_millis()
    );
    assert!(
        per_instance.iter().all(|&n| n > 0),
        "each instance handled some: {per_instance:?}"
    );
}
