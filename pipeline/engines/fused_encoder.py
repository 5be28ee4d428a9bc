"""A lean, packed forward of BERT, XLM-R and ModernBERT cross-encoders over their weights as plain
tensors (`BertWeights`, `ModernBertWeights`), taken from a transformers model or loaded directly
by direct_encoder.py: the same tensor code runs either way.

The padded transformers forward spends most of a length-mixed batch on padding. Here a batch is
one row of T real tokens holding n pairs (`cu` marks where each starts): embeddings with each
pair's own positions and token types, bidirectional varlen attention (flash-attn's or torch's
FlashAttention kernel without the causal mask; an exact padded SDPA on CPU and in float32),
and in the last layer only the pooled rows (the first token of each pair) go through the output
projection, the MLP and the classifier. The arithmetic is the reference's, step by step: the same
LayerNorms, activations, rotary tables and head, so float32 scores equal the padded forward's.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from pipeline.engines import attention, compiled
from pipeline.engines.padded_attention import padded_sdpa, padded_sdpa_qkv

log = logging.getLogger(__name__)

BERT_LIKE = {"bert", "xlm-roberta", "roberta"}


def supports(hf_model) -> bool:
    """The packed forward runs this model: a transformers model it understands, or a directly
    loaded one (direct_encoder.DirectEncoder, whose weights are already BertWeights or
    ModernBertWeights)."""
    if isinstance(getattr(hf_model, "weights", None), (BertWeights, ModernBertWeights)):
        return True
    cfg = hf_model.config
    mtype = getattr(cfg, "model_type", "")
    if mtype in BERT_LIKE:
        return (getattr(cfg, "position_embedding_type", "absolute") in (None, "absolute")
                and hasattr(hf_model, "classifier") and not getattr(cfg, "is_decoder", False))
    if mtype == "modernbert":
        rot = getattr(getattr(hf_model, "model", None), "rotary_emb", None)
        return (getattr(cfg, "classifier_pooling", "cls") in ("cls", "mean") and hasattr(hf_model, "head")
                and rot is not None and all(static_rope(rot.rope_type.get(t)) for t in set(cfg.layer_types)))
    return False


def static_rope(rope_type) -> bool:
    """A rotary kind whose frequencies do not change with the sequence: ModernBertWeights holds
    them once. Dynamic and longrope ones (transformers recomputes them per call) stay on the
    padded transformers forward."""
    return isinstance(rope_type, str) and "dynamic" not in rope_type and rope_type != "longrope"


@dataclass(frozen=True)
class LayerWeights:
    """One post-LN encoder layer: fused q/k/v, attention output, MLP, their LayerNorms."""

    qkv_w: torch.Tensor  # query, key, value rows stacked: one GEMM instead of three
    qkv_b: torch.Tensor
    attn_out_w: torch.Tensor
    attn_out_b: torch.Tensor
    attn_ln_w: torch.Tensor
    attn_ln_b: torch.Tensor
    attn_ln_eps: float
    inter_w: torch.Tensor
    inter_b: torch.Tensor
    act: Callable  # the activation, as transformers' ACT2FN gives it for hidden_act
    out_w: torch.Tensor
    out_b: torch.Tensor
    out_ln_w: torch.Tensor
    out_ln_b: torch.Tensor
    out_ln_eps: float


@dataclass(frozen=True)
class BertWeights:
    """A BERT / XLM-R / RoBERTa sequence classifier as tensors: what FusedEncoder reads."""

    kind: str  # model_type: "bert", "xlm-roberta", "roberta"
    pos_offset: int  # XLM-R and RoBERTa count positions from padding_idx + 1; BERT from 0
    word: torch.Tensor
    position: torch.Tensor
    token_type: torch.Tensor
    emb_ln_w: torch.Tensor
    emb_ln_b: torch.Tensor
    emb_ln_eps: float
    layers: list
    # BERT: (pooler dense w, b, classifier w, b); XLM-R / RoBERTa: (classifier.dense w, b, out_proj w, b).
    # Either way dense, tanh, linear on the first token.
    head: tuple

    @classmethod
    def from_hf(cls, hf_model) -> "BertWeights":
        """References to a transformers model's weights (q/k/v fused: a copy of those only)."""
        cfg = hf_model.config
        base = getattr(hf_model, hf_model.base_model_prefix)
        emb = base.embeddings
        layers = []
        with torch.no_grad():
            for blk in base.encoder.layer:
                s, ao, mid, out = blk.attention.self, blk.attention.output, blk.intermediate, blk.output
                layers.append(LayerWeights(
                    torch.cat([s.query.weight, s.key.weight, s.value.weight], 0),
                    torch.cat([s.query.bias, s.key.bias, s.value.bias], 0),
                    ao.dense.weight, ao.dense.bias, ao.LayerNorm.weight, ao.LayerNorm.bias, ao.LayerNorm.eps,
                    mid.dense.weight, mid.dense.bias, mid.intermediate_act_fn,
                    out.dense.weight, out.dense.bias, out.LayerNorm.weight, out.LayerNorm.bias, out.LayerNorm.eps))
        c = hf_model.classifier
        if cfg.model_type == "bert":
            head = (base.pooler.dense.weight, base.pooler.dense.bias, c.weight, c.bias)
        else:
            head = (c.dense.weight, c.dense.bias, c.out_proj.weight, c.out_proj.bias)
        return cls(cfg.model_type, emb.padding_idx + 1 if cfg.model_type != "bert" else 0,
                   emb.word_embeddings.weight, emb.position_embeddings.weight, emb.token_type_embeddings.weight,
                   emb.LayerNorm.weight, emb.LayerNorm.bias, emb.LayerNorm.eps, layers, head)


MODERN_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class ModernLayerWeights:
    """One pre-LN ModernBERT layer: LayerNorm, attention (Wqkv, rotary q/k, Wo), residual; LayerNorm,
    gated MLP (Wi, act(input) * gate, Wo), residual. A bias is None where the config has none."""

    attn_norm_w: torch.Tensor | None  # None on layer 0, whose attn_norm is an Identity in transformers
    attn_norm_b: torch.Tensor | None
    qkv_w: torch.Tensor  # Wqkv as stored: query, key, value rows stacked
    qkv_b: torch.Tensor | None
    attn_out_w: torch.Tensor
    attn_out_b: torch.Tensor | None
    mlp_norm_w: torch.Tensor
    mlp_norm_b: torch.Tensor | None
    wi_w: torch.Tensor  # input and gate rows stacked (2 * intermediate_size)
    wi_b: torch.Tensor | None
    wo_w: torch.Tensor
    wo_b: torch.Tensor | None
    layer_type: str  # "full_attention", or "sliding_attention" (the local window)


@dataclass(frozen=True)
class ModernBertWeights:
    """A ModernBERT sequence classifier as tensors: what FusedEncoder reads. Every LayerNorm has
    the config's norm_eps (and a bias only with norm_bias)."""

    word: torch.Tensor  # tok_embeddings: no position embeddings (rotary)
    emb_norm_w: torch.Tensor
    emb_norm_b: torch.Tensor | None
    eps: float
    act: Callable  # hidden_activation, as transformers' ACT2FN gives it
    layers: list
    final_norm_w: torch.Tensor
    final_norm_b: torch.Tensor | None
    # Layer type: (inv_freq, attention_scaling), as ModernBertRotaryEmbedding holds them.
    rope: dict
    window: int  # local layers: keys at most this far from the query on either side (local_attention // 2)
    pooling: str  # "cls" (the first token) or "mean" (over the pair's tokens)
    head_w: torch.Tensor  # head: dense, classifier_activation, LayerNorm
    head_b: torch.Tensor | None
    head_act: Callable
    head_norm_w: torch.Tensor
    head_norm_b: torch.Tensor | None
    cls_w: torch.Tensor  # classifier (always with a bias)
    cls_b: torch.Tensor

    @classmethod
    def from_hf(cls, hf_model) -> "ModernBertWeights":
        """References to a transformers ModernBertForSequenceClassification's weights and rotary
        buffers (no copies)."""
        cfg, base, head = hf_model.config, hf_model.model, hf_model.head
        layers = []
        for blk in base.layers:
            an = blk.attn_norm if isinstance(blk.attn_norm, torch.nn.LayerNorm) else None
            layers.append(ModernLayerWeights(
                an.weight if an is not None else None, an.bias if an is not None else None,
                blk.attn.Wqkv.weight, blk.attn.Wqkv.bias, blk.attn.Wo.weight, blk.attn.Wo.bias,
                blk.mlp_norm.weight, blk.mlp_norm.bias, blk.mlp.Wi.weight, blk.mlp.Wi.bias,
                blk.mlp.Wo.weight, blk.mlp.Wo.bias, blk.attention_type))
        rot = base.rotary_emb
        rope = {t: (getattr(rot, f"{t}_inv_freq"), getattr(rot, f"{t}_attention_scaling"))
                for t in {lw.layer_type for lw in layers}}
        emb = base.embeddings
        return cls(emb.tok_embeddings.weight, emb.norm.weight, emb.norm.bias, base.final_norm.eps,
                   base.layers[0].mlp.act, layers, base.final_norm.weight, base.final_norm.bias, rope,
                   cfg.local_attention // 2, cfg.classifier_pooling, head.dense.weight, head.dense.bias, head.act,
                   head.norm.weight, head.norm.bias, hf_model.classifier.weight, hf_model.classifier.bias)


def rope_tables(inv_freq, scaling: float, positions, dtype):
    """cos, sin (T, 1, D) at each row's position, as ModernBertRotaryEmbedding computes them:
    float32 angles, cos / sin times attention_scaling, cast to the activations' dtype."""
    freqs = positions[:, None].float() * inv_freq.to(device=positions.device, dtype=torch.float)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype)[:, None, :], (emb.sin() * scaling).to(dtype)[:, None, :]


_VARLEN_PARAMS = None


def bidirectional_attention(q, k, v, cu, max_len: int, scale: float, kernel: str, window: int | None = None):
    """Packed attention without a causal mask; `window`: ModernBERT's local layers (keys at most
    `window` tokens away on either side, inclusive)."""
    global _VARLEN_PARAMS
    if kernel == "flash_attn":
        ws = (window, window) if window is not None else (-1, -1)
        return attention.flash_attn_varlen()(q, k, v, cu, cu, max_len, max_len, softmax_scale=scale, causal=False,
                                       window_size=ws)
    if kernel == "torch_varlen":
        fn = attention.torch_varlen()
        if _VARLEN_PARAMS is None:
            _VARLEN_PARAMS = set(inspect.signature(fn).parameters)
        kw = {"is_causal": False} if "is_causal" in _VARLEN_PARAMS else {}
        if "window_size" in _VARLEN_PARAMS:
            kw["window_size"] = (window, window) if window is not None else (-1, -1)
            return fn(q, k, v, cu, cu, max_len, max_len, scale=scale, **kw)
        if window is None:
            return fn(q, k, v, cu, cu, max_len, max_len, scale=scale, **kw)
    return padded_sdpa(q, k, v, cu, max_len, scale, causal=False, window=window)


def add_layer_norm(x, delta, w, b, eps: float):
    """Post-LN residual (BERT): LayerNorm(x + delta)."""
    return F.layer_norm(x + delta, (x.shape[-1],), w, b, eps)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(x, cos, sin):
    # As ModernBERT's apply_rotary_pos_emb: rotate in float32, cast back.
    xf = x.float()
    return ((xf * cos) + (_rotate_half(xf) * sin)).to(x.dtype)


# ModernBERT's steps between its matrix products. Eagerly, the float32 rotation alone is seven
# passes over q and seven over k, each wider than the bf16 rows, every layer; compiled, each step
# below is one kernel.
def rope_qk(qkv, cos, sin):
    """Rotary q and k of a (T, 3, heads, dim) qkv block, each contiguous for the attention kernel."""
    return rope(qkv[:, 0], cos, sin).contiguous(), rope(qkv[:, 1], cos, sin).contiguous()


def add_norm(x, delta, w, b, eps: float):
    """Pre-LN residual (ModernBERT): x + delta, and its LayerNorm (the next sublayer's input)."""
    y = x + delta
    return y, F.layer_norm(y, (y.shape[-1],), w, b, eps)


def gated(u, act):
    """ModernBertMLP's gate: Wi's output split into input and gate, act(input) * gate."""
    inp, gate = u.chunk(2, dim=-1)
    return act(inp) * gate


class FusedEncoder:
    """The packed forward of one cross-encoder; `logits` is the only entry point.

    `source`: a transformers model (its weights read as BertWeights or ModernBertWeights), or a
    directly loaded model (direct_encoder.DirectEncoder: `config` and `weights`)."""

    def __init__(self, source, kernel: str, compile: bool = False):
        self.cfg = cfg = source.config
        self.kernel = kernel
        self.kind = cfg.model_type
        self.modern = self.kind == "modernbert"
        self.h = cfg.num_attention_heads
        self.d = cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.d ** -0.5
        w = getattr(source, "weights", None)
        if self.modern:
            self.w = w if isinstance(w, ModernBertWeights) else ModernBertWeights.from_hf(source)
        else:
            self.w = w if isinstance(w, BertWeights) else BertWeights.from_hf(source)
        self.use_eager()
        if compile:
            try:
                if self.modern:
                    self._rope_qk, self._add_norm, self._gated = (
                        compiled.compile_rows(rope_qk), compiled.compile_rows(add_norm), compiled.compile_rows(gated))
                else:
                    self._add_ln = compiled.compile_rows(add_layer_norm)
            except Exception as exc:  # no Triton: eager is exact, only slower
                self.use_eager()
                log.warning("torch.compile unavailable (%s); running eagerly", exc)

    def warm_up(self, rows: int = 16) -> None:
        """Run the compiled steps once on dummy rows with the model's own norms, rotary tables and
        activation: torch.compile compiles on the first call, so a broken compiler shows here
        rather than in the first batch."""
        if not self.compiled:
            return
        w = self.w
        with torch.inference_mode():
            if not self.modern:
                layer = w.layers[0]
                x = torch.zeros(rows, layer.out_ln_w.shape[0], device=layer.out_ln_w.device,
                                dtype=layer.out_ln_w.dtype)
                self._add_ln(x, torch.zeros_like(x), layer.out_ln_w, layer.out_ln_b, layer.out_ln_eps)
                return
            lw = w.layers[0]
            dev, dt = w.word.device, w.word.dtype
            x = torch.zeros(rows, w.word.shape[1], device=dev, dtype=dt)
            # Two tensors: one tensor passed twice would compile a variant of its own.
            self._add_norm(x, torch.zeros_like(x), lw.mlp_norm_w, lw.mlp_norm_b, w.eps)
            self._gated(torch.zeros(rows, lw.wi_w.shape[0], device=dev, dtype=dt), w.act)
            qkv = torch.zeros(rows, 3, self.h, self.d, device=dev, dtype=dt)
            for inv_freq, scaling in w.rope.values():
                self._rope_qk(qkv, *rope_tables(inv_freq, scaling, torch.arange(rows, device=dev), dt))

    def use_eager(self) -> None:
        self._add_ln, self._rope_qk, self._add_norm, self._gated = add_layer_norm, rope_qk, add_norm, gated

    @property
    def compiled(self) -> bool:
        """True while the compiled steps run."""
        return self._add_ln is not add_layer_norm or self._add_norm is not add_norm

    @torch.inference_mode()
    def logits(self, input_ids, type_ids, positions, cu, max_len: int, first_idx) -> torch.Tensor:
        """Classifier logits (n, labels) of a packed batch; `first_idx`: the row of each pair's
        first token ([CLS] / <s>)."""
        n = first_idx.shape[0]
        if self.compiled:
            first_idx = compiled.scored_rows(first_idx)
        if self.modern:
            return self._modernbert(input_ids, positions, cu, max_len, first_idx)[:n]
        return self._bert(input_ids, type_ids, positions, cu, max_len, first_idx)[:n]

    def _bert(self, input_ids, type_ids, positions, cu, max_len, first_idx):
        w = self.w
        x = F.embedding(input_ids, w.word) + F.embedding(
            type_ids if type_ids is not None else torch.zeros_like(input_ids), w.token_type)
        x = x + F.embedding(positions + w.pos_offset, w.position)
        x = F.layer_norm(x, x.shape[-1:], w.emb_ln_w, w.emb_ln_b, w.emb_ln_eps)
        t, h, d = x.shape[0], self.h, self.d
        for i, lw in enumerate(w.layers):
            qkv = F.linear(x, lw.qkv_w, lw.qkv_b).view(t, 3, h, d)
            if self.kernel in ("torch_varlen", "flash_attn"):
                # q, k and v as views of the q/k/v rows: the varlen kernels take any row stride
                # (only the last dimension must be contiguous); copies would cost three passes
                # over the rows every layer.
                att = bidirectional_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, max_len, self.scale, self.kernel)
            else:
                att = padded_sdpa_qkv(qkv, cu, max_len, self.scale)
            att = att.reshape(-1, h * d)
            if i == len(w.layers) - 1:
                # Only the pooled rows are scored: the rest of the last layer runs on n rows.
                x, att = x[first_idx], att[first_idx]
            x = self._add_ln(x, F.linear(att, lw.attn_out_w, lw.attn_out_b), lw.attn_ln_w, lw.attn_ln_b,
                             lw.attn_ln_eps)
            mid = lw.act(F.linear(x, lw.inter_w, lw.inter_b))
            x = self._add_ln(x, F.linear(mid, lw.out_w, lw.out_b), lw.out_ln_w, lw.out_ln_b, lw.out_ln_eps)
        # BERT: pooler (dense, tanh) then the classifier; XLM-R / RoBERTa: dense, tanh, out_proj on <s>.
        dense_w, dense_b, out_w, out_b = w.head
        return F.linear(torch.tanh(F.linear(x, dense_w, dense_b)), out_w, out_b)

    def _modernbert(self, input_ids, positions, cu, max_len, first_idx):
        w = self.w
        hid = w.word.shape[1:]
        x = F.layer_norm(F.embedding(input_ids, w.word), hid, w.emb_norm_w, w.emb_norm_b, w.eps)
        tables = {lt: rope_tables(*w.rope[lt], positions, x.dtype) for lt in {lw.layer_type for lw in w.layers}}
        h, d = self.h, self.d
        mean = w.pooling == "mean"
        last = len(w.layers) - 1
        # `a`: the attention's input, the LayerNorm of x (layer 0's attn_norm is an Identity).
        a = x if w.layers[0].attn_norm_w is None else F.layer_norm(x, hid, w.layers[0].attn_norm_w,
                                                                    w.layers[0].attn_norm_b, w.eps)
        for i, lw in enumerate(w.layers):
            qkv = F.linear(a, lw.qkv_w, lw.qkv_b).view(-1, 3, h, d)
            q, k = self._rope_qk(qkv, *tables[lw.layer_type])
            att = bidirectional_attention(q, k, qkv[:, 2], cu, max_len, self.scale, self.kernel,  # v: a view
                                          w.window if lw.layer_type == "sliding_attention" else None)
            att = F.linear(att.reshape(-1, h * d), lw.attn_out_w, lw.attn_out_b)
            if i == last and not mean:
                # Only the pooled rows are scored: the rest of the last layer runs on n rows.
                x, att = x[first_idx], att[first_idx]
            x, m = self._add_norm(x, att, lw.mlp_norm_w, lw.mlp_norm_b, w.eps)
            # The gated MLP as transformers' ModernBertMLP: Wi, act(input) * gate, Wo.
            mlp = F.linear(self._gated(F.linear(m, lw.wi_w, lw.wi_b), w.act), lw.wo_w, lw.wo_b)
            if i < last:
                nw = w.layers[i + 1]
                if nw.attn_norm_w is None:
                    x = a = x + mlp
                else:
                    x, a = self._add_norm(x, mlp, nw.attn_norm_w, nw.attn_norm_b, w.eps)
            else:
                x = self._add_norm(x, mlp, w.final_norm_w, w.final_norm_b, w.eps)[1]
        if mean:
            seg = torch.repeat_interleave(torch.arange(len(cu) - 1, device=x.device), cu[1:] - cu[:-1],
                                          output_size=x.shape[0])
            sums = torch.zeros(len(cu) - 1, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, seg, x)
            x = sums / (cu[1:] - cu[:-1]).to(x.dtype)[:, None]
        # Head (dense, classifier_activation, LayerNorm), then the classifier.
        x = F.layer_norm(w.head_act(F.linear(x, w.head_w, w.head_b)), hid, w.head_norm_w, w.head_norm_b, w.eps)
        return F.linear(x, w.cls_w, w.cls_b)
