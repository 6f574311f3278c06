"""What the input is: files, folders, `.gz`, Darwin Core Archives, and which format each holds.

`discover()` turns the user's INPUT into a list of sources, each a table with a format and a
way to open a reader on it. Format detection looks at names first and then at the first line.
"""

from __future__ import annotations

import gzip
import hashlib
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO
from xml.etree import ElementTree

from distributed_downloader.errors import InputError
from distributed_downloader.prep.readers import (
    CsvReader,
    LinesReader,
    Opener,
    ParquetReader,
    TableReader,
)

GBIF_MULTIMEDIA_COLUMNS = ("gbifID", "type", "format", "identifier")
URL_COLUMN_CANDIDATES = ("url", "image_url", "ac:accessURI", "accessURI", "identifier")
DWCA_NS = "{http://rs.tdwg.org/dwc/text/}"
# Row types of media tables, in order of preference when an archive has several.
MULTIMEDIA_ROW_TYPES = (
    "http://rs.gbif.org/terms/1.0/Multimedia",
    "http://rs.tdwg.org/ac/terms/Multimedia",
    "http://rs.gbif.org/terms/1.0/Image",
)
DWCA_ID_COLUMN = "coreid"  # the name we give a DwC-A table's id/coreid column


@dataclass
class Source:
    """One table of the input, its format, and how to read it."""

    label: str  # the file (or zip!member) as shown in messages and in rejected rows
    format: str  # gbif | dwca | csv | tsv | txt | parquet
    make_reader: Callable[[], TableReader]
    # Set for DwC-A tables, whose id column (gbifID in GBIF downloads) meta.xml names.
    id_column: str | None = None
    # DwC-A fields with a default and no column: the same value on every row.
    defaults: dict[str, str] = field(default_factory=dict)


def _open_file(path: Path) -> Opener:
    if path.suffix == ".gz":
        return lambda: gzip.open(path, "rb")  # type: ignore[return-value]
    return lambda: open(path, "rb")


def _first_line(opener: Opener, label: str) -> str:
    try:
        with opener() as stream:
            head = stream.read(1 << 16)
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{label}: cannot read ({exc})") from None
    if not head.strip():
        raise InputError(f"{label}: empty file")
    if b"\x00" in head:
        raise InputError(f"{label}: binary data, not a text list of URLs")
    line = head.split(b"\n", 1)[0].removeprefix(b"\xef\xbb\xbf").rstrip(b"\r")
    return line.decode("utf-8", errors="replace")


def _is_gbif_header(columns: list[str]) -> bool:
    return all(name in columns for name in GBIF_MULTIMEDIA_COLUMNS)


def _looks_like_url_column_name(text: str) -> bool:
    return text.strip().lower() in {name.lower() for name in URL_COLUMN_CANDIDATES}


def _text_source(opener: Opener, label: str, name: str, requested: str) -> Source:
    """A delimited text file: pick its format from the request, its name, then its first line."""
    suffix = Path(name.removesuffix(".gz")).suffix.lower()
    fmt = requested
    if fmt == "auto":
        first = _first_line(opener, label)
        if "\t" in first:
            fmt = "gbif" if _is_gbif_header(first.split("\t")) else "tsv"
        elif suffix == ".csv":
            fmt = "csv"
        elif suffix in (".tsv", ".tab"):
            fmt = "tsv"
        elif "," in first and any(_looks_like_url_column_name(c) for c in first.split(",")):
            fmt = "csv"
        else:
            fmt = "txt"
    if fmt in ("gbif", "tsv"):
        return Source(label, fmt, lambda: LinesReader(opener, label, "\t", header_lines=1))
    if fmt == "csv":
        return Source(label, fmt, lambda: CsvReader(opener, label, ",", header_lines=1))
    if fmt == "txt":
        first = _first_line(opener, label)
        header_lines = 1 if _looks_like_url_column_name(first) else 0
        return Source(
            label,
            fmt,
            lambda: LinesReader(opener, label, None, header_lines, column_names=["url"]),
        )
    raise InputError(f"{label}: cannot read a text file as '{fmt}'")


# --- Darwin Core Archives -------------------------------------------------------------------


def _unescape(value: str | None, default: str) -> str:
    if value is None:
        return default
    return value.replace("\\t", "\t").replace("\\n", "\n").replace("\\r", "\r")


def _term_name(term: str) -> str:
    return term.rstrip("/").rsplit("/", 1)[-1].rsplit("#", 1)[-1]


def _dwca_columns(table: ElementTree.Element) -> tuple[list[str], dict[str, str]]:
    """A DwC-A table's column names by index (its id column as `coreid`), and the fields with a
    default value and no column."""
    named: dict[int, str] = {}
    defaults: dict[str, str] = {}
    id_element = table.find(f"{DWCA_NS}coreid")
    if id_element is None:
        id_element = table.find(f"{DWCA_NS}id")
    if id_element is not None and id_element.get("index") is not None:
        named[int(id_element.get("index", 0))] = DWCA_ID_COLUMN
    for element in table.findall(f"{DWCA_NS}field"):
        index = element.get("index")
        name = _term_name(element.get("term", f"column{index}"))
        if index is None:
            if element.get("default") is not None:
                defaults[name] = element.get("default", "")
            continue
        named.setdefault(int(index), name)
    width = max(named) + 1 if named else 0
    names = [named.get(i, f"column{i}") for i in range(width)]
    seen: set[str] = set()
    for i, name in enumerate(names):  # two terms with the same short name: keep both
        if name in seen:
            names[i] = f"{name}_{i}"
        seen.add(names[i])
    return names, {name: value for name, value in defaults.items() if name not in names}


def _dwca_table_source(
    table: ElementTree.Element, open_member: Callable[[str], BinaryIO], label: str
) -> Source:
    location = table.findtext(f"{DWCA_NS}files/{DWCA_NS}location")
    if not location:
        raise InputError(f"{label}: meta.xml names no file for {table.get('rowType')}")
    names, defaults = _dwca_columns(table)
    delimiter = _unescape(table.get("fieldsTerminatedBy"), ",")
    quote = _unescape(table.get("fieldsEnclosedBy"), '"')
    header_lines = int(table.get("ignoreHeaderLines", "0") or 0)
    member_label = f"{label}!{location}"

    def opener() -> BinaryIO:
        return open_member(location)

    id_column = DWCA_ID_COLUMN if DWCA_ID_COLUMN in names else None
    if quote:

        def make_reader() -> TableReader:
            # The file's own header can only be counted (meta.xml is authoritative), but a
            # reader without it would take the header for a row: skip it.
            return CsvReader(opener, member_label, delimiter, header_lines, column_names=names)

    else:

        def make_reader() -> TableReader:
            return LinesReader(opener, member_label, delimiter, header_lines, column_names=names)

    return Source(member_label, "dwca", make_reader, id_column=id_column, defaults=defaults)


def _pick_media_table(meta: ElementTree.Element, label: str) -> ElementTree.Element:
    tables = meta.findall(f"{DWCA_NS}extension")
    core = meta.find(f"{DWCA_NS}core")
    if core is not None:
        tables.append(core)
    for row_type in MULTIMEDIA_ROW_TYPES:
        for table in tables:
            if table.get("rowType") == row_type:
                return table
    found = ", ".join(str(t.get("rowType")) for t in tables) or "none"
    raise InputError(f"{label}: no multimedia data in the archive (its tables: {found})")


def _dwca_source(meta_xml: bytes, open_member: Callable[[str], BinaryIO], label: str) -> Source:
    try:
        meta = ElementTree.fromstring(meta_xml)
    except ElementTree.ParseError as exc:
        raise InputError(f"{label}: meta.xml is not valid XML ({exc})") from None
    return _dwca_table_source(_pick_media_table(meta, label), open_member, label)


def _zip_sources(path: Path, requested: str) -> list[Source]:
    label = str(path)
    try:
        archive = zipfile.ZipFile(path)
        members = {info.filename: info for info in archive.infolist() if not info.is_dir()}
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"{label}: not a readable zip file ({exc}); truncated download?") \
            from None

    def open_member(name: str) -> BinaryIO:
        if name not in members:
            raise InputError(f"{label}: meta.xml names '{name}', which the archive lacks")
        return archive.open(members[name])  # type: ignore[return-value]

    try:
        if "meta.xml" in members:
            source = _dwca_source(archive.read("meta.xml"), open_member, label)
            _first_line(lambda: open_member(source.label.split("!", 1)[1]), source.label)
            return [source]
        for name in members:
            if Path(name).name == "multimedia.txt":
                opener: Opener = lambda name=name: open_member(name)  # noqa: E731
                return [_text_source(opener, f"{label}!{name}", name, requested)]
    except zipfile.BadZipFile as exc:
        raise InputError(f"{label}: damaged zip file ({exc}); truncated download?") from None
    raise InputError(f"{label}: no multimedia data in the zip (no meta.xml, no multimedia.txt)")


def _file_sources(path: Path, requested: str, label: str) -> list[Source]:
    suffixes = [s.lower() for s in path.suffixes]
    if requested == "parquet" or (requested == "auto" and suffixes[-1:] in (
        [".parquet"], [".pq"]
    )):
        return [Source(label, "parquet", lambda: ParquetReader(path, label))]
    if requested == "dwca" or (requested == "auto" and suffixes[-1:] == [".zip"]):
        return _zip_sources(path, "auto" if requested == "dwca" else requested)
    if requested == "auto" and zipfile.is_zipfile(path):
        return _zip_sources(path, requested)
    return [_text_source(_open_file(path), label, path.name, requested)]


def _dwca_folder_sources(folder: Path) -> list[Source]:
    meta = folder / "meta.xml"

    def open_member(name: str) -> BinaryIO:
        member = folder / name
        if not member.exists():
            raise InputError(f"{folder}: meta.xml names '{name}', which the folder lacks")
        return open(member, "rb")

    return [_dwca_source(meta.read_bytes(), open_member, str(folder))]


def discover(path: Path, requested: str) -> tuple[list[Source], list[str]]:
    """The input's tables, and warnings about files of a folder that were skipped."""
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_file():
        if path.stat().st_size == 0:
            raise InputError(f"{path}: empty file")
        return _file_sources(path, requested, str(path)), []
    if (path / "meta.xml").exists():
        return _dwca_folder_sources(path), []
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise InputError(f"{path}: the folder holds no files")
    sources: list[Source] = []
    warnings: list[str] = []
    for file in files:
        if file.stat().st_size == 0:
            warnings.append(f"{file}: empty file, skipped")
            continue
        try:
            sources.extend(_file_sources(file, requested, str(file)))
        except InputError as exc:
            warnings.append(f"{exc}, skipped")
    if not sources:
        raise InputError(f"{path}: no readable file in the folder ({'; '.join(warnings)})")
    return sources, warnings


FINGERPRINT_BYTES = 1 << 20  # read from the head and from the tail of every input file


def input_fingerprint(path: Path) -> str:
    """What tells one input from another, cheaply even for 100 GB: every file's size and the
    bytes at its head and tail (a folder: its files in order, with their relative names; a
    single file: not its name, so a copy elsewhere is the same input)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        size = file.stat().st_size
        name = "" if file == path else file.relative_to(path).as_posix()
        digest.update(f"{name}\0{size}\0".encode())
        with open(file, "rb") as handle:
            digest.update(handle.read(FINGERPRINT_BYTES))
            if size > 2 * FINGERPRINT_BYTES:
                handle.seek(-FINGERPRINT_BYTES, 2)
                digest.update(handle.read())
    return digest.hexdigest()[:32]
