"""The command line (``compactor``)."""
