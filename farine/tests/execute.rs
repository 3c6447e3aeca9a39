//! `#[execute]` and the supervision of every handler kind: runs, restarts with backoff,
//! shutdown, and the restart-intensity limit.

mod common;

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::BOUND;
use farine::config::Config;
use farine::{RunError, Runtime, Shutdown, execute};
use farine_test_support::{Broker, wait_until};

fn config(broker: &Broker, service: &str, options: &str) -> Config {
    let text = format!("[{service}]\namqp_uri = {}\n{options}", broker.uri());
    Config::from_ini(&text, "test.ini").unwrap()
}

static RUNS: AtomicUsize = AtomicUsize::new(0);

#[derive(Default)]
struct Repeated;

#[farine::service(name = "exec_repeated")]
impl Repeated {
    #[execute]
    async fn run(&self) {
        RUNS.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_that_returns_is_run_again_after_the_interval() {
    let broker = Broker::connect().await;
    let started = Instant::now();
    let running = Runtime::new(config(&broker, "exec_repeated", "interval = 50ms\n"))
        .services(["exec_repeated"])
        .start()
        .await
        .expect("starts");
    assert!(wait_until(BOUND, || RUNS.load(Ordering::SeqCst) >= 3).await);
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "runs 50 ms apart"
    );
    running.stop().await;
}

static ONCE: AtomicUsize = AtomicUsize::new(0);

#[derive(Default)]
struct Once;

#[farine::service(name = "exec_once")]
impl Once {
    #[execute]
    async fn run(&self) -> Result<(), String> {
        ONCE.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    // A second handler keeps the service alive, so the test can observe the first stays done.
    #[execute]
    async fn idle(&self, shutdown: Shutdown) {
        shutdown.cancelled().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_restart_false_a_method_runs_once() {
    let broker = Broker::connect().await;
    let running = Runtime::new(config(&broker, "exec_once", "run.restart = false\n"))
        .services(["exec_once"])
        .start()
        .await
        .expect("starts");
    assert!(wait_until(BOUND, || ONCE.load(Ordering::SeqCst) == 1).await);
    running.stop().await;
    assert_eq!(ONCE.load(Ordering::SeqCst), 1);
}

static FAILED_AT: Mutex<Vec<Instant>> = Mutex::new(Vec::new());

#[derive(Default)]
struct Failing;

#[farine::service(name = "exec_failing")]
impl Failing {
    #[execute]
    async fn run(&self) -> Result<(), String> {
        FAILED_AT.lock().unwrap().push(Instant::now());
        Err("always fails".into())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_method_is_restarted_after_a_delay_that_doubles_up_to_restart_delay_max() {
    let broker = Broker::connect().await;
    let options = "restart_delay = 100ms\nrestart_delay_max = 400ms\nmax_restarts = 100\n";
    let running = Runtime::new(config(&broker, "exec_failing", options))
        .services(["exec_failing"])
        .start()
        .await
        .expect("starts");
    // Uncapped, the eight runs would take 12.7 s; capped, 2.3 s.
    assert!(
        wait_until(Duration::from_secs(30), || FAILED_AT.lock().unwrap().len()
            >= 8)
        .await
    );
    running.stop().await;
    let at = FAILED_AT.lock().unwrap().clone();
    let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).take(7).collect();
    let least = [100, 200, 400, 400, 400, 400, 400].map(Duration::from_millis);
    for (gap, least) in gaps.iter().zip(least) {
        assert!(*gap >= least, "each restart waits its delay: {gaps:?}");
    }
    // Without the cap the last gaps would be 0.8, 1.6, 3.2 and 6.4 s.
    for gap in &gaps[3..] {
        assert!(
            *gap < Duration::from_secs(2),
            "the delay stops growing at restart_delay_max: {gaps:?}"
        );
    }
}

static SAW_SHUTDOWN: AtomicUsize = AtomicUsize::new(0);

#[derive(Default)]
struct Patient;

#[farine::service(name = "exec_patient")]
impl Patient {
    #[execute]
    async fn wait(&self, shutdown: Shutdown) {
        shutdown.cancelled().await;
        SAW_SHUTDOWN.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_observes_shutdown_and_ends_cleanly() {
    let broker = Broker::connect().await;
    let running = Runtime::new(config(&broker, "exec_patient", ""))
        .services(["exec_patient"])
        .start()
        .await
        .expect("starts");
    // It ends when told, instead of being waited for until the 30-second drain_timeout.
    let stopping = Instant::now();
    running.stop().await;
    assert!(stopping.elapsed() < Duration::from_secs(10));
    assert_eq!(SAW_SHUTDOWN.load(Ordering::SeqCst), 1);
}

static PANICS: AtomicUsize = AtomicUsize::new(0);

#[derive(Default)]
struct Panicky;

#[farine::service(name = "exec_panicky")]
impl Panicky {
    #[execute]
    async fn explode(&self) {
        PANICS.fetch_add(1, Ordering::SeqCst);
        panic!("explodes on every run");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_failures_than_max_restarts_in_the_window_fail_the_service() {
    let broker = Broker::connect().await;
    let options = "restart_delay = 10ms\nmax_restarts = 3\nrestart_window = 30\n";
    let running = Runtime::new(config(&broker, "exec_panicky", options))
        .services(["exec_panicky"])
        .start()
        .await
        .expect("starts");
    let result = tokio::time::timeout(BOUND, running.run_until_signal())
        .await
        .expect("the runtime stops by itself");
    let Err(RunError::ServiceFailed(failure)) = result else {
        panic!("the service failed: {result:?}");
    };
    let text = failure.to_string();
    assert_eq!(
        (failure.service, failure.handler),
        ("exec_panicky", "explode")
    );
    assert!(text.contains("explodes on every run"), "{text}");
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        4,
        "the first run and three restarts"
    );
}

// --- the pause between runs: default, attribute, config -----------------------------------------

/// The instants of each service's runs.
static PAUSED_RUNS: Mutex<Vec<(&str, Instant)>> = Mutex::new(Vec::new());

fn runs_of(service: &str) -> Vec<Instant> {
    PAUSED_RUNS
        .lock()
        .unwrap()
        .iter()
        .filter(|(s, _)| *s == service)
        .map(|(_, at)| *at)
        .collect()
}

#[derive(Default)]
struct DefaultPause;

#[farine::service(name = "exec_default_pause")]
impl DefaultPause {
    #[execute]
    async fn run(&self) {
        PAUSED_RUNS
            .lock()
            .unwrap()
            .push(("exec_default_pause", Instant::now()));
    }
}

#[derive(Default)]
struct AttributePause;

#[farine::service(name = "exec_attribute_pause")]
impl AttributePause {
    #[execute(interval = "1h", restart = true)]
    async fn run(&self) {
        PAUSED_RUNS
            .lock()
            .unwrap()
            .push(("exec_attribute_pause", Instant::now()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_that_returns_at_once_runs_again_after_a_second_by_default_not_in_a_busy_loop() {
    let broker = Broker::connect().await;
    let running = Runtime::new(config(&broker, "exec_default_pause", ""))
        .services(["exec_default_pause"])
        .start()
        .await
        .expect("starts");
    assert!(wait_until(BOUND, || runs_of("exec_default_pause").len() >= 2).await);
    running.stop().await;
    let runs = runs_of("exec_default_pause");
    assert!(
        runs[1] - runs[0] >= Duration::from_millis(950),
        "the default pause is a second: {:?}",
        runs[1] - runs[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_attributes_interval_is_the_default_and_the_config_overrides_it() {
    let broker = Broker::connect().await;
    // The attribute's hour holds with no interval in the section: one run while we look.
    let running = Runtime::new(config(&broker, "exec_attribute_pause", ""))
        .services(["exec_attribute_pause"])
        .start()
        .await
        .expect("starts");
    assert!(wait_until(BOUND, || runs_of("exec_attribute_pause").len() == 1).await);
    // A second run would need the hour (a tight loop would run thousands of times meanwhile).
    let again = wait_until(Duration::from_millis(300), || {
        runs_of("exec_attribute_pause").len() > 1
    })
    .await;
    running.stop().await;
    assert!(!again, "ran again before the attribute's interval");

    // `interval = 0` in the service's section overrides the attribute: a tight loop, by choice.
    let running = Runtime::new(config(&broker, "exec_attribute_pause", "interval = 0\n"))
        .services(["exec_attribute_pause"])
        .start()
        .await
        .expect("starts");
    assert!(wait_until(BOUND, || runs_of("exec_attribute_pause").len() >= 50).await);
    running.stop().await;
}

#[derive(Default)]
struct BadAttribute;

#[farine::service(name = "exec_bad_attribute")]
impl BadAttribute {
    #[execute(interval = "soon")]
    async fn run(&self) {}
}

async fn start_error(config: Config, service: &str) -> farine::StartError {
    match Runtime::new(config).services([service]).start().await {
        Ok(running) => {
            running.stop().await;
            panic!("{service} started");
        }
        Err(error) => error,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_is_below_the_attribute_and_a_bad_attribute_value_is_a_config_error_naming_it() {
    let broker = Broker::connect().await;
    // [DEFAULT] holds defaults: `interval = 0` there leaves the attribute's hour.
    let text = format!(
        "[DEFAULT]\ninterval = 0\n[exec_attribute_pause]\namqp_uri = {}\n",
        broker.uri()
    );
    let before = runs_of("exec_attribute_pause").len();
    let running = Runtime::new(Config::from_ini(&text, "test.ini").unwrap())
        .services(["exec_attribute_pause"])
        .start()
        .await
        .expect("starts");
    assert!(wait_until(BOUND, || runs_of("exec_attribute_pause").len() > before).await);
    // A tight loop would run thousands of times in this window.
    let looped = wait_until(Duration::from_millis(300), || {
        runs_of("exec_attribute_pause").len() > before + 1
    })
    .await;
    running.stop().await;
    assert!(!looped, "[DEFAULT]'s interval = 0 overrode the attribute");

    let error = start_error(
        config(&broker, "exec_bad_attribute", ""),
        "exec_bad_attribute",
    )
    .await;
    let text = error.to_string();
    assert!(error.is_config(), "{text}");
    assert!(
        text.contains("run.interval") && text.contains("from the handler's attribute"),
        "{text}"
    );
}
