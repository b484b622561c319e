"""Edit datasets in EasyEdit's formats, turned into canonical records.

A canonical record is an EasyEdit request dict with the subject filled into the
prompt: ``case_id, prompt, subject, target_new, ground_truth, rephrase_prompt,
locality_prompt, locality_ground_truth``. It can be passed to the editors as is.

Formats read (detected from the first item):

- KnowEdit CounterFact (``prompt, target_new, subject, ground_truth,
  rephrase_prompt, locality_prompt, locality_ground_truth``), which is also the
  format of our bundled demo edits;
- EasyEdit ZsRE (``subject, src, alt, answers, rephrase, loc, loc_ans``);
- the original MEMIT CounterFact (``requested_rewrite``, ``paraphrase_prompts``,
  ``neighborhood_prompts``).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import List, Optional, Tuple, Union

from .errors import RequestError

DEMO_FILE = "demo_edits.json"


def demo_path() -> Path:
    """Path of the bundled demo edits (our own facts, KnowEdit CounterFact format)."""
    return Path(str(resources.files("easyedit_replay") / "data" / DEMO_FILE))


def _first(x):
    if isinstance(x, (list, tuple)):
        return x[0] if x else None
    return x


def _from_knowedit(item: dict, i: int) -> dict:
    return {
        "case_id": item.get("case_id", i),
        "prompt": item["prompt"],
        "subject": item["subject"],
        "target_new": _first(item["target_new"]),
        "ground_truth": _first(item.get("ground_truth")),
        "rephrase_prompt": _first(item.get("rephrase_prompt")),
        "locality_prompt": _first(item.get("locality_prompt")),
        "locality_ground_truth": _first(item.get("locality_ground_truth")),
    }


def _from_zsre(item: dict, i: int) -> dict:
    return {
        "case_id": item.get("case_id", i),
        "prompt": item["src"],
        "subject": item["subject"],
        "target_new": item["alt"],
        "ground_truth": _first(item.get("answers")) or item.get("pred"),
        "rephrase_prompt": item.get("rephrase"),
        "locality_prompt": item.get("loc"),
        "locality_ground_truth": item.get("loc_ans"),
    }


def _from_memit_counterfact(item: dict, i: int) -> dict:
    rw = item["requested_rewrite"]
    return {
        "case_id": item.get("case_id", i),
        "prompt": rw["prompt"].format(rw["subject"]),
        "subject": rw["subject"],
        "target_new": rw["target_new"]["str"],
        "ground_truth": rw["target_true"]["str"],
        "rephrase_prompt": _first(item.get("paraphrase_prompts")),
        "locality_prompt": _first(item.get("neighborhood_prompts")),
        "locality_ground_truth": rw["target_true"]["str"],
    }


def load_records(path: Union[str, Path, None] = None, n: Optional[int] = None,
                 records: Optional[slice] = None) -> List[dict]:
    """Read ``path`` (default: the bundled demo edits) and return canonical records.

    Args:
        n: keep the first ``n`` records (all when None) of the selection; must be in
            ``1..len(selection)``.
        records: a slice of the file's items to select first (``compare --records``,
            e.g. ``slice(1823, 1919)`` for a tuning split at the end of a file), or a
            sequence of slices taken in order (:func:`parse_records`); the records keep
            their position in the file as ``case_id`` where the file has none.

    Raises:
        RequestError: missing or unreadable file, invalid JSON, not a non-empty list
            of objects, a range that selects nothing, overlapping ranges, unknown format, an item missing a field or holding a
            non-string text, or ``n`` out of range (the message names the item index
            and the field).
    """
    where = f"--data {str(path)!r}" if path is not None else "the bundled demo edits"
    path = Path(path) if path is not None else demo_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RequestError(f"{where}: file not found; pass an existing JSON file of edits") from None
    except IsADirectoryError:
        raise RequestError(f"{where} is a directory; pass a JSON file of edits") from None
    except UnicodeDecodeError as exc:
        raise RequestError(f"{where} is not UTF-8 text ({exc}); pass a JSON file of edits") from None
    except json.JSONDecodeError as exc:
        raise RequestError(f"{where} is not valid JSON ({exc})") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        raise RequestError(f"{where}: expected a non-empty JSON list of edits")
    positions = list(range(len(data)))  # each selected item's position in the file
    if records is not None:
        ranges = (records,) if isinstance(records, slice) else tuple(records)
        positions, spans = [], []
        for r in ranges:
            chosen = range(len(data))[r]
            if not chosen:
                raise RequestError(f"--records {r.start}:{r.stop}: selects no item of {where} "
                                   f"({len(data)} edits); pass a range inside 0:{len(data)}")
            positions += chosen
            spans.append(f"{chosen.start}:{chosen.stop}")
        if len(set(positions)) != len(positions):
            raise RequestError(f"--records: the ranges overlap; pass ranges that select each item of {where} once")
        data = [data[i] for i in positions]
        where = f"{where} [{','.join(spans)}]"
    if n is not None and not 1 <= n <= len(data):
        raise RequestError(f"--n {n}: {where} holds {len(data)} edits; pass --n between 1 and {len(data)}")
    bad = next((i for i, item in enumerate(data) if not isinstance(item, dict)), None)
    if bad is not None:
        raise RequestError(f"{where}: item {bad} is a {type(data[bad]).__name__}, expected an object with the edit's fields")
    first = data[0]
    if "requested_rewrite" in first:
        convert = _from_memit_counterfact
    elif "src" in first and "alt" in first:
        convert = _from_zsre
    elif "prompt" in first and "target_new" in first:
        convert = _from_knowedit
    else:
        raise RequestError(
            f"{where}: unknown format (keys {sorted(first)}); expected EasyEdit's "
            f"CounterFact (prompt, subject, target_new, ...) or ZsRE (src, subject, alt, ...)"
        )
    records = []
    for i, item in enumerate(data[: n if n is not None else len(data)]):
        try:
            records.append(convert(item, positions[i]))
        except (KeyError, TypeError) as exc:
            raise RequestError(f"{where}: item {i} lacks field {exc}") from None
    return records


def parse_records(text: Optional[str]) -> Union[slice, Tuple[slice, ...], None]:
    """``"1823:1919"`` -> ``slice(1823, 1919)``: the records of ``--data`` to use, as a
    Python slice (``"-96:"`` is the last 96); comma-separated ranges are taken in the
    order given (``"1823:1919,1535:1823"`` -> a tuple of two slices: a sequence whose
    first batch is 1823-1918); None when not given.

    Raises:
        RequestError: a range not of the form ``START:END`` with integers (names ``--records``).
    """
    if text is None:
        return None
    ranges = []
    for part in text.split(","):
        bounds = part.split(":")
        try:
            if len(bounds) != 2:
                raise ValueError
            start, end = (int(x) if x.strip() else None for x in bounds)
        except ValueError:
            raise RequestError(f"--records {text!r}: expected START:END, e.g. 1823:1919 (a Python slice of --data), "
                               f"or ranges separated by commas") from None
        ranges.append(slice(start, end))
    return ranges[0] if len(ranges) == 1 else tuple(ranges)


TEXT_FIELDS = ("ground_truth", "rephrase_prompt", "locality_prompt", "locality_ground_truth")


def validate_records(records: List[dict], leading_space: bool = True, source: str = "--data") -> None:
    """Check canonical records before any model is loaded: every edit request as the
    editors will prepare it (:func:`easyedit_replay.prompts.prepare_requests`: string
    ``prompt``/``subject``/``target_new``, subject in the prompt, ...) and the
    evaluation fields (strings or missing).

    Raises:
        RequestError: naming ``source``, the item and the field.
    """
    from .prompts import prepare_request

    for i, r in enumerate(records):
        try:
            prepare_request(r, i, leading_space)
        except RequestError as exc:
            raise RequestError(f"{source}: {exc}") from None
        for key in TEXT_FIELDS:
            if r.get(key) is not None and not isinstance(r[key], str):
                raise RequestError(f"{source}: requests[{i}].{key} = {r[key]!r}: must be a string (or absent)")
