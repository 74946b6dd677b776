"""The functional core of gc-compaction: plan, k-merge, key retention, split writers, statistics,
one sub-job's run and the commit of a meta job. No Celery, Redis or boto3 here: iterators and
Arrow batches of versions in, proposals out (docs/design/README.md)."""
