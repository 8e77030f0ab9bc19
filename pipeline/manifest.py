"""Corpus manifests: a typed YAML schema for "which components, where, how much, which filters".

A manifest names the corpus and lists components; each component is a set of files (globs
relative to the manifest's ``root``, or URLs fsspec can open) in one format. A path that names an
existing file (for ``hf_disk``: folder) is taken as is, even when it holds glob characters
(``vol[1].txt``); only otherwise is it expanded as a glob. Validation is strict: unknown keys,
wrong types, missing files, bad globs, a broken ``hf_disk`` folder (``state.json`` not JSON, an
Arrow file it lists missing), a file name that is not UTF-8 and a file that belongs to two components (compared after
``os.path.realpath``, URLs after normalisation) raise ``ManifestError`` naming the manifest file,
the component and the YAML line (from the yaml node marks), so a typo never silently turns into
an empty component or a component read twice.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import yaml

FORMATS = ("jsonl", "jsonl.gz", "jsonl.zst", "parquet", "txt", "hf_disk")
_SUFFIX_FORMAT = {".jsonl": "jsonl", ".jsonl.gz": "jsonl.gz", ".jsonl.zst": "jsonl.zst",
                  ".parquet": "parquet", ".txt": "txt"}


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names file, component and line."""


@dataclass
class FilterConfig:
    """Document-level quality filters. They only keep or drop; text is never modified."""

    min_chars: int = 1
    """Drop documents shorter than this many characters (reason ``too_short``)."""
    max_chars: int = 2_000_000
    """Drop documents longer than this many characters (reason ``too_long``)."""
    max_dup_line_frac: float = 0.5
    """Drop documents whose repeated non-empty lines exceed this fraction of all non-empty
    lines (Gopher's duplicate-line heuristic; reason ``dup_lines``). Needs >= 4 lines."""
    max_char_run: int = 256
    """Drop documents with one character repeated more than this many times in a row
    (reason ``char_run``)."""
    min_distinct_chars: int = 4
    """Drop documents made of fewer distinct characters than this (reason ``low_diversity``)."""
    max_doc_bytes: int = 64 * 2**20
    """Documents whose text is larger than this many UTF-8 bytes are bad input (reason ``oversized``),
    counted in the read stage and quarantined. At most ``MAX_DOC_BYTES`` (1 GiB). A raw jsonl line longer than
    ``pipeline.read.max_line_bytes`` (max(4 x this + 64, 64 MiB)) is dropped unread as ``line_oversized``."""


MAX_DOC_BYTES = 2**30
"""Upper bound of ``filters.max_doc_bytes``: a txt file is read whole up to the limit and a jsonl line
up to 4x it (so one reader may hold several times the limit), and a document of at most 2**30 bytes
has fewer than 2**31 tokens (each token covers at least one byte), within int32 list offsets."""


MAX_UNITS = 2**16
"""A component's files (for ``hf_disk``: Arrow files) must number fewer than this: a document's key is
``component << 48 | file << 32 | line`` (``pipeline.read.Unit``)."""


@dataclass
class NearDedupSettings:
    """MinHash near-duplicate removal (pipeline.dedup); ``params`` go to ``MinHashConfig``."""

    enabled: bool = False
    threshold: float = 0.8
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class ComponentSpec:
    """One corpus component: files in one format, with its metadata and filter settings."""

    name: str
    paths: list[str]
    format: str
    text_field: str = "text"
    id_field: str | None = None
    language: str | list[str] | None = None
    category: str | None = None
    weight: float = 1.0
    """How many times the trainer sees the component (fractional allowed)."""
    filters: FilterConfig = field(default_factory=FilterConfig)
    source: str | None = None
    """Where the component comes from (dataset id or URL); metadata only."""
    license: str | None = None
    published_tokens: int | None = None
    """Token count published by the source, where known (metadata only)."""
    notes: str | None = None
    line: int = 0
    """Manifest line where the component starts (1-based), for error messages."""
    files: list[str] = field(default_factory=list)
    """Resolved, sorted file list (absolute paths or URLs), each file once (by ``file_identity``)."""
    missing: list[str] = field(default_factory=list)
    """Path patterns that matched nothing (only kept when resolving with allow_missing)."""


@dataclass
class Manifest:
    """A validated manifest; ``components`` keep manifest order (it defines document keys)."""

    name: str
    path: str
    sha256: str
    root: str
    components: list[ComponentSpec]
    near_dedup: NearDedupSettings = field(default_factory=NearDedupSettings)
    exact_dedup: bool = True
    shard_tokens: int = 64 * 2**20
    """Target tokens per output shard (a shard closes after the document that crosses it)."""
    description: str | None = None
    total_tokens: int | None = None


class _LineLoader(yaml.SafeLoader):
    """SafeLoader whose mappings remember the line of the mapping and of each key."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    out = _LineDict()
    out.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in out:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
    return out


class _LineDict(dict):
    line: int = 0

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.key_lines: dict[str, int] = {}


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

_TOP_KEYS = {"name", "description", "root", "components", "defaults", "near_dedup", "exact_dedup",
             "shard_tokens", "total_tokens"}
_COMPONENT_KEYS = {f.name for f in dataclasses.fields(ComponentSpec)} - {"line", "files", "missing"}
_DEFAULT_KEYS = {"text_field", "id_field", "format", "filters", "weight", "language", "category"}
_FILTER_KEYS = {f.name for f in dataclasses.fields(FilterConfig)}


def _where(mpath: str, line: int, comp: str | None = None) -> str:
    return f"{mpath}:{line}" + (f": component {comp!r}" if comp else "")


def _check_keys(d: _LineDict, allowed: set[str], mpath: str, comp: str | None, what: str) -> None:
    for k in d:
        if k not in allowed:
            raise ManifestError(f"{_where(mpath, d.key_lines.get(k, d.line), comp)}: unknown key "
                                f"{k!r} in {what} (allowed: {', '.join(sorted(allowed))})")


def _typed(value: Any, types: tuple, mpath: str, line: int, comp: str | None, key: str) -> Any:
    if isinstance(value, bool) and bool not in types:
        ok = False
    else:
        ok = isinstance(value, types)
    if not ok:
        names = "/".join(t.__name__ for t in types)
        raise ManifestError(f"{_where(mpath, line, comp)}: {key!r} must be {names}, got {value!r}")
    return value


def _show(v: Any) -> str:
    """``repr`` of a manifest value, shortened (a YAML int can have hundreds of digits)."""
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _finite_float(v: int | float) -> float:
    """``v`` as a float; an int too large for one (``1`` followed by 400 zeros) is ``inf``."""
    try:
        return float(v)
    except OverflowError:
        return math.inf


def _filters(d: Any, base: FilterConfig, mpath: str, line: int, comp: str | None) -> FilterConfig:
    if d is None:
        return base
    if not isinstance(d, _LineDict):
        raise ManifestError(f"{_where(mpath, line, comp)}: 'filters' must be a mapping")
    _check_keys(d, _FILTER_KEYS, mpath, comp, "filters")
    out = dataclasses.replace(base)
    for f in dataclasses.fields(FilterConfig):
        if f.name in d:
            frac = f.type in ("float",)
            where = _where(mpath, d.key_lines[f.name], comp)
            v = _typed(d[f.name], (int, float) if frac else (int,), mpath, d.key_lines[f.name], comp,
                       f"filters.{f.name}")
            if frac and not (math.isfinite(_finite_float(v)) and 0 <= v <= 1):
                raise ManifestError(f"{where}: 'filters.{f.name}' must be within [0, 1], got {_show(v)}")
            lowest = 1 if f.name == "max_doc_bytes" else 0
            if not frac and v < lowest:
                raise ManifestError(f"{where}: 'filters.{f.name}' must be >= {lowest}, got {_show(v)}")
            if f.name == "max_doc_bytes" and v > MAX_DOC_BYTES:
                raise ManifestError(f"{where}: 'filters.max_doc_bytes' must be at most 2**30 (1 GiB), "
                                    f"got {_show(v)}")
            setattr(out, f.name, v)
    if out.min_chars > out.max_chars:  # with the defaults' values: every document would be dropped
        raise ManifestError(f"{_where(mpath, line, comp)}: 'filters.min_chars' ({_show(out.min_chars)}) is above "
                            f"'filters.max_chars' ({_show(out.max_chars)}): every document would be dropped")
    return out


_BAD_GLOB = re.compile(r"\[[^\]]*$|(?<=[^/\\])\*\*|\*\*(?![/\\]|$)")
"""An unclosed ``[``, or ``**`` that is not a whole path segment (preceded by something other than
a separator or the pattern's start, or followed by something other than a separator or its end)."""


_BAD_NAME = re.compile(r"[/\\\x00-\x1f\x7f]")
"""Characters a component name must not hold: a document id is ``component/file:line`` (stages), which
must split at its first '/' (component ``x`` with ``y/z.jsonl`` and ``x/y`` with ``z.jsonl`` would
share ids), and names also go into file names and log lines."""


def _is_url(p: str) -> bool:
    return "://" in p


def _join(root: str, pattern: str) -> str:
    """``pattern`` as an absolute path or URL: relative patterns hang off ``root`` (a folder or a URL)."""
    if _is_url(pattern) or os.path.isabs(pattern):
        return pattern
    return root.rstrip("/") + "/" + pattern if _is_url(root) else os.path.join(root, pattern)


class _BadGlob(ValueError):
    pass


def _expand(pattern: str, root: str, want_dir: bool = False) -> list[str]:
    """The files (folders if ``want_dir``) ``pattern`` names. A pattern with glob characters that
    names an existing file (folder) literally is that file, not a glob: ``vol[1].txt`` must not
    read ``vol1.txt`` instead. Raises ``_BadGlob`` for a malformed glob."""
    full = _join(root, pattern)
    magic = glob.has_magic(full)
    if _is_url(full):
        import fsspec

        if magic:
            fs, path = fsspec.core.url_to_fs(full)
            if fs.isdir(path) if want_dir else fs.isfile(path):
                return [full]
        if _BAD_GLOB.search(pattern):
            raise _BadGlob(pattern)
        fs, _, paths = fsspec.get_fs_token_paths(full)
        proto = full.split("://", 1)[0]
        return sorted(p if "://" in p else f"{proto}://{p}" for p in paths)
    if magic:
        if os.path.isdir(full) if want_dir else os.path.isfile(full):
            return [os.path.abspath(full)]
        if _BAD_GLOB.search(pattern):
            raise _BadGlob(pattern)
        # the root is a folder, not a pattern: its own glob characters ('corpus[v2]') match only themselves
        # (unescaped, 'corpus[v2]/*.jsonl' read corpusv/ or corpus2/ instead)
        full = pattern if os.path.isabs(pattern) else os.path.join(glob.escape(root), pattern)
        return sorted(os.path.abspath(p) for p in glob.glob(full, recursive=True))
    return [os.path.abspath(full)] if os.path.exists(full) else []


def file_identity(path: str) -> str:
    """What makes two resolved files the same file: ``os.path.realpath`` for local paths and
    ``file://`` URLs; for other URLs the URL with the scheme lower-cased (and the host, for
    http/https), repeated slashes and ``.``/``..`` segments removed from the path."""
    if not _is_url(path):
        return os.path.realpath(path)
    u = urlsplit(path)
    scheme = u.scheme.lower()
    if scheme in ("file", "local"):
        return os.path.realpath(u.path)
    netloc = u.netloc.lower() if scheme in ("http", "https") else u.netloc
    norm = re.sub("/+", "/", u.path)
    norm = posixpath.normpath(norm) if norm else ""
    return f"{scheme}://{netloc}{norm}" + (f"?{u.query}" if u.query else "")


def infer_format(path: str) -> str | None:
    for suf in sorted(_SUFFIX_FORMAT, key=len, reverse=True):
        if path.endswith(suf):
            return _SUFFIX_FORMAT[suf]
    return None


def load_manifest(path: str, root: str | None = None, allow_missing: bool = False) -> Manifest:
    """Parse, validate and resolve a manifest.

    ``root`` overrides the manifest's ``root`` (paths are relative to it; a relative root is
    relative to the manifest's folder; ``$VARS`` are expanded). With ``allow_missing`` the
    missing path patterns are recorded on each component instead of raising (``--dry-run``).
    """
    mpath = path
    try:
        raw = open(path, "rb").read()
    except OSError as e:
        raise ManifestError(f"{path}: cannot read manifest: {e.strerror}") from None
    try:
        doc = yaml.load(raw.decode("utf-8"), Loader=_LineLoader)
    except (yaml.YAMLError, ValueError) as e:  # ValueError: UnicodeDecodeError, an int over 4300 digits
        raise ManifestError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(doc, _LineDict):
        raise ManifestError(f"{path}:1: manifest must be a mapping with 'name' and 'components'")
    _check_keys(doc, _TOP_KEYS, mpath, None, "manifest")
    for req in ("name", "components"):
        if req not in doc:
            raise ManifestError(f"{path}:{doc.line}: missing required key {req!r}")
    name = _typed(doc["name"], (str,), mpath, doc.key_lines["name"], None, "name")
    for key, types in (("description", (str, type(None))), ("total_tokens", (int, type(None)))):
        _typed(doc.get(key), types, mpath, doc.key_lines.get(key, doc.line), None, key)

    root_spec = root if root is not None else doc.get("root", ".")
    _typed(root_spec, (str,), mpath, doc.key_lines.get("root", doc.line), None, "root")
    root_dir = os.path.expandvars(os.path.expanduser(root_spec))
    if not _is_url(root_dir) and not os.path.isabs(root_dir):
        root_dir = os.path.join(os.path.dirname(os.path.abspath(path)), root_dir)
    root_dir = root_dir if _is_url(root_dir) else os.path.normpath(root_dir)

    defaults = doc.get("defaults") or _LineDict()
    if not isinstance(defaults, _LineDict):
        raise ManifestError(f"{_where(mpath, doc.key_lines['defaults'])}: 'defaults' must be a mapping")
    _check_keys(defaults, _DEFAULT_KEYS, mpath, None, "defaults")
    base_filters = _filters(defaults.get("filters"), FilterConfig(), mpath, defaults.line, None)

    nd = NearDedupSettings()
    if "near_dedup" in doc:
        d = doc["near_dedup"]
        line = doc.key_lines["near_dedup"]
        if not isinstance(d, _LineDict):
            raise ManifestError(f"{_where(mpath, line)}: 'near_dedup' must be a mapping")
        params = {k: v for k, v in d.items() if k not in ("enabled", "threshold")}
        nd = NearDedupSettings(
            enabled=_typed(d.get("enabled", True), (bool,), mpath, line, None, "near_dedup.enabled"),
            threshold=_finite_float(_typed(d.get("threshold", 0.8), (int, float), mpath, line, None,
                                   "near_dedup.threshold")),
            params=params)
        _check_near_dedup(nd, mpath, d, line)
    exact = _typed(doc.get("exact_dedup", True), (bool,), mpath,
                   doc.key_lines.get("exact_dedup", 0), None, "exact_dedup")
    shard_tokens = _typed(doc.get("shard_tokens", Manifest.shard_tokens), (int,), mpath,
                          doc.key_lines.get("shard_tokens", 0), None, "shard_tokens")
    if not 0 < shard_tokens <= 2**30:  # a shard's input_ids is one list column with int32 offsets
        raise ManifestError(f"{_where(mpath, doc.key_lines.get('shard_tokens', doc.line))}: "
                            f"'shard_tokens' must be in 1..2**30, got {shard_tokens!r}")

    comps_raw = doc["components"]
    if not isinstance(comps_raw, list) or not comps_raw:
        raise ManifestError(f"{_where(mpath, doc.key_lines['components'])}: 'components' must be "
                            f"a non-empty list")
    comps: list[ComponentSpec] = []
    seen: set[str] = set()
    owner: dict[str, tuple[ComponentSpec, str, str, int]] = {}  # identity -> (comp, file, pattern, line)
    for i, c in enumerate(comps_raw):
        if not isinstance(c, _LineDict):
            raise ManifestError(f"{mpath}: components[{i}] must be a mapping")
        cname = c.get("name")
        if not isinstance(cname, str) or not cname:
            raise ManifestError(f"{_where(mpath, c.line)}: components[{i}] needs a 'name' (string)")
        if _BAD_NAME.search(cname):
            raise ManifestError(f"{_where(mpath, c.key_lines.get('name', c.line))}: component name {cname!r} "
                                f"must not contain '/', '\\' or control characters (document ids are "
                                f"component/file:line)")
        if cname in seen:
            raise ManifestError(f"{_where(mpath, c.line, cname)}: duplicate component name")
        seen.add(cname)
        _check_keys(c, _COMPONENT_KEYS, mpath, cname, "component")
        spec, origin = _component(c, cname, defaults, base_filters, mpath, root_dir, allow_missing)
        _check_disjoint(spec, origin, owner, mpath)
        comps.append(spec)
    if len(comps) >= 2**15:
        raise ManifestError(f"{mpath}: at most {2**15 - 1} components")
    return Manifest(name=name, path=path, sha256=hashlib.sha256(raw).hexdigest(), root=root_dir,
                    components=comps, near_dedup=nd, exact_dedup=exact, shard_tokens=shard_tokens,
                    description=doc.get("description"), total_tokens=doc.get("total_tokens"))


def _check_disjoint(spec: ComponentSpec, origin: dict[str, tuple[str, str, int]],
                    owner: dict[str, tuple[ComponentSpec, str, str, int]], mpath: str) -> None:
    """A file in two components would be read twice (every document twice without exact dedup)
    under two names; ``owner`` collects identity -> (component, file, pattern, line) so far."""
    for ident, (f, pattern, line) in origin.items():
        if ident in owner:
            other, f0, pattern0, line0 = owner[ident]
            alias = f" as {f0}" if f0 != f else ""
            raise ManifestError(f"{_where(mpath, line, spec.name)}: file {f} belongs to both component "
                                f"{other.name!r} ({mpath}:{line0}, path {pattern0!r}{alias}) and component "
                                f"{spec.name!r} ({mpath}:{line}, path {pattern!r}); a file may be in one "
                                f"component only")
        owner[ident] = (spec, f, pattern, line)


_ANNOTATION_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "None": (type(None),)}
"""The YAML values each annotation of a ``MinHashConfig`` field takes (an int where a float is meant)."""


def _check_near_dedup(nd: NearDedupSettings, mpath: str, d: _LineDict, line: int) -> None:
    """Unknown keys name their own line; bad values are a manifest error too, not a crash mid-build."""
    try:
        from pipeline.dedup import MinHashConfig
    except ImportError:
        return
    fields = {f.name: f for f in dataclasses.fields(MinHashConfig)}
    for k, v in nd.params.items():
        if k not in fields:
            raise ManifestError(f"{_where(mpath, d.key_lines.get(k, d.line))}: unknown key {k!r} in "
                                f"near_dedup (allowed: enabled, {', '.join(sorted(fields))})")
        # the field's annotation ("int", "float | None", ...): MinHashConfig takes 128.5 or 'no' as they are
        types = tuple(t for name in str(fields[k].type).split(" | ") for t in _ANNOTATION_TYPES[name])
        _typed(v, types, mpath, d.key_lines.get(k, line), None, f"near_dedup.{k}")
    try:
        MinHashConfig(threshold=nd.threshold, **nd.params)
    except (TypeError, ValueError, OverflowError) as e:
        raise ManifestError(f"{_where(mpath, line)}: near_dedup: {e}") from None


def _check_utf8_name(path: str, pattern: str, mpath: str, line: int, cname: str) -> None:
    """A file name that is not UTF-8 (legal on Linux, e.g. Latin-1 names from old archives; Python
    holds its bytes as lone surrogates) cannot go into document ids, the index or the resume
    fingerprint, which are UTF-8 text: refused here, naming the file by its bytes."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise ManifestError(f"{_where(mpath, line, cname)}: file name is not UTF-8: {os.fsencode(path)!r} "
                            f"(matched by {pattern!r}); rename it") from None


def _check_hf_disk(folder: str, pattern: str, mpath: str, line: int, cname: str) -> list[str]:
    """An hf_disk path must be one saved ``Dataset`` (state.json or Arrow files), not e.g. a
    ``DatasetDict`` folder, which would otherwise read as an empty component. A state.json must
    be JSON with a ``_data_files`` list of ``{"filename": ...}`` whose files all exist (what
    ``pipeline.read.hf_disk_files`` reads), so a broken folder fails here, naming the file.
    Returns the folder's Arrow files (each is one unit of work and numbers its documents' keys).
    A URL is refused here: the reader memory-maps the Arrow files, which needs a local folder."""
    where = _where(mpath, line, cname)
    if _is_url(folder):
        raise ManifestError(f"{where}: hf_disk reads a local folder (datasets' save_to_disk output; its Arrow "
                            f"files are memory-mapped), got the URL {folder!r} (from {pattern!r}): copy it to "
                            f"local disk, or give the data as parquet/jsonl files, which may be URLs")
    state = os.path.join(folder, "state.json")
    if os.path.exists(state):
        return _check_state_json(state, folder, where)
    arrows = sorted(n for n in os.listdir(folder) if n.endswith(".arrow"))
    if arrows:
        return [os.path.join(folder, n) for n in arrows]
    dd = os.path.join(folder, "dataset_dict.json")
    if os.path.exists(dd):
        try:
            with open(dd) as f:
                splits = [str(s) for s in json.load(f)["splits"]]
        except (OSError, ValueError, KeyError, TypeError):
            splits = sorted(n for n in os.listdir(folder) if os.path.isdir(os.path.join(folder, n)))
        hint = "; ".join(f"point at {pattern.rstrip('/')}/{s}" for s in splits) or "point at one split"
        raise ManifestError(f"{where}: {folder} is a DatasetDict (splits: {', '.join(splits)}), not "
                            f"one dataset: {hint}")
    raise ManifestError(f"{where}: {folder} is not a saved dataset (no state.json and no *.arrow "
                        f"file)")


def _check_state_json(state: str, folder: str, where: str) -> list[str]:
    try:
        with open(state, "rb") as f:
            doc = json.load(f)
    except OSError as e:
        raise ManifestError(f"{where}: cannot read {state}: {e.strerror}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ManifestError(f"{where}: {state} is not valid JSON ({e})") from None
    entries = doc.get("_data_files") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise ManifestError(f"{where}: {state} has no '_data_files' list (not written by "
                            f"datasets' save_to_disk?)")
    out = []
    for i, d in enumerate(entries):
        name = d.get("filename") if isinstance(d, dict) else None
        if not isinstance(name, str) or not name:
            raise ManifestError(f"{where}: {state}: _data_files[{i}] has no 'filename' string")
        arrow = os.path.join(folder, name)
        if not os.path.isfile(arrow):
            raise ManifestError(f"{where}: {arrow} is missing (listed in {state})")
        out.append(arrow)
    return out


def _component(c: _LineDict, cname: str, defaults: _LineDict, base_filters: FilterConfig,
               mpath: str, root_dir: str, allow_missing: bool
               ) -> tuple[ComponentSpec, dict[str, tuple[str, str, int]]]:
    """The component, and for each of its files identity -> (file, path pattern, manifest line)."""
    kl = c.key_lines
    paths = c.get("paths")
    if isinstance(paths, str):
        paths = [paths]
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
        raise ManifestError(f"{_where(mpath, kl.get('paths', c.line), cname)}: 'paths' must be a "
                            f"non-empty list of path globs")
    fmt = c.get("format", defaults.get("format"))
    if fmt is None:
        implied = {p: infer_format(p) for p in paths}
        if len(set(implied.values())) > 1:
            shown = ", ".join(f"{p!r} -> {f or 'unknown'}" for p, f in implied.items())
            raise ManifestError(f"{_where(mpath, kl.get('paths', c.line), cname)}: paths imply different "
                                f"formats ({shown}); split the component or set 'format'")
        fmt = implied[paths[0]]
        if fmt is None:
            raise ManifestError(f"{_where(mpath, kl.get('paths', c.line), cname)}: cannot tell the format from "
                                f"{paths[0]!r} (known endings: {', '.join(_SUFFIX_FORMAT)}); set 'format' to one of "
                                f"{', '.join(FORMATS)}")
    if fmt not in FORMATS:
        raise ManifestError(f"{_where(mpath, kl.get('format', c.line), cname)}: 'format' must be one "
                            f"of {', '.join(FORMATS)}, got {fmt!r}")

    def get(key: str, types: tuple, default: Any) -> Any:
        if key in c:
            return _typed(c[key], types, mpath, kl[key], cname, key)
        if key in defaults:
            return _typed(defaults[key], types, mpath, defaults.key_lines[key], cname, key)
        return default

    raw_weight = get("weight", (int, float), 1.0)
    weight = _finite_float(raw_weight)
    if not (math.isfinite(weight) and weight > 0):
        wline = kl["weight"] if "weight" in c else defaults.key_lines.get("weight", c.line)
        raise ManifestError(f"{_where(mpath, wline, cname)}: 'weight' must be a finite number > 0, "
                            f"got {_show(raw_weight)}")
    language = get("language", (str, list, type(None)), None)
    if isinstance(language, list) and not all(isinstance(x, str) and x for x in language):
        lline = kl["language"] if "language" in c else defaults.key_lines.get("language", c.line)
        raise ManifestError(f"{_where(mpath, lline, cname)}: 'language' must be a string or a list of "
                            f"strings, got {_show(language)}")
    spec = ComponentSpec(
        name=cname, paths=paths, format=fmt, text_field=get("text_field", (str,), "text"),
        id_field=get("id_field", (str, type(None)), None),
        language=language,
        category=get("category", (str, type(None)), None), weight=weight,
        filters=_filters(c.get("filters"), base_filters, mpath, kl.get("filters", c.line), cname),
        source=get("source", (str, type(None)), None), license=get("license", (str, type(None)), None),
        published_tokens=get("published_tokens", (int, type(None)), None),
        notes=get("notes", (str, type(None)), None), line=c.line)
    files: dict[str, str] = {}  # file -> the path pattern that first matched it
    arrows: dict[str, int] = {}  # hf_disk folder -> its number of Arrow files
    line = kl.get("paths", c.line)
    for p in paths:
        try:
            matched = _expand(p, root_dir, want_dir=fmt == "hf_disk")
        except _BadGlob:
            raise ManifestError(f"{_where(mpath, line, cname)}: bad glob {p!r} (unclosed '[' or '**' "
                                f"not a whole path segment)") from None
        except Exception as e:  # fsspec raises many kinds for unreachable URLs
            raise ManifestError(f"{_where(mpath, line, cname)}: cannot list {p!r}: {e}") from None
        if fmt == "hf_disk":
            matched = [m for m in matched if _is_url(m) or os.path.isdir(m)]
            for m in matched:
                names = _check_hf_disk(m, p, mpath, line, cname)
                for a in names:
                    _check_utf8_name(a, p, mpath, line, cname)
                arrows[m] = len(names)
        elif not any(_is_url(m) for m in matched):
            matched = [m for m in matched if os.path.isfile(m)]
        if not matched:
            if allow_missing:
                spec.missing.append(p)
                continue
            where = _join(root_dir, p)
            raise ManifestError(f"{_where(mpath, line, cname)}: path {p!r} matches no "
                                f"{'dataset folder' if fmt == 'hf_disk' else 'file'} (looked for {where})")
        for m in matched:
            _check_utf8_name(m, p, mpath, line, cname)
            files.setdefault(m, p)
    origin: dict[str, tuple[str, str, int]] = {}
    for f in sorted(files):  # a symlink and its target in one component: the file is read once
        origin.setdefault(file_identity(f), (f, files[f], line))
    spec.files = [f for f, _, _ in origin.values()]
    # document keys number a component's units (files; the Arrow files of hf_disk folders) in 16 bits
    n_units = sum(arrows.get(f, 1) for f in spec.files) if fmt == "hf_disk" else len(spec.files)
    if n_units >= MAX_UNITS:
        what = "Arrow files (in all its hf_disk folders)" if fmt == "hf_disk" else "files"
        raise ManifestError(f"{_where(mpath, c.line, cname)}: at most {MAX_UNITS - 1} files per component "
                            f"(document keys number them in 16 bits), got {n_units} {what}; split it")
    return spec, origin
