"""The slot-table layout of the fused steer+norm op: the contract every backend reads.

Why tables and not arguments: a steered batch mixes rows with different steering
(per-row slots), and serving changes α or vectors between steps without recompiling
or re-capturing a CUDA graph. So everything a row's edits need lives in a few
preallocated tensors that are updated in place, and a kernel only reads them.

One site's tables
-----------------
``bank``    float32 [V, D]   vectors referenced by index (steering vectors, unit
                             directions, SAE encoder columns and decoder rows,
                             condition vectors). Slots share vectors: an α sweep over
                             256 rows stores the vector once.
``meta``    int32   [S, E, 4] per slot s and edit e: (code, u, w, c)
                             code  bit-packed edit description (below)
                             u, w  bank rows the edit reads (-1 = none)
                             c     bank row of the condition vector (-1 = none)
``params``  float32 [S, E, 8] per slot s and edit e: p0..p3 edit scalars,
                             p4 condition threshold, p5 condition bias, p6/p7 spare.

Per token (N rows of the flattened [*, D] hidden state):
``slot``    int32 [N]  slot of the row, -1 = untouched (values >= S also untouched)
``gate``    uint8 [N]  1 = edit, 0 = untouched (position rule, padding)

The code word
-------------
    bits 0-7    kind        NONE, ADD, CLAMP, ABLATE, SCALE, FEATURE, DYN_SCALE
    bits 8-11   feature op  FEAT_ADD, FEAT_SET, FEAT_SCALE, FEAT_CLAMP
    bits 12-15  activation  ACT_RELU, ACT_JUMPRELU, ACT_LINEAR
    bits 16-19  condition   COND_NONE, COND_COSINE, COND_PROJ
    bit  24     PRESERVE_NORM
    bit  25     JOINT       (FEATURE edits only, never with PRESERVE_NORM)

The math (h is the row in float32, h_in the row as it entered the site)
------------------------------------------------------------------------
A row is edited iff gate == 1 and 0 <= slot < S. Its edits e = 0..E-1 apply in order;
kind NONE is skipped. Before any edit, each edit's condition is evaluated on h_in:
    COND_COSINE   (h_in . bank[c]) / (|h_in| |bank[c]|) >= p4   (0 if a norm is 0)
    COND_PROJ     h_in . bank[c] + p5 >= p4
An edit whose condition fails is skipped. Each edit e *reads* a row r_e: the current
row x, or -- when its code has JOINT -- the row the edit before it read (r_e = r_{e-1};
for e = 0, r_0 = x = h_in). This holds whether or not the edits apply. The dot products
below (h.u) are taken on r_e; the change is added to the current row. Without JOINT,
r_e = x and every edit sees the previous one's result. With it, a run of FEATURE edits
reads one row: a FeatureEdit on k features lowers to k FEATURE edits, the 2nd..kth
JOINT, and computes every z_k from the same h -- the full SAE's result, exactly:
    h <- h + sum_k (z'_k - z_k) W_dec[k]
Then, with u = bank[u], w = bank[w] and h.u meaning r_e.u:
    ADD       h <- h + p0 * u
    CLAMP     h <- h + (p0 - h.u) * u            (u unit: normalised on the host)
    ABLATE    h <- h - (h.u) * u                 (u unit)
    SCALE     h <- p0 * h
    DYN_SCALE h <- (p0 + p1 * (h.u)) * h         (u: a raw weight vector, not normalised;
                                                 DynScalar, Stoehr et al. 2024: a scale
                                                 that is a learned linear function of h)
    FEATURE   pre = u.h + p0                     (u: encoder column with b_dec and
                                                  input scaling folded in, p0: bias)
              z   = act(pre)                     relu: max(pre, 0)
                                                 jumprelu: pre if pre > p1 else 0
                                                 (lowering stores p1 = max(theta, 0), so
                                                 this is relu(pre) * [pre > theta])
                                                 linear: pre
              z'  = op(z)                        add: z + p2   set: p2
                                                 scale: z * p2 clamp: min(max(z, p2), p3)
              h <- h + (z' - z) * w              (w: decoder row, output scaling folded)
    PRESERVE_NORM  after the edit, h <- h * |h_before| / |h_after|  (if |h_after| > 0)
The edited row is rounded to h's dtype and written back in place; rows that are not
edited are never written (bitwise unchanged).

Then the norm reads the (rounded) row x and writes ``out``:
    NORM_NONE     out is not written
    NORM_RMS      r = x * rsqrt(mean(x^2) + eps)      (float32)
                  cast_before_weight: out = round(round(r) * (weight + offset))
                  else:               out = round(r * (weight + offset))
                  (Llama/Qwen/Mistral round before the weight; Gemma (offset 1)
                  and OLMo-2 multiply in float32.) No weight: out = round(r).
    NORM_LAYER    out = round((x - mean) * rsqrt(var + eps) * weight + bias)
"""
from __future__ import annotations

# edit kinds (bits 0-7)
NONE = 0
ADD = 1
CLAMP = 2
ABLATE = 3
SCALE = 4
FEATURE = 5
DYN_SCALE = 6

# feature ops (bits 8-11)
FEAT_ADD = 0
FEAT_SET = 1
FEAT_SCALE = 2
FEAT_CLAMP = 3

# SAE activations (bits 12-15; ACT_TOPK only in the full SAE op, never in a code word)
ACT_RELU = 0
ACT_JUMPRELU = 1
ACT_LINEAR = 2
ACT_TOPK = 3

# conditions (bits 16-19)
COND_NONE = 0
COND_COSINE = 1
COND_PROJ = 2

PRESERVE_NORM = 1 << 24
JOINT = 1 << 25

# norm kinds
NORM_NONE = 0
NORM_RMS = 1
NORM_LAYER = 2

META_WIDTH = 4
PARAM_WIDTH = 8

# meta columns
M_CODE, M_U, M_W, M_C = range(4)
# params columns
P_A, P_B, P_C, P_D, P_COND_THRESH, P_COND_BIAS = range(6)

KIND_NAMES = {NONE: "none", ADD: "add", CLAMP: "clamp", ABLATE: "ablate", SCALE: "scale",
              FEATURE: "feature", DYN_SCALE: "dyn_scale"}
FEATURE_OPS = {"add": FEAT_ADD, "set": FEAT_SET, "scale": FEAT_SCALE, "clamp": FEAT_CLAMP}
ACTIVATIONS = {"relu": ACT_RELU, "jumprelu": ACT_JUMPRELU, "linear": ACT_LINEAR, "topk": ACT_TOPK}
CONDITIONS = {"none": COND_NONE, "cosine": COND_COSINE, "projection": COND_PROJ}


def pack_code(kind: int, *, feature_op: int = 0, activation: int = 0,
              condition: int = COND_NONE, preserve_norm: bool = False,
              joint: bool = False) -> int:
    """Pack an edit description into the int32 code word."""
    if not 0 <= kind <= 0xFF:
        raise ValueError(f"kind: expected 0..255, got {kind}")
    if joint and (kind != FEATURE or preserve_norm):
        raise ValueError("joint: only a FEATURE edit without preserve_norm reads jointly "
                         f"with the edit before it (got kind {kind}, "
                         f"preserve_norm={preserve_norm})")
    for name, value in (("feature_op", feature_op), ("activation", activation),
                        ("condition", condition)):
        if not 0 <= value <= 0xF:
            raise ValueError(f"{name}: expected 0..15, got {value}")
    return (kind | (feature_op << 8) | (activation << 12) | (condition << 16)
            | (PRESERVE_NORM if preserve_norm else 0) | (JOINT if joint else 0))


def unpack_code(code: int) -> dict:
    """Inverse of :func:`pack_code` (for messages and tests)."""
    return {
        "kind": code & 0xFF,
        "feature_op": (code >> 8) & 0xF,
        "activation": (code >> 12) & 0xF,
        "condition": (code >> 16) & 0xF,
        "preserve_norm": bool(code & PRESERVE_NORM),
        "joint": bool(code & JOINT),
    }


def needs_u(kind: int) -> bool:
    return kind in (ADD, CLAMP, ABLATE, FEATURE, DYN_SCALE)


def needs_w(kind: int) -> bool:
    return kind == FEATURE
