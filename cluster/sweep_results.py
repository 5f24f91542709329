"""Sweep-bench results as data: rows, the markdown table, the JSON file, and readers for
the tables other engines print, so `numoe plot sweep` can put numoe beside llama.cpp.

A row is one KV depth of ik_llama.cpp's `llama-sweep-bench`: with N_KV tokens in the cache,
PP prompt tokens took T_PP seconds (S_PP = PP / T_PP) and TG single-token decode steps took
T_TG seconds (S_TG = TG / T_TG). The JSON rows use the keys of its `--output-format jsonl`
(pp, tg, n_kv, t_pp, speed_pp, t_tg, speed_tg), so its jsonl output reads here as well.

    result = load_sweep("numoe.json")       # numoe bench --json, llama-sweep-bench jsonl,
    result = load_sweep("ik_llama.txt")     # or its table pasted into a text file
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cluster.errors import NumoeError

TABLE_HEADER = "|    PP |     TG |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |"
TABLE_SEPARATOR = "|-------|--------|--------|----------|----------|----------|----------|"
# Header cell -> row field; llama-sweep-bench --sweep-memory adds columns that are skipped.
_COLUMNS = {"PP": "pp", "TG": "tg", "N_KV": "n_kv", "T_PP s": "t_pp", "S_PP t/s": "speed_pp",
            "T_TG s": "t_tg", "S_TG t/s": "speed_tg"}
# llama-sweep-bench's settings line: "main: n_kv_max = 126976, n_batch = 4096, ..."
_HEADER_START = re.compile(r"\|\s*PP\s*\|\s*TG\s*\|\s*N_KV\s*\|")
_SETTING = re.compile(r"\b(n_kv_max|n_batch|n_ubatch|n_threads)\s*=\s*(\d+)")


@dataclass(frozen=True)
class SweepRow:
    pp: int  # prompt tokens per step
    tg: int  # decode steps per step
    n_kv: int  # tokens already in the KV cache
    t_pp: float  # seconds for the PP tokens
    speed_pp: float  # PP / t_pp, tokens per second
    t_tg: float  # seconds for the TG decode steps
    speed_tg: float  # TG / t_tg, tokens per second

    def table_line(self) -> str:
        """The row as llama-sweep-bench prints it."""
        return (f"|{self.pp:6d} | {self.tg:6d} | {self.n_kv:6d} | {self.t_pp:8.3f} | "
                f"{self.speed_pp:8.2f} | {self.t_tg:8.3f} | {self.speed_tg:8.2f} |")


@dataclass
class SweepResult:
    engine: str  # "numoe", "llama.cpp", ...
    model: str = ""  # model file name
    model_size_bytes: int = 0
    n_kv_max: int = 0  # context size the sweep filled
    n_batch: int = 0
    n_ubatch: int = 0
    n_threads: int = 0  # threads (per worker on a cluster); 0: not known
    backend: str = ""
    topology: str = ""  # where it ran, in words
    label: str = ""  # legend text; empty: the engine's name
    rows: list[SweepRow] = field(default_factory=list)

    @property
    def legend(self) -> str:
        return self.label or self.engine

    def to_json(self) -> str:
        data = asdict(self)
        data["model_size_gib"] = round(self.model_size_bytes / 2**30, 4)
        return json.dumps(data, indent=2)


def format_table(rows: list[SweepRow]) -> str:
    return "\n".join([TABLE_HEADER, TABLE_SEPARATOR, *(row.table_line() for row in rows)])


def load_sweep(path: str | Path) -> SweepResult:
    """A sweep from `path`: numoe bench --json, llama-sweep-bench jsonl, or a pasted table."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise NumoeError(f"cannot read sweep file {path}: {error.strerror or error}; give a "
                         f"`numoe bench --json` file or a llama-sweep-bench table") from error
    stripped = text.strip()
    if stripped.startswith("{") and '"rows"' in stripped:
        return _from_numoe_json(stripped, path)
    if any(_is_jsonl_row(line) for line in stripped.splitlines()):
        return _from_jsonl(stripped, path)
    rows = parse_sweep_table(text)
    if not rows:
        raise NumoeError(f"{path}: no sweep-bench rows found; give a `numoe bench --json` "
                         f"file, llama-sweep-bench --output-format jsonl, or its table "
                         f"(header {' '.join(TABLE_HEADER.split())})")
    # The settings line printed last before the table is the table's own.
    header = _HEADER_START.search(text)
    before_table = text[:header.start()] if header else text
    settings = {name: int(value) for name, value in _SETTING.findall(before_table)}
    return SweepResult(engine="llama.cpp", label=path.stem, rows=rows, **settings)


def parse_sweep_table(text: str) -> list[SweepRow]:
    """Rows of the first llama-sweep-bench markdown table in `text`. Lines may be quoted
    ("> | 512 | ...", as in discussion threads); "..." and other lines end the table."""
    rows: list[SweepRow] = []
    columns: list[str | None] | None = None  # the row field of each cell, once the header is seen
    for raw in text.splitlines():
        line = raw.strip().lstrip(">").strip()
        if not line.startswith("|"):
            if columns is not None and rows:
                break
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if columns is None:
            if "N_KV" in cells and "PP" in cells:
                columns = [_COLUMNS.get(cell) for cell in cells]
                missing = set(_COLUMNS.values()) - set(columns)
                if missing:
                    raise NumoeError(f"the sweep-bench table lacks columns "
                                     f"{sorted(missing)}; its header is {line}")
            continue
        if all(set(cell) <= {"-", ":"} for cell in cells):  # the separator row
            continue
        if len(cells) != len(columns):
            raise NumoeError(f"sweep-bench table row {line!r} has {len(cells)} cells, the "
                             f"header {len(columns)}")
        try:
            values = {name: float(cell) for name, cell in zip(columns, cells, strict=True)
                      if name is not None}
        except ValueError as error:
            raise NumoeError(f"sweep-bench table row {line!r}: {error}") from error
        rows.append(_row(values))
    return rows


def _row(values: dict[str, Any]) -> SweepRow:
    return SweepRow(pp=int(values["pp"]), tg=int(values["tg"]), n_kv=int(values["n_kv"]),
                    t_pp=float(values["t_pp"]), speed_pp=float(values["speed_pp"]),
                    t_tg=float(values["t_tg"]), speed_tg=float(values["speed_tg"]))


def _checked_row(values: object, where: str) -> SweepRow:
    if not isinstance(values, dict):
        raise NumoeError(f"{where}: a sweep row must be an object with "
                         f"{', '.join(_COLUMNS.values())}")
    missing = [name for name in _COLUMNS.values() if name not in values]
    if missing:
        raise NumoeError(f"{where}: the sweep row lacks {', '.join(missing)}; give a `numoe "
                         f"bench --json` file or llama-sweep-bench output")
    try:
        return _row(values)
    except (TypeError, ValueError) as error:
        raise NumoeError(f"{where}: a sweep row value is not a number ({error})") from error


def _from_numoe_json(text: str, path: Path) -> SweepResult:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise NumoeError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") \
            from error
    if not isinstance(data.get("rows"), list) or not data["rows"]:
        raise NumoeError(f"{path}: \"rows\" must be a non-empty list of sweep rows")
    rows = [_checked_row(row, f"{path} row {i + 1}") for i, row in enumerate(data["rows"])]
    known = {name: data[name] for name in SweepResult.__dataclass_fields__
             if name in data and name != "rows"}
    known.setdefault("engine", "numoe")
    return SweepResult(**known, rows=rows)


def _is_jsonl_row(line: str) -> bool:
    return line.lstrip().startswith("{") and '"n_kv"' in line


def _from_jsonl(text: str, path: Path) -> SweepResult:
    rows, first = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        if not _is_jsonl_row(line):
            continue  # llama-sweep-bench logs other lines around its jsonl
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise NumoeError(f"{path} line {number}: not valid JSON ({error.msg})") from error
        first = first or record
        rows.append(_checked_row(record, f"{path} line {number}"))
    if first is None:
        raise NumoeError(f"{path}: no sweep rows found")
    settings = {name: int(first[name]) for name in ("n_kv_max", "n_batch", "n_ubatch",
                                                     "n_threads") if name in first}
    return SweepResult(engine="llama.cpp", label=path.stem, rows=rows, **settings)
