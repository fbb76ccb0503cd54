"""The studies' per-run parts in a run folder (diffsolve.runs.RunFolder): a run's final array as `<rel>.npy`
with its record as `<rel>.json` beside it, both checksummed; the results JSON is derived from them."""
import io
import json
import re
import warnings
from pathlib import Path

import numpy as np

from diffsolve.runs import RunWarning


def slug(key):
    """A run key as a file name: every run of characters other than letters, digits and "." becomes "_"."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", key)


def jsonable(obj):
    """`obj` as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(obj))


def save_run(folder, rel, key, record, array):
    """Write the run's array and then its record ({"key": key, **record})."""
    folder.write_with(f"{rel}.npy", lambda f: np.save(f, array))
    folder.write_json(f"{rel}.json", {"key": key, **jsonable(record)})


def load_run(folder, rel, key, shape):
    """The record of run `key` (without "key") if it and its array verify: checksums, the array's shape
    `shape`, the record's key. Else None, after a warning naming the file."""
    record, data = folder.read_json(f"{rel}.json"), folder.read_bytes(f"{rel}.npy")
    if record is None or data is None:
        return None
    try:
        got = np.load(io.BytesIO(data)).shape
    except ValueError as err:
        got = f"unreadable ({err})"
    if got != tuple(shape):
        folder.reject(f"{rel}.npy", f"holds an array of shape {got}, not {tuple(shape)}")
        return None
    if record.get("key") != key:
        folder.reject(f"{rel}.json", f"is the record of {record.get('key')!r}, not {key!r}")
        return None
    return {k: v for k, v in record.items() if k != "key"}


def load_runs(folder, rel_dir, runs, shape):
    """{key: record} of the `runs` (each with a `.key`) whose parts `<rel_dir>/<slug(key)>` verify (load_run)."""
    records = {}
    for r in runs:
        record = load_run(folder, f"{rel_dir}/{slug(r.key)}", r.key, shape)
        if record is not None:
            records[r.key] = record
    return records


def previous_config(json_path, *keys):
    """previous() for RunFolder: the config of a results JSON an older version left without a run config
    ({**old["config"], key: old[key] for keys}), or None."""
    def previous():
        try:
            old = json.loads(Path(json_path).read_text())
            return {**old["config"], **{k: old[k] for k in keys}}
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return previous


def note_damaged(json_path):
    """Warn when the derived results JSON does not parse (it is about to be rebuilt)."""
    try:
        if Path(json_path).exists():
            json.loads(Path(json_path).read_text())
    except ValueError:
        warnings.warn(f"{json_path} is damaged; it is rebuilt from the per-run records", RunWarning, stacklevel=2)
