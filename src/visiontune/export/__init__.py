"""Export a trained run: ONNX (fp32, fp16, INT8) and TorchScript, each checked against PyTorch.

`visiontune.export` is both this package and the API verb (`visiontune.export(run, precision="int8")`).
"""

from visiontune._verb_package import make_callable

make_callable(__name__, "export")
