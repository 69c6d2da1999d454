"""datalayer: an event-sourced data store with CQRS projections for Python services.

This package is the operator's layer on top of ``domain``, ``eventstore``, ``projections`` and
``consumers``: the settings read from the environment, the clients built from them, and the CLI.
"""

from datalayer.settings import Settings, SettingsError, load_settings

__all__ = ["Settings", "SettingsError", "load_settings"]
