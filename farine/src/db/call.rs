//! The database of one handler call: a pooled connection taken on first use and given back
//! after the call, or a transaction farine opens before the call and ends after it, with the
//! inbox that keeps a redelivered message from applying its effect twice.

#![cfg_attr(not(feature = "db"), allow(dead_code, unused_imports))]

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
#[cfg(feature = "db")]
use sqlx::pool::PoolConnection;
#[cfg(feature = "db")]
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
#[cfg(feature = "db")]
use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard};

use crate::handler::{Outcome, panic_message};

#[cfg(feature = "db")]
tokio::task_local! {
    static CALL: Db;
}

#[cfg(feature = "db")]
enum State {
    Idle,
    /// The call is over: the handle no longer reaches the database.
    Closed,
    Conn(PoolConnection<Postgres>),
    Tx(Transaction<'static, Postgres>),
}

/// The database of the current handler call. Ask for it with a parameter of this type in any
/// handler (or with [`Db::current`]); cheap to clone.
///
/// ```no_run
/// use farine::db::sqlx;
/// use farine::{Db, DbCallError, consume};
///
/// #[derive(serde::Deserialize)]
/// struct Entry {
///     account: String,
///     amount: i64,
/// }
///
/// #[derive(Default)]
/// struct Ledger;
///
/// #[farine::service]
/// impl Ledger {
///     #[consume(exchange = "ledger", routing_key = "entry")]
///     async fn entry(&self, entry: Entry, db: Db) -> Result<(), DbCallError> {
///         let mut conn = db.conn().await?;
///         sqlx::query("INSERT INTO entries (account, amount) VALUES ($1, $2)")
///             .bind(&entry.account)
///             .bind(entry.amount)
///             .execute(&mut *conn)
///             .await?;
///         Ok(())
///     }
/// }
/// # fn main() {}
/// ```
#[cfg(feature = "db")]
#[derive(Clone)]
pub struct Db {
    inner: Option<(PgPool, Arc<Mutex<State>>)>,
}

/// Why the database of a call cannot be used.
#[cfg(feature = "db")]
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DbCallError {
    #[error(
        "this handler has no database: set db_connector (and the db_* keys) in its service's section"
    )]
    NotConfigured,
    #[error(
        "this database handle belongs to a handler call that is over; use Db::current() in the call"
    )]
    CallOver,
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

#[cfg(feature = "db")]
impl Db {
    fn new(pool: PgPool, state: State) -> Self {
        Self {
            inner: Some((pool, Arc::new(Mutex::new(state)))),
        }
    }

    /// The database of the handler call running now (no database outside a call, or for a
    /// service without `db_connector`: [`Db::conn`] then says so).
    pub fn current() -> Self {
        CALL.try_with(Clone::clone).unwrap_or(Self { inner: None })
    }

    /// The pool, for work beyond the call's connection.
    pub fn pool(&self) -> Result<&PgPool, DbCallError> {
        self.inner
            .as_ref()
            .map(|(pool, _)| pool)
            .ok_or(DbCallError::NotConfigured)
    }

    /// The call's connection: taken from the pool on first use and given back when the call
    /// ends; inside the call's transaction when farine opened one (`transaction = true`).
    pub async fn conn(&self) -> Result<MappedMutexGuard<'_, PgConnection>, DbCallError> {
        let (pool, state) = self.inner.as_ref().ok_or(DbCallError::NotConfigured)?;
        let mut guard = state.lock().await;
        if matches!(*guard, State::Closed) {
            return Err(DbCallError::CallOver);
        }
        if matches!(*guard, State::Idle) {
            *guard = State::Conn(pool.acquire().await?);
        }
        Ok(MutexGuard::map(guard, |state| match state {
            State::Conn(conn) => &mut **conn,
            State::Tx(tx) => &mut **tx,
            State::Idle | State::Closed => unreachable!("a connection was just taken"),
        }))
    }

    /// Ends the call: the connection goes back to the pool, later uses are errors.
    async fn close(&self) {
        if let Some((_, state)) = &self.inner {
            *state.lock().await = State::Closed;
        }
    }

    /// A transaction of its own, on another connection of the pool.
    pub async fn begin(&self) -> Result<Transaction<'static, Postgres>, DbCallError> {
        Ok(self.pool()?.begin().await?)
    }
}

/// The database of the call, as a parameter of a handler of any kind.
#[cfg(feature = "db")]
impl<C> crate::handler::FromCall<C> for Db {
    fn from_call(_: &C) -> Result<Self, crate::handler::Rejection> {
        Ok(Db::current())
    }
}

/// How farine wraps a handler's calls in the database, from the handler's config.
#[derive(Clone, Debug)]
pub(crate) struct CallDb {
    /// Without the `db` feature a type with no values: no call has a database.
    pub pool: super::PgPool,
    pub transaction: bool,
    pub inbox: Option<Inbox>,
}

/// The inbox of one consumer: `farine_inbox` rows keyed by service, handler and message id.
#[derive(Clone, Debug)]
pub(crate) struct Inbox {
    pub service: &'static str,
    pub handler: &'static str,
}

#[cfg(feature = "db")]
pub(crate) const CREATE_INBOX: &str = "CREATE TABLE IF NOT EXISTS farine_inbox (
    service text NOT NULL,
    handler text NOT NULL,
    message_id text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (service, handler, message_id)
)";

/// Creates the inbox table (once, whatever the number of instances starting at once).
#[cfg(feature = "db")]
pub(crate) async fn create_inbox(pool: &PgPool) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('farine_inbox'))")
        .execute(&mut *tx)
        .await?;
    sqlx::query(CREATE_INBOX).execute(&mut *tx).await?;
    tx.commit().await
}

/// The result of a call made in the database.
pub(crate) enum Called {
    /// The handler ran; its outcome (a failed commit is a failure).
    Ran(Outcome),
    /// The inbox already holds this message id: the handler did not run.
    Duplicate,
}

/// Runs `call` with its database: in a transaction when configured (committed when the
/// handler succeeds, rolled back otherwise), after recording `message_id` in the inbox.
pub(crate) async fn around<F>(plan: Option<&CallDb>, message_id: Option<&str>, call: F) -> Called
where
    F: Future<Output = Outcome>,
{
    let call = AssertUnwindSafe(call).catch_unwind();
    match plan {
        None => Called::Ran(caught(call.await)),
        // Boxed: sqlx's futures are large, and a call without a database should not carry
        // their space in its own (every call's future is moved into its task).
        #[cfg(feature = "db")]
        Some(plan) => Box::pin(with_db(plan, message_id, call)).await,
        #[cfg(not(feature = "db"))]
        Some(plan) => {
            let _ = message_id;
            match plan.pool {}
        }
    }
}

fn caught(result: Result<Outcome, Box<dyn std::any::Any + Send>>) -> Outcome {
    result.unwrap_or_else(|panic| Outcome::Failed(format!("panicked: {}", panic_message(&*panic))))
}

#[cfg(feature = "db")]
async fn with_db<F>(plan: &CallDb, message_id: Option<&str>, call: F) -> Called
where
    F: Future<Output = Result<Outcome, Box<dyn std::any::Any + Send>>>,
{
    if !plan.transaction {
        let db = Db::new(plan.pool.clone(), State::Idle);
        let outcome = caught(CALL.scope(db.clone(), call).await);
        db.close().await;
        return Called::Ran(outcome);
    }
    let mut tx = match plan.pool.begin().await {
        Ok(tx) => tx,
        Err(e) => return Called::Ran(Outcome::Failed(format!("cannot begin a transaction: {e}"))),
    };
    if let (Some(inbox), Some(id)) = (&plan.inbox, message_id) {
        let recorded = sqlx::query(
            "INSERT INTO farine_inbox (service, handler, message_id) VALUES ($1, $2, $3)
             ON CONFLICT DO NOTHING",
        )
        .bind(inbox.service)
        .bind(inbox.handler)
        .bind(id)
        .execute(&mut *tx)
        .await;
        match recorded {
            Ok(done) if done.rows_affected() == 0 => {
                let _ = tx.rollback().await;
                return Called::Duplicate;
            }
            Ok(_) => {}
            Err(e) => {
                return Called::Ran(Outcome::Failed(format!(
                    "cannot record the message in the inbox: {e}"
                )));
            }
        }
    }
    let db = Db::new(plan.pool.clone(), State::Tx(tx));
    let outcome = caught(CALL.scope(db.clone(), call).await);
    let state = match db.inner {
        Some((_, state)) => std::mem::replace(&mut *state.lock().await, State::Closed),
        None => State::Idle,
    };
    let State::Tx(tx) = state else {
        return Called::Ran(outcome);
    };
    match outcome {
        Outcome::Done => match tx.commit().await {
            Ok(()) => Called::Ran(Outcome::Done),
            Err(e) => Called::Ran(Outcome::Failed(format!("the commit failed: {e}"))),
        },
        other => {
            let _ = tx.rollback().await;
            Called::Ran(other)
        }
    }
}

#[cfg(not(feature = "db"))]
pub(crate) use super::without::create_inbox;
