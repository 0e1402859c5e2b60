"""The job spec's field reference, generated from the pydantic models (`make docs` writes docs/reference.md).

Run as: python -m launcher.jobspec.reference > docs/reference.md
"""

from __future__ import annotations

import json
import sys
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from launcher.jobspec.models import JobSpec
from launcher.jobspec.presets import PRESETS

HEADER = """# Job spec reference

Every field of a job spec, generated from `launcher/jobspec/models.py` by `make docs` (a test fails when this
file is out of date). Unknown keys are errors; a bad value names its dotted path (`stages.1.optim.lr: ...`).
Any field can be overridden on the command line: `launcher run JOB.yaml stages.0.max_steps=20`.
"""


def _sections(annotation: Any) -> list[type[BaseModel]]:
    """The spec sections an annotation holds (`StageSpec`, `list[StageSpec]`, `SlurmSpec | None`, ...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [section for arg in typing.get_args(annotation) for section in _sections(arg)]


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(arg) for arg in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin is not None:
        args = ", ".join(_type_name(arg) for arg in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: FieldInfo) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
        return "(section)" if isinstance(value, BaseModel) else f"`{json.dumps(value)}`"
    return f"`{json.dumps(field.default)}`"


def _table(section: type[BaseModel], path: str, out: list[str], seen: set[str]) -> None:
    out += [f"## `{path}`", "", (section.__doc__ or "").strip().replace("\n", " "), ""]
    out += ["| field | type | default | description |", "| --- | --- | --- | --- |"]
    nested: list[tuple[type[BaseModel], str]] = []
    for name, field in section.model_fields.items():
        description = (field.description or "").replace("|", "\\|")
        out.append(f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | {description} |")
        list_of = typing.get_origin(field.annotation) is list
        for inner in _sections(field.annotation):
            nested.append((inner, f"{path}.{name}{'[]' if list_of else ''}".lstrip(".")))
    out.append("")
    for inner, inner_path in nested:
        if inner_path not in seen:
            seen.add(inner_path)
            _table(inner, inner_path, out, seen)


def reference() -> str:
    out = [HEADER]
    _table(JobSpec, "", out, set())
    out[1] = "## The job (top level)"
    out += ["## Model presets (`model.preset`)", "", "| preset | family | sizes |", "| --- | --- | --- |"]
    for name, fields in PRESETS.items():
        sizes = ", ".join(f"{key} {value}" for key, value in fields.items() if key != "family")
        out.append(f"| `{name}` | {fields['family']} | {sizes} |")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(reference())
