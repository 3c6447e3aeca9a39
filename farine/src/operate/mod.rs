//! The operator's commands: `farine call`, `farine publish` and `farine dead-letters`, to work
//! on a running system from a terminal without writing code.
//!
//! Each is a subcommand of both command lines, the launcher's (`farine`) and a service
//! binary's (`farine::main!()`), and goes through the code services use: the RPC client
//! (`rpc`), a publisher with confirms, the dead-letter operations of the transport
//! (`amqp::dead_letter`). The broker is `--amqp-uri`, else `amqp_uri` of the config (its
//! `[DEFAULT]`; for dead letters the service's section), else farine's default. A handler's
//! dead-letter queue comes from the runtime's plan in a service binary, which knows its
//! handlers, and from the config's section and the default naming in the launcher without
//! `--start` (`dead_letters`). Output goes to standard output; errors to standard error, with
//! any password masked, and the exit status of `farine::main!()` (0 ok, 1 failure, 2 usage,
//! 3 configuration).

mod call;
mod dead_letters;
mod parse;
mod publish;

use std::path::Path;

use crate::amqp::connection::ConnectorSettings;
use crate::config::redact::redact_uri;
use crate::config::{Config, ConfigError};
use crate::log::LogFormat;

/// Exit status: done.
const EXIT_OK: u8 = 0;
/// Exit status: the broker refused, could not be reached, or the call failed.
const EXIT_FAILURE: u8 = 1;
/// Exit status: a wrong argument.
const EXIT_USAGE: u8 = 2;
/// Exit status: the configuration is wrong.
const EXIT_CONFIG: u8 = 3;

/// What `--replay-dead-letters HANDLER` says where it is taken for `dead-letters replay HANDLER`.
pub const REPLAY_FLAG_DEPRECATED: &str = "--replay-dead-letters is deprecated: use `dead-letters replay SERVICE.HANDLER` (see `farine dead-letters --help`)";

/// An operator's command: a subcommand of `farine` and of every service binary.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Calls an RPC method and prints its reply as JSON: a streamed reply one item per line.
    Call(call::CallArgs),
    /// Publishes a JSON message (persistent, mandatory) and waits for the broker's confirm.
    Publish(publish::PublishArgs),
    /// Lists, replays or purges the dead letters of a `#[consume]` handler.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(dead_letters::Action),
}

impl Command {
    /// `dead-letters replay HANDLER`: what the deprecated `--replay-dead-letters HANDLER`
    /// stands for.
    pub fn replay(handler: String) -> Self {
        Command::DeadLetters(dead_letters::Action::Replay(dead_letters::Target {
            handler,
            limit: None,
            broker: BrokerArgs::default(),
        }))
    }

    /// The command's arguments for a module's binary, when it is better run there (the
    /// binary knows its handlers' queues): `dead-letters`. `None` for the commands that need
    /// no module.
    pub fn module_arguments(&self) -> Option<Vec<String>> {
        match self {
            Command::DeadLetters(action) => Some(action.arguments()),
            Command::Call(_) | Command::Publish(_) => None,
        }
    }
}

/// The broker flag every command takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct BrokerArgs {
    /// The broker: an AMQP URI (default: `amqp_uri` in the config's [DEFAULT], else
    /// amqp://guest:guest@127.0.0.1:5672). Its password is never printed.
    #[arg(long, value_name = "URI")]
    amqp_uri: Option<String>,
}

/// What a command line gives every command besides its own arguments.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options<'a> {
    /// `--config`.
    pub config: Option<&'a Path>,
    /// `--log-level`.
    pub log_level: Option<&'a str>,
    /// `--log-format`.
    pub log_format: Option<LogFormat>,
    /// The module of a service binary (`None` in the launcher): its handlers are known.
    pub module: Option<&'a str>,
}

/// Runs `command`; returns the exit status. The log goes to standard error at `--log-level`,
/// else `RUST_LOG`'s level, else `warn`: the command's own output is what an operator reads.
pub fn run(command: Command, options: Options<'_>) -> u8 {
    let filter = match log_filter(options.log_level) {
        Ok(filter) => filter,
        Err(message) => {
            eprintln!("farine: {message}");
            return EXIT_USAGE;
        }
    };
    crate::log::install(filter, options.log_format.unwrap_or_default());
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("farine: cannot start the async runtime: {e}");
            return EXIT_FAILURE;
        }
    };
    let done = runtime.block_on(async move {
        match command {
            Command::Call(args) => call::run(args, &options).await,
            Command::Publish(args) => publish::run(args, &options).await,
            Command::DeadLetters(action) => dead_letters::run(action, &options).await,
        }
    });
    match done {
        Ok(()) => EXIT_OK,
        Err(failure) => {
            eprintln!("farine: {}", redact_uri(&failure.message));
            failure.code
        }
    }
}

/// `--log-level`, else `RUST_LOG`, else `warn` without lapin's lines: the command reports its
/// failures itself, and lapin would repeat them (a channel the broker closed, a 404 say).
fn log_filter(flag: Option<&str>) -> Result<tracing_subscriber::EnvFilter, String> {
    if flag.is_none() && std::env::var_os("RUST_LOG").is_none() {
        return Ok(tracing_subscriber::EnvFilter::new("warn,lapin=off"));
    }
    crate::log::level_filter(flag)
}

/// Why a command failed, and its exit status.
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn failed(message: impl std::fmt::Display) -> Self {
        Self {
            code: EXIT_FAILURE,
            message: message.to_string(),
        }
    }

    fn usage(message: impl std::fmt::Display) -> Self {
        Self {
            code: EXIT_USAGE,
            message: message.to_string(),
        }
    }

    fn config(message: impl std::fmt::Display) -> Self {
        Self {
            code: EXIT_CONFIG,
            message: message.to_string(),
        }
    }
}

impl From<ConfigError> for Failure {
    fn from(error: ConfigError) -> Self {
        Failure::config(error)
    }
}

/// The config file `--config` (else `$FARINE_INI`, else `/etc/farine.ini`) names. When
/// nothing named a file and there is none at `/etc/farine.ini`, an empty one: the defaults
/// (a command on a developer's machine needs no file for the local broker).
fn load_config(flag: Option<&Path>) -> Result<Config, Failure> {
    let named = flag.is_some() || std::env::var_os(crate::config::PATH_ENV).is_some();
    config_or_defaults(&crate::config::resolve_path(flag), named)
}

/// The config at `path`; an empty one when the file is absent and nothing `named` it.
fn config_or_defaults(path: &Path, named: bool) -> Result<Config, Failure> {
    if !named && !path.exists() {
        return Config::from_ini("", "no config file: the defaults").map_err(Failure::from);
    }
    Config::load(path).map_err(Failure::from)
}

/// The broker a command talks to and how to connect to it.
struct Broker {
    uri: String,
    settings: ConnectorSettings,
}

impl Broker {
    /// `--amqp-uri`, else `amqp_uri` of `section` (when the config was read), else farine's
    /// default; the connection settings (`connect_timeout`, `amqp_tls_ca_file`, ...) of
    /// `section`, else the defaults. A URI that is not one is a usage error when it came from
    /// the flag, a config error when it came from the file.
    fn choose(
        flag: &BrokerArgs,
        section: Option<&crate::config::Section>,
    ) -> Result<Self, Failure> {
        let settings = match section {
            Some(section) => crate::runtime::connector_settings(section)?,
            None => ConnectorSettings::default(),
        };
        if let Some(uri) = &flag.amqp_uri {
            check_uri(uri).map_err(|cause| {
                Failure::usage(format!(
                    "--amqp-uri {}: expected an AMQP URI, amqp:// or amqps:// with the user and password before the host: {cause}",
                    crate::config::redact::display_value("amqp_uri", uri)
                ))
            })?;
            return Ok(Self {
                uri: uri.clone(),
                settings,
            });
        }
        let uri = match section {
            Some(section) => configured_uri(section)?,
            None => crate::runtime::DEFAULT_AMQP_URI.to_string(),
        };
        Ok(Self { uri, settings })
    }

    /// The broker of a command that needs no handler: `--amqp-uri` (the config is then not
    /// read), else the config's `[DEFAULT]`.
    fn for_sending(flag: &BrokerArgs, config: Option<&Path>) -> Result<Self, Failure> {
        if flag.amqp_uri.is_some() {
            return Self::choose(flag, None);
        }
        let config = load_config(config).map_err(|failure| Failure {
            message: format!(
                "{}; or name the broker with --amqp-uri URI",
                failure.message
            ),
            ..failure
        })?;
        Self::choose(flag, Some(&config.defaults()))
    }

    /// A connector to the broker, named `purpose` in the broker's list of connections, and
    /// connected: a broker that cannot be reached is known at once (one round of attempts
    /// over its nodes, each bounded by `connect_timeout`), not after a command's timeout.
    async fn connect(
        self,
        options: &Options<'_>,
        purpose: &str,
    ) -> Result<std::sync::Arc<crate::amqp::connection::Connector>, Failure> {
        let program = options
            .module
            .map_or_else(crate::amqp::connection::program_name, str::to_string);
        let connector = std::sync::Arc::new(crate::amqp::connection::Connector::with_settings(
            self.uri,
            crate::amqp::connection::connection_name(&program, purpose),
            self.settings,
        ));
        if let Err(e) = connector.connection().await {
            connector.close().await;
            return Err(Failure::failed(e));
        }
        Ok(connector)
    }
}

/// `amqp_uri` of `section`, else farine's default; a config error when it is not one.
fn configured_uri(section: &crate::config::Section) -> Result<String, Failure> {
    let uri = section
        .get_str("amqp_uri")?
        .unwrap_or_else(|| crate::runtime::DEFAULT_AMQP_URI.to_string());
    match check_uri(&uri) {
        Ok(()) => Ok(uri),
        Err(cause) => Err(Failure::config(section.invalid(
            "amqp_uri",
            &uri,
            format!("AMQP URIs (amqp:// or amqps://), separated by commas: {cause}"),
        ))),
    }
}

/// An error when `uri` is not a list of AMQP URIs (the test kit's `memory://` aside).
fn check_uri(uri: &str) -> Result<(), String> {
    if crate::amqp::connection::memory_name(uri).is_some() {
        return Ok(());
    }
    crate::amqp::connection::parse_nodes(uri).map(|_| ())
}

/// Writes `line` and a newline to standard output, at once (a stream's items appear as they
/// come, even through a pipe).
fn print_line(line: &str) -> Result<(), Failure> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|e| Failure::failed(format!("cannot write to standard output: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_file_named_or_at_the_default_path_the_defaults_serve_but_a_named_one_must_exist() {
        let absent = Path::new("/nonexistent/farine-operate-test.ini");
        let defaults = config_or_defaults(absent, false).expect("the defaults");
        assert_eq!(defaults.file(), "no config file: the defaults");
        assert_eq!(defaults.defaults().get_str("amqp_uri").ok().flatten(), None);
        let named = config_or_defaults(absent, true).expect_err("a named file must exist");
        assert_eq!(named.code, EXIT_CONFIG, "{}", named.message);
    }
}
