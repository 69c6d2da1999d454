"""Publishing the store's log to Kafka: the relay, its checkpoint and lag, and the event envelope."""

from eventstore.relay.checkpoint import RelayCheckpoint, RelayLag, load_checkpoint, read_lag
from eventstore.relay.envelope import EventEnvelope, encode_envelope, envelope_json_schema
from eventstore.relay.relay import LeadershipLost, Relay, RelayConfig

__all__ = [
    "EventEnvelope",
    "LeadershipLost",
    "Relay",
    "RelayCheckpoint",
    "RelayConfig",
    "RelayLag",
    "encode_envelope",
    "envelope_json_schema",
    "load_checkpoint",
    "read_lag",
]
