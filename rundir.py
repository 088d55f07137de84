"""
A run directory: every file train.py writes there, and how train.py (--resume) and analyze.py read them back.

    run.json       what the run is (identity()), written at its start
    metrics.jsonl  one line per eval
    ckpt.pt        model, optimiser, flags, loop state and RNG state, rewritten at every eval
    summary.json   what the run is and its last eval, at its end (or where it diverged)
    pe/STEP.npy    a PE with tables: its tables (T, N, d) at each eval's step (a fixed one: at step 0), float32 (tens
                   of KB; kept with the metrics, so a run's PE can be studied at every eval without its checkpoints)
    lock           while a process trains the run: that process's id, under an flock

Every file but metrics.jsonl (appended line by line) is written atomically, through a temporary file and a rename, so
a crash or a full disk leaves the last whole version. Plain functions on paths and dicts: no model, no task.
"""
import contextlib
import fcntl
import glob
import io
import json
import os
import pickle
import shutil
import sys

import numpy as np
import torch

PE_DIR = "pe"  # the PE tables at every eval
RUN_FILES = ("ckpt.pt", "metrics.jsonl", "summary.json", "run.json", PE_DIR)  # what a run leaves; a fresh start
# clears them
RUN_MARKS = ("ckpt.pt", "summary.json", "run.json")  # the files that make a folder a run directory
LOCK = "lock"


# ----------------------------------------------------------------------------- writing files
def atomic_save(obj, path, save=torch.save):
    """Write obj to path via a temporary file and a rename, so a crash or a full disk never leaves a half-written file
    (the temporary is removed): text (str, as UTF-8) and bytes are written as they are, anything else by save(obj, the
    open temporary file). A failed write raises an OSError naming path."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:  # torch.save into a file object: a full disk is an OSError, not a RuntimeError
            if isinstance(obj, (str, bytes)):
                f.write(obj.encode() if isinstance(obj, str) else obj)
            else:
                save(obj, f)
        os.replace(tmp, path)
    except OSError as e:  # a failed write names no file, or the temporary
        e.filename = path
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(out_dir, name, obj):
    """out_dir/name as indented JSON, atomically (run.json, summary.json)."""
    atomic_save(json.dumps(obj, indent=1) + "\n", os.path.join(out_dir, name))


def write_metrics(out_dir, lines):
    """metrics.jsonl holding exactly these eval lines, atomically (a resumed run drops those after its checkpoint)."""
    atomic_save("".join(json.dumps(m) + "\n" for m in lines), os.path.join(out_dir, "metrics.jsonl"))


def append_metrics(out_dir, m):
    """One eval's line at the end of metrics.jsonl. A half line a failed write leaves, read_json drops."""
    path = os.path.join(out_dir, "metrics.jsonl")
    try:
        with open(path, "a") as f:
            f.write(json.dumps(m) + "\n")
    except OSError as e:  # a failed write names no file
        e.filename = path
        raise


def save_tables(out_dir, step, tables):
    """A PE's tables (T, N, d) at `step` as pe/STEP.npy, atomically."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(tables, dtype=np.float32))
    atomic_save(buf.getvalue(), os.path.join(out_dir, PE_DIR, f"{step:07d}.npy"))


def read_tables(out_dir):
    """{step: tables (T, N, d)} of every eval's PE tables a run saved (empty for a PE without a table)."""
    paths = sorted(glob.glob(os.path.join(out_dir, PE_DIR, "*.npy")))
    return {int(os.path.basename(p)[:-4]): np.load(p, allow_pickle=False) for p in paths}


def drop_tables_after(out_dir, step):
    """Remove the tables saved after `step` (a resumed run evaluates those steps again)."""
    for p in glob.glob(os.path.join(out_dir, PE_DIR, "*.npy")):
        if int(os.path.basename(p)[:-4]) > step:
            os.remove(p)


def save_checkpoint(out_dir, ckpt):
    atomic_save(ckpt, os.path.join(out_dir, "ckpt.pt"))


def clear(out_dir):
    """Remove an old run's files, so that nothing of it survives a fresh start (--force)."""
    for f in RUN_FILES:
        path = os.path.join(out_dir, f)
        with contextlib.suppress(FileNotFoundError):
            if f == PE_DIR:
                shutil.rmtree(path)
            else:
                os.remove(path)


# ----------------------------------------------------------------------------- directories and locks
def missing_dirs(path):
    """The directories that creating path would make, innermost first."""
    path, out = os.path.abspath(path), []
    while not os.path.exists(path):
        out.append(path)
        path = os.path.dirname(path)
    return out


def remove_dirs(dirs):
    """Remove those of dirs (innermost first) that are empty: the ones a refused run made and left empty."""
    for d in dirs:
        with contextlib.suppress(OSError):  # not empty, or never made
            os.rmdir(d)


def unwritable(path):
    """Why no directory can be created or written at path, or None if one can: found out by doing it (creating it,
    writing and removing a file there), since permission bits do not tell (root passes them; /proc refuses anyway).
    Leaves nothing behind: the directories it made are removed again."""
    made, probe = missing_dirs(path), os.path.join(path, f".probe{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"probe")
    except OSError as e:
        return e.strerror
    finally:
        if os.path.exists(probe):
            os.remove(probe)
        remove_dirs(made)
    return None


def lock(out_dir):
    """Hold a run directory until release(): an flock on out_dir/lock, which holds this process's id and which the OS
    frees however the process ends. Another process holding it is a ValueError naming it; the lock of a process that
    died is taken over, with one line. Returns what release() needs: the open lock file and the directories made."""
    made, path = missing_dirs(out_dir), os.path.join(out_dir, LOCK)
    while True:
        os.makedirs(out_dir, exist_ok=True)
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            remove_dirs(made)
            raise ValueError(f"{out_dir} is in use by process {holder} (it holds {path}); wait for it to end") from None
        if os.fstat(f.fileno()).st_nlink:  # not a file its last holder removed on release while we opened it
            break
        f.close()
    f.seek(0)
    if holder := f.read().strip():  # only a holder that died leaves its id behind: release() removes the file
        print(f"train.py: {out_dir}: taking over the lock of process {holder}, which ended without releasing it",
              file=sys.stderr)
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f, made


def release(held):
    """Give a run directory back: remove its lock file, then close it (freeing the flock), then the directories made
    for it if they stayed empty (a refused run leaves nothing behind)."""
    f, made = held
    with contextlib.suppress(FileNotFoundError):  # the directory was removed while the run trained
        os.remove(f.name)
    f.close()
    remove_dirs(made)


# ----------------------------------------------------------------------------- reading runs
def read_checkpoint(path):
    """A checkpoint as train.py saved it, or a ValueError saying that it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path} cannot be read: a truncated or corrupt checkpoint? ({type(e).__name__})") from None


def read_json(path, lines=False):
    """A JSON file (None if absent), or a JSON-lines file as a list, without its last line when that one is cut
    short (a run still writing it, or killed while it did); any other bad line is a ValueError naming it."""
    if not os.path.exists(path):
        return [] if lines else None
    with open(path) as f:
        text = f.read()
    rows = text.split("\n") if lines else [text]
    out = []
    for i, row in enumerate(rows, start=1):
        if not row.strip():
            continue
        try:
            out.append(json.loads(row))
        except json.JSONDecodeError as e:
            if lines and i == len(rows):  # a last line without its newline: still being written
                break
            raise ValueError(f"{path}{f' line {i}' if lines else ''} is not valid JSON ({e})") from None
    return out if lines else out[0]


def find_runs(paths):
    """Run directories among paths: each path is a run (holds ckpt.pt; or a summary.json: a run that diverged
    before its first checkpoint, or one kept without checkpoints under results/; or a run.json: a run not finished)
    or a folder of runs."""
    runs = []
    for p in paths:
        inside = sorted({os.path.dirname(c) for f in RUN_MARKS for c in glob.glob(os.path.join(p, "*", f))})
        is_run = any(os.path.exists(os.path.join(p, f)) for f in RUN_MARKS)
        if not is_run and not inside:
            raise ValueError(f"{p} is neither a run directory (no ckpt.pt) nor a folder of runs")
        runs += [p] if is_run else inside
    return runs


def open_run(out_dir, flags, resume, force, compared):
    """What a run directory holds for a new run with these flags: (checkpoint to continue from or None, summary of a
    run that needs nothing more — finished or diverged — or None). Refuses (ValueError) to overwrite another run
    without --force, to --resume a run of other flags (compared: the flags that must agree), and unreadable files.
    Reads only: a fresh start clears the old run's files later (clear())."""
    ckpt_path, metrics, summary_path = (os.path.join(out_dir, f) for f in ("ckpt.pt", "metrics.jsonl", "summary.json"))
    ckpt = summary = None
    try:
        if resume and os.path.exists(ckpt_path):
            ckpt = read_checkpoint(ckpt_path)
        summary = read_json(summary_path) if resume else None
    except ValueError as e:
        raise ValueError(f"--resume: {e}") from None
    if ckpt is not None:
        diff = {k: (v, flags.get(k)) for k, v in ckpt["args"].items() if k in compared and flags.get(k) != v}
        if diff:
            raise ValueError(f"--resume: {out_dir} holds a run with other settings (saved, given): {diff}")
    if not resume and any(os.path.exists(f) for f in (ckpt_path, metrics, summary_path)) and not force:
        raise ValueError(f"{out_dir} already holds a run; pass --resume to continue it or --force to overwrite it")
    return ckpt, summary
