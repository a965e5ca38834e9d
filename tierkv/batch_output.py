"""The output file of a batch run: held by one run at a time, appended record by record, checked on resume.

Each line is one finished record, `{"id", "prompt_tokens", "text", "outputs", "fingerprint"}`, written and
fsynced before the next is reported; a record given up (one that crashed the replicas of a cluster run) has
`"error"` naming why, `"text": null` and no outputs, and counts as done as well. `fingerprint` holds two digests: of the input record the line answers, and of
the settings that shaped its result (model and weights, dtype, seed, the record's sampling). A run that resumes
counts a line as done only if both still match; a line from another input or other settings stops the run with a
message, instead of being reported as done.

The file is locked (flock) for the whole run, so that two runs never append to it at once, and nothing in it is
cut or discarded before the lock is held.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os

from tierkv.errors import ConfigError, TierKVError

_SAMPLE = 1 << 16  # bytes hashed at the start, middle and end of each weight file


def digest(obj) -> str:
    """A short, stable digest of a JSON-able object."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_signature(path: str) -> str:
    """A digest of a file's size and contents: whole for small files; for large ones (weights) its start, middle
    and end, which any retrained or converted checkpoint changes, without reading gigabytes."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if size <= 3 * _SAMPLE:
            h.update(f.read())
        else:
            for at in (0, size // 2, size - _SAMPLE):
                f.seek(at)
                h.update(f.read(_SAMPLE))
    return h.hexdigest()[:16]


def model_signature(path: str) -> dict:
    """What identifies a model's weights and tokenizer: a signature of each file in its folder (or of its config
    file, for dummy weights)."""
    if os.path.isfile(path):
        return {os.path.basename(path): file_signature(path)}
    return {
        name: file_signature(os.path.join(path, name))
        for name in sorted(os.listdir(path))
        if os.path.isfile(os.path.join(path, name)) and not name.startswith(".")
    }


def first_existing(path: str) -> str:
    """`path`, or its nearest ancestor that exists."""
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path or "."


def check_output_path(path: str) -> None:
    """Refuse an output path that cannot be written, without creating anything (what `run --check` can say)."""
    if os.path.isdir(path):
        raise ConfigError(
            f"output {path!r} is a directory; give a file path, e.g. {os.path.join(path, 'results.jsonl')!r}"
        )
    folder = first_existing(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(folder):
        raise ConfigError(f"output {path!r}: {folder!r} is a file, not a directory; choose another output path")
    target = path if os.path.exists(path) else folder
    if not os.access(target, os.W_OK):
        why = "a read-only file system" if _read_only(folder) else "not writable by this user"
        raise ConfigError(f"output {path!r}: {target!r} is {why}; choose an output path you can write")
    if os.path.exists(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(_in_use(path)) from None
        finally:
            os.close(fd)


def _in_use(path: str) -> str:
    return f"output {path!r} is being written by another tierkv run; wait for it to end, or choose another output"


def _read_only(folder: str) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def parse_finished(path: str, data: bytes, expected: dict) -> tuple[set, int]:
    """(ids answered in an output file's bytes, how many bytes of whole lines there are); see OutputFile.finished."""
    keep = len(data) if data.endswith(b"\n") or not data else data.rfind(b"\n") + 1
    done = set()
    fix = "run with --fresh to discard those results and start over, or choose another output"
    for n, line in enumerate(data[:keep].splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            rid = obj["id"]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"output {path}:{n} is not a tierkv result line; {fix}") from None
        want = expected.get(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None
        if want is None:
            raise ConfigError(
                f"output {path}:{n} holds id {rid!r}, which is not in the input: it belongs to another run; {fix}"
            )
        got = obj.get("fingerprint") if isinstance(obj.get("fingerprint"), dict) else {}
        if got.get("input") != want["input"]:
            raise ConfigError(
                f"output {path}:{n}: id {rid!r} was written for a different input record than the one the "
                f"input now holds under that id; {fix}"
            )
        if got.get("settings") != want["settings"]:
            raise ConfigError(
                f"output {path}:{n}: id {rid!r} was written under other settings (model, weights, dtype, seed "
                f"or sampling differ from this run's); {fix}"
            )
        done.add(rid)
    return done, keep


def error_line(rid, prompt_tokens: int, fingerprint: dict, error: str) -> dict:
    """The line of a record given up: the keys of a result line, no outputs, and `error` naming why."""
    return {
        "id": rid,
        "prompt_tokens": prompt_tokens,
        "text": None,
        "outputs": [],
        "fingerprint": fingerprint,
        "error": error,
    }


def peek_finished(path: str, expected: dict) -> set:
    """What `OutputFile(path).finished(expected)` would find, changing nothing (for `run --check`)."""
    check_output_path(path)
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        return parse_finished(path, f.read(), expected)[0]


class OutputFile:
    """The run's output, opened and locked for the run's lifetime (created if missing)."""

    def __init__(self, path: str) -> None:
        check_output_path(path)
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.created = not os.path.exists(path)
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise ConfigError(
                f"output {path!r} cannot be opened for writing ({exc.strerror}); choose another output path"
            ) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = -1
            raise ConfigError(_in_use(path)) from None

    def finished(self, expected: dict) -> set:
        """Ids already answered in the file, each checked against `expected[id] = {"input": ..., "settings": ...}`.
        A half-written last line (a kill in the middle of a write) is cut off. Raises ConfigError, naming the first
        line that belongs to another input or other settings, and the fix."""
        data = os.pread(self.fd, os.fstat(self.fd).st_size, 0)
        done, keep = parse_finished(self.path, data, expected)
        if keep < len(data):
            os.ftruncate(self.fd, keep)
        return done

    def discard(self) -> None:
        """--fresh: empty the file (under the lock, once everything else has been checked)."""
        os.ftruncate(self.fd, 0)

    def write(self, record: dict) -> None:
        """Append one line and make it durable before returning."""
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view) :]
            os.fsync(self.fd)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise TierKVError(
                    f"output {self.path}: the disk is full; free some space, then run again to finish the rest"
                ) from None
            raise

    def close(self, remove_if_empty: bool = False) -> None:
        if self.fd < 0:
            return
        if remove_if_empty and self.created and os.fstat(self.fd).st_size == 0:
            os.unlink(self.path)  # nothing was run: leave no trace of this attempt
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = -1
