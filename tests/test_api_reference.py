"""API.md is the reference the server's sources give: regenerated, it must not change."""

from __future__ import annotations

import pytest

from tests.api_reference import API_MD, COMMAND, render


def test_api_md_is_what_the_openapi_document_and_error_classes_give() -> None:
    if API_MD.read_text(encoding="utf-8") != render():
        pytest.fail(f"API.md is stale: regenerate it with `{COMMAND}` and commit it")
