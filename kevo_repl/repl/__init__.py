"""WAL replication between kevo-repl nodes: the frame codec and, around it, primary and replica."""
