"""`herd pretrain` at scale, on this machine: kill -9 in the middle of training and in the middle of a checkpoint write,
then resume; a run across two "nodes" (network namespaces joined by a veth pair, one torchrun in each); a checkpoint
saved by 2 FSDP processes loaded into 1 process, TP 2 and FSDP 4 with the same logits.

Everything hangs on one 2-process FSDP run (gloo; the debug preset on the shipped corpus; a checkpoint every EVERY
steps) that trains all STEPS steps uninterrupted and is then killed with rank 0 inside the write of the final
checkpoint: dcp.py's test hook (HERD_TEST_HOLD_CHECKPOINT) holds it there, so the kill lands mid-write every time, not
by timing luck. Its losses are the uninterrupted reference; every comparison of losses is bitwise.

tests/test_pretrain.py holds the rest of `herd pretrain`: golden loss curves per layout, the export to HF (transformers'
logits within 1e-5), bad input.
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from herd.train import dcp

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "herd" / "data" / "sample.txt"
RESHARD = Path(__file__).resolve().parent / "reshard_logits.py"
STEPS, EVERY, B, T = 8, 4, 2, 16  # checkpoints at steps 4 and 8; B: one sequence per rank


def _ckpt(step: int) -> str:
    return f"step-{step:06d}"


@pytest.fixture(scope="module")
def data(tmp_path_factory, smollm_gguf):
    from herd.train.shards import prepare

    out = tmp_path_factory.mktemp("corpus")
    prepare(smollm_gguf, [CORPUS], out, progress=False)
    return out


def _pretrain_args(data, out, *extra) -> list[str]:
    """`-m herd pretrain ...` with the settings every run here shares (only the launch differs)."""
    return ["-m", "herd", "pretrain", "--data", str(data), "--out", str(out), "--steps", str(STEPS),
            "--batch-size", str(B), "--seq-len", str(T), "--lr", "3e-3", "--seed", "0", "--threads", "1",
            "--no-progress", "--parallel", "fsdp", "--save-every", str(EVERY), *map(str, extra)]


def _env(hold: int | None = None, **more) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **more}
    env.pop(dcp.HOLD_ENV, None)
    if hold is not None:
        env[dcp.HOLD_ENV] = str(hold)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, args: list[str], env: dict | None = None, log: Path | None = None):
    """torchrun on this host (loopback): the finished run, or with a log file the running Popen writing to it."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
            "127.0.0.1", "--master-port", str(_free_port()), *args]
    if log is not None:
        return _start(argv, env or _env(), log)
    return subprocess.run(argv, env=env or _env(), capture_output=True, text=True, timeout=400)


def _start(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:  # a file, not a pipe nobody reads: a chatty worker never blocks
        proc = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log = log
    return proc


def _check(res) -> None:
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def _losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# -- stopping a run: kill -9 torchrun and every worker ---------------------------------------------------------------

def _descendants(pid: int) -> list[int]:
    """Process ids below pid (children, their children, ...), from /proc."""
    parent = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                parent[int(p.name)] = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, todo = [], [pid]
    while todo:
        pid = todo.pop()
        kids = [c for c, pp in parent.items() if pp == pid]
        found += kids
        todo += kids
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _kill_run(proc: subprocess.Popen) -> None:
    """kill -9 torchrun and all its workers, and wait until none is left. torchrun starts each worker in a session of
    its own, so a signal to torchrun's process group alone would leave the workers training."""
    below = _descendants(proc.pid)
    _signal_all([proc.pid, *below], signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while any(_alive(pid) for pid in below) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in below), "a worker outlived kill -9"


def _wait_for(cond, proc: subprocess.Popen, what: str, poll: float = 0.01) -> None:
    deadline = time.time() + 300
    while not cond():
        if proc.poll() is not None or time.time() > deadline:
            pytest.fail(f"the run ended or stalled before {what}: {proc.log.read_text()[-3000:]}")
        time.sleep(poll)


def _held(out: Path, step: int) -> Path:
    """The half-written checkpoint folder dcp.save's test hook marks once rank 0 holds inside it."""
    return out / "checkpoints" / f"{_ckpt(step)}.tmp" / "HOLDING"


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> tuple[Path, list[float]]:
    """The single-node 2-process FSDP run, all STEPS steps uninterrupted, killed in the final checkpoint's write:
    (its output folder, its STEPS losses)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = _torchrun(2, _pretrain_args(data, out), env=_env(hold=STEPS), log=out.parent / "log")
    try:
        _wait_for(_held(out, STEPS).exists, proc, f"the write of checkpoint {STEPS}", poll=0.1)
    finally:
        _kill_run(proc)
    losses = _losses(out)
    assert len(losses) == STEPS and losses[-1] < losses[0]
    return out, losses


def test_kill_mid_checkpoint_write_and_mid_training_then_resume_is_bitwise(reference, data, tmp_path):
    ref, ref_losses = reference
    out, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    shutil.copytree(ref, out)  # the reference folder as the kill left it: the run to resume
    half = ckpts / f"{_ckpt(STEPS)}.tmp"
    # 1. killed mid-write: both ranks' shards and the DCP metadata on disk, trainer.pt and the rename not yet
    assert (half / ".metadata").is_file() and len(list(half.glob("*.distcp"))) == 2
    assert not (half / dcp.TRAINER).exists()
    assert dcp.latest(ckpts).name == _ckpt(EVERY)  # the half-written one is never taken
    _, weights = dcp.full_model_state(dcp.latest(ckpts))  # the newest complete one loads
    assert weights and all(torch.isfinite(w).all() for w in weights.values())

    # 2. resume from step EVERY, then kill -9 mid-training: past step EVERY + 1, before the next checkpoint's write
    #    (the hook holds that write, so the run cannot get past it; the freeze below shows where the kill landed)
    _held(out, STEPS).unlink()  # the hook's marker, not part of the checkpoint: a new hold makes a new one
    logged, started = out / "metrics.jsonl", time.time_ns()  # copytree kept the reference's mtime, before `started`

    def trained_past_checkpoint() -> bool:  # metrics.jsonl rewritten by the resumed run (truncated to step EVERY)
        return logged.stat().st_mtime_ns > started and len(logged.read_text().splitlines()) > EVERY

    proc = _torchrun(2, _pretrain_args(data, out, "--resume"), env=_env(hold=STEPS), log=tmp_path / "log")
    try:
        _wait_for(trained_past_checkpoint, proc, f"step {EVERY + 1} after the resume")
        _signal_all([proc.pid, *_descendants(proc.pid)], signal.SIGSTOP)  # freeze, look, kill: the state seen is
        mid_training = not _held(out, STEPS).exists()                     # the state killed
    finally:
        _kill_run(proc)
    after_kill = _losses(out)
    assert mid_training, "the kill missed the training steps: the run already held in the checkpoint write"
    assert EVERY < len(after_kill) < STEPS  # the last step not logged: not even in the final checkpoint's write
    assert after_kill == ref_losses[:len(after_kill)]  # the resume from the mid-write kill, bitwise
    print(f"killed mid-training after step {len(after_kill)} of {STEPS}")
    assert dcp.read_trainer(dcp.latest(ckpts))["step"] == EVERY  # the steps past it are lost, to be redone

    # 3. resume again, to the end: every loss equals the uninterrupted run's, bit for bit
    _check(_torchrun(2, _pretrain_args(data, out, "--resume")))
    assert _losses(out) == ref_losses
    assert [p.name for p in dcp.complete_checkpoints(ckpts)] == [_ckpt(EVERY), _ckpt(STEPS)]
    assert not list(ckpts.glob("*.tmp"))  # the resumed run's save swept the half-written folder away


# -- two nodes: network namespaces joined by a veth pair ----------------------------------------------------------

IP = shutil.which("ip") or "/usr/sbin/ip"


def _ip(*args: str) -> None:
    try:
        res = subprocess.run([IP, *args], capture_output=True, text=True, timeout=30)
    except OSError as e:
        pytest.fail(f"the two-node test needs iproute2's `ip` (root, network namespaces): {e}")
    if res.returncode != 0:
        pytest.fail(f"the two-node test needs root and network namespaces: `ip {' '.join(args)}` failed: "
                    f"{res.stderr.strip()}")


@pytest.fixture
def two_nodes():
    """Two network namespaces joined by a veth pair, each end up with an address: [(namespace, interface, address)].
    Names are unique to this run; the namespaces (and with them the veth pair) are deleted at teardown, pass or fail."""
    tag = f"{os.getpid() % 100000}{secrets.token_hex(2)}"  # interface names stay under 16 characters
    nodes = [(f"herd-{tag}-{i}", f"hv{tag}{i}", f"10.77.0.{i + 1}") for i in range(2)]
    made = []
    try:
        for ns, _, _ in nodes:
            _ip("netns", "add", ns)
            made.append(ns)
        (ns0, dev0, _), (ns1, dev1, _) = nodes
        _ip("link", "add", dev0, "netns", ns0, "type", "veth", "peer", "name", dev1, "netns", ns1)
        for ns, dev, addr in nodes:
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield nodes
    finally:
        for ns in made:
            subprocess.run([IP, "netns", "del", ns], capture_output=True, timeout=30)


def _veth_bytes(ns: str, dev: str) -> int:
    res = subprocess.run([IP, "-n", ns, "-s", "-j", "link", "show", "dev", dev], capture_output=True, text=True,
                         check=True)
    stats = json.loads(res.stdout)[0]["stats64"]
    return stats["rx"]["bytes"] + stats["tx"]["bytes"]


def test_two_nodes_over_veth_match_one_node(reference, data, tmp_path, two_nodes):
    out, host = tmp_path / "two-nodes", two_nodes[0][2]
    ns0, dev0, _ = two_nodes[0]
    assert _veth_bytes(ns0, dev0) < 100_000
    procs = []
    for rank, (ns, dev, addr) in enumerate(two_nodes):  # the static rendezvous: node 0's agent hosts the store
        argv = [IP, "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                "--nproc-per-node", "1", "--node-rank", str(rank), "--master-addr", host, "--master-port", "29400",
                "--local-addr", addr, *_pretrain_args(data, out)]
        procs.append(_start(argv, _env(GLOO_SOCKET_IFNAME=dev), tmp_path / f"node{rank}.log"))
    try:
        for p in procs:
            p.wait(timeout=400)
    finally:
        for p in procs:
            _kill_run(p)  # a no-op for a run that ended
    assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(p.log.read_text()[-3000:] for p in procs)
    assert _losses(out) == reference[1]  # bitwise
    crossed = _veth_bytes(ns0, dev0)
    print(f"two nodes: {crossed / 1e6:.1f} MB over the veth pair")
    assert crossed > 10_000_000  # the collectives went over the veth pair: FSDP gathers the 12.6 MB of weights


# -- resharding: saved by 2 FSDP processes, loaded into 1, TP 2 and FSDP 4 ----------------------------------------

@pytest.fixture(scope="module")
def saved(reference) -> Path:
    ckpt = reference[0] / "checkpoints" / _ckpt(EVERY)
    assert dcp.read_trainer(ckpt)["layout"] == {"kind": "fsdp", "world": 2, "tp": 1}
    return ckpt


@pytest.fixture(scope="module")
def tokens(saved, tmp_path_factory) -> Path:
    vocab = dcp.read_trainer(saved)["model_config"]["vocab_size"]
    path = tmp_path_factory.mktemp("logits") / "x.pt"
    torch.save(torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0)), path)
    return path


@pytest.fixture(scope="module")
def plain_logits(saved, tokens) -> torch.Tensor:
    """The logits of the plain model holding the checkpoint's full weights, gathered by DCP's offline converter
    (dcp_to_torch_save), not by the resharding load under test."""
    from herd.config import ModelConfig
    from herd.models.llama import Transformer

    cfg, weights = dcp.full_model_state(saved)
    model = Transformer(ModelConfig.from_dict(cfg))
    model.load_state_dict(weights, strict=True)
    return _forward(model, tokens)


def _forward(model, tokens: Path) -> torch.Tensor:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the helper script runs
    try:
        with torch.no_grad():
            return model.eval()(torch.load(tokens, weights_only=True))
    finally:
        torch.set_num_threads(before)


def _compare(layout: str, logits: torch.Tensor, plain: torch.Tensor) -> float:
    assert logits.shape == plain.shape and torch.isfinite(logits).all()  # NaN: a weight the load left out
    diff = float((logits - plain).abs().max())
    print(f"2 FSDP -> {layout}: max |logits - plain model's| = {diff:.3g}")
    return diff


def test_fsdp_checkpoint_loads_in_one_process(saved, tokens, plain_logits):
    from reshard_logits import poisoned_model

    model = poisoned_model(dcp.read_trainer(saved)["model_config"])
    dcp.load(saved, model)  # DCP's resharding load: 2 ranks' shards into one process
    assert _compare("1 process", _forward(model, tokens), plain_logits) == 0.0


def _script_logits(layout: str, nproc: int, ckpt: Path, tokens: Path, out: Path) -> torch.Tensor:
    _check(_torchrun(nproc, [str(RESHARD), str(ckpt), layout, str(tokens), str(out)]))
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("layout,nproc,tol", [pytest.param("tp", 2, 1e-6, id="tp2"),
                                               pytest.param("fsdp", 4, 0.0, id="fsdp4", marks=pytest.mark.slow)])
def test_fsdp_checkpoint_reshards_with_the_same_logits(saved, tokens, plain_logits, layout, nproc, tol, tmp_path):
    logits = _script_logits(layout, nproc, saved, tokens, tmp_path / "logits.pt")
    assert _compare(f"{layout} {nproc}", logits, plain_logits) <= tol
