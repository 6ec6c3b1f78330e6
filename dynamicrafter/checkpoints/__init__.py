"""Reading and writing model files: safe pickle, safetensors, metadata, official configs,
key inference, LoRA files, memory maps."""
