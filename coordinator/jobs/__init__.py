"""Coordination: planning meta jobs and cutting them into sub-jobs, the meta-job flow and its one
commit, the auto-trigger, the scheduler loop and orphan cleanup (docs/design/README.md)."""
