//! The db example: entries consumed in one transaction with the inbox, balances read over RPC.

use farine::db::sqlx;
use farine::{Db, DbCallError, consume};
use serde::Deserialize;

/// One ledger entry, as published to exchange `ledger` with routing key `entry`.
// `JsonSchema` puts its fields in the AsyncAPI document (`farine --start=db --asyncapi`).
#[derive(Deserialize, schemars::JsonSchema)]
pub struct Entry {
    /// The account credited (a negative amount debits it).
    account: String,
    /// In the account's smallest unit (cents).
    amount: i64,
}

/// Service `ledger`. `etc/farine.ini` sets `entry.inbox = true`: each entry runs in a
/// transaction that also records its `message_id`, committed before the ack, so an entry
/// delivered twice (published twice, or redelivered after a crash) is applied once.
#[derive(Default)]
pub struct Ledger;

#[farine::service]
impl Ledger {
    // `inbox`: each entry runs once, whatever the broker redelivers; the code relies on it, so
    // the attribute says it (the config can still set `entry.inbox`).
    #[consume(exchange = "ledger", routing_key = "entry", inbox)]
    async fn entry(&self, entry: Entry) -> Result<(), DbCallError> {
        let db = Db::current();
        let mut conn = db.conn().await?;
        sqlx::query(
            "INSERT INTO ledger_balances (account, balance) VALUES ($1, $2)
             ON CONFLICT (account) DO UPDATE SET balance = ledger_balances.balance + $2",
        )
        .bind(&entry.account)
        .bind(entry.amount)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// The balance of `account` (0 for an account never seen).
    #[farine::rpc::method]
    async fn balance(&self, account: String) -> Result<i64, DbCallError> {
        let db = Db::current();
        let mut conn = db.conn().await?;
        let balance: Option<i64> =
            sqlx::query_scalar("SELECT balance FROM ledger_balances WHERE account = $1")
                .bind(&account)
                .fetch_optional(&mut *conn)
                .await?;
        Ok(balance.unwrap_or(0))
    }
}
