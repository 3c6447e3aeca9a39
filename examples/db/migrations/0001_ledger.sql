-- The balance of each account, kept by the ledger service.
CREATE TABLE ledger_balances (
    account text PRIMARY KEY,
    balance bigint NOT NULL
);
