"""Planning and control: auto-trigger, job splitting, meta-job state, the CLI and the task API."""
