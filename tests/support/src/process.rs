//! Running a farine process in a test: its stderr is collected so the test can wait for a log
//! line, and it can be sent a signal.
//!
//! The process leads a process group of its own, and dropping the [`Process`] kills the whole
//! group: a test that fails half-way leaves no launcher, cargo or service process behind.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A child process whose stderr (and stdout) lines are collected.
pub struct Process {
    child: Child,
    output: Arc<Mutex<Vec<String>>>,
    /// The threads reading stderr and stdout: done once the process closed them.
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Process {
    /// Spawns `command` with stdout and stderr captured, in a new process group.
    pub fn spawn(mut command: Command) -> Self {
        use std::os::unix::process::CommandExt;
        command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = command.spawn().expect("the process starts");
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        for stream in [
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let output = output.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    output.lock().unwrap().push(line);
                }
            }));
        }
        Self {
            child,
            output,
            readers,
        }
    }

    /// Everything the process printed so far.
    pub fn output(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    /// Waits until a printed line contains `needle`, for at most `bound`.
    pub fn wait_for_output(&self, needle: &str, bound: Duration) -> bool {
        self.wait_for_lines(needle, 1, bound)
    }

    /// Waits until `count` printed lines contain `needle`, for at most `bound`.
    pub fn wait_for_lines(&self, needle: &str, count: usize, bound: Duration) -> bool {
        let deadline = Instant::now() + bound;
        while Instant::now() < deadline {
            let seen = self
                .output
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains(needle))
                .count();
            if seen >= count {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// The process's id (also its process group's).
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits")
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the process alone, not to its group.
    pub fn signal(&self, signal: i32) {
        let pid = self.pid();
        // SAFETY: kill(2) on our own child with a valid signal number.
        unsafe {
            libc::kill(pid, signal);
        }
    }

    /// Waits for the process to exit, for at most `bound`; `None` when it did not. Once it
    /// exited, also waits (within the same bound) until what it printed has been read, so that
    /// [`Process::output`] is complete.
    pub fn wait_exit(&mut self, bound: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + bound;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                while !self
                    .readers
                    .iter()
                    .all(std::thread::JoinHandle::is_finished)
                    && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // The whole group, whether the leader still runs or not: what it started may.
        // SAFETY: kill(2) on the process group this test made, with a valid signal number.
        unsafe {
            libc::kill(-self.pid(), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// Whether process `pid` runs: it exists and is not a zombie (an orphan's zombie lingers until
/// whoever adopted it reaps it).
pub fn running(pid: i32) -> bool {
    stat(pid).is_some_and(|(state, _)| state != 'Z')
}

/// The processes whose parent is `pid`, from /proc.
pub fn children(pid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&child| stat(child).is_some_and(|(_, parent)| parent == pid))
        .collect()
}

/// `(state, parent pid)` of process `pid`, from /proc/<pid>/stat.
fn stat(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the fields follow the last `)`.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let parent = fields.next()?.parse().ok()?;
    Some((state, parent))
}

pub use libc::{SIGINT, SIGKILL, SIGTERM};
