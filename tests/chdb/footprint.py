"""Runs hoard's ClickHouse DDL and footprint query on a current ClickHouse
engine (chdb, embedded) over rows exported from a real run, and prints the
query's result as TSV.

usage: python footprint.py SCHEMA.sql QUERIES.sql ROWS.tsv
ROWS.tsv holds every column of remote_build_cache_operations, in table
order, as `SELECT * ... FORMAT TSV` wrote them.
"""
import sys

from chdb import session


def main() -> None:
    schema, queries, rows = (open(p).read() for p in sys.argv[1:4])
    s = session.Session()
    s.query("CREATE DATABASE IF NOT EXISTS hoard")
    s.query("USE hoard")
    s.query(schema)
    values = []
    for line in rows.splitlines():
        if not line:
            continue
        f = line.split("\t")
        (created_at, host, namespace, kind, status, count, nbytes, batch_id,
         ingested_at, first_ingestion) = f
        q = lambda v: "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
        values.append(
            f"({q(created_at)}, {q(host)}, {q(namespace)}, {q(kind)}, {q(status)}, "
            f"{count}, {nbytes}, {q(batch_id)}, {q(ingested_at)}, {first_ingestion})"
        )
    if values:
        s.query(
            "INSERT INTO remote_build_cache_operations "
            "(created_at, host, namespace, kind, status, count, bytes, batch_id, "
            "ingested_at, first_ingestion) VALUES " + ", ".join(values)
        )
    version = str(s.query("SELECT version()", "TSV")).strip()
    print(f"# chdb ClickHouse {version}", file=sys.stderr)
    sys.stdout.write(str(s.query(queries.strip().rstrip(";"), "TSV")))


if __name__ == "__main__":
    main()
