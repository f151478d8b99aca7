"""simvtp.py: SimVTP, masked-autoencoder video-text pretraining, then retrieval fine-tuning.

SimVTP: Simple Video Text Pre-training with Masked Autoencoders (Ma, Yang, Shan, Li; arXiv 2212.03490,
https://arxiv.org/abs/2212.03490; only the abstract was available to us). Official code: mayuelala/SimVTP, read in
the copy wufeim/SimVTP @ 558d24e (modeling_pretrain.py, modeling_finetune.py, engine_for_*.py, masking_generator.py,
loss.py, scripts/*.sh). Walk-through with line references: docs/simvtp.md.

Two models, one per stage, built from the same encoder pieces (Block, PatchEmbed, TextEmbeddings below):
  SimVTPPretraining  modeling_pretrain.PretrainVisionTransformer: one ViT (tubelet Conv3d, fixed sin/cos positions
    added before masking, pre-LN blocks with q/v biases and no k bias, LN eps 1e-6) encodes [visible video ; masked
    caption]. 90% of the spatial cells are hidden in every time slice (tube masking, int() floor), 75% of the real
    caption tokens are drawn i.i.d. and ALL replaced by the mask id (no 80/10/10). A 384-wide decoder regresses
    per-tubelet normalised pixels of the masked tubes from [visible ; mask tokens]; a single Linear predicts the
    masked words; VTC (mean pooling, tau 0.05, both directions summed) runs the encoder per modality; VTM classifies
    B positives and B random non-matching (video swapped) pairs. Loss = L_mvm + L_mlm + L_vtc + L_vtm. Every pass
    sees the masked caption and masked video (the release masks input_ids in place, so VTC and VTM see them too).
  SimVTP  modeling_finetune.DualVideoTextEncoder, the retrieval model: two separate copies of the pretrained encoder
    (video and text tower), mean pooling, a fresh LN (fc_norm), cosine, tau 0.05. `towers_from_pretraining` fills
    both from a SimVTPPretraining state dict's `encoder.*` and `text_embeddings.*`, as run_simvtp_finetuning.py does.

Replacements: timm's ViT pieces -> the ~60 lines below (same parameter names, SDPA attention); HF BertEmbeddings ->
`TextEmbeddings` (same keys); BertTokenizerFast -> clip.tokenize; einops -> view/permute; decord -> data.py.

Deliberate deviations:
  1. Vocabulary: CLIP BPE (49408) + one mask id 49408 (vocab_size 49409), 77 text positions, SOT/EOT for
     [CLS]/[SEP]. CLIP pads with id 0 ("!"), so padding is found from the EOT position (argmax), not from id 0, and
     the pad rows are "!" embeddings (BERT's [PAD] row is 0). The release pads to the batch's longest caption and its
     mean pooling counts those pads; we keep all --max_words slots (static shapes: no GPU sync, one compiled graph),
     key-mask the pads and pool as if trimmed to the longest. The extra slots cost compute: keep --max_words near it.
  2. Init: random (BERT-style N(0, 0.02) text embeddings; xavier as the release elsewhere). The release starts from
     VideoMAE K400 and bert-base-uncased; `convert_official` maps VideoMAE/SimVTP checkpoints (the WordPiece-sized
     word embeddings and MLM head cannot map to BPE and are dropped).
  3. The positive half of the VTM batch is the joint pass of MVM/MLM (the release recomputes it; the two differ only
     by the embedding dropout's noise): 2B joint rows per step, not 3B.
  4. Frames are a parameter (the release assumes 16). Padded frames (video_mask False) are ignored by retrieval
     (their tubelets key-masked and left out of the pooling); pretraining ignores video_mask.
  5. Retrieval towers carry no dead weights (the release's video tower holds an unused BERT embedding, its text
     tower an unused patch embedding); one view per clip (deviation 9); no layer
     decay, as in effect in the release (its layer_decay=0.75 matches no parameter name: all start with
     video_encoder./text_encoder., so every group keeps scale 1).
  6. Recipe: single-stage cosine to 0 (the release decays to min lr 4e-5 / 2.5e-7). Fine-tuning uses train.py's
     symmetric InfoNCE: it averages the two directions where NormSoftmax sums them (a factor 2 on the loss) and
     gathers negatives across GPUs where the release uses each GPU's local batch of 8.
  7. No training augmentation (the release: RandAugment, RandomResizedCrop, flip, RandomErasing): centre crops of
     the release's frames (`sampling="window"`: 16 at stride 4 from one random 64-frame window).
  8. One caption per video (`pairs="video"`: 9,000 MSR-VTT pairs); the release's JSON is not shipped: we keep each
     video's first caption. 9. Test: one view (the middle stride-4 window, centre crop), not 3 windows x 3 crops.

Usage:
    pre = SimVTPPretraining(16)                               # ViT-B/16, 16 frames, 224 px
    out = pre.pretraining_loss(normalize_pixels(uint8_video), video_mask, clip.tokenize(captions))  # out["loss"]
    model = SimVTP(16); model.load_state_dict(model.towers_from_pretraining(pre.state_dict()), strict=False)
    t, v = model.encode_text(ids), model.encode_video(video, video_mask)          # [B, 768] each, cosine
"""

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

import clip

RECIPE = dict(  # fine-tuning, scripts/finetune_msrvtt.sh
    lr=7.5e-5, clip_lr=None,  # base 3e-4 x 64/256; no CLIP weights
    epochs=100, batch_size=64, frames=16, size=224,  # size = the release's img_size, passed to the constructor
    words=77,             # the release pads to the longest caption (trunc 512); we pool as if (deviation 1)
    sampling="window",    # datasets.py loadvideo_decord: 16 frames at stride 4, one random window (dev. 7, 9)
    pairs="video",        # train_9k_miech.json: one caption per video, 9,000 pairs (deviation 8)
    weight_decay=0.05, warmup=0.05, grad_clip=0.0,  # 5 of 100 epochs warmup, cosine; no clipping
    betas=(0.9, 0.999), eps=1e-8,
    patch_size=16, tubelet_size=2, width=768, depth=12, heads=12,  # ViT-B/16 (VideoMAE)
    drop_path=0.1, text_dropout=0.1,  # finetune_msrvtt.sh; BERT hidden_dropout_prob
    tau=0.05,             # NormSoftmaxLoss temperature, fixed
    pool_pads=True,       # mean pooling counts pad positions, as the release (deviation 1)
)
PRETRAIN_RECIPE = dict(RECIPE, lr=6e-4, epochs=200, batch_size=1024, warmup=0.2, betas=(0.9, 0.95), drop_path=0.0,
                       decoder_width=384, decoder_depth=4, decoder_heads=6,  # pretrain_simvtp_base_patch16_224
                       video_mask_ratio=0.9, text_mask_ratio=0.75)           # hard-coded in the pretraining script
# scripts/pretrain_webvid.sh, 8x8 V100 on WebVid-2M: base lr 1.5e-4 x 1024/256, 40 warmup epochs of 200
DATASET_RECIPES, PRETRAIN_DATASET_RECIPES = dict(), dict()  # the synthetic set's recipes: synthetic.RECIPES
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # VideoMAE's normalisation


def normalize_pixels(video):
    """uint8 [..., 3, H, W] -> float with ImageNet mean/std (VideoMAE's); train.py uses it instead of CLIP's."""
    mean, std = clip.channel_constants(video.device, IMAGENET_MEAN, IMAGENET_STD)  # made once per device
    return (video.float() / 255 - mean) / std


def sincos_table(n, dim):
    """Fixed positions (Transformer sin/cos, dim 2i sin, 2i+1 cos, base 10000) -> [1, n, dim], float64 math."""
    pos, j = torch.arange(n, dtype=torch.float64)[:, None], torch.arange(dim)
    angle = pos / torch.pow(10000.0, (2 * (j // 2) / dim).double())
    return torch.where(j % 2 == 0, angle.sin(), angle.cos()).float()[None]


# ----------------------------------------------------------------------------------------------------
# ViT pieces (timm's, with the release's attention: learnable q/v biases, no k bias, additive key mask)

class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, key_bias=None):  # x [B, N, C]; key_bias [B, N] additive (0 or -10000) or None
        B, N, C = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])  # k has no bias
        qkv = F.linear(x, self.qkv.weight, bias).view(B, N, 3, self.heads, C // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, h, N, C/h]
        mask = None if key_bias is None else key_bias[:, None, None, :].to(q.dtype)
        x = clip.sdpa(q, k, v, attn_mask=mask)  # scale (C/h)^-0.5
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Pre-LN transformer block (LN eps 1e-6), optional stochastic depth."""

    def __init__(self, dim, heads, drop_path=0.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, 4 * dim), act=nn.GELU(), fc2=nn.Linear(4 * dim, dim)))
        self.drop_path = drop_path

    def _drop(self, x):  # DropPath: zero whole samples' residual branches, rescale the rest
        if not self.training or self.drop_path == 0.0:
            return x
        keep = x.new_empty(x.shape[0], 1, 1).bernoulli_(1 - self.drop_path)
        return x * keep / (1 - self.drop_path)

    def forward(self, x, key_bias=None):
        x = x + self._drop(self.attn(self.norm1(x), key_bias))
        return x + self._drop(self.mlp(self.norm2(x)))


def make_blocks(dim, depth, heads, drop_path):
    return nn.ModuleList(Block(dim, heads, drop_path * i / max(depth - 1, 1)) for i in range(depth))  # timm's dpr


class PatchEmbed(nn.Module):
    """Tubelet embedding: Conv3d, kernel = stride = (tubelet, patch, patch); tokens ordered (t, h, w)."""

    def __init__(self, patch, tubelet, width):
        super().__init__()
        self.proj = nn.Conv3d(3, width, (tubelet, patch, patch), (tubelet, patch, patch))

    def forward(self, video):  # [B, T, 3, H, W]
        x = self.proj(video.transpose(1, 2))  # [B, W, T/t, H/p, W/p]
        return x.flatten(2).transpose(1, 2)  # [B, N, W], index = t*g*g + h*g + w


class TextEmbeddings(nn.Module):
    """BERT's embedding block (HF key names): word + absolute position + token type 0 -> LN(1e-12) -> dropout."""

    def __init__(self, vocab_size, context_length, width, dropout):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, width)
        self.position_embeddings = nn.Embedding(context_length, width)
        self.token_type_embeddings = nn.Embedding(2, width)
        self.LayerNorm, self.dropout = nn.LayerNorm(width, eps=1e-12), nn.Dropout(dropout)
        for e in (self.word_embeddings, self.position_embeddings, self.token_type_embeddings):
            nn.init.normal_(e.weight, std=0.02)  # BERT's initializer_range

    def forward(self, ids):  # [B, L]
        x = self.word_embeddings(ids) + self.position_embeddings.weight[:ids.shape[1]]
        return self.dropout(self.LayerNorm(x + self.token_type_embeddings.weight[0]))  # [B, L, W]


def init_linears(module, init):  # the release's _init_weights: Linear weights by `init`, biases 0, LN 1/0
    for m in module.modules():
        if isinstance(m, nn.Linear):
            init(m.weight)
            nn.init.zeros_(m.bias) if m.bias is not None else None


# ----------------------------------------------------------------------------------------------------
# What both stages share

class SimVTPBase(nn.Module):
    """The ViT geometry and its fixed positions, tau, caption handling and AdamW groups of both stages."""
    # train.py's method contract (docs/design.md), for both stages
    uses_clip = False  # its own encoders: built as cls(num_frames, size=..., **kwargs)
    normalize_pixels = staticmethod(normalize_pixels)  # VideoMAE's ImageNet statistics, not CLIP's
    similarity = None  # the loop's cosine of the pooled embeddings x logit_scale

    def __init__(self, num_frames, size, patch_size, tubelet_size, width, heads, tau, pool_pads, vocab_size,
                 context_length, widths_ok=True):
        super().__init__()
        if num_frames % tubelet_size or size % patch_size or width % heads or not widths_ok:
            raise ValueError(f"need frames % tubelet == 0 ({num_frames}, {tubelet_size}), size % patch == 0 "
                             f"({size}, {patch_size}) and widths divisible by heads")
        self.num_frames, self.size, self.patch_size, self.tubelet_size = num_frames, size, patch_size, tubelet_size
        self.grid = size // patch_size
        self.num_tokens = num_frames // tubelet_size * self.grid ** 2  # 8 * 196 = 1568 for ViT-B, 16 frames
        self.pool_pads, self.mask_id, self.context_length = pool_pads, vocab_size - 1, context_length
        self.register_buffer("pos_embed", sincos_table(self.num_tokens, width), persistent=False)
        self.register_buffer("logit_scale", torch.tensor(math.log(1 / tau)), persistent=False)  # fixed tau

    def _check_video(self, video):
        if video.dim() != 5 or tuple(video.shape[1:]) != (self.num_frames, 3, self.size, self.size):
            raise ValueError(f"video must be [B, {self.num_frames}, 3, {self.size}, {self.size}] "
                             f"(num_frames, size of the model), got {tuple(video.shape)}")

    def text_inputs(self, text):
        """CLIP ids [B, L] -> (ids [B, L], real-token mask [B, L] bool). L stays (static shapes, deviation 1)."""
        if text.dim() != 2 or text.dtype.is_floating_point:
            raise ValueError(f"text must be integer token ids [B, L], got {text.dtype} {tuple(text.shape)}")
        long = text.shape[1] > self.context_length  # more slots than positions: trim to the longest (a sync)
        ids = (text[:, :int(text.argmax(-1).max()) + 1] if long else text).long()
        if ids.shape[1] > self.context_length or clip.value_checks(ids) and int(ids.max()) >= self.mask_id:
            raise ValueError(f"captions must have <= {self.context_length} tokens and ids < {self.mask_id}")
        return ids, torch.arange(ids.shape[1], device=ids.device) <= ids.argmax(-1)[:, None]  # EOT: the largest id

    def _pool(self, x, valid):  # mean over tokens up to the batch's longest caption, its pads counted (deviation 1),
        if self.pool_pads:  # as if trimmed to it; pool_pads=False: over the real tokens only
            valid = (torch.arange(x.shape[1], device=x.device) < valid.sum(1, keepdim=True).amax()).expand_as(valid)
        return (x * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)

    def contrastive_loss(self, t, v):
        """NormSoftmax (loss.py): cosine / tau, CE in both directions, summed."""
        logits = F.normalize(t, dim=-1) @ F.normalize(v, dim=-1).T * self.logit_scale.exp()
        labels = torch.arange(len(logits), device=logits.device)
        return F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)

    def param_groups(self, weight_decay):
        """AdamW groups as optim_factory: no decay for 1-D params (biases, LN, q/v bias) and mask_token."""
        named = [(p.ndim <= 1 or n == "mask_token", p) for n, p in self.named_parameters() if p.requires_grad]
        return [dict(params=[p for no, p in named if not no], weight_decay=weight_decay),
                dict(params=[p for no, p in named if no], weight_decay=0.0)]


# ----------------------------------------------------------------------------------------------------
# Stage 1: masked video/text pretraining (modeling_pretrain.PretrainVisionTransformer, same key names)

class SimVTPPretraining(SimVTPBase):
    """The joint encoder, the pixel decoder, the MLM and VTM heads; `pretraining_loss` is its objective."""

    def __init__(self, num_frames, *, size=224, patch_size=16, tubelet_size=2, width=768, depth=12, heads=12,
                 decoder_width=384, decoder_depth=4, decoder_heads=6, video_mask_ratio=0.9, text_mask_ratio=0.75,
                 drop_path=0.0, text_dropout=0.1, tau=0.05, pool_pads=True, vocab_size=49409, context_length=77):
        super().__init__(num_frames, size, patch_size, tubelet_size, width, heads, tau, pool_pads, vocab_size,
                         context_length, widths_ok=decoder_width % decoder_heads == 0)
        self.num_masked = int(video_mask_ratio * self.grid ** 2)  # per time slice, int() floor: 176 of 196
        self.num_visible = self.num_tokens - self.num_masked * self.num_tokens // self.grid ** 2
        self.text_mask_ratio = text_mask_ratio
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(3, 1, 1), persistent=False)
        self.register_buffer("decoder_pos_embed", sincos_table(self.num_tokens, decoder_width), persistent=False)
        self.encoder = nn.ModuleDict(dict(patch_embed=PatchEmbed(patch_size, tubelet_size, width),
                                          blocks=make_blocks(width, depth, heads, drop_path),
                                          norm=nn.LayerNorm(width, eps=1e-6)))
        self.decoder = nn.ModuleDict(dict(blocks=make_blocks(decoder_width, decoder_depth, decoder_heads, drop_path),
                                          norm=nn.LayerNorm(decoder_width, eps=1e-6),
                                          head=nn.Linear(decoder_width, 3 * tubelet_size * patch_size ** 2)))
        self.encoder_to_decoder = nn.Linear(width, decoder_width, bias=False)  # PyTorch default init, as released
        self.mask_token = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, 1, decoder_width), std=.02, a=-.02, b=.02))
        self.text_embeddings = TextEmbeddings(vocab_size, context_length, width, text_dropout)
        self.text_cls = nn.Linear(width, vocab_size)  # MLM head: one Linear on the joint text rows
        self.vtm_head = nn.Linear(width, 2)
        for m in (self.encoder, self.decoder, self.text_cls, self.vtm_head):
            init_linears(m, nn.init.xavier_uniform_)  # modeling_pretrain.py

    # ------------------------------------------------------------------ masks and targets
    def random_tube_mask(self, batch, device=None):
        """Tube masking: per clip the same num_masked random spatial cells in every time slice. True = hidden."""
        cells = torch.rand(batch, self.grid ** 2, device=device).argsort(-1)[:, :self.num_masked]
        mask = torch.zeros(batch, self.grid ** 2, dtype=torch.bool, device=device).scatter_(1, cells, True)
        return mask.repeat(1, self.num_tokens // self.grid ** 2)  # [B, N]: slice-major, as the token order

    def split_tokens(self, tube_mask):  # x.take_along_dim(visible, 1) = x[~tube_mask].view(B, N_vis, -1), no sync
        order = tube_mask.to(torch.uint8).argsort(dim=1, stable=True)  # [B, N]: visible, then hidden, in token order
        return order[:, :self.num_visible, None], order[:, self.num_visible:, None]  # [B, N_vis, 1], [B, N_mask, 1]

    def random_text_mask(self, attn):
        """Each real token (not SOT, EOT or padding) is selected i.i.d. with p = text_mask_ratio. [B, L] bool."""
        pos = torch.arange(attn.shape[1], device=attn.device)
        real = attn & (pos > 0) & (pos < attn.sum(1, keepdim=True) - 1)
        return (torch.rand(attn.shape, device=attn.device) < self.text_mask_ratio) & real

    def pixel_targets(self, video, tube_mask):
        """Undo ImageNet norm, cut tubelets, normalise each per channel (unbiased std + 1e-6), keep the
        masked ones in token order -> [B, N_mask, t*p*p*3], flattened (t, h, w, c) with c fastest."""
        B, T, C, H, W = video.shape
        t, p, g = self.tubelet_size, self.patch_size, self.grid
        v = (video * self.std + self.mean).view(B, T // t, t, C, g, p, g, p)
        v = v.permute(0, 1, 4, 6, 2, 5, 7, 3).reshape(B, self.num_tokens, t * p * p, C)  # [B, N, t*p*p, 3]
        v = (v - v.mean(2, keepdim=True)) / (v.var(2, unbiased=True, keepdim=True).sqrt() + 1e-6)
        v = v.reshape(B, self.num_tokens, t * p * p * C)
        return v.take_along_dim(self.split_tokens(tube_mask)[1], 1)  # [B, N_mask, t*p*p*3], = v[tube_mask]

    # ------------------------------------------------------------------ the four heads and their loss
    def _encode(self, x, key_bias=None):  # the unified encoder with its final LN
        for blk in self.encoder.blocks:  # clip.checkpointed: each block rerun in backward under --grad_checkpointing
            x = clip.checkpointed(self.encoder.blocks, blk, x, key_bias)
        return self.encoder.norm(x)

    def pretraining_outputs(self, video, ids, attn, tube_mask, text_select, negatives):
        """All four heads on one batch. video [B, T, 3, H, W] normalised; ids/attn [B, L]; tube_mask [B, N] (True =
        hidden); text_select [B, L] (True = replace by mask id); negatives [B]: pair i's negative video (!= i)."""
        B, N_vis, (shown, hidden) = video.shape[0], self.num_visible, self.split_tokens(tube_mask)
        x = self.encoder.patch_embed(video) + self.pos_embed  # [B, N, W], positions before masking
        vis = x.take_along_dim(shown, 1)  # [B, N_vis, W], token order kept
        t = self.text_embeddings(ids.masked_fill(text_select, self.mask_id))  # [B, L, W]
        text_bias = (~attn).float() * -10000.0  # BERT's extended attention mask
        # (a)+(d) joint passes [visible video ; masked text]: B positives, then B pairs with swapped videos
        joint = self._encode(torch.cat([torch.cat([vis, t], 1), torch.cat([vis[negatives], t], 1)]),
                             torch.cat([F.pad(text_bias, (N_vis, 0))] * 2))  # [2B, N_vis + L, W]
        # MVM: decoder sees [visible ; mask tokens] with their positions, predicts only the masked tubes
        y = self.encoder_to_decoder(joint[:B, :N_vis])  # [B, N_vis, Wd]
        pos = self.decoder_pos_embed.expand(B, -1, -1)  # [B, N, Wd]; y becomes [B, N, Wd] too
        y = torch.cat([y + pos.take_along_dim(shown, 1), self.mask_token + pos.take_along_dim(hidden, 1)], 1)
        for blk in self.decoder.blocks:
            y = clip.checkpointed(self.decoder.blocks, blk, y)
        pixel_pred = self.decoder.head(self.decoder.norm(y[:, N_vis:]))  # [B, N_mask, 3*t*p*p]
        # MLM: one Linear on the joint encoder's text rows; the loss reads those of the masked words
        mlm_logits = self.text_cls(joint[:B, N_vis:])  # [B, L, V]
        # VTC: (b) visible video alone, (c) masked text alone, mean pooled
        vtc_video = self._encode(vis).mean(1)
        vtc_text = self._pool(self._encode(t, text_bias), attn)
        # VTM: mean over all joint tokens, 2-way head
        vtm_logits = self.vtm_head(self._pool(joint, F.pad(attn, (N_vis, 0), value=True).repeat(2, 1)))
        return dict(pixel_pred=pixel_pred, mlm_logits=mlm_logits, vtc_video=vtc_video, vtc_text=vtc_text,
                    vtm_logits=vtm_logits)

    def pretraining_loss(self, video, video_mask, text, *, tube_mask=None, text_select=None, negatives=None):
        """-> dict(loss = mvm + mlm + vtc + vtm, and the four terms). Masks and VTM negatives are drawn here
        unless given (tests, oracle). video_mask is not used in pretraining (deviation 4)."""
        self._check_video(video)
        (ids, attn), B = self.text_inputs(text), video.shape[0]
        if B < 2 or ids.shape[0] != B:
            raise ValueError(f"need >= 2 clips (VTC/VTM negatives) and one caption per clip, got {B}, {len(ids)}")
        tube_mask = self.random_tube_mask(B, video.device) if tube_mask is None else tube_mask
        text_select = self.random_text_mask(attn) if text_select is None else text_select
        if negatives is None:  # uniform over j != i (the release: torch.randint with rejection)
            negatives = (torch.arange(B, device=video.device) + torch.randint(1, B, (B,), device=video.device)) % B
        out = self.pretraining_outputs(video, ids, attn, tube_mask, text_select, negatives)
        mvm = F.mse_loss(out["pixel_pred"], self.pixel_targets(video, tube_mask))
        ce = F.cross_entropy(out["mlm_logits"].flatten(0, 1), ids.flatten(), reduction="none")  # [B*L]
        mlm = (ce * text_select.flatten()).sum() / text_select.sum().clamp(min=1)  # masked words; none: 0, not NaN
        vtc = self.contrastive_loss(out["vtc_text"], out["vtc_video"])
        vtm = F.cross_entropy(out["vtm_logits"], torch.arange(2 * B, device=video.device).lt(B).long())  # 1s, then 0s
        return dict(loss=mvm + mlm + vtc + vtm, mvm=mvm, mlm=mlm, vtc=vtc, vtm=vtm)


# ----------------------------------------------------------------------------------------------------
# Stage 2: the retrieval model (modeling_finetune.DualVideoTextEncoder, without its dead weights)

class SimVTP(SimVTPBase):
    """Two towers, each a copy of the pretrained encoder: encode_video / encode_text, cosine at tau 0.05."""

    def __init__(self, num_frames, *, size=224, patch_size=16, tubelet_size=2, width=768, depth=12, heads=12,
                 drop_path=0.0, text_dropout=0.1, tau=0.05, pool_pads=True, vocab_size=49409, context_length=77):
        super().__init__(num_frames, size, patch_size, tubelet_size, width, heads, tau, pool_pads, vocab_size,
                         context_length)
        self.video_encoder = nn.ModuleDict(dict(patch_embed=PatchEmbed(patch_size, tubelet_size, width),
                                                blocks=make_blocks(width, depth, heads, drop_path),
                                                fc_norm=nn.LayerNorm(width, eps=1e-6)))
        self.text_encoder = nn.ModuleDict(dict(
            text_embeddings=TextEmbeddings(vocab_size, context_length, width, text_dropout),
            blocks=make_blocks(width, depth, heads, drop_path), fc_norm=nn.LayerNorm(width, eps=1e-6)))
        for m in (self.video_encoder.blocks, self.text_encoder.blocks):  # modeling_finetune.py, if not loaded
            init_linears(m, lambda w: nn.init.trunc_normal_(w, std=0.02))

    def encode_video(self, video, video_mask):
        """[B, T, 3, H, W] ImageNet-normalised, [B, T] bool -> [B, W]: all tokens, no final LN, fc_norm(mean)."""
        self._check_video(video)
        B, T = video_mask.shape
        valid = video_mask.view(B, T // self.tubelet_size, self.tubelet_size).any(-1)  # [B, T/t] tubelet has a frame
        valid = valid[:, :, None].expand(-1, -1, self.grid ** 2).reshape(B, self.num_tokens)  # [B, N]
        x = self.video_encoder.patch_embed(video) + self.pos_embed  # [B, N, W]
        key_bias = (~valid).float() * -10000.0  # zeros when no frame is padded
        for blk in self.video_encoder.blocks:
            x = clip.checkpointed(self.video_encoder.blocks, blk, x, key_bias)
        x = (x * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp(min=1)  # = mean when no padding
        return self.video_encoder.fc_norm(x)

    def encode_text(self, text):
        """CLIP ids [B, L] -> [B, W]: unmasked caption, pad key mask, fc_norm(mean over positions)."""
        ids, attn = self.text_inputs(text)
        x = self.text_encoder.text_embeddings(ids)
        for blk in self.text_encoder.blocks:
            x = clip.checkpointed(self.text_encoder.blocks, blk, x, (~attn).float() * -10000.0)
        return self.text_encoder.fc_norm(self._pool(x, attn))

    def towers_from_pretraining(self, state_dict):
        """A SimVTPPretraining state dict -> this model's names, as run_simvtp_finetuning.py loads it: `encoder.*` fills
        the video tower's patch_embed and both towers' blocks, `text_embeddings.*` the text tower's, fc_norm stays
        fresh; the rest (encoder.norm, decoder, heads) and this model's own keys pass unchanged: load the result with
        load_state_dict(strict=False), which lists the pretraining-only tensors as unexpected."""
        out = {}
        for k, v in state_dict.items():
            if k.startswith(("encoder.patch_embed.", "encoder.blocks.")):
                out["video_" + k] = v
            if k.startswith("encoder.blocks."):
                out["text_" + k] = v
            if k.startswith("text_embeddings."):
                out["text_encoder." + k] = v
            if not k.startswith(("encoder.", "text_embeddings.")) or k.startswith("encoder.norm."):
                out[k] = v
        fresh = {f"{tower}.fc_norm.{n}": p.detach().clone() for tower in ("video_encoder", "text_encoder")
                 for n, p in getattr(self, tower).fc_norm.state_dict().items()}
        return {**fresh, **out} if any(k.startswith("video_encoder.") for k in out) else out


# ----------------------------------------------------------------------------------------------------
# ---- Reproducing the release ----
# Loading its checkpoints, its figure, and its parameter counts: nothing above calls these.


def convert_official(sd, model):
    """Official SimVTP/VideoMAE state dict -> ours. Asserts every kept key's shape. The vocabulary-sized
    tensors (BERT WordPiece: word_embeddings, text_cls) cannot map to CLIP BPE and are dropped (keep ours);
    BERT's 512 positions are cut to context_length; HF buffers and the towers' dead weights are dropped."""
    sd = sd.get("model", sd.get("module", sd))
    own, out = model.state_dict(), {}
    for k, v in sd.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if k.endswith(("position_ids", "token_type_ids")) or k.startswith(("video_encoder.text_embeddings.",
                                                                           "text_encoder.patch_embed.")):
            continue
        if (k.endswith("word_embeddings.weight") or k.startswith("text_cls.")) and v.shape != own[k].shape:
            continue
        if k.endswith("position_embeddings.weight"):
            v = v[:model.context_length]
        if k not in own or v.shape != own[k].shape:
            raise KeyError(f"{k} {tuple(v.shape)} does not match the model: "
                           f"{tuple(own[k].shape) if k in own else 'no such key'}")
        out[k] = v
    return out


def param_counts(p, f):  # a SimVTPPretraining and a SimVTP
    n = lambda *mods: sum(q.numel() for x in mods for q in x.parameters())  # noqa: E731
    return {"encoder": n(p.encoder), "text_embeddings": n(p.text_embeddings), "encoder_to_decoder + mask_token":
            n(p.encoder_to_decoder) + p.mask_token.numel(), "pixel decoder": n(p.decoder), "MLM head": n(p.text_cls),
            "VTM head": n(p.vtm_head), "pretrain total": n(p), "video tower": n(f.video_encoder),
            "text tower": n(f.text_encoder), "finetune total": n(f)}


@torch.no_grad()
def visualize(model, video, text, path, scale=4):
    """docs/simvtp_vis.png for a few clips (video ImageNet-normalised [B, T, 3, H, W], CLIP ids [B, L]): per clip
    the original frames, the masked input (grey), the reconstruction (predicted masked tubes de-normalised with
    their true mean/std, as VideoMAE's visualisation), then the caption with its masked words [in brackets] and
    the predicted words. Writes the PNG to path (cv2.imwrite) and returns it (BGR uint8)."""
    import cv2
    import numpy as np
    model.eval()
    B, T, C, H, W = video.shape
    t, p, g, N = model.tubelet_size, model.patch_size, model.grid, model.num_tokens
    ids, attn = model.text_inputs(text)
    tube, select = model.random_tube_mask(B, video.device), model.random_text_mask(attn)
    out = model.pretraining_outputs(video, ids, attn, tube, select, torch.arange(1, B + 1) % B)
    tok = (video * model.std + model.mean).clamp(0, 1).view(B, T // t, t, C, g, p, g, p)
    tok = tok.permute(0, 1, 4, 6, 2, 5, 7, 3).reshape(B, N, t * p * p, C)  # as pixel_targets
    mu, sd = tok.mean(2, keepdim=True), tok.var(2, keepdim=True).sqrt() + 1e-6
    rec = tok.clone()
    rec[tube] = (out["pixel_pred"].reshape(-1, t * p * p, C) * sd[tube] + mu[tube]).clamp(0, 1)
    rows = [x.reshape(B, T // t, g, g, t, p, p, C).permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(B, T, H, W, C)
            for x in (tok, tok.masked_fill(tube[..., None, None], 0.5), rec)]  # frames, masked input, reconstruction
    pred = torch.where(select, out["mlm_logits"][..., :model.mask_id].argmax(-1), ids)  # never the mask id
    dec, blocks = clip._tokenizer().decode, []
    for b in range(B):
        grid = torch.cat([torch.cat(list(r[b]), 1) for r in rows], 0)  # [3H, T*W, C]
        img = np.ascontiguousarray((grid.flip(-1) * 255).byte().cpu().numpy())  # RGB -> BGR
        img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        words = [(dec([int(ids[b, i])]).strip(), dec([int(pred[b, i])]).strip(), bool(select[b, i]))
                 for i in range(1, int(attn[b].sum()) - 1)]  # words sit at 1 .. EOT-1
        lines = ["caption:   " + " ".join(f"[{w}]" if s else w for w, _, s in words),
                 "predicted: " + " ".join(f"[{q}]" if s else w for w, q, s in words)]
        text_img = np.full((22 * len(lines) + 8, img.shape[1], 3), 255, np.uint8)
        for i, line in enumerate(lines):
            cv2.putText(text_img, line, (6, 20 + 22 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
        blocks += [img, text_img, np.full((10, img.shape[1], 3), 200, np.uint8)]
    figure = np.concatenate(blocks, 0)
    cv2.imwrite(path, figure)
    return figure


if __name__ == "__main__":  # tiny-config check, then the official ViT-B/16 counts (meta device: no memory)
    tiny = dict(size=32, patch_size=8, tubelet_size=2, width=64, depth=2, heads=2)  # synthetic.RECIPES' ViT
    pre = SimVTPPretraining(8, **tiny, decoder_width=32, decoder_depth=1, decoder_heads=1)
    ret = SimVTP(8, **tiny)
    video, text, mask = torch.randn(2, 8, 3, 32, 32), clip.tokenize(["a red circle", "a blue square grows"]), None
    print({k: round(v.item(), 3) for k, v in pre.pretraining_loss(video, mask, text).items()})
    ret.load_state_dict(ret.towers_from_pretraining(pre.state_dict()), strict=False)  # both towers from the encoder
    print("tiny:", ret.encode_text(text).shape, ret.encode_video(video, torch.ones(2, 8, dtype=torch.bool)).shape,
          clip.count_trainable(pre), "/", clip.count_trainable(ret), "trainable")
    with torch.device("meta"):
        counts = param_counts(SimVTPPretraining(16), SimVTP(16))
    for k, v in counts.items():
        print(f"ViT-B/16 {k:32s} {v:>13,d}")
