"""The one-command local stack: embedded Redis and S3 server, the demo and its workloads."""
