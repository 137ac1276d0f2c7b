"""Resumable run directories: the one place that writes results.

A run directory holds ``config.json`` (what was asked for) and append-only JSONL files with
one record per finished unit of work (a problem, a (method, problem) pair, ...). Records are
flushed as they complete, so a killed run loses at most the unit in flight; re-running with
the same config skips what is finished. A different config for the same directory is
refused rather than mixed in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

try:  # POSIX advisory locks let several processes append to one run directory
    import fcntl
except ImportError:  # pragma: no cover - Windows: single writer per run directory
    fcntl = None

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def locked(path: Path):
    """Hold an exclusive lock on ``path`` (a sidecar lock file, removed when the block ends) for the
    duration of the block, waiting for another holder to finish."""
    if fcntl is None:
        yield
        return
    handle = lock_file(path, blocking=True)
    try:
        yield
    finally:
        release_lock_file(path, handle)


def lock_file(path: Path, blocking: bool):
    """Open ``path`` and take an exclusive advisory lock on it; returns the open file (``a+``).

    A lock file is removed by its holder when released (:func:`release_lock_file`), so whoever had
    opened it meanwhile finds, once it has the lock, that ``path`` is no longer its file, and opens
    the current one again: two holders never lock two different files under one name.

    Raises:
        BlockingIOError: ``blocking=False`` and another process holds the lock (the file is closed).
    """
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BaseException:
            handle.close()
            raise
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(handle.fileno()).st_ino:
            return handle
        handle.close()  # its holder released and removed it after we opened it: take the current one


def release_lock_file(path: Path, handle) -> None:
    """Remove a lock file taken by :func:`lock_file` and release it (removed while still locked, so
    that no one can lock it and then see it vanish)."""
    path.unlink(missing_ok=True)
    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    handle.close()


class ConfigMismatchError(ValueError):
    """A run directory already holds results made with a different configuration."""


class RunBusyError(ValueError):
    """Another invocation is running the same work in this run directory (:meth:`RunDirectory.claim`)."""


def _process_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _process_umask()  # read once, at import: os.umask can only be read by setting it


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write a file so that readers never see it half-written (a temporary file, then a rename), with
    the permissions a plain ``open`` would give it (``mkstemp``'s own are owner-only, which would make
    a run directory on a shared server unreadable to the rest of a team)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    give_plain_mode(tmp)
    os.replace(tmp, path)


def give_plain_mode(path: str | os.PathLike) -> None:
    """Give a file the permissions a plain ``open`` would (the umask's): ``mkstemp``, and libraries
    that write through it (safetensors' ``save_file``), make owner-only files."""
    os.chmod(path, 0o666 & ~_UMASK)


def json_text(obj: Any) -> str:
    """``obj`` as indented JSON text for a file: strict JSON, with a non-finite float (an AUROC
    without a positive label, a diverged loss) written as null rather than the invalid ``NaN``;
    objects JSON does not know are written as their ``str``."""

    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value

    return json.dumps(finite(obj), indent=2, default=str, allow_nan=False) + "\n"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON (:func:`json_text`) so that readers never see a half-written file."""
    write_bytes_atomic(path, json_text(obj).encode())


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Records of a JSONL results file; a torn last line (an interrupted write) is skipped."""
    path = Path(path)
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                logger.warning("%s: ignoring a torn last line (interrupted write)", path)
                return
            raise ValueError(f"{path}:{number}: malformed results line: {e}") from e


DATA_FILE_KEYS = {"data_file": "data_file_sha256"}  # see RunDirectory's content_keys
PROBLEM_DIGESTS = "problem_digests.json"  # problem id -> its content's digest (RunDirectory.bind_problems)


def _same_file(a: Any, b: Any) -> bool:
    """Whether two stored paths name one existing file (``data.jsonl`` and its absolute spelling)."""
    try:
        return isinstance(a, str) and isinstance(b, str) and os.path.samefile(a, b)
    except OSError:  # either is missing
        return False


def run_kind(config: dict) -> str:
    """Which command made a run directory, from its ``config.json``: ``s2t collect``, ``s2t analyze``,
    ``s2t eval``, or ``another command``."""
    if config.get("kind") == "s2t-local-groups":
        return "s2t collect"
    if "trajectory" in config and "divergence" in config:
        return "s2t analyze"
    if "methods" in config:
        return "s2t eval"
    return "another command"


def file_in_the_way(path: Path) -> Path | None:
    """The file that keeps ``path`` from being a directory: ``path`` itself or one of its parents
    (None where there is none)."""
    return next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)


def check_run_path(path: str | os.PathLike) -> None:
    """Refuse, before any model loads, a run directory path that cannot become a directory (a file,
    or a path under a file) or that holds a trained selector (``s2t train``'s ``--out``).

    Raises:
        ValueError: naming the file in the way.
    """
    path = Path(path)
    blocking = file_in_the_way(path)
    if blocking is not None:
        where = "is a file" if blocking == path else f"lies under {blocking}, which is a file"
        raise ValueError(f"--out {path} {where}: give a directory for the run")
    held = next((n for n in ("selector_config.json", "trigger_config.json") if (path / n).is_file()), None)
    if held is not None:
        raise ValueError(
            f"--out {path} holds a trained selector ({held}): give the run a directory of its own"
        )


class RunDirectory:
    """A results directory bound to one configuration.

    ``ignore_keys`` names config entries that may change between resumptions without
    changing the results (e.g. ``limit``, ``batch_size``, ``workers``). ``legacy`` says what a
    null stored by an older version, or a key it did not store, meant (e.g. ``{"dtype": "float32"}``),
    so such runs resume. ``content_keys`` maps an entry holding a file's path to the entry holding
    its content's digest: where both configs hold the digest, the content decides (the path may be
    spelled another way; an edited file is refused), else (a run recorded before digests) two
    spellings of one existing file are the same configuration. A run that fails before its first
    result can give its new directory back (:meth:`discard_if_unused`), so that the corrected
    command is not refused.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        config: dict,
        ignore_keys: Iterable[str] = (),
        legacy: dict[str, Any] | None = None,
        content_keys: dict[str, str] | None = None,
    ):
        self.path = Path(path)
        self.config = json.loads(json.dumps(config, default=str))
        self.ignore_keys = set(ignore_keys)
        self.content_keys = dict(DATA_FILE_KEYS if content_keys is None else content_keys)
        self.legacy = dict(legacy or {})  # key -> what a stored null meant (an older default)
        check_run_path(self.path)
        self.created = not self.path.exists()  # this invocation made the directory
        self.path.mkdir(parents=True, exist_ok=True)
        config_file = self.path / "config.json"
        self.wrote_config = not config_file.is_file()  # and its config.json
        # what the directory held before (a user's own files): discard_if_unused keeps exactly that
        self._held_before = self._files() if self.wrote_config else set()
        if config_file.is_file():
            try:
                existing = json.loads(config_file.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConfigMismatchError(
                    f"{config_file} is unreadable ({e}): use a new --out directory, or repair the file"
                ) from e
            if not isinstance(existing, dict) or run_kind(existing) != run_kind(self.config):
                made_by = run_kind(existing) if isinstance(existing, dict) else "another command"
                raise ConfigMismatchError(
                    f"{self.path} holds a run made by {made_by}, not by {run_kind(self.config)}: "
                    "use a new --out directory"
                )
            diff = self._differences(existing, self.config)
            if diff:
                older = [
                    f"--{k.replace('_', '-')} {v}"
                    for k, v in self.legacy.items()
                    if existing.get(k) is None and k in self.config
                ]
                hint = f" (it was made by an older version; {', '.join(older)} resumes it)" if older else ""
                if any(k.split(":")[0] in self.content_keys.values() for k in diff):
                    hint += " (its data file's content is not the run's: another file, or the file edited)"
                raise ConfigMismatchError(
                    f"{self.path} already holds a run of a different configuration ({'; '.join(diff)}). "
                    f"Use a new --out directory, or the same arguments to resume{hint}."
                )
        write_json_atomic(config_file, self.config)

    def bind_problems(self, problems: Iterable[tuple[str, str]]) -> None:
        """Bind each problem id of this invocation to its content (``(id, digest)`` pairs, e.g.
        :attr:`s2t.data.Problem.digest`) in ``problem_digests.json``, and refuse an id the run already
        bound to other content: another data file, an edited one, or another ``$S2T_DATA_DIR`` would
        otherwise mix problems of two sources under one id. Runs made before this file bind from their
        next invocation on. Several processes may bind at once (the file is locked).

        Raises:
            ConfigMismatchError: an id bound to other content (named, with how many), or an
                unreadable ``problem_digests.json``.
        """
        path = self.path / PROBLEM_DIGESTS
        with locked(self.path / f".{PROBLEM_DIGESTS}.lock"):
            try:
                bound = json.loads(path.read_text()) if path.is_file() else {}
                if not isinstance(bound, dict):
                    raise ValueError("not a JSON object")
            except (OSError, UnicodeDecodeError, ValueError) as e:
                raise ConfigMismatchError(
                    f"{path} is unreadable ({e}): use a new --out directory (the run's problems can no "
                    "longer be told from others)"
                ) from e
            given = dict(problems)
            changed = [pid for pid, digest in given.items() if bound.get(pid, digest) != digest]
            if changed:
                raise ConfigMismatchError(
                    f"{self.path} holds problem {changed[0]!r} with other content "
                    f"({len(changed)} of the {len(given)} problems given differ): the data is not the run's "
                    "(another --data-file or data directory, or the file edited); use a new --out"
                )
            if given.keys() - bound.keys():
                write_json_atomic(path, bound | given)

    @contextlib.contextmanager
    def claim(self, names: Iterable[str]):
        """Hold, for the block, this run's pieces of work ``names`` (the methods an eval invocation
        decodes; ``collect`` or ``analyze`` for a whole collection or analysis): two invocations may
        add different methods to one run side by side, but one that would decode what another is
        decoding is refused instead of doing it twice. A claim is an advisory lock (``.claim-*.lock``,
        holding the holder's process id) that ends with the block or the process (POSIX; elsewhere
        nothing is held); the file is removed when the block ends (one left by a killed process holds
        no lock and is reused).

        Raises:
            RunBusyError: a piece is held by another invocation (named, with its process id).
        """
        held = []
        try:
            for name in names:
                tag = hashlib.sha256(name.encode()).hexdigest()[:8]
                path = self.path / f".claim-{re.sub(r'[^A-Za-z0-9.@=-]+', '_', name)}-{tag}.lock"
                if fcntl is None:
                    continue
                handle = self._lock_claim_file(path, name)
                handle.seek(0)
                handle.truncate()
                handle.write(f"process {os.getpid()}")
                handle.flush()
                held.append((path, handle))
            yield
        finally:
            for path, handle in held:
                release_lock_file(path, handle)

    def _lock_claim_file(self, path: Path, name: str):
        """Lock the claim file ``path`` without waiting, or name its holder."""
        try:
            return lock_file(path, blocking=False)
        except BlockingIOError:
            try:
                holder = path.read_text().strip() or "another process"
            except OSError:
                holder = "another process"
            other = "" if name in ("collect", "analyze") else ", or give this one other methods"
            raise RunBusyError(
                f"{name} is being run in {self.path} by another invocation ({holder}): wait for it "
                f"to finish{other}"
            ) from None

    def discard_if_unused(self) -> None:
        """Undo what this invocation made if no file was written since: its ``config.json``, and the
        directory if it made that too (a run that failed before its first result or calibration, e.g.
        on a K above the vocabulary), so that the corrected command starts afresh. Files that were
        there before stay; a directory that gained any other file (another invocation's results, a
        calibration) is left as it is."""
        made = {Path("config.json"), Path(PROBLEM_DIGESTS)}
        if not self.wrote_config or self._files() - made != self._held_before - made:
            return
        for name in made - self._held_before:
            (self.path / name).unlink(missing_ok=True)
        if self.created:
            shutil.rmtree(self.path)  # it made the directory and holds no file: only empty folders
        logger.info("nothing was written to %s: removed the config.json this run made", self.path)

    def _files(self) -> set[Path]:
        """The files under the directory, relative to it (lock files aside: they hold no work)."""
        return {
            p.relative_to(self.path)
            for p in self.path.rglob("*")
            if p.is_file() and not (p.name.startswith(".") and p.name.endswith(".lock"))
        }

    def _differences(self, old: dict, new: dict) -> list[str]:
        old = old | {k: v for k, v in self.legacy.items() if old.get(k) is None and k in new}
        keys = (set(old) | set(new)) - self.ignore_keys
        for path_key, digest_key in self.content_keys.items():
            if old.get(digest_key) is not None and new.get(digest_key) is not None:
                keys.discard(path_key)  # the content decides
            else:  # recorded before digests (or no file): the path decides
                keys.discard(digest_key)
        return [
            f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
            for k in sorted(keys)
            if old.get(k) != new.get(k)
            and not (k in self.content_keys and _same_file(old.get(k), new.get(k)))
        ]

    def records(self, name: str = "results.jsonl") -> list[dict]:
        return list(read_jsonl(self.path / name))

    def append(self, record: dict, name: str = "results.jsonl") -> None:
        """Append one finished record and make it durable before returning.

        Appends hold a lock, so several processes (e.g. two methods run side by side) may add
        records to the same run directory; each record is one whole line.
        """
        target = self.path / name
        line = (json.dumps(record, default=str) + "\n").encode()
        with locked(self.path / f".{name}.lock"):
            self._repair_torn_tail(target)
            with open(target, "ab") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())

    @staticmethod
    def _repair_torn_tail(target: Path) -> None:
        """Drop an unterminated last line left by a killed writer, so new records start on a fresh line."""
        if not target.is_file() or target.stat().st_size == 0:
            return
        with open(target, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
            data = f.seek(0) or f.read()
            cut = data.rfind(b"\n") + 1
            f.seek(cut)
            f.truncate()

    def write_json(self, name: str, obj: Any) -> Path:
        write_json_atomic(self.path / name, obj)
        return self.path / name

    def write_bytes(self, name: str, data: bytes) -> Path:
        """Write a file of the run (``name`` relative to it) so that readers never see it half-written."""
        write_bytes_atomic(self.path / name, data)
        return self.path / name


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def interrupt_on_sigterm():
    """From now on SIGTERM (e.g. ``timeout``, a job scheduler) interrupts like Ctrl-C, so that what a
    run does on Ctrl-C (keep its finished work, release its claims, say how to resume) happens too.
    Returns the previous handler, or None outside the main thread, where signals cannot be caught."""
    try:
        return signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread
        return None


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM interrupts like Ctrl-C inside the block (:func:`interrupt_on_sigterm`), so its cleanup
    (a checkpoint, a restore) runs. Outside the main thread nothing changes."""
    previous = interrupt_on_sigterm()
    if previous is None:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
