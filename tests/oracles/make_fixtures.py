"""Write the equivalence fixtures in tests/fixtures/ by running the OFFICIAL code of each method.

Not part of nanoTVR: the project and the tests never import this file (pytest collects only test_*.py).
It builds each official module on the CPU at a tiny config, feeds it fixed random inputs and saves, per
method, one small file tests/fixtures/official_<method>.pt that holds the weights, the inputs, the outputs,
the loss, the gradients of the trainable tensors and (Cross-Modal Adapter) three optimizer steps. The tests
(test_clip_load.py, test_ump_official.py, test_dgl_oracle.py, test_adapter_oracle.py, test_unipt.py,
test_simvtp_oracle.py) load them with torch.load(path, weights_only=True) and run nanoTVR's modules on the
same numbers. Every file records
the official repository, the commit (`git rev-parse HEAD` of the checkout) and the torch version.

Nothing of the official code is copied here: this script only imports, constructs and calls it. Weights
and inputs are rounded to fp16-exact values before the official run and stored as fp16 (casting back to fp32
is exact; scalars such as logit_scale = ln 100 stay fp32), which halves the files; outputs and gradients are
stored in fp32.

Regenerate
    # 1. checkouts of the official repositories at the commits nanoTVR pins (equal to their HEAD today)
    mkdir -p /work/official && cd /work/official
    git clone https://github.com/openai/CLIP && git -C CLIP checkout d05afc4
    git clone https://github.com/zchoi/UMP_TVR && git -C UMP_TVR checkout 9ec554a
    git clone https://github.com/knightyxp/DGL && git -C DGL checkout 9139fd1
    git clone https://github.com/LeapLabTHU/Cross-Modal-Adapter && git -C Cross-Modal-Adapter checkout 07b2203
    git clone https://github.com/Paranioar/UniPT && git -C UniPT checkout 3fa457d
    git clone https://github.com/wufeim/SimVTP && git -C SimVTP checkout 558d24e  # a copy of mayuelala/SimVTP
    # (a few large data blobs of UMP_TVR, DGL and UniPT may be missing from a mirror; only code is read)
    # 2. a separate environment: nanoTVR's requirements plus what the official files import
    python -m venv .venv && .venv/bin/pip install -r /path/to/nanoTVR/requirements.txt \
        timm einops scipy transformers boto3 requests
    # 3. from the nanoTVR root (a method whose path is not given is skipped)
    /work/official/.venv/bin/python tests/oracles/make_fixtures.py --clip /work/official/CLIP \
        --ump /work/official/UMP_TVR --dgl /work/official/DGL --adapter /work/official/Cross-Modal-Adapter \
        --unipt /work/official/UniPT --simvtp /work/official/SimVTP
Runs in about a minute on 2 CPU cores. With torch's CPU kernels, a regenerated file differs from the committed
one only in the last bits of the outputs; the tests' tolerances are a few times the measured differences.
"""
import argparse
import importlib
import importlib.util
import math
import os
import subprocess
import sys
import tempfile
import types

import torch
import torch.nn.functional as F

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")
LN100 = math.log(100.0)  # pretrained CLIP's logit_scale: logits away from chance


# ------------------------------------------------------------------------------------------------ helpers
def provenance(repo, path):
    commit = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    return dict(repo=repo, commit=commit, torch=str(torch.__version__))


def load_file(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def stub_missing(names):
    """Modules the official files import but never use on the paths run here."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            mod = types.ModuleType(name)
            mod.tqdm = lambda it=None, *a, **k: it
            mod.ClientError = Exception
            sys.modules[name] = mod


def purge(prefixes):
    """Forget modules of a previous official repo (several repos have a top-level 'modules' package)."""
    for k in [k for k in sys.modules if k.split(".")[0] in prefixes]:
        del sys.modules[k]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def perturb(module, g, skip=()):
    """Move LayerNorm weights to 1 + 0.1 N and biases to 0.02 N (a dropped bias or mis-wired LN then shows)."""
    with torch.no_grad():
        for n, p in module.named_parameters():
            if any(s in n for s in skip):
                continue
            leaf = n.rsplit(".", 1)[-1]
            is_ln = ("ln_" in n or "norm" in n.lower()) and p.dim() == 1
            if is_ln and leaf == "weight":
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif leaf.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def fp16_exact(module):
    """Round every float parameter and buffer but the scalars (logit_scale stays ln 100, in fp32) to an
    fp16-representable value, in place."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point() and t.dim() > 0:
                t.copy_(t.half().float())


def half(sd):
    """A state dict as plain fp16 tensors (the values are fp16-exact, see fp16_exact), scalars in fp32."""
    out = {}
    for k, v in sd.items():
        v = v.detach().clone()
        if v.is_floating_point() and v.dim() > 0:
            assert torch.equal(v.half().float(), v.float()), k
            v = v.half()
        out[k] = v.contiguous()
    return out


def randn16(*shape, g):
    return torch.randn(*shape, generator=g).half().float()


def captions(g, lengths, L, V, batch_dims=()):
    """SOT=V-2, n random word ids in 1..V-3, EOT=V-1 (the largest id: CLIP pools at argmax), zero padding."""
    ids = torch.zeros(len(lengths), L, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, 0], ids[i, n + 1] = V - 2, V - 1
        ids[i, 1:n + 1] = torch.randint(1, V - 2, (n,), generator=g)
    return ids


def detach(x):
    if isinstance(x, dict):
        return {k: detach(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [detach(v) for v in x]
    return x.detach().clone().contiguous() if torch.is_tensor(x) else x


def grads(module, names=None):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters()
            if p.grad is not None and (names is None or n in names)}


def infonce(logits):
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def save(name, payload):
    path = os.path.join(FIXTURES, f"official_{name}.pt")
    torch.save(payload, path)
    torch.load(path, weights_only=True)  # plain tensors / dicts / lists / str / numbers only
    print(f"wrote {path}: {os.path.getsize(path) / 1024:.0f} KiB ({payload['provenance']['repo']} @ "
          f"{payload['provenance']['commit'][:7]})")


# ------------------------------------------------------------------------------------------------ CLIP
CLIP_TINY = dict(embed_dim=32, image_resolution=16, vision_layers=1, vision_width=128, vision_patch_size=8,
                 context_length=16, vocab_size=100, transformer_width=64, transformer_heads=1,
                 transformer_layers=2)


def make_clip(src):
    """openai/CLIP's clip/model.py: a ViT CLIP with 2-head vision attention, its fp32 outputs and the
    gradients of the CLIP loss for every tensor of <= 8192 entries (LayerNorms, biases, embeddings, projections:
    the ones at the bottom of each tower see the backward pass through every block)."""
    om = load_file("official_clip_model", os.path.join(src, "clip", "model.py"))
    torch.manual_seed(0)
    model = om.CLIP(**CLIP_TINY).float().eval()
    g = gen(1)
    perturb(model, g)
    with torch.no_grad():
        model.logit_scale.fill_(LN100)
    fp16_exact(model)
    c = CLIP_TINY
    images = randn16(4, 3, c["image_resolution"], c["image_resolution"], g=g)
    text = captions(g, [3, 14, 7, 1], c["context_length"], c["vocab_size"])  # caption 1 fills the context
    tokens = {}
    hv = model.visual.transformer.register_forward_hook(lambda m, i, o: tokens.__setitem__("v", o))
    ht = model.ln_final.register_forward_hook(lambda m, i, o: tokens.__setitem__("t", o))
    img = model.encode_image(images)
    txt = model.encode_text(text)
    hv.remove()
    ht.remove()
    image_tokens = model.visual.ln_post(tokens["v"].permute(1, 0, 2)) @ model.visual.proj  # [B, 1+g*g, E]
    text_tokens = tokens["t"] @ model.text_projection
    logits_per_image, _ = model(images, text)
    loss = infonce(logits_per_image)
    loss.backward()
    payload = dict(provenance=provenance("openai/CLIP", src), config=dict(CLIP_TINY),
                   state_dict=half(model.state_dict()), inputs=dict(images=images.half(), text=text),
                   outputs=detach(dict(image_features=img, text_features=txt, image_tokens=image_tokens,
                                       text_tokens=text_tokens, logits_per_image=logits_per_image)),
                   loss=detach(loss), grads={k: v for k, v in grads(model).items() if v.numel() <= 8192})
    save("clip", payload)


# ------------------------------------------------------------------------------------------------ UMP
UMP_TINY = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=16,
                context_length=16, vocab_size=100, transformer_width=32, transformer_heads=2, transformer_layers=2)
UMP_FRAMES, UMP_D_FF = 3, 128


def make_ump(src):
    """zchoi/UMP_TVR's model/clip_model.py CLIP (prompts in both towers, its hard-coded "linear" generator
    branch) inside model/clip_baseline.py CLIPBaseline(pooling_type='avg'), the mean-pooling baseline, in eval
    mode; loss: modules/metrics.py sim_matrix_training + modules/loss.py CLIPLoss, backward to every prompt
    tensor. The release's generators are nn.TransformerEncoderLayer(width, nhead=8), FFN 2048 by torch's
    default; to keep the file small their linear1/linear2 are rebuilt at FFN 128 before anything runs (the
    official forward is unchanged; nanoTVR is built with d_ff=128 to match)."""
    stub_missing(["tqdm", "scipy", "scipy.stats"])
    purge({"model", "modules", "config"})
    sys.path.insert(0, src)
    try:
        cm = importlib.import_module("model.clip_model")
        cb = importlib.import_module("model.clip_baseline")
        metrics = importlib.import_module("modules.metrics")
        losses = importlib.import_module("modules.loss")
        torch.manual_seed(0)
        model = cm.CLIP(**UMP_TINY).float()
        for tower in (model.transformer, model.visual.transformer):
            for layer in (tower.encoder_layer, tower.prompt_encoder.layers[0]):  # the second is what runs
                w = layer.linear1.in_features
                layer.linear1, layer.linear2 = torch.nn.Linear(w, UMP_D_FF), torch.nn.Linear(UMP_D_FF, w)
        g = gen(1)
        perturb(model, g)
        with torch.no_grad():
            model.logit_scale.fill_(LN100)
        fp16_exact(model)
        cfg = types.SimpleNamespace(huggingface=False, clip_arch="ViT-B/32", pooling_type="avg",
                                    embed_dim=UMP_TINY["embed_dim"], num_frames=UMP_FRAMES,
                                    input_res=UMP_TINY["image_resolution"], k=-1, attention_temperature=0.01)
        load = cm.load_clip
        cm.load_clip = lambda *a, **k: model  # no download: the baseline wraps the CLIP built here
        try:
            baseline = cb.CLIPBaseline(cfg)
        finally:
            cm.load_clip = load
        baseline.eval()  # the generators' dropout (0.1) off
    finally:
        sys.path.remove(src)
    c, R = UMP_TINY, UMP_TINY["image_resolution"]
    # EOT at 4, 6 and 12: the third caption ends inside the last 8 slots, which the release's text prompts replace
    text = captions(g, [3, 5, 11], c["context_length"], c["vocab_size"])
    video = randn16(3, UMP_FRAMES, 3, R, R, g=g)
    trainable = [n for n, p in model.named_parameters()  # the rule of the release's train.py
                 if "learnable_prompt" in n or "prompt_encoder" in n or "encoder_layer" in n]
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
    prompts = {"text": [], "video": []}
    hooks = [tower.prompt_encoder.register_forward_hook(lambda m, i, o, k=k: prompts[k].append(o[:, -8:]))
             for k, tower in (("text", model.transformer), ("video", model.visual.transformer))]
    frames = model.encode_image(video.flatten(0, 1)).view(3, UMP_FRAMES, -1)
    text_embeds = model.encode_text(text)
    for h in hooks:
        h.remove()
    t, v = baseline({"text": text, "video": video})
    sims = metrics.sim_matrix_training(t, v, "avg")
    loss = losses.CLIPLoss()(sims, model.logit_scale)
    loss.backward()
    keep = lambda n: ".encoder_layer." not in n and not n.startswith("visual.transformer.learnable_prompt.")
    payload = dict(
        provenance=provenance("zchoi/UMP_TVR", src),
        config=dict(UMP_TINY, num_frames=UMP_FRAMES, d_ff=UMP_D_FF, n_prompts=8),
        # encoder_layer.* (a copy that never runs) and the video tower's frame-wise learnable_prompt.* (unused by
        # the hard-coded branch) are left out
        state_dict=half({k: v for k, v in model.state_dict().items() if keep(k)}),
        inputs=dict(text=text, video=video.half()),
        outputs=detach(dict(text_embeds=text_embeds, frame_embeds=frames, text_prompts=torch.stack(prompts["text"])[:, 0],
                            video_prompts=torch.stack(prompts["video"])[:, 0], text_pooled=t, video_pooled=v,
                            logits=model.logit_scale.exp() * sims)),
        loss=detach(loss), grads={n: gr for n, gr in grads(model).items() if keep(n)})
    assert all(n in payload["grads"] for n in trainable if keep(n))
    save("ump", payload)


# ------------------------------------------------------------------------------------------------ DGL
DGL_TINY = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=16,
                context_length=16, vocab_size=100, transformer_width=32, transformer_heads=2, transformer_layers=2)
DGL_FRAMES, DGL_WORDS, DGL_BATCH = 3, 8, 3
DGL_NEW = {  # the release's params.py new_added_modules: substrings of the trainable names, per latent space
    "transformer": ["PromptTransformer", "unified_prompt_mlp", "unified_prompt_embedding", "prompt_proj",
                    "prompt_embeddings"],
    "linear": ["visual_prompt_embedding", "prompt_embeddings", "prefix_text_prompt_proj_layer",
               "postfix_text_prompt_proj_layer"],
}


def make_dgl(src):
    """knightyxp/DGL's modules/clip.py CLIP (encode_prompt, encode_text, encode_image with the global prompt
    output 'global_prompt0') for both latent spaces, eval mode, logit_scale ln 100, loss as clip4clip.py's
    meanP: (CrossEn(S) + CrossEn(S.T)) / 2 with modules/losses.py CrossEn. The release hard-codes the global
    prompts' width (visual.prompt_embeddings [1, 4, 768]); the tiny vision tower is 64 wide, so that one tensor
    is replaced before the run by a [1, 4, 64] one drawn by the release's own rule (xavier-uniform bound)."""
    stub_missing(["tqdm"])
    purge({"dgl_official"})
    pkg = types.ModuleType("dgl_official")  # modules/ as a package whose __init__ (clip4clip's extras) never runs
    pkg.__path__ = [os.path.join(src, "modules")]
    sys.modules["dgl_official"] = pkg
    cm = importlib.import_module("dgl_official.clip")
    ce = importlib.import_module("dgl_official.losses").CrossEn()
    c, T, B = DGL_TINY, DGL_FRAMES, DGL_BATCH
    g = gen(1)
    # EOT at 2, 5 and 7 (the last slot); the text length equals max_words, as the release requires
    text = captions(g, [1, 4, 6], DGL_WORDS, c["vocab_size"])
    video = randn16(B, T, 3, c["image_resolution"], c["image_resolution"], g=g)
    payload = dict(provenance=provenance("knightyxp/DGL", src),
                   config=dict(c, num_frames=T, words=DGL_WORDS, n_g=4, n_f=4, n_t=8),
                   inputs=dict(text=text, video=video.half()))
    for latent in ("linear", "transformer"):
        ns = argparse.Namespace(shared_latent_space=latent, global_visual_prompt_length=4,
                                local_each_frame_prompt_length=4, text_prompt_length=8,
                                unified_transformer_layers=c["vision_layers"], visual_output_type="global_prompt0",
                                max_words=DGL_WORDS, time_embedding=0)
        torch.manual_seed(0)
        model = cm.CLIP(*c.values(), video_frames=T, args=ns).float().eval()
        W, patch = c["vision_width"], c["vision_patch_size"]
        bound = math.sqrt(6.0 / (3 * patch * patch + W))
        model.visual.prompt_embeddings = torch.nn.Parameter(torch.empty(1, 4, W).uniform_(-bound, bound))
        trainable = [n for n, _ in model.named_parameters() if any(k in n for k in DGL_NEW[latent])]
        if latent == "linear":
            perturb(model, gen(2), skip=trainable)  # the prompt tensors keep the release's init
            with torch.no_grad():
                model.logit_scale.fill_(LN100)
            fp16_exact(model)
            frozen = {k: v.clone() for k, v in model.state_dict().items() if k not in trainable}
            payload["state_dict"] = half(frozen)  # the frozen CLIP, shared by both latent spaces
        else:
            assert not set(model.load_state_dict(frozen, strict=False).unexpected_keys)
            fp16_exact(model)
        for n, p in model.named_parameters():
            p.requires_grad_(n in trainable)
        text_prompts, visual_prompts = model.encode_prompt(B, "cpu")
        t = model.encode_text(text, text_prompts)
        v = model.encode_image(video.flatten(0, 1), visual_prompts, video_frame=T).squeeze(1)
        logits = model.logit_scale.exp() * F.normalize(t, dim=-1) @ F.normalize(v, dim=-1).t()
        loss = (ce(logits) + ce(logits.t())) / 2
        loss.backward()
        payload[latent] = dict(state_dict=half({k: v for k, v in model.state_dict().items() if k not in frozen}),
                               trainable=trainable,
                               outputs=detach(dict(text_prompts=text_prompts[:, 0], visual_prompts=visual_prompts[:, 0],
                                                   text_embeds=t, video_embeds=v, logits=logits)),
                               loss=detach(loss), grads=grads(model, trainable))
        assert len(payload[latent]["grads"]) == len(trainable)
    save("dgl", payload)


# ------------------------------------------------------------------------------------------------ Adapter
ADAPTER_TINY = dict(embed_dim=32, image_resolution=16, vision_layers=2, vision_width=64, vision_patch_size=8,
                    context_length=16, vocab_size=100, transformer_width=64, transformer_heads=1,
                    transformer_layers=2)  # CLIP4Clip infers heads = width // 64
ADAPTER_R, ADAPTER_FRAMES, ADAPTER_WORDS = 8, 4, 8
ADAPTER_VARIANTS = {"share": 16, "noshare": 0}  # d_s: the method, and "w/o Share"
ADAPTER_LR, ADAPTER_T_TOTAL = 1e-3, 10


def make_adapter(src):
    """LeapLabTHU/Cross-Modal-Adapter: modules/module_clip_jointvt_upshare_adapter.py CLIP inside
    modules/modeling_jointvt_upshare_adapter.py CLIP4Clip (q-score similarity, tau 5), fp32 on the CPU, train.py's
    freezing rule (only 'adapter' tensors train). Saved per variant: every adapter call's input and output
    (eval), text and frame embeddings, the q-score logits and the masked mean-pooling logits (q_score=0), the
    training forward's loss (one-process all-gather, symmetric CrossEn), the adapter gradients, and three steps of
    modules/optimization.py BertAdam (train.py's two groups, warmup_cosine over t_total=10 steps, so step 0 has
    lr 0) after clip_grad_norm_(1.0), as train.py. Adapter tensors are re-drawn from N(0, 0.2) (biases N(0, 0.05))
    after the official init (std 0.01) so that the adapter branch is numerically visible."""
    stub_missing(["tqdm", "boto3", "requests", "botocore", "botocore.exceptions"])
    purge({"modules"})
    sys.path.insert(0, src)
    try:
        cm = importlib.import_module("modules.module_clip_jointvt_upshare_adapter")
        modeling = importlib.import_module("modules.modeling_jointvt_upshare_adapter")
        cross = importlib.import_module("modules.module_cross")
        optim = importlib.import_module("modules.optimization")
    finally:
        sys.path.remove(src)
    import torch.distributed as dist
    if not dist.is_initialized():  # the training forward all-gathers over the ranks
        dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "pg"),
                                rank=0, world_size=1)
    c, T, L = ADAPTER_TINY, ADAPTER_FRAMES, ADAPTER_WORDS
    g = gen(1)
    ids = captions(g, [6, 3, 4], L, c["vocab_size"])  # EOT at 7 (the last slot), 4, 5
    text_mask = (torch.arange(L)[None] <= ids.argmax(-1)[:, None]).long()
    video_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    video = randn16(3, T, 3, c["image_resolution"], c["image_resolution"], g=g) * video_mask[..., None, None, None]
    text_args = (ids, torch.zeros_like(ids), text_mask)
    payload = dict(provenance=provenance("LeapLabTHU/Cross-Modal-Adapter", src),
                   config=dict(c, r=ADAPTER_R, num_frames=T, words=L, tau=5.0, variants=ADAPTER_VARIANTS,
                               lr=ADAPTER_LR, t_total=ADAPTER_T_TOTAL, warmup=0.1, betas=[0.9, 0.98], eps=1e-6,
                               weight_decay=0.2, max_grad_norm=1.0),
                   inputs=dict(text_ids=ids, text_mask=text_mask, video=video.half(), video_mask=video_mask))
    frozen = None
    for name, d_s in ADAPTER_VARIANTS.items():
        torch.manual_seed(0)
        clip = cm.CLIP(**c, linear_patch="2d", adapter_reduction_dims=ADAPTER_R, adapter_share_dim=d_s,
                       adapter_non_linearity="quick_gelu", adapter_dropout=0.0, adapter_convert2fp16=True,
                       adapter_share_use_non_linearity=False, adapter_init_std=0.01)
        with torch.no_grad():
            for n, p in clip.named_parameters():
                if "adapter" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * (0.05 if "bias" in n else 0.2))
        if frozen is None:
            perturb(clip, gen(2), skip=("adapter",))
            with torch.no_grad():
                clip.logit_scale.fill_(LN100)
            fp16_exact(clip)
            frozen = {k: v.clone() for k, v in clip.state_dict().items() if "adapter" not in k}
            payload["state_dict"] = half(frozen)  # the frozen CLIP, shared by the variants
        else:
            clip.load_state_dict(frozen, strict=False)
            fp16_exact(clip)
        sd = {k: v.clone() for k, v in clip.state_dict().items()}
        task = argparse.Namespace(  # train.py's defaults that the model reads, with the README's adapter flags
            max_words=L, max_frames=T, loose_type=True, q_score_proj=0, linear_patch="2d", sim_header="meanP",
            cross_num_hidden_layers=4, intra_sim=0, text_cond_intra_sim=0, intra_sim_logit_scale=0, local_rank=0,
            rank=0, world_size=1, q_score=1, q_score_temp=5.0, t_emb_norm=0, v_emb_norm=0, v_agg_norm=0,
            linspace_samp=None, jcl=0, adapter_reduction_dims=ADAPTER_R, adapter_share_dim=d_s,
            adapter_non_linearity="quick_gelu", adapter_dropout=0.0, adapter_convert2fp16=True,
            adapter_init_std=0.01, adapter_share_use_non_linearity=False, pretrained_clip_name="ViT-B/32")
        cc = cross.CrossConfig.from_json_file(os.path.join(src, "modules", "cross-base", "cross_config.json"))
        model = modeling.CLIP4Clip(cc, dict(sd), task)
        model.float()  # CLIP4Clip.__init__ casts to fp16 (convert_weights); the comparison is in fp32
        model.clip.load_state_dict(sd, strict=True)
        for n, p in model.clip.named_parameters():  # train.py: freeze_layer_num 0 -> only adapters train
            p.requires_grad_("adapter" in n)
        model.eval()
        io = {"visual": [], "text": []}  # each block calls its adapter twice: after attention, after the MLP
        hooks = [blk.adapter.register_forward_hook(lambda m, i, o, k=k: io[k].append((i[0].detach(), o.detach())))
                 for k, tower in (("visual", model.clip.visual.transformer), ("text", model.clip.transformer))
                 for blk in tower.resblocks]
        with torch.no_grad():
            t = model.get_sequence_output(*text_args)
            v = model.get_visual_output(video, video_mask)
        for h in hooks:
            h.remove()
        with torch.no_grad():
            logits = model.get_similarity_logits(t, v, text_mask, video_mask, loose_type=True)[0]
            model.task_config.q_score = 0
            logits_mean = model.get_similarity_logits(t, v, text_mask, video_mask, loose_type=True)[0]
            model.task_config.q_score = 1
        adapter_io = {f"{k}_{j}": torch.stack([call[i] for call in calls])  # [2 * layers, tokens, batch, width]
                      for k, calls in io.items() for i, j in ((0, "in"), (1, "out"))}
        model.train()
        loss = model(*text_args, video, video_mask)
        loss.backward()
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        first_grads = grads(model, trainable)
        model.zero_grad(set_to_none=True)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        opt = optim.BertAdam([{"params": [p for n, p in named if "bias" not in n], "weight_decay": 0.2},
                              {"params": [p for n, p in named if "bias" in n], "weight_decay": 0.0}],
                             lr=ADAPTER_LR, warmup=0.1, schedule="warmup_cosine", b1=0.9, b2=0.98, e=1e-6,
                             t_total=ADAPTER_T_TOTAL, weight_decay=0.2, max_grad_norm=0.0)
        steps = dict(lr=[], loss=[], params=[])
        for k in range(3):
            opt.zero_grad()
            lk = model(*text_args, video, video_mask)
            lk.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            steps["lr"].append(ADAPTER_LR * optim.warmup_cosine(k / ADAPTER_T_TOTAL, 0.1))
            steps["loss"].append(lk.item())
            steps["params"].append({n.removeprefix("clip."): p.detach().clone() for n, p in named})
        payload[name] = dict(
            state_dict=half({k: v for k, v in sd.items() if k not in frozen}),
            outputs=detach(dict(text_embeds=t[:, 0], frame_embeds=v, logits=logits, logits_meanP=logits_mean,
                                **(adapter_io if name == "share" else {}))),  # the calls once: size
            loss=detach(loss), grads={n.removeprefix("clip."): g_ for n, g_ in first_grads.items()}, optim=steps)
    dist.destroy_process_group()
    save("adapter", payload)


# ------------------------------------------------------------------------------------------------ UniPT
UNIPT_TINY = dict(embed_dim=32, image_resolution=16, vision_layers=2, vision_width=64, vision_patch_size=8,
                  context_length=16, vocab_size=100, transformer_width=64, transformer_heads=1, transformer_layers=2)
UNIPT_FRAMES, UNIPT_WORDS = 3, 12


def make_unipt(src):
    """Paranioar/UniPT's CLIP4Clip part: (a) the side network modules/module_adapter.py
    Our_tuning_for_transformer alone on random hidden stacks (vision-like, text-like with mask and EOT position,
    and downsample_D_factor 2), output and gradients of sum(output * probe); (b) end to end: modules/module_clip.py
    CLIP (frozen, fp32) with both side networks, through modules/modeling.py CLIP4Clip's get_sequence_output,
    get_visual_output, get_similarity_logits (meanP) and its training forward (symmetric CrossEn, one-process
    all-gather). CLIP4Clip.__init__ hard-codes ViT-B sizes, so the object is made with __new__ and given the tiny
    CLIP, the two side networks and the attributes those methods read."""
    stub_missing(["tqdm", "boto3", "requests", "botocore", "botocore.exceptions"])
    purge({"modules"})
    root = os.path.join(src, "CLIP4Clip")
    sys.path.insert(0, root)
    try:
        ma = importlib.import_module("modules.module_adapter")
        mc = importlib.import_module("modules.module_clip")
        mm = importlib.import_module("modules.modeling")
        um = importlib.import_module("modules.until_module")
    finally:
        sys.path.remove(root)
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "pg"),
                                rank=0, world_size=1)
    g = gen(1)
    payload = dict(provenance=provenance("Paranioar/UniPT", src), side={})
    for name, (H, S, is_text, D) in {"vision": (48, 5, False, 1), "text": (40, 7, True, 1),
                                     "vision_d2": (48, 5, False, 2)}.items():
        L1, N, E = 4, 3, 32
        kw = dict(num_layer=L1, hidden_size=[H] * L1, embed_size=E, downsample_D_factor=D)
        torch.manual_seed(0)
        net = ma.Our_tuning_for_transformer(**kw)
        perturb(net, gen(2))
        fp16_exact(net)
        hidden, anchor = randn16(L1, N, S, H, g=g), randn16(N, 1, E, g=g)
        mask = position = None
        if is_text:
            lengths = torch.tensor([S, 4, 2])
            mask = (torch.arange(S)[None] < lengths[:, None]).float()
            position = lengths - 1  # EOT: the last valid token
        out = net(hidden, anchor, mask=mask, position=position)
        probe = torch.randn(out.shape, generator=g)
        (out * probe).sum().backward()
        inputs = dict(hidden=hidden.half(), anchor=anchor.half())
        if is_text:
            inputs.update(mask=mask, position=position)
        payload["side"][name] = dict(config=dict(num_layer=L1, hidden_size=H, embed_size=E, downsample_D_factor=D),
                                     state_dict=half(net.state_dict()), inputs=inputs, output=detach(out),
                                     probe=probe, grads=grads(net))
    c, T, Lw = UNIPT_TINY, UNIPT_FRAMES, UNIPT_WORDS
    torch.manual_seed(0)
    clip = mc.CLIP(**c).float()
    n_v, n_t = c["vision_layers"] + 1, c["transformer_layers"] + 1
    image_adapter = ma.Our_tuning_for_transformer(num_layer=n_v, hidden_size=[c["vision_width"]] * n_v,
                                                  embed_size=c["embed_dim"], downsample_D_factor=1)
    text_adapter = ma.Our_tuning_for_transformer(num_layer=n_t, hidden_size=[c["transformer_width"]] * n_t,
                                                 embed_size=c["embed_dim"], downsample_D_factor=1)
    m = mm.CLIP4Clip.__new__(mm.CLIP4Clip)
    torch.nn.Module.__init__(m)
    m.clip, m.image_adapter, m.text_adapter = clip, image_adapter, text_adapter
    m.task_config = types.SimpleNamespace(world_size=1, rank=0, local_rank=0)
    m.sim_header, m.loose_type, m.loss_fct = "meanP", True, um.CrossEn()
    perturb(m, gen(3))
    with torch.no_grad():
        clip.logit_scale.fill_(LN100)
    fp16_exact(m)
    for n, p in m.named_parameters():  # prep_optimizer: only names with 'adapter' train
        p.requires_grad_("adapter" in n)
    B, R = 4, c["image_resolution"]
    ids = captions(g, [10, 3, 6, 1], Lw, c["vocab_size"])  # EOT at 11 (the last slot), 4, 7, 2
    att = (torch.arange(Lw)[None] <= ids.argmax(-1)[:, None]).long()
    frames = [3, 2, 3, 1]
    vmask = (torch.arange(T)[None] < torch.tensor(frames)[:, None]).long()
    video = randn16(B, T, 3, R, R, g=g) * vmask[..., None, None, None]  # padded frames stay 0, as the loader
    ids7, att7, tt7 = ids[:, None], att[:, None], torch.zeros_like(ids)[:, None]  # CLIP4Clip's [B, pair, L]
    video7, vmask7 = video[:, None, :, None], vmask[:, None]  # [B, pair, bs, ts, 3, H, W]
    m.eval()
    with torch.no_grad():
        seq = m.get_sequence_output(ids7, tt7, att7)
        vis = m.get_visual_output(video7, vmask7)
        logits = m.get_similarity_logits(seq, vis, att7, vmask7, loose_type=True)[0]
        v = m._mean_pooling_for_similarity_visual(vis / vis.norm(dim=-1, keepdim=True), vmask)
    m.train()
    loss = m(ids7, tt7, att7, video7, vmask7)
    loss.backward()
    payload["e2e"] = dict(config=dict(c, num_frames=T, words=Lw), state_dict=half(m.state_dict()),
                          inputs=dict(text=ids, text_mask=att, video=video.half(), video_mask=vmask),
                          outputs=detach(dict(text_embeds=seq[:, 0], frame_embeds=vis, video_pooled=v, logits=logits)),
                          loss=detach(loss), grads=grads(m),
                          clip_grads=[n for n, p in m.named_parameters() if n.startswith("clip.") and p.grad is not None])
    assert not payload["e2e"]["clip_grads"] and len(payload["e2e"]["grads"]) == sum(p.requires_grad for p in m.parameters())
    dist.destroy_process_group()
    save("unipt", payload)


# ------------------------------------------------------------------------------------------------ SimVTP
SIMVTP_TINY = dict(frames=16, size=16, patch=4, tubelet=2, width=32, depth=2, heads=2, decoder_width=16,
                   decoder_depth=2, decoder_heads=2, vocab=40, context=16, video_mask_ratio=0.9,
                   text_mask_ratio=0.75)
SIMVTP_LENGTHS = [6, 2, 9, 4]  # words per caption: the batch pads to 11 tokens, three captions carry padding


def simvtp_vocab(V):
    """A WordPiece vocabulary laid out as CLIP's ids are in nanoTVR: [PAD] 0, words, then [CLS] (SOT) V-3,
    [SEP] (EOT, the largest id of a caption) V-2, [MASK] V-1 (nanoTVR's mask id = vocab_size - 1)."""
    return ["[PAD]", "[UNK]"] + [f"w{i}" for i in range(2, V - 3)] + ["[CLS]", "[SEP]", "[MASK]"]


def make_simvtp(src):
    """wufeim/SimVTP, both stages, the release's own code paths on the CPU:
    (a) pretraining: modeling_pretrain.py pretrain_simvtp_base_patch16_224 (PretrainVisionTransformer) run by
    engine_for_pretraining.py train_one_epoch for one batch (its tokenizer call, its MLM masking
    utils.mask_batch_text_tokens at the script's probability 0.75, its normalised-pixel targets, its four
    losses and its backward), with a tube mask from masking_generator.TubeMaskingGenerator at the script's
    ratio 0.9. The draws the official code makes (tube mask, masked words, VTM negatives from
    generate_random) are recorded so nanoTVR's pretraining_loss can be given the same ones.
    (b) fine-tuning: modeling_finetune.py DualVideoTextEncoder loaded from (a)'s weights as
    run_simvtp_finetuning.py does (keys 'encoder.' stripped, utils.load_state_dict into both towers), then
    engine_for_finetuning.py train_class_batch with loss.py NormSoftmaxLoss, and its backward.
    Sizes the release hard-codes are changed at import time, the files on disk are not touched:
    - the BERT-base embeddings (AutoModelForMaskedLM / AutoModel .from_pretrained('bert-base-uncased')) are
      transformers' BertEmbeddings of a small BertConfig made here (vocabulary 40, width 32, 16 positions,
      dropout 0), with HF_HUB_OFFLINE=1; the tokenizer is transformers' BertTokenizerFast over the vocabulary
      of simvtp_vocab (transformers 5 has no `_pad_token`, which the release's masking reads: set on it);
    - pretrain_simvtp_base_patch16_224 and DualVideoTextEncoder pass ViT-B sizes to PretrainVisionTransformer /
      VisionTransformer: those two names are wrapped to put the tiny sizes in;
    - the MLM head nn.Linear(768, 30522) and VTM head nn.Linear(768, 2) are rebuilt at width 32 (vocabulary 40)
      and initialised by the model's own _init_weights; the engine reshapes the MLM logits to 30522 columns, so
      a forward hook pads the 40 logits with -inf columns (softmax 0: the loss and every gradient unchanged);
    - the engine's torch.cuda.synchronize() is a no-op on the CPU; its optimizer is a stand-in whose step()
      records the gradients (lr 0).
    Dropout, attention dropout and drop path are 0 so both passes are deterministic."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    six = types.ModuleType("torch._six")  # utils.py: `from torch._six import inf` (gone from torch 2)
    six.inf = math.inf
    sys.modules.setdefault("torch._six", six)
    stub_missing(["tensorboardX"])
    sys.modules["tensorboardX"].SummaryWriter = getattr(sys.modules["tensorboardX"], "SummaryWriter", object)
    names = {"utils", "modeling_pretrain", "modeling_finetune", "engine_for_pretraining", "engine_for_finetuning",
             "loss", "masking_generator"}
    purge(names)
    sys.path.insert(0, src)
    try:
        mf = importlib.import_module("modeling_finetune")
        mp = importlib.import_module("modeling_pretrain")
        ep = importlib.import_module("engine_for_pretraining")
        ef = importlib.import_module("engine_for_finetuning")
        ou = importlib.import_module("utils")
        ol = importlib.import_module("loss")
        mg = importlib.import_module("masking_generator")
    finally:
        sys.path.remove(src)
    import numpy as np
    from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizerFast
    c = SIMVTP_TINY
    V, W, P, T, R = c["vocab"], c["width"], c["context"], c["frames"], c["size"]
    bert = BertConfig(vocab_size=V, hidden_size=W, num_hidden_layers=1, num_attention_heads=c["heads"],
                      intermediate_size=4 * W, max_position_embeddings=P, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)
    tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(simvtp_vocab(V))})
    tokenizer._pad_token = tokenizer.pad_token
    assert (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id) == \
        (0, V - 3, V - 2, V - 1)
    mp.AutoModelForMaskedLM = types.SimpleNamespace(from_pretrained=lambda name: BertForMaskedLM(bert))
    mf.AutoModel = types.SimpleNamespace(from_pretrained=lambda name: BertModel(bert))
    ep.BertTokenizerFast = types.SimpleNamespace(from_pretrained=lambda name: tokenizer)
    sizes = dict(img_size=R, patch_size=c["patch"], encoder_embed_dim=W, encoder_depth=c["depth"],
                 encoder_num_heads=c["heads"], decoder_num_classes=3 * c["tubelet"] * c["patch"] ** 2,
                 decoder_embed_dim=c["decoder_width"], decoder_num_heads=c["decoder_heads"], tubelet_size=c["tubelet"])
    full_pretrain, full_vit = mp.PretrainVisionTransformer, mf.VisionTransformer
    mp.PretrainVisionTransformer = lambda **kw: full_pretrain(**dict(kw, **sizes))
    mf.VisionTransformer = lambda **kw: full_vit(**dict(kw, img_size=R, patch_size=c["patch"], embed_dim=W,
                                                        depth=c["depth"], num_heads=c["heads"]))
    draws = {}
    mask_text = ep.mask_batch_text_tokens

    def recorded_mask_text(inputs, tok, **kw):  # in place on inputs, as the release relies on
        draws["input_ids"] = inputs.clone()
        ids, labels = mask_text(inputs, tok, **kw)
        draws["masked_ids"], draws["mlm_labels"] = ids.clone(), labels.clone()
        return ids, labels

    ep.mask_batch_text_tokens = recorded_mask_text
    pick = mp.generate_random

    def recorded_pick(start, end, flag):  # the VTM negative of pair `flag`
        idx = pick(start, end, flag)
        draws.setdefault("negatives", []).append(idx)
        return idx

    mp.generate_random = recorded_pick

    # ---- (a) pretraining
    torch.manual_seed(0)
    model = mp.pretrain_simvtp_base_patch16_224(drop_path_rate=0.0, decoder_depth=c["decoder_depth"])
    model.text_cls, model.vtm_head = torch.nn.Linear(W, V), torch.nn.Linear(W, 2)
    model._init_weights(model.text_cls)
    model._init_weights(model.vtm_head)
    g = gen(1)
    perturb(model, g)
    fp16_exact(model)
    model.text_cls.register_forward_hook(lambda m, i, o: F.pad(o, (0, 30522 - V), value=-math.inf))
    B, g2 = len(SIMVTP_LENGTHS), R // c["patch"]
    videos = randn16(B, 3, T, R, R, g=g)  # ImageNet-normalised pixels, the release's [B, C, T, H, W]
    words = [" ".join(f"w{int(i)}" for i in torch.randint(2, V - 3, (n,), generator=g)) for n in SIMVTP_LENGTHS]
    np.random.seed(0)
    tube = mg.TubeMaskingGenerator((T // c["tubelet"], g2, g2), c["video_mask_ratio"])
    masks = torch.from_numpy(np.stack([tube() for _ in range(B)]))  # the dataset's per-clip draws, collated
    outputs = {}
    model.register_forward_hook(lambda m, i, o: outputs.update(zip(
        ["pixel_pred", "mlm_logits", "vtm_logits", "vtm_labels", "vtc_text", "vtc_video"], o)))

    class RecordGrads:  # the optimizer the engine is given: zero_grad as usual, step records the gradients
        param_groups = [dict(lr=0.0, weight_decay=0.0)]

        def __init__(self, module):
            self.module = module

        def zero_grad(self):
            self.module.zero_grad(set_to_none=True)

        def step(self):
            self.grads = grads(self.module)

    opt = RecordGrads(model)
    sync = torch.cuda.synchronize
    torch.cuda.synchronize = lambda *a, **k: None
    try:
        torch.manual_seed(2)  # the MLM Bernoulli draws and the VTM negatives come from the global generator
        stats = ep.train_one_epoch(model, [dict(process_data=videos, mask=masks, text=words)], opt,
                                   torch.device("cpu"), 0, None, patch_size=c["patch"], start_steps=0,
                                   _mlm_probability=c["text_mask_ratio"])
    finally:
        torch.cuda.synchronize = sync
    select = draws["mlm_labels"] != -100
    assert select.any() and torch.equal(draws["input_ids"].masked_fill(select, V - 1), draws["masked_ids"])
    pretrain = dict(
        state_dict=half({k: v for k, v in model.state_dict().items() if not k.endswith("_ids")}),
        inputs=dict(video=videos.half(), text=draws["input_ids"], text_mask=tokenizer(words, return_tensors="pt",
                    padding=True)["attention_mask"], captions=words, tube_mask=masks.flatten(1).bool(),
                    text_select=select, negatives=torch.tensor(draws["negatives"])),
        outputs=detach(dict(pixel_pred=outputs["pixel_pred"], mlm_logits=outputs["mlm_logits"][select][:, :V],
                            vtm_logits=outputs["vtm_logits"], vtm_labels=outputs["vtm_labels"],
                            vtc_text=outputs["vtc_text"], vtc_video=outputs["vtc_video"])),
        losses={k: stats[k] for k in ("loss", "loss_v", "loss_t", "loss_vtc", "loss_vtm")}, grads=opt.grads)

    # ---- (b) fine-tuning from (a)'s weights
    torch.manual_seed(3)
    ft = mf.DualVideoTextEncoder(img_size=R, all_frames=T, tubelet_size=c["tubelet"], drop_rate=0.0,
                                 drop_path_rate=0.0, attn_drop_rate=0.0, use_mean_pooling=True, init_scale=0.0)
    renamed = {(k[len("encoder."):] if k.startswith("encoder.") else k): v for k, v in model.state_dict().items()}
    ou.load_state_dict(ft.video_encoder, renamed)
    ou.load_state_dict(ft.text_encoder, renamed)
    for tower in (ft.video_encoder, ft.text_encoder):  # the fresh fc_norm, moved off 1 / 0
        perturb(tower.fc_norm, g)
    fp16_exact(ft)
    for k, v in renamed.items():  # both towers hold the pretrained weights
        for tower in (ft.video_encoder, ft.text_encoder):
            if k in tower.state_dict() and not k.endswith("_ids"):
                assert torch.equal(tower.state_dict()[k], v), k
    emb = {}
    ft.register_forward_hook(lambda m, i, o: emb.update(video=o[0], text=o[1]))
    ft.train()
    texts = tokenizer(words, return_tensors="pt", padding=True, truncation=True)
    loss, sim = ef.train_class_batch(ft, videos, dict(texts), ol.NormSoftmaxLoss())
    loss.backward()
    finetune = dict(
        fc_norm={f"{t}.fc_norm.{n}": v.half() for t in ("video_encoder", "text_encoder")
                 for n, v in getattr(ft, t).fc_norm.state_dict().items()},
        inputs=dict(text=texts["input_ids"], text_mask=texts["attention_mask"]),
        outputs=detach(dict(video_emb=emb["video"], text_emb=emb["text"], sim=sim)), loss=detach(loss),
        grads=grads(ft))
    purge(names)
    save("simvtp", dict(provenance=provenance("wufeim/SimVTP", src), config=dict(c), pretrain=pretrain,
                        finetune=finetune))


# ------------------------------------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser(description="write tests/fixtures/official_*.pt from the official code")
    for flag, what in [("clip", "openai/CLIP"), ("ump", "zchoi/UMP_TVR"), ("dgl", "knightyxp/DGL"),
                       ("adapter", "LeapLabTHU/Cross-Modal-Adapter"), ("unipt", "Paranioar/UniPT"),
                       ("simvtp", "wufeim/SimVTP (mayuelala/SimVTP)")]:
        ap.add_argument(f"--{flag}", metavar="PATH", help=f"a checkout of {what}")
    args = ap.parse_args()
    torch.set_num_threads(1)  # deterministic reduction order, and polite on shared machines
    makers = dict(clip=make_clip, ump=make_ump, dgl=make_dgl, adapter=make_adapter, unipt=make_unipt,
                  simvtp=make_simvtp)
    ran = [name for name, fn in makers.items() if getattr(args, name) and fn(os.path.abspath(getattr(args, name))) is None]
    if not ran:
        ap.error("give the path of at least one official checkout")


if __name__ == "__main__":
    main()
