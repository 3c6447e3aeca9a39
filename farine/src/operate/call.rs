//! `farine call SERVICE.METHOD [ARGS_JSON] [--kwargs JSON] [--timeout SECONDS]`.
//!
//! The reply is always read as a stream (`docs/rpc-protocol.md`): a method that returns one
//! result sends it and the end marker, a streaming method its items and the end marker, so one
//! path prints either, one compact JSON value per line as it arrives.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Map, Value};

use super::parse::{self, Member, Positional};
use super::{Broker, BrokerArgs, Failure, Options, print_line};
use crate::rpc::{Args, CallOptions, Client, RpcError};

/// How long a call waits for its reply (for a stream, for each item) unless `--timeout` says.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The arguments of `farine call`.
#[derive(Debug, Clone, clap::Args)]
pub struct CallArgs {
    /// The service and the method to call, such as `server.repeat`.
    #[arg(value_name = "SERVICE.METHOD", value_parser = |text: &str| parse::member(text, "method"))]
    target: Member,
    /// The positional arguments: a JSON array, such as '["ab", 2]' (default: none).
    #[arg(value_name = "ARGS_JSON", value_parser = parse::json_array)]
    args: Option<Positional>,
    /// The arguments by name: a JSON object, such as '{"times": 2}'.
    #[arg(long, value_name = "JSON", value_parser = parse::json_object)]
    kwargs: Option<Map<String, Value>>,
    /// How long to wait for the reply (for a stream: for each item), in seconds (`30`, `0.5`)
    /// or with a unit (`250ms`, `2m`). Default: 30 seconds.
    #[arg(long, value_name = "SECONDS", value_parser = parse::timeout)]
    timeout: Option<Duration>,
    #[command(flatten)]
    broker: BrokerArgs,
}

/// Calls the method and prints each item of its reply on a line of its own. A failure (the
/// method's error, no such service or method, no reply in time) ends the command with exit
/// status 1, after the items already printed.
pub(super) async fn run(args: CallArgs, options: &Options<'_>) -> Result<(), Failure> {
    let broker = Broker::for_sending(&args.broker, options.config)?;
    let connector = broker
        .connect(options, &format!("farine call {}", args.target))
        .await?;
    let timeout = args.timeout.unwrap_or(DEFAULT_TIMEOUT);
    let client = Client::new(connector.clone(), args.target.service.clone(), timeout);
    let mut call = Args::new();
    for value in args.args.unwrap_or_default().0 {
        call = call.arg(value);
    }
    for (name, value) in args.kwargs.unwrap_or_default() {
        call = call.kwarg(&name, value);
    }
    let printed = print_reply(&client, &args.target.name, call, timeout).await;
    drop(client);
    connector.close().await;
    printed
}

async fn print_reply(
    client: &Client,
    method: &str,
    args: Args,
    timeout: Duration,
) -> Result<(), Failure> {
    let mut items = client
        .stream_with::<Value>(method, args, CallOptions::timeout(timeout))
        .await
        .map_err(failure)?;
    while let Some(item) = items.next().await {
        let item = item.map_err(failure)?;
        print_line(&item.to_string())?;
    }
    Ok(())
}

/// A failed call: its error names the service and the method; a timeout says what to do.
fn failure(error: RpcError) -> Failure {
    match error {
        RpcError::Timeout { .. } => Failure::failed(format!(
            "{error}: is the service running? A longer wait: --timeout SECONDS"
        )),
        other => Failure::failed(other),
    }
}
