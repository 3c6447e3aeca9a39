//! RPC over AMQP: `#[rpc::method]` on the server side, [`Client`](crate::rpc::Client) (and `#[rpc::client]`, and the
//! typed clients of `#[rpc::interface]`) on the calling side.
//!
//! The wire format is baguette-messaging's, so services written with either framework call each
//! other; `docs/rpc-protocol.md` specifies it. A call is a message to exchange `<service>` with
//! routing key `<service>__<method>` and body `{"args": [...], "kwargs": {...}}`; the replies
//! go to the caller's `reply_to` queue with the call's `correlation_id`.

pub(crate) mod client;
pub(crate) mod server;
pub(crate) mod wire;

use std::time::Duration;

pub use client::{Args, CallOptions, Client, RpcStream};
pub use farine_macros::{rpc_client as client, rpc_interface as interface, rpc_method as method};
pub use futures_util::stream;
pub use futures_util::{Stream, StreamExt};
pub use wire::ErrorKind;

/// A failed call, naming the service, the method and the cause.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum RpcError {
    /// The method ran and failed (returned `Err`, or panicked: `kind` says which when the server
    /// is farine).
    #[error("{service}.{method} failed: {message}")]
    Remote {
        service: String,
        method: String,
        kind: Option<ErrorKind>,
        message: String,
    },
    /// An argument is missing, extra or of the wrong type; the server names it.
    #[error("{service}.{method}: bad arguments: {message}")]
    BadArguments {
        service: String,
        method: String,
        param: Option<String>,
        message: String,
    },
    /// No exchange `<service>`: no such service runs (or ever declared its topology).
    #[error(
        "no service `{service}` is listening (exchange `{service}` does not exist), calling `{method}`"
    )]
    NoSuchService { service: String, method: String },
    /// The service runs but serves no method of that name.
    #[error("service `{service}` has no method `{method}`")]
    NoSuchMethod { service: String, method: String },
    /// No reply within the call's timeout.
    #[error("{service}.{method} did not answer within {after:?}")]
    Timeout {
        service: String,
        method: String,
        after: Duration,
    },
    /// The reply does not decode into the type the caller expects.
    #[error("{service}.{method}: the reply does not decode as the expected type: {cause}")]
    Decode {
        service: String,
        method: String,
        cause: String,
    },
    /// The arguments cannot be serialised.
    #[error("{service}.{method}: cannot encode the arguments: {cause}")]
    Encode {
        service: String,
        method: String,
        cause: String,
    },
    /// The broker could not be reached, or the connection was lost during the call.
    #[error("{service}.{method}: {cause}")]
    Connection {
        service: String,
        method: String,
        cause: String,
    },
    /// The broker refused the call: `NoConsumers` when the service's queue exists but no
    /// instance consumes it (found when a call times out).
    #[error("{service}.{method}: {error}")]
    Broker {
        service: String,
        method: String,
        #[source]
        error: Box<crate::amqp::error::BrokerError>,
    },
    /// An injected client used where no farine runtime runs its service.
    #[error(
        "the RPC client of `{caller}` (calling {service}.{method}) was used outside a running farine service: start the service with farine, or pass a client yourself (`{caller}_with`)"
    )]
    NotRunning {
        service: String,
        method: String,
        caller: &'static str,
    },
}

impl RpcError {
    /// The kind of failure, as a metric's label: `remote`, `timeout`, `no_such_method`, ...
    pub(crate) fn kind_name(&self) -> &'static str {
        match self {
            RpcError::Remote { .. } => "remote",
            RpcError::BadArguments { .. } => "bad_arguments",
            RpcError::NoSuchService { .. } => "no_such_service",
            RpcError::NoSuchMethod { .. } => "no_such_method",
            RpcError::Timeout { .. } => "timeout",
            RpcError::Decode { .. } => "decode",
            RpcError::Encode { .. } => "encode",
            RpcError::Connection { .. } => "connection",
            RpcError::Broker { .. } => "broker",
            RpcError::NotRunning { .. } => "not_running",
        }
    }

    /// The service called.
    pub fn service(&self) -> &str {
        match self {
            RpcError::Remote { service, .. }
            | RpcError::BadArguments { service, .. }
            | RpcError::NoSuchService { service, .. }
            | RpcError::NoSuchMethod { service, .. }
            | RpcError::Timeout { service, .. }
            | RpcError::Decode { service, .. }
            | RpcError::Encode { service, .. }
            | RpcError::Connection { service, .. }
            | RpcError::Broker { service, .. }
            | RpcError::NotRunning { service, .. } => service,
        }
    }

    /// For a [`Remote`](RpcError::Remote) error from a baguette-messaging (Python farine)
    /// server, whose message is the Python traceback: the exception's class and message, read
    /// from the traceback's last line (`ValueError: no such user` gives `("ValueError", "no
    /// such user")`). `None` for other errors and for farine servers' messages.
    ///
    /// ```
    /// # use farine::rpc::RpcError;
    /// # fn show(error: &RpcError) {
    /// if let Some((class, message)) = error.python_exception() {
    ///     eprintln!("the Python server raised {class}: {message}");
    /// }
    /// # }
    /// ```
    pub fn python_exception(&self) -> Option<(&str, &str)> {
        let RpcError::Remote {
            kind: None,
            message,
            ..
        } = self
        else {
            return None;
        };
        if !message.starts_with("Traceback (most recent call last):") {
            return None;
        }
        // The exception follows the last frame (`  File ...`) and its source line (indented
        // four spaces, when Python had the source); its message may take several lines.
        let message = message.trim_end();
        let lines: Vec<&str> = message.lines().collect();
        let frame = lines.iter().rposition(|line| line.starts_with("  File "))?;
        let mut rest = &lines[frame + 1..];
        if rest.first().is_some_and(|line| line.starts_with("    ")) {
            rest = &rest[1..];
        }
        let first = *rest.first()?;
        // Where the exception's line starts in `message` (the lines are slices of it).
        let at = first.as_ptr() as usize - message.as_ptr() as usize;
        let exception = &message[at..];
        // `raise ValueError` with no message prints the class alone.
        let (class, text) = match first.split_once(": ") {
            Some((class, _)) => (class, &exception[class.len() + 2..]),
            None => (first, ""),
        };
        let class = class.trim();
        let is_name = !class.is_empty()
            && class
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
        is_name.then_some((class, text))
    }

    /// The method called.
    pub fn method(&self) -> &str {
        match self {
            RpcError::Remote { method, .. }
            | RpcError::BadArguments { method, .. }
            | RpcError::NoSuchService { method, .. }
            | RpcError::NoSuchMethod { method, .. }
            | RpcError::Timeout { method, .. }
            | RpcError::Decode { method, .. }
            | RpcError::Encode { method, .. }
            | RpcError::Connection { method, .. }
            | RpcError::Broker { method, .. }
            | RpcError::NotRunning { method, .. } => method,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(message: &str) -> RpcError {
        RpcError::Remote {
            service: "pycalc".into(),
            method: "fail".into(),
            kind: None,
            message: message.into(),
        }
    }

    #[test]
    fn a_python_traceback_gives_the_exception_class_and_message() {
        let traceback = "Traceback (most recent call last):\n  File \"/srv/farine/rpc/server.py\", line 22, in main_callback\n    result = self.callback(*result['args'], **result['kwargs'])\nValueError: no such user: ana\n";
        assert_eq!(
            remote(traceback).python_exception(),
            Some(("ValueError", "no such user: ana"))
        );
        let bare = "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\nKeyError\n";
        assert_eq!(remote(bare).python_exception(), Some(("KeyError", "")));
        let lines = "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n    raise ValueError(\"a\\nb\")\nValueError: a\nb\n";
        assert_eq!(
            remote(lines).python_exception(),
            Some(("ValueError", "a\nb"))
        );
    }

    #[test]
    fn other_errors_have_no_python_exception() {
        assert_eq!(remote("boom").python_exception(), None);
        let farine = RpcError::Remote {
            service: "s".into(),
            method: "m".into(),
            kind: Some(ErrorKind::Remote),
            message: "Traceback (most recent call last):\nValueError: x".into(),
        };
        assert_eq!(farine.python_exception(), None);
        let timeout = RpcError::Timeout {
            service: "s".into(),
            method: "m".into(),
            after: Duration::from_secs(1),
        };
        assert_eq!(timeout.python_exception(), None);
    }
}
