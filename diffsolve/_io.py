"""Atomic file output: nothing a user asked for is left half-written."""
import json
import os
import tempfile
from pathlib import Path


def atomic_write(path, write):
    """Call `write(file_object)` on a temporary binary file beside `path`, fsync, then os.replace it
    onto `path` (mode 0644). On any failure the temporary file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def write_json(path, data):
    """JSON (indented, trailing newline) written atomically."""
    return atomic_write(path, lambda f: f.write((json.dumps(data, indent=1) + "\n").encode()))
