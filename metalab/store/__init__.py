"""The local SQLite registry: the index of run folders (``runs``) and the service's tenants, keys,
adapters and examples (``registry``)."""

from metalab.store.registry import Registry, default_registry_path

__all__ = ["Registry", "default_registry_path"]
