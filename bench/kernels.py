"""Paged attention with in-kernel RoPE against the attention a user would otherwise run.

    python -m bench.kernels            # on a GPU: the shapes below, bf16
    python -m bench.kernels --quick    # on CPU: the torch backend and its peers on small shapes

Methods, each on fresh random inputs (GQA 32 query / 8 KV heads, head_dim 128, page 16):

- ``cattn``: `cattn.paged_attention` over a paged, *pre-RoPE* cache with a shuffled page table
  (hot-path call: indices checked once by the caller, ``check_indices=False``).
- ``sdpa-flash``, ``sdpa-cudnn``, ``sdpa-efficient``: torch SDPA pinned to one backend, over a
  contiguous cache that already holds rotated keys (what a non-decoupled cache serves); GQA native
  where the backend takes ``enable_gqa``, else K/V repeated to 32 heads (noted).
- ``flex``: compiled FlexAttention, GQA-native, with a bottom-right causal block mask.
- ``unfused``: the decoupled cache without a fused kernel: gather the pages, rotate Q and the cached
  K in eager torch (HF's rotate-half), then SDPA.

TFLOP/s counts the unmasked (query, key) pairs only (causal is bottom-right aligned); GB/s is the
K+V bytes of the 8 KV heads over the time. ``max_diff`` is each method's largest absolute
difference from cattn's output on the same inputs. A peer that fails on this machine's versions is
reported as n/a with the reason.
"""
from __future__ import annotations

if __package__ in (None, ""):   # run by path (python bench/kernels.py): import `bench` as `python -m` does
    import pathlib
    import sys
    # the checkout's root, and not bench/ itself: bench/kernels.py would shadow the `kernels` package
    here = pathlib.Path(__file__).resolve().parent
    sys.path[:] = [str(here.parent)] + [p for p in sys.path if pathlib.Path(p or ".").resolve() != here]

import argparse
import math
import re
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import cattn
from bench.common import environment, format_table, write_json
from cattn import RopeSpec

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, PAGE_SIZE = 32, 8, 128, 16
METHODS = ("cattn", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex", "unfused")


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    q_len: int
    kv_len: int

    @property
    def pairs(self) -> int:
        """Unmasked (query, key) pairs per head: query j sees kv_len - q_len + j + 1 keys."""
        return self.batch * (self.q_len * (self.kv_len - self.q_len) + self.q_len * (self.q_len + 1) // 2)


GPU_SHAPES = [
    Shape("extend q512 kv4K", 1, 512, 4096),
    Shape("extend q512 kv16K", 1, 512, 16384),
    Shape("extend q2K kv32K", 1, 2048, 32768),
    Shape("prefill 4x8K", 4, 8192, 8192),
    Shape("decode B32 kv16K", 32, 1, 16384),
    Shape("decode B8 kv64K", 8, 1, 65536),
]
QUICK_SHAPES = [
    Shape("extend q64 kv1K", 1, 64, 1024),
    Shape("prefill 2x512", 2, 512, 512),
    Shape("decode B8 kv2K", 8, 1, 2048),
]


@dataclass
class Inputs:
    """One shape's inputs: the paged pre-RoPE cache cattn reads, and the contiguous forms peers read."""

    shape: Shape
    rope: RopeSpec
    q: torch.Tensor             # [B * q_len, Hq, D] pre-RoPE
    k_cache: torch.Tensor       # [num_pages, PAGE_SIZE, Hkv, D] pre-RoPE, pages shuffled
    v_cache: torch.Tensor
    block_table: torch.Tensor   # [B, pages per sequence] int32
    kv_lens: torch.Tensor       # [B] int32
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    q_rot: torch.Tensor         # [B, Hq, q_len, D] rotated
    k_rot: torch.Tensor         # [B, Hkv, kv_len, D] rotated
    v: torch.Tensor             # [B, Hkv, kv_len, D]


def llama3_rope() -> RopeSpec:
    return RopeSpec(1.0 / (500000.0 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)))


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> Inputs:
    b, s = shape.batch, shape.kv_len
    pages = math.ceil(s / PAGE_SIZE)
    k = torch.randn(b, s, NUM_KV_HEADS, HEAD_DIM, dtype=dtype, device=device)
    v = torch.randn(b, s, NUM_KV_HEADS, HEAD_DIM, dtype=dtype, device=device)
    page_ids = torch.randperm(b * pages, device=device).view(b, pages)
    k_cache = torch.empty(b * pages, PAGE_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=dtype, device=device)
    v_cache = torch.empty_like(k_cache)
    padded = pages * PAGE_SIZE
    k_cache[page_ids.flatten()] = F.pad(k, (0, 0, 0, 0, 0, padded - s)).view(b * pages, PAGE_SIZE, NUM_KV_HEADS, HEAD_DIM)
    v_cache[page_ids.flatten()] = F.pad(v, (0, 0, 0, 0, 0, padded - s)).view(b * pages, PAGE_SIZE, NUM_KV_HEADS, HEAD_DIM)
    q = torch.randn(b * shape.q_len, NUM_Q_HEADS, HEAD_DIM, dtype=dtype, device=device)

    rope = llama3_rope().to(device)
    k_pos = torch.arange(s, device=device)
    q_pos = torch.arange(s - shape.q_len, s, device=device).repeat(b)
    k_rot = cattn.apply_rope(k.flatten(0, 1), k_pos.repeat(b), rope).view(b, s, NUM_KV_HEADS, HEAD_DIM)
    q_rot = cattn.apply_rope(q, q_pos, rope).view(b, shape.q_len, NUM_Q_HEADS, HEAD_DIM)
    return Inputs(shape, rope, q, k_cache, v_cache, page_ids.int(),
                  torch.full((b,), s, dtype=torch.int32, device=device),
                  torch.arange(0, b + 1, device=device, dtype=torch.int32) * shape.q_len,
                  q_rot.transpose(1, 2).contiguous(), k_rot.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous())


# ---- methods: each returns a zero-argument callable whose result is [B * q_len, Hq, D] --------

def cattn_method(inp: Inputs, backend: str):
    args = (inp.q, inp.k_cache, inp.v_cache, inp.block_table, inp.kv_lens, inp.cu_seqlens_q, inp.rope)
    cattn.check_batch(inp.block_table, inp.kv_lens, inp.cu_seqlens_q, inp.k_cache.shape[0], PAGE_SIZE,
                      inp.q.shape[0])
    out = torch.empty_like(inp.q)
    return lambda: cattn.paged_attention(*args, out=out, backend=backend, max_q_len=inp.shape.q_len,
                                         check_indices=False)


def _mask(shape: Shape):
    """SDPA's causal argument for bottom-right alignment: none for decode, is_causal for square."""
    if shape.q_len == 1:
        return {}
    if shape.q_len == shape.kv_len:
        return {"is_causal": True}
    from torch.nn.attention.bias import causal_lower_right
    return {"attn_mask": causal_lower_right(shape.q_len, shape.kv_len)}


def _flat(out: torch.Tensor) -> torch.Tensor:
    return out.transpose(1, 2).flatten(0, 1)      # [B, Hq, L, D] -> [B * L, Hq, D]


def sdpa_method(inp: Inputs, backend_name: str, notes: list):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend_name]
    mask = _mask(inp.shape)
    group = NUM_Q_HEADS // NUM_KV_HEADS

    def gqa_native():
        with sdpa_kernel(backend):
            return _flat(F.scaled_dot_product_attention(inp.q_rot, inp.k_rot, inp.v, enable_gqa=True, **mask))

    try:
        gqa_native()
        return gqa_native
    except Exception as exc:  # noqa: BLE001 - any refusal of enable_gqa falls back to repeated K/V
        native_error = _reason(exc)
    k_rep, v_rep = inp.k_rot.repeat_interleave(group, 1), inp.v.repeat_interleave(group, 1)

    def repeated():
        with sdpa_kernel(backend):
            return _flat(F.scaled_dot_product_attention(inp.q_rot, k_rep, v_rep, **mask))

    repeated()                                     # raises if this backend cannot run the shape at all
    notes.append(f"K/V repeated to {NUM_Q_HEADS} heads (enable_gqa: {native_error})")
    return repeated


_flex_compiled = None


def flex_method(inp: Inputs, notes: list):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _flex_compiled
    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    shape, block_mask = inp.shape, None
    if shape.q_len > 1:
        offset = shape.kv_len - shape.q_len

        def bottom_right_causal(b, h, q_idx, kv_idx):
            return q_idx + offset >= kv_idx

        block_mask = create_block_mask(bottom_right_causal, None, None, shape.q_len, shape.kv_len,
                                       device=inp.q.device)
    return lambda: _flat(_flex_compiled(inp.q_rot, inp.k_rot, inp.v, block_mask=block_mask, enable_gqa=True))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def unfused_method(inp: Inputs):
    """Gather pages, rotate Q and K in eager torch as an HF layer does, then SDPA (default dispatch)."""
    shape, rope = inp.shape, inp.rope
    b, s = shape.batch, shape.kv_len
    mask = _mask(shape)
    q = inp.q.view(b, shape.q_len, NUM_Q_HEADS, HEAD_DIM).transpose(1, 2)

    def run():
        k = inp.k_cache[inp.block_table].flatten(1, 2)[:, :s].transpose(1, 2)   # [B, Hkv, S, D]
        v = inp.v_cache[inp.block_table].flatten(1, 2)[:, :s].transpose(1, 2)
        freqs = torch.arange(s, device=q.device, dtype=torch.float32)[:, None] * rope.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
        k_rot = k * cos + _rotate_half(k) * sin
        q_cos, q_sin = cos[s - shape.q_len:], sin[s - shape.q_len:]
        q_rot = q * q_cos + _rotate_half(q) * q_sin
        return _flat(F.scaled_dot_product_attention(q_rot, k_rot, v, enable_gqa=True, **mask))

    return run


def _reason(exc: BaseException) -> str:
    text = re.sub(r"\s+", " ", str(exc)).strip()
    return f"{type(exc).__name__}: {text[:160]}"


# ---- timing -----------------------------------------------------------------------------------

def time_ms(fn, device: torch.device) -> float:
    """Median milliseconds: triton's do_bench on a GPU; on CPU the median of repeated wall times."""
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times, start = [], time.perf_counter()
    # at least 3: under the interpreter (bench.gpu_check --dry-run) one call takes about a second
    while len(times) < 3 or (time.perf_counter() - start < 0.5 and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def build(method: str, inp: Inputs, notes: list, on_gpu: bool, backend: str):
    if method == "cattn":
        return cattn_method(inp, backend)
    if method.startswith("sdpa-"):
        return sdpa_method(inp, method.split("-", 1)[1], notes)
    if method == "flex":
        if not on_gpu:
            raise RuntimeError("FlexAttention is measured on the GPU only")
        return flex_method(inp, notes)
    return unfused_method(inp)


def bench_shape(shape: Shape, methods, dtype: torch.dtype, device: torch.device, backend: str,
                deadline: float | None = None) -> list[dict]:
    inp = make_inputs(shape, dtype, device)
    kv_bytes = 2 * shape.batch * shape.kv_len * NUM_KV_HEADS * HEAD_DIM * inp.k_cache.element_size()
    flops = 4 * NUM_Q_HEADS * HEAD_DIM * shape.pairs
    on_gpu = device.type == "cuda"
    rows, baseline = [], None
    for method in methods:
        notes: list[str] = []
        row = {"shape": shape.name, "batch": shape.batch, "q_len": shape.q_len, "kv_len": shape.kv_len,
               "method": method if backend == "triton" or method != "cattn" else "cattn (torch backend)"}
        if deadline is not None and time.monotonic() > deadline:
            rows.append({**row, "note": "skipped: out of time"})
            continue
        try:
            fn = build(method, inp, notes, on_gpu, backend)
            out = fn()
            if method == "cattn":
                baseline = out.float()
            elif baseline is not None:
                row["max_diff"] = (out.float() - baseline).abs().max().item()
            ms = time_ms(fn, device)
            row.update(ms=ms, tflops=flops / ms / 1e9, gbps=kv_bytes / ms / 1e6)
        except Exception as exc:  # a peer missing on this version is a row of the table, not a crash
            notes.append(f"n/a: {_reason(exc)}")
        row["note"] = "; ".join(notes)
        rows.append(row)
        fn = out = None                                # drop this method's buffers (repeated K/V) first
        if on_gpu:
            torch.cuda.empty_cache()
    return rows


COLUMNS = [("shape", "shape", "s"), ("method", "method", "s"), ("ms", "ms", ".3f"), ("tflops", "TFLOP/s", ".4g"),
           ("gbps", "GB/s", ".4g"), ("max_diff", "max diff", ".1e"), ("note", "note", "s")]


def run(shapes, methods=METHODS, dtype=None, device=None, backend=None, deadline=None) -> dict:
    """Benchmark ``shapes`` with ``methods``; returns the JSON payload (``rows`` plus settings). cattn runs
    ``backend``: by default Triton on a GPU, torch on CPU (``"triton"`` there: the interpreter, for a dry run
    of bench.gpu_check). Past ``deadline`` (`time.monotonic`), the methods not started are skipped."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    backend = backend or ("triton" if device.type == "cuda" else "torch")
    rows = []
    for shape in shapes:
        torch.manual_seed(len(rows))
        if deadline is not None and time.monotonic() > deadline:     # not even its inputs
            rows.append({"shape": shape.name, "method": "all", "note": "skipped: out of time"})
            continue
        try:
            rows += bench_shape(shape, methods, dtype, device, backend, deadline)
        except Exception as exc:  # e.g. out of memory building the inputs: the other shapes still run
            rows.append({"shape": shape.name, "method": "all", "note": f"n/a: {_reason(exc)}"})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"dtype": str(dtype).removeprefix("torch."), "num_q_heads": NUM_Q_HEADS, "num_kv_heads": NUM_KV_HEADS,
            "head_dim": HEAD_DIM, "page_size": PAGE_SIZE, "rows": rows}


def device_slug() -> str:
    name = environment()["device"]
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (the default without a GPU)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {METHODS}")
    parser.add_argument("--out", help="JSON path (default: kernels_<device>.json in the results folder, "
                        "see bench.common)")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        print("No GPU: the Triton timings need one. Timing the torch backend and its CPU peers on small shapes.")
    shapes = QUICK_SHAPES if args.quick or not on_gpu else GPU_SHAPES
    payload = run(shapes, [m.strip() for m in args.methods.split(",")])
    path = write_json(f"kernels_{device_slug()}.json", payload, path=args.out or None)
    print(format_table(payload["rows"], COLUMNS))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
