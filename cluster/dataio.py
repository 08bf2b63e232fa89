"""Reading and validating user data: Parquet / JSONL files, directories or globs, three formats.

Every problem is reported as a ``DataError`` naming the file, the row (1-based line for JSONL,
0-based row for Parquet) and the column. Rows come out normalised to ``id``, ``prompt``,
``response`` plus the row's other columns, which are passed through untouched; a column must
hold one kind of value, valid Unicode text, and not a name LANCET writes itself
(``cluster/cells.py``).

Formats (CONTRACT.md section 2):
- ``prompt_response``: ``prompt``, ``response`` (``id`` optional; derived from file and row),
  or instead ``messages``: a list of ``{role, content}`` turns. The last assistant turn is the
  response; the turns before it become ``prompt_turns`` (JSON, read back by the tokenizing
  code and rendered with the model's chat template) and, flattened, ``prompt``.
- ``hh_rlhf``: ``chosen``/``rejected`` dialogues; the prompt is everything up to the last
  ``\\n\\nAssistant:`` of ``chosen`` (its turns also as ``prompt_turns``), the response what
  follows (``rejected`` is passed through).
- ``beavertails``: ``prompt``, ``response``, ``is_safe`` (bool), optional ``category``; adds
  ``contaminated = not is_safe`` as the ground truth for detection.
"""

from __future__ import annotations

import glob
import json
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cluster.atomic import atomic
from cluster.cells import (
    SURROGATE_ESCAPE,
    TURNS,
    ColumnKinds,
    reserved_problem,
    unicode_problem,
)
from operators.errors import UserError

FORMATS = ("prompt_response", "hh_rlhf", "beavertails")
# beavertails' ground truth (``not is_safe``): the label column unless data.label_column is set
BEAVERTAILS_LABEL = "contaminated"
SUFFIXES = (".parquet", ".jsonl", ".json")
ASSISTANT = "\n\nAssistant:"
HUMAN = re.compile(r"(?:^|\n\n)Human:")
ROLES = ("system", "user", "assistant", "tool")
CHUNK_ROWS = 8192  # rows turned into Arrow at a time when writing


class DataError(UserError):
    """Unusable input data; the message names file, row and column (or config key)."""


def resolve_files(spec: str, key: str) -> list[Path]:
    """A file, a directory of data files, or a glob → sorted list of files. A directory's other
    files are refused, not skipped (hidden ones and ``_SUCCESS``-style markers aside): a
    ``part.csv`` next to the Parquet files would otherwise drop its rows without a word."""
    if not spec:
        raise DataError(f"{key} is empty: give a Parquet/JSONL file, a directory or a glob")
    path = Path(spec)
    if path.is_dir():
        entries = list(path.iterdir())
        files = sorted(p for p in entries if is_data_file(p))
        _refuse_others(path, key, [p for p in entries
                                   if not is_data_file(p) and not p.name.startswith((".", "_"))])
    elif any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(spec) if is_data_file(Path(p)))
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"{key}={spec}: no such file or directory")
    if not files:
        raise DataError(f"{key}={spec}: no .parquet or .jsonl files found")
    return files


def is_data_file(path: Path) -> bool:
    """A file LANCET reads (the suffix in any case: ``B.JSONL`` too)."""
    return path.suffix.lower() in SUFFIXES and path.is_file()


def is_parquet(path: Path) -> bool:
    return path.suffix.lower() == ".parquet"


def _refuse_others(folder: Path, key: str, others: list[Path]) -> None:
    if others:
        names = ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in others)[:5])
        more = f" and {len(others) - 5} more" if len(others) > 5 else ""
        raise DataError(f"{key}={folder}: LANCET reads {', '.join(SUFFIXES)} files, not {names}"
                        f"{more} in this folder: move them out or give a glob such as "
                        f"{folder / '*.parquet'}")


# The leading bytes of the compressed formats a .jsonl file is most often mistaken for.
MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\x28\xb5\x2f\xfd": "zstd",
         b"\xfd7zXZ\x00": "xz", b"PK\x03\x04": "zip"}


def _compression(head: bytes) -> str | None:
    """The compression format ``head`` (a file's first bytes) starts with, if any."""
    return next((name for magic, name in MAGIC.items() if head.startswith(magic)), None)


def iter_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(row number, raw dict) of one file, with parse errors naming the line."""
    if is_parquet(path):
        try:
            table = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"{path}: not a readable Parquet file ({err})") from err
        row = 0
        for batch in table.iter_batches(batch_size=4096):
            for item in batch.to_pylist():
                yield row, item
                row += 1
        return
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                # utf-8-sig: a byte-order mark (Windows editors write one) is not data
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as err:
                packed = _compression(raw) if line_no == 1 else None
                if packed:
                    raise DataError(f"{path}: a {packed}-compressed file; LANCET reads plain "
                                    "JSONL text: decompress it first") from err
                raise DataError(f"{path}, line {line_no}: bytes that are not UTF-8 at offset "
                                f"{err.start}") from err
            if not text.strip():
                continue
            try:
                item = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {line_no}: malformed JSON ({err.msg} at column "
                                f"{err.colno})") from err
            if not isinstance(item, dict):
                raise DataError(f"{path}, line {line_no}: expected a JSON object")
            if SURROGATE_ESCAPE.search(text):  # rare: only then is every string checked
                _refuse(unicode_problem(item), f"{path}, line {line_no}")
            yield line_no, item


def _text(item: dict, column: str, where: str, required: bool = True) -> str | None:
    if column not in item:
        if not required:
            return None
        raise DataError(f"{where}, column '{column}': missing (found columns: "
                        f"{', '.join(sorted(item)) or 'none'})")
    value = item[column]
    if value is None or (isinstance(value, str) and not value.strip()):
        if not required:
            return None
        raise DataError(f"{where}, column '{column}': null or empty")
    if not isinstance(value, str):
        raise DataError(f"{where}, column '{column}': expected a string, got "
                        f"{type(value).__name__}")
    return value


def _split_dialogue(text: str, where: str, column: str, require_response: bool = True
                    ) -> tuple[str, str | None]:
    """(prompt up to the last Assistant turn, that turn's text). The dialogue must end with
    that turn (a Human turn after it would be trained on as the response) and hold a Human
    turn with text before it; the turn may be empty where no response is required (eval)."""
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise DataError(f"{where}, column '{column}': no '\\n\\nAssistant:' turn")
    prompt, response = text[:cut + len(ASSISTANT)], text[cut + len(ASSISTANT):].strip()
    if HUMAN.search("\n\n" + response):
        raise DataError(f"{where}, column '{column}': the dialogue ends with a Human turn; its "
                        "last turn must be the Assistant's response")
    humans = [t.strip() for t in HUMAN.split(prompt[:cut])[1:]]
    if not humans or not humans[-1].split(ASSISTANT)[0].strip():
        raise DataError(f"{where}, column '{column}': no Human turn with text before the last "
                        "Assistant turn")
    if not response and require_response:
        raise DataError(f"{where}, column '{column}': the last Assistant turn is empty")
    return prompt, response or None


def _dialogue_turns(prompt: str) -> dict:
    """``prompt_turns`` of an hh-rlhf prompt (``\\n\\nHuman:``/``\\n\\nAssistant:`` turns), for
    chat templates; none when the text holds no Human turn."""
    parts = re.split(r"\n\n(Human|Assistant):", prompt)[1:]
    roles = {"Human": "user", "Assistant": "assistant"}
    turns = [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[::2], parts[1::2])
             if c.strip()]
    if not any(t["role"] == "user" for t in turns):
        return {}
    return {TURNS: json.dumps(turns, ensure_ascii=False)}


def normalise(item: dict, fmt: str, where: str, require_response: bool) -> dict:
    """One raw row → ``id``-less normalised dict (prompt, response, passthrough columns)."""
    if fmt == "hh_rlhf":
        prompt, response = _split_dialogue(_text(item, "chosen", where), where, "chosen",
                                           require_response)
        rest = {k: v for k, v in item.items() if k != "chosen"}
        return {**rest, "prompt": prompt, "response": response, **_dialogue_turns(prompt)}
    if fmt == "prompt_response" and "messages" in item and not {"prompt", "response"} & set(item):
        return _from_messages(item, where, require_response)
    prompt = _text(item, "prompt", where)
    response = _text(item, "response", where, required=require_response)
    out = {**item, "prompt": prompt, "response": response}
    if fmt == "beavertails":
        if not isinstance(item.get("is_safe"), bool):
            raise DataError(f"{where}, column 'is_safe': missing or not a boolean")
        if BEAVERTAILS_LABEL in item:
            raise DataError(f"{where}, column '{BEAVERTAILS_LABEL}': the name is reserved "
                            "(data.format=beavertails writes it from 'is_safe'); rename the column")
        out[BEAVERTAILS_LABEL] = not item["is_safe"]
    return out


def _from_messages(item: dict, where: str, require_response: bool) -> dict:
    """A ``messages`` row → prompt (flattened prior turns), response (last assistant turn)."""
    turns = _turns(item["messages"], f"{where}, column 'messages'")
    last = turns[-1]["role"] == "assistant"
    if not last and require_response:
        raise DataError(f"{where}, column 'messages': the last turn must be the assistant's "
                        f"response (got {turns[-1]['role']!r})")
    prior = turns[:-1] if last else turns
    if not any(t["role"] == "user" for t in prior):
        raise DataError(f"{where}, column 'messages': no user turn before the response")
    rest = {k: v for k, v in item.items() if k != "messages"}
    flat = prior[0]["content"] if len(prior) == 1 else "\n".join(
        f"{t['role']}: {t['content']}" for t in prior)
    return {**rest, "prompt": flat, "response": turns[-1]["content"] if last else None,
            TURNS: json.dumps(prior, ensure_ascii=False)}


def _turns(value, where: str) -> list[dict]:
    """Checked ``[{role, content}, …]`` (roles from ``ROLES``, non-empty string contents)."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: expected a non-empty list of {{role, content}} turns")
    out = []
    for number, turn in enumerate(value):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES:
            raise DataError(f"{where}, turn {number}: expected {{role, content}} with role one "
                            f"of {ROLES}")
        content = turn.get("content")
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"{where}, turn {number}: 'content' must be a non-empty string")
        out.append({"role": turn["role"], "content": content})
    return out


def iter_located(spec: str, fmt: str = "prompt_response", key: str = "data.train",
                 require_response: bool = True, reserved: tuple[str, ...] = (),
                 check: Callable[[dict], str | None] | None = None
                 ) -> Iterator[tuple[str, dict]]:
    """``(where, row)`` of ``spec``: each row validated and normalised, with the place it came
    from (``"file, line N"``) for the checks a caller adds; ids unique across files.

    ``reserved``: column names refused besides ``prompt_turns`` (which LANCET writes itself);
    ``check``: the caller's own check of a normalised row, returning its problem ("column 'x':
    …") or None, run before the generic ones so that its message is the one shown.
    Holds only the ids seen (to refuse a repeated one) and each column's kind of value (to
    refuse a column that mixes them), never the rows: the caller streams them.
    """
    if fmt not in FORMATS:
        raise DataError(f"data.format={fmt!r}: expected one of {FORMATS}")
    files = resolve_files(spec, key)
    seen: dict[str, int] = {}  # id -> file index * 2**40 + row number
    kinds = ColumnKinds()
    columns: tuple[Path, list[str]] | None = None
    count = 0
    for index, path in enumerate(files):
        unit = "row" if is_parquet(path) else "line"
        names: set[str] = set()
        for row_no, item in iter_rows(path):
            where = f"{path}, {unit} {row_no}"
            _refuse(reserved_problem(item, reserved), where)
            out = normalise(item, fmt, where, require_response)
            out["id"] = _row_id(item, path, row_no, where)
            _check_unique(out["id"], seen, files, index * 2 ** 40 + row_no, where)
            _refuse(check(out) if check else None, where)
            _refuse(kinds.problem(out, where), where)
            names.update(out)
            count += 1
            yield where, out
        columns = _check_same_columns(columns, path, names)
    if not count:
        raise DataError(f"{key}={spec}: no rows")


def iter_validated(spec: str, fmt: str = "prompt_response", key: str = "data.train",
                   require_response: bool = True, reserved: tuple[str, ...] = ()
                   ) -> Iterator[dict]:
    """The rows of ``iter_located``, without their places."""
    for _, row in iter_located(spec, fmt, key, require_response, reserved):
        yield row


def read_rows(spec: str, fmt: str = "prompt_response", key: str = "data.train",
              require_response: bool = True) -> list[dict]:
    """All rows of ``spec`` in a list (for small inputs: queries, evaluation prompts)."""
    return list(iter_validated(spec, fmt, key, require_response))


def _refuse(problem: str | None, where: str) -> None:
    if problem:
        raise DataError(f"{where}, {problem}")


def _check_unique(row_id: str, seen: dict[str, int], files: list[Path], place: int, where: str
                  ) -> None:
    """``place``: file index * 2**40 + row number, kept for the first row of each id."""
    first = seen.setdefault(row_id, place)
    if first != place:
        earlier = files[first >> 40]
        raise DataError(f"{where}, column 'id': duplicate id {row_id!r} (first at {earlier}, "
                        f"{'row' if is_parquet(earlier) else 'line'} "
                        f"{first & (2 ** 40 - 1)})")


def _row_id(item: dict, path: Path, row_no: int, where: str) -> str:
    value = item.get("id")
    if value is None:
        return f"{path.stem}:{row_no}"
    if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
        return str(value)
    raise DataError(f"{where}, column 'id': expected a non-empty string or integer")


def _check_same_columns(previous, path: Path, names: set[str]):
    if not names:
        return previous
    names = sorted(names)
    if previous is not None and previous[1] != names:
        raise DataError(f"{path}: columns {names} differ from {previous[0]}'s {previous[1]} "
                        "(shards must share one schema)")
    return (path, names) if previous is None else previous


def write_parquet_atomic(rows: Iterable[dict], path: Path, chunk_rows: int = CHUNK_ROWS,
                         source: str = "") -> int:
    """Stream rows into one Parquet file at ``path``; returns how many were written.

    Rows become Arrow one chunk at a time (the corpus is never held whole); the chunks' types
    are unified at the end (a column null in the first chunks takes its later type). The file
    appears under its final name only when complete. ``source``: what the rows were read from
    (``data.train=…``), named by a type error instead of ``path``'s name.
    """
    source = source or path.name
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = path.with_name(f".{path.name}.parts")
    shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir()
    try:
        schemas, count = [], 0
        for number, chunk in enumerate(_chunks(rows, chunk_rows)):
            table = _chunk_table(chunk, source)
            schemas.append(table.schema)
            pq.write_table(table, parts / f"{number:06d}.parquet")
            count += table.num_rows
        _join_parts(sorted(parts.iterdir()), schemas, path, source)
    finally:
        shutil.rmtree(parts, ignore_errors=True)
    return count


def _chunks(rows: Iterable[dict], size: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _chunk_table(chunk: list[dict], source: str) -> pa.Table:
    """Every key any row of the chunk has (absent: null), its type inferred over all rows."""
    keys = list(dict.fromkeys(k for row in chunk for k in row))
    columns = {}
    for key in keys:
        try:
            columns[key] = pa.array([row.get(key) for row in chunk])
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise DataError(f"{source}: column '{key}' mixes types ({err})") from err
    return pa.table(columns)


def _join_parts(parts: list[Path], schemas: list[pa.Schema], path: Path, source: str) -> None:
    if not parts:
        with atomic(path) as tmp:
            pq.write_table(pa.table({}), tmp)
        return
    try:
        schema = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise DataError(f"{source}: a passthrough column mixes types ({err})") from err
    with atomic(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for part in parts:
            table = pq.read_table(part)
            for field in schema:
                if field.name not in table.column_names:
                    table = table.append_column(field.name, pa.nulls(table.num_rows, field.type))
            writer.write_table(table.select(schema.names).cast(schema))
