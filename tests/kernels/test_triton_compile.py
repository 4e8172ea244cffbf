"""Every Triton kernel compiles for a GPU (sm_90 cubin) on a machine without one.

The interpreter runs a kernel as Python, so code the Triton compiler rejects (a constexpr branch that leaves a
variable undefined, a global that is not a constexpr, an unsupported op) passes every interpreter test. This test
runs the compiler's whole pipeline (TTIR → TTGIR → LLVM → PTX → cubin, ptxas ships with triton) on every kernel in
every constexpr branch, in a subprocess without ``TRITON_INTERPRET`` (kernels are decorated at import).

It also reads each kernel's TTIR for 32-bit offset products: every multiplication by a row stride or a row length
(``row · stride_h``, ``b · T``) must be 64-bit, since N·V and N·D reach 2^31 at real shapes (8 × 4096 tokens ×
151936 vocabulary is 5e9). The interpreter cannot show such an overflow without tensors of that size.
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton.compiler")

SCRIPT = textwrap.dedent(
    """
    import itertools
    import re
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from hotloop.kernels.losses import _grpo_triton, _kl_penalty_triton, _policy_gradient_triton

    def compile_(fn, pointers, scalars, consts, ints=("T",), **options):
        sig = {n: pointers.get(n, "fp32" if n in scalars else "i32" if n in ints else "constexpr")
               for n in fn.arg_names}
        idx = {(fn.arg_names.index(k),): v for k, v in consts.items()}
        kernel = triton.compile(ASTSource(fn, sig, constexprs=idx), target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": 4, **options})
        check_64bit_offsets(fn.__name__, kernel.asm["ttir"])

    def check_64bit_offsets(name, ttir):
        # no 32-bit product of a row stride or a row length: row * stride exceeds 2^31 at N*V or N*D scale
        defs = dict(re.findall(r"(%[\\w.]+) = (.*)", ttir))
        def root(value):  # follow splats / broadcasts / reshapes back to a kernel argument
            line = defs.get(value, "")
            op = re.match(r"tt\\.(splat|broadcast|expand_dims|reshape) (%[\\w.]+)", line)
            return root(op.group(2)) if op else value
        for lhs, rhs, ty in re.findall(r"arith\\.muli (%[\\w.]+), (%[\\w.]+)[^:]*: (\\S+)", ttir):
            args = {root(lhs), root(rhs)}
            if "i64" not in ty and args & {"%T", "%stride_h", "%stride_w", "%stride_rh", "%stride_rw", "%stride_buf"}:
                raise AssertionError(f"{name}: 32-bit product {lhs} * {rhs} ({ty}) of {sorted(args)}")

    grpo = {n: "*fp32" for n in ("Old", "Ref", "Sampler", "Entropy", "Adv", "Grad", "RowStats")}
    grpo.update(Logp="*bf16", Mask="*u8")
    scalars = "beta eps_low eps_high delta log_cap entropy_coef tau_pos tau_neg k_pos lam_pos k_neg lam_neg".split()
    for loss, on in itertools.product(range(4), (True, False)):
        compile_(_grpo_triton._grpo_token_kernel, grpo, scalars,
                 dict(LOSS=loss, HAS_OLD=on, HAS_DELTA=on, HAS_KL=True, KL_EST=1 + loss % 3, BIAS_KL=on, HAS_IS=on,
                      HAS_CAP=on, HAS_ENT=on, BLOCK_T=1024))
    kl = dict(Logp="*fp32", Ref="*bf16", Mask="*i1", Grad="*fp32", RowStats="*fp32")
    for est in (1, 2, 3):
        compile_(_kl_penalty_triton._kl_penalty_kernel, kl, (), dict(KL_EST=est, BLOCK_T=256))
    pg = dict(Logp="*fp16", Coef="*fp32", Mask="*i64", Grad="*fp32", RowStats="*fp32")
    for coef in (0, 1, 2):
        compile_(_policy_gradient_triton._linear_token_kernel, pg, (), dict(COEF=coef, BLOCK_T=4096))
    # matmul kernels at the tiles and launch options they get on an H100 (kernels/_triton_utils.logits_tiles)
    from hotloop.kernels import _fused_linear_kl_kernels as klt
    from hotloop.kernels import _fused_linear_logprob_triton as lpt
    shape_ints = "N V D DR stride_h stride_w stride_rh stride_rw stride_buf tiles_per_split n_tiles vocab_start width"
    shape_ints = shape_ints.split() + ["ignore_index"]
    for dtype, block_d in (("fp32", 32), ("bf16", 64)):
        tiles = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=block_d)
        launch = dict(num_warps=8, num_stages=3)
        heads = {n: f"*{dtype}" for n in ("H", "W", "Bias", "RH", "RW", "RBias", "Buf")}
        rows = {n: "*fp32" for n in ("M", "S", "E", "ZT", "Lse", "LseLo", "Ent", "GradLogp", "GradEnt", "Part",
                                      "Stats")}
        rows["Targets"] = "*i64"
        pointers = {**heads, **rows}
        for on in (True, False):
            compile_(lpt._logprob_fwd_kernel, pointers, ("scale",),
                     dict(HAS_BIAS=on, WITH_ENTROPY=on, UPCAST=False, **tiles), ints=shape_ints, **launch)
            compile_(lpt._logprob_bwd_kernel, pointers, ("scale",),
                     dict(HAS_BIAS=on, HAS_ENT_GRAD=on, UPCAST=False, **tiles), ints=shape_ints, **launch)
            half = dict(tiles, BLOCK_V=64)  # the KL kernels' CUDA tiles (_fused_linear_kl_triton._tiles)
            kl_flags = dict(HAS_BIAS=on, HAS_RBIAS=not on, UPCAST=False, R_UPCAST=False, **half)
            kl_scalars = ("scale", "log_a", "log_b", "one_minus_beta")
            compile_(klt.kl_fwd_kernel, pointers, kl_scalars, dict(REVERSE=on, **kl_flags), ints=shape_ints,
                     **launch)
            compile_(klt.jsd_fwd_kernel, pointers, kl_scalars, kl_flags, ints=shape_ints, **launch)
            for kind in (0, 1, 2):
                compile_(klt.kl_bwd_kernel, pointers, kl_scalars, dict(KIND=kind, **kl_flags), ints=shape_ints,
                         **launch)
    print("compiled")
    """
)


def test_every_kernel_compiles_for_sm90_in_every_constexpr_branch():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-4000:]
