"""Projection definitions, their read-model targets in PostgreSQL and Redis, and queries."""
