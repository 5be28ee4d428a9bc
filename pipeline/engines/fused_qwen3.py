"""A lean forward of Qwen3 decoders over packed token rows, built from the loaded HF model.

Same arithmetic as transformers' Qwen3Model (RMSNorm in float32, the same RoPE tables, the same
matmuls), minus what a reranker does not need: no KV cache, no masks, no (1, H, T, D) layout
shuffles, one GEMM for q/k/v and one for gate/up, and in the last layer the MLP runs only on
the rows whose hidden state is scored. On CUDA the small elementwise steps are compiled into
fused kernels with torch.compile when it works (q/k norm with RoPE, and with fp8 SiLU·mul with
its quantization, by Triton kernels of our own: qk_rope.py, fp8_swiglu.py), and run eagerly
otherwise. With `fp8` the four projections of each layer but the first (fp8.BF16_LAYERS) hold
float8 weights and run as fp8 GEMMs (fp8.py); nothing else changes.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from pipeline.engines import compiled, fp8 as fp8_layers, fp8_smooth, fp8_swiglu, qk_rope
from pipeline.engines.attention import packed_attention

log = logging.getLogger(__name__)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # As Qwen3RMSNorm: normalize in float32, cast back, then scale.
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def qk_norm_rope(qkv, qw, kw, cos, sin, eps: float, h: int, hkv: int, d: int):
    """Split fused q/k/v rows, apply the per-head RMSNorm and RoPE; (T, H, D) outputs."""
    t = qkv.shape[0]
    q, k, v = qkv.split([h * d, hkv * d, hkv * d], dim=-1)
    q = rms_norm(q.reshape(t, h, d), qw, eps)
    k = rms_norm(k.reshape(t, hkv, d), kw, eps)
    c, s = cos[:, None, :], sin[:, None, :]
    q = q * c + _rotate_half(q) * s
    k = k * c + _rotate_half(k) * s
    # v is a view of the q/k/v rows: the attention kernels take any row stride (only the last
    # dimension must be contiguous), and a copy would cost a pass over v every layer.
    return q.contiguous(), k.contiguous(), v.view(t, hkv, d)


def add_norm(x, delta, w, eps: float):
    """Residual add, then RMSNorm of the sum: returns (sum, normed)."""
    y = x + delta
    return y, rms_norm(y, w, eps)


def swiglu(gu):
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


# The steps whose output feeds an fp8 projection, with the per-token quantization in the same
# kernel once compiled (fp8.quantize_rows on the step's own result). Eager, they give exactly what
# quantizing after the step gives; compiled, Inductor keeps the step's result in float32 on its
# way to the quantization (no rounding to bf16 in between), so a value near a rounding boundary
# can land on the neighbouring fp8 step.
def norm_q(x, w, eps: float):
    return fp8_layers.quantize_rows(rms_norm(x, w, eps))


def add_norm_q(x, delta, w, eps: float):
    """add_norm, its normed rows quantized: (sum, q, scale)."""
    y = x + delta
    q, s = fp8_layers.quantize_rows(rms_norm(y, w, eps))
    return y, q, s


def swiglu_q(gu):
    return fp8_layers.quantize_rows(swiglu(gu))


class _Layer:
    __slots__ = ("ln1", "ln2", "w_qkv", "w_o", "qn", "kn", "w_gu", "w_down", "fp8")


def _layer(ln1, ln2, qkv: list, w_o, qn, kn, gu: list, w_down, fp8: tuple[int, int, int] | None = None,
           name: str = "fp8") -> _Layer:
    """`fp8`: (heads, kv_heads, head_dim) to hold the projections as fp8 (smoothed first where
    fp8_smooth.ENABLED: new norm weights, the same function), else None; `name`: the --dtype
    asked for (its messages)."""
    L = _Layer()
    L.ln1, L.ln2, L.w_o, L.qn, L.kn, L.w_down = ln1, ln2, w_o, qn, kn, w_down
    L.w_qkv = torch.cat(qkv, 0)
    L.w_gu = torch.cat(gu, 0)
    L.fp8 = bool(fp8)
    if fp8:  # layer by layer, so that the matrices of one layer at a time are held twice
        mats = {"q/k/v": L.w_qkv, "o_proj": L.w_o, "gate/up": L.w_gu, "down_proj": L.w_down}
        fp8_layers.check_shapes(mats, name)
        folded = mats.values()
        if fp8_smooth.ENABLED:
            L.ln1, L.ln2, *folded = fp8_smooth.smooth_layer(ln1, ln2, *mats.values(), *fp8)
        L.w_qkv, L.w_o, L.w_gu, L.w_down = (fp8_layers.quantize_weight(w) for w in folded)
    return L


def _fp8_shape(cfg, fp8: bool, i: int) -> tuple[int, int, int] | None:
    """_layer's `fp8` argument for layer `i`: the attention's shape where its projections are fp8
    (all layers but the first fp8.BF16_LAYERS), else None."""
    if not fp8 or i < fp8_layers.BF16_LAYERS:
        return None
    h = cfg.num_attention_heads
    return h, cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // h


class DefaultRope:
    """Qwen3's default rotary tables, computed as transformers' Qwen3RotaryEmbedding does: the
    inverse frequencies in float32 on the CPU, the angles in float32 on the device, then cast."""

    def __init__(self, theta: float, dim: int):
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))

    def __call__(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype=x.dtype), emb.sin().to(dtype=x.dtype)


class FusedQwen3:
    """Holds references to (and fused copies of) the HF model's weights; `last_hidden` is the
    only entry point."""

    def __init__(self, cfg, embed, norm, rotary, layers: list, kernel: str, compile: bool = False,
                 fp8: bool = False, fast_accum: bool = False):
        """`fp8`: `layers` hold fp8.Fp8Weight projections (built by _layer with its `fp8` shape);
        `fast_accum`: their GEMMs use the fast fp8 accumulation (--dtype fp8-fast)."""
        self.kernel = kernel
        self.h = cfg.num_attention_heads
        self.hkv = cfg.num_key_value_heads
        self.d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.scale = self.d ** -0.5
        self.embed = embed
        self.norm = norm
        self.rotary = rotary
        self.layers = layers
        self._qk = qk_norm_rope
        self._add_norm = add_norm
        self._swiglu = swiglu
        self._norm = rms_norm
        self._add_norm_q, self._swiglu_q, self._norm_q = add_norm_q, swiglu_q, norm_q
        # The projections' GEMM, chosen once: F.linear, or the fp8 GEMM over fp8.Fp8Weight.
        self._linear = F.linear
        self.fp8 = fp8
        if fp8:
            # Only the attention's output reaches the GEMM unquantized; the rest come as Quantized.
            self._linear = fp8_layers.linear_for(embed.device, embed.dtype, compile, (self.h * self.d,), fast_accum)
        if compile:
            self._compile()

    @classmethod
    def from_hf(cls, hf_model, base, kernel: str, compile: bool = False, fp8: bool = False,
                fast_accum: bool = False) -> "FusedQwen3":
        """Over a transformers Qwen3 model: fused copies of q/k/v and gate/up, the rest shared
        (`fp8`: fp8 copies of the four projections, in all layers but the first fp8.BF16_LAYERS)."""
        layers = []
        with torch.no_grad():
            for i, blk in enumerate(base.layers):
                a, m = blk.self_attn, blk.mlp
                layers.append(_layer(blk.input_layernorm.weight, blk.post_attention_layernorm.weight,
                                     [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], a.o_proj.weight,
                                     a.q_norm.weight, a.k_norm.weight, [m.gate_proj.weight, m.up_proj.weight],
                                     m.down_proj.weight, _fp8_shape(hf_model.config, fp8, i),
                                     "fp8-fast" if fast_accum else "fp8"))
        # The fused copies replace the originals: free those, so weights are held once.
        for blk, L in zip(base.layers, layers):
            a, m = blk.self_attn, blk.mlp
            quantized = (a.o_proj, m.down_proj) if L.fp8 else ()
            for mod in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj, *quantized):
                mod.weight = torch.nn.Parameter(torch.empty(0, dtype=mod.weight.dtype, device=mod.weight.device),
                                                requires_grad=False)
        return cls(hf_model.config, base.embed_tokens.weight, base.norm.weight, base.rotary_emb, layers, kernel,
                   compile, fp8, fast_accum)

    @classmethod
    def from_tensors(cls, cfg, t: dict, kernel: str, compile: bool = False, fp8: bool = False,
                     fast_accum: bool = False) -> "FusedQwen3":
        """Over a checkpoint's tensors by their transformers names (direct.py); the tensors of
        q/k/v and gate/up (`fp8`: and o and down) are dropped from `t` once fused or quantized, so
        weights are held once."""
        layers = []
        with torch.no_grad():
            for i in range(cfg.num_hidden_layers):
                p = f"model.layers.{i}."
                shape = _fp8_shape(cfg, fp8, i)
                g = lambda n: t.pop(p + n)  # noqa: E731
                o = g if shape else lambda n: t[p + n]  # noqa: E731
                layers.append(_layer(t[p + "input_layernorm.weight"], t[p + "post_attention_layernorm.weight"],
                                     [g("self_attn.q_proj.weight"), g("self_attn.k_proj.weight"),
                                      g("self_attn.v_proj.weight")], o("self_attn.o_proj.weight"),
                                     t[p + "self_attn.q_norm.weight"], t[p + "self_attn.k_norm.weight"],
                                     [g("mlp.gate_proj.weight"), g("mlp.up_proj.weight")],
                                     o("mlp.down_proj.weight"), shape, "fp8-fast" if fast_accum else "fp8"))
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(cfg, t["model.embed_tokens.weight"], t["model.norm.weight"], DefaultRope(rope_theta(cfg), d),
                   layers, kernel, compile, fp8, fast_accum)

    def use_eager(self) -> None:
        """The plain functions (exact; what a failed warm-up leaves: torch.compile compiles on the
        first call, so a broken compiler shows only there)."""
        self._qk, self._add_norm, self._swiglu, self._norm = qk_norm_rope, add_norm, swiglu, rms_norm
        self._add_norm_q, self._swiglu_q, self._norm_q = add_norm_q, swiglu_q, norm_q

    @property
    def compiled(self) -> bool:
        """True while the small steps run compiled (torch.compile), False where they run eagerly."""
        return self._norm is not rms_norm

    def _compile(self):
        try:
            # Only the token count is symbolic, from the first call (one compilation, see
            # compiled.py); the feature dimensions (and the gate/up split offset) stay constants.
            self._qk = compiled.compile_rows(qk_norm_rope)
            self._add_norm = compiled.compile_rows(add_norm)
            self._swiglu = compiled.compile_rows(swiglu)
            self._norm = compiled.compile_rows(rms_norm)
            if qk_rope.check(self._qk, self.embed.device, self.embed.dtype, self.h, self.hkv, self.d, self.eps):
                self._qk = qk_rope.qk_norm_rope  # one pass over the q/k rows (qk_rope.py)
            if self.fp8:
                self._add_norm_q = compiled.compile_rows(add_norm_q)
                self._swiglu_q = compiled.compile_rows(swiglu_q)
                self._norm_q = compiled.compile_rows(norm_q)
                width = self.layers[-1].w_gu.shape[0]
                if fp8_swiglu.check(swiglu_q, self.embed.device, self.embed.dtype, width):
                    self._swiglu_q = fp8_swiglu.swiglu_quantize  # one pass over the rows (fp8_swiglu.py)
        except Exception as exc:  # no Triton, no compiler: eager is exact, only slower
            log.warning("torch.compile unavailable (%s); running eagerly", exc)
            self.use_eager()

    def rope_tables(self, position_ids: torch.Tensor, dtype):
        # The model's own rotary module: identical tables to the reference forward.
        dummy = torch.empty(0, dtype=dtype, device=position_ids.device)
        cos, sin = self.rotary(dummy, position_ids[None])
        return cos[0], sin[0]

    @torch.inference_mode()
    def last_hidden(self, input_ids, position_ids, cu, max_len: int, last_idx, shared=None) -> torch.Tensor:
        """Final-normed hidden states at rows `last_idx` of a packed batch: (n, hidden).
        `shared`: (kv_idx, cu_k, max_k) of a batch with shared prefixes (attention.packed_attention)."""
        n = last_idx.shape[0]
        if self.compiled:
            last_idx = compiled.scored_rows(last_idx)
        x = F.embedding(input_ids, self.embed)
        cos, sin = self.rope_tables(position_ids, x.dtype)
        layers, eps = self.layers, self.eps
        n_layers = len(layers)
        # An fp8 layer's projections take their inputs quantized by the step before them (norm,
        # SiLU·mul: fp8.Quantized), all but the attention's output; the first layers stay bf16
        # (fp8.BF16_LAYERS) and take plain rows.
        hn = fp8_layers.Quantized(*self._norm_q(x, layers[0].ln1, eps)) if layers[0].fp8 else \
            self._norm(x, layers[0].ln1, eps)
        for i, L in enumerate(layers):
            linear = self._linear if L.fp8 else F.linear
            q, k, v = self._qk(linear(hn, L.w_qkv), L.qn, L.kn, cos, sin, eps, self.h, self.hkv, self.d)
            att = packed_attention(q, k, v, cu, max_len, self.scale, self.kernel, shared)
            att = linear(att.reshape(att.shape[0], -1), L.w_o)
            if i == n_layers - 1:
                # Only the scored rows go on: the last MLP and norm on n rows, not T.
                x, att = x[last_idx], att[last_idx]
            if L.fp8:
                x, *qs = self._add_norm_q(x, att, L.ln2, eps)
                mlp = linear(fp8_layers.Quantized(*self._swiglu_q(linear(fp8_layers.Quantized(*qs), L.w_gu))),
                             L.w_down)
            else:
                x, hn = self._add_norm(x, att, L.ln2, eps)
                mlp = linear(self._swiglu(linear(hn, L.w_gu)), L.w_down)
            if i + 1 < n_layers and layers[i + 1].fp8:
                x, *qs = self._add_norm_q(x, mlp, layers[i + 1].ln1, eps)
                hn = fp8_layers.Quantized(*qs)
            else:
                x, hn = self._add_norm(x, mlp, layers[i + 1].ln1 if i + 1 < n_layers else self.norm, eps)
        return hn[:n]


def warm_up(cfg, device, dtype, parameters: bool = False, rows: int = 16, fp8: bool = False) -> None:
    """Compile the fused steps on dummy rows of the model's widths, dtype and device, before (or
    while) the weights load: the model's calls then find them compiled. `parameters`: the weights
    are nn.Parameters (a transformers model), which torch.compile's guards tell from tensors.
    `fp8`: also the steps that quantize their output for an fp8 projection."""
    compile_rows = compiled.compile_rows
    h, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // h
    hid, eps = cfg.hidden_size, cfg.rms_norm_eps

    def weight(n):  # made outside inference mode, as the model's weights are
        w = torch.ones(n, device=device, dtype=dtype)
        return torch.nn.Parameter(w, requires_grad=False) if parameters else w

    w_hid, qw, kw = weight(hid), weight(d), weight(d)
    with torch.inference_mode():
        # Distinct tensors for distinct arguments: guards tell aliased arguments apart.
        def z(n):
            return torch.zeros(rows, n, device=device, dtype=dtype)

        compile_rows(qk_norm_rope)(z((h + 2 * hkv) * d), qw, kw, z(d), z(d), eps, h, hkv, d)
        compile_rows(add_norm)(z(hid), z(hid), w_hid, eps)
        compile_rows(swiglu)(z(2 * cfg.intermediate_size))
        compile_rows(rms_norm)(z(hid), w_hid, eps)
        if fp8:
            compile_rows(add_norm_q)(z(hid), z(hid), w_hid, eps)
            compile_rows(swiglu_q)(z(2 * cfg.intermediate_size))
            compile_rows(norm_q)(z(hid), w_hid, eps)  # the first layer's, where it runs in fp8


def rope_theta(c) -> float | None:
    """The base of a default RoPE, as transformers reads it (`rope_scaling or rope_parameters`);
    None for anything else: another RoPE type, or a rope_scaling that differs from
    rope_parameters (which one a transformers version reads is not ours to guess)."""
    rs, rp = getattr(c, "rope_scaling", None), getattr(c, "rope_parameters", None)
    if rs and rp and rs != rp:
        return None
    r = rs or rp
    theta = getattr(c, "rope_theta", None)
    if not r:
        return theta
    if not isinstance(r, dict) or r.get("rope_type", r.get("type", "default")) != "default":
        return None
    if set(r) - {"rope_type", "type", "rope_theta"}:
        return None  # scaling factors or other fields a default RoPE does not read: not understood
    if "rope_theta" in r and theta is not None and r["rope_theta"] != theta:
        return None
    return r.get("rope_theta", theta)


def supports(hf_model) -> bool:
    """Plain Qwen3 decoders only: SwiGLU (silu), no sliding window, no attention bias, default
    RoPE read as `rope_theta` reads it (the same conditions as a direct load, direct.py)."""
    cfg = hf_model.config
    return (
        cfg.model_type == "qwen3"
        and getattr(cfg, "hidden_act", "silu") == "silu"
        and not getattr(cfg, "use_sliding_window", False)
        and not getattr(cfg, "attention_bias", False)
        and rope_theta(cfg) is not None
        and set(getattr(cfg, "layer_types", None) or ["full_attention"]) == {"full_attention"}
    )
