"""For the GPU decoding tests: a small fixed-weight ONNX model (conv, ReLU, pooling, sigmoid
scores) that turns two preparations of one image into scores to compare (the GPU path's
against the CPU path's), and the real chest CR re-encoded as HTJ2K."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def scoring_model(path: Path, channels: int = 1, labels: int = 4, seed: int = 0) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    conv = rng.normal(0, 0.5, (8, channels, 3, 3)).astype(np.float32)
    dense = rng.normal(0, 1.0, (8, labels)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
         helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("GlobalAveragePool", ["r"], ["p"]),
         helper.make_node("Flatten", ["p"], ["f"]),
         helper.make_node("MatMul", ["f", "d"], ["m"]),
         helper.make_node("Sigmoid", ["m"], ["scores"])],
        "scoring",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", channels, None, None])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", labels])],
        [numpy_helper.from_array(conv, "w"), numpy_helper.from_array(dense, "d")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def scores(model: Path, tensors: list[np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    out: np.ndarray = session.run(None, {"x": np.stack(tensors).astype(np.float32)})[0]
    return out


def htj2k_copy(out: Path) -> Path:
    """pydicom-data's uncompressed chest CR as HTJ2K lossless (OpenJPH through imagecodecs):
    no HTJ2K file ships with pydicom-data."""
    import imagecodecs
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.encaps import encapsulate
    from pydicom.uid import HTJ2KLossless

    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    codestream = imagecodecs.htj2k_encode(ds.pixel_array)
    if not np.array_equal(imagecodecs.htj2k_decode(codestream), ds.pixel_array):
        raise AssertionError("OpenJPH's encoding is not lossless")
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless
    ds.save_as(out, enforce_file_format=True)
    return out
