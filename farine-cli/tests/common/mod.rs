//! Shared by the launcher's end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use farine_test_support::Broker;
use farine_test_support::process::Process;

/// The first start of a module builds it with cargo: give it time.
pub const START_BOUND: Duration = Duration::from_secs(300);
/// A bound for what a running module does within moments.
pub const BOUND: Duration = Duration::from_secs(15);

/// The workspace: the examples' modules and `etc/farine.ini` are found from there.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace is farine-cli's parent")
        .to_path_buf()
}

/// `farine --start=rpc` with the shipped etc/farine.ini (services `server` and `client`), in
/// the test's vhost through the environment override a container would use; returns once both
/// serve.
pub fn start_rpc(broker: &Broker) -> Process {
    let mut command = Command::new(env!("CARGO_BIN_EXE_farine"));
    command
        .args(["--start=rpc", "--config", "etc/farine.ini"])
        .current_dir(workspace())
        .env("FARINE__DEFAULT__AMQP_URI", broker.uri())
        .env("RUST_LOG", "info");
    let process = Process::spawn(command);
    assert!(
        process.wait_for_lines("serving RPC", 2, START_BOUND),
        "farine --start=rpc started:\n{}",
        process.output()
    );
    process
}
