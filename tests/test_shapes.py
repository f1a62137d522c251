"""The client's shapes of the server's answers are the OpenAPI document's: one source.

Each ``TypedDict`` in ``messenger_client`` is compared with the schema it types (a component,
or the answers of one operation), field by field: the same names, the same required ones,
and the same types, down to the nested records. A field added to the server's document and
not to the client (or the reverse) fails here.
"""

from __future__ import annotations

import types
import typing
from typing import Any, NotRequired, Required

import pytest

import messenger_client as mc
import messenger_server as ms

DOCUMENT: dict[str, Any] = ms.build_openapi()
SCALARS: dict[Any, str] = {int: "integer", float: "number", str: "string", bool: "boolean"}


def component(name: str) -> list[dict[str, Any]]:
    schema: dict[str, Any] = DOCUMENT["components"]["schemas"][name]
    return [schema]


def answers(method: str, path: str) -> list[dict[str, Any]]:
    """The JSON schemas of an operation's successful answers, each alternative apart."""
    schemas: list[dict[str, Any]] = []
    for status, answer in DOCUMENT["paths"][path][method.lower()]["responses"].items():
        if status.startswith("2") and "content" in answer:
            schema = answer["content"]["application/json"]["schema"]
            schemas += schema.get("oneOf", [schema])
    return schemas


# What each client shape types, and where the document says it.
SHAPES: list[tuple[Any, list[dict[str, Any]]]] = [
    (mc.FileInfo, component("FileRef")),
    (mc.UploadedFile, component("File")),
    (mc.Notice, component("Notice")),
    (mc.Message, component("Message")),
    (mc.Scheduled, component("Scheduled")),
    (mc.Chat, component("Chat")),
    (mc.Status, component("Status")),
    (mc.ConnectAnswer, answers("POST", "/connect")),
    (mc.SendAnswer, answers("POST", "/send")),
    (mc.MessagesPage, answers("GET", "/messages")),
    (mc.HistoryPage, answers("GET", "/history")),
    (mc.Thread, answers("GET", "/messages/{id}")),
    (mc.ScheduledList, answers("GET", "/scheduled")),
    (mc.ChatList, answers("GET", "/chat")),
    (mc.JoinAnswer, answers("POST", "/chat")),
    (mc.ChatAnswer, answers("POST", "/chat/{name}/leave")),
    (mc.ChatAnswer, answers("POST", "/chat/{name}/invite")),
    (mc.ChatAnswer, answers("POST", "/chat/{name}/requests/{user}")),
    (mc.LinkAnswer, answers("POST", "/chat/{name}/link")),
    (mc.RequestList, answers("GET", "/chat/{name}/requests")),
    (mc.JoinRequestAnswer, answers("POST", "/join/{token}")),
    (mc.ReportAnswer, answers("POST", "/report")),
    (mc.UploadAnswer, answers("POST", "/files")),
]


def resolve(schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    resolved: dict[str, Any] = DOCUMENT["components"]["schemas"][ref.rsplit("/", 1)[-1]]
    return resolved


def nullable(schema: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """Whether a schema allows null, and the schema of its other values."""
    if "oneOf" in schema:
        others = [s for s in schema["oneOf"] if s != {"type": "null"}]
        assert len(others) == 1, schema
        return len(others) < len(schema["oneOf"]), resolve(others[0])
    kinds = schema.get("type")
    if isinstance(kinds, list) and "null" in kinds:
        rest = [kind for kind in kinds if kind != "null"]
        return True, {**schema, "type": rest[0] if len(rest) == 1 else rest}
    return False, resolve(schema)


def mismatches(hint: Any, schema: dict[str, Any], where: str) -> list[str]:
    """How the type ``hint`` and the JSON ``schema`` differ (nothing when they agree)."""
    allows_null, schema = nullable(schema)
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType):
        others = [arg for arg in args if arg is not type(None)]
        if not allows_null or len(others) != 1:
            return [f"{where}: {hint} is not the schema's {schema}"]
        hint = others[0]
    elif allows_null:
        return [f"{where}: the schema allows null, {hint} does not"]
    if typing.is_typeddict(hint):
        return record_mismatches(hint, [schema], where)
    origin = typing.get_origin(hint)
    if origin is list:
        if schema.get("type") != "array":
            return [f"{where}: a list, the schema's {schema}"]
        return mismatches(args[0], schema["items"], f"{where}[]")
    if origin is dict:
        if schema.get("type") != "object" or "additionalProperties" not in schema:
            return [f"{where}: a dict, the schema's {schema}"]
        return mismatches(args[1], schema["additionalProperties"], f"{where}{{}}")
    if SCALARS.get(hint) != schema.get("type"):
        return [f"{where}: {hint} is not the schema's {schema.get('type')}"]
    return []


def required_fields(shape: Any) -> set[str]:
    """A TypedDict's required fields, read from its hints (``__required_keys__`` misses
    ``NotRequired`` in a module of postponed annotations, before Python 3.14)."""
    required = set()
    for name, hint in typing.get_type_hints(shape, include_extras=True).items():
        marker = typing.get_origin(hint)
        if marker is Required or (shape.__total__ and marker is not NotRequired):
            required.add(name)
    return required


def record_mismatches(shape: Any, schemas: list[dict[str, Any]], where: str) -> list[str]:
    """A TypedDict against one object schema or several alternatives: its fields are all
    those the alternatives name, required when every alternative requires them."""
    objects = [resolve(schema) for schema in schemas]
    fields: dict[str, dict[str, Any]] = {}
    for schema in objects:
        fields.update(schema["properties"])
    required = set.intersection(*(set(schema.get("required", [])) for schema in objects))
    hints = typing.get_type_hints(shape)
    found: list[str] = []
    if hints.keys() != fields.keys():
        found.append(f"{where}: fields {sorted(hints)} but the schema's {sorted(fields)}")
    if required_fields(shape) != required:
        found.append(
            f"{where}: required {sorted(required_fields(shape))} but the schema's "
            f"{sorted(required)}"
        )
    for name in hints.keys() & fields.keys():
        found += mismatches(hints[name], fields[name], f"{where}.{name}")
    return found


@pytest.mark.parametrize(("shape", "schemas"), SHAPES, ids=lambda value: getattr(
    value, "__name__", ""))
def test_client_shape_is_the_documents(shape: Any, schemas: list[dict[str, Any]]) -> None:
    assert schemas, "the document names no schema here"
    assert record_mismatches(shape, schemas, shape.__name__) == []


def test_every_client_shape_is_checked() -> None:
    """A new TypedDict in the client is compared with the document too."""
    shapes = {
        value for value in vars(mc).values()
        if typing.is_typeddict(value) and value.__module__ == mc.__name__
    }
    nested = {mc.Unread, mc.Limits, mc.Quotas, mc.ServerInfo, mc.JoinRequest}  # via Status…
    assert shapes == {shape for shape, _ in SHAPES} | nested


@pytest.mark.parametrize(
    ("hint", "schema"),
    [
        (int, {"type": "string"}),
        (str | None, {"type": "string"}),
        (str, {"type": ["string", "null"]}),
        (list[int], {"type": "object"}),
        (dict[str, int], {"type": "object", "additionalProperties": {"type": "string"}}),
    ],
)
def test_a_different_type_is_found(hint: Any, schema: dict[str, Any]) -> None:
    """The comparison itself: each of these pairs differs, and is reported."""
    assert mismatches(hint, schema, "field") != []


def test_a_missing_or_optional_field_is_found() -> None:
    class Partial(typing.TypedDict):
        id: Required[int]
        name: NotRequired[str]

    schema = {"type": "object", "required": ["id", "name"],
              "properties": {"id": {"type": "integer"}, "name": {"type": "string"},
                             "extra": {"type": "string"}}}
    found = record_mismatches(Partial, [schema], "Partial")
    assert found == [
        "Partial: fields ['id', 'name'] but the schema's ['extra', 'id', 'name']",
        "Partial: required ['id'] but the schema's ['id', 'name']",
    ]
