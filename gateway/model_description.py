"""The models the gateway serves, as a description (gpu_agents/model_facts.py), so the gateway never imports torch.

The facts of a model (modalities, limits) are computed by its family (gpu_agents/families/), which needs torch,
diffusers and transformers — half a gigabyte of memory and seconds of start-up for a process that only checks
requests. So the gateway asks ``vidgen models --json`` (the same ``ModelCatalogue.facts`` the prompt encoder and the
agents use) in a short-lived child process, and keeps the answer in ``<var>/run/model-facts.json``, keyed by the
configured model directories and the family code: a gateway that starts again with the same models reads the file.
A process that has torch loaded already (tests, `vidgen up`'s own checks) computes it in place.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from gpu_agents.model_facts import FactsCatalogue

log = logging.getLogger(__name__)

CACHE_FILE = Path("run") / "model-facts.json"
_MEMO: dict[str, FactsCatalogue] = {}


def load_model_description(settings) -> FactsCatalogue:
    key = _description_key(settings.model_dirs)
    if key in _MEMO:
        return _MEMO[key]
    path = Path(settings.var_dir) / CACHE_FILE
    description = _read_cache(path, key)
    if description is None:
        description = _describe_in_process(settings) if "torch" in sys.modules else _describe_in_child(settings)
        _write_cache(path, key, description)
    catalogue = FactsCatalogue(description["models"], _problems(description["problems"]))
    _MEMO[key] = catalogue
    return catalogue


def _description_key(model_dirs: dict[str, str]) -> str:
    """Changes when a configured directory's config files or the families' code change."""
    parts = []
    for model_id, directory in sorted(model_dirs.items()):
        for name in ("model_index.json", "vidgen_model.json"):
            try:
                stat = (Path(directory) / name).stat()
                parts.append(f"{model_id}={directory}/{name}@{stat.st_mtime_ns}:{stat.st_size}")
            except OSError:
                parts.append(f"{model_id}={directory}/{name}@missing")
    package = Path(importlib.util.find_spec("gpu_agents").submodule_search_locations[0])
    for source in sorted(package.rglob("*.py")):
        stat = source.stat()
        parts.append(f"{source.relative_to(package)}@{stat.st_mtime_ns}:{stat.st_size}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _describe_in_process(settings) -> dict:
    from gpu_agents.models import ModelCatalogue

    catalogue = ModelCatalogue(settings.model_dirs, device="cpu")
    models, problems = [], []
    for model_id in catalogue.model_ids():
        try:
            models.append(catalogue.facts(model_id).as_dict())
        except (OSError, ValueError) as exc:
            problems.append(f"{model_id}: {exc}")
    return {"models": models, "problems": problems}


def _describe_in_child(settings) -> dict:
    env = {**os.environ, "VIDGEN_VAR_DIR": str(settings.var_dir),
           "VIDGEN_MODELS": ",".join(f"{k}={v}" for k, v in settings.model_dirs.items())}
    done = subprocess.run([sys.executable, "-m", "vidgen", "models", "--json"], env=env, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    try:
        return json.loads(done.stdout)
    except ValueError:
        raise RuntimeError(f"`vidgen models --json` gave no description (exit {done.returncode}): "
                           f"{done.stderr.strip()[-2000:]}") from None


def _problems(lines: list[str]) -> dict[str, str]:
    problems = {}
    for line in lines:
        model_id, _, problem = line.partition(": ")
        problems[model_id] = problem
    return problems


def _read_cache(path: Path, key: str) -> dict | None:
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return cached.get("description") if isinstance(cached, dict) and cached.get("key") == key else None


def _write_cache(path: Path, key: str, description: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "description": description}))
        os.replace(tmp, path)
    except OSError as exc:  # a read-only var folder: described again next time
        log.warning("cannot keep the model description in %s: %s", path, exc)
