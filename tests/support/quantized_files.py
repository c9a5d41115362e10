"""Quantized copies of a diffusion model's weights, written the way users get them, for tests and the benchmark.

    write_gguf(sd, path, "Q8_0")            GGUF file (Q8_0, Q4_0 with the gguf package's quantizer; Q4_K with
                                            quantize_q4_k below): {name: GGML type written}
    gguf_dequantized(path)                  {name: float32 tensor} read back with the gguf package's numpy
                                            dequantizer (independent of ComfyUI-GGUF's torch dequantizer)
    write_fp8(sd, path, torch.float8_e5m2)  safetensors with the 2-D/4-D weights stored as fp8
    write_scaled_fp8(sd, path)              ComfyUI's "scaled fp8" layout (see write_scaled_fp8)

``sd`` is a ComfyUI ``ldm`` state dict without prefix, such as
``klora_core.cli.demo_models.make_unet_state_dict()`` (an SD1.5-detectable
UNet), so ComfyUI's stock loaders (UNETLoader, ComfyUI-GGUF's UnetLoaderGGUF)
detect the model from the file.

GGUF layout choices (as ComfyUI-GGUF's converter does): a 2-D weight whose
rows split into whole blocks (32 values for Q8_0/Q4_0, 256 for Q4_K) is
quantized, every other tensor is written as ``rest`` (F32 or F16).  The
PyPI ``gguf`` writer has no Q4_K quantizer (``gguf.quants.quantize`` raises
NotImplementedError for it), so :func:`quantize_q4_k` encodes the ggml
``block_q4_K`` layout directly (simple min/max scales, not llama.cpp's
search; decoding is what matters here).
"""
from __future__ import annotations

import numpy as np
import torch

#: ``block_q4_K``: fp16 d, fp16 dmin, 12 bytes of packed 6-bit scales/mins, 128 bytes of 4-bit values.
Q4_K_BLOCK, Q4_K_BYTES = 256, 144
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """Encode float32 ``x`` [rows, cols] (cols % 256 == 0) as Q4_K bytes [rows, cols / 256 * 144].

    Each 256-value super-block has 8 sub-blocks of 32 values, value = d * sc_j * q - dmin * m_j with
    q in 0..15 and 6-bit sc_j, m_j (ggml ``dequantize_row_q4_K``).
    """
    rows, cols = x.shape
    blocks = x.astype(np.float32).reshape(-1, 8, 32)
    n = blocks.shape[0]
    low = np.minimum(blocks.min(axis=2), 0.0)                      # [n, 8], <= 0
    step_wanted = (blocks.max(axis=2) - low) / 15.0
    d = (step_wanted.max(axis=1) / 63.0).astype(np.float16)        # [n]
    dmin = ((-low).max(axis=1) / 63.0).astype(np.float16)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32 > 0, np.ceil(step_wanted / d32), 0).clip(0, 63).astype(np.uint8)
        mn = np.where(dmin32 > 0, np.rint(-low / dmin32), 0).clip(0, 63).astype(np.uint8)
        step = (d32 * sc)[..., None]
        q = np.where(step > 0, np.rint((blocks + (dmin32 * mn)[..., None]) / step), 0).clip(0, 15).astype(np.uint8)
    scales = np.empty((n, 12), np.uint8)
    scales[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = mn[:, 0:4] | ((mn[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:8] & 0xF) | ((mn[:, 4:8] & 0xF) << 4)
    qs = (q[:, 0::2, :] | (q[:, 1::2, :] << 4)).reshape(n, 128)  # 64 values per 32 bytes: low, then high nibbles
    packed = np.concatenate([d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2), scales, qs], axis=1)
    return packed.reshape(rows, cols // Q4_K_BLOCK * Q4_K_BYTES)


def write_gguf(sd: dict, path, qtype: str, rest: str = "F32", arch: str = "sd1") -> dict:
    """Write ``sd`` as a GGUF file with quantization ``qtype`` ("Q8_0", "Q4_0", "Q4_K"); returns {name: type}."""
    import gguf

    kind = gguf.GGMLQuantizationType[qtype]
    block = gguf.GGML_QUANT_SIZES[kind][0]
    writer = gguf.GGUFWriter(str(path), arch=arch)
    written = {}
    for name in sorted(sd):
        values = sd[name].detach().to(torch.float32).numpy()
        if values.ndim == 2 and values.shape[1] % block == 0:
            data = quantize_q4_k(values) if qtype == "Q4_K" else gguf.quants.quantize(values, kind)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=kind)
            written[name] = qtype
        else:
            writer.add_tensor(name, values.astype(np.float16 if rest == "F16" else np.float32))
            written[name] = rest
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def gguf_dequantized(path) -> dict:
    """``{name: float32 tensor}`` of a GGUF file, in logical shape, via the gguf package's numpy dequantizer."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for tensor in reader.tensors:
        shape = tuple(int(v) for v in reversed(tensor.shape))
        values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
        out[tensor.name] = torch.from_numpy(np.asarray(values, dtype=np.float32).reshape(shape).copy())
    return out


def write_fp8(sd: dict, path, dtype: torch.dtype) -> None:
    """``sd`` with every weight of 2 or more dims stored as ``dtype`` (as fp8 checkpoints ship), the rest fp16."""
    from safetensors.torch import save_file

    save_file({k: v.to(dtype if v.ndim >= 2 else torch.float16).contiguous() for k, v in sd.items()}, str(path))


def write_scaled_fp8(sd: dict, path, dtype: torch.dtype = torch.float8_e4m3fn) -> dict:
    """ComfyUI's "scaled fp8" file: every 2-D (Linear) weight stored as ``w / s`` in fp8 with ``<layer>.scale_weight``
    = s = max|w| / fp8 max (float32, 0-d), plus the marker tensor ``scaled_fp8`` (empty, of the fp8 dtype).

    ComfyUI 0.3.75 reads it with ``comfy.ops.scaled_fp8_ops``; 0.8.0 converts it to per-layer quantization
    metadata (``comfy.utils.convert_old_quants``).  Returns ``{weight name: scale}``.
    """
    from safetensors.torch import save_file

    out, scales = {"scaled_fp8": torch.empty(0, dtype=dtype)}, {}
    for name, value in sd.items():
        if value.ndim == 2 and name.endswith(".weight"):
            w = value.to(torch.float32)
            scale = float(w.abs().max()) / FP8_MAX[dtype]
            out[name] = (w / scale).to(dtype).contiguous()
            out[name[: -len("weight")] + "scale_weight"] = torch.tensor(scale, dtype=torch.float32)
            scales[name] = scale
        else:
            out[name] = value.contiguous()
    save_file(out, str(path))
    return scales
