//! Which running runtime a `#[publish]` method belongs to.
//!
//! Callers call a `#[publish]` method without its publisher, as in the Python framework; the generated code
//! asks [`publisher_and_layers`] for it. Every handler runs inside the scope of its runtime
//! ([`CallScope`], holding the runtime's [`Shared`]), so the lookup is exact even with several
//! runtimes in one process (tests). Outside a handler (a
//! task the user spawned), the running runtime that runs the method's service is used (the
//! newest, if several run it); with none the publisher is detached and every publish returns
//! [`crate::amqp::publisher::PublishError::NotRunning`].

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, RwLock, Weak};

use tokio_util::sync::CancellationToken;

use crate::amqp::publisher::Publisher;
use crate::handler::{CallScope, HandlerKind, Layers, SendInfo};
use crate::rpc::Client;

/// Handlers by `(service, method)`, looked up on every publish and injected call.
pub(crate) type ByName<T> =
    HashMap<(&'static str, &'static str), T, BuildHasherDefault<NameHasher>>;

/// FNV-1a: the keys are a handful of short names of the program's own, so the default
/// hasher's resistance to chosen keys buys nothing and costs a few hundred instructions a lookup.
pub(crate) struct NameHasher(u64);

impl Default for NameHasher {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for NameHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// What handlers of a runtime share.
#[derive(Default)]
pub(crate) struct Shared {
    pub publishers: ByName<Publisher>,
    pub rpc_clients: ByName<Client>,
    /// The runtime's layers, when it has any.
    pub layers: Option<Layers>,
}

/// The runtimes running in the process, oldest first. Read on every publish outside a handler:
/// a read lock, so publishers do not queue on it.
static PROCESS: RwLock<Vec<Weak<Shared>>> = RwLock::new(Vec::new());

/// The scope the handlers of the runtime sharing `shared` run in, stopped by `shutdown`.
pub(crate) fn scope(shared: &Arc<Shared>, shutdown: CancellationToken) -> CallScope {
    CallScope::new(shared.clone(), shutdown)
}

/// Adds `shared` to the process's running runtimes, for code that runs outside any handler.
pub(crate) fn install(shared: &Arc<Shared>) {
    if let Ok(mut running) = PROCESS.write() {
        running.retain(|runtime| runtime.strong_count() > 0);
        running.push(Arc::downgrade(shared));
    }
}

/// Removes `shared` from the process's running runtimes.
pub(crate) fn uninstall(shared: &Arc<Shared>) {
    if let Ok(mut running) = PROCESS.write() {
        running.retain(|runtime| {
            runtime.strong_count() > 0 && !std::ptr::eq(runtime.as_ptr(), Arc::as_ptr(shared))
        });
    }
}

/// Looks `find` up in the handler's runtime, else in the process's running runtimes, newest
/// first: each has its own services, so a lookup by service finds the one that runs it.
fn lookup<T>(find: impl Fn(&Shared) -> Option<T>) -> Option<T> {
    CallScope::with_current::<Shared, T>(&find).or_else(|| {
        let running = PROCESS.read().ok()?;
        running
            .iter()
            .rev()
            .find_map(|runtime| runtime.upgrade().and_then(|shared| find(&shared)))
    })
}

/// The publisher of `service`'s `#[publish]` method `method`, and the layers of the runtime
/// that runs the service when it has any: one lookup for both. Outside a running service the
/// publisher is detached (every publish is `NotRunning`).
#[doc(hidden)]
pub fn publisher_and_layers(
    service: &'static str,
    method: &'static str,
) -> (Publisher, Option<Layers>) {
    lookup(|shared| {
        let publisher = shared.publishers.get(&(service, method))?;
        Some((publisher.clone(), shared.layers.clone()))
    })
    .unwrap_or_else(|| (Publisher::detached(service, method), None))
}

/// As [`publisher_and_layers`], for `service`'s `#[rpc::client(target)]` method `method`.
#[doc(hidden)]
pub fn client_and_layers(
    service: &'static str,
    method: &'static str,
    target: &'static str,
) -> (Client, Option<Layers>) {
    lookup(|shared| {
        let client = shared.rpc_clients.get(&(service, method))?;
        Some((client.clone(), shared.layers.clone()))
    })
    .unwrap_or_else(|| (Client::detached(target, method), None))
}

/// `sent`, a call of `service`'s `#[publish]` method (`publish`) or `#[rpc::client]` method
/// `method`, through `layers`. (The generated code boxes it: a send without layers keeps its
/// future as small as before.)
#[doc(hidden)]
pub async fn send_through<F>(
    layers: Layers,
    service: &'static str,
    method: &'static str,
    publish: bool,
    sent: F,
) -> F::Output
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    let kind = if publish {
        HandlerKind::Publish
    } else {
        HandlerKind::RpcClient
    };
    layers
        .send(SendInfo::new(service, method, kind), sent)
        .await
}
