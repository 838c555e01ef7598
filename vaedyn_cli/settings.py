"""One resolver for "the config stored in this artifact, plus -c and --set".

Every stage that works on an artifact (a checkpoint, a trace store) reads its settings the same
way: a config given as an object (Python callers), else the YAML file of `-c`, else the config
stored in the artifact, else the defaults (or an error where the artifact must say what it is);
then the `--set` overrides; then the command's own options (per section, unset ones ignored).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from vaedyn_cli.config import RunConfig, apply_overrides, format_validation_error, read_yaml, validate_config
from vaedyn_cli.errors import VaedynError


def resolve(
    stored: RunConfig | Mapping[str, Any] | None,
    *,
    given: RunConfig | None = None,
    config_path: Path | str | None = None,
    overrides: Sequence[str] = (),
    options: Mapping[str, Mapping[str, Any]] | None = None,
    stored_in: str = "the artifact",
    missing: str | None = None,
    section: str | None = None,
) -> RunConfig:
    """The settings a stage runs with.

    `stored`: the artifact's config (a RunConfig, or its plain dict as stored in a trace); `given`
    takes precedence over `config_path` (-c), which takes precedence over `stored`. Without any of
    them: VaedynError(`missing`) when given, else the defaults. `section`: validate only that section
    of the result (a store's `classify` settings, say): the others take their defaults, and errors
    read "invalid SECTION parameters: ...".
    """
    if given is not None:
        data, where = given.model_dump(mode="json"), "given"
    elif config_path is not None:
        data, where = read_yaml(Path(config_path)), f"in {config_path}"
    elif stored is not None:
        data = stored.model_dump(mode="json") if isinstance(stored, BaseModel) else _plain(stored)
        where = f"stored in {stored_in}"
    elif missing is not None:
        raise VaedynError(missing)
    else:
        data, where = {}, "(defaults)"
    apply_overrides(data, list(overrides))
    if overrides:
        where += " with --set " + " ".join(overrides)
    for name, values in (options or {}).items():
        given_values = {k: v for k, v in values.items() if v is not None}
        if given_values:
            node = data.get(name)
            data[name] = {**(node if isinstance(node, dict) else {}), **given_values}
    if section is None:
        return validate_config(data, where)
    model = RunConfig.model_fields[section].annotation
    try:
        part = model.model_validate(data.get(section) or {})
    except ValidationError as e:
        raise VaedynError(format_validation_error(e, "", model=model, what=f"{section} parameters")) from None
    return RunConfig.model_validate({section: part.model_dump(mode="json")})


def _plain(stored: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of a stored config's dict (overrides must not write into the artifact's copy)."""
    import copy

    return copy.deepcopy(dict(stored))
