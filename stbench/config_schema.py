"""The typed schema of `--method.X`, `--data.X`, `--trainer.X` and of config files.

Keys, types and defaults come from the constructors that receive them: the method class, the
DataModule (minus what the runner sets itself), PatchSpec and `lightning.Trainer`. They are read
from the source with `ast`, so a misspelled key or a bad value is reported before torch and
lightning are imported (several seconds); a class whose signature cannot be read that way (built
dynamically, `**kwargs` forwarded elsewhere) is imported and inspected instead.
"""

from __future__ import annotations

import ast
import builtins
import collections.abc
import copy
import difflib
import importlib.util
import inspect
import typing
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from stbench.errors import StbenchError

# Options the runner passes to STDataModule itself (it would refuse them twice); `patch` is the
# PatchSpec section (`--data.patch.out_px`). tests/test_cli_typed.py checks this against run_job.
RUNNER_DATA_KEYS = (
    "slides",
    "fold",
    "protocol",
    "patch_spec",
    "cache_dir",
    "seed",
    "whole_slide",
    "neighbours",
    "include_counts",
    "include_totals",
    "graph",
    "features",
    "vocabulary",
    "predict_condition",
    "predict_hidden_features",
)
METHOD_FRAMEWORK_KEYS = ("n_genes", "genes")  # the fold's panel, given by the runner
DATAMODULE = ("stbench.data.datamodule", "STDataModule")
PATCH_SPEC = ("stbench.data.patches", "PatchSpec")
TRAINER = ("lightning.pytorch.trainer.trainer", "Trainer")
UNTYPED_SECTIONS = ("evaluation",)  # free-form (image-generation scoring options), values kept as YAML
_MISSING = object()


class OptionError(StbenchError):
    """An unknown option key or a value of the wrong type; one line naming the key and where."""


@dataclass(frozen=True)
class Param:
    """One constructor parameter: its annotation as written and as a type (None = untyped)."""

    name: str
    text: str
    type: Any = None
    default: Any = _MISSING


@dataclass(frozen=True)
class Raw:
    """A command-line value not parsed yet: it is typed by the parameter it lands on."""

    text: str


# ---------------------------------------------------------------------------------------------
# Reading signatures from source


def module_file(module: str) -> Path | None:
    """The .py file of `module`, found without importing it or its parent packages."""
    parts = module.split(".")
    try:
        spec = importlib.util.find_spec(parts[0])
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if len(parts) == 1:
        return Path(spec.origin) if spec.origin and spec.origin.endswith(".py") else None
    for base in spec.submodule_search_locations or ():
        d = Path(base).joinpath(*parts[1:-1])
        for cand in (d / parts[-1] / "__init__.py", d / f"{parts[-1]}.py"):
            if cand.is_file():
                return cand
    return None


@lru_cache(maxsize=64)
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


_NAMESPACE: dict[str, Any] = {
    **vars(builtins),
    **{n: getattr(typing, n) for n in typing.__all__ if hasattr(typing, n)},
    **{n: getattr(collections.abc, n) for n in collections.abc.__all__},
    "Path": Path,
}


def _annotation(node: ast.expr | None) -> tuple[str, Any]:
    """(text, type) of an annotation; the type is None when it names anything outside builtins,
    typing and collections.abc (a class of the module: a YAML or CLI value cannot be one)."""
    if node is None:
        return "", None
    text = ast.unparse(node)
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        text = node.value
    try:
        tp = eval(compile(text, "<annotation>", "eval"), {"__builtins__": {}}, dict(_NAMESPACE))  # noqa: S307
    except Exception:
        return text, None
    if tp is Any or not _usable(tp):
        return text, None
    return text, tp


@lru_cache(maxsize=256)
def _usable(tp: Any) -> bool:
    from jsonargparse import ArgumentParser

    try:
        ArgumentParser(exit_on_error=False).add_argument("--x", type=tp)
    except Exception:
        return False
    return True


def _default(node: ast.expr) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        return _MISSING


def _find_class(module: str, name: str, depth: int = 0) -> tuple[ast.ClassDef, str] | None:
    path = module_file(module)
    if path is None or depth > 8:
        return None
    tree = _tree(path)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node, module
    for node in tree.body:  # a re-export: follow `from X import name`
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return _find_class(_absolute(module, path, node), alias.name, depth + 1)
    return None


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join([*base, *([node.module] if node.module else [])])


def _base_module(module: str, node: ast.expr) -> tuple[str, str] | None:
    """(module, class name) a base-class expression refers to, when it is a plain name."""
    if not isinstance(node, ast.Name):
        return None
    path = module_file(module)
    if path is None:
        return None
    for stmt in _tree(path).body:
        if isinstance(stmt, ast.ImportFrom):
            for alias in stmt.names:
                if (alias.asname or alias.name) == node.id:
                    return _absolute(module, path, stmt), alias.name
    return module, node.id


def source_params(module: str, name: str, depth: int = 0) -> dict[str, Param] | None:
    """Constructor parameters of class `module:name` read from source; None when unreadable."""
    found = _find_class(module, name)
    if found is None or depth > 8:
        return None
    cls, where = found
    if any(ast.unparse(d).split("(")[0].endswith("dataclass") for d in cls.decorator_list):
        return {
            s.target.id: Param(
                s.target.id, *_annotation(s.annotation), _default(s.value) if s.value else _MISSING
            )
            for s in cls.body
            if isinstance(s, ast.AnnAssign)
            and isinstance(s.target, ast.Name)
            and "ClassVar" not in ast.unparse(s.annotation)
        }
    init = next((s for s in cls.body if isinstance(s, ast.FunctionDef) and s.name == "__init__"), None)
    if init is None or init.args.kwarg is not None:
        inherited = _inherited(cls, where, depth)
        if inherited is None:
            return None
        if init is None:
            return inherited
    else:
        inherited = {}
    a = init.args
    positional = [*a.posonlyargs, *a.args][1:]
    defaults = [_MISSING] * (len(positional) - len(a.defaults)) + [_default(d) for d in a.defaults]
    own = {
        p.arg: Param(p.arg, *_annotation(p.annotation), d) for p, d in zip(positional, defaults, strict=True)
    }
    for p, d in zip(a.kwonlyargs, a.kw_defaults, strict=True):
        own[p.arg] = Param(p.arg, *_annotation(p.annotation), _default(d) if d is not None else _MISSING)
    return {**inherited, **own}


def _inherited(cls: ast.ClassDef, module: str, depth: int) -> dict[str, Param] | None:
    for base in cls.bases:
        ref = _base_module(module, base)
        if ref is not None and (params := source_params(*ref, depth=depth + 1)) is not None:
            return params
    return None


OPEN = "**"  # the key of a signature with an unresolved `**kwargs`: any key is accepted


def imported_params(module: str, name: str, obj: Any = None) -> dict[str, Param]:
    """The slow path: import the class (unless given) and read its signature."""
    import importlib

    if obj is None:
        obj = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
    out = {}
    for p in list(inspect.signature(obj).parameters.values()):
        if p.kind == p.VAR_KEYWORD:
            out[OPEN] = Param(OPEN, "")
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        ann = p.annotation if p.annotation is not p.empty else None
        text = ann if isinstance(ann, str) else (inspect.formatannotation(ann) if ann is not None else "")
        tp = _annotation(ast.parse(text, mode="eval").body)[1] if text else None
        out[p.name] = Param(p.name, text, tp, p.default if p.default is not p.empty else _MISSING)
    return out


def class_params(module: str, name: str, obj: Any = None) -> dict[str, Param]:
    params = source_params(module, name) if "<locals>" not in name else None
    return params if params is not None else imported_params(module, name, obj)


# ---------------------------------------------------------------------------------------------
# The schema of one method's run


def method_entry(method: str | type) -> tuple[str, str] | None:
    """(module, class) of a method name from the `stbench.methods` entry points, without importing."""
    if isinstance(method, type):
        return method.__module__, method.__qualname__
    from importlib.metadata import entry_points

    for ep in entry_points(group="stbench.methods"):
        if ep.name == method:
            module, _, attr = ep.value.partition(":")
            return module.strip(), attr.strip()
    return None


def method_config_dir(method: str | type) -> Path | None:
    entry = method_entry(method)
    if entry is None:
        return None
    found = _find_class(*entry)
    path = module_file(found[1] if found else entry[0])
    return path.resolve().parent / "configs" if path else None


@dataclass(frozen=True)
class Schema:
    """Valid keys and types of a run's config sections, for one method."""

    method: str
    sections: dict[str, dict[str, Param]]
    nested: dict[tuple[str, str], dict[str, Param]]  # (section, key) -> sub-schema (data.patch)
    owners: dict[str, str]


@lru_cache(maxsize=64)
def _schema(method_name: str, module: str, qualname: str, cls: type | None = None) -> Schema:
    params = class_params(module, qualname, cls)
    method = {k: v for k, v in params.items() if k not in METHOD_FRAMEWORK_KEYS}
    data = {k: v for k, v in class_params(*DATAMODULE).items() if k not in RUNNER_DATA_KEYS}
    data["patch"] = Param("patch", "PatchSpec", None)
    trainer = class_params(*TRAINER)
    return Schema(
        method_name,
        {"method": method, "data": data, "trainer": trainer},
        {("data", "patch"): class_params(*PATCH_SPEC)},
        {"method": f"method {method_name}", "data": "STDataModule", "trainer": "lightning.Trainer"},
    )


def schema_for(method: str | type) -> Schema | None:
    """The schema of `method` (a registered name or a class); None for an unknown name (the
    registry reports that with the valid names)."""
    if isinstance(method, type):
        return _schema(str(getattr(method, "name", "") or method.__qualname__), *method_entry(method), method)
    entry = method_entry(method)
    return _schema(method, *entry) if entry is not None else None


# ---------------------------------------------------------------------------------------------
# Checking and typing values


def unknown_key(kind: str, key: str, valid: list[str], where: str) -> OptionError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    listed = ", ".join(sorted(valid)) or "(none)"
    return OptionError(f"{where}: unknown key {key!r} of {kind}; {hint}valid keys: {listed}")


def typed_value(param: Param, value: Any, where: str) -> Any:
    """`value` checked against the parameter's type: kept as is when it conforms (so the config
    hash of a valid config never changes), else converted when its text parses as the type
    (`3e-4` -> 0.0003, which YAML 1.1 reads as a string), else an error naming `where`."""
    import yaml

    raw = value.text if isinstance(value, Raw) else None
    obj = _resolve_raw(value)
    if param.type is None:
        return obj
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--x", type=param.type)
    try:
        if parser.parse_object({"x": copy.deepcopy(obj)}).x == obj:
            return obj
    except Exception:
        pass
    text = raw if raw is not None else (obj if isinstance(obj, str) else None)
    if text is not None:
        try:
            return parser.parse_args([f"--x={text}"]).x
        except Exception:
            pass
    shown = (
        raw
        if raw is not None
        else yaml.safe_dump(obj, default_flow_style=True).strip().removesuffix("...").strip()
    )
    raise OptionError(f"{where}: expected {param.text or param.type}, got {shown!r}")


def _resolve_raw(value: Any) -> Any:
    import yaml

    if isinstance(value, Raw):
        try:
            return yaml.safe_load(value.text)
        except yaml.YAMLError:
            return value.text
    if isinstance(value, dict):
        return {k: _resolve_raw(v) for k, v in value.items()}
    return value


def check_config(
    cfg: dict[str, Any], schema: Schema | None, where: str, flag: bool = False
) -> dict[str, Any]:
    """`cfg` (sections -> keys -> values, values may be `Raw`) with every key checked and every
    value typed; `where` prefixes messages (a file, a suite key or the command line). `flag`:
    name keys as `--section.key` (command line) instead of `section.key`."""
    out: dict[str, Any] = {}
    for section, body in cfg.items():
        if section in UNTYPED_SECTIONS or schema is None or section not in schema.sections:
            out[section] = _resolve_raw(body)
            continue
        if not isinstance(body, dict):
            raise OptionError(f"{where}: section {section!r} must be a mapping of keys, got {body!r}")
        params = schema.sections[section]
        out[section] = {}
        valid = [k for k in params if k != OPEN]
        for key, value in body.items():
            name = f"{'--' if flag else ''}{section}.{key}"
            if key not in params and OPEN in params:
                out[section][key] = _resolve_raw(value)
                continue
            if key not in params:
                raise unknown_key(schema.owners[section], key, valid, f"{where}{name}")
            sub = schema.nested.get((section, key))
            if sub is not None:
                out[section][key] = _check_nested(value, sub, f"{where}{name}", section, key, schema)
            else:
                out[section][key] = typed_value(params[key], value, f"{where}{name}")
    return out


def _check_nested(
    value: Any, sub: dict[str, Param], where: str, section: str, key: str, schema: Schema
) -> Any:
    value = _resolve_raw(value) if not isinstance(value, dict) else value
    if value is None:
        return None
    if not isinstance(value, dict):
        raise OptionError(f"{where}: expected a mapping of {sorted(sub)}, got {value!r}")
    out = {}
    for k, v in value.items():
        if k not in sub:
            raise unknown_key(f"{section}.{key} (PatchSpec)", k, list(sub), f"{where}.{k}")
        out[k] = typed_value(sub[k], v, f"{where}.{k}")
    return out
