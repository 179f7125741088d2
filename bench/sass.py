"""The machine-code gate: compile a kernel configuration for sm_90 as a real launch specialises it,
disassemble it and check what its key loops do. Runs on any machine, GPU or not.

    from bench.sass import compile_config, gate
    code = compile_config(cfg)          # cfg: a cattn.launch.ShippedConfig
    assert not gate(cfg, code)          # [] or the list of violations

A *key loop* is a backward branch whose body holds a global load and no EXIT (Triton's
out-of-line mbarrier retry stubs after EXIT jump backwards too, and the binary ends in a
branch to itself). Counts are STATIC: each instruction of the loop
body once, whatever its predicate. The gate asserts, for every configuration:

1. no register spills and no local memory at all (ptxas: 0 spill bytes; no LDL/STL, no stack);
2. no trigonometry: no MUFU.SIN/COS, no ``sin``/``cos`` PTX instructions, and no libdevice
   sinf/cosf (recognised by its Payne-Hanek table ``__cudart_i2opi_f`` in the PTX; its slow
   path would also show as local memory under (1));
3. 16-bit attention: matrix instructions are tensor-core ones, HGMMA (wgmma) in prefill, and
   the FLOP they execute per key tile equals the tile's work (no warpgroup repeats another's
   QK^T);
4. K and V tiles arrive by 16-byte cp.async (LDGSTS.128) or TMA (fp32, the IEEE correctness
   path that runs unpipelined: by 16-byte loads of any kind), and no key loop issues a global
   load narrower than 4 bytes;
5. the store's 8-bit dequantization (``dequant_kv_kernel``): its K and V codes arrive by 16-byte
   loads (LDG.E.128: the program's codes in as few loads as that width allows) and its page
   writes are 16 bytes wide where the row allows (8 bf16/fp16 or 4 fp32 elements).
"""
from __future__ import annotations

import os
import sys

# Before triton is imported: the kernels must be JITFunctions. Once it is, the setting changes nothing
# here and would only leak into child processes (bench.gpu_check's dry run imports this under the
# interpreter and starts its gate workers with TRITON_INTERPRET=0 itself: bench.tune).
if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # what the runtime does; silences a 3.9 warning

import collections  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ARCH = 90
SMEM_LIMIT = 232448          # bytes of shared memory one block may use on sm_90 (227 KiB)
NVBIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
PTXAS = {"registers": r"Used (\d+) registers", "spill_stores": r"(\d+) bytes spill stores",
         "spill_loads": r"(\d+) bytes spill loads", "stack_bytes": r"(\d+) bytes stack frame"}


@dataclass
class MachineCode:
    sass: str
    ptx: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    shared_bytes: int
    instructions: list = field(default_factory=list)   # [(address, predicate, opcode, operands)]


def hints(cfg, use_hints: bool = True) -> dict | None:
    """``attrs`` for ASTSource: ``tt.divisibility = 16`` on the arguments a real launch sees as 16-multiples."""
    if not use_hints:
        return None
    return {(cfg.kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in cfg.divisible}


def _cuobjdump(flag: str, cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(NVBIN / "cuobjdump"), flag, f.name], capture_output=True, text=True,
                              check=True).stdout


def compile_config(cfg, *, use_hints: bool = True) -> MachineCode:
    """Compile ``cfg`` for sm_90 (Triton's own ptxas and flags) and disassemble it."""
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    with contextlib.redirect_stdout(io.StringIO()) as log:
        compiled = triton.compile(
            ASTSource(fn=cfg.kernel, signature=cfg.signature, constexprs=cfg.constexprs, attrs=hints(cfg, use_hints)),
            target=GPUTarget("cuda", ARCH, 32), options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    cubin = compiled.asm["cubin"]
    sass = _cuobjdump("-sass", cubin)
    stats = {k: max((int(v) for v in re.findall(p, log.getvalue())), default=None) for k, p in PTXAS.items()}
    if stats["registers"] is None:   # a Triton that does not print its ptxas log: read the cubin's resources
        usage = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", _cuobjdump("-res-usage", cubin)))
        stats = dict(registers=int(usage.get("REG", 0)), spill_stores=int(usage.get("LOCAL", 0)),
                     spill_loads=int(usage.get("LOCAL", 0)), stack_bytes=int(usage.get("STACK", 0)))
    return MachineCode(sass=sass, ptx=compiled.asm["ptx"], shared_bytes=int(compiled.metadata.shared),
                       instructions=parse(sass), **{k: v or 0 for k, v in stats.items()})


def parse(sass: str) -> list[tuple]:
    out = []
    for m in LINE.finditer(sass):
        addr, text = int(m.group(1), 16), m.group(2).strip()
        pred = ""
        if text.startswith("@"):
            pred, text = text.split(None, 1)
        op, _, args = text.partition(" ")
        out.append((addr, pred, op, args.strip()))
    return out


def key_loops(instrs: list[tuple]) -> list[list[tuple]]:
    """The bodies of the backward-branch loops that hold a global load and no EXIT, in address order."""
    exits = [a for a, _p, op, _x in instrs if op == "EXIT"]
    spans = set()
    for addr, _p, op, args in instrs:
        target = re.search(r"0x([0-9a-f]+)", args) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) <= addr:
            lo = int(target.group(1), 16)
            if not any(lo <= e <= addr for e in exits):
                spans.add((lo, addr))
    bodies = [[i for i in instrs if lo <= i[0] <= hi] for lo, hi in sorted(spans)]
    return [b for b in bodies if any(op.startswith(("LDG", "UTMALDG")) for _a, _p, op, _x in b)]


def width(op: str) -> int:
    """Bytes per lane of a load or store opcode."""
    for suffix, size in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if suffix in op:
            return size
    return 4


def counts(body: list[tuple]) -> collections.Counter:
    """Opcode counts of a loop body (full opcodes, e.g. ``HGMMA.64x64x16.F32.BF16``), plus ``total``."""
    c = collections.Counter(op for _a, _p, op, _x in body)
    c["total"] = len(body)
    return c


def tensor_flop(body: list[tuple], num_warps: int) -> int:
    """FLOP the tensor-core instructions of a loop body execute per iteration, over the whole CTA.

    An HGMMA is issued once per warpgroup (its 4 warps' code holds it once each); an HMMA by each warp.
    """
    flop = 0
    for _a, _p, op, _x in body:
        m = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", op)
        if m:
            mm, n, k = map(int, m.groups())
            flop += 2 * mm * n * k * (num_warps // 4)
        elif op.startswith("HMMA.16816"):
            flop += 2 * 16 * 8 * 16 * num_warps
        elif op.startswith("HMMA.1688"):
            flop += 2 * 16 * 8 * 8 * num_warps
    return flop


def tile_work(cfg) -> dict | None:
    """Per key tile of an attention configuration: the FLOP of its dots as tiled (QK^T over the padded
    rotated and unrotated parts, then PV) and the K+V bytes it gathers; None for other kernels."""
    ce = cfg.constexprs
    if "BLOCK_N" not in ce:
        return None
    rows = ce.get("BLOCK_R", ce.get("BLOCK_H"))
    qk_dims = (2 * ce["HALF_PAD"] if ce["ROT"] else 0) + (ce["PASS_PAD"] if ce["HEAD_DIM"] > ce["ROT"] else 0)
    elt = 4 if cfg.signature["q_ptr"] == "*fp32" else 2
    return {"rows": rows, "block_n": ce["BLOCK_N"], "dot_flop": 2 * rows * ce["BLOCK_N"] * (qk_dims + ce["D_PAD"]),
            "kv_bytes": ce["BLOCK_N"] * (qk_dims + ce["D_PAD"]) * elt, "elt": elt,
            "tensor_cores": elt == 2, "kind": "prefill" if "BLOCK_R" in ce else "decode"}


def gate(cfg, code: MachineCode) -> list[str]:
    """The violations of the rules in this module's docstring ([] when ``cfg`` passes)."""
    bad = []
    if code.spill_stores or code.spill_loads or code.stack_bytes:
        bad.append(f"spills: {code.spill_stores} B stored, {code.spill_loads} B loaded, {code.stack_bytes} B stack")
    ops = collections.Counter(op.split(".")[0] for _a, _p, op, _x in code.instructions)
    if ops["LDL"] or ops["STL"] or ".local" in code.ptx:
        bad.append(f"local memory: {ops['LDL']} LDL, {ops['STL']} STL")
    trig = [op for _a, _p, op, _x in code.instructions if op.startswith(("MUFU.SIN", "MUFU.COS"))]
    if re.search(r"^\s*(sin|cos)\.approx", code.ptx, re.M):
        trig.append("sin/cos.approx in the PTX")
    if "__cudart_i2opi_f" in code.ptx:   # the Payne-Hanek table of libdevice's sinf/cosf slow path
        trig.append("libdevice sinf/cosf")
    if trig:
        bad.append(f"trigonometry in the kernel: {', '.join(trig)}")
    if code.shared_bytes > SMEM_LIMIT:
        bad.append(f"needs {code.shared_bytes} B of shared memory, sm_90 allows {SMEM_LIMIT}")
    if getattr(cfg.kernel, "__name__", "") == "dequant_kv_kernel":
        return bad + dequant_violations(cfg, code)
    work = tile_work(cfg)
    if work is None:
        return bad
    loops = key_loops(code.instructions)
    if not loops:
        bad.append("no key loop found")
    for n, body in enumerate(loops):
        c = counts(body)
        if work["tensor_cores"]:
            executed = tensor_flop(body, cfg.num_warps)
            if executed != work["dot_flop"]:
                bad.append(f"loop {n}: tensor cores execute {executed} FLOP per tile, the tile needs "
                           f"{work['dot_flop']} ({executed / work['dot_flop']:.2f}x)")
            if work["kind"] == "prefill" and any(op.startswith("HMMA") for op in c):
                bad.append(f"loop {n}: prefill uses mma.sync (HMMA), not wgmma (HGMMA)")
        wide = ("LDGSTS",) if work["tensor_cores"] else ("LDGSTS", "LDG")
        vec16 = sum(v for op, v in c.items() if op.startswith(wide) and width(op) == 16)
        threads = 32 * cfg.num_warps
        if vec16 * 16 * threads < work["kv_bytes"] and not any(op.startswith("UTMALDG") for op in c):
            bad.append(f"loop {n}: K/V not loaded by 16-byte {'/'.join(wide)}: {vec16} per thread move "
                       f"{vec16 * 16 * threads} B, the tile's K+V are {work['kv_bytes']} B")
        narrow = {op: v for op, v in c.items() if op.startswith(("LDG", "LDGSTS")) and width(op) < 4}
        if narrow:
            bad.append(f"loop {n}: global loads narrower than 4 bytes: {narrow}")
    return bad


def dequant_violations(cfg, code: MachineCode) -> list[str]:
    """Rule 5: the codes (1 byte each, ``BLOCK_T`` rows of ``ROW_PAD`` per program, K and V) come in by
    16-byte loads, and the page rows go out by 16-byte stores."""
    ce, threads = cfg.constexprs, 32 * cfg.num_warps
    row = ce["NUM_KV_HEADS"] * ce["HEAD_DIM"]
    c = counts(code.instructions)
    loads16 = sum(v for op, v in c.items() if op.startswith("LDG") and width(op) == 16)
    stores16 = sum(v for op, v in c.items() if op.startswith("STG") and width(op) == 16)
    code_bytes = 2 * ce["BLOCK_T"] * row            # K and V codes, the padding never loaded
    bad = []
    if loads16 * 16 * threads < code_bytes:
        bad.append(f"codes not loaded by 16-byte LDG: {loads16} per thread move {loads16 * 16 * threads} B, "
                   f"the program's K+V codes are {code_bytes} B")
    if stores16 == 0:
        bad.append("page rows not written by 16-byte STG")
    return bad