"""docs/config.md stays true to the code: every key it documents exists and every key the
config accepts is documented (with the dataclasses' types and defaults), and each YAML example
in it parses."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
from pathlib import Path

import pytest
import yaml

from geobind import config as gbconfig
from geobind.config import ConfigError, parse_config, plain

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"

# Key-path prefix in the reference tables -> the dataclass whose fields that section documents.
SECTIONS = {
    "": gbconfig.RunConfig,
    "stages[].": gbconfig.StageConfig,
    "stages[].data.": gbconfig.DataConfig,
    "stages[].optim.": gbconfig.OptimConfig,
    "stages[].loss.": gbconfig.LossConfig,
    "eval.": gbconfig.EvalConfig,
}

# How the reference writes each field annotation: as a YAML user gives the value.
TYPE_NAMES = {
    "str": "str",
    "int": "int",
    "float": "float",
    "bool": "bool",
    "str | None": "str or null",
    "int | str": "int or auto",
    "tuple[float, float]": "[float, float]",
    "dict[str, Any]": "mapping",
    "dict[str, str]": "mapping",
    "dict[str, Any] | None": "mapping or null",
    "EvalConfig | None": "mapping or null",
    "tuple[StageConfig, ...]": "list of stages",
    "DataConfig": "mapping or str",
    "OptimConfig": "mapping",
    "LossConfig": "mapping",
}

ENCODER_PREFIX = "stages[].encoder."


def _cells(line: str) -> list[str]:
    """The cells of a Markdown table row; a ``|`` inside backticks is no separator."""
    cells, cur, code = [], "", False
    for ch in line.strip().strip("|"):
        if ch == "`":
            code = not code
        if ch == "|" and not code:
            cells.append(cur.strip())
            cur = ""
        else:
            cur += ch
    cells.append(cur.strip())
    return cells


def _tables(text: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """``(heading, header cells, rows)`` of every table, under the nearest heading above it."""
    tables, heading, header, rows = [], "", None, []
    in_code = False
    for line in text.splitlines() + [""]:
        if line.startswith("```"):
            in_code = not in_code
        if not in_code and line.startswith("|"):
            cells = _cells(line)
            if header is None:
                header = cells
            elif not all(set(c) <= set("-: ") for c in cells):
                rows.append(cells)
            continue
        if header is not None:
            tables.append((heading, header, rows))
            header, rows = None, []
        if not in_code and line.startswith("#"):
            heading = line.lstrip("#").strip()
    return tables


def _code(cell: str) -> str:
    """The first backticked text of a cell."""
    m = re.search(r"`([^`]+)`", cell)
    assert m, f"no `key` in table cell {cell!r}"
    return m.group(1)


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def key_rows(doc) -> list[tuple[str, str, list[str]]]:
    """``(heading, key path, row)`` of every row of the key tables."""
    out = []
    for heading, header, rows in _tables(doc):
        if header and header[0] == "key":
            assert header == ["key", "type", "default", "meaning"], header
            for row in rows:
                assert len(row) == 4 and all(row), f"incomplete row under {heading!r}: {row}"
                out.append((heading, _code(row[0]), row))
    return out


def _section(key: str) -> str:
    return key.rsplit(".", 1)[0] + "." if "." in key else ""


def _encoder_type(heading: str) -> str:
    m = re.search(r"`type: (\w+)`", heading)
    assert m, f"an encoder key table's heading names its type as `type: NAME`: {heading!r}"
    return m.group(1)


def test_every_config_field_is_documented_and_nothing_else(key_rows):
    documented: dict[str, list[str]] = {}
    for _, key, _ in key_rows:
        if key.startswith(("anchor.", ENCODER_PREFIX)):
            continue
        section = _section(key)
        assert section in SECTIONS, f"{key}: no config section {section!r}"
        documented.setdefault(section, []).append(key[len(section):])
    for section, cls in SECTIONS.items():
        names = documented.get(section, [])
        assert len(names) == len(set(names)), f"{section or 'run level'}: a key documented twice: {names}"
        fields = [f.name for f in dataclasses.fields(cls)]
        assert set(names) == set(fields), (
            f"{cls.__name__}: undocumented {sorted(set(fields) - set(names))}, "
            f"documented but not a field {sorted(set(names) - set(fields))}")


def test_documented_types_and_defaults_are_the_dataclasses(key_rows):
    checked = 0
    for _, key, (_, type_cell, default_cell, _) in key_rows:
        section = _section(key)
        if key.startswith(("anchor.", ENCODER_PREFIX)) or section not in SECTIONS:
            continue
        f = {f.name: f for f in dataclasses.fields(SECTIONS[section])}[key[len(section):]]
        assert type_cell.replace("`", "") == TYPE_NAMES[f.type], f"{key}: type {type_cell!r}, code {f.type!r}"
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            assert default_cell == "required", f"{key} has no default; documented {default_cell!r}"
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            written = yaml.safe_load(_code(default_cell))
            if dataclasses.is_dataclass(default):
                # `{}`: a section of all defaults, which is what the factory builds.
                assert written == {} and default == type(default)(), key
            else:
                assert written == plain(default), f"{key}: documented default {written!r}, code {default!r}"
        checked += 1
    assert checked == sum(len(dataclasses.fields(c)) for c in SECTIONS.values())


def _set_literal(func, left_name: str) -> set[str]:
    """The string set ``S`` of an expression ``set(<left_name>) - S`` in ``func``'s source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    for node in ast.walk(tree):
        if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Sub) and isinstance(node.right, ast.Set)
                and isinstance(node.left, ast.Call) and len(node.left.args) == 1
                and ast.unparse(node.left.args[0]) == left_name):
            return {ast.literal_eval(e) for e in node.right.elts}
    raise AssertionError(f"no `set({left_name}) - {{...}}` in {func.__qualname__}")


def _minimal(**changes) -> dict:
    d = {"output_dir": "run", "anchor": {"type": "clip", "pretrained": "anchor"},
         "stages": [{"name": "s", "train": "satellite", "bind_to": "ground",
                     "encoder": {"type": "clip_vision"}, "data": {"train": "x.csv"}}]}
    d.update(changes)
    return d


def test_anchor_keys_are_the_ones_the_code_accepts(key_rows, tmp_path):
    from geobind.encoders.clip import build_anchor

    documented = {key.split(".", 1)[1] for _, key, _ in key_rows if key.startswith("anchor.")}
    assert documented == _set_literal(build_anchor, "spec")
    assert documented == _set_literal(gbconfig.validate, "cfg.anchor")
    every = {"type": "clip", "pretrained": "anchor", "config": {"projection_dim": 8}, "tokenizer": "anchor"}
    assert set(every) == documented
    parse_config(_minimal(anchor=every), tmp_path)
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config(_minimal(anchor={**every, "probe_key": 1}), tmp_path)


def _accepted_keys(cls) -> set[str]:
    """The spec keys an encoder type accepts, as its ``check_spec`` lists them for an unknown key."""
    with pytest.raises(ValueError) as e:
        cls.check_spec({"type": cls.type_name, "probe_key": 1})
    msg = str(e.value)
    if m := re.search(r"known: (\[.*?\])", msg):
        return set(ast.literal_eval(m.group(1)))
    if m := re.search(r"accepted: ([\w, ]+)", msg):
        return {k.strip() for k in m.group(1).split(",")}
    raise AssertionError(f"{cls.type_name}: cannot read its keys from {msg!r}")


def test_every_trainable_encoder_type_is_documented_with_its_keys(key_rows, doc):
    from geobind.encoders import encoder_types, get_encoder_class
    from geobind.encoders.base import Encoder

    documented: dict[str, list[str]] = {}
    for heading, key, _ in key_rows:
        if key.startswith(ENCODER_PREFIX):
            documented.setdefault(_encoder_type(heading), []).append(key[len(ENCODER_PREFIX):])
    # geobind's own types: a test may have registered a plugin type of its own.
    builtin = [t for t in encoder_types() if get_encoder_class(t).__module__.startswith("geobind.")]
    trainable = {t for t in builtin if get_encoder_class(t).create.__func__ is not Encoder.create.__func__}
    assert set(documented) == trainable
    for t, names in documented.items():
        assert len(names) == len(set(names)), f"{t}: a key documented twice"
        assert set(names) == _accepted_keys(get_encoder_class(t)), t
    for t in builtin:
        assert f"`{t}`" in doc, f"encoder type {t} is not mentioned"


def test_layout_options_table_is_the_layouts(doc):
    from geobind.data.manifest import layout_options, layouts

    rows = [row for _, header, rows in _tables(doc) if header[:1] == ["layout"] for row in rows]
    table = {_code(r[0]): set(re.findall(r"`([^`]+)`", r[1])) for r in rows}
    assert set(table) == set(layouts())
    for name, options in table.items():
        assert options == set(layout_options(name) or ()), name


def test_keys_named_in_the_text_are_documented(doc, key_rows):
    keys = {key for _, key, _ in key_rows}
    named = set(re.findall(r"`((?:stages\[\]|eval|anchor)\.[A-Za-z_.\[\]]+)`", doc))
    assert named - keys == set()


def _yaml_blocks(doc: str) -> list[dict]:
    return [yaml.safe_load(b) for b in re.findall(r"^```yaml\n(.*?)^```", doc, flags=re.S | re.M)]


def test_yaml_examples_parse(doc, tmp_path):
    blocks = _yaml_blocks(doc)
    full = [b for b in blocks if "stages" in b]
    assert len(full) >= 2, "the reference shows a tiny offline run and a GPU run"
    for b in full:
        cfg = parse_config(b, tmp_path)
        assert cfg.stages
    # The first is the offline one: a local anchor folder, no encoder fetched from a hub.
    tiny = parse_config(full[0], tmp_path)
    assert tiny.device == "cpu"
    assert Path(tiny.anchor["pretrained"]).is_relative_to(tmp_path)
    assert not any(s.encoder.get("pretrained") for s in tiny.stages)
    # The GPU one names hub ids, left as ids.
    gpu = parse_config(full[1], tmp_path)
    assert gpu.anchor["pretrained"] == "openai/clip-vit-base-patch32"
    assert any(s.encoder.get("pretrained") == "laion/clap-htsat-fused" for s in gpu.stages)
    # A fragment replaces top-level sections of the first example, and the result parses too.
    for b in blocks:
        if "stages" not in b:
            cfg = parse_config({**full[0], **b}, tmp_path)
            assert set(b) <= set(dataclasses.asdict(cfg))
