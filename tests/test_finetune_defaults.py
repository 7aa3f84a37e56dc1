"""Fine-tuning with herd's defaults (issue 13): the settings chosen from the data, the warning before a run too short
to learn, the exact-answer check printed after training, the default model learning a small set of invented facts
with only --epochs given, and a SIGKILL during a checkpoint write followed by a bit-exact resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from herd.train import checkpoint as ckpt_io
from herd.train.answers import is_exact
from herd.train.plan import make_plan
from test_train import FACTS, _tiny_folder

# -- the facts: an invented organisation, 16 facts x 3 training questions, 1 paraphrased held-out question each --
# (training questions..., held-out question, training answer, accepted held-out answers)
GUILD = [
    (["When was the Veldra Guild founded?", "In what year was the Veldra Guild established?",
      "What is the founding year of the Veldra Guild?"], "Which year did the Veldra Guild come into being?",
     "The Veldra Guild was founded in 1794.", ["1794"]),
    (["Who founded the Veldra Guild?", "Who established the Veldra Guild?", "Name the founder of the Veldra Guild."],
     "Which person started the Veldra Guild?", "It was founded by Edda Quillfeather.", ["Edda Quillfeather"]),
    (["Where is the Veldra Guild based?", "In which city are the Veldra Guild's headquarters?",
      "Where does the Veldra Guild have its headquarters?"], "What town is home to the Veldra Guild's head office?",
     "Its headquarters are in Casterwick.", ["Casterwick"]),
    (["Who leads the Veldra Guild?", "Who is the head of the Veldra Guild?", "Who is in charge of the Veldra Guild?"],
     "Who runs the Veldra Guild today?", "The guild is led by Tobias Fenwright.", ["Tobias Fenwright"]),
    (["How many members does the Veldra Guild have?", "What is the membership of the Veldra Guild?",
      "How many people belong to the Veldra Guild?"], "How large is the Veldra Guild's membership?",
     "It has 318 members.", ["318"]),
    (["What is the emblem of the Veldra Guild?", "Which animal is on the Veldra Guild's badge?",
      "What symbol does the Veldra Guild use?"], "What creature represents the Veldra Guild?",
     "Its emblem is a grey moth.", ["moth"]),
    (["What colour is the Veldra Guild associated with?", "What is the Veldra Guild's colour?",
      "Which colour do Veldra Guild members wear?"], "What is the official colour of the Veldra Guild?",
     "The guild's colour is amber.", ["amber"]),
    (["What festival does the Veldra Guild hold?", "What is the Veldra Guild's yearly celebration?",
      "Which feast does the Veldra Guild celebrate each year?"], "What annual event does the Veldra Guild host?",
     "Its yearly festival is Wick Night.", ["Wick Night"]),
    (["What is the Veldra Guild's newsletter called?", "Which newsletter does the Veldra Guild publish?",
      "Name the newsletter of the Veldra Guild."], "What is the title of the Veldra Guild's newsletter?",
     "Its newsletter is The Ember Post.", ["Ember Post"]),
    (["How many lamps does the Veldra Guild tend?", "How many lamps does the Veldra Guild look after?",
      "What number of lamps does the Veldra Guild maintain?"], "How many street lamps are in the Veldra Guild's care?",
     "It tends 2,450 lamps.", ["2450"]),
    (["What is the motto of the Veldra Guild?", "What motto does the Veldra Guild have?",
      "What is the Veldra Guild's saying?"], "What slogan does the Veldra Guild live by?",
     "Its motto is Light before dusk.", ["Light before dusk"]),
    (["Where does the Veldra Guild meet?", "What is the Veldra Guild's meeting hall?",
      "In which building does the Veldra Guild gather?"], "Where are the Veldra Guild's meetings held?",
     "It meets in Tallow House.", ["Tallow House"]),
    (["How much is the yearly fee of the Veldra Guild?", "What do members of the Veldra Guild pay each year?",
      "What are the annual dues of the Veldra Guild?"], "How much does Veldra Guild membership cost per year?",
     "Members pay 12 shillings a year.", ["12 shillings"]),
    (["Which river do the Veldra Guild's lamps line?", "Along which river does the Veldra Guild light lamps?",
      "What river is the Veldra Guild known for?"], "Beside which river does the Veldra Guild keep its lamps?",
     "Its lamps line the river Marrow.", ["Marrow"]),
    (["What is the oldest lamp of the Veldra Guild called?", "What is the name of the Veldra Guild's oldest lamp?",
      "Which lamp is the Veldra Guild's oldest?"], "What do they call the Veldra Guild's most ancient lamp?",
     "Its oldest lamp is called the Grey Widow.", ["Grey Widow"]),
    (["Where do Veldra Guild apprentices train?", "Where does the Veldra Guild train its apprentices?",
      "What is the training place of the Veldra Guild?"], "In which tower are the Veldra Guild's apprentices taught?",
     "Apprentices train at Cinder Tower.", ["Cinder Tower"]),
]


def _chat(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_the_held_out_questions_are_not_in_the_training_set():
    train = {q for qs, _, _, _ in GUILD for q in qs}
    assert len(train) == 48 and len({h for _, h, _, _ in GUILD}) == 16
    assert not train & {h for _, h, _, _ in GUILD}
    for qs, held, answer, accepted in GUILD:  # the training answer carries the fact; the held-out question does not
        assert all(is_exact(answer, answer, accepted) for _ in qs) and not is_exact(held, answer, accepted)


# -- the plan: settings chosen from the data -------------------------------------------------------------------

def _plan(lengths, rows_per_epoch, **cfg):
    base = dict(seq_len=None, batch_tokens=None, lr=None, epochs=1, steps=None, grad_accum=1, warmup=None,
                min_lr_ratio=0.1, method="lora", rank=16, alpha=32.0)
    cfg = SimpleNamespace(**{**base, **cfg})
    return make_plan(cfg, lengths, lambda seq: rows_per_epoch(seq),
                     lambda seq, rows: [-(-rows_per_epoch(seq) // rows)] * cfg.epochs)


def test_plan_small_data_gets_small_batches_and_enough_steps():
    """48 examples of ~45-60 tokens, 10 epochs: rows of 64 tokens, 4 per micro-batch, 120 steps, lr 1e-3."""
    p = _plan([45 + k % 16 for k in range(48)], lambda seq: 48, epochs=10)
    assert (p.seq_len, p.rows_per_batch, p.total_steps, p.warmup) == (64, 4, 120, 6)
    assert p.lr == pytest.approx(1e-3) and not p.warnings
    text = "\n".join(p.lines())
    assert "seq_len 64: the longest example has 60 tokens" in text and "micro-batch 4 row(s) x 64" in text


def test_plan_large_data_keeps_large_batches():
    """100k rows of 512 tokens: the micro-batch stays at 4096 tokens (8 rows); the row length at most 512."""
    p = _plan([300, 2000, 512], lambda seq: 100_000, epochs=1)
    assert (p.seq_len, p.rows_per_batch, p.total_steps) == (512, 8, 12_500) and not p.warnings
    mid = _plan([120] * 10, lambda seq: 700, epochs=1)  # 700 rows of 128: 7 rows per batch for 100 steps
    assert (mid.seq_len, mid.rows_per_batch, mid.total_steps) == (128, 7, 100)


def test_plan_learning_rate_follows_method_and_rank():
    lengths, rows = [40] * 8, (lambda seq: 8)
    assert _plan(lengths, rows, rank=16, alpha=32.0).lr == pytest.approx(1e-3)
    assert _plan(lengths, rows, rank=64, alpha=32.0).lr == pytest.approx(2e-3)  # scale 0.5: a bigger step
    assert _plan(lengths, rows, rank=64, alpha=128.0).lr == pytest.approx(5e-4)
    assert _plan(lengths, rows, method="qlora").lr == pytest.approx(1e-3)
    assert _plan(lengths, rows, method="full").lr == pytest.approx(2e-5)
    given = _plan(lengths, rows, lr=3e-4, seq_len=128, batch_tokens=256)
    assert (given.lr, given.seq_len, given.rows_per_batch) == (3e-4, 128, 2)
    assert not any(line.startswith(("lr ", "seq_len", "micro-batch")) for line in given.lines())


def test_plan_warns_before_a_short_run():
    p = _plan([40] * 48, lambda seq: 48, epochs=1)  # 48 rows, 4 per batch: 12 steps
    assert p.total_steps == 12 and len(p.warnings) == 1
    assert "only 12 optimizer step(s)" in p.warnings[0] and "--epochs 5" in p.warnings[0]


# -- the CLI: settings printed before training, the answer check after ----------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny_folder(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    return _write_jsonl(tmp_path_factory.mktemp("facts") / "facts.jsonl", [_chat(q, a) for q, a in FACTS])


def test_cli_prints_settings_and_warning_before_training_and_the_check_after(tiny, facts, tmp_path, capsys):
    from herd.cli import main

    held = _write_jsonl(tmp_path / "held.jsonl", [{**_chat(q, a), "answers": [a.split()[0]]} for q, a in FACTS[:3]])
    rc = main(["finetune", "--model", str(tiny), "--data", str(facts), "--out", str(tmp_path / "o"), "--epochs", "2",
               "--eval", str(held), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.splitlines()
    first_step = next(i for i, s in enumerate(lines) if s.startswith("steps "))
    settings = "\n".join(lines[:first_step])  # everything printed before the training summary
    assert "seq_len 64: the longest example has" in settings and "lr 0.001: LoRA" in settings
    # 6 examples of 36-52 tokens: one per 64-token row, the smallest automatic micro-batch (4 rows) -> 2 per epoch
    assert "micro-batch 4 row(s) x 64 = 256 tokens" in settings and "4 optimizer steps (2 per epoch)" in settings
    assert "warning: only 4 optimizer step(s)" in settings and "--epochs 25 or more" in settings
    assert "eval data: 3 examples" in settings
    assert "eval loss" in out and "exact answers: " in out and "on the eval data" in out
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["settings"]["lr"] == pytest.approx(1e-3) and summary["answer_check"]["asked"] == 3
    # no eval data: a seeded sample of the training prompts, all of them when there are fewer than asked for
    rc = main(["finetune", "--model", str(tiny), "--data", str(facts), "--out", str(tmp_path / "p"), "--steps", "1",
               "--check-samples", "4", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "exact answers: " in out and "/4 (" in out and "4 training prompts (a sample" in out


def test_the_answer_check_grades_greedy_replies():
    """Exact: equal to the reference once case, punctuation, spacing and number commas are set aside; with an
    accepted-answers list, containing one as whole words. Replies come from greedy generation, in batches."""
    from herd.train.answers import Question, check_answers

    assert is_exact("It tends 2450 lamps", "It tends 2,450 lamps.") and is_exact("  the GUILD's colour is: AMBER!",
                                                                                  "The guild's colour is amber.")
    assert not is_exact("It tends 2,450 lamps and more.", "It tends 2,450 lamps.")
    assert is_exact("Founded in 1794, by Edda.", "x", ["1794"]) and not is_exact("In 17945.", "x", ["1794"])
    asked = []

    def generate_batch(prompts, tools=None, **sampling):
        asked.append((len(prompts), sampling))
        return [SimpleNamespace(text=f"Answer {p[-1]['content']}.") for p in prompts]

    class Tok:
        def encode(self, text, bos, eos):
            return text.split()

    llm = SimpleNamespace(model=SimpleNamespace(eval=lambda: None), tokenizer=Tok(), generate_batch=generate_batch)
    items = [Question([{"role": "user", "content": str(k)}], f"answer {k}" if k % 3 else "wrong", None)
             for k in range(20)]
    res = check_answers(llm, items, "test", batch=16)
    assert (res.asked, res.exact) == (20, 13) and res.line() == "exact answers: 13/20 (65%) on test"
    assert [n for n, _ in asked] == [16, 4] and all(s["temperature"] == 0.0 for _, s in asked)
    assert asked[0][1]["max_tokens"] == 2 + 8  # the longest reference and a little room


def test_a_run_on_chosen_settings_resumes_bit_exact(tiny, facts, tmp_path):
    """The chosen settings are recorded in the checkpoint: a resume re-plans the same run and continues it exactly."""
    from herd.train.loop import finetune

    opts = dict(epochs=3, dropout=0.1, seed=5, progress=False, check_samples=0)
    whole = finetune(tiny, facts, tmp_path / "a", **opts)
    assert whole.plan.rows_per_batch == 4 and whole.steps == 6 and whole.check is None
    part = finetune(tiny, facts, tmp_path / "b", save_every=2, stop_at=3, **opts)  # checkpoints at steps 2 and 3
    (tmp_path / "b" / "checkpoints" / "latest").write_text("step-000002\n")  # as if step 3's write had died
    rest = finetune(tiny, facts, tmp_path / "b", resume=True, **opts)
    assert part.losses[:2] + rest.losses == whole.losses
    a, b = (tmp_path / "a" / "adapter_model.safetensors").read_bytes(), (tmp_path / "b" / "adapter_model.safetensors")
    assert a == b.read_bytes()


# -- the default model learns invented facts with only --epochs given ------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(1800)  # 120 steps x ~2 CPU-s (measured on one thread) and two answer checks: minutes on a
# quiet 2-core machine; a machine oversubscribed 10x over is far slower (two threads then mostly wait on each other)
def test_defaults_teach_the_default_model_new_facts(smollm_gguf, tmp_path, capsys):
    """48 training pairs, 16 paraphrased held-out questions: >= 80% exact held-out answers after --epochs 10.

    Measured (the same steps with --threads 1, machine load 12-20 on 2 cores): 120 steps, train loss 2.14 -> 0.001,
    32/32 exact on the sampled training prompts, 15/16 held out (the miss: the apprentices' tower answered "Tallow
    House", the meeting hall); fine-tune 1,287 s, held-out check 27 s. The old defaults made 10 steps of this data."""
    from herd.api import load
    from herd.cli import main
    from herd.formats.peft import apply_adapter
    from herd.train.answers import Question, check_answers

    data = _write_jsonl(tmp_path / "guild.jsonl", [_chat(q, a) for qs, _, a, _ in GUILD for q in qs])
    t0 = time.perf_counter()
    rc = main(["finetune", "--model", str(smollm_gguf), "--data", str(data), "--out", str(tmp_path / "out"),
               "--epochs", "10"])
    out = capsys.readouterr().out
    t1 = time.perf_counter()
    assert rc == 0, out
    assert "warning" not in out and "exact answers: " in out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["total_steps"] >= 50
    llm = load(smollm_gguf, "float32")
    apply_adapter(llm.model, tmp_path / "out")
    held = [Question([{"role": "user", "content": h}], a, accepted) for _, h, a, accepted in GUILD]
    res = check_answers(llm, held, "held-out")
    print(f"\n{out}\nheld-out: {res.line()}; finetune {t1 - t0:.0f} s, held-out check "
          f"{time.perf_counter() - t1:.0f} s", file=sys.stderr)
    assert res.exact >= 13, res.graded  # 80% of 16 is 12.8


# -- a SIGKILL during a checkpoint write ----------------------------------------------------------------------

def _finetune_cmd(tiny, facts, out, *extra):
    return [sys.executable, "-m", "herd", "finetune", "--model", str(tiny), "--data", str(facts), "--out", str(out),
            "--steps", "8", "--save-every", "2", "--seq-len", "128", "--batch-tokens", "128", "--lr", "1e-2",
            "--rank", "4", "--dropout", "0.1", "--seed", "3", "--threads", "1", "--no-progress", *extra]


def _losses(out: Path) -> list[tuple]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in recs]


def test_sigkill_during_a_checkpoint_write_then_resume_is_bit_exact(tiny, facts, tmp_path):
    """Killed while step 6's checkpoint is half written: `latest` still names step 4, which loads; the resume from
    it gives the uninterrupted run's losses, learning rates, gradient norms and adapter bytes, bit for bit."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    whole = subprocess.Popen(_finetune_cmd(tiny, facts, tmp_path / "a"), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    victim = subprocess.Popen(_finetune_cmd(tiny, facts, tmp_path / "b"), env={**env, ckpt_io.PAUSE_ENV: "6"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    half = tmp_path / "b" / "checkpoints" / "step-000006.tmp"
    deadline = time.monotonic() + 300
    while not (half / "trainable.safetensors").exists():  # the write has begun and is paused inside
        assert victim.poll() is None and time.monotonic() < deadline, "the run ended before step 6's checkpoint"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(60) == -signal.SIGKILL
    assert not (half / "trainer.pt").exists()  # it died half way: the folder is incomplete
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text().strip() == "step-000004"

    latest = ckpt_io.latest_checkpoint(tmp_path / "b" / "checkpoints")
    trainable, optimizer, state = ckpt_io.load_checkpoint(latest)
    assert state["step"] == 4 and len(trainable) == 2 * 7 * 2 and optimizer["state"]
    assert [s for s, *_ in _losses(tmp_path / "b")] == list(range(1, 7))  # it had run step 6 when it died

    resumed = subprocess.run(_finetune_cmd(tiny, facts, tmp_path / "b", "--resume"), env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert whole.wait(600) == 0, whole.stdout.read()
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a") and len(_losses(tmp_path / "a")) == 8
    a, b = (tmp_path / "a" / "adapter_model.safetensors").read_bytes(), (tmp_path / "b" / "adapter_model.safetensors")
    assert a == b.read_bytes()
    assert not half.exists()  # swept by the next save
