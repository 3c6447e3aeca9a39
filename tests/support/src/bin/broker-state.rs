//! Prints what is on the test broker outside the vhosts of tests that run now: every other
//! vhost, and the queues and exchanges in it, one per line, sorted. `scripts/test` prints it
//! before and after the suite: a line that appears is something a test left behind.

use farine_test_support::vhost;

fn main() -> std::process::ExitCode {
    match state() {
        Ok(lines) => {
            for line in lines {
                println!("{line}");
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("broker-state: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn state() -> Result<Vec<String>, String> {
    let mut lines = Vec::new();
    for name in vhost::list()? {
        if vhost::of_a_running_test(&name) {
            continue;
        }
        lines.push(format!("vhost {name}"));
        let path = encode(&name);
        for (kind, what) in [("queues", "queue"), ("exchanges", "exchange")] {
            let items = vhost::get(&format!("/api/{kind}/{path}?columns=name"))?;
            for item in items.as_array().into_iter().flatten() {
                if let Some(item) = item["name"].as_str() {
                    lines.push(format!("vhost {name} {what} {item:?}"));
                }
            }
        }
    }
    lines.sort();
    Ok(lines)
}

/// A vhost name as one segment of a URL path (the default vhost is `/`).
fn encode(name: &str) -> String {
    name.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
