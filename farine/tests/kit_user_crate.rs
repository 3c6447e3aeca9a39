//! A user's crate outside this workspace depends on farine with the `testing` feature only (no
//! database, no SSE) and tests its service with the kit, in a process with no network at all
//! (`unshare -rn`): no broker, not even loopback.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A directory of the test's own under the temporary directory, removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0)
            && !std::thread::panicking()
        {
            panic!("removing {}: {e}", self.0.display());
        }
    }
}

const SERVICE: &str = r#"//! A user's service: doubles every number it consumes.

use farine::{PublishError, Publisher, consume, publish};

#[derive(Default)]
pub struct Doubler;

#[farine::service]
impl Doubler {
    #[consume(exchange = "numbers", routing_key = "n")]
    async fn double(&self, n: i64) -> Result<(), PublishError> {
        self.send(n * 2).await
    }

    #[publish(exchange = "doubled", routing_key = "n")]
    async fn send(&self, publisher: Publisher, n: i64) -> Result<(), PublishError> {
        publisher.publish(&n).await
    }
}

#[cfg(test)]
mod tests {
    use farine::testing::TestBroker;

    #[tokio::test]
    async fn doubles_what_it_consumes() {
        let kit = TestBroker::new();
        let running = kit.start("[doubler]\n").start().await.expect("starts");
        kit.publish("numbers", "n", &21).await.expect("taken");
        let doubled = kit.next_published("doubled", "n").await;
        assert_eq!(doubled.json::<i64>(), 42);
        running.stop().await;
    }
}
"#;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_path_buf()
}

#[test]
fn a_crate_outside_the_workspace_tests_its_service_with_the_kit_and_no_network() {
    if Command::new("unshare")
        .args(["-rn", "true"])
        .status()
        .map_or(true, |status| !status.success())
    {
        panic!("`unshare -rn` is needed to show the kit needs no network (util-linux)");
    }
    let workspace = workspace();
    let dir =
        TempDir(std::env::temp_dir().join(format!("farine-user-crate-{}", std::process::id())));
    std::fs::create_dir_all(dir.0.join("src")).expect("dir made");
    let farine = workspace.join("farine");
    let manifest = format!(
        r#"[package]
name = "shop"
version = "0.1.0"
edition = "2024"

[dependencies]
farine = {{ path = "{farine}", default-features = false }}

[dev-dependencies]
farine = {{ path = "{farine}", default-features = false, features = ["testing"] }}
tokio = {{ version = "1", features = ["macros", "rt-multi-thread", "test-util"] }}

# As the farine workspace builds, so that its built dependencies are reused.
[profile.dev]
debug = "line-tables-only"

[profile.dev.package."*"]
debug = false
"#,
        farine = farine.display()
    );
    std::fs::write(dir.0.join("Cargo.toml"), manifest).expect("manifest written");
    std::fs::write(dir.0.join("src/lib.rs"), SERVICE).expect("service written");
    // The workspace's lock file: the same versions, so the same built dependencies.
    std::fs::copy(workspace.join("Cargo.lock"), dir.0.join("Cargo.lock")).expect("lock copied");

    // Built with network (nothing is downloaded: --offline), run without any.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let target = workspace.join("target");
    let build = Command::new(&cargo)
        .args(["test", "--offline", "--no-run", "--quiet"])
        .current_dir(&dir.0)
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .expect("cargo runs");
    assert!(
        build.status.success(),
        "the user's crate builds: {}",
        String::from_utf8_lossy(&build.stderr)
    );
    let run = Command::new("unshare")
        .arg("-rn")
        .arg(&cargo)
        .args(["test", "--offline"])
        .current_dir(&dir.0)
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .expect("cargo runs");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("test tests::doubles_what_it_consumes ... ok"),
        "{stdout}\n{stderr}"
    );
}
