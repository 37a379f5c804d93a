"""Export a fitted field as an ONNX model, built with the `onnx` package's own helpers
(`onnx.helper`, checked by `onnx.checker`).

The graph is the network of `neurimg.fieldnet` (w0 folded in), in float32:

    inputs   xy      (N, 2)   coordinates as in `neurimg.coords` (x in [-1, 1] across the width)
             latent  (M, D)   M = N (one latent per point) or 1 (one for all); absent with an
                              image baked in, whose shifts are then part of the biases
    output   rgb     (N, 3)   unclipped colour, [0, 1] where the field is in range

    h = xy;  for each sine layer l:  h = Sin(h @ K_l + b_l [+ latent @ M_l]);  rgb = h @ K_out + b_out

The model's metadata (`custom_metadata_map` in onnxruntime) holds the stored images' names,
sizes and, without a baked image, their latents as JSON, so the model alone is enough to
render any stored image or a mix of two.
"""

from __future__ import annotations

import json

import numpy as np

from neurimg.errors import NeurimgError
from neurimg.fieldnet import FieldNet

OPSET = 17  # Sin, MatMul, Add: any runtime of the last years runs it
IR_VERSION = 8


def onnx_model(net: FieldNet, image: int | None = None, run_name: str = "") -> bytes:
    """The serialized ONNX model; `image` bakes that stored image's latent in."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:  # pragma: no cover - a dependency of the package
        raise NeurimgError("ONNX export needs the 'onnx' package (pip install onnx)") from None

    inits, nodes = [], []

    def const(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr, np.float32), name))
        return name

    inputs = [helper.make_tensor_value_info("xy", TensorProto.FLOAT, ["N", 2])]
    if image is None:
        inputs.append(helper.make_tensor_value_info("latent", TensorProto.FLOAT, ["M", net.latent_dim]))
        biases = net.biases
    else:
        biases = net.layer_biases(net.latents[image])
    h = "xy"
    for i, (k, b) in enumerate(zip(net.kernels, biases)):
        nodes.append(helper.make_node("MatMul", [h, const(f"kernel{i}", k)], [f"mm{i}"]))
        pre = f"pre{i}"
        nodes.append(helper.make_node("Add", [f"mm{i}", const(f"bias{i}", b)], [pre]))
        if image is None:
            nodes.append(helper.make_node("MatMul", ["latent", const(f"modulation{i}", net.modulations[i])], [f"shift{i}"]))
            nodes.append(helper.make_node("Add", [pre, f"shift{i}"], [f"mod{i}"]))
            pre = f"mod{i}"
        nodes.append(helper.make_node("Sin", [pre], [f"h{i}"]))
        h = f"h{i}"
    nodes.append(helper.make_node("MatMul", [h, const("out_kernel", net.out_kernel)], ["mm_out"]))
    nodes.append(helper.make_node("Add", ["mm_out", const("out_bias", net.out_bias)], ["rgb"]))
    outputs = [helper.make_tensor_value_info("rgb", TensorProto.FLOAT, ["N", 3])]

    graph = helper.make_graph(nodes, "neurimg_field", inputs, outputs, inits)
    model = helper.make_model(graph, producer_name="neurimg", opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    meta = {
        "neurimg.coords": "xy: pixel centres; x spans [-1, 1] across the width, y = (2v - H) / W grows downwards",
        "neurimg.images": json.dumps([{"name": n, "width": w, "height": h_} for n, (w, h_) in zip(net.names, net.sizes)]),
        "neurimg.run": run_name,
    }
    if image is None:
        meta["neurimg.latents"] = json.dumps({n: [float(v) for v in z] for n, z in zip(net.names, net.latents)})
    else:
        meta["neurimg.image"] = net.names[image]
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    return model.SerializeToString()
