-- hoard's storage accounting table. Runs on ClickHouse 18.16 and current
-- releases alike.
--
-- hoard delivers every batch at least once (it resends when an
-- acknowledgement is lost) and counts it exactly once through this table:
-- rows of one batch share a batch_id, and ReplacingMergeTree keeps a single
-- row per (batch_id, row key). Read it with FINAL (see queries.sql).
--
-- The version column makes the *first* ingestion of a row win, so a resent
-- batch never moves to a later ingested_at window: a consumer that already
-- summed a window is never handed the same bytes again in the next one.
CREATE TABLE IF NOT EXISTS remote_build_cache_operations
(
    created_at DateTime,
    host String,
    namespace String,
    kind String,
    status String,
    count UInt64,
    bytes UInt64,
    batch_id String,
    ingested_at DateTime DEFAULT now(),
    first_ingestion UInt32 DEFAULT 4294967295 - toUInt32(now())
)
ENGINE = ReplacingMergeTree(first_ingestion)
PARTITION BY toYYYYMM(created_at)
ORDER BY (batch_id, created_at, host, namespace, kind, status)
