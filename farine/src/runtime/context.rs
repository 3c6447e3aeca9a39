//! Which running runtime a `#[publish]` method belongs to.
//!
//! Callers call a `#[publish]` method without its publisher, as in the seed; the generated code
//! asks [`with_publisher`] for it. Every handler runs inside the scope of its runtime
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

/// Calls `call` (a call of `service`'s `#[publish]` method `method`) with the method's
/// publisher, through the layers of the runtime that runs the service: one lookup for both.
/// Outside a running service the publisher is detached (every publish is `NotRunning`).
#[doc(hidden)]
pub async fn with_publisher<F, Fut>(
    service: &'static str,
    method: &'static str,
    call: F,
) -> Fut::Output
where
    F: FnOnce(Publisher) -> Fut,
    Fut: std::future::Future + Send,
    Fut::Output: Send,
{
    let found = lookup(|shared| {
        let publisher = shared.publishers.get(&(service, method))?;
        Some((publisher.clone(), shared.layers.clone()))
    });
    match found {
        None => call(Publisher::detached(service, method)).await,
        Some((publisher, None)) => call(publisher).await,
        Some((publisher, Some(layers))) => {
            let send = SendInfo::new(service, method, HandlerKind::Publish);
            layers.send(send, call(publisher)).await
        }
    }
}

/// As [`with_publisher`], for `service`'s `#[rpc::client(target)]` method `method`.
#[doc(hidden)]
pub async fn with_rpc_client<F, Fut>(
    service: &'static str,
    method: &'static str,
    target: &'static str,
    call: F,
) -> Fut::Output
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future + Send,
    Fut::Output: Send,
{
    let found = lookup(|shared| {
        let client = shared.rpc_clients.get(&(service, method))?;
        Some((client.clone(), shared.layers.clone()))
    });
    match found {
        None => call(Client::detached(target, method)).await,
        Some((client, None)) => call(client).await,
        Some((client, Some(layers))) => {
            let send = SendInfo::new(service, method, HandlerKind::RpcClient);
            layers.send(send, call(client)).await
        }
    }
}
