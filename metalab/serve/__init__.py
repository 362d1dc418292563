"""``metalab serve``: per-tenant few-shot adapters over HTTP, persisted in the SQLite registry.

Layout: ``metalab.store.registry`` (SQLite: tenants, hashed keys, adapters, examples; migrations), ``model``
(the served run: features and fitted adapters), ``schemas`` (request/response bodies and limits),
``app`` (FastAPI routes, auth, errors), ``server`` (uvicorn on a bound socket), ``page.html``.
"""

from metalab.store.registry import Registry, default_registry_path

__all__ = ["Registry", "default_registry_path"]
