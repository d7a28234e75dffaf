"""Export a trained run: ONNX (fp32, fp16, INT8), TorchScript, OpenVINO and TFLite, each checked against PyTorch."""
