"""Test-environment shim: let PyPI's CUDA-built torchvision import beside CPU torch.

torchvision's ``_meta_registrations.py`` registers fake kernels for operators
that its C extension defines.  When that extension cannot load (CUDA build of
torchvision, CPU build of torch) the registration fails with
``operator torchvision::nms does not exist`` and ``import torchvision`` fails,
which breaks ``import comfy``.  This script inserts, once, a guarded block into
the venv's copy of that file which defines the three operator schemas when the
extension is missing.  Nothing calls those operators in our tests.

Run by scripts/setup_comfyui_env.sh with the venv's interpreter; idempotent.
"""
import importlib.util
import pathlib

MARKER = "# klora-test-env-shim"
BLOCK = f'''{MARKER}
if not torchvision.extension._has_ops():
    _klora_shim_lib = torch.library.Library("torchvision", "DEF")
    _klora_shim_lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _klora_shim_lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _klora_shim_lib.define(
        "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor"
    )
'''
ANCHOR = "import torchvision.extension  # noqa: F401\n"


def main() -> None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        raise SystemExit("torchvision is not installed in this interpreter")
    path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
    text = path.read_text()
    if MARKER in text:
        return
    if ANCHOR not in text:
        raise SystemExit(f"{path}: unexpected layout (no {ANCHOR.strip()!r}); update scripts/torchvision_shim.py")
    path.write_text(text.replace(ANCHOR, ANCHOR + BLOCK, 1))


if __name__ == "__main__":
    main()
