"""lm-evaluation-harness against a live `herd serve` (issue 15): its API model class `local-completions` runs a
20-item multiple-choice task built here from local data (a task YAML over a JSONL file), and every loglikelihood
it reads from herd's /v1/completions (echo + logprobs) equals what lm-eval's own `hf` backend computes with
transformers on the same tiny float checkpoint, within 1e-4; so do acc and acc_norm."""

from __future__ import annotations

import json
import random

import pytest

from test_server import Server
from test_server_echo import tiny_float_folder

WORDS = ["the", "quick", "brown", "fox", "lazy", "dog", "ships", "home", "night", "paris", "capital", "france",
         "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "lighthouses", "guide"]
TASK = "herd_tiny_mc"


def write_task(folder) -> None:
    """20 items of 4 choices (1 to 3 words each) and the task YAML that reads them."""
    rng = random.Random(0)
    with open(folder / "items.jsonl", "w") as f:
        for _ in range(20):
            question = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 8))) + "?"
            choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 4))) for _ in range(4)]
            f.write(json.dumps({"question": question, "choices": choices, "label": rng.randrange(4)}) + "\n")
    (folder / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "items.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
""")


def evaluate(model: str, model_args: dict, task_dir) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[TASK], log_samples=True,
                                   # only this task: indexing lm-eval's ~14k built-in task files takes a minute
                                   task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                                   batch_size=8,
                                   random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)


def loglikelihoods(out: dict) -> list[tuple[float, bool]]:
    """(loglikelihood, is_greedy) of every (item, choice), in item order."""
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    return [(float(r[0][0]), bool(r[0][1])) for s in samples for r in s["resps"]]


def test_lm_eval_local_completions_equals_hf(tmp_path, monkeypatch):
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    folder = tiny_float_folder(tmp_path / "model")
    write_task(tmp_path)
    hf = evaluate("hf", {"pretrained": str(folder), "dtype": "float32", "device": "cpu"}, tmp_path)
    server = Server(folder, "--max-batch", "4")
    try:
        api = evaluate("local-completions", {"model": "test-model", "base_url": server.url + "/v1/completions",
                                             "tokenizer": str(folder), "tokenizer_backend": "huggingface",
                                             "tokenized_requests": True, "num_concurrent": 1, "max_retries": 1},
                       tmp_path)
    finally:
        server.stop()
    got, want = loglikelihoods(api), loglikelihoods(hf)
    assert len(got) == len(want) == 80
    worst = max(abs(g[0] - w[0]) for g, w in zip(got, want))
    assert worst < 1e-4, worst
    assert [g[1] for g in got] == [w[1] for w in want]  # is_greedy: the server's top-1 agrees with transformers
    assert len({round(w[0], 3) for w in want}) > 40  # the items are scored apart, not one value
    for metric in ("acc,none", "acc_norm,none"):
        assert api["results"][TASK][metric] == pytest.approx(hf["results"][TASK][metric], abs=1e-4), metric
