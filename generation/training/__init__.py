"""Training: the VLM (train_vlm), a hub VLM with LoRA, the box detector."""
