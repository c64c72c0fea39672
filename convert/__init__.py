"""HF/PyTorch safetensors <-> Orbax conversion."""
