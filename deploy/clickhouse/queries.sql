-- Net-new storage footprint per namespace: bytes (object sizes as the
-- bucket lists them) of uploads that
-- created an object in the bucket, for rows ingested in a window
-- (the accumulator reads (last_ingested_at, now() - 5 minutes]).
-- FINAL collapses batches hoard sent more than once.
SELECT
    namespace,
    sum(bytes) AS footprint_bytes,
    sum(count) AS objects_created
FROM remote_build_cache_operations FINAL
WHERE status = 'created'
  AND ingested_at > toDateTime('1970-01-01 00:00:01')
  AND ingested_at <= now()
GROUP BY namespace
ORDER BY namespace
