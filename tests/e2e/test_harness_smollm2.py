"""Zero-shot accuracy of the embedded SmolLM2-135M through anyshape equals the accuracy that
lm-eval's own `hf` model gives for the same checkpoint (slow: two runs of the real model)."""

from pathlib import Path

import pytest
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM

from anyshape import export_hf
from anyshape.evaluate.harness import evaluate_tasks, find_tasks

pytestmark = pytest.mark.slow

TASKS = Path(__file__).resolve().parents[3] / "shared" / "data" / "eval" / "lm_eval_tasks"
LIMIT = 50
BATCH_SIZE = 16


@pytest.mark.skipif(not TASKS.is_dir(), reason=f"needs the shared lm-eval task folder {TASKS}")
def test_hellaswag_accuracy_equals_lm_eval_hf(smollm2, smollm2_tokenizer, tmp_path, monkeypatch, record_property):
    ours = evaluate_tasks(smollm2, smollm2_tokenizer, None, ["hellaswag_local"], TASKS, LIMIT, BATCH_SIZE)
    ours = {score.metric: score.value for score in ours.scores}

    folder = export_hf(smollm2, smollm2.full_shape, tmp_path / "full", tokenizer=smollm2_tokenizer)
    reference_lm = HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=BATCH_SIZE)
    suite = find_tasks(["hellaswag_local"], TASKS)
    monkeypatch.chdir(suite.data_folder)  # where the task's relative data_files are
    theirs = simple_evaluate(
        model=reference_lm, tasks=["hellaswag_local"], task_manager=suite.manager, limit=LIMIT, log_samples=False
    )["results"]["hellaswag_local"]

    for metric in ("acc", "acc_norm"):
        record_property(f"anyshape_{metric}", ours[metric])
        record_property(f"hf_{metric}", theirs[f"{metric},none"])
    assert (ours["acc"], ours["acc_norm"]) == (theirs["acc,none"], theirs["acc_norm,none"])
