"""The work directory: stage outputs, their config records, and guards against mixing runs.

Every stage writes its outputs into `<workdir>/<stage>/` and, last, `stage.json` with the config
values its outputs depend on. A stage whose `stage.json` exists and matches the current config is
skipped on a re-run. A match failure stops the run with the differing field instead of
overwriting the older outputs: nothing a previous run produced is ever deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any

MARKER = "ckt_jax_run.json"
# Stage outputs up to this size get a SHA-256 in stage.json, checked when the stage is reused.
DIGEST_MAX_BYTES = 64 << 20


class WorkdirError(ValueError):
    pass


def prepare_workdir(path: str | os.PathLike) -> pathlib.Path:
    """Create the work directory, or accept one that an earlier ckt_jax run created."""
    root = pathlib.Path(path).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise WorkdirError(f"--workdir {root} is a file; pass a directory path")
    if root.is_dir() and any(root.iterdir()) and not (root / MARKER).exists():
        raise WorkdirError(
            f"--workdir {root} is not empty and was not created by ckt_jax; "
            "pass a new or empty directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
        marker = root / MARKER
        if not marker.exists():
            marker.write_text(json.dumps({"created_by": "ckt_jax"}) + "\n")
        # Every stage writes here; find out now rather than after an hour of training.
        probe = root / f".write-check-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise WorkdirError(f"--workdir {root} cannot be written ({err.strerror or err}); pass a "
                           "directory you can write to") from None
    return root


def flatten_record(record: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts into one dict with dotted keys."""
    if isinstance(record, dict):
        flat = {}
        for key, value in record.items():
            flat.update(flatten_record(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): record}


def stage_done(stage_dir: pathlib.Path, record: dict) -> bool:
    """Return True if `stage_dir` contains finished outputs made with `record`.

    Raises WorkdirError when it contains outputs made with a different config.
    """
    path = stage_dir / "stage.json"
    if not path.exists():
        return False
    content = read_stage_record(stage_dir)
    stored = content["config"]
    old, new = flatten_record(stored), flatten_record(json.loads(json.dumps(record)))
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            raise WorkdirError(
                f"{stage_dir} contains another run's {stage_dir.name} outputs ({key}="
                f"{old.get(key)!r}, this config has {new.get(key)!r}); use a new --workdir or "
                f"delete {stage_dir}")
    # Stages finished by older versions recorded no digests, so they are not checked.
    for name, digest in content.get("files", {}).items():
        output = stage_dir / name
        if not output.is_file() or _sha256(output) != digest:
            raise WorkdirError(f"{output} is missing or changed since its stage finished; "
                               f"delete {stage_dir} to redo the stage")
    return True


def error_summary(err: BaseException, limit: int = 200) -> str:
    """Format `err` as its type and the first `limit` characters of its first line."""
    text = str(err).strip()
    first_line = text.splitlines()[0][:limit] if text else ""
    return f"{type(err).__name__}: {first_line}" if first_line else type(err).__name__


def read_stage_record(stage_dir: pathlib.Path) -> dict:
    """Return the `stage.json` of a finished stage; raise WorkdirError when it is malformed."""
    path = stage_dir / "stage.json"
    try:
        content = json.loads(path.read_text())
        if (not isinstance(content, dict) or not isinstance(content.get("config"), dict)
                or not isinstance(content.get("files", {}), dict)
                or not isinstance(content.get("summary", {}), dict)):
            raise ValueError("it is not an object with a 'config' object")
    except (ValueError, UnicodeDecodeError) as err:
        raise WorkdirError(f"{path} is unreadable ({err}); delete {stage_dir} to redo the stage"
                           ) from err
    return content


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _output_digests(stage_dir: pathlib.Path) -> dict[str, str]:
    """SHA-256 of the stage's JSON and JSONL outputs up to DIGEST_MAX_BYTES, by file name."""
    digests = {}
    for path in sorted(stage_dir.iterdir()):
        if (path.is_file() and path.suffix in (".json", ".jsonl") and path.name != "stage.json"
                and path.stat().st_size <= DIGEST_MAX_BYTES):
            digests[path.name] = _sha256(path)
    return digests


def mark_stage_done(stage_dir: pathlib.Path, record: dict, summary: dict | None = None) -> None:
    """Write `stage.json` last, atomically, so a killed stage never looks finished."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    tmp = stage_dir / "stage.json.tmp"
    content = {"config": record, "summary": summary or {}, "files": _output_digests(stage_dir)}
    tmp.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(tmp, stage_dir / "stage.json")


def read_summary(stage_dir: pathlib.Path) -> dict:
    return read_stage_record(stage_dir).get("summary", {})


def write_json(path: pathlib.Path, value: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: pathlib.Path) -> list[dict]:
    rows = []
    with path.open() as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise WorkdirError(f"{path} line {number} is not valid JSON ({err}); delete "
                                   f"{path.parent} to redo the stage that wrote it") from None
    return rows
