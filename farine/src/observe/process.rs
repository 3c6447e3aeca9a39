//! The process's own metrics, as Prometheus's client libraries name them
//! (`process_resident_memory_bytes`, `process_cpu_seconds_total`, ...): read from `/proc` at
//! each scrape on Linux; on other platforms there are none.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Linux's clock tick for `/proc/<pid>/stat` times: 100 per second on every architecture
/// Linux runs on today (`USER_HZ`).
const TICKS_PER_SECOND: f64 = 100.0;

#[derive(Debug)]
pub(crate) struct Process;

impl Process {
    pub fn new() -> Self {
        Self
    }
}

/// What `/proc` says of this process.
#[derive(Debug, Default, PartialEq)]
struct Sample {
    cpu_seconds: Option<f64>,
    start_time_seconds: Option<f64>,
    resident_bytes: Option<f64>,
    virtual_bytes: Option<f64>,
    open_fds: Option<f64>,
    max_fds: Option<f64>,
    threads: Option<f64>,
}

impl Sample {
    fn read() -> Self {
        let mut sample = Sample::default();
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // The command name (field 2) is in parentheses and may hold spaces: count after it.
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .map(|(_, rest)| rest.split_whitespace().collect())
                .unwrap_or_default();
            // Fields from the state (3rd); utime is the 14th, stime 15th, threads 20th,
            // starttime 22nd, vsize 23rd.
            let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
            if let (Some(user), Some(system)) = (field(14), field(15)) {
                sample.cpu_seconds = Some((user + system) / TICKS_PER_SECOND);
            }
            sample.threads = field(20);
            sample.virtual_bytes = field(23);
            if let (Some(start), Some(boot)) = (field(22), boot_time()) {
                sample.start_time_seconds = Some(boot + start / TICKS_PER_SECOND);
            }
        }
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            sample.resident_bytes = status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<f64>()
                        .ok()
                })
                .map(|kb| kb * 1024.0);
        }
        if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
            sample.open_fds = Some(entries.count() as f64);
        }
        if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
            sample.max_fds = limits
                .lines()
                .find(|line| line.starts_with("Max open files"))
                .and_then(|line| line.split_whitespace().nth(3))
                .and_then(|soft| soft.parse::<f64>().ok());
        }
        sample
    }
}

/// When the machine booted, in seconds since the epoch (`btime` of `/proc/stat`).
fn boot_time() -> Option<f64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|value| value.trim().parse::<f64>().ok())
}

impl Collector for Process {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let sample = Sample::read();
        if let Some(seconds) = sample.cpu_seconds {
            let counter = ConstCounter::new(seconds);
            counter.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                counter.metric_type(),
            )?)?;
        }
        let gauges = [
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                sample.start_time_seconds,
            ),
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                sample.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                sample.virtual_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                sample.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                sample.max_fds,
            ),
            ("process_threads", "Number of OS threads", sample.threads),
        ];
        for (name, help, value) in gauges {
            if let Some(value) = value {
                let gauge = ConstGauge::new(value);
                gauge.encode(encoder.encode_descriptor(
                    name,
                    help,
                    None,
                    gauge.metric_type(),
                )?)?;
            }
        }
        Ok(())
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn on_linux_every_process_metric_is_read() {
        let sample = Sample::read();
        assert!(
            sample.resident_bytes.is_some_and(|b| b > 1024.0 * 1024.0),
            "{sample:?}"
        );
        assert!(sample.virtual_bytes >= sample.resident_bytes, "{sample:?}");
        assert!(sample.cpu_seconds.is_some(), "{sample:?}");
        assert!(sample.open_fds.is_some_and(|n| n >= 3.0), "{sample:?}");
        assert!(sample.max_fds.is_some_and(|n| n >= 3.0), "{sample:?}");
        assert!(sample.threads.is_some_and(|n| n >= 1.0), "{sample:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            sample
                .start_time_seconds
                .is_some_and(|t| t <= now + 1.0 && t > now - 86400.0 * 365.0),
            "{sample:?}"
        );
    }
}
