"""The model and its weights: the assembled Qwen3.5-MoE text model, checkpoint reading (safetensors,
HF names, only the slices a worker needs), building a worker's model or expert shard, and the
tiny-checkpoint writer behind `epserve make-tiny`."""
