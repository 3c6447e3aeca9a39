//! farine-bench: the same workloads with farine and with a raw lapin baseline written here, in
//! the same run against the local broker, alternating, and the ratio farine/raw of each.
//!
//! `scripts/bench` runs it (`cargo run --release -p farine-bench -- [--runs N] [--scale F]
//! [--only W1,W2,...]`); `BENCHMARKS.md` explains the workloads and shows a run.

mod child;
mod raw;
mod services;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use farine::Runtime;
use farine::config::Config;
use farine::rpc::Client;
use futures_util::StreamExt;
use lapin::options::{
    BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ExchangeKind};
use serde_json::{Value, json};

const W1_EXCHANGE: &str = "farine-bench.w1";
const W4_EXCHANGE: &str = "farine-bench.w4";
const W4_QUEUE: &str = "farine-bench.w4";

struct Options {
    runs: usize,
    scale: f64,
    only: Option<Vec<String>>,
    uri: String,
}

impl Options {
    fn wants(&self, workload: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|w| w.eq_ignore_ascii_case(workload)))
    }

    fn count(&self, n: usize) -> usize {
        ((n as f64 * self.scale) as usize).max(1)
    }
}

/// A bench service's config `text` (one section), with metrics and tracing off when
/// `FARINE_BENCH_OBSERVE=off`: the cost of both is that run's ratio against the default one.
pub(crate) fn observed(text: String) -> String {
    match std::env::var("FARINE_BENCH_OBSERVE").as_deref() {
        Ok("off") => format!("{}\nmetrics = false\ntracing = false\n", text.trim_end()),
        _ => text,
    }
}

fn main() {
    let main_started = Instant::now();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("child") {
        child::run(&args[1..], main_started);
        return;
    }
    let mut options = Options {
        runs: 3,
        scale: 1.0,
        only: None,
        uri: farine_test_support::default_vhost_uri(),
    };
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let mut value = || rest.next().cloned().unwrap_or_default();
        match arg.as_str() {
            "--runs" => options.runs = value().parse().expect("--runs N"),
            "--scale" => options.scale = value().parse().expect("--scale F"),
            "--only" => options.only = Some(value().split(',').map(str::to_string).collect()),
            other => {
                eprintln!(
                    "usage: farine-bench [--runs N] [--scale F] [--only W1,W2,W2C,W3,W3W,W4,MEM,START] (unknown: {other})"
                );
                std::process::exit(2);
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(orchestrate(options));
}

/// One measurement of one side.
#[derive(Clone, Copy)]
struct Sample {
    /// The workload's figure (messages or calls per second; latency in µs).
    value: f64,
    /// Broker CPU over the measurement, in cores.
    broker_cpu: f64,
    /// Peak RSS of the process measured, in KiB (W1 only).
    peak_rss_kib: Option<u64>,
    /// CPU of the measured process (client and server sides) per operation, in µs.
    cpu_us_per_op: f64,
}

#[derive(Default)]
struct Row {
    name: String,
    unit: &'static str,
    /// Lower is better (latencies).
    lower_is_better: bool,
    farine: Vec<Sample>,
    raw: Vec<Sample>,
}

async fn orchestrate(options: Options) {
    println!(
        "farine-bench: {} run(s) per workload and side, scale {}, broker {}",
        options.runs,
        options.scale,
        farine::__private::redact_uri(&options.uri)
    );
    let admin = raw::connect(&options.uri).await;
    let mut rows: Vec<Row> = Vec::new();

    if options.wants("W1") {
        rows.push(w1(&options, &admin).await);
    }
    if options.wants("W2") || options.wants("W3") || options.wants("W3W") {
        rows.extend(rpc(&options).await);
    }
    if options.wants("W2C") {
        rows.extend(w2c(&options));
    }
    if options.wants("W4") {
        rows.extend(w4(&options, &admin).await);
    }
    print_table(&rows);
    if options.wants("MEM") {
        idle_memory(&options).await;
    }
    if options.wants("START") {
        startup(&options);
    }
    clean_up(&admin).await;
    let _ = admin.close(200, "done".into()).await;
}

/// Deletes what the benchmark's services declared on the broker.
async fn clean_up(admin: &Connection) {
    let queues = [
        "bench_echo",
        raw::FARINE_WIRE_EXCHANGE,
        "bench_idle",
        "bench_idle.on_message",
        "bench_startup",
        "bench_startup.first",
        "bench_startup.second",
        "bench_startup.third",
    ];
    for queue in queues {
        delete_queues(admin, queue).await;
    }
    let channel = admin.create_channel().await.expect("a channel");
    for exchange in [
        W1_EXCHANGE,
        W4_EXCHANGE,
        "farine-bench.idle",
        "farine-bench.startup",
        "bench_echo",
        raw::FARINE_WIRE_EXCHANGE,
        "bench_idle",
        "bench_startup",
    ] {
        let _ = channel
            .exchange_delete(exchange.into(), Default::default())
            .await;
    }
    let _ = channel.close(200, "done".into()).await;
}

// --- measurement helpers ----------------------------------------------------------------------

/// CPU seconds the broker (beam.smp) used so far, if it runs on this machine.
fn broker_cpu_seconds() -> Option<f64> {
    let entries = std::fs::read_dir("/proc").ok()?;
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut total = None;
    for entry in entries.flatten() {
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim() != "beam.smp" {
            continue;
        }
        let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let (utime, stime): (f64, f64) =
            (fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?);
        *total.get_or_insert(0.0) += (utime + stime) / ticks;
    }
    total
}

/// CPU seconds this process used so far (user and system).
fn own_cpu_seconds() -> f64 {
    // SAFETY: zeroed rusage is a valid out-parameter.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Context switches of this process's threads so far (from /proc, all threads).
fn own_switches() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter_map(|line| {
                    line.strip_prefix("voluntary_ctxt_switches:")
                        .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                })
                .collect::<Vec<_>>()
        })
        .sum()
}

/// Runs `work`, returning its result, the wall time and the broker's CPU over it (cores).
async fn measured<T>(work: impl std::future::Future<Output = T>) -> (T, Duration, f64) {
    let cpu = broker_cpu_seconds();
    let started = Instant::now();
    let out = work.await;
    let wall = started.elapsed();
    let used = match (cpu, broker_cpu_seconds()) {
        (Some(before), Some(after)) => (after - before) / wall.as_secs_f64(),
        _ => f64::NAN,
    };
    (out, wall, used)
}

fn order(id: usize) -> Value {
    // About 120 bytes of JSON.
    json!({
        "id": id,
        "kind": "order.created",
        "customer": format!("c-{id:07}"),
        "amount": 123.45,
        "currency": "EUR",
        "note": "farine benchmark payload",
    })
}

async fn declare_queue(
    conn: &Connection,
    queue: &str,
    exchange: &str,
    key: &str,
    kind: ExchangeKind,
) {
    let channel = conn.create_channel().await.expect("a channel");
    channel
        .exchange_declare(
            exchange.into(),
            kind,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("exchange");
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("queue");
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    let _ = channel.close(200, "done".into()).await;
}

async fn delete_queues(conn: &Connection, queue: &str) {
    let channel = conn.create_channel().await.expect("a channel");
    for name in [
        queue.to_string(),
        format!("{queue}.retry"),
        format!("{queue}.dead"),
    ] {
        let _ = channel
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = channel.close(200, "done".into()).await;
}

async fn ready_count(conn: &Connection, queue: &str) -> u32 {
    let channel = conn.create_channel().await.expect("a channel");
    let count = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the queue exists")
        .message_count();
    let _ = channel.close(200, "done".into()).await;
    count
}

/// Fills `queue` (through `exchange`) with `n` persistent orders, 2000 confirms in flight.
async fn prefill(conn: &Connection, exchange: &str, n: usize) {
    let channel = raw::confirm_channel(conn).await;
    let sends = futures_util::stream::iter(0..n).map(|id| {
        let channel = channel.clone();
        async move {
            let body = serde_json::to_vec(&order(id)).expect("JSON");
            channel
                .basic_publish(
                    exchange.into(),
                    "order.created".into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default()
                        .with_content_type("application/json".into())
                        .with_delivery_mode(2),
                )
                .await
                .expect("published")
                .await
                .expect("confirmed")
        }
    });
    sends.buffer_unordered(2000).for_each(|_| async {}).await;
    let _ = channel.close(200, "done".into()).await;
}

/// Runs a child role; returns its `result` fields.
fn run_child(args: &[&str]) -> Vec<(String, String)> {
    let exe = std::env::current_exe().expect("this binary");
    let output = Command::new(exe)
        .arg("child")
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("the child runs");
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "child {args:?} failed ({}): {out}",
        output.status
    );
    parse_result(&out)
}

fn parse_result(out: &str) -> Vec<(String, String)> {
    out.lines()
        .filter_map(|line| line.strip_prefix("result "))
        .flat_map(|fields| fields.split_whitespace())
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn field(fields: &[(String, String)], name: &str) -> f64 {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("the child reported no {name}: {fields:?}"))
}

// --- W1: consume-drain --------------------------------------------------------------------------

async fn w1(options: &Options, admin: &Connection) -> Row {
    let n = options.count(100_000);
    let mut row = Row {
        name: format!("W1 consume-drain, {n} persistent msgs, prefetch 100"),
        unit: "msg/s",
        ..Default::default()
    };
    for run in 0..options.runs {
        for side in sides(run) {
            let queue = format!("farine-bench.w1.{side}.{run}.{}", std::process::id());
            declare_queue(
                admin,
                &queue,
                W1_EXCHANGE,
                "order.created",
                ExchangeKind::Topic,
            )
            .await;
            prefill(admin, W1_EXCHANGE, n).await;
            // The exchange may route to other benches' queues too: wait for ours only.
            while (ready_count(admin, &queue).await as usize) < n {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let n_text = n.to_string();
            let role = if side == "farine" {
                "w1-farine"
            } else {
                "w1-raw"
            };
            let args: Vec<&str> = if side == "farine" {
                vec![role, &options.uri, W1_EXCHANGE, &queue, &n_text, "100"]
            } else {
                vec![role, &options.uri, &queue, &n_text, "100"]
            };
            let (fields, _, cpu) = measured(async {
                let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
                tokio::task::spawn_blocking(move || {
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    run_child(&args)
                })
                .await
                .expect("the child ran")
            })
            .await;
            let elapsed = field(&fields, "elapsed_us") / 1e6;
            let rss = field(&fields, "peak_rss_kib") as u64;
            assert_eq!(
                ready_count(admin, &queue).await,
                0,
                "{side} drained the queue, every message acked"
            );
            delete_queues(admin, &queue).await;
            let sample = Sample {
                value: n as f64 / elapsed,
                broker_cpu: cpu,
                peak_rss_kib: Some(rss),
                cpu_us_per_op: field(&fields, "cpu_us") / n as f64,
            };
            eprintln!(
                "  W1 run {run} {side}: {:.0} msg/s, peak RSS {} KiB, broker {:.2} cores",
                sample.value, rss, cpu
            );
            push(&mut row, side, sample);
        }
    }
    row
}

/// W2C: W2's sequential calls with each side alone in a process of its own on tokio's
/// current-thread runtime (farine with `runtime = current_thread`), the sides alternating run
/// by run, each run's sides `rounds` processes each, alternating.
fn w2c(options: &Options) -> Vec<Row> {
    let n = options.count(5_000);
    let mut p50 = Row {
        name: format!("W2C RPC latency, current-thread runtime, {n} sequential calls: p50"),
        unit: "µs",
        lower_is_better: true,
        ..Default::default()
    };
    let mut p99 = Row {
        name: "W2C RPC latency, current-thread runtime: p99".into(),
        unit: "µs",
        lower_is_better: true,
        ..Default::default()
    };
    let n_text = n.to_string();
    for run in 0..options.runs {
        for side in sides(run) {
            let role = if side == "farine" {
                "w2c-farine"
            } else {
                "w2c-raw"
            };
            let fields = run_child(&[role, &options.uri, &n_text]);
            let cpu_us_per_op = field(&fields, "cpu_us") / n as f64;
            let (median, tail) = (field(&fields, "p50_us"), field(&fields, "p99_us"));
            eprintln!("  W2C run {run} {side}: p50 {median:.0} µs, p99 {tail:.0} µs");
            let sample = |value| Sample {
                value,
                broker_cpu: 0.0,
                peak_rss_kib: None,
                cpu_us_per_op,
            };
            push(&mut p50, side, sample(median));
            push(&mut p99, side, sample(tail));
        }
    }
    vec![p50, p99]
}

fn sides(run: usize) -> [&'static str; 2] {
    // Alternate who goes first, so that neither side always meets a warmer broker.
    if run.is_multiple_of(2) {
        ["farine", "raw"]
    } else {
        ["raw", "farine"]
    }
}

fn push(row: &mut Row, side: &str, sample: Sample) {
    if side == "farine" {
        row.farine.push(sample);
    } else {
        row.raw.push(sample);
    }
}

// --- W2, W3: RPC ---------------------------------------------------------------------------------

/// What one side did over the blocks of one run.
#[derive(Default)]
struct Tally {
    wall: Duration,
    broker_cpu_seconds: f64,
    /// CPU time of this process (client and server sides of the workload).
    own_cpu_seconds: f64,
    /// Context switches of this process's threads.
    switches: u64,
    latencies_us: Vec<f64>,
}

impl Tally {
    fn broker_cores(&self) -> f64 {
        self.broker_cpu_seconds / self.wall.as_secs_f64()
    }

    /// This process's CPU per operation, in µs.
    fn cpu_us_per_op(&self, operations: usize) -> f64 {
        self.own_cpu_seconds * 1e6 / operations as f64
    }

    fn rate(&self, operations: usize) -> f64 {
        operations as f64 / self.wall.as_secs_f64()
    }

    fn percentile(&mut self, q: f64) -> f64 {
        self.latencies_us.sort_by(f64::total_cmp);
        let index =
            ((self.latencies_us.len() as f64 * q) as usize).min(self.latencies_us.len() - 1);
        self.latencies_us[index]
    }
}

/// One run of a workload of `total` operations, in blocks of `block` that alternate between
/// the sides (A B B A ...), so that both meet the same broker, disk and neighbours; `work(side,
/// count)` does `count` operations on a side (0: farine, 1: raw) and returns their latencies,
/// if it measures them.
async fn interleaved<F, Fut>(total: usize, block: usize, mut work: F) -> [Tally; 2]
where
    F: FnMut(usize, usize) -> Fut,
    Fut: std::future::Future<Output = Vec<f64>>,
{
    let mut tallies = [Tally::default(), Tally::default()];
    let blocks = total.div_ceil(block);
    for index in 0..blocks {
        let count = block.min(total - index * block);
        let order = if index % 2 == 0 { [0, 1] } else { [1, 0] };
        // FARINE_BENCH_SIDE=farine|raw runs one side only (for profiling).
        let only = std::env::var("FARINE_BENCH_SIDE").ok();
        for side in order {
            if only.as_deref().is_some_and(|only| only != SIDES[side]) {
                continue;
            }
            let (cpu, switches) = (own_cpu_seconds(), own_switches());
            let (latencies, wall, cores) = measured(work(side, count)).await;
            let tally = &mut tallies[side];
            tally.own_cpu_seconds += own_cpu_seconds() - cpu;
            tally.switches += own_switches() - switches;
            tally.wall += wall;
            tally.broker_cpu_seconds += cores * wall.as_secs_f64();
            tally.latencies_us.extend(latencies);
        }
    }
    tallies
}

fn sample(value: f64, tally: &Tally, operations: usize) -> Sample {
    Sample {
        value,
        broker_cpu: tally.broker_cores(),
        peak_rss_kib: None,
        cpu_us_per_op: tally.cpu_us_per_op(operations),
    }
}

async fn rpc(options: &Options) -> Vec<Row> {
    let config = Config::from_ini(
        &observed(format!(
            "[bench_echo]\namqp_uri = {}\nprefetch_count = 64\n",
            options.uri
        )),
        "bench.ini",
    )
    .expect("config");
    let server = Runtime::new(config)
        .services(["bench_echo"])
        .start()
        .await
        .expect("the echo service starts");
    let client = Client::connect(&options.uri, "bench_echo", Duration::from_secs(30))
        .await
        .expect("the client connects");
    let raw_server = raw::EchoServer::start(&options.uri, 64, raw::Wire::Minimal).await;
    let (raw_client, raw_conn) = raw::EchoClient::connect(&options.uri, &raw_server).await;
    // W3W: the same hand-written RPC sending farine's messages (properties, routing).
    let wire_server = raw::EchoServer::start(&options.uri, 64, raw::Wire::Farine).await;
    let (wire_client, wire_conn) = raw::EchoClient::connect(&options.uri, &wire_server).await;
    let payload = json!({"text": "hello", "n": 1});
    // Warm both paths up (channels, reply queues).
    for _ in 0..200 {
        client
            .call::<Value>("echo", (&payload,))
            .await
            .expect("echo");
        raw_client.echo(&payload).await;
        wire_client.echo(&payload).await;
    }
    // Side 0: farine; 1: raw lapin; 2: raw lapin sending farine's messages.
    let call = {
        let (client, payload) = (client.clone(), payload.clone());
        let (raw_client, wire_client) = (raw_client.clone(), wire_client.clone());
        move |side: usize| {
            let (client, payload) = (client.clone(), payload.clone());
            let raw_client = if side == 2 {
                wire_client.clone()
            } else {
                raw_client.clone()
            };
            async move {
                if side == 0 {
                    client
                        .call::<Value>("echo", (&payload,))
                        .await
                        .expect("echo");
                } else {
                    raw_client.echo(&payload).await;
                }
            }
        }
    };
    // 64 tasks making `count` calls between them on `side`.
    let concurrently = |side: usize, count: usize| {
        let call = call.clone();
        async move {
            let workers = (0..64).map(|_| {
                let call = call.clone();
                tokio::spawn(async move {
                    for _ in 0..count / 64 {
                        call(side).await;
                    }
                })
            });
            for worker in futures_util::future::join_all(workers).await {
                worker.expect("a worker");
            }
            Vec::new()
        }
    };

    let sequential = options.count(5_000);
    let concurrent = options.count(50_000) / 64 * 64;
    let row = |name: String, unit, lower_is_better| Row {
        name,
        unit,
        lower_is_better,
        ..Default::default()
    };
    let mut p50 = row(
        format!("W2 RPC latency, {sequential} sequential calls: p50"),
        "µs",
        true,
    );
    let mut p99 = row("W2 RPC latency: p99".into(), "µs", true);
    let mut rate = row("W2 RPC sequential".into(), "calls/s", false);
    let mut w3 = row(
        format!("W3 RPC throughput, {concurrent} calls, 64 in flight"),
        "calls/s",
        false,
    );
    let mut w3w = row(
        "W3W as W3, raw lapin sending farine's messages".into(),
        "calls/s",
        false,
    );
    for run in 0..options.runs {
        if options.wants("W2") {
            let tallies = interleaved(sequential, 250, |side, count| {
                let call = call.clone();
                async move {
                    let mut latencies = Vec::with_capacity(count);
                    for _ in 0..count {
                        let started = Instant::now();
                        call(side).await;
                        latencies.push(started.elapsed().as_secs_f64() * 1e6);
                    }
                    latencies
                }
            })
            .await;
            for (side, mut tally) in tallies.into_iter().enumerate() {
                let name = SIDES[side];
                let (median, tail) = (tally.percentile(0.5), tally.percentile(0.99));
                eprintln!(
                    "  W2 run {run} {name}: p50 {median:.0} µs, p99 {tail:.0} µs, {:.0} calls/s, {:.1} µs CPU per call in this process",
                    tally.rate(sequential),
                    tally.cpu_us_per_op(sequential)
                );
                push(&mut p50, name, sample(median, &tally, sequential));
                push(&mut p99, name, sample(tail, &tally, sequential));
                push(
                    &mut rate,
                    name,
                    sample(tally.rate(sequential), &tally, sequential),
                );
            }
        }
        for (name, raw_side, row) in [("W3", 1, &mut w3), ("W3W", 2, &mut w3w)] {
            if !options.wants(name) {
                continue;
            }
            let tallies = interleaved(concurrent, 64 * 160, |side, count| {
                concurrently(if side == 0 { 0 } else { raw_side }, count)
            })
            .await;
            for (side, tally) in tallies.iter().enumerate() {
                eprintln!(
                    "  {name} run {run} {}: {:.0} calls/s, broker {:.2} cores, {:.1} µs CPU per call in this process, {:.1} context switches per call",
                    SIDES[side],
                    tally.rate(concurrent),
                    tally.broker_cores(),
                    tally.cpu_us_per_op(concurrent),
                    tally.switches as f64 / concurrent as f64
                );
                push(
                    row,
                    SIDES[side],
                    sample(tally.rate(concurrent), tally, concurrent),
                );
            }
        }
    }
    server.stop().await;
    raw_server.stop().await;
    wire_server.stop().await;
    let _ = raw_conn.close(200, "done".into()).await;
    let _ = wire_conn.close(200, "done".into()).await;
    [p50, p99, rate, w3, w3w]
        .into_iter()
        .filter(|row| !row.farine.is_empty())
        .collect()
}

const SIDES: [&str; 2] = ["farine", "raw"];

// --- W4: publish ---------------------------------------------------------------------------------

async fn w4(options: &Options, admin: &Connection) -> Vec<Row> {
    let n = options.count(100_000);
    declare_queue(admin, W4_QUEUE, W4_EXCHANGE, "w4", ExchangeKind::Direct).await;
    let config = Config::from_ini(
        &observed(format!("[bench_publisher]\namqp_uri = {}\n", options.uri)),
        "bench.ini",
    )
    .expect("config");
    let running = Runtime::new(config)
        .services(["bench_publisher"])
        .start()
        .await
        .expect("the publisher starts");
    let raw_conn = raw::connect(&options.uri).await;
    let raw_channel = raw::confirm_channel(&raw_conn).await;
    let window = 1000;
    let mut one = Row {
        name: format!("W4 publish {n}, awaiting each confirm"),
        unit: "msg/s",
        ..Default::default()
    };
    let mut many = Row {
        name: format!("W4 publish {n}, {window} in flight"),
        unit: "msg/s",
        ..Default::default()
    };
    let publisher = Arc::new(services::BenchPublisher);
    let publish = |side: usize, id: usize| {
        let (publisher, raw_channel) = (publisher.clone(), raw_channel.clone());
        async move {
            if side == 0 {
                publisher.send(&order(id)).await.expect("published");
            } else {
                raw::publish_confirmed(&raw_channel, W4_EXCHANGE, &order(id)).await;
            }
        }
    };
    for run in 0..options.runs {
        let tallies = interleaved(n, 2_000, |side, count| async move {
            for id in 0..count {
                publish(side, id).await;
            }
            purge(admin).await;
            Vec::new()
        })
        .await;
        for (side, tally) in tallies.iter().enumerate() {
            eprintln!(
                "  W4 run {run} {} (each): {:.0} msg/s, broker {:.2} cores",
                SIDES[side],
                tally.rate(n),
                tally.broker_cores()
            );
            push(&mut one, SIDES[side], sample(tally.rate(n), tally, n));
        }
        let tallies = interleaved(n, 20_000, |side, count| async move {
            let sends = futures_util::stream::iter(0..count).map(|id| publish(side, id));
            sends.buffer_unordered(window).for_each(|()| async {}).await;
            purge(admin).await;
            Vec::new()
        })
        .await;
        for (side, tally) in tallies.iter().enumerate() {
            eprintln!(
                "  W4 run {run} {} (in flight): {:.0} msg/s, broker {:.2} cores",
                SIDES[side],
                tally.rate(n),
                tally.broker_cores()
            );
            push(&mut many, SIDES[side], sample(tally.rate(n), tally, n));
        }
    }
    running.stop().await;
    let _ = raw_conn.close(200, "done".into()).await;
    let channel = admin.create_channel().await.expect("a channel");
    let _ = channel
        .queue_delete(W4_QUEUE.into(), QueueDeleteOptions::default())
        .await;
    vec![one, many]
}

/// Empties the W4 queue (inside a block's time: both sides pay it alike).
async fn purge(admin: &Connection) {
    let channel = admin.create_channel().await.expect("a channel");
    let _ = channel
        .queue_purge(W4_QUEUE.into(), QueuePurgeOptions::default())
        .await;
    let _ = channel.close(200, "done".into()).await;
}

// --- memory and start-up --------------------------------------------------------------------------

async fn idle_memory(options: &Options) {
    let sse = farine_test_support::sse::SseServer::start(0, &[]).await;
    let exe = std::env::current_exe().expect("this binary");
    let mut child = Command::new(exe)
        .args(["child", "idle", &options.uri, &sse.url()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("the idle child starts");
    let stdout = child.stdout.take().expect("stdout");
    let ready = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|line| line.contains("ready=1"))
    })
    .await
    .expect("read");
    assert!(ready, "the idle service started");
    // Let the handlers settle into their idle state, then read the resident set.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .map(|v| v.trim().to_string())
        .unwrap_or_default();
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let _ = child.wait();
    println!(
        "\nIdle service with one handler of each kind (consume, publish, rpc method, rpc client, execute, stream::http): RSS {rss}"
    );
}

fn startup(options: &Options) {
    let mut totals = Vec::new();
    let mut after = Vec::new();
    for _ in 0..options.runs.max(3) {
        let fields = run_child(&["startup", &options.uri]);
        totals.push(field(&fields, "total_us") / 1000.0);
        after.push(field(&fields, "after_connect_us") / 1000.0);
    }
    let (t, a) = (stats(&totals), stats(&after));
    println!(
        "Start-up, service with five handlers (3 consume, 1 rpc, 1 publish): main to consuming {:.1} ms ({:.1}-{:.1}); connection open to consuming {:.1} ms ({:.1}-{:.1})",
        t.0, t.1, t.2, a.0, a.1, a.2
    );
}

// --- the table ---------------------------------------------------------------------------------

/// Median, min, max.
fn stats(values: &[f64]) -> (f64, f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let median = if sorted.is_empty() {
        f64::NAN
    } else if sorted.len() % 2 == 1 {
        sorted[sorted.len() / 2]
    } else {
        (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2]) / 2.0
    };
    (
        median,
        *sorted.first().unwrap_or(&f64::NAN),
        *sorted.last().unwrap_or(&f64::NAN),
    )
}

fn print_table(rows: &[Row]) {
    println!(
        "\n| workload | unit | farine median (min-max) | raw lapin median (min-max) | farine/raw | farine/raw per run: median (min-max) | broker CPU, cores (farine / raw) | client+server CPU per op, µs (farine / raw) |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for row in rows {
        let f = stats(&row.farine.iter().map(|s| s.value).collect::<Vec<_>>());
        let r = stats(&row.raw.iter().map(|s| s.value).collect::<Vec<_>>());
        let fc = stats(&row.farine.iter().map(|s| s.broker_cpu).collect::<Vec<_>>());
        let rc = stats(&row.raw.iter().map(|s| s.broker_cpu).collect::<Vec<_>>());
        let fo = stats(
            &row.farine
                .iter()
                .map(|s| s.cpu_us_per_op)
                .collect::<Vec<_>>(),
        );
        let ro = stats(&row.raw.iter().map(|s| s.cpu_us_per_op).collect::<Vec<_>>());
        let ratio = f.0 / r.0;
        let ratio = if row.lower_is_better {
            format!("{ratio:.2}x the latency")
        } else {
            format!("{ratio:.2}")
        };
        // The sides of a run met the same machine (they alternate within it), so the ratio of
        // each run is the steadier figure when the machine's speed drifts between runs.
        let per_run = stats(
            &row.farine
                .iter()
                .zip(&row.raw)
                .map(|(f, r)| f.value / r.value)
                .collect::<Vec<_>>(),
        );
        println!(
            "| {} | {} | {:.0} ({:.0}-{:.0}) | {:.0} ({:.0}-{:.0}) | {ratio} | {:.2} ({:.2}-{:.2}) | {:.2} / {:.2} | {:.1} / {:.1} |",
            row.name,
            row.unit,
            f.0,
            f.1,
            f.2,
            r.0,
            r.1,
            r.2,
            per_run.0,
            per_run.1,
            per_run.2,
            fc.0,
            rc.0,
            fo.0,
            ro.0
        );
    }
    for row in rows {
        let rss = |samples: &[Sample]| {
            stats(
                &samples
                    .iter()
                    .filter_map(|s| s.peak_rss_kib)
                    .map(|k| k as f64 / 1024.0)
                    .collect::<Vec<_>>(),
            )
        };
        if row.farine.iter().any(|s| s.peak_rss_kib.is_some()) {
            let (f, r) = (rss(&row.farine), rss(&row.raw));
            println!(
                "\nPeak RSS of the W1 consumer process: farine {:.1} MiB ({:.1}-{:.1}), raw lapin {:.1} MiB ({:.1}-{:.1})",
                f.0, f.1, f.2, r.0, r.1, r.2
            );
        }
    }
}
