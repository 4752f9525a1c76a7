"""kevo-repl: KevoDB-compatible write-ahead log replication."""

__version__ = "0.1.0"
