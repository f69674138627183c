"""Engine backends: PyTorch (any host) and TensorRT / TensorRT-RTX."""
