"""The PostgreSQL event store: schema migrations, appends, commit-ordered reading and the relay.

Knows nothing of any particular domain.
"""
