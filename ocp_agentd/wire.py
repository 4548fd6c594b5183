"""How shapes are spelled on the wire: the casing of each API family, declared once.

- ``/api/v1`` (SPEC section 6) speaks snake_case (``create_time``): its shapes are
  dataclasses and TypedDicts whose Python names are the wire names.
- The OCP routes (``/compute/...``, ``/api/v2/...``, SPEC section 5) speak the OCP server's
  camelCase (``hostId``, ``startTime``): their shapes subclass :class:`OcpModel`, which
  keeps snake_case in Python and writes camelCase (``alias_generator=to_camel``) in JSON,
  in the OpenAPI document and when reading.

A field that exists only for the daemon (not in the seed's shape) is declared with
``Field(exclude=True)``: never sent, not in the document.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class OcpModel(BaseModel):
    """Base of every camelCase (OCP) shape. Every field is always sent, so the document
    lists them all as ``required``."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        json_schema_serialization_defaults_required=True,
        # Validators and serializers are built on first use, not at import: the daemon
        # answers its first request before any OCP shape is needed.
        defer_build=True,
    )
