"""`epserve make-tiny --train`: what is trained is what is served (the training forward equals the
engine and transformers), the MTP module drafts what it was trained to, and the loss goes down."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cluster import LLM, SamplingParams
from cluster.engine.engine import EngineCore
from cluster.model.train import TRAINING_RECORD, corpus_text, load_trainable
from kernels import reference_kernels
from tests.reference import hf_logits

PROMPT = "def main(argv):\n    return "


@pytest.fixture(scope="module")
def trained(trained_checkpoint) -> Path:
    return trained_checkpoint


def test_loss_goes_down_and_the_record_says_how(trained):
    record = json.loads((trained / TRAINING_RECORD).read_text())
    assert record["steps"] >= 2
    assert record["loss"][1] < record["loss"][0] and record["mtp_loss"][1] < record["mtp_loss"][0]
    config = json.loads((trained / "config.json").read_text())
    assert config["mtp_num_hidden_layers"] == 1


def test_training_forward_is_the_served_model(trained):
    ids = LLM(trained, warm_up=False).engine.tokenize(PROMPT)
    with torch.no_grad(), reference_kernels():
        logits, _ = load_trainable(trained)(torch.tensor([ids]))
    served = LLM(trained, warm_up=False).score([ids])[0]
    assert (served - logits[0]).abs().max().item() <= 1e-4
    assert (hf_logits(str(trained), ids) - served).abs().max().item() <= 1e-4  # transformers loads it as is


def test_mtp_drafts_what_it_was_trained_to(trained):
    """The engine's first draft after a prompt is the argmax of the training forward's MTP logits
    at the prompt's last position (hidden there + the token sampled next)."""
    engine = EngineCore(trained, warm_up=False, speculative_config={"method": "mtp", "num_speculative_tokens": 1})
    seq = engine.add_request("r", PROMPT, SamplingParams(max_tokens=4, temperature=0.0))
    [out] = engine.step()  # the prefill: samples a token, then drafts the next
    drafts = engine.executor.runner.sequences[seq.seq_id].drafts
    ids = seq.prompt_ids + out.new_token_ids
    with torch.no_grad(), reference_kernels():
        _, mtp_logits = load_trainable(trained)(torch.tensor([ids]))
    assert drafts == [int(mtp_logits[0, len(seq.prompt_ids) - 1].argmax())]


def test_corpus_defaults_to_the_standard_library():
    text = corpus_text(None, max_mb=0.1)
    assert len(text) > 50_000 and "def " in text
    with pytest.raises(FileNotFoundError):
        corpus_text("/no/such/corpus", 1)


def test_a_trained_multimodal_checkpoint_keeps_its_vision_tower(tmp_path):
    """Training leaves the tower as it was and writes it under `model.visual.*`, as make-tiny does."""
    from safetensors.torch import load_file

    from cluster.model.tiny import TinySpec, make_tiny
    from cluster.model.train import TrainSpec, make_trained

    spec = TinySpec(seed=7, num_experts=8, top_k=2, hidden=64, multimodal=True)
    untrained = load_file(str(make_tiny(tmp_path / "untrained", spec) / "model.safetensors"))
    trained = make_trained(tmp_path / "trained", spec, TrainSpec(minutes=0.02, max_corpus_mb=0.25),  # tokenised quickly
                           log=lambda *_: None)
    tensors = load_file(str(trained / "model.safetensors"))
    vision = sorted(k for k in untrained if k.startswith("model.visual."))
    assert vision and sorted(k for k in tensors if "visual." in k) == vision
    assert all(torch.equal(tensors[k], untrained[k]) for k in vision)
