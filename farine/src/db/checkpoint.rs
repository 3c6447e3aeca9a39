//! Where a `#[stream::http]` handler's or a stream queue consumer's position is kept across
//! restarts of the process: table `farine_checkpoint`, one row per service and handler,
//! created on first use.

use sqlx::PgPool;

const CREATE: &str = "CREATE TABLE IF NOT EXISTS farine_checkpoint (
    service text NOT NULL,
    handler text NOT NULL,
    position text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (service, handler)
)";

/// The checkpoints of one handler.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pool: PgPool,
    service: String,
    handler: String,
}

impl Checkpoint {
    /// The checkpoint of `service.handler`, creating the table if needed.
    pub async fn open(pool: PgPool, service: &str, handler: &str) -> Result<Self, sqlx::Error> {
        // Concurrent starts may race on CREATE TABLE IF NOT EXISTS: serialise with a lock.
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('farine_checkpoint'))")
            .execute(&mut *tx)
            .await?;
        sqlx::query(CREATE).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(Self {
            pool,
            service: service.to_string(),
            handler: handler.to_string(),
        })
    }

    /// The last position saved, if any.
    pub async fn load(&self) -> Result<Option<String>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT position FROM farine_checkpoint WHERE service = $1 AND handler = $2",
        )
        .bind(&self.service)
        .bind(&self.handler)
        .fetch_optional(&self.pool)
        .await
    }

    /// Saves `position` as the last one handled.
    pub async fn save(&self, position: &str) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO farine_checkpoint (service, handler, position) VALUES ($1, $2, $3)
             ON CONFLICT (service, handler) DO UPDATE SET position = $3, updated_at = now()",
        )
        .bind(&self.service)
        .bind(&self.handler)
        .bind(position)
        .execute(&self.pool)
        .await
        .map(|_| ())
    }
}
