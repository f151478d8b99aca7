"""dgl.py: DGL, dynamic global-local prompt tuning of a frozen CLIP for text-video retrieval.

DGL: Dynamic Global-Local Prompt Tuning for Text-Video Retrieval (Yang, Zhu, Wang, Yang; AAAI 2024),
arXiv:2401.10588. Official code: knightyxp/DGL @ 9139fd1 (modules/clip.py `encode_prompt`, `encode_text`,
`VisualTransformer.incorporate_prompt/forward_deep_prompt`, `ResidualAttentionBlock.forward`; params.py;
scripts/*.sh; utils/optimization.py). The paper's full text was not readable here, so the method follows
the official code; docs/dgl.md maps it to the lines below.

Faithful to: one "shared latent space" generating the text prompts and the per-frame ("local") visual
prompts of every layer, in both released variants (`latent="linear"`: 0.83M parameters, `"transformer"`:
9.57M); deep text prompts (4 prefix after SOT + 4 postfix after the last word slot, no positional
embedding, replaced before every layer, causal mask over all L + 8 tokens); local prompts after ln_pre
between CLS and patches, replaced before every layer; 4 global prompts inserted once before block 0;
global-local attention (a global prompt attends to every token of the video, a frame token to the
global prompts and its own frame); video embedding = ln_post(global prompt 0) @ proj; every CLIP weight
frozen, logit_scale included (clamped to [0.1, ln 100] as the training loop does); initialisation as the
release; the official optimiser grouping (weight decay on every non-bias tensor).

The prompts are "dynamic" only by name: the generator has no input, so it produces the same
learned prompts for every sample. This file therefore generates them once per call with batch 1 and
expands them, and text and video are encoded fully independently.

The postfix text prompts are dead, reproduced on purpose: they sit after every EOT token, so
under CLIP's causal mask they never reach the EOT feature and their gradients are exactly zero. In the
linear variant `postfix_proj` (393,728 parameters, 48 % of the variant) never learns, although AdamW's
decoupled weight decay still shrinks it. They are kept so parameter counts and numbers equal the release.

Deliberate deviations:
  1. Prompts are generated inside each encoder, so text and video encode independently. The release
     generates them only when text and video arrive together, which crashes its VATEX evaluation
     (the multi-caption path passes one modality at a time).
  2. Global-local attention is two SDPA calls per layer, as the release's two attention calls
     (global queries vs [G; all frames], frame queries vs [G; own frame]) but with all frames in one
     batch instead of a Python loop over frames; equal to one SDPA call under `global_local_mask` to
     ~1e-6 (float summation order), which costs T times the attention FLOPs and rules out flash kernels.
     Tokens are stored frame-major, the release token-major (no positions: irrelevant).
  3. `video_mask`: padded frames are removed from the global prompts' keys. The release ignores
     the mask (its loader repeats the last frame, as data.py does for `sampling="dgl"`). No change when all
     frames are valid (MSR-VTT).
  4. Sizes come from the CLIP config and the arguments instead of the release's literals: prompt
     width = vision width (768 hard-coded there), n_g and n_f may differ, the prompt depth is the vision
     depth and the text tower uses the first `text layers` prompt sets (the release ties text depth to
     `--unified_transformer_layers` and cannot run ViT-L/14). Same numbers for ViT-B/32 and ViT-B/16.
  5. Optimiser and schedule are train.py's (AdamW, per-step warmup + cosine, clip 1.0), the same as the
     release's AdamW path; the global batch of 512 is all-gathered as the release's 128 x 4 GPUs.
     The release's bugged shell flags (vatex.sh, lsmdc.sh and activitynet.sh pass --unified_prompt_layers,
     which params.py does not define; the values equal the defaults) are not reproduced. Its recall
     (utils/metrics.py, CLIP4Clip's compute_metrics: a k-way tie with the ground truth counts k times) is,
     by retrieval.py.
  6. Frames: the release's rules (`sampling="dgl"`: segments of n // 12 frames in training, so the last n mod 12
     are never drawn; int(tick/2 + tick*x) at test) applied to the clip's own frames. The release applies them to
     a 3 fps, 224 px re-encode (compress_video.py): the frame cache built at its default 3 fps gives that input.
The release's checkpoints load with `load_official_state_dict(model, state_dict)`, in the last section
("Reproducing the release").

Usage:
    model = DGL(clip.load("ViT-B/32"), num_frames=12, latent="transformer")
    t, v = model.encode_text(ids), model.encode_video(frames, frame_mask)      # [B, 512], [B, 512]
    logits = model.logit_scale.exp() * F.normalize(t, dim=-1) @ F.normalize(v, dim=-1).T
"""
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

import clip

RECIPE = dict(
    lr=2e-3,             # scripts/msrvtt.sh lr=2e-3 (prompt parameters)
    clip_lr=None,        # coef_lr=1e-3 scales CLIP groups that are frozen, i.e. empty
    epochs=5,            # msrvtt.sh epochs=5
    batch_size=512,      # msrvtt.sh batch_size=128 per GPU x 4 GPUs, embeddings all-gathered
    frames=12,           # msrvtt.sh max_frames=12
    words=32,            # msrvtt.sh max_words=32 (+ 8 prompt slots = 40 text tokens)
    sampling="dgl",      # sampling.py: segments of n // 12 in training, uniform_sampling at test (deviation 6)
    weight_decay=0.2,    # params.py --wd 0.2 on every non-bias tensor (utils/optimization.py)
    warmup=0.1,          # params.py --warmup 0.1: linear warmup per step, then cosine to 0
    grad_clip=1.0,       # main.py clip_grad_norm_(1.0)
    betas=(0.9, 0.98),   # params.py --beta1 0.9 --beta2 0.98
    eps=1e-6,            # params.py --eps 1e-6
    latent="transformer",  # msrvtt.sh shared_latent_space=transformer (linear | transformer)
    n_g=4,               # params.py global_visual_prompt_length: global video prompts
    n_f=4,               # params.py local_each_frame_prompt_length: local prompts per frame
    n_t=8,               # params.py text_prompt_length: n_t/2 prefix + n_t/2 postfix text prompts
)

DATASET_RECIPES = dict(
    msvd=dict(),         # no DGL script for MSVD (a loader exists): MSR-VTT values
    didemo=dict(),       # no DGL script for DiDeMo: MSR-VTT values (CLIP4Clip uses 64 frames / 64 words)
    vatex=dict(lr=5e-3, epochs=10, latent="linear"),                  # scripts/vatex.sh, 64 x 8 GPUs
    lsmdc=dict(lr=1e-2, epochs=10, latent="linear"),                  # scripts/lsmdc.sh, 64 x 8 GPUs
    # scripts/activitynet.sh: 16 x 8 GPUs, 64 frames and words; the script says linear, the README's
    # checkpoint transformer: the script wins, --latent transformer gives the other.
    activitynet=dict(lr=1e-2, epochs=10, batch_size=128, frames=64, words=64, latent="linear"),
)  # the synthetic set's recipe: synthetic.RECIPES


# ----------------------------------------------------------------------------------------------------
# Shared latent space: one source for the text and frame prompts of every layer (modules/clip.py encode_prompt)


class SharedLatentSpace(nn.Module):
    """forward() -> (text prompts P_t [layers, n_t, Wt], frame prompts P_f [layers, 1 or T, n_f, Wv])."""

    def __init__(self, latent, layers, width, text_width, num_frames, n_f, n_t, init_bound):
        super().__init__()
        self.latent, self.layers, self.width, self.n_t, self.n_f = latent, layers, width, n_t, n_f
        if latent == "linear":
            if n_t != 2 * n_f:
                raise ValueError(f"latent='linear' maps the n_f={n_f} frame prompts to as many prefix and "
                                 f"postfix text prompts, so n_t must be 2 * n_f = {2 * n_f}, got {n_t}")
            # V: n_f vectors per layer, stored as the release's [1, n_f, layers * Wv]; U(-a, a) as G
            self.V = nn.Parameter(torch.empty(1, n_f, layers * width).uniform_(-init_bound, init_bound))
            self.prefix_proj = nn.Linear(width, text_width)  # W_pre
            self.postfix_proj = nn.Linear(width, text_width)  # W_post (dead, see the docstring)
        elif latent == "transformer":
            if n_t % 2:
                raise ValueError(f"n_t={n_t} must be even: n_t/2 prefix and n_t/2 postfix text prompts")
            self.num_frames = num_frames
            self.U = nn.Embedding(n_t + n_f * num_frames, layers * width)  # rows: n_t text, then T x n_f
            self.block = clip.ResidualAttentionBlock(width, max(1, width // 64))  # one block, all layers
            nn.init.xavier_uniform_(self.block.attn.in_proj_weight)  # nn.MultiheadAttention's defaults
            nn.init.zeros_(self.block.attn.out_proj.bias)
            self.text_mlp = nn.Sequential(OrderedDict([  # release: unified_prompt_mlp
                ("c_fc", nn.Linear(width, 2 * width)),
                ("gelu", clip.QuickGELU()),
                ("c_proj", nn.Linear(2 * width, text_width)),
            ]))
        else:
            raise ValueError(f"latent must be 'linear' or 'transformer', got {latent!r}")

    def forward(self):
        L, W, n_t, n_f = self.layers, self.width, self.n_t, self.n_f
        if self.latent == "linear":
            V = self.V.view(n_f, L, W).transpose(0, 1)  # [L, n_f, W]: layer l = V[0, :, l*W:(l+1)*W]
            P_t = torch.cat([self.prefix_proj(V), self.postfix_proj(V)], dim=1)  # [L, 2 n_f, Wt]
            return P_t, V[:, None]  # the same n_f prompts for every frame: [L, 1, n_f, W]
        U = self.U.weight.view(-1, L, W).transpose(0, 1)  # [L, n_t + T n_f, W], same slicing as V
        Z = self.block(U)  # each layer's tokens attend among themselves, no mask
        P_t = self.text_mlp(Z[:, :n_t])  # [L, n_t, Wt]
        return P_t, Z[:, n_t:].reshape(L, self.num_frames, n_f, W)  # frame t: rows n_t+n_f t.. [L, T, n_f, W]


# ----------------------------------------------------------------------------------------------------
# Global-local video attention: the definition as a mask, then the two-call form the model runs


def global_local_mask(n_g, T, S, video_mask=None):
    """The global-local mask (global_local_attention computes attention under it without building it).
    True = may attend, over [n_g global prompts; T frames x S tokens]. A global prompt sees every token,
    a frame token sees the global prompts and its own frame. With video_mask [B, T] (False = padded frame)
    the global prompts also skip padded frames: [B, N, N]; otherwise [N, N]. N = n_g + T*S."""
    device = None if video_mask is None else video_mask.device
    frame = torch.arange(T, device=device).repeat_interleave(S)  # [T*S] frame index of every token
    frame = torch.cat([torch.full((n_g,), -1, device=device), frame])  # [N], -1 = global prompt
    is_global = frame < 0
    mask = (frame[:, None] == frame[None, :]) | is_global[:, None] | is_global[None, :]  # [N, N]
    if video_mask is None or bool(video_mask.all()):
        return mask
    key_valid = torch.cat([video_mask.new_ones(video_mask.shape[0], n_g),
                           video_mask.repeat_interleave(S, dim=1)], dim=1)  # [B, N]
    return mask & (key_valid[:, None, :] | ~is_global[None, :, None])  # [B, N, N]


def global_key_mask(video_mask, n_g, S):
    """The global prompts' keys without the padded frames (deviation 3): [B, 1, 1, n_g + T*S] bool, all True
    when every frame is real (built even then: asking whether it is would stall a GPU and break a compiled graph)."""
    if video_mask is None:
        return None
    B = video_mask.shape[0]
    return torch.cat([video_mask.new_ones(B, n_g), video_mask.repeat_interleave(S, dim=1)], dim=1)[:, None, None]


def global_local_attention(attn, h, n_g, T, keep=None):
    """attn(h, global_local_mask(...)) without the mask, as two SDPA calls (deviation 2): the global prompts
    query every token (keep: global_key_mask); the tokens of all B*T frames, batched, query [global prompts;
    own frame]. The masked call spends T times the attention FLOPs on pairs the mask then drops.
    h = ln_1(x) [B, n_g + T*S, W]. The plain form is attn(h, global_local_mask(n_g, T, S, video_mask));
    tests/test_dgl.py::test_two_call_attention_equals_one_call_under_the_mask pins the two equal."""
    B, N, W = h.shape
    S, H = (N - n_g) // T, attn.heads
    qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)  # [B, N, 3W]
    q, k, v = qkv.unflatten(-1, (3, H, W // H)).unbind(2)  # [B, N, H, d] each
    g = clip.sdpa(q[:, :n_g].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=keep)  # [B, H, n_g, d]

    def with_globals(t):  # [B, N, H, d] -> [B*T, H, n_g + S, d]: each frame's keys are [G; its own tokens]
        frames = t[:, n_g:].unflatten(1, (T, S))  # [B, T, S, H, d]
        return torch.cat([t[:, None, :n_g].expand(-1, T, -1, -1, -1), frames], dim=2).flatten(0, 1).transpose(1, 2)

    f = clip.sdpa(q[:, n_g:].unflatten(1, (T, S)).flatten(0, 1).transpose(1, 2),
                  with_globals(k), with_globals(v))  # [B*T, H, S, d]
    y = torch.cat([g.transpose(1, 2).reshape(B, n_g, W), f.transpose(1, 2).reshape(B, T * S, W)], dim=1)
    return attn.out_proj(y)  # [B, N, W]


# ----------------------------------------------------------------------------------------------------
# The method: frozen CLIP + shared latent space + global prompts


class DGL(nn.Module):
    # train.py's method contract (docs/design.md)
    uses_clip = True  # built as DGL(clip_model, num_frames, **kwargs)
    normalize_pixels = staticmethod(clip.normalize_pixels)  # uint8 frames -> CLIP's input statistics
    similarity = None  # the loop's cosine of the pooled embeddings x logit_scale

    def __init__(self, clip_model, num_frames, *, latent="transformer", n_g=4, n_f=4, n_t=8):
        super().__init__()
        self.clip = clip_model.requires_grad_(False)  # every CLIP tensor frozen, logit_scale included
        visual, text = clip_model.visual, clip_model.transformer
        if text.layers > visual.transformer.layers:
            raise ValueError(f"the text tower has {text.layers} layers, more than the {visual.transformer.layers} "
                             "prompted vision layers")
        self.num_frames, self.n_g, self.n_f, self.n_t = num_frames, n_g, n_f, n_t
        width, p = visual.transformer.width, visual.patch_size
        bound = math.sqrt(6.0 / (3 * p * p + width))  # VPT's uniform init, 0.0395 for ViT-B/32
        self.global_prompts = nn.Parameter(torch.empty(1, n_g, width).uniform_(-bound, bound))  # G
        self.latent_space = SharedLatentSpace(latent, visual.transformer.layers, width, text.width,
                                              num_frames, n_f, n_t, bound)

    @property
    def logit_scale(self):
        # frozen; main.py clamps it to [0.1, ln 100] after every step, a no-op for OpenAI's 4.6052 (scale 100)
        return self.clip.logit_scale.clamp(0.1, math.log(100))

    def encode_text(self, text):
        """Ids [B, L] -> [B, E]: deep prefix/postfix prompts in the causal text tower."""
        if text.dim() != 2 or text.dtype.is_floating_point:
            raise ValueError(f"text must be integer token ids [B, L], got {tuple(text.shape)} {text.dtype}")
        text = text.long()
        B, L = text.shape
        P_t, _ = self.latent_space()  # [layers, n_t, Wt]
        pre = self.n_t // 2
        x = self.clip.embed_text(text)  # [B, L, Wt]; prompts get no positional embedding
        P_t = P_t.to(x.dtype)
        x = torch.cat([x[:, :1], P_t[0, None, :pre].expand(B, -1, -1), x[:, 1:],
                       P_t[0, None, pre:].expand(B, -1, -1)], dim=1)  # [B, 1+pre+(L-1)+post, Wt]
        blocks = self.clip.transformer.resblocks

        def layer(x, block, l):  # one block and its prompts: what --grad_checkpointing reruns in backward
            if l > 0:  # step 3: overwrite the prompt slots with layer-l prompts (VPT-deep)
                x = torch.cat([x[:, :1], P_t[l, None, :pre].expand(B, -1, -1), x[:, 1 + pre:L + pre],
                               P_t[l, None, pre:].expand(B, -1, -1)], dim=1)  # [B, L + n_t, Wt]
            return block(x, is_causal=True)  # the postfix slots follow every EOT: they never reach it

        for l, block in enumerate(blocks):
            x = clip.checkpointed(blocks, layer, x, block, l)
        eot = text.argmax(dim=-1) + pre  # EOT has the largest id (first max); shifted by the prefix
        return self.clip.text_head(x[torch.arange(B, device=x.device), eot])  # [B, E]

    def encode_video(self, video, video_mask=None):
        """Video [B, T, 3, H, W], video_mask [B, T] bool -> [B, E]: global-local attention."""
        if video.dim() != 5 or (video_mask is not None and video_mask.shape != video.shape[:2]):
            raise ValueError(f"expected video [B, T, 3, H, W] and video_mask [B, T], got {tuple(video.shape)} "
                             f"and {None if video_mask is None else tuple(video_mask.shape)}")
        B, T = video.shape[:2]
        if self.latent_space.latent == "transformer" and T != self.num_frames:
            raise ValueError(f"latent='transformer' generates prompts for num_frames={self.num_frames} "
                             f"frames, got videos of {T}")
        _, P_f = self.latent_space()  # [layers, 1 or T, n_f, Wv]
        n_g, n_f = self.n_g, self.n_f
        x = self.clip.visual.embed(video.flatten(0, 1))  # [B*T, 1+P, Wv], after ln_pre
        W = x.shape[-1]
        x = x.view(B, T, -1, W)  # [B, T, 1+P, Wv]
        P_f = P_f.to(x.dtype)
        # step 2: [CLS, n_f local prompts, patches] per frame (no positional embedding on the prompts)
        x = torch.cat([x[:, :, :1], P_f[0].expand(B, T, n_f, W), x[:, :, 1:]], dim=2)  # [B, T, S, Wv]
        S = x.shape[2]
        g = self.global_prompts.to(x.dtype).expand(B, n_g, W)  # [B, n_g, Wv]
        x = torch.cat([g, x.reshape(B, T * S, W)], dim=1)  # [B, n_g + T*S, Wv]
        keep = global_key_mask(video_mask, n_g, S)  # [B, 1, 1, N] bool
        blocks = self.clip.visual.transformer.resblocks

        def layer(x, block, l):  # one block and its prompts: what --grad_checkpointing reruns in backward
            if l > 0:  # step 4: new local prompts every layer; G and CLS/patches are carried
                g, f = x[:, :n_g], x[:, n_g:].view(B, T, S, W)  # [B, n_g, Wv], [B, T, S, Wv]
                f = torch.cat([f[:, :, :1], P_f[l].expand(B, T, n_f, W), f[:, :, 1 + n_f:]], dim=2)
                x = torch.cat([g, f.view(B, T * S, W)], dim=1)  # [B, n_g + T*S, Wv]
            x = x + global_local_attention(block.attn, block.ln_1(x), n_g, T, keep)  # step 3
            return x + block.feed_forward(x)

        for l, block in enumerate(blocks):
            x = clip.checkpointed(blocks, layer, x, block, l)
        return self.clip.visual.head(x[:, 0])  # step 5: ln_post(global prompt 0) @ proj -> [B, E]

    def param_groups(self, weight_decay):
        """utils/optimization.py: decay on every trainable tensor whose name has no 'bias' (LN weights too)."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        return [dict(params=[p for n, p in named if "bias" not in n], weight_decay=weight_decay),
                dict(params=[p for n, p in named if "bias" in n], weight_decay=0.0)]


# ---- Reproducing the release ------------------------------------------------------------------------
# knightyxp/DGL's checkpoints: its parameter names, mapped to this file's


OFFICIAL_NAMES = {  # release name -> name here
    "visual.prompt_embeddings": "global_prompts",
    "visual_prompt_embedding": "latent_space.V",
    "prefix_text_prompt_proj_layer.": "latent_space.prefix_proj.",
    "postfix_text_prompt_proj_layer.": "latent_space.postfix_proj.",
    "unified_prompt_embedding.": "latent_space.U.",
    "PromptTransformer.resblocks.0.": "latent_space.block.",
    "unified_prompt_mlp.": "latent_space.text_mlp.",
}


def load_official_state_dict(model, state_dict):
    """Load a knightyxp/DGL state dict into a DGL model (CLIP4Clip's `clip.`/`module.` prefixes optional):
    release names are mapped to this file's; the frozen CLIP tensors keep OpenAI's names. -> missing keys."""
    mapped = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "clip."):
            k = k[len(prefix):] if k.startswith(prefix) else k
        if k == "visual.position_ids":  # an unused buffer of the release's CLIP
            continue
        for old, new in OFFICIAL_NAMES.items():
            if k.startswith(old):
                k = new + k[len(old):]
                break
        else:
            k = "clip." + k
        mapped[k] = v
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if unexpected or trainable & set(missing):
        raise ValueError(f"official state dict does not fit: unexpected {unexpected}, missing trainable "
                         f"{sorted(trainable & set(missing))}")
    return missing


if __name__ == "__main__":
    torch.manual_seed(0)
    ids = clip.tokenize(["a red circle moves to the left", "a blue square grows"], context_length=12)
    video, mask = torch.randn(2, 3, 3, 32, 32), torch.tensor([[True, True, True], [True, True, False]])
    for latent in ("linear", "transformer"):
        model = DGL(clip.CLIP(**clip.CONFIGS["tiny"]), num_frames=3, latent=latent)
        t, v = model.encode_text(ids), model.encode_video(video, mask)
        print(f"tiny {latent}: text {tuple(t.shape)} video {tuple(v.shape)} trainable {clip.count_trainable(model):,}")
    for latent in ("linear", "transformer"):
        with torch.device("meta"):  # counts only
            b32 = DGL(clip.CLIP(**clip.CONFIGS["ViT-B/32"]), num_frames=12, latent=latent)
        frozen = sum(p.numel() for p in b32.clip.parameters())
        n = clip.count_trainable(b32)
        print(f"ViT-B/32 {latent} (12 frames): trainable {n:,} = {100 * n / frozen:.3f} % of the frozen CLIP "
              f"({frozen:,})")
