//! PostgreSQL: the pool a service gets when its section configures a database.
//!
//! The keys are the Python framework's, read from `[DEFAULT]` or the service's section: `db_connector`
//! (`postgres`), `db_host`, `db_port` (5432), `db_name`, `db_user`, `db_password`,
//! `db_max_conn` (max connections, 10), `db_stale_timeout` (idle timeout, 300 s), `db_timeout`
//! (acquire timeout, 30 s). At start farine connects once and fails fast with an error naming
//! host, port, database and user, never the password. Queries are runtime queries: building
//! farine needs no database.

pub(crate) mod call;
// Checkpoints are the positions of SSE streams and stream queues.
#[cfg(feature = "db")]
pub(crate) mod checkpoint;
#[cfg(not(feature = "db"))]
mod without;
#[cfg(not(feature = "db"))]
pub(crate) use without::{PgPool, migrate, ping};
#[cfg(not(feature = "db"))]
pub(crate) mod checkpoint {
    pub(crate) use super::without::Checkpoint;
}

#[cfg(feature = "db")]
pub use call::{Db, DbCallError};
#[cfg(feature = "db")]
pub use sqlx;

use std::time::Duration;

#[cfg(feature = "db")]
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::config::{ConfigError, Section};

#[cfg(feature = "db")]
pub use sqlx::PgPool;

/// The database settings of a service, when it has any.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct DbSettings {
    pub host: String,
    pub port: u16,
    pub name: String,
    pub user: String,
    password: Option<String>,
    pub max_connections: u32,
    pub idle_timeout: Duration,
    pub acquire_timeout: Duration,
}

impl std::fmt::Debug for DbSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.describe())
    }
}

/// Why the database could not be used. Never contains the password.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to PostgreSQL {target}: {cause}")]
#[non_exhaustive]
pub struct DbError {
    pub target: String,
    pub cause: String,
}

impl DbSettings {
    /// The settings of `section`, or `None` when it sets no `db_connector`.
    pub fn from_config(section: &Section) -> Result<Option<Self>, ConfigError> {
        let Some(connector) = section.get_str("db_connector")? else {
            return Ok(None);
        };
        if !connector.trim().eq_ignore_ascii_case("postgres") {
            return Err(section.invalid(
                "db_connector",
                &connector,
                "one of the supported connectors: postgres",
            ));
        }
        if cfg!(not(feature = "db")) {
            return Err(section.invalid(
                "db_connector",
                &connector,
                "no database: this program was built without farine's `db` feature",
            ));
        }
        Ok(Some(Self {
            host: section.require("db_host")?,
            port: section.get_or("db_port", 5432u16)?,
            name: section.require("db_name")?,
            user: section.require("db_user")?,
            password: section.get_str("db_password")?,
            max_connections: section.get_or("db_max_conn", 10u32)?,
            idle_timeout: section.get_or("db_stale_timeout", Duration::from_secs(300))?,
            acquire_timeout: section.get_or("db_timeout", Duration::from_secs(30))?,
        }))
    }

    /// `user@host:port/database`, for logs and errors.
    pub fn describe(&self) -> String {
        format!("{}@{}:{}/{}", self.user, self.host, self.port, self.name)
    }

    /// Without the `db` feature there is no pool: [`DbSettings::from_config`] refuses
    /// `db_connector`, so this is never reached.
    #[cfg(not(feature = "db"))]
    pub async fn connect(&self) -> Result<PgPool, DbError> {
        Err(DbError {
            target: self.describe(),
            cause: "built without farine's `db` feature".to_string(),
        })
    }

    /// Opens the pool and checks, once, that a connection can be made.
    #[cfg(feature = "db")]
    pub async fn connect(&self) -> Result<PgPool, DbError> {
        let mut options = PgConnectOptions::new()
            .host(&self.host)
            .port(self.port)
            .database(&self.name)
            .username(&self.user)
            .application_name("farine");
        if let Some(password) = &self.password {
            options = options.password(password);
        }
        let pool = PgPoolOptions::new()
            .max_connections(self.max_connections)
            .idle_timeout(self.idle_timeout)
            .acquire_timeout(self.acquire_timeout)
            .connect_with(options)
            .await
            .map_err(|e| self.error(e))?;
        Ok(pool)
    }

    #[cfg(feature = "db")]
    fn error(&self, e: sqlx::Error) -> DbError {
        let mut cause = e.to_string();
        if let Some(password) = self.password.as_deref().filter(|p| !p.is_empty()) {
            cause = cause.replace(password, "****");
        }
        DbError {
            target: format!(
                "host {} port {} database {} user {}",
                self.host, self.port, self.name, self.user
            ),
            cause,
        }
    }
}

/// A migration embedded in the service binary by `farine::main!()` from the package's
/// `migrations/` folder (files `<version>_<description>.sql`, as sqlx names them).
#[derive(Debug, Clone, Copy)]
#[doc(hidden)]
pub struct EmbeddedMigration {
    pub version: i64,
    pub description: &'static str,
    pub sql: &'static str,
}

/// Applies `migrations` that the database has not seen yet, each once, under sqlx's migration
/// lock (several instances starting at once are safe).
#[cfg(feature = "db")]
pub(crate) async fn migrate(
    pool: &PgPool,
    migrations: &[EmbeddedMigration],
) -> Result<(), sqlx::Error> {
    use sqlx::SqlSafeStr;
    use sqlx::migrate::{Migration, MigrationType, Migrator};
    let migrations = migrations
        .iter()
        .map(|m| {
            Migration::new(
                m.version,
                m.description.into(),
                MigrationType::Simple,
                m.sql.into_sql_str(),
                false,
            )
        })
        .collect();
    Migrator::with_migrations(migrations)
        .run(pool)
        .await
        .map_err(|e| sqlx::Error::Migrate(Box::new(e)))
}

/// Checks a pool with one round trip (`SELECT 1`).
#[cfg(feature = "db")]
pub(crate) async fn ping(pool: &PgPool) -> Result<(), String> {
    sqlx::query("SELECT 1")
        .execute(pool)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}
