"""Schema changes must stay BACKWARD compatible with every committed version.

Consumers read with the newest schema; the archive and the topics hold data written with older ones, so a new
version must be able to read them all (BACKWARD_TRANSITIVE). Each committed version is expanded with the shared
types of its own commit and checked against the working tree's schema. This fails CI for a change such as a new
field without a default, a removed enum symbol, or a narrowed type.
"""
import json
import subprocess
from pathlib import Path

import pytest

from schemas.codec import EVENT_NAMES, SCHEMA_DIR, expand_schema_file, load_schema
from schemas.compat import check_backward

REPO = SCHEMA_DIR.parent


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout


def _committed_schema_dirs(tmp_path: Path) -> list[tuple[str, Path]]:
    try:
        commits = _git("log", "--format=%H", "--", "schemas/").split()
    except (subprocess.CalledProcessError, FileNotFoundError):
        pytest.skip("not a git checkout: no committed schema versions to compare with")
    dirs = []
    for commit in commits:
        target = tmp_path / commit
        target.mkdir()
        for path in _git("ls-tree", "--name-only", commit, "schemas/").split():
            if path.endswith(".avsc"):
                (target / Path(path).name).write_text(_git("show", f"{commit}:{path}"))
        dirs.append((commit[:10], target))
    return dirs


def test_every_event_is_backward_compatible_with_all_committed_versions(tmp_path):
    checked = 0
    for commit, schema_dir in _committed_schema_dirs(tmp_path):
        for name in EVENT_NAMES:
            if not (schema_dir / f"{name}.avsc").exists():
                continue  # the event did not exist yet
            report = check_backward(load_schema(name), expand_schema_file(name, schema_dir))
            assert report.compatible, f"{name}.avsc cannot read data written with commit {commit}: {report.messages}"
            checked += 1
    print(f"checked {checked} committed schema versions")


def test_a_new_required_field_would_be_caught():
    old = load_schema("StepProgress")
    new = json.loads(json.dumps(old))
    new["fields"].append({"name": "gpu_temperature", "type": "float"})  # no default: old data lacks it
    report = check_backward(new, old)
    assert not report.compatible
    assert any("gpu_temperature" in m for m in report.messages)
