//! The roles the benchmark runs in a process of their own, so that their memory and start-up
//! are theirs alone: `farine-bench child <role> ...`. Each prints `result key=value ...` lines.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use farine::Runtime;
use farine::config::Config;

use crate::services::{CONSUME_TARGET, CONSUMED_ALL};

fn config(text: String) -> Config {
    Config::from_ini(&crate::observed(text), "bench.ini").expect("the bench config parses")
}

pub fn run(args: &[String], main_started: Instant) {
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    // W2C runs both sides on tokio's current-thread runtime (farine's `runtime =
    // current_thread`), everything else on the multi-thread one.
    let runtime = if arg(0).starts_with("w2c-") {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    }
    .expect("a tokio runtime");
    match arg(0).as_str() {
        "w2c-farine" | "w2c-raw" | "w2c-rawwire" => {
            runtime.block_on(w2c(&arg(0)[4..], &arg(1), arg(2).parse().expect("a count")))
        }
        "w1-farine" => runtime.block_on(w1_farine(&arg(1), &arg(2), &arg(3), &arg(4), &arg(5))),
        "w1-raw" => runtime.block_on(async {
            let n: usize = arg(3).parse().expect("a count");
            let elapsed =
                crate::raw::drain(&arg(1), &arg(2), n, arg(4).parse().expect("prefetch")).await;
            println!(
                "result elapsed_us={} peak_rss_kib={} cpu_us={}",
                elapsed.as_micros(),
                peak_rss_kib(),
                cpu_us()
            );
        }),
        "idle" => runtime.block_on(idle(&arg(1), &arg(2))),
        "startup" => startup(runtime, &arg(1), main_started),
        other => panic!("unknown child role `{other}`"),
    }
}

async fn w1_farine(uri: &str, exchange: &str, queue: &str, n: &str, prefetch: &str) {
    let n: usize = n.parse().expect("a count");
    CONSUME_TARGET.store(n, Ordering::Relaxed);
    let config = config(format!(
        "[bench_consumer]\namqp_uri = {uri}\nexchange_type = topic\nprefetch_count = {prefetch}\non_order.exchange = {exchange}\non_order.queue = {queue}\n"
    ));
    let started = Instant::now();
    let running = Runtime::new(config)
        .services(["bench_consumer"])
        .start()
        .await
        .expect("the consumer starts");
    CONSUMED_ALL.notified().await;
    let elapsed = started.elapsed();
    running.stop().await;
    println!(
        "result elapsed_us={} peak_rss_kib={} cpu_us={}",
        elapsed.as_micros(),
        peak_rss_kib(),
        cpu_us()
    );
}

/// This process's peak resident set (`VmHWM`), in KiB.
/// CPU this process used so far (user and system), in µs.
fn cpu_us() -> u64 {
    // SAFETY: zeroed rusage is a valid out-parameter.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    micros(usage.ru_utime) + micros(usage.ru_stime)
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn idle(uri: &str, sse_url: &str) {
    let config = config(format!(
        "[bench_idle]\namqp_uri = {uri}\nendpoint = {sse_url}\n\n[bench_echo]\namqp_uri = {uri}\n"
    ));
    let running = Runtime::new(config)
        .services(["bench_idle"])
        .start()
        .await
        .expect("the idle service starts");
    println!("result ready=1");
    let _ = running.run_until_signal().await;
}

/// Start-up of a service with five handlers: the time from `main` to every handler consuming,
/// and from the broker connection being open to every handler consuming.
fn startup(runtime: tokio::runtime::Runtime, uri: &str, main_started: Instant) {
    use tracing_subscriber::layer::SubscriberExt;
    let connected = Arc::new(Mutex::new(None));
    let subscriber = tracing_subscriber::registry().with(ConnectedAt(connected.clone()));
    let _ = tracing::subscriber::set_global_default(subscriber);
    let config = config(format!("[bench_startup]\namqp_uri = {uri}\n"));
    runtime.block_on(async {
        let running = Runtime::new(config)
            .services(["bench_startup"])
            .start()
            .await
            .expect("starts");
        let consuming = Instant::now();
        let connected = connected.lock().unwrap().unwrap_or(main_started);
        println!(
            "result total_us={} after_connect_us={}",
            (consuming - main_started).as_micros(),
            (consuming - connected).as_micros()
        );
        tokio::time::timeout(Duration::from_secs(10), running.stop())
            .await
            .expect("stops");
    });
}

/// Records when farine logs that the connection is open.
struct ConnectedAt(Arc<Mutex<Option<Instant>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for ConnectedAt {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        if message.0 == "connected to AMQP broker"
            && let Ok(mut slot) = self.0.lock()
        {
            slot.get_or_insert_with(Instant::now);
        }
    }
}

/// W2C: `n` sequential echo calls, client and server in this process on a current-thread
/// runtime, through farine or hand-written lapin; prints p50 and p99 in µs.
async fn w2c(side: &str, uri: &str, n: usize) {
    use serde_json::{Value, json};
    let payload = json!({"text": "hello", "n": 1});
    let mut latencies = Vec::with_capacity(n);
    let cpu_before;
    if side == "farine" {
        let config = config(format!(
            "[bench_echo]\namqp_uri = {uri}\nprefetch_count = 64\n"
        ));
        let server = Runtime::new(config)
            .services(["bench_echo"])
            .start()
            .await
            .expect("the echo service starts");
        let client = farine::rpc::Client::connect(uri, "bench_echo", Duration::from_secs(30))
            .await
            .expect("the client connects");
        for _ in 0..200 {
            client
                .call::<Value>("echo", (&payload,))
                .await
                .expect("echo");
        }
        cpu_before = cpu_us();
        for _ in 0..n {
            let started = Instant::now();
            client
                .call::<Value>("echo", (&payload,))
                .await
                .expect("echo");
            latencies.push(started.elapsed().as_secs_f64() * 1e6);
        }
        server.stop().await;
    } else {
        let wire = if side == "rawwire" {
            crate::raw::Wire::Farine
        } else {
            crate::raw::Wire::Minimal
        };
        let server = crate::raw::EchoServer::start(uri, 64, wire).await;
        let (client, _conn) = crate::raw::EchoClient::connect(uri, &server).await;
        for _ in 0..200 {
            client.echo(&payload).await;
        }
        cpu_before = cpu_us();
        for _ in 0..n {
            let started = Instant::now();
            client.echo(&payload).await;
            latencies.push(started.elapsed().as_secs_f64() * 1e6);
        }
    }
    let cpu = cpu_us() - cpu_before;
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((n as f64 * q) as usize).min(n - 1)];
    println!(
        "result p50_us={:.1} p99_us={:.1} cpu_us={cpu}",
        at(0.5),
        at(0.99)
    );
}
