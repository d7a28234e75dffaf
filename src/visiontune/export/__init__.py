"""Export a trained run: ONNX (fp32, fp16, INT8) and TorchScript, each checked against PyTorch."""
