"""OpenAI model id <-> function id (docs/CONTRACTS.md)."""

from __future__ import annotations

import pytest

from services.gateway.models import function_id_for, model_id_for
from snapwake import errors


@pytest.mark.parametrize(("model", "tenant", "function_id"), [
    ("llama", "acme", "acme/default/llama"),
    ("team/llama", "acme", "acme/team/llama"),
    ("acme/team/llama", "acme", "acme/team/llama"),
    ("acme/default/llama-3-8b", "acme", "acme/default/llama-3-8b"),
    ("x", "default", "default/default/x"),
])
def test_model_to_function(model: str, tenant: str, function_id: str) -> None:
    assert function_id_for(model, tenant) == function_id


@pytest.mark.parametrize(("model", "tenant"), [
    ("other/team/llama", "acme"),  # someone else's tenant
    ("a/b/c/d", "acme"),
    ("", "acme"),
    ("Llama", "acme"),  # upper case is never a function part
    ("-llama", "acme"),
    ("team/", "acme"),
    ("x" * 64, "acme"),
])
def test_bad_model_is_not_found_naming_model(model: str, tenant: str) -> None:
    with pytest.raises(errors.NotFound) as info:
        function_id_for(model, tenant)
    assert info.value.field == "model"


@pytest.mark.parametrize(("function_id", "model"), [
    ("acme/default/llama", "llama"),
    ("acme/team/llama", "team/llama"),
])
def test_function_to_model_round_trips(function_id: str, model: str) -> None:
    assert model_id_for(function_id) == model
    assert function_id_for(model, function_id.split("/")[0]) == function_id
