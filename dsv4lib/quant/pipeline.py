"""Layer-by-layer (true-sequential) self-calibration and GPTQ of the routed experts (quant_notes.md §1.1
"true-sequential", §3, §7.1–7.3; ARCHITECTURE.md "What flows through the house").

The model itself produces its calibration activations. For each main MoE layer in order:

1. *capture*: run the layer on the hidden states of all calibration tokens with a null expert
   backend; a MoE hook records the expert inputs ``x``, affinities, routing (hash layers route by
   token id inside the model);
2. read that layer's dense experts from the release (one shard, through ``ReleaseReader``);
3. coverage plan (:mod:`dsv4lib.quant.coverage`) → Hessians of w1/w3 from ``x``; GPTQ of w1‖w3
   (one stacked problem, they share H); experts with too little data → :mod:`fallback`;
4. w2's inputs recomputed from the *quantised* w1/w3 (clamped SwiGLU, × routing weight if
   ``routing_weighted``) → Hessians → GPTQ of w2;
5. the layer's experts become ``INT2Experts`` and the layer is run again, so its quantised output
   feeds the next layer; the INT2 layer file is written atomically (with its stats), and the hidden
   states entering the next layer are saved atomically under ``out_dir/.resume`` so a killed run
   restarts at the first unfinished layer and reproduces the same bytes.

Only the current layer's experts are dense at any time; every other main layer holds a null
backend. ``quantize_rtn`` writes an RTN-only INT2 dir (no calibration) for comparisons.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from dsv4lib.model.experts import DenseExperts, ExpertBackend, swiglu
from dsv4lib.quant import coverage as cov
from dsv4lib.quant.fallback import fallback_quantize
from dsv4lib.quant.gptq import GPTQConfig, gptq_batched, output_error
from dsv4lib.quant.hessian import ExpertHessians, accumulate
from dsv4lib.quant.qweight import QuantizedWeight

RESUME_DIR = ".resume"
PROJS = ("w1", "w3", "w2")
VISIT_CHUNK = 65536


@dataclass(frozen=True)
class QuantizeOptions:
    """Everything that determines the output of :func:`quantize` (recorded in quant_stats.json)."""

    calib_tokens: int = 262144
    seq_len: int = 512
    chat_fraction: float = 0.25
    coverage: str = "balanced"
    threshold: int = 128
    min_tokens: int = 16
    fallback: str = "mse"
    routing_weighted: bool = False
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    hessian_dtype: str = "float32"
    batch_size: int = 8
    layers: tuple[int, ...] | None = None
    seed: int = 0

    def __post_init__(self):
        if self.coverage not in cov.STRATEGIES:
            raise ValueError(f"QuantizeOptions.coverage must be one of {cov.STRATEGIES}, got {self.coverage!r}")
        if self.threshold < 0 or self.min_tokens < 1:
            raise ValueError(f"QuantizeOptions: threshold {self.threshold} must be >= 0, min_tokens "
                             f"{self.min_tokens} >= 1")
        if self.hessian_dtype not in ("float32", "float64"):
            raise ValueError(f"QuantizeOptions.hessian_dtype must be float32/float64, got {self.hessian_dtype!r}")
        if self.calib_tokens < self.seq_len or self.seq_len < 2 or self.batch_size < 1:
            raise ValueError(f"QuantizeOptions: need calib_tokens >= seq_len >= 2 and batch_size >= 1 "
                             f"(got {self.calib_tokens}, {self.seq_len}, {self.batch_size})")

    def fingerprint(self) -> str:
        d = asdict(self)
        d["gptq"] = asdict(self.gptq)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


class NullExperts(ExpertBackend):
    """Expert backend that outputs zeros (capture pass / layers not yet reached)."""

    def forward(self, x, idx, weight, limit):
        return torch.zeros(x.shape[0], self.hidden, dtype=torch.float32, device=x.device)

    def resident_bytes(self) -> int:
        return 0


# ---------------------------------------------------------------------------------------- inputs
def calibration_ids(ref_dir: str | Path, opts: QuantizeOptions) -> torch.Tensor:
    """``[N, seq_len]`` ids: corpus calib split + chat-formatted calib conversations (seeded)."""
    from dsv4lib.corpus import calibration_batch
    from dsv4lib.paths import DATA_DIR
    from dsv4lib.tokenizer import load_tokenizer

    ref_dir = Path(ref_dir)
    tok_src = ref_dir if (ref_dir / "tokenizer.json").is_file() else DATA_DIR / "tokenizer"
    tok = load_tokenizer(tok_src)
    n = opts.calib_tokens // opts.seq_len
    return calibration_batch(tok, n, opts.seq_len, chat_fraction=opts.chat_fraction, seed=opts.seed)


def read_layer_experts(reader, layer: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense fp32 routed experts of one layer from the release: w1, w3 ``[E, I, D]``, w2 ``[E, D, I]``."""
    from dsv4lib.checkpoint.schema import layer_prefix, release_format
    from dsv4lib.formats import fp8, mxfp4

    cfg = reader.config
    fmt = release_format(cfg)
    pre = layer_prefix(cfg, layer)
    out = {}
    for p in PROJS:
        ws = []
        for e in range(cfg.n_routed_experts):
            name = f"{pre}ffn.experts.{e}.{p}.weight"
            t, sc = reader.get(name), reader.get(name[: -len("weight")] + "scale")
            ws.append(mxfp4.dequantize(t, sc) if fmt.expert == "fp4" else fp8.dequantize_block(t, sc))
        out[p] = torch.stack(ws).float().to(device)
    return out["w1"], out["w3"], out["w2"]


# ---------------------------------------------------------------------------------------- per layer
def _rel_errors(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor, ok: torch.Tensor) -> list[float | None]:
    """Per expert ``tr(ΔHΔᵀ)/tr(WHWᵀ)``; None where the expert has no data."""
    num = output_error(W, Wq, H)
    den = output_error(W, torch.zeros_like(W), H)
    return [float(n / d) if bool(o) and float(d) > 0 else None for n, d, o in zip(num, den, ok)]


def _mean(xs: list[float | None]) -> float | None:
    v = [x for x in xs if x is not None]
    return sum(v) / len(v) if v else None


def _quantize_stack(W: torch.Tensor, H: ExpertHessians, opts: QuantizeOptions, log: dict, tag: str):
    """GPTQ for experts with >= min_tokens visits, fallback for the rest → QuantizedWeight [E, out, in]."""
    E, R, C = W.shape
    counts = H.count.cpu()
    use = counts >= opts.min_tokens
    codes = torch.empty(E, R, C, dtype=torch.uint8, device=W.device)
    scale = torch.empty(E, R, C // opts.gptq.group_size, dtype=torch.float16, device=W.device)
    zero = torch.empty_like(scale, dtype=torch.uint8)
    sel = torch.nonzero(use).flatten()
    damp = {}
    if sel.numel():
        res = gptq_batched(W[sel], H.H[sel.to(H.H.device)].to(W.device), opts.gptq)
        codes[sel], scale[sel], zero[sel] = res.qweight.codes, res.qweight.scale, res.qweight.zero
        damp = {"min": float(res.damp.min()), "max": float(res.damp.max()),
                "retries": int(res.damp_retries.sum()), "diagonal_fallback": int(res.diagonal_fallback.sum()),
                "dead_columns": int(res.dead_columns.sum())}
    for e in torch.nonzero(~use).flatten().tolist():
        n = int(counts[e])
        imp = H.H[e].diagonal().to(W.device) if n > 0 else None
        q = fallback_quantize(W[e], opts.fallback, opts.gptq.group_size, importance=imp)
        codes[e], scale[e], zero[e] = q.codes, q.scale, q.zero
        log.setdefault(str(e), []).append(f"{tag}: {opts.fallback} ({n} tokens < min_tokens {opts.min_tokens})")
    return QuantizedWeight(codes, scale, zero, opts.gptq.group_size), damp


def quantize_layer(w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, x: torch.Tensor, visits: cov.Visits,
                   opts: QuantizeOptions, limit: float) -> tuple[dict[str, QuantizedWeight], dict]:
    """GPTQ of one layer's experts from captured inputs ``x [T, D]`` and a visit plan → (qweights, stats)."""
    E, I, D = w1.shape
    dev = w1.device
    dt = getattr(torch, opts.hessian_dtype)
    hw = visits.weight.square() if opts.routing_weighted else None
    H13 = ExpertHessians.zeros(E, D, dt, dev)
    for v0 in range(0, visits.token.numel(), VISIT_CHUNK):  # gather x per chunk of visits only
        v1 = v0 + VISIT_CHUNK
        accumulate(H13, x[visits.token[v0:v1]], visits.expert[v0:v1, None],
                   None if hw is None else hw[v0:v1, None])
    fb_log: dict[str, list[str]] = {}
    q13, damp13 = _quantize_stack(torch.cat([w1, w3], 1), H13, opts, fb_log, "w1w3")
    q1 = QuantizedWeight(q13.codes[:, :I], q13.scale[:, :I], q13.zero[:, :I], q13.group_size)
    q3 = QuantizedWeight(q13.codes[:, I:], q13.scale[:, I:], q13.zero[:, I:], q13.group_size)
    w1q, w3q = q1.dequantize(), q3.dequantize()  # [E, I, D]

    H2 = ExpertHessians.zeros(E, I, dt, dev)
    counts = visits.counts().tolist()
    start = 0
    for e, c in enumerate(counts):  # w2 inputs from the QUANTISED w1/w3, grouped by expert
        if c:
            t, g = visits.token[start:start + c], visits.weight[start:start + c]
            xe = x[t].float()  # [c, D]
            h = swiglu(xe @ w1q[e].T, xe @ w3q[e].T, limit)  # [c, I]
            if opts.routing_weighted:
                h = h * g[:, None].to(h.dtype)
            accumulate(H2, h, torch.full((c, 1), e, dtype=torch.long, device=dev))
            start += c
    q2, damp2 = _quantize_stack(w2, H2, opts, fb_log, "w2")

    ok13, ok2 = H13.count > 0, H2.count > 0
    from dsv4lib.quant.fallback import rtn
    errs, rtn_errs = {}, {}
    for p, W, qw, H, ok in (("w1", w1, q1, H13.H, ok13), ("w3", w3, q3, H13.H, ok13), ("w2", w2, q2, H2.H, ok2)):
        errs[p] = _rel_errors(W, qw.dequantize(), H, ok)
        rtn_errs[p] = _rel_errors(W, rtn(W, opts.gptq.group_size).dequantize(), H, ok)
    stats = {
        "gptq_error": {p: _mean(v) for p, v in errs.items()},
        "rtn_error": {p: _mean(v) for p, v in rtn_errs.items()},
        "gptq_error_per_expert": errs, "rtn_error_per_expert": rtn_errs,
        "fallback": {"count": len(fb_log), "method": opts.fallback, "experts": dict(sorted(fb_log.items(), key=lambda kv: int(kv[0])))},
        "damp": {"w1w3": damp13, "w2": damp2},
    }
    return {"w1": q1, "w3": q3, "w2": q2}, stats


# ---------------------------------------------------------------------------------------- driver
def _run_layer(model, li: int, X: torch.Tensor, ids: torch.Tensor, bs: int, device) -> torch.Tensor:
    """Hidden states after layer ``li`` for all calibration sequences (batched)."""
    layer = model.layers[li]
    out = torch.empty_like(X)
    with torch.no_grad():
        for b in range(0, X.shape[0], bs):
            out[b:b + bs] = layer(X[b:b + bs].to(device), 0, ids[b:b + bs].to(device)).to(X.device)
    return out


def _capture(model, li: int, X: torch.Tensor, ids: torch.Tensor, bs: int, device) -> dict[str, torch.Tensor]:
    """Expert inputs and routing of layer ``li`` for all calibration tokens (null experts meanwhile)."""
    cfg = model.config
    model.set_expert_backend(li, NullExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size))
    got: dict[str, list[torch.Tensor]] = {"x": [], "scores": [], "idx": [], "weight": []}

    def hook(layer_idx, ev):
        if layer_idx == li:
            for k in got:
                got[k].append(getattr(ev, k).detach())

    h = model.add_moe_hook(hook)
    try:
        _run_layer(model, li, X, ids, bs, device)
    finally:
        h.remove()
    return {k: torch.cat(v) for k, v in got.items()}


def _dense_backend(ws: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> DenseExperts:
    w1, w3, w2 = ws
    be = DenseExperts(w1.shape[0], w1.shape[2], w1.shape[1], w1.dtype, w1.device)
    with torch.no_grad():
        be.w1.copy_(w1), be.w3.copy_(w3), be.w2.copy_(w2)
    return be


def _save_state(path: Path, layer: int, X: torch.Tensor, fingerprint: str) -> None:
    from dsv4lib.checkpoint import atomic
    atomic.atomic_write(path, lambda p: torch.save({"next_layer": layer, "hidden": X, "options": fingerprint}, p))


def quantize(ref_dir: str | Path, out_dir: str | Path, *, options: QuantizeOptions | None = None,
             calib_ids: torch.Tensor | None = None, device: str | torch.device = "cpu",
             stop_after: int | None = None, progress: bool = True,
             on_layer: Callable[[int, dict], None] | None = None, **overrides) -> dict:
    """Quantize every main MoE layer of the release ``ref_dir`` into the INT2 dir ``out_dir``.

    ``options`` (or keyword ``overrides`` of :class:`QuantizeOptions` fields, e.g. ``calib_tokens``,
    ``coverage="balanced"``, ``threshold=128``, ``gptq=GPTQConfig(act_order=True, static_groups=True)``).
    ``calib_ids [N, S]`` replaces the corpus calibration text. Finished layers (present and matching
    the manifest) are skipped; ``stop_after`` stops after that many newly written layers.
    Returns the quant_stats dict.
    """
    from tqdm.auto import tqdm

    from dsv4lib.checkpoint import Int2Store, ReleaseReader, load_model
    from dsv4lib.model.quantized_experts import INT2Experts

    opts = make_options(options, **overrides)
    torch.manual_seed(opts.seed)
    out_dir = Path(out_dir)
    reader = ReleaseReader(ref_dir)
    cfg = reader.config
    store = Int2Store(out_dir, cfg)
    layers = list(opts.layers) if opts.layers is not None else list(range(cfg.num_hidden_layers))
    bad = [li for li in layers if not 0 <= li < cfg.num_hidden_layers]
    if bad:
        raise ValueError(f"quantize: layers {bad} out of range 0..{cfg.num_hidden_layers - 1}")
    ids = calib_ids if calib_ids is not None else calibration_ids(ref_dir, opts)  # [N, S]
    if ids.dim() != 2 or int(ids.max()) >= cfg.vocab_size or int(ids.min()) < 0:
        raise ValueError(f"quantize: calibration ids must be [N, S] in 0..{cfg.vocab_size - 1}")
    model = load_model(ref_dir, device=device, load_experts=False)  # no routed expert is read here
    E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    for li in range(cfg.num_hidden_layers):  # only the current layer's experts will ever be resident
        model.set_expert_backend(li, NullExperts(E, D, I))

    # resume: hidden states entering the first unfinished layer
    state_path = out_dir / RESUME_DIR / "hidden.pt"
    X, start = None, 0
    if state_path.is_file():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        if st.get("options") == opts.fingerprint() and all(store.has_layer(li) for li in range(st["next_layer"])
                                                            if li in layers):
            X, start = st["hidden"], st["next_layer"]
    if X is None:
        with torch.no_grad():
            h = model.embed(ids.to(device)).to("cpu")  # [N, S, D]
        X = h.unsqueeze(2).expand(-1, -1, cfg.hc_mult, -1).contiguous()  # [N, S, hc, D]
    stats = store.stats()
    stats["options"] = {**asdict_shallow(opts), "gptq": asdict(opts.gptq), "fingerprint": opts.fingerprint()}
    stats["calibration"] = {"sequences": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
                            "tokens": int(ids.numel())}
    written = 0
    bar = tqdm(total=cfg.num_hidden_layers, initial=start, disable=not progress, desc="quantize", unit="layer")
    for li in range(start, cfg.num_hidden_layers):
        t0 = time.perf_counter()
        if li in layers and not store.has_layer(li):
            bar.set_postfix_str(f"layer {li}: capture")
            ev = _capture(model, li, X, ids, opts.batch_size, device)
            bar.set_postfix_str(f"layer {li}: read experts")
            w1, w3, w2 = read_layer_experts(reader, li, device)
            routed = cov.routed_visits(ev["idx"], ev["weight"], E)
            visits = cov.plan_visits(opts.coverage, ev["scores"], ev["idx"], ev["weight"], opts.threshold,
                                     cfg.routed_scaling_factor)
            bar.set_postfix_str(f"layer {li}: gptq")
            qws, lstats = quantize_layer(w1, w3, w2, ev["x"].to(device), visits, opts, cfg.swiglu_limit)
            del ev, w1, w3, w2
            tensors = {p: qws[p].pack() for p in PROJS}
            lstats = {"layer": li, "hash_layer": bool(cfg.is_hash_layer(li)), "coverage": opts.coverage,
                      "visits": cov.summary(routed.counts()), "visits_balanced": cov.summary(visits.counts()),
                      **lstats, "time_s": round(time.perf_counter() - t0, 3)}
            backend = INT2Experts.from_tensors({p: {k: v.to(device) for k, v in t.items()} for p, t in tensors.items()})
            model.set_expert_backend(li, backend)
            X = _run_layer(model, li, X, ids, opts.batch_size, device)
            store.write_layer(li, tensors, lstats)
            _save_state(state_path, li + 1, X, opts.fingerprint())
            stats["layers"][str(li)] = lstats
            written += 1
            if on_layer is not None:
                on_layer(li, lstats)
        else:  # finished layer: its INT2 experts; layer not selected: the release's own experts
            if store.has_layer(li):
                t = store.read_layer(li, device=device)
                model.set_expert_backend(li, INT2Experts.from_tensors(t))
            else:
                model.set_expert_backend(li, _dense_backend(read_layer_experts(reader, li, device)))
            X = _run_layer(model, li, X, ids, opts.batch_size, device)
        model.set_expert_backend(li, NullExperts(E, D, I))  # keep at most one layer's experts resident
        bar.update(1)
        if stop_after is not None and written >= stop_after:
            break
    bar.close()
    from dsv4lib.checkpoint import atomic
    final = store.stats()
    final["options"], final["calibration"] = stats["options"], stats["calibration"]
    atomic.write_json(out_dir / "quant_stats.json", final)
    return final


def make_options(options: QuantizeOptions | None = None, **overrides) -> QuantizeOptions:
    """``options`` with overrides; :class:`GPTQConfig` field names (``act_order``, ``damp``, …) go to
    ``options.gptq`` (``act_order=True`` implies static groups, the only act-order the format allows)."""
    base = options or QuantizeOptions()
    gfields = set(GPTQConfig.__dataclass_fields__)
    g = {k: overrides.pop(k) for k in list(overrides) if k in gfields}
    if g.get("act_order") and "static_groups" not in g:
        g["static_groups"] = True
    unknown = set(overrides) - set(QuantizeOptions.__dataclass_fields__)
    if unknown:
        raise TypeError(f"quantize: unknown options {sorted(unknown)}")
    fields_ = {**asdict_shallow(base), **overrides}
    if g:
        fields_["gptq"] = replace(fields_["gptq"], **g)
    if fields_.get("layers") is not None:
        fields_["layers"] = tuple(fields_["layers"])
    return QuantizeOptions(**fields_)


def asdict_shallow(opts: QuantizeOptions) -> dict:
    """Fields of ``opts`` without recursing into the GPTQConfig (kept as an object)."""
    return {f: getattr(opts, f) for f in opts.__dataclass_fields__}


def quantize_rtn(ref_dir: str | Path, out_dir: str | Path, device: str | torch.device = "cpu",
                 layers: tuple[int, ...] | None = None) -> Path:
    """RTN-only INT2 dir (min-max grid, no calibration), for comparisons with GPTQ."""
    from dsv4lib.checkpoint import Int2Store, ReleaseReader
    from dsv4lib.quant.fallback import rtn

    reader = ReleaseReader(ref_dir)
    store = Int2Store(out_dir, reader.config)
    for li in (layers if layers is not None else range(reader.config.num_hidden_layers)):
        ws = dict(zip(PROJS, read_layer_experts(reader, li, device)))
        store.write_layer(li, {p: rtn(ws[p]).pack() for p in PROJS}, {"layer": li, "method": "rtn"})
    return Path(out_dir)


def layer_errors(int2_dir: str | Path) -> dict[int, dict]:
    """Per layer ``{"gptq": {p: err}, "rtn": {p: err}, "fallbacks": n}`` from quant_stats.json."""
    stats = json.loads((Path(int2_dir) / "quant_stats.json").read_text())
    return {int(k): {"gptq": v.get("gptq_error"), "rtn": v.get("rtn_error"),
                     "fallbacks": v.get("fallback", {}).get("count")}
            for k, v in stats.get("layers", {}).items()}
