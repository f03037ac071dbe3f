"""`epserve batch` / cluster.batch: Ray Data over a pool of model instances, row for row equal to
LLM.generate, resumable after an interruption, a bad row an error and not a failed job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster import LLM, SamplingParams
from cluster.batch import BatchConfig, parts_dir, run_batch
from tests.conftest import FEW_EXPERTS

PROMPTS = [f"row {i}: " + "expert layer token " * (i % 7) for i in range(200)]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def job(ray_cluster, make_checkpoint, tmp_path_factory):
    """The 200-row job run once, uninterrupted, and LLM.generate's completions of the same prompts."""
    model = make_checkpoint(FEW_EXPERTS)
    work = tmp_path_factory.mktemp("batch")
    source = work / "in.parquet"
    pq.write_table(pa.table({"prompt": PROMPTS, "id": list(range(len(PROMPTS)))}), source)
    config = BatchConfig(model=model, max_tokens=8, batch_size=16, instances=2, cpus_per_instance=0.5)
    summary = run_batch(source, work / "out.parquet", config, progress=False)
    with LLM(model) as llm:
        expected = llm.generate(PROMPTS, GREEDY)
    return {"model": model, "source": source, "output": work / "out.parquet", "summary": summary,
            "expected": expected, "work": work}


def test_rows_equal_llm_generate(job):
    out = pq.read_table(job["output"])
    assert out.column_names == ["prompt", "id", "completion", "completion_token_ids", "finish_reason",
                                "num_prompt_tokens", "num_output_tokens", "error"]
    assert out.column("id").to_pylist() == list(range(200))  # input order, every input column kept
    assert out.column("completion_token_ids").to_pylist() == [c.token_ids for c in job["expected"]]
    assert out.column("completion").to_pylist() == [c.text for c in job["expected"]]
    assert out.column("finish_reason").to_pylist() == [c.finish_reason for c in job["expected"]]
    assert out.column("num_prompt_tokens").to_pylist() == [len(c.prompt_token_ids) for c in job["expected"]]
    assert out.column("error").null_count == 200
    assert job["summary"]["processed"] == 200 and not parts_dir(job["output"]).exists()


def test_finished_job_is_idempotent(job):
    before = job["output"].stat().st_mtime_ns
    summary = run_batch(job["source"], job["output"], BatchConfig(model=job["model"], max_tokens=8), progress=False)
    assert summary["processed"] == 0 and summary["already_done"] == 200
    assert job["output"].stat().st_mtime_ns == before


def test_interrupted_job_resumes_to_the_same_file(job, ray_cluster):
    """`epserve batch` killed once some batches are written; run again, it does only the rest."""
    import ray

    output = job["work"] / "resumed.parquet"
    command = [sys.executable, "-m", "deploy.cli", "batch", str(job["source"]), str(output), "--model",
               job["model"], "--max-tokens", "8", "--batch-size", "8", "--cpus-per-instance", "0.5",
               "--address", ray.get_runtime_context().gcs_address]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts_dir(output).glob("part-*.parquet"))) < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    parts = len(list(parts_dir(output).glob("part-*.parquet")))
    assert parts >= 2 and not output.exists()
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "done before" in result.stdout
    done_before = int(result.stdout.split("(")[1].split(" done before")[0])
    assert 0 < done_before < 200
    assert pq.read_table(output).equals(pq.read_table(job["output"]))


def test_bad_rows_get_an_error_and_the_job_finishes(job):
    rows = ["fine", "", "x" * 20000, None, "also fine"]
    source = job["work"] / "bad.jsonl"
    source.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    output = job["work"] / "bad.parquet"
    summary = run_batch(source, output, BatchConfig(model=job["model"], max_tokens=4, prompt_column="text"),
                        progress=False)
    out = pq.read_table(output).to_pylist()
    assert summary["errors"] == 3 and [r["text"] for r in out] == rows
    errors = [r["error"] for r in out]
    assert errors[0] is None and errors[4] is None and out[0]["num_output_tokens"] == 4
    assert "empty" in errors[1] and "ContextLengthError" in errors[2] and "text or a list of token ids" in errors[3]
    assert out[1]["completion"] is None and out[1]["completion_token_ids"] is None


def test_bad_jobs_are_refused_with_the_reason(job, tmp_path):
    result = subprocess.run([sys.executable, "-m", "deploy.cli", "batch", str(job["source"]), str(tmp_path / "o.parquet"),
                             "--model", job["model"], "--prompt-column", "question"], capture_output=True, text=True)
    assert result.returncode == 2 and "no column 'question'" in result.stderr and "prompt, id" in result.stderr
    with pytest.raises(FileNotFoundError):
        run_batch(tmp_path / "missing.parquet", tmp_path / "o.parquet", BatchConfig(model=job["model"]))
