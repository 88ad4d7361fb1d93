"""Writing an output folder so that no failure leaves half of it, and no run replaces what it must not.

- `check_output(output, overwrite, source=...)`: before any heavy work, refuse an output that is,
  holds or lies inside the source; one that is a file; one that is or holds the current folder; one
  in the way without `overwrite` (an empty folder is not in the way); with `overwrite`, one that does
  not look like a checkpoint this tool wrote; and make sure a folder can be created beside it at all.
- `atomic_save(write, output, overwrite=...)`: `write` fills `.NAME.partial-PID/` beside the
  target, which is renamed into place at the end. On any failure or signal the partial folder is
  removed and an output that was being replaced is put back.
- `clean_stale(output)`: partial folders of processes that died without cleaning up (SIGKILL, the
  out-of-memory killer, a power cut) are removed by the next run that writes beside them. The PID in
  the name tells whether the owner still lives; a marker file inside names the host too, so a folder
  that another machine is writing on a shared file system is left alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Callable

from .errors import InvalidConfigError, OutputExistsError, OutputWriteError, check_interrupted

MARKER = ".mlpfusion-partial"  # inside a partial folder while it is written; removed before the rename
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old|probe)-(?P<pid>\d+)$")


def absolute(path: str | Path) -> Path:
    """An absolute path without resolving symlinks ('-o .' becomes the current folder's own name)."""
    return Path(os.path.abspath(os.path.expanduser(str(path))))


def partial_path(output: Path) -> Path:
    return output.parent / f".{output.name}.partial-{os.getpid()}"


def _old_path(output: Path) -> Path:
    return output.parent / f".{output.name}.old-{os.getpid()}"


# --- checks before any heavy work ---------------------------------------------------------------


def written_by_us(folder: Path) -> str | None:
    """None when `folder` looks like a checkpoint this tool wrote (or is empty), else why not."""
    try:
        entries = list(folder.iterdir())
    except OSError as err:
        return f"it cannot be read ({err.strerror})"
    if not entries:
        return None
    cfg = folder / "config.json"
    if not cfg.is_file():
        return "it has no config.json"
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return "its config.json is not valid JSON"
    if not isinstance(data, dict) or not isinstance(data.get("mlpfusion"), dict):
        return "its config.json has no 'mlpfusion' entry"
    return None


def relation(output: Path, source: Path) -> str | None:
    """How `output` overlaps `source` ('is', 'lies inside', 'contains'), or None."""
    o, s = output.resolve(), source.resolve()
    if o == s:
        return "is"
    if s in o.parents:
        return "lies inside"
    if o in s.parents:
        return "contains"
    return None


def check_source(output: Path, source: Path | None) -> None:
    if source is None:
        return
    how = relation(output, source)
    if how is not None:
        raise OutputExistsError(
            f"the output {output} {how} the source folder {source}: choose an --output outside it "
            "(the source is never replaced, not even with --overwrite)"
        )


def empty_folder(path: Path) -> bool:
    """A real folder (not a link to one) with nothing in it: an output may take its place without --overwrite."""
    try:
        return path.is_dir() and not path.is_symlink() and next(os.scandir(path), None) is None
    except OSError:  # unreadable: not known to be empty
        return False


def check_output(output: str | Path, overwrite: bool, *, source: Path | None = None) -> Path:
    """Refuse an output that cannot or must not be written, before any heavy work; returns it absolute."""
    output = absolute(output)
    check_source(output, source)
    parent = output.parent
    if not parent.is_dir():
        above = next((p for p in output.parents if p.exists()), None)
        if above is not None and not above.is_dir():
            raise InvalidConfigError(f"{above} is a file, so no folder can be made inside it: choose another --output")
        raise InvalidConfigError(f"the folder {parent} does not exist: create it first or choose another --output")
    clean_stale(output)  # a dead run's leftovers first: a replaced output it left is put back before the checks
    if output.is_symlink() and not output.exists():
        raise OutputExistsError(f"{output} is a broken symbolic link: remove it or choose another --output")
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"{output} already exists and is a file: choose another --output")
    if output.exists():
        cwd = absolute(os.getcwd())
        if cwd == output or output in cwd.parents:
            raise OutputExistsError(f"{output} is the current folder or holds it: it is never replaced, not even "
                                    "with --overwrite; choose another --output")
        if not overwrite and not empty_folder(output):  # an empty folder made for the output loses nothing
            raise OutputExistsError(f"{output} already exists: choose another --output or pass --overwrite")
        why = written_by_us(output)
        if why is not None:
            raise OutputExistsError(
                f"--overwrite only replaces a checkpoint written by mlpfusion, and {output} is not one ({why}): "
                "remove it yourself or choose another --output"
            )
    probe = parent / f".{output.name}.probe-{os.getpid()}"
    try:  # the only sure test that a folder can be made there (permissions, read-only or special file systems)
        probe.mkdir()
        probe.rmdir()
    except OSError as err:
        raise OutputWriteError(f"cannot create a folder in {parent} ({_reason(err)}): choose another --output") from None
    return output


# --- stale partial folders ----------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: someone else's live process
        return True
    return True


def _owner(folder: Path) -> dict:
    try:
        data = json.loads((folder / MARKER).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def clean_stale(output: Path) -> list[Path]:
    """Remove the leftovers of dead runs beside `output`: its own `.NAME.partial-PID/` and
    `.NAME.old-PID/` folders, and any other partial folder that carries this tool's marker. A
    leftover `.old-PID/` (a replaced output) is put back when the output itself is missing."""
    output = absolute(output)
    removed = []
    try:
        entries = list(output.parent.iterdir())
    except OSError:
        return removed
    host = socket.gethostname()
    for path in entries:
        m = _LEFTOVER.match(path.name)
        if m is None or not path.is_dir() and not path.is_symlink():
            continue
        ours = m.group("name") == output.name
        if path.is_symlink() and not (ours and m.group("kind") == "old"):
            continue  # a link is only ever left as a replaced output of this name
        if m.group("kind") == "probe" and not ours:
            continue
        owner = _owner(path)
        if not ours and not owner:
            continue  # another name and no marker: not provably ours
        if owner.get("host", host) != host or _pid_alive(int(m.group("pid"))):
            continue
        target = output.parent / m.group("name")
        try:
            if m.group("kind") == "old" and not target.exists() and not target.is_symlink():
                path.rename(target)  # died between moving the old output away and renaming the new one in
            elif path.is_symlink():
                path.unlink()
            else:
                shutil.rmtree(path)
            removed.append(path)
        except OSError:
            pass
    return removed


# --- the atomic write ---------------------------------------------------------------------------


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err)
    if "os error 28" in text or "No space left" in text:
        return "No space left on device"
    return (text.splitlines() or [err.__class__.__name__])[0][:200]


def _hint(reason: str) -> str:
    if "No space" in reason or "quota" in reason.lower():
        return "free some space or choose another --output"
    if "ermission" in reason or "Read-only" in reason:
        return "choose a folder you can write to"
    return "check the disk and the folder, then run the command again"


def write_failure(output: Path, err: BaseException) -> OutputWriteError | None:
    """The typed error for a failure to write (an OSError, or safetensors' own error for one), else None."""
    if isinstance(err, OSError) or "os error" in str(err) or "I/O error" in str(err):
        reason = _reason(err)
        return OutputWriteError(f"could not write {output}: {reason}; {_hint(reason)}. Nothing was left behind")
    return None


def atomic_save(write: Callable[[Path], None], output: str | Path, *, overwrite: bool) -> Path:
    """Run `write(tmp)` on a fresh partial folder beside `output`, then rename it into place.

    On any failure (including `Interrupted` from a signal) the partial folder is removed and an output
    that was being replaced is restored. Write errors (disk full, no permission) become
    `OutputWriteError`. Returns the absolute output path."""
    output = absolute(output)
    clean_stale(output)
    tmp, old = partial_path(output), _old_path(output)
    shutil.rmtree(tmp, ignore_errors=True)  # this process's own leftover, from an earlier call
    moved = False
    try:
        try:
            tmp.mkdir()
            (tmp / MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
            write(tmp)
            (tmp / MARKER).unlink()
            check_interrupted()  # a signal that some library swallowed still stops the run here
            if output.exists() or output.is_symlink():
                if not overwrite and not empty_folder(output):
                    raise OutputExistsError(f"{output} appeared or filled while compressing: choose another --output "
                                            "or pass --overwrite")
                moved = True  # before the rename: a signal between the two lines is covered too
                output.rename(old)
            tmp.rename(output)
        except Exception as err:
            failure = write_failure(output, err)
            if failure is not None:
                raise failure from None
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved and old.exists() and not output.exists():
            try:
                old.rename(output)  # the new one did not get in: put the replaced output back
            except OSError:
                pass  # left as .NAME.old-PID, which the next run puts back (`clean_stale`)
        if output.exists():
            _remove(old)
    return output


def _remove(path: Path) -> None:
    """Remove a replaced output: a folder with what it holds, or a symbolic link alone (never its target)."""
    if path.is_symlink():
        try:
            path.unlink()
        except OSError:
            pass
    else:
        shutil.rmtree(path, ignore_errors=True)


__all__ = ["absolute", "atomic_save", "check_output", "check_source", "clean_stale", "partial_path", "relation",
           "written_by_us", "write_failure"]
