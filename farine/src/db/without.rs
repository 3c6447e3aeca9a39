//! What stands in for the database when farine is built without its `db` feature: types with
//! no values, so the code that would use a pool compiles and never runs (`db_connector` is
//! refused at start).

use std::convert::Infallible;

use super::EmbeddedMigration;

/// No pool: this type has no values.
#[derive(Clone, Debug)]
pub(crate) enum PgPool {}

impl PgPool {
    pub(crate) async fn close(&self) {
        match *self {}
    }
}

pub(crate) async fn migrate(pool: &PgPool, _: &[EmbeddedMigration]) -> Result<(), Infallible> {
    match *pool {}
}

pub(crate) async fn create_inbox(pool: &PgPool) -> Result<(), Infallible> {
    match *pool {}
}

pub(crate) async fn ping(pool: &PgPool) -> Result<(), String> {
    match *pool {}
}

/// No checkpoint table: a stream's position is kept in memory.
#[derive(Clone, Debug)]
pub(crate) enum Checkpoint {}

impl Checkpoint {
    pub(crate) async fn open(pool: PgPool, _: &str, _: &str) -> Result<Self, Infallible> {
        match pool {}
    }

    pub(crate) async fn load(&self) -> Result<Option<String>, Infallible> {
        match *self {}
    }

    pub(crate) async fn save(&self, _: &str) -> Result<(), Infallible> {
        match *self {}
    }
}
