"""The orders domain: aggregates, events, commands and command handlers. No I/O of its own."""
