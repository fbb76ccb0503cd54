"""Run folders and cache files that cannot mix or rot, and command lines that fail as usage errors.

* `RunFolder(path, name, config)`: one run owns an output folder. Opening it probes that the folder is
  writable, takes an exclusive `fcntl.flock` on `.<name>.lock` (the kernel drops it when the process dies,
  SIGKILL included, so a killed run can be resumed at once; a second live writer is refused), and compares
  `config` with the one the folder was started with (`<name>.run.json`): other options are refused with one
  line naming them, never merged. Every artifact is written atomically through the folder, which records its
  sha256 in `<name>.manifest.jsonl`; `read_bytes` / `read_json` hand back only artifacts that still match
  their checksum and warn (`RunWarning`, naming the file) about the others, which the caller recomputes.
* `save_checked` / `load_checked`: `torch.save` files that carry a sha256 of their own content, loaded with
  `weights_only=True` (nothing executes on load) and refused with a warning naming the file when the bytes,
  the checksum or the expected keys do not match; `environment()` is what, besides the recipe, changes the
  bits of a result (torch version, threads, device, dtype) and belongs in every cache key.
* `ArgumentParser`: argparse without abbreviations, every default shown in --help, one-line usage errors.
"""
import argparse
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from ._io import atomic_write, write_json

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: folders are not locked
    fcntl = None

__all__ = ["ArgumentParser", "FolderBusy", "RunConflict", "RunError", "RunFolder", "RunWarning", "at_least",
           "check_config", "check_writable", "content_sha256", "environment", "load_checked", "save_checked"]


class RunError(Exception):
    """A run refused before it did any work; the message is one line for the user."""


class RunConflict(RunError, ValueError):
    """The output folder holds results made with other options."""


class FolderBusy(RunError):
    """Another live process writes to the output folder."""


class RunWarning(UserWarning):
    """A damaged or foreign file was ignored (and is recomputed)."""


def _warn(message):
    warnings.warn(message, RunWarning, stacklevel=3)


def environment(device="cpu", dtype=None):
    """What changes the bits of a result besides the recipe: torch's version, the device type and the dtype,
    and on the CPU the number of torch threads (reductions are split differently)."""
    device = torch.device(device).type
    env = {"torch": torch.__version__, "device": device, "dtype": str(dtype or torch.get_default_dtype())}
    if device == "cpu":
        env["torch_threads"] = torch.get_num_threads()
    return env


def sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


def check_writable(path, what="output folder"):
    """Raise RunError unless files can be created in `path`; folders it had to create for the probe are
    removed again, so a refused run leaves nothing behind."""
    path = Path(path)
    created = []
    try:
        for p in reversed([path, *path.parents]):
            if not p.exists():
                try:
                    p.mkdir()
                    created.append(p)
                except FileExistsError:
                    pass
        if not path.is_dir():
            raise NotADirectoryError(f"{path} is not a folder")
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise RunError(f"{what} {str(path)!r} is not writable: {err.strerror or err}") from None
    finally:
        for p in reversed(created):
            try:
                p.rmdir()
            except OSError:
                pass


# ------------------------------------------------------------------------------------------- configs
def _normal(obj):
    return json.loads(json.dumps(obj))  # tuples as lists, keys as strings: as a config reads back


def _flat(obj, prefix=""):
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: obj}


def config_diff(old, new, ignore=()):
    """['key: OLD there, NEW here', ...] over the flattened keys of two configs, except `ignore`."""
    a, b = _flat(_normal(old)), _flat(_normal(new))
    missing = object()
    keys = [k for k in dict.fromkeys([*a, *b]) if k.split(".")[0] not in ignore and k not in ignore]
    def show(d, k):
        return repr(d[k]) if k in d else "unset"
    return [f"{k}: {show(a, k)} there, {show(b, k)} here" for k in keys if a.get(k, missing) != b.get(k, missing)]


def _conflict(folder, diffs):
    shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
    return RunConflict(f"{folder} holds a run of a different config ({shown}); use another --out, or delete "
                       f"{folder} to start over")


def check_config(path, config, ignore=(), write=True, folder=None):
    """Compare `config` with the JSON config at `path` (a RunConflict naming the differing keys), then write
    it there (atomically) when `write`. A config file that does not parse is a RunError (which options made
    the folder's results is then unknown)."""
    path = Path(path)
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise RunError(f"{path} is damaged ({err}); which options made the results beside it is unknown: "
                           "use another --out, or delete that folder to start over") from None
        diffs = config_diff(old, config, ignore)
        if diffs:
            raise _conflict(folder or path.parent, diffs)
        if not write or _normal(old) == _normal(config):
            return
    if write:
        write_json(path, config)


# ---------------------------------------------------------------------------------------- run folder
class RunFolder:
    """An output folder owned by one run (see the module docstring). Use as a context manager:

        with RunFolder(out, "toy2d", config) as folder:
            rec = folder.read_json("parts/a.json")       # None (after a warning) unless it verifies
            folder.write_json("parts/a.json", {...})      # atomic, checksum recorded

    `config=None` opens an existing folder with the config it has (`folder.config`), without comparing.
    `ignore` names config keys that may change between calls (they are updated). `previous()` (optional)
    returns the config of results an older version left in the folder without a config file; they must
    agree on the keys they share. `config_file` defaults to `<name>.run.json`."""

    def __init__(self, path, name, config, ignore=(), config_file=None, previous=None):
        self.root, self.name, self.config = Path(path), name, config
        self.ignore, self.previous = tuple(ignore), previous
        self.config_path = self.root / (config_file or f"{name}.run.json")
        self.manifest_path = self.root / f"{name}.manifest.jsonl"
        self.lock_path = self.root / f".{name}.lock"
        self._fd, self.manifest, self.reused = None, {}, False

    def __enter__(self):
        return self if self._fd is not None else self.open()

    def __exit__(self, *exc):
        self.close()

    def open(self):
        check_writable(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self._check()
            self.manifest = self._read_manifest()
        except BaseException:
            self.close()
            raise
        return self

    def _lock(self):
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise FolderBusy(f"{self.root} is in use by another run ({holder}); wait for it to finish, "
                                 "or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        self._fd = fd

    def close(self):
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None

    def _check(self):
        if self.config is None:
            if not self.config_path.exists():
                raise RunError(f"{self.root} holds no {self.name} run (no {self.config_path.name})")
            try:
                self.config = json.loads(self.config_path.read_text())
            except ValueError as err:
                raise RunError(f"{self.config_path} is damaged ({err})") from None
            return
        self.reused = self.config_path.exists()
        if not self.reused and self.previous is not None:
            old = self.previous()
            if old is not None:
                a, b = _flat(_normal(old)), _flat(_normal(self.config))
                shared = [k for k in a if k in b]
                diffs = config_diff({k: a[k] for k in shared}, {k: b[k] for k in shared}, self.ignore)
                if diffs:
                    raise _conflict(self.root, diffs)
        check_config(self.config_path, self.config, self.ignore, folder=self.root)

    # --------------------------------------------------------------------------------- manifest
    def _read_manifest(self):
        entries = {}
        if not self.manifest_path.exists():
            return entries
        for i, line in enumerate(self.manifest_path.read_text(errors="replace").splitlines()):
            try:
                e = json.loads(line)
                entries[e["path"]] = {"sha256": str(e["sha256"]), "bytes": int(e["bytes"])}
            except (ValueError, KeyError, TypeError):
                _warn(f"{self.manifest_path}: line {i + 1} is damaged; the file it names is recomputed")
        return entries

    def _write_manifest(self):
        lines = [json.dumps({"path": p, **e}) for p, e in sorted(self.manifest.items())]
        atomic_write(self.manifest_path, lambda f: f.write(("\n".join(lines) + "\n").encode()))

    def path(self, rel):
        return self.root / rel

    def write_bytes(self, rel, data):
        """Write `data` to `rel` atomically and record its checksum."""
        atomic_write(self.path(rel), lambda f: f.write(data))
        self.manifest[str(rel)] = {"sha256": sha256_bytes(data), "bytes": len(data)}
        self._write_manifest()
        return self.path(rel)

    def write_with(self, rel, write):
        """`write(file_object)` into memory, then `write_bytes`."""
        import io
        buf = io.BytesIO()
        write(buf)
        return self.write_bytes(rel, buf.getvalue())

    def write_json(self, rel, data):
        return self.write_bytes(rel, (json.dumps(data, indent=1) + "\n").encode())

    def read_bytes(self, rel):
        """The bytes of `rel` if they match the checksum recorded when written; else None, with a warning
        naming the file when one exists (damaged, or not written by this folder) or was recorded."""
        p, entry = self.path(rel), self.manifest.get(str(rel))
        if not p.exists():
            if entry is not None:
                _warn(f"{p} is missing (recomputed by the next run that needs it)")
            return None
        data = p.read_bytes()
        if entry is None:
            _warn(f"{p} has no checksum in {self.manifest_path.name} (an interrupted write, or not written by "
                  "this run); ignored (recomputed by the next run that needs it)")
        elif len(data) != entry["bytes"] or sha256_bytes(data) != entry["sha256"]:
            _warn(f"{p} is damaged ({len(data)} bytes, {entry['bytes']} written; checksum mismatch); "
                  "ignored (recomputed by the next run that needs it)")
        else:
            return data
        return None

    def read_json(self, rel):
        data = self.read_bytes(rel)
        return None if data is None else json.loads(data)

    def reject(self, rel, reason):
        """Drop a verified artifact the caller found unusable (a wrong shape), with a warning."""
        self.manifest.pop(str(rel), None)
        _warn(f"{self.path(rel)} {reason}; ignored (recomputed by the next run that needs it)")


# ------------------------------------------------------------------------------------- checked caches
def content_sha256(obj):
    """sha256 of a nested structure of dicts, lists, tensors and plain values (what `torch.load` returns),
    independent of how it was serialised."""
    h = hashlib.sha256()

    def feed(o):
        if isinstance(o, dict):
            h.update(b"d%d" % len(o))
            for k in sorted(o, key=repr):
                feed(k), feed(o[k])
        elif isinstance(o, (list, tuple)):
            h.update(b"l%d" % len(o))
            for v in o:
                feed(v)
        elif isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"t{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(o, (bytes, bytearray)):
            h.update(b"b%d" % len(o) + bytes(o))
        elif o is None or isinstance(o, (bool, int, float, str)):
            h.update(f"{type(o).__name__}:{o!r};".encode())
        else:
            raise TypeError(f"cannot checksum a {type(o).__name__}")
    feed(obj)
    return h.hexdigest()


def save_checked(obj, path):
    """torch.save a dict with the sha256 of its content added (key "sha256"), atomically."""
    data = {**obj, "sha256": content_sha256(obj)}
    atomic_write(path, lambda f: torch.save(data, f))


def load_checked(path, what, keys=()):
    """The dict `save_checked` wrote to `path` (without "sha256"), loaded with weights_only=True; None, with a
    warning naming the file, when it does not load, lacks `keys` or fails its checksum."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict):
            raise ValueError(f"holds a {type(data).__name__}, not a dict")
        stored = data.pop("sha256", None)
        if stored is None:
            raise ValueError("has no checksum (written by an older version?)")
        lacking = [k for k in keys if k not in data]
        if lacking:
            raise ValueError(f"lacks the keys {lacking}")
        if content_sha256(data) != stored:
            raise ValueError("fails its checksum (damaged bytes)")
    except Exception as err:  # noqa: BLE001 - anything unusable is retrained, never fatal
        _warn(f"ignoring {what} {path}: {err}; it is rebuilt")
        return None
    return data


# ------------------------------------------------------------------------------------- command lines
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default, unless the help text states it or there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        nothing = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if "default" in text or nothing or not action.option_strings:
            return text
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse without prefix abbreviations, defaults in --help, and usage errors as one line on stderr
    (exit status 2)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        message = "; ".join(str(message).splitlines())
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def at_least(low, kind=int):
    """argparse type: a number >= low."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'} >= {low}, "
                                             f"got {text!r}") from None
        if not value >= low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value
    parse.__name__ = f"{kind.__name__} >= {low}"
    return parse
