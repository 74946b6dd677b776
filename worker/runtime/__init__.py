"""The job runtime: the Celery app and tasks, job records and the attempt protocol in Redis, the
node lock, running a sub-job in one process, and metrics (docs/design/README.md)."""
