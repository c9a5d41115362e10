"""Seeded demo model files that ComfyUI's stock loaders detect, written without ComfyUI.

``python -m klora_core run`` (and the server tests) need a diffusion model, a
text encoder, a VAE and a subject/style LoRA pair that a real ComfyUI loads
with its ordinary nodes, without downloading anything.  This module writes
them from a seed with torch + safetensors only (no ComfyUI import):

- **UNet** (``UNETLoader``, detected as SD1.5 by
  ``comfy.model_detection.detect_unet_config`` +
  ``comfy.supported_models.SD15``, which only looks at model_channels 320,
  context_dim 768, no ADM, conv proj_in): one level (channel_mult [1]), one
  res block, a transformer after the input res block and after each of the
  two output res blocks (transformer_depth [1], transformer_depth_output
  [1, 1]) and no middle block (detected as transformer_depth_middle -2).
  18.7 M parameters, float16, 36 MiB.  ComfyUI's own ``ldm`` key names.
- **Text encoder** (``CLIPLoader``, type ``stable_diffusion``): CLIP-L.
  ``comfy.sd.load_text_encoder_state_dicts`` builds CLIP-L from the fixed
  ``comfy/sd1_clip_config.json`` (12 layers, width 768, vocabulary 49408)
  whatever the file holds, and leaves weights a file lacks uninitialised, so
  the smallest deterministic file is a full CLIP-L: 123 M parameters,
  float16, 235 MiB.  It is written once into the cache folder and reused.
- **VAE** (``VAELoader``): a TAESD-layout autoencoder
  (``taesd_encoder.*`` / ``taesd_decoder.*``); ``comfy.sd.VAE`` recognises
  ``taesd_decoder.1.weight`` and reads the latent channels from its shape.
  2.4 M parameters, 4.7 MiB.  ``VAEDecode`` + ``SaveImage`` work with it.
- **LoRAs**: kohya/sd-scripts names for SD1.5
  (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``,
  ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``) on the 24
  attention projections (to_q, to_k, to_v, to_out.0 of attn1 and attn2 in
  the three transformers).  Subject rank 8, style rank 4 (so
  K = rank_S * rank_T = 32), per-weight magnitudes spread so that, under the
  paper's default schedule (pattern ``s``, alpha 1.5, beta 0.5), most weights
  take the subject at the first step, the style at the last, and the flips
  happen at different steps.

All weights are random (seeded ``torch.Generator``, scaled by
1/sqrt(fan_in), norms at weight 1 / bias 0): images are textured noise,
not pictures.  The point is that every stock node and the K-LoRA nodes run
for real.  Same seed, same bytes.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

log = logging.getLogger(__name__)

#: Bump when any generator below changes its output (names the cached files).
FORMAT_VERSION = 1
DEFAULT_SEED = 2025

MODEL_CHANNELS = 320
CONTEXT_DIM = 768
TIME_EMBED_DIM = 4 * MODEL_CHANNELS
NUM_HEADS = 8
LATENT_CHANNELS = 4

#: The UNet's configuration as ComfyUI detects it from the file's shapes.
UNET_CONFIG = {
    "model_channels": MODEL_CHANNELS,
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "channel_mult": [1],
    "num_res_blocks": [1],
    "transformer_depth": [1],
    "transformer_depth_output": [1, 1],
    "transformer_depth_middle": -2,
    "context_dim": CONTEXT_DIM,
    "use_linear_in_transformer": False,
    "adm_in_channels": None,
}

#: ldm block prefix -> diffusers name of the same transformer (what kohya writes for SD1.5).
TRANSFORMERS = (
    ("input_blocks.1.1", "down_blocks_0_attentions_0"),
    ("output_blocks.0.1", "up_blocks_0_attentions_0"),
    ("output_blocks.1.1", "up_blocks_0_attentions_1"),
)
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")

SUBJECT_RANK, SUBJECT_ALPHA = 8, 8.0
STYLE_RANK, STYLE_ALPHA = 4, 2.0

CLIP_LAYERS = 12
CLIP_WIDTH = 768
CLIP_FF = 3072
CLIP_VOCAB = 49408
CLIP_POSITIONS = 77

UNET_FILE = "klora-demo-sd15-unet-v{v}-s{seed}.safetensors"
CLIP_FILE = "klora-demo-clip-l-v{v}-s{seed}.safetensors"
VAE_FILE = "klora-demo-taesd-vae-v{v}-s{seed}.safetensors"
SUBJECT_FILE = "klora-demo-subject-v{v}-s{seed}.safetensors"
STYLE_FILE = "klora-demo-style-v{v}-s{seed}.safetensors"


def default_cache_dir() -> Path:
    """Where generated demo models are kept: ``$KLORA_DEMO_MODELS``, else
    ``$KLORA_ENV_DIR/demo-models`` (default ``~/.cache/klora-comfyui/demo-models``)."""
    explicit = os.environ.get("KLORA_DEMO_MODELS")
    if explicit:
        return Path(explicit).expanduser()
    env_dir = os.environ.get("KLORA_ENV_DIR") or str(Path.home() / ".cache" / "klora-comfyui")
    return Path(env_dir).expanduser() / "demo-models"


# --------------------------------------------------------------------------- tensors

class _Init:
    """Seeded tensor factory; every call draws from one generator in a fixed order."""

    def __init__(self, seed: int):
        import torch

        self.torch = torch
        self.gen = torch.Generator().manual_seed(int(seed))

    def weight(self, *shape, gain: float = 1.0):
        t = self.torch
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
        w = t.randn(shape, generator=self.gen) * (gain / math.sqrt(fan_in))
        return w.to(t.float16)

    def bias(self, n: int, std: float = 0.02):
        t = self.torch
        return (t.randn(n, generator=self.gen) * std).to(t.float16)

    def ones(self, n: int):
        return self.torch.ones(n, dtype=self.torch.float16)

    def zeros(self, n: int):
        return self.torch.zeros(n, dtype=self.torch.float16)


def _norm(sd: dict, init: _Init, prefix: str, n: int) -> None:
    sd[prefix + ".weight"] = init.ones(n)
    sd[prefix + ".bias"] = init.zeros(n)


def _linear(sd: dict, init: _Init, prefix: str, out_f: int, in_f: int, bias: bool = True, gain: float = 1.0) -> None:
    sd[prefix + ".weight"] = init.weight(out_f, in_f, gain=gain)
    if bias:
        sd[prefix + ".bias"] = init.bias(out_f)


def _conv(sd: dict, init: _Init, prefix: str, out_c: int, in_c: int, k: int, bias: bool = True, gain: float = 1.0) -> None:
    sd[prefix + ".weight"] = init.weight(out_c, in_c, k, k, gain=gain)
    if bias:
        sd[prefix + ".bias"] = init.bias(out_c)


def _resblock(sd: dict, init: _Init, p: str, in_c: int, out_c: int) -> None:
    _norm(sd, init, p + "in_layers.0", in_c)
    _conv(sd, init, p + "in_layers.2", out_c, in_c, 3)
    _linear(sd, init, p + "emb_layers.1", out_c, TIME_EMBED_DIM)
    _norm(sd, init, p + "out_layers.0", out_c)
    _conv(sd, init, p + "out_layers.3", out_c, out_c, 3, gain=0.5)
    if in_c != out_c:
        _conv(sd, init, p + "skip_connection", out_c, in_c, 1)


def _transformer(sd: dict, init: _Init, p: str, ch: int) -> None:
    _norm(sd, init, p + "norm", ch)
    _conv(sd, init, p + "proj_in", ch, ch, 1)
    b = p + "transformer_blocks.0."
    for attn, ctx in (("attn1", ch), ("attn2", CONTEXT_DIM)):
        _linear(sd, init, b + attn + ".to_q", ch, ch, bias=False)
        _linear(sd, init, b + attn + ".to_k", ch, ctx, bias=False)
        _linear(sd, init, b + attn + ".to_v", ch, ctx, bias=False)
        _linear(sd, init, b + attn + ".to_out.0", ch, ch, gain=0.5)
    _linear(sd, init, b + "ff.net.0.proj", 8 * ch, ch)  # GEGLU: 2 x 4ch
    _linear(sd, init, b + "ff.net.2", ch, 4 * ch, gain=0.5)
    for i in (1, 2, 3):
        _norm(sd, init, b + f"norm{i}", ch)
    _conv(sd, init, p + "proj_out", ch, ch, 1, gain=0.5)


def make_unet_state_dict(seed: int = DEFAULT_SEED) -> dict:
    """The demo UNet (see module docstring), ComfyUI ``ldm`` names without a prefix, float16."""
    init = _Init(seed)
    ch = MODEL_CHANNELS
    sd: dict = {}
    _linear(sd, init, "time_embed.0", TIME_EMBED_DIM, ch)
    _linear(sd, init, "time_embed.2", TIME_EMBED_DIM, TIME_EMBED_DIM)
    _conv(sd, init, "input_blocks.0.0", ch, LATENT_CHANNELS, 3)
    _resblock(sd, init, "input_blocks.1.0.", ch, ch)
    _transformer(sd, init, "input_blocks.1.1.", ch)
    for i in (0, 1):  # skip connections double the input channels
        _resblock(sd, init, f"output_blocks.{i}.0.", 2 * ch, ch)
        _transformer(sd, init, f"output_blocks.{i}.1.", ch)
    _norm(sd, init, "out.0", ch)
    _conv(sd, init, "out.2", LATENT_CHANNELS, ch, 3, gain=0.5)
    return sd


def make_clip_l_state_dict(seed: int = DEFAULT_SEED) -> dict:
    """A random CLIP-L text encoder in Hugging Face ``CLIPTextModel`` names, float16."""
    init = _Init(seed)
    w, ff = CLIP_WIDTH, CLIP_FF
    sd: dict = {}
    t = "text_model."
    sd[t + "embeddings.token_embedding.weight"] = init.weight(CLIP_VOCAB, w, gain=0.02 * math.sqrt(w))
    sd[t + "embeddings.position_embedding.weight"] = init.weight(CLIP_POSITIONS, w, gain=0.01 * math.sqrt(w))
    for i in range(CLIP_LAYERS):
        p = f"{t}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(sd, init, p + "self_attn." + proj, w, w, gain=0.5 if proj == "out_proj" else 1.0)
        _norm(sd, init, p + "layer_norm1", w)
        _linear(sd, init, p + "mlp.fc1", ff, w)
        _linear(sd, init, p + "mlp.fc2", w, ff, gain=0.5)
        _norm(sd, init, p + "layer_norm2", w)
    _norm(sd, init, t + "final_layer_norm", w)
    sd["text_projection.weight"] = init.weight(w, w)
    return sd


def make_taesd_state_dict(seed: int = DEFAULT_SEED) -> dict:
    """A random TAESD-layout VAE for 4-channel latents, float16."""
    import torch

    init = _Init(seed)
    sd: dict = {}
    c = 64

    def block(prefix: str) -> None:
        _conv(sd, init, prefix + "conv.0", c, c, 3)
        _conv(sd, init, prefix + "conv.2", c, c, 3)
        _conv(sd, init, prefix + "conv.4", c, c, 3, gain=0.5)

    # Encoder: conv, block, then 3 x (strided conv without bias, 3 blocks), conv to latents.
    e = "taesd_encoder."
    _conv(sd, init, e + "0", c, 3, 3)
    block(e + "1.")
    i = 2
    for _ in range(3):
        _conv(sd, init, f"{e}{i}", c, c, 3, bias=False)
        for j in (1, 2, 3):
            block(f"{e}{i + j}.")
        i += 4
    _conv(sd, init, f"{e}{i}", LATENT_CHANNELS, c, 3)
    # Decoder: clamp, conv, relu, then 3 x (3 blocks, upsample, conv without bias), block, conv to RGB.
    d = "taesd_decoder."
    _conv(sd, init, d + "1", c, LATENT_CHANNELS, 3)
    i = 3
    for _ in range(3):
        for j in (0, 1, 2):
            block(f"{d}{i + j}.")
        _conv(sd, init, f"{d}{i + 4}", c, c, 3, bias=False)
        i += 5
    block(f"{d}{i}.")
    _conv(sd, init, f"{d}{i + 1}", 3, c, 3)
    # As ComfyUI's own TAESD loader sets them for SD1.x latents.
    sd["vae_scale"] = torch.tensor(0.18215, dtype=torch.float16)
    sd["vae_shift"] = torch.tensor(0.0, dtype=torch.float16)
    return sd


def attention_targets() -> list:
    """``[(kohya module name, ldm weight key, out_features, in_features)]`` of the 24 projections."""
    out = []
    for ldm, diffusers in TRANSFORMERS:
        for attn in ("attn1", "attn2"):
            for proj in PROJECTIONS:
                in_f = CONTEXT_DIM if attn == "attn2" and proj in ("to_k", "to_v") else MODEL_CHANNELS
                kohya = f"lora_unet_{diffusers}_transformer_blocks_0_{attn}_{proj.replace('.', '_')}"
                key = f"diffusion_model.{ldm}.transformer_blocks.0.{attn}.{proj}.weight"
                out.append((kohya, key, MODEL_CHANNELS, in_f))
    return out


def make_lora_pair(seed: int = DEFAULT_SEED) -> tuple:
    """``(subject_state_dict, style_state_dict)`` for the demo UNet, kohya names, float16.

    Subject: rank 8, alpha 8; its per-weight magnitude is log-uniform over a
    factor 4, which spreads ``T_S / (gamma * T_T)`` across the schedule's
    range so weights flip from subject to style at different steps.  Style:
    rank 4, alpha 2, equal magnitude everywhere.
    """
    import torch

    gen = torch.Generator().manual_seed(int(seed) + 7919)
    subject, style = {}, {}
    lo, hi = math.log(0.5), math.log(2.0)
    for name, _key, out_f, in_f in attention_targets():
        mag = math.exp(lo + (hi - lo) * float(torch.rand((), generator=gen)))
        for sd, rank, alpha, m in ((subject, SUBJECT_RANK, SUBJECT_ALPHA, mag), (style, STYLE_RANK, STYLE_ALPHA, 1.0)):
            down = torch.randn(rank, in_f, generator=gen) / math.sqrt(in_f)
            up = torch.randn(out_f, rank, generator=gen) * (0.2 * m / math.sqrt(rank))
            sd[name + ".lora_down.weight"] = down.to(torch.float16).contiguous()
            sd[name + ".lora_up.weight"] = up.to(torch.float16).contiguous()
            sd[name + ".alpha"] = torch.tensor(alpha, dtype=torch.float16)
    return subject, style


# --------------------------------------------------------------------------- files

def _save_atomic(state_dict: dict, path: Path, metadata: dict) -> None:
    """Write safetensors to a temporary file in the same folder, then rename (safe for concurrent writers)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=str(path.parent))
    os.close(fd)
    try:
        save_file(state_dict, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; make it an ordinary file
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


@dataclass(frozen=True)
class DemoModels:
    """Paths of the generated demo files."""

    unet: Path
    clip: Path
    vae: Path
    subject: Path
    style: Path


_GENERATORS = {
    "unet": (UNET_FILE, lambda s: make_unet_state_dict(s), "unet"),
    "clip": (CLIP_FILE, lambda s: make_clip_l_state_dict(s), "text encoder"),
    "vae": (VAE_FILE, lambda s: make_taesd_state_dict(s), "vae"),
}


def file_name(kind: str, seed: int = DEFAULT_SEED) -> str:
    template = {"unet": UNET_FILE, "clip": CLIP_FILE, "vae": VAE_FILE,
                "subject": SUBJECT_FILE, "style": STYLE_FILE}[kind]
    return template.format(v=FORMAT_VERSION, seed=int(seed))


def ensure_file(kind: str, folder: Union[str, os.PathLike], seed: int = DEFAULT_SEED,
                notify: Optional[Callable[[str], None]] = None) -> Path:
    """Path of demo file ``kind`` ("unet", "clip", "vae", "subject", "style") in ``folder``,
    generated first when it is not there yet."""
    folder = Path(folder)
    path = folder / file_name(kind, seed)
    if path.is_file():
        return path
    if notify is not None:
        notify(f"generating demo {kind} (seed {seed}) -> {path}")
    meta = {"klora_demo": kind, "klora_demo_seed": str(int(seed)), "klora_demo_version": str(FORMAT_VERSION)}
    if kind in ("subject", "style"):
        subject, style = make_lora_pair(seed)
        meta["ss_network_module"] = "networks.lora"
        meta["ss_network_dim"] = str(SUBJECT_RANK if kind == "subject" else STYLE_RANK)
        _save_atomic(subject if kind == "subject" else style, path, meta)
    else:
        _save_atomic(_GENERATORS[kind][1](seed), path, meta)
    log.info("wrote %s", path)
    return path


def ensure_demo_models(folder: Union[str, os.PathLike, None] = None, seed: int = DEFAULT_SEED,
                       notify: Optional[Callable[[str], None]] = None) -> DemoModels:
    """Generate (once; then reuse) every demo file in ``folder`` (default :func:`default_cache_dir`)."""
    folder = Path(folder) if folder is not None else default_cache_dir()
    return DemoModels(**{k: ensure_file(k, folder, seed, notify) for k in ("unet", "clip", "vae", "subject", "style")})
