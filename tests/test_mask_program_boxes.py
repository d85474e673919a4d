"""The mask program on boxes (``run_mask_program``, ``dilate``) against its whole-image definition
(``run_instructions``, ``tile_index``): equal bit for bit, on random masks, shapes, instruction
chains, dilations, strides, tile sizes, and edits touching the border or empty."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sigec.core import mask_program
from sigec.core.mask_program import dilate, run_instructions, run_mask_program, tile_index


def _random_mask(rng: np.random.Generator, batch: int, h: int, w: int) -> np.ndarray:
    """Empty, a few boxes (some on the border), scattered pixels, or dense noise."""
    kind = rng.integers(4)
    mask = np.zeros((batch, h, w), bool)
    if kind == 1:
        for _ in range(int(rng.integers(1, 4))):
            b = int(rng.integers(batch))
            y0, x0 = int(rng.integers(h)), int(rng.integers(w))
            mask[b, y0:y0 + int(rng.integers(1, 6)), x0:x0 + int(rng.integers(1, 6))] = True
        if rng.random() < 0.5:  # a corner pixel: boxes reaching past the border
            mask[0, -1 if rng.random() < 0.5 else 0, -1 if rng.random() < 0.5 else 0] = True
    elif kind == 2:
        mask = rng.random((batch, h, w)) < 0.02
    elif kind == 3:
        mask = rng.random((batch, h, w)) < 0.4
    return mask


def _random_instruction(rng: np.random.Generator, sizes: dict[str, tuple[int, int]], out: str) -> dict:
    """One instruction over the named masks of ``sizes``, with random geometry (sizes from the
    operation's own arithmetic or arbitrary, both valid)."""
    src = str(rng.choice(sorted(sizes)))
    h, w = sizes[src]
    op = str(rng.choice(["window", "transpose_window", "upsample", "dilate", "resample", "union", "empty"]))
    pick = lambda lo, hi: int(rng.integers(lo, hi + 1))  # noqa: E731
    if op == "window":
        kernel, stride, dilation = [pick(1, 5), pick(1, 5)], [pick(1, 3), pick(1, 3)], [pick(1, 2), pick(1, 2)]
        pads = [pick(0, kernel[0] - 1), pick(0, kernel[1] - 1), pick(0, kernel[0] - 1), pick(0, kernel[1] - 1)]
        size = [max((n + pads[a] + pads[a + 2] - dilation[a] * (kernel[a] - 1) - 1) // stride[a] + 1, 1)
                for a, n in enumerate((h, w))]
        if rng.random() < 0.2:
            size = [pick(1, h + 2), pick(1, w + 2)]
        return {"op": op, "src": src, "out": out, "kernel": kernel, "stride": stride, "pads": pads,
                "dilation": dilation, "size": size}
    if op == "transpose_window":
        kernel, stride = [pick(1, 4), pick(1, 4)], [pick(1, 3), pick(1, 3)]
        pads = [pick(0, kernel[0] - 1), pick(0, kernel[1] - 1), pick(0, kernel[0] - 1), pick(0, kernel[1] - 1)]
        size = [max((n - 1) * stride[a] - pads[a] - pads[a + 2] + kernel[a], 1) for a, n in enumerate((h, w))]
        if rng.random() < 0.2:
            size = [pick(1, 2 * h + 3), pick(1, 2 * w + 3)]
        return {"op": op, "src": src, "out": out, "kernel": kernel, "stride": stride, "pads": pads, "size": size}
    if op == "upsample":
        factor = [pick(1, 3), pick(1, 3)]
        size = [h * factor[0], w * factor[1]] if rng.random() < 0.7 else [pick(1, 3 * h + 2), pick(1, 3 * w + 2)]
        return {"op": op, "src": src, "out": out, "factor": factor, "size": size}
    if op == "dilate":
        return {"op": op, "src": src, "out": out, "radius": pick(0, 3)}
    if op == "resample":
        choices = [(h, w), (max(h // 2, 1), max(w // 4, 1)), (2 * h, 3 * w), (pick(1, 2 * h + 3), pick(1, 2 * w + 3))]
        return {"op": op, "src": src, "out": out, "size": list(choices[int(rng.integers(len(choices)))])}
    if op == "union":
        same = [name for name, size in sizes.items() if size == (h, w)]
        srcs = [str(s) for s in rng.choice(same, size=pick(1, 3))]
        return {"op": op, "srcs": srcs, "out": out}
    return {"op": "empty", "out": out, "size": [pick(1, 30), pick(1, 30)]}


def _size_of(ins: dict, sizes: dict[str, tuple[int, int]]) -> tuple[int, int]:
    if ins["op"] == "upsample":  # cut to the size, never grown
        h, w = sizes[ins["src"]]
        return min(h * ins["factor"][0], ins["size"][0]), min(w * ins["factor"][1], ins["size"][1])
    if ins["op"] in ("dilate", "union"):
        return sizes[ins.get("src") or ins["srcs"][0]]
    return tuple(ins["size"])


def _assert_same_index(got: mask_program.TileIndex, expected: mask_program.TileIndex, what: str) -> None:
    assert got.coords.dtype == expected.coords.dtype == np.int64, what
    assert got.grid.dtype == expected.grid.dtype == np.int64, what
    np.testing.assert_array_equal(got.coords, expected.coords, err_msg=what)
    np.testing.assert_array_equal(got.grid, expected.grid, err_msg=what)


@given(st.integers(0, 2 ** 32 - 1))
def test_programs_on_boxes_equal_the_whole_image_definition(seed):
    rng = np.random.default_rng(seed)
    batch, h, w = int(rng.integers(1, 3)), int(rng.integers(1, 41)), int(rng.integers(1, 41))
    pixel = _random_mask(rng, batch, h, w)
    sizes = {"input": (h, w)}
    instructions = []
    for k in range(int(rng.integers(1, 9))):
        ins = _random_instruction(rng, sizes, f"m{k}")
        instructions.append(ins)
        sizes[ins["out"]] = _size_of(ins, sizes)
    expected = run_instructions(instructions, pixel)
    boxes = mask_program._run_cropped(instructions, pixel)
    resolutions = []
    for name in sizes:
        whole = boxes[name].full()
        assert whole.shape == expected[name].shape and whole.dtype == bool, name
        np.testing.assert_array_equal(whole, expected[name], err_msg=f"{name} of {instructions}")
        resolutions.append({"name": f"r_{name}", "mask": name, "tile": int(rng.integers(1, 9)),
                            "shared_batch": bool(rng.random() < 0.3)})
    got = run_mask_program({"instructions": instructions}, resolutions, pixel)
    for res in resolutions:
        _assert_same_index(got[res["name"]], tile_index(expected[res["mask"]], res["tile"], res["shared_batch"]),
                           f"{res} of {instructions}")


@given(st.integers(0, 2 ** 32 - 1))
def test_dilate_on_boxes_equals_the_whole_image_dilation(seed):
    rng = np.random.default_rng(seed)
    batch, h, w = int(rng.integers(1, 3)), int(rng.integers(1, 50)), int(rng.integers(1, 50))
    pixel = _random_mask(rng, batch, h, w)
    radius = int(rng.integers(0, 5))
    got = dilate(pixel, radius)
    assert got.shape == pixel.shape and got.dtype == bool
    np.testing.assert_array_equal(got, mask_program._dilate_full(pixel, radius))


@pytest.mark.parametrize("where", ["centre", "corner", "edge", "two", "empty", "all"])
def test_a_detector_program_on_a_large_image(where):
    """The shape of a zoo detector's program (resampling to five scales, each dilated, and the
    dilated input) on 640 x 640 edits, as ``Engine.run`` runs it (dilated pixel mask first)."""
    instructions = []
    resolutions = []
    for k, n in enumerate((320, 160, 80, 40, 20)):
        instructions += [{"op": "resample", "out": f"s{k}", "src": "input", "size": [n, n]},
                         {"op": "dilate", "out": f"d{k}", "src": f"s{k}", "radius": 1}]
        resolutions.append({"name": f"r{n}", "mask": f"d{k}", "tile": 4})
    instructions.append({"op": "dilate", "out": "full", "src": "input", "radius": 1})
    resolutions.append({"name": "r640", "mask": "full", "tile": 4, "shared_batch": True})
    program = {"instructions": instructions, "dilation": 1}
    mask = np.zeros((2, 640, 640), bool)
    if where == "centre":
        mask[0, 300:329, 301:330] = True
    elif where == "corner":
        mask[1, 630:, :7] = True
    elif where == "edge":
        mask[:, 0:3, 200:260] = True
    elif where == "two":
        mask[0, 5:9, 600:633] = True
        mask[1, 400:401, 17:18] = True
    elif where == "all":
        mask[:] = True
    pixel = mask_program.dilate_for_run(program, mask)
    np.testing.assert_array_equal(pixel, mask_program._dilate_full(mask, 1))
    expected = run_instructions(instructions, pixel)
    got = run_mask_program(program, resolutions, pixel)
    for res in resolutions:
        _assert_same_index(got[res["name"]], tile_index(expected[res["mask"]], res["tile"], bool(res.get("shared_batch"))),
                           res["name"])
