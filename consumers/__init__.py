"""The Kafka consumer runtime that feeds events to projections."""
