//! `farine`: the launcher.
//!
//! Rust cannot import a module at run time, so `farine --start=mymodule` does it in two steps:
//! it finds package `mymodule` in the Cargo workspace (the current directory's, or the one named
//! by `--manifest-path`), builds it with cargo, and runs the package's binary with the same
//! arguments. The binary's `main` is `farine::main!()`, which gives it the same command line.
//! With one module the launcher replaces itself with the binary (signals reach it directly);
//! with several it runs them side by side, forwards SIGINT/SIGTERM to each, and they receive
//! SIGTERM if the launcher dies (even by SIGKILL).
//!
//! The operator's commands (`farine call`, `farine publish`, `farine dead-letters`) run in the
//! launcher itself, except `dead-letters` with `--start=MODULE`, which goes to the module's
//! binary: it knows its handlers' queues.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use clap::Parser;
use farine::__private::operate::{self, Command as Operation};
use serde_json::Value;

/// Exit status: everything stopped cleanly.
const EXIT_OK: u8 = 0;
/// Exit status: a module failed at run time.
const EXIT_FAILURE: u8 = 1;
/// Exit status: wrong command line, unknown module, not in a workspace.
const EXIT_USAGE: u8 = 2;
/// Exit status: cargo could not build the module.
const EXIT_BUILD: u8 = 4;

/// Builds and starts farine service modules.
#[derive(Debug, Parser)]
#[command(name = "farine", version)]
struct Args {
    /// The module(s) to start: packages of the workspace whose binary is `farine::main!()`.
    /// Repeatable or comma-separated.
    #[arg(long, value_delimiter = ',', value_name = "MODULE")]
    start: Vec<String>,
    /// The INI file (default: $FARINE_INI, else /etc/farine.ini).
    #[arg(long, value_name = "PATH", global = true)]
    config: Option<PathBuf>,
    /// Lists the modules, or with --start the services and handlers of each, and exits.
    #[arg(long)]
    list: bool,
    /// With --start: prints the services' handlers, queues and bindings as a table, and exits.
    #[arg(long, requires = "start")]
    describe: bool,
    /// With --start: prints the AsyncAPI 3.0 document of the module's services as the config
    /// resolves them, and exits.
    #[arg(long, requires = "start")]
    asyncapi: bool,
    /// The AsyncAPI document's format: yaml (default) or json.
    #[arg(long, value_name = "FORMAT", value_parser = ["yaml", "json"], requires = "asyncapi")]
    format: Option<String>,
    /// Writes the AsyncAPI document to FILE instead of standard output.
    #[arg(long, value_name = "FILE", requires = "asyncapi")]
    output: Option<PathBuf>,
    /// Checks the config and connects to each AMQP node and database it names, printing each
    /// round-trip time; exits 0, or 1 when something is unreachable. With --start, checks
    /// that module's services (their whole config) instead.
    #[arg(long)]
    check: bool,
    /// Deprecated: `dead-letters replay HANDLER`, which it stands for.
    #[arg(long, value_name = "HANDLER", hide = true)]
    replay_dead_letters: Option<String>,
    /// Log level or tracing filter (default: $RUST_LOG, else info; for a command, else warn).
    #[arg(long, value_name = "LEVEL", global = true)]
    log_level: Option<String>,
    /// Log format: text, or json (one JSON object per line). Default: `log_format` in the
    /// config's [DEFAULT], else $FARINE_LOG_FORMAT, else text.
    #[arg(long, value_name = "FORMAT", value_parser = ["text", "json"], global = true)]
    log_format: Option<String>,
    /// The workspace's Cargo.toml (default: found from the current directory, as cargo does).
    #[arg(long, value_name = "PATH")]
    manifest_path: Option<PathBuf>,
    /// Build the modules with `--release`.
    #[arg(long)]
    release: bool,
    /// An operator's command instead of starting modules.
    #[command(subcommand)]
    command: Option<Operation>,
}

/// A module: a workspace package that depends on farine and has a binary.
struct Module {
    package_id: String,
    binary: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    ExitCode::from(match run(args) {
        Ok(code) => code,
        Err((code, message)) => {
            eprintln!("farine: {message}");
            code
        }
    })
}

type Failure = (u8, String);

fn run(mut args: Args) -> Result<u8, Failure> {
    if let Some(handler) = args.replay_dead_letters.take() {
        eprintln!("farine: {}", operate::REPLAY_FLAG_DEPRECATED);
        args.command.get_or_insert(Operation::replay(handler));
    }
    if let Some(command) = &args.command {
        match (command.module_arguments(), args.start.as_slice()) {
            // No module needed, or none named: the launcher runs it.
            (None, _) | (Some(_), []) => return Ok(run_operation(args)),
            // Run by the module's binary, built below.
            (Some(_), [_]) => {}
            (Some(_), _) => {
                return Err((
                    EXIT_USAGE,
                    "dead-letters works on one module: name one with --start=MODULE".into(),
                ));
            }
        }
    }
    if args.check && args.start.is_empty() {
        return Ok(check_config_file(args.config.as_deref()));
    }
    let modules = modules(args.manifest_path.as_deref())?;
    let available = || modules.keys().cloned().collect::<Vec<_>>().join(", ");
    if args.start.is_empty() {
        if args.list {
            println!("modules: {}", available());
            return Ok(EXIT_OK);
        }
        return Err((
            EXIT_USAGE,
            format!(
                "say which module to start: --start=MODULE (available: {})",
                available()
            ),
        ));
    }
    for name in &args.start {
        if !modules.contains_key(name) {
            return Err((
                EXIT_USAGE,
                format!("unknown module `{name}` (available: {})", available()),
            ));
        }
    }
    if (args.asyncapi || args.describe) && args.start.len() > 1 {
        let flag = if args.asyncapi {
            "--asyncapi"
        } else {
            "--describe"
        };
        return Err((
            EXIT_USAGE,
            format!("{flag} describes one module: name one with --start=MODULE"),
        ));
    }
    let mut binaries = Vec::new();
    for name in &args.start {
        binaries.push((name.clone(), build(&args, name, &modules[name])?));
    }
    if let [(name, binary)] = binaries.as_slice() {
        return Err(exec(binary, &forwarded(&args, name)));
    }
    run_all(&args, &binaries)
}

/// An operator's command run by the launcher: without a module's handlers (`dead-letters`
/// finds the queues from the config).
fn run_operation(mut args: Args) -> u8 {
    let Some(command) = args.command.take() else {
        return EXIT_OK;
    };
    let options = operate::Options {
        config: args.config.as_deref(),
        log_level: args.log_level.as_deref(),
        // Only `text` and `json` get past clap.
        log_format: args.log_format.as_deref().and_then(|f| f.parse().ok()),
        module: None,
    };
    operate::run(command, options)
}

/// `farine --check` without a module: the connections every section of the config names.
fn check_config_file(flag: Option<&Path>) -> u8 {
    let path = farine::config::resolve_path(flag);
    let config = match farine::config::Config::load(&path) {
        Ok(config) => config,
        Err(e) => {
            println!("config {}: {e}", path.display());
            println!("check failed");
            return EXIT_FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            println!("cannot start the async runtime: {e}");
            return EXIT_FAILURE;
        }
    };
    let (ok, lines) = runtime.block_on(farine::__private::config_file(&config));
    for line in lines {
        println!("{line}");
    }
    println!("{}", if ok { "check passed" } else { "check failed" });
    if ok { EXIT_OK } else { EXIT_FAILURE }
}

/// Reads the workspace with `cargo metadata` and keeps the packages that depend on farine and
/// have a binary, except those whose manifest says `[package.metadata.farine] module = false`.
fn modules(manifest: Option<&Path>) -> Result<BTreeMap<String, Module>, Failure> {
    let mut command = Command::new(cargo());
    command.args(["metadata", "--format-version", "1", "--no-deps"]);
    if let Some(manifest) = manifest {
        command.arg("--manifest-path").arg(manifest);
    }
    let output = command
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| (EXIT_USAGE, format!("cannot run cargo: {e}")))?;
    if !output.status.success() {
        return Err((
            EXIT_USAGE,
            "not inside a Cargo workspace: run farine in your services' workspace or pass --manifest-path".into(),
        ));
    }
    let metadata: Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| (EXIT_USAGE, format!("cannot read `cargo metadata`: {e}")))?;
    let mut found = BTreeMap::new();
    for package in metadata["packages"].as_array().into_iter().flatten() {
        let depends_on_farine = package["dependencies"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|dep| dep["name"] == "farine" && dep["kind"].is_null())
            // A package of tools over farine (this launcher, the benchmarks) opts out.
            && package["metadata"]["farine"]["module"] != Value::Bool(false);
        let binary = package["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|target| {
                target["kind"]
                    .as_array()
                    .is_some_and(|kinds| kinds.iter().any(|k| k == "bin"))
            })
            .and_then(|target| target["name"].as_str());
        if let (true, Some(binary), Some(name), Some(id)) = (
            depends_on_farine,
            binary,
            package["name"].as_str(),
            package["id"].as_str(),
        ) {
            found.insert(
                name.to_string(),
                Module {
                    package_id: id.to_string(),
                    binary: binary.to_string(),
                },
            );
        }
    }
    Ok(found)
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Builds the module's binary and returns its path, as cargo reports it.
fn build(args: &Args, name: &str, module: &Module) -> Result<PathBuf, Failure> {
    let mut command = Command::new(cargo());
    command.args([
        "build",
        "--package",
        name,
        "--bin",
        &module.binary,
        "--message-format=json-render-diagnostics",
    ]);
    if args.release {
        command.arg("--release");
    }
    if let Some(manifest) = &args.manifest_path {
        command.arg("--manifest-path").arg(manifest);
    }
    let output = command
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| (EXIT_BUILD, format!("cannot run cargo: {e}")))?;
    if !output.status.success() {
        return Err((EXIT_BUILD, format!("cargo could not build module `{name}`")));
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|message| {
            message["reason"] == "compiler-artifact"
                && message["package_id"] == module.package_id.as_str()
        })
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| {
            (
                EXIT_BUILD,
                format!("cargo built module `{name}` but reported no binary"),
            )
        })
}

/// The arguments the module's binary gets: the launcher's, less the launcher's own.
fn forwarded(args: &Args, module: &str) -> Vec<String> {
    let mut out = vec![format!("--start={module}")];
    if let Some(config) = &args.config {
        out.push(format!("--config={}", config.display()));
    }
    if args.list {
        out.push("--list".into());
    }
    if args.check {
        out.push("--check".into());
    }
    if args.describe {
        out.push("--describe".into());
    }
    if args.asyncapi {
        out.push("--asyncapi".into());
    }
    if let Some(format) = &args.format {
        out.push(format!("--format={format}"));
    }
    if let Some(output) = &args.output {
        out.push(format!("--output={}", output.display()));
    }
    if let Some(level) = &args.log_level {
        out.push(format!("--log-level={level}"));
    }
    if let Some(format) = &args.log_format {
        out.push(format!("--log-format={format}"));
    }
    // Last: the flags above are the binary's own, its subcommand's follow it.
    if let Some(command) = args.command.as_ref().and_then(Operation::module_arguments) {
        out.extend(command);
    }
    out
}

/// Replaces this process with the module's binary; returns only on failure.
fn exec(binary: &Path, args: &[String]) -> Failure {
    use std::os::unix::process::CommandExt;
    let error = Command::new(binary).args(args).exec();
    (
        EXIT_FAILURE,
        format!("cannot run {}: {error}", binary.display()),
    )
}

/// Sends `signal` to each process in `pids`.
fn signal_all(pids: &[i32], signal: i32) {
    for pid in pids {
        // SAFETY: kill(2) with the pid of a child we spawned and a valid signal number.
        unsafe {
            libc::kill(*pid, signal);
        }
    }
}

/// Makes the process `command` starts receive SIGTERM when the launcher dies, however it dies
/// (SIGKILL included): a module never outlives the launcher that an orchestrator supervises, and
/// SIGTERM lets it drain its in-flight handlers as on a normal stop.
fn die_with_this_process(command: &mut tokio::process::Command) {
    // SAFETY: getpid(2) is always safe to call.
    let launcher = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the child between fork and exec and calls only prctl(2),
    // getppid(2) and raise(3), which are async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The launcher died before the line above took effect: the signal will not come.
            if libc::getppid() != launcher {
                libc::raise(libc::SIGTERM);
            }
            Ok(())
        });
    }
}

/// Runs several modules side by side and forwards SIGINT/SIGTERM to them. When one module
/// exits, the others are sent SIGTERM, so an orchestrator sees the process end instead of a
/// half-running set. The exit status is the first non-zero status of a module, else 0.
fn run_all(args: &Args, binaries: &[(String, PathBuf)]) -> Result<u8, Failure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| (EXIT_FAILURE, format!("cannot start: {e}")))?;
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        // Take the signals over before spawning, so none is lost (or kills the launcher alone).
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return Err((EXIT_FAILURE, "cannot install signal handlers".into()));
        };
        let mut running = tokio::task::JoinSet::new();
        let mut pids = Vec::new();
        for (name, binary) in binaries {
            let mut command = tokio::process::Command::new(binary);
            command.args(forwarded(args, name));
            die_with_this_process(&mut command);
            let spawned = command.spawn();
            let mut child = match spawned {
                Ok(child) => child,
                Err(e) => {
                    signal_all(&pids, libc::SIGTERM);
                    while running.join_next().await.is_some() {}
                    return Err((
                        EXIT_FAILURE,
                        format!("cannot run {}: {e}", binary.display()),
                    ));
                }
            };
            if let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) {
                pids.push(pid);
            }
            let name = name.clone();
            running.spawn(async move {
                let code = match child.wait().await {
                    Ok(status) => status.code().map_or(EXIT_FAILURE, |c| c as u8),
                    Err(_) => EXIT_FAILURE,
                };
                (name, code)
            });
        }
        let mut worst = EXIT_OK;
        let mut stopping = false;
        loop {
            tokio::select! {
                // Asked to stop: the modules ending now is no news.
                _ = term.recv() => {
                    stopping = true;
                    signal_all(&pids, libc::SIGTERM);
                }
                _ = int.recv() => {
                    stopping = true;
                    signal_all(&pids, libc::SIGINT);
                }
                done = running.join_next() => {
                    let Some(done) = done else { break };
                    let (name, code) = done.unwrap_or_else(|_| (String::from("?"), EXIT_FAILURE));
                    if code != EXIT_OK {
                        eprintln!("farine: module `{name}` exited with status {code}");
                        if worst == EXIT_OK {
                            worst = code;
                        }
                    }
                    if !stopping && !running.is_empty() {
                        stopping = true;
                        eprintln!("farine: module `{name}` ended; stopping the others");
                        signal_all(&pids, libc::SIGTERM);
                    }
                }
            }
        }
        Ok(worst)
    })
}
