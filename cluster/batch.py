"""Offline batch inference on Ray Data: the rows of a Parquet (or JSONL) file in, the same rows with
their completions out, across a pool of model instances.

    run_batch("prompts.parquet", "out.parquet", BatchConfig(model=DIR, instances=2))
    epserve batch prompts.parquet out.parquet --model DIR --instances 2

The driver reads the input (pyarrow) and numbers its rows; Ray Data streams the rows not done yet
through `map_batches` to an actor pool of `instances` model instances (`EngineActor`: one `AsyncLLM`
each, in process or with its own attention and expert workers on Ray), `batch_size` rows per call,
two calls in flight per actor so its engine never drains between batches.
Each finished batch is written at once as a part file beside the output (`OUTPUT.parts/`), so a job
that stops part-way loses at most the batches in flight: run again, it reads the output and the
parts, does only the missing rows, then writes OUTPUT (every input column plus completion,
completion_token_ids, finish_reason, num_prompt_tokens, num_output_tokens, error; rows in input
order) and removes the parts. A row the engine refuses (empty, past the context, not text) gets
its `error` and empty results; no row is dropped. Row i samples with seed + i, so results do not
depend on how rows were batched or which instance ran them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from .config import ConfigError

ROW = "__epserve_row"  # the input row number, carried through the pipeline and the part files
OUTPUT_SCHEMA = pa.schema([
    ("completion", pa.string()), ("completion_token_ids", pa.list_(pa.int64())), ("finish_reason", pa.string()),
    ("num_prompt_tokens", pa.int64()), ("num_output_tokens", pa.int64()), ("error", pa.string()),
])


@dataclass(frozen=True)
class BatchConfig:
    model: str
    prompt_column: str = "prompt"
    max_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0  # row i samples with seed + i
    instances: int = 1  # model instances in the actor pool
    expert_workers: int = 1  # per instance (> 1: its own Ray actors)
    attention_workers: int = 1
    batch_size: int = 128  # rows per map_batches call and per part file
    max_num_seqs: int = 32  # sequences each instance runs at once
    cpus_per_instance: float = 1.0  # Ray CPUs each pool actor reserves (its workers reserve their own)
    dtype: str = "auto"  # the checkpoint's own (cluster.config.resolve_dtype)
    address: str | None = None  # join this Ray cluster ("auto": the running one); None: embedded

    def __post_init__(self) -> None:
        for name in ("max_tokens", "instances", "expert_workers", "attention_workers", "batch_size", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not (Path(self.model) / "config.json").is_file():
            raise ConfigError(f"model: no config.json in {self.model!r}")


class EngineActor:
    """One model instance in the Ray Data actor pool: a batch of rows in, their completions out.
    Async, with up to CALLS_PER_ACTOR batches in flight on one engine (AsyncLLM), so continuous
    batching carries on across batch boundaries instead of draining the engine at each one."""

    CALLS_PER_ACTOR = 2

    def __init__(self, config: BatchConfig) -> None:
        from .async_llm import AsyncLLM
        from .config import ClusterConfig
        from .engine.scheduler import SchedulerConfig

        self.config = config
        # no warm-up: it saves a server's first requests from one-off costs, which a job pays once anyway
        self.engine = AsyncLLM(
            config.model, dtype=config.dtype, warm_up=False,
            cluster=ClusterConfig(expert_workers=config.expert_workers, attention_workers=config.attention_workers),
            scheduler=SchedulerConfig(max_num_seqs=config.max_num_seqs,
                                      max_waiting=self.CALLS_PER_ACTOR * config.batch_size))

    async def _complete(self, prompt, params):
        """(text, token ids, finish reason, prompt tokens) of one row, or the exception that refused it."""
        try:
            out = await self.engine.complete(prompt, params)
        except Exception as e:  # noqa: BLE001 - the row's error, not the job's
            return e
        return out.new_text, out.new_token_ids, out.finish_reason, out.num_prompt_tokens

    async def __call__(self, batch: pa.Table) -> pa.Table:
        from .engine.sampling import SamplingParams

        c = self.config
        prompts, rows = batch.column(c.prompt_column).to_pylist(), batch.column(ROW).to_pylist()

        async def row(prompt, number):
            if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt))):
                return ValueError(f"{c.prompt_column!r} must be text or a list of token ids, got {type(prompt).__name__}")
            return await self._complete(prompt, SamplingParams(max_tokens=c.max_tokens, temperature=c.temperature,
                                                               seed=c.seed + number))

        results = await asyncio.gather(*(row(p, n) for p, n in zip(prompts, rows)))
        columns = {name: [] for name in OUTPUT_SCHEMA.names}
        for out in results:
            failed = isinstance(out, Exception)
            text, tokens, reason, prompt_tokens = (None,) * 4 if failed else out
            columns["completion"].append(text)
            columns["completion_token_ids"].append(tokens)
            columns["finish_reason"].append(reason)
            columns["num_prompt_tokens"].append(prompt_tokens)
            columns["num_output_tokens"].append(None if failed else len(tokens))
            columns["error"].append(f"{type(out).__name__}: {out}" if failed else None)
        for field in OUTPUT_SCHEMA:
            batch = batch.append_column(field, pa.array(columns[field.name], type=field.type))
        return batch

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def read_rows(path: str | Path) -> pa.Table:
    """Parquet, or JSON lines (.jsonl / .json), by extension."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input {path} does not exist")
    if path.suffix in (".jsonl", ".json", ".ndjson"):
        return pa_json.read_json(path)
    if path.suffix in (".parquet", ".pq"):
        return pq.read_table(path)
    raise ValueError(f"input {path}: expected .parquet or .jsonl")


def parts_dir(output: str | Path) -> Path:
    return Path(f"{output}.parts")


def _done(output: Path) -> pa.Table | None:
    """Rows finished by earlier runs: those of an existing OUTPUT (input rows 0..n-1) and the part
    files of an interrupted run, with their row numbers."""
    tables = []
    if output.is_file():
        done = pq.read_table(output)
        tables.append(done.append_column(ROW, pa.array(range(done.num_rows), type=pa.int64())))
    parts = parts_dir(output)
    if parts.is_dir():
        tables += [pq.read_table(p) for p in sorted(parts.glob("part-*.parquet"))]
    if not tables:
        return None
    return _dedupe(pa.concat_tables(tables, promote_options="permissive"))


def _dedupe(table: pa.Table) -> pa.Table:
    """One result per row (a batch Ray Data retried may have been written twice)."""
    seen, keep = set(), []
    for i, row in enumerate(table.column(ROW).to_pylist()):
        if row not in seen:
            seen.add(row)
            keep.append(i)
    return table.take(keep) if len(keep) < table.num_rows else table


def _write_atomically(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _progress(done: int, total: int, start: float, tokens: int, out=sys.stderr) -> None:
    elapsed = max(time.monotonic() - start, 1e-9)
    fraction = done / total if total else 1.0
    bar = "#" * int(30 * fraction) + "-" * (30 - int(30 * fraction))
    out.write(f"\rbatch [{bar}] {done}/{total} rows, {done / elapsed:,.1f} rows/s, {tokens / elapsed:,.0f} tok/s")
    out.flush()


def run_batch(input_path: str | Path, output_path: str | Path, config: BatchConfig, progress: bool = True) -> dict:
    """Runs the job (or the part of it not done yet); returns counts and throughput."""
    import ray
    import ray.data

    output = Path(output_path)
    table = read_rows(input_path)
    if config.prompt_column not in table.column_names:
        raise ValueError(f"input {input_path} has no column {config.prompt_column!r} "
                         f"(columns: {', '.join(table.column_names)}); use --prompt-column")
    table = table.append_column(ROW, pa.array(range(table.num_rows), type=pa.int64()))
    done = _done(output)
    todo = table if done is None else table.filter(pc.invert(pc.is_in(table.column(ROW), done.column(ROW))))
    summary = {"rows": table.num_rows, "already_done": table.num_rows - todo.num_rows, "processed": 0,
               "errors": 0, "output_tokens": 0, "seconds": 0.0}
    start = time.monotonic()
    if todo.num_rows:
        if not ray.is_initialized():
            ray.init(address=config.address, logging_level=logging.ERROR, log_to_driver=False)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # ours says rows/s and tokens/s
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        parts = parts_dir(output)
        parts.mkdir(parents=True, exist_ok=True)
        # one block per batch, cut here: a repartition would need CPUs the actor pool may hold
        blocks = [todo.slice(i, config.batch_size) for i in range(0, todo.num_rows, config.batch_size)]
        ds = ray.data.from_arrow(blocks)
        results = ds.map_batches(EngineActor, fn_constructor_kwargs={"config": config}, batch_size=config.batch_size,
                                 batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(
                                     size=config.instances, max_concurrent_calls_per_actor=EngineActor.CALLS_PER_ACTOR,
                                     max_tasks_in_flight_per_actor=EngineActor.CALLS_PER_ACTOR),
                                 num_cpus=config.cpus_per_instance, zero_copy_batch=True)
        for batch in results.iter_batches(batch_format="pyarrow", batch_size=None):
            first = batch.column(ROW)[0].as_py()
            _write_atomically(batch, parts / f"part-{first:09d}.parquet")
            summary["processed"] += batch.num_rows
            summary["errors"] += batch.num_rows - batch.column("error").null_count
            summary["output_tokens"] += pc.sum(batch.column("num_output_tokens")).as_py() or 0
            if progress:
                _progress(summary["processed"], todo.num_rows, start, summary["output_tokens"])
        if progress:
            sys.stderr.write("\n")
    summary["seconds"] = time.monotonic() - start
    finished = _done(output)
    if finished is None or finished.num_rows < table.num_rows:
        raise RuntimeError(f"{table.num_rows - (finished.num_rows if finished else 0)} rows have no result")
    ordered = finished.sort_by(ROW).slice(0, table.num_rows)
    if todo.num_rows or not output.is_file():
        _write_atomically(ordered.drop_columns([ROW]).cast(_output_schema(table.drop_columns([ROW]))), output)
    shutil.rmtree(parts_dir(output), ignore_errors=True)
    summary["config"] = asdict(config)
    return summary


def _output_schema(inputs: pa.Table) -> pa.Schema:
    return pa.schema(list(inputs.schema) + list(OUTPUT_SCHEMA))
