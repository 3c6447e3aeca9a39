//! The handler core: what every handler kind (consume, RPC method, SSE listener, execute)
//! shares, above the transport and below the kinds. How a call ends ([`Outcome`]) and a panic
//! is caught, how parameters are taken from a call (`FromCall`), the layers around calls and
//! sends (`Layer`), the calls a task has in flight and how they drain, readiness, the shutdown
//! signal, the scope a call runs in, a handler task as the runtime supervises it, and the
//! description of a handler. Nothing here names a transport: the core holds no lapin type, so
//! another transport can run the same handlers (`docs/architecture.md`).

pub(crate) mod description;
pub(crate) mod extract;
pub(crate) mod in_flight;
pub(crate) mod layer;
pub(crate) mod outcome;
pub(crate) mod ready;
pub(crate) mod schema;
pub(crate) mod scope;
pub(crate) mod shutdown;
pub(crate) mod task;

pub use description::{Description, ExchangeDescription, HandlerKind, QueueDescription};
pub use extract::{FromCall, Rejection};
pub(crate) use in_flight::InFlight;
pub use layer::Layers;
pub use layer::{CallInfo, Layer, Next, SendInfo};
pub(crate) use outcome::panic_message;
pub use outcome::{IntoOutcome, Outcome};
pub(crate) use ready::Ready;
pub(crate) use scope::CallScope;
pub use shutdown::Shutdown;
pub(crate) use task::{Connected, Task, TaskEnv, TaskError};
