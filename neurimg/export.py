"""Export a fitted field as an ONNX model, built with the `onnx` package's own helpers
(`onnx.helper`, checked by `onnx.checker`).

The graph is the network of `neurimg.fieldnet` (w0 folded in), in float32:

    inputs   xy      (N, 2)   coordinates as in `neurimg.coords` (x in [-1, 1] across the width)
             latent  (M, D)   M = N (one latent per point) or 1 (one for all); absent with an
                              image baked in, whose shifts are then part of the biases
    output   rgb     (N, 3)   unclipped colour, [0, 1] where the field is in range

    h = xy;  for each sine layer l:  h = Sin(h @ K_l + b_l [+ latent @ M_l]);  rgb = h @ K_out + b_out

A run with a latent grid (`neurimg.siren`, "Latent grid") adds the first layer's per-point shift:
the latent input is then the image's whole row (D latent values, then its rows x cols x C grid),
and the graph interpolates the grid at each point (four Gathers, bilinear weights; with an
image baked in, it interpolates the node tables of `FieldNet.node_shifts` instead).

The model's metadata (`custom_metadata_map` in onnxruntime) holds the stored images' names,
sizes and, without a baked image, their latents as JSON, so the model alone is enough to
render any stored image or a mix of two; `neurimg.supersample` (m) says how `neurimg render`
samples it: each output pixel the mean of the field at its m x m sub-squares' centres (a run
fitted to pixels as area averages, m > 1), clipped after the mean.
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

    def iconst(name: str, arr) -> str:
        inits.append(numpy_helper.from_array(np.asarray(arr, np.int64), name))
        return name

    def node(op: str, ins: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op, ins, [out], **attrs))
        return out

    row_dim = net.latents.shape[1]
    inputs = [helper.make_tensor_value_info("xy", TensorProto.FLOAT, ["N", 2])]
    latent = None
    if image is None:
        inputs.append(helper.make_tensor_value_info("latent", TensorProto.FLOAT, ["M", row_dim]))
        biases = net.biases
        latent = "latent"
        if net.grid is not None:
            latent = node("Slice", ["latent", iconst("zero1", [0]), iconst("dim1", [net.latent_dim]), iconst("axis1", [1])], "latent_z")
    else:
        biases = net.layer_biases(net.latents[image])
    corners = _grid_corners(net, node, const, iconst) if net.grid is not None else None
    if corners is not None and image is None:  # the points' grid features (N, C) from their latent rows
        cols, rows, c = net.grid
        gflat = node("Reshape", [node("Slice", ["latent", iconst("dim1b", [net.latent_dim]), iconst("row1", [row_dim]), iconst("axis1b", [1])], "latent_g"),
                                 iconst("flat_c", [-1, c])], "grid_flat")  # (M rows x cols, C)
        n = node("Gather", [node("Shape", ["xy"], "xy_shape"), iconst("i0", 0)], "n_points", axis=0)
        m = node("Gather", [node("Shape", ["latent"], "lat_shape"), iconst("i0b", 0)], "n_latents", axis=0)
        offset = node("Mul", [node("Mod", [node("Range", [iconst("r0", 0), n, iconst("r1", 1)], "point_index"), m], "point_row"),
                              iconst("cells", rows * cols)], "row_offset")  # M = 1: every point row 0
        feat = None
        for q, (idx, wgt) in enumerate(corners):
            g = node("Mul", [node("Gather", [gflat, node("Add", [offset, idx], f"gidx{q}")], f"gval{q}", axis=0), wgt], f"gw{q}")
            feat = g if feat is None else node("Add", [feat, g], f"gsum{q}")
    h = "xy"
    for i, (k, b) in enumerate(zip(net.kernels, biases)):
        nodes.append(helper.make_node("MatMul", [h, const(f"kernel{i}", k)], [f"mm{i}"]))
        pre = f"pre{i}"
        nodes.append(helper.make_node("Add", [f"mm{i}", const(f"bias{i}", b)], [pre]))
        if image is None:
            nodes.append(helper.make_node("MatMul", [latent, const(f"modulation{i}", net.modulations[i])], [f"shift{i}"]))
            nodes.append(helper.make_node("Add", [pre, f"shift{i}"], [f"mod{i}"]))
            pre = f"mod{i}"
        if corners is not None and i == 0:
            if image is None:
                point = node("MatMul", [feat, const("grid_modulation", net.grid_modulation)], f"point{i}")
            else:
                cols, rows, _ = net.grid
                table = const(f"node_shifts{i}", net.node_shifts(net.latents[image]).reshape(rows * cols, -1))
                point = None
                for q, (idx, wgt) in enumerate(corners):
                    g = node("Mul", [node("Gather", [table, idx], f"t{i}_{q}", axis=0), wgt], f"tw{i}_{q}")
                    point = g if point is None else node("Add", [point, g], f"tsum{i}_{q}")
            pre = node("Add", [pre, point], f"gmod{i}")
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
        # a run fitted as areas: render's pixel is the mean over m x m points, its sub-squares' centres, clipped after
        "neurimg.supersample": str(int(net.supersample)),
        "neurimg.images": json.dumps([{"name": n, "width": w, "height": h_} for n, (w, h_) in zip(net.names, net.sizes)]),
        "neurimg.run": run_name,
    }
    if net.grid is not None:
        meta["neurimg.latent_layout"] = json.dumps({"latent_dim": net.latent_dim, "grid": {"cols": net.grid[0], "rows": net.grid[1], "channels": net.grid[2]}})
    if image is None:
        meta["neurimg.latents"] = json.dumps({n: [float(v) for v in z] for n, z in zip(net.names, net.latents)})
    else:
        meta["neurimg.image"] = net.names[image]
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _grid_corners(net: FieldNet, node, const, iconst) -> list[tuple[str, str]]:
    """Nodes that find each point's grid cell (`siren.grid_cell`): for the four corners, the
    node index into the rows x cols table (N,) int64 and the bilinear weight (N, 1)."""
    cols, rows, _ = net.grid
    d = 2.0 / (cols - 1)
    x = node("Gather", ["xy", iconst("c0", 0)], "gx", axis=1)
    y = node("Gather", ["xy", iconst("c1", 1)], "gy", axis=1)
    f = lambda name, v: const(name, np.float32(v))  # noqa: E731
    u = node("Clip", [node("Div", [node("Add", [x, f("one", 1.0)], "gx1"), f("d", d)], "gu0"), f("zero", 0.0), f("umax", cols - 1)], "gu")
    v = node("Clip", [node("Add", [node("Div", [y, f("d2", d)], "gv1"), f("vmid", (rows - 1) / 2.0)], "gv0"), f("zero2", 0.0), f("vmax", rows - 1)], "gv")
    i0 = node("Min", [node("Floor", [u], "gfu"), f("imax", cols - 2)], "gi0")
    j0 = node("Min", [node("Floor", [v], "gfv"), f("jmax", rows - 2)], "gj0")
    fu = node("Unsqueeze", [node("Sub", [u, i0], "gfu1"), iconst("ax1", [1])], "gfrac_u")
    fv = node("Unsqueeze", [node("Sub", [v, j0], "gfv1"), iconst("ax1b", [1])], "gfrac_v")
    base = node("Cast", [node("Add", [node("Mul", [j0, f("cols", cols)], "gjc"), i0], "gbasef")], "gbase", to=7)  # int64
    one_u = node("Sub", [f("one_b", 1.0), fu], "g1u")
    one_v = node("Sub", [f("one_c", 1.0), fv], "g1v")
    out = []
    for q, (step, a, b) in enumerate(((0, one_u, one_v), (1, fu, one_v), (cols, one_u, fv), (cols + 1, fu, fv))):
        idx = base if step == 0 else node("Add", [base, iconst(f"gstep{q}", step)], f"gidx_c{q}")
        out.append((idx, node("Mul", [a, b], f"gweight{q}")))
    return out
