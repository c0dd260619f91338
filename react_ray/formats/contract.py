"""Reading a typed JSON contract: a missing file and an invalid one each get one precise error."""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError

from react_ray.formats import storage

M = TypeVar("M", bound=BaseModel)


def read_contract(model_type: type[M], uri: str, missing: str) -> M:
    """``uri`` parsed as ``model_type``; ``missing`` says what its absence means."""
    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri}: {missing}")
    try:
        return model_type.model_validate_json(storage.read_bytes(uri))
    except ValidationError as e:
        raise ValueError(f"{uri} is not a valid {model_type.__name__}: {e}") from None
