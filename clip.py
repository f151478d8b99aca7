"""clip.py: OpenAI CLIP (ViT towers), vendored for nanoTVR.

Learning Transferable Visual Models From Natural Language Supervision (Radford et al., ICML 2021),
arXiv:2103.00020. Official code: openai/CLIP @ d05afc4 (clip/model.py, clip/clip.py,
clip/simple_tokenizer.py; MIT licence, see NOTICE). Written anew from the paper and the code.

Faithful to: the ViT image tower and the causal text transformer (pre-LN blocks, QuickGELU, LayerNorm
in fp32, EOT pooling at the first argmax, logit_scale), OpenAI's parameter names and shapes (their
state dicts load with strict=True), their BPE tokenizer byte for byte, and their image preprocessing.

Deliberate differences:
  1. Tensors are batch-first [B, N, W] and attention is one `F.scaled_dot_product_attention` call
     (flash / memory-efficient kernels on a GPU) instead of nn.MultiheadAttention on [N, B, W].
  2. Blocks are exposed in pieces (`block.attention(x, mask)`, `block.ln_2`, `block.mlp`) and the towers
     in steps (`visual.embed`, `visual.head`, `embed_text`, `text_head`) so method files can run them
     layer by layer and change the token sequence in between. No hooks, no monkey-patching.
  3. Text shorter than 77 tokens slices the positional embedding (as CLIP4Clip does); by the causal
     mask this gives the same EOT features as the zero-padded 77-slot input.
  4. `load()` returns fp32 weights (OpenAI keeps fp16 on GPU); use torch.autocast for speed.
     ResNet checkpoints are refused. Preprocessing uses torch's antialiased bicubic resize instead of PIL
     (within 1/255 of PIL, mean |diff| 0.003 on test images).

Usage:
    model = clip.load("ViT-B/32")                       # or a local path to ViT-B-32.pt
    feats = model.encode_text(clip.tokenize(["a dog runs on the grass"]))
"""
import gzip
import hashlib
import html
import os
import urllib.error
import urllib.request
import warnings
import zipfile
from collections import OrderedDict
from contextlib import nullcontext
from functools import lru_cache

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# ----------------------------------------------------------------------------------------------------
# Model


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back, as OpenAI does (fp16/bf16 inputs stay stable)."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


BF16_FLASH_CPU = "AVX512" in torch.backends.cpu.get_cpu_capability()


def sdpa(q, k, v, **kwargs):
    """F.scaled_dot_product_attention (the methods' calls too); bf16 on a CPU without AVX-512 (or at ATEN_CPU_
    CAPABILITY=avx2/default), where the fused kernel raises "pack_vnni2", takes the math kernel: the same function."""
    slow = q.dtype == torch.bfloat16 and q.device.type == "cpu" and not BF16_FLASH_CPU
    with sdpa_kernel(SDPBackend.MATH) if slow else nullcontext():
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


class MultiheadAttention(nn.Module):
    """nn.MultiheadAttention's packed parameters (in_proj_weight [3W, W], out_proj), batch-first, SDPA.

    mask: None, a boolean tensor (True = may attend, SDPA's convention) or an additive float tensor
    (0 / -inf), shaped [N, N] or [B, N, N]; or is_causal=True for the text tower.
    """

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, mask=None, is_causal=False):
        B, N, W = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, N, 3W]
        qkv = qkv.view(B, N, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)  # [3, B, H, N, 64]
        q, k, v = qkv.unbind(0)  # views; backward writes one [3, ...] gradient instead of zero-filling three
        if mask is not None:
            if mask.dtype != torch.bool:
                mask = mask.to(q.dtype)  # SDPA wants an additive mask in the query's dtype
            if mask.dim() == 3:
                mask = mask.unsqueeze(1)  # [B, 1, N, N]: one mask shared by the heads
        y = sdpa(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
        y = y.transpose(1, 2).reshape(B, N, W)  # [B, N, W]
        return self.out_proj(y)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))."""

    def __init__(self, width, heads):
        super().__init__()
        self.attn = MultiheadAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(width * 4, width)),
        ]))
        self.ln_2 = LayerNorm(width)

    def attention(self, x, mask=None, is_causal=False):
        """The attention sublayer's output (no residual): attn(ln_1(x))."""
        return self.attn(self.ln_1(x), mask, is_causal)

    def feed_forward(self, x):
        """The MLP sublayer's output (no residual): mlp(ln_2(x))."""
        return self.mlp(self.ln_2(x))

    def forward(self, x, mask=None, is_causal=False):
        x = x + self.attention(x, mask, is_causal)
        return x + self.feed_forward(x)


def checkpointed(blocks, fn, *args):
    """fn(*args), one residual block of the loop over `blocks`; under set_grad_checkpointing while training, only
    fn's inputs are kept and backward reruns fn with the RNG state restored: same dropout, same results
    (tests/test_checkpointing.py). Pass what changes per block as arguments (a closure would rerun the last)."""
    if getattr(blocks, "grad_checkpointing", False) and blocks.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)
    return fn(*args)


def value_checks(t):
    """Whether a forward may assert on the values of `t`: on the CPU outside a compiled graph, where it is free."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()  # a GPU would stall, a graph break


def set_grad_checkpointing(model, on=True):
    """train.py --grad_checkpointing: every block loop in `model` (clip.py's and the methods') checkpoints."""
    for m in model.modules():
        m.grad_checkpointing = on
    return model


class Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x, mask=None, is_causal=False):
        for block in self.resblocks:
            x = checkpointed(self.resblocks, block, x, mask, is_causal)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim):
        super().__init__()
        self.input_resolution, self.patch_size = input_resolution, patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def embed(self, x):
        """Images [B, 3, H, W] -> tokens [B, 1 + g*g, W] (CLS first), after ln_pre."""
        x = self.conv1(x.to(self.conv1.weight.dtype))  # [B, W, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, g*g, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, W]
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, 1+g*g, W]
        return self.ln_pre(x)

    def head(self, x):
        """ln_post then proj on any tokens [..., W] -> [..., E] (pass x[:, 0] for the CLS feature)."""
        return self.ln_post(x) @ self.proj

    def forward(self, x):
        return self.head(self.transformer(self.embed(x))[:, 0])


class CLIP(nn.Module):
    """OpenAI's constructor arguments, so tiny configs for tests read like the real ones."""

    def __init__(self, embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
                 context_length, vocab_size, transformer_width, transformer_heads, transformer_layers):
        super().__init__()
        if not isinstance(vision_layers, int):
            raise ValueError("nanoTVR's clip.py supports ViT image towers only, not ModifiedResNet")
        self.context_length = context_length
        self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width, vision_layers,
                                        vision_width // 64 if vision_width >= 64 else 1, embed_dim)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads)
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * torch.log(torch.tensor(1 / 0.07)))
        self.initialize_parameters()

    def initialize_parameters(self):
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std = width ** -0.5 * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)
        for block in self.visual.transformer.resblocks:  # OpenAI leaves these at nn defaults
            nn.init.xavier_uniform_(block.attn.in_proj_weight)
            nn.init.zeros_(block.attn.out_proj.bias)

    @property
    def dtype(self):
        return self.visual.conv1.weight.dtype

    def encode_image(self, image):
        return self.visual(image)

    def embed_text(self, text):
        """Token ids [B, L] (L <= context_length) -> token embeddings + positions [B, L, Wt]."""
        L = text.shape[1]
        if L > self.context_length:
            raise ValueError(f"text has {L} tokens, more than the model's context length {self.context_length}")
        return self.token_embedding(text) + self.positional_embedding[:L]  # slice for L < 77 (CLIP4Clip)

    def text_head(self, x):
        """ln_final then text_projection on any tokens [..., Wt] -> [..., E]."""
        return self.ln_final(x) @ self.text_projection

    def encode_text(self, text):
        x = self.transformer(self.embed_text(text), is_causal=True)  # [B, L, Wt]
        eot = text.argmax(dim=-1)  # EOT (49407) has the largest id; argmax returns the first maximum
        return self.text_head(x[torch.arange(x.shape[0], device=x.device), eot])  # [B, E]

    def forward(self, image, text):
        image_features = F.normalize(self.encode_image(image), dim=-1)
        text_features = F.normalize(self.encode_text(text), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


# OpenAI's released ViT shapes, and the tiny ones that tests, the synthetic set and bench.py build: CLIP(**CONFIGS[k])
def _config(embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size, transformer_width,
            transformer_heads, transformer_layers, context_length=77, vocab_size=49408):
    return dict(locals())


CONFIGS = {
    "ViT-B/32": _config(512, 224, 12, 768, 32, 512, 8, 12),
    "ViT-B/16": _config(512, 224, 12, 768, 16, 512, 8, 12),
    "ViT-L/14": _config(768, 224, 24, 1024, 14, 768, 12, 12),
    "ViT-L/14@336px": _config(768, 336, 24, 1024, 14, 768, 12, 12),
    "tiny": _config(32, 32, 2, 64, 8, 64, 1, 2),  # tests and self-tests: 32 px, 16 patches, 2 layers per tower
    "synthetic": _config(64, 64, 2, 64, 16, 64, 1, 2),  # the synthetic default's backbone (synthetic.py)
    "bench-tiny": _config(64, 64, 4, 128, 16, 128, 2, 4),  # bench.py --tiny: a CPU smoke size
}


def count_trainable(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def causal_mask(length, device=None):
    """Boolean [L, L] mask, True on and below the diagonal (token i sees tokens 0..i)."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


# ----------------------------------------------------------------------------------------------------
# Checkpoints: config inference, download with SHA256, TorchScript archives

class ModelFileError(RuntimeError):
    """A CLIP model file that cannot be used (missing, not downloadable, wrong SHA256, cut off, not a CLIP
    checkpoint); the message names the file, what it should be and the fix (train.py: one `error:` line)."""


CLIP_FILE = "a CLIP checkpoint: an OpenAI .pt (TorchScript archive) or a state dict of clip.CLIP"
_VIT_KEYS = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj", "token_embedding.weight",
             "positional_embedding", "ln_final.weight", "text_projection")


def build_model(state_dict):
    """Infer the config from an OpenAI state dict, load it strictly, return the fp32 eval model."""
    sd = {k: v for k, v in state_dict.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    if "visual.proj" not in sd:
        raise ValueError("this checkpoint is not a CLIP ViT (no 'visual.proj'): ResNet CLIP models (RN50, ...) "
                         "are not supported by nanoTVR; use ViT-B/32, ViT-B/16, ViT-L/14 or ViT-L/14@336px")
    vision_width, _, _, patch = sd["visual.conv1.weight"].shape
    vision_layers = len([k for k in sd if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")])
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    width = sd["ln_final.weight"].shape[0]
    model = CLIP(
        embed_dim=sd["text_projection"].shape[1], image_resolution=patch * grid, vision_layers=vision_layers,
        vision_width=vision_width, vision_patch_size=patch, context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0], transformer_width=width, transformer_heads=width // 64,
        transformer_layers=len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks")}))
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model.eval()


# name -> (file name, SHA256); the SHA256 is also the directory in OpenAI's URL
_MODELS = {
    "ViT-B/32": ("ViT-B-32.pt", "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"),
    "ViT-B/16": ("ViT-B-16.pt", "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"),
    "ViT-L/14": ("ViT-L-14.pt", "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836"),
    "ViT-L/14@336px": ("ViT-L-14-336px.pt", "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02"),
}
_URL = "https://openaipublic.azureedge.net/clip/models/{sha}/{file}"


def available_models():
    return list(_MODELS)


def default_cache_dir():
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "clip")


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(name, root):
    """The verified file of model `name` in root: the cached one if its SHA256 matches, else a fresh download
    (temporary file, SHA256, rename); a failed download leaves a mismatching cached file in place, and says so."""
    file, sha = _MODELS[name]
    target, url = os.path.join(root, file), _URL.format(sha=sha, file=file)
    stale = None  # the SHA256 of a cached file that does not match
    if os.path.isfile(target):
        stale = sha256_of(target)
        if stale == sha:
            return target
        print(f"clip: {target} has SHA256 {stale}, expected {sha} (a partial or damaged download?); downloading "
              "a replacement, the file stays until the new one is verified", flush=True)
    kept = (f" The cached {target} (SHA256 {stale}, not {sha}) was kept: delete it, or replace it with a good "
            "copy." if stale else "")
    tmp = target + f".part{os.getpid()}"
    try:
        os.makedirs(root, exist_ok=True)
        with urllib.request.urlopen(url, timeout=60) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        got = sha256_of(tmp)
        if got != sha:
            raise ModelFileError(f"downloaded {file} from {url} has SHA256 {got}, expected {sha}; the download was "
                                 f"discarded (retry; a proxy or a full disk can cut files short).{kept}")
        os.replace(tmp, target)  # atomic: a half-written file is never in the cache under its real name
    except (urllib.error.URLError, OSError) as e:
        raise ModelFileError(
            f"could not download CLIP {name} from {url} ({e}).{kept} To fix: download "
            f"{file} (SHA256 {sha}) on a machine with network access and copy it to {target}, or pass the path "
            "of a local copy to clip.load()/--clip.") from e
    finally:  # any failure, Ctrl-C included, leaves no partial file behind
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def _sniff(path):
    """A few words on what a file that torch cannot read looks like."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04"):
        return f"it is a zip archive, as torch files are, but cut off or damaged ({os.path.getsize(path):,} bytes)"
    try:
        text = head.decode("utf-8")
        if text.isprintable() or all(c.isprintable() or c.isspace() for c in text):
            return f"it is a text file (starting {text[:40]!r})"
    except UnicodeDecodeError:
        pass
    return "it is neither a torch file nor text"


def _read_clip_file(path):
    """The state dict of a CLIP file: OpenAI's TorchScript archives (weights taken out, no code run) or a
    torch.save'd state dict (weights_only: no code is ever unpickled); raises ModelFileError."""
    if os.path.getsize(path) == 0:
        raise ModelFileError(f"{path} is empty (0 bytes). It should be {CLIP_FILE}")
    archive = False
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            archive = any(n.endswith("/constants.pkl") for n in z.namelist())  # TorchScript's, not torch.save's
    try:
        if archive:
            with warnings.catch_warnings():  # torch >= 2.9 marks jit.load deprecated; it is the only reader
                warnings.simplefilter("ignore")
                return torch.jit.load(path, map_location="cpu").state_dict()
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # RuntimeError, UnpicklingError, EOFError, ...: torch's advice would mislead here
        raise ModelFileError(f"{path} cannot be read as a torch file: {_sniff(path)}. It should be "
                             f"{CLIP_FILE}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and {"model", "optimizer"} <= set(obj):
        raise ModelFileError(f"{path} is a nanoTVR training checkpoint (train.py's checkpoint.pt), not CLIP "
                             f"weights: pass it as --checkpoint or --init, and choose CLIP with --clip. It should be "
                             f"{CLIP_FILE}")
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelFileError(f"{path} holds a {type(obj).__name__}"
                             f"{' that is not all tensors' if isinstance(obj, dict) else ''}, not a state dict. "
                             f"It should be {CLIP_FILE}")
    return obj


def load(name_or_path, device="cpu", download_root=None):
    """A CLIP model by name (downloaded to ~/.cache/clip, SHA256-checked) or from a local file, fp32, eval;
    raises ModelFileError for a file that is missing, cannot be downloaded or is not a CLIP ViT checkpoint."""
    if name_or_path in _MODELS:
        path = _download(name_or_path, download_root or default_cache_dir())
    elif os.path.isfile(name_or_path):
        path = name_or_path
    else:
        raise ModelFileError(f"CLIP model {name_or_path}: no such file, and not one of {', '.join(_MODELS)}")
    state_dict = _read_clip_file(path)
    if "visual.proj" not in state_dict and any(k.startswith("visual.layer1.") for k in state_dict):
        raise ModelFileError(f"{path} is a ResNet CLIP model: nanoTVR supports ViT-B/32, ViT-B/16, ViT-L/14 "
                             "and ViT-L/14@336px")
    missing = [k for k in _VIT_KEYS if k not in state_dict]
    if missing:
        keys = ", ".join(list(state_dict)[:5]) + (", ..." if len(state_dict) > 5 else "")
        raise ModelFileError(f"{path} is not a CLIP state dict: it has no {', '.join(missing[:3])} (its "
                             f"keys: {keys or 'none'}). It should be {CLIP_FILE}")
    try:
        model = build_model(state_dict)
    except (RuntimeError, ValueError, KeyError, IndexError) as e:  # load_state_dict(strict): wrong keys or shapes
        raise ModelFileError(f"{path} does not fit clip.CLIP ({str(e).splitlines()[0][:300]}). It should "
                             f"be {CLIP_FILE}") from e
    return model.to(device)


# ----------------------------------------------------------------------------------------------------
# Preprocessing (OpenAI's _transform: bicubic resize of the short side, centre crop, mean/std)

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def resize_crop(frames, size=224):
    """uint8 frames [N, H, W, 3] (array or tensor, OpenCV order after RGB conversion) or [N, 3, H, W]
    -> uint8 [N, 3, size, size]: antialiased bicubic resize of the short side to `size`, centre crop."""
    x = torch.as_tensor(frames)
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)  # [N, 3, H, W]
    H, W = x.shape[-2:]
    new_long = int(size * max(H, W) / min(H, W))  # PIL's truncation
    h, w = (size, new_long) if H <= W else (new_long, size)
    if (h, w) != (H, W):
        x = F.interpolate(x.float(), size=(h, w), mode="bicubic", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255).to(torch.uint8)
    top, left = round((h - size) / 2), round((w - size) / 2)
    return x[..., top:top + size, left:left + size].contiguous()


@lru_cache()
def channel_constants(device, *rows):
    """Each row of 3 as a [3, 1, 1] tensor on `device`, made once: a copy to the GPU per call waits for it."""
    with torch.inference_mode(False):  # usable in training whatever mode made them first
        return [torch.tensor(r, device=device).view(3, 1, 1) for r in rows]


def normalize_pixels(x):
    """uint8 [..., 3, H, W] -> float, CLIP mean/std. Run it on the GPU: uint8 crosses the bus 4x cheaper."""
    mean, std = channel_constants(x.device, MEAN, STD)
    return (x.float() / 255.0 - mean) / std


def preprocess(frames, size=224):
    return normalize_pixels(resize_crop(frames, size))


# ----------------------------------------------------------------------------------------------------
# BPE tokenizer (OpenAI's simple_tokenizer, byte for byte)

SOT, EOT = 49406, 49407
_VOCAB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")


@lru_cache()
def bytes_to_unicode():
    """Byte -> printable unicode character; printable bytes map to themselves, the rest to chr(256+n)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _clean(text):
    import ftfy  # imported here so that `import clip` works for model-only use without ftfy
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _regex().sub(r"\s+", " ", text).strip().lower()


@lru_cache()
def _regex():
    import regex
    return regex


class SimpleTokenizer:
    def __init__(self, bpe_path=_VOCAB):
        if not os.path.isfile(bpe_path):  # a copied clip.py without its vocabulary: say which file it needs
            raise FileNotFoundError(f"clip.py's tokenizer needs {os.path.basename(bpe_path)} beside it ({bpe_path}): "
                                    "copy it from nanoTVR or openai/CLIP")
        merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in merges[1:49152 - 256 - 2 + 1]]  # line 0 is a header
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {v: i for i, v in enumerate(vocab)}
        self.decoder = {i: v for v, i in self.encoder.items()}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}
        self.pat = _regex().compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            _regex().IGNORECASE)

    def bpe(self, token):
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word[:-1], word[1:]))
            pair = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if pair not in self.bpe_ranks:
                break
            first, second = pair
            merged, i = [], 0
            while i < len(word):  # merge every occurrence of the lowest-rank pair, left to right
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text):
        ids = []
        for piece in self.pat.findall(_clean(text)):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(piece).split(" "))
        return ids

    def decode(self, ids):
        text = "".join(self.decoder[i] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")


@lru_cache()
def _tokenizer():
    return SimpleTokenizer()


def tokenize(texts, context_length=77, truncate=False):
    """[SOT] + BPE ids + [EOT], zero-padded to context_length -> int32 [N, context_length].
    Too long raises, unless truncate=True, which keeps the first tokens and puts EOT in the last slot."""
    if isinstance(texts, str):
        texts = [texts]
    tok = _tokenizer()
    result = torch.zeros(len(texts), context_length, dtype=torch.int32)
    for i, text in enumerate(texts):
        ids = [SOT] + tok.encode(text) + [EOT]
        if len(ids) > context_length:
            if not truncate:
                raise RuntimeError(f"input {text!r} is too long for context length {context_length}")
            ids = ids[:context_length - 1] + [EOT]
        result[i, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
    return result


if __name__ == "__main__":  # tiny config: shapes and a forward pass
    m = CLIP(**CONFIGS["tiny"])
    img, txt = torch.randn(2, 3, 32, 32), tokenize(["a red circle moves left", "a blue square"])
    print([t.shape for t in m(img, txt)], sum(p.numel() for p in m.parameters()), "parameters")
