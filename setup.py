"""Build of fasteer: the Python package, `fasteer._C` (C++ CPU kernels, always) and
`fasteer._cuda` (CUDA kernels, when nvcc is found).

Why a hand-written ninja build and not torch.utils.cpp_extension: the extensions take
raw pointers, shapes and strides from Python and never include or link torch, so one
build serves every torch version, and installing needs no torch at build time. Ninja
compiles every object of both modules in parallel.

Environment:
  FASTEER_CUDA        auto (default): build the CUDA module when nvcc is found; a
                      failed CUDA build then prints one notice and the install goes on
                      CPU-only. 1: required (fail without nvcc). 0: never.
  FASTEER_CUDA_ARCHS  SM list, default "8.0;8.9;9.0" (PTX of the highest is embedded too).
  FASTEER_CPU_ARCH    -march value for the C++ kernels, default "x86-64-v2" on x86-64
                      (a portable baseline: a wheel or image built here runs on any
                      x86-64-v2 CPU; the row loop picks AVX2 / AVX-512 code at run time),
                      none elsewhere. "native" ties the build to this CPU.
  FASTEER_PTXAS_VERBOSE=1  pass -Xptxas -v (register / spill report per kernel).
  MAX_JOBS            ninja parallelism (default: number of CPUs).
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"


def log(msg: str) -> None:
    print(f"fasteer build: {msg}", file=sys.stderr, flush=True)


def notice(msg: str) -> None:
    """A line the person installing must see. pip captures a build's output and shows it
    only with -v or on failure, so a long step would sit silent behind "still running...":
    also write to the controlling terminal when there is one (none in CI: then stderr only)."""
    log(msg)
    if sys.stderr.isatty():
        return
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(f"fasteer build: {msg}\n")
    except OSError:
        pass


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def find_cuda_home(nvcc: str) -> Path | None:
    """The toolkit root: from CUDA_HOME, nvcc's real location, or nvcc's own dry run."""
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]))
    candidates.append(Path(os.path.realpath(nvcc)).parent.parent)
    try:  # nvcc may be a wrapper script; its dry run names the toolkit's TOP
        dry = subprocess.run([nvcc, "-dryrun", "--version"], capture_output=True, text=True,
                             timeout=60)
        for line in (dry.stdout + dry.stderr).splitlines():
            if "TOP=" in line:
                candidates.append(Path(line.split("TOP=", 1)[1].strip()).resolve())
    except (OSError, subprocess.SubprocessError):
        pass
    candidates += [Path("/usr/local/cuda")] + sorted(Path("/usr/local").glob("cuda-*"), reverse=True)
    for c in candidates:
        if (c / "include" / "cuda_runtime.h").exists():
            return c
    return None


def cuda_archs() -> list[str]:
    raw = os.environ.get("FASTEER_CUDA_ARCHS", "8.0;8.9;9.0")
    archs = []
    for item in raw.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip().lower().replace("sm_", "").replace("+ptx", "")
        if item:
            archs.append(item.replace(".", ""))
    if not archs:
        raise SystemExit("FASTEER_CUDA_ARCHS: expected a list like '8.0;9.0'")
    return archs


def ninja_binary() -> str:
    try:
        import ninja  # the PyPI package (a build requirement)
        path = Path(ninja.BIN_DIR) / "ninja"
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("ninja")
    if not found:
        raise SystemExit("fasteer build: ninja not found (pip install ninja)")
    return found


class NinjaBuildExt(build_ext):
    """Compile every extension's objects with one ninja file, then link each module."""

    def build_extensions(self):
        mode = os.environ.get("FASTEER_CUDA", "auto").lower()
        if mode not in ("auto", "0", "1"):
            raise SystemExit(f"FASTEER_CUDA: expected auto, 0 or 1, got {mode!r}")
        nvcc = find_nvcc() if mode != "0" else None
        cuda_home = find_cuda_home(nvcc) if nvcc else None
        if mode == "1" and (nvcc is None or cuda_home is None):
            raise SystemExit("FASTEER_CUDA=1 but nvcc / the CUDA toolkit was not found "
                             "(set CUDA_HOME)")

        cpu_exts = [e for e in self.extensions if not getattr(e, "is_cuda", False)]
        cuda_exts = [e for e in self.extensions if getattr(e, "is_cuda", False)]
        if cuda_home is None:
            why = "FASTEER_CUDA=0" if mode == "0" else "no nvcc found"
            log(f"building the CPU kernels only ({why}); the cuda backend will be unavailable")
            cuda_exts = []
        self.extensions = cpu_exts + cuda_exts

        build_dir = Path(self.build_temp).resolve() / "ninja"
        build_dir.mkdir(parents=True, exist_ok=True)
        ninja_file = build_dir / "build.ninja"
        targets = self._write_ninja(ninja_file, build_dir, cpu_exts, cuda_exts, nvcc, cuda_home)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)

        def run_ninja(names):
            cmd = [ninja_binary(), "-f", str(ninja_file), "-j", jobs] + names
            subprocess.run(cmd, check=True, cwd=build_dir)

        run_ninja([targets[e.name] for e in cpu_exts])
        if cuda_exts:
            notice(f"compiling the CUDA kernels (fasteer._cuda) with {nvcc} for "
                   f"sm_{', sm_'.join(cuda_archs())}: a few minutes on a small machine, and "
                   "needed only where a GPU runs them; FASTEER_CUDA=0 skips this step")
            try:
                run_ninja([targets[e.name] for e in cuda_exts])
            except subprocess.CalledProcessError:
                if mode == "1":
                    raise
                log("the CUDA module failed to build; installing CPU-only (FASTEER_CUDA=1 to fail)")
                cuda_exts = []
                self.extensions = cpu_exts
        for ext in cpu_exts + cuda_exts:
            dest = Path(self.get_ext_fullpath(ext.name))
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(targets[ext.name], dest)

    def _write_ninja(self, path, build_dir, cpu_exts, cuda_exts, nvcc, cuda_home):
        py_inc = sysconfig.get_paths()["include"]
        import pybind11
        includes = [str(CSRC), py_inc, pybind11.get_include()]
        inc = " ".join(f"-I{shlex.quote(i)}" for i in includes)
        import platform
        default_arch = "x86-64-v2" if platform.machine().lower() in ("x86_64", "amd64") else ""
        march = os.environ.get("FASTEER_CPU_ARCH", default_arch).strip()
        arch_flags = (f"-march={shlex.quote(march)} "
                      f"-DFASTEER_CPU_ARCH_NAME=\\\"{march}\\\"" if march else "")
        cxxflags = (f"-O3 -std=c++17 -fPIC -fvisibility=hidden -fopenmp-simd -ffp-contract=off "
                    f"{arch_flags} -Wall -Wno-unknown-pragmas")
        lines = [
            "ninja_required_version = 1.3",
            f"cxx = {os.environ.get('CXX', 'c++')}",
            f"cxxflags = {cxxflags} {inc}",
            "rule cxx",
            "  command = $cxx -MMD -MF $out.d $cxxflags $extra -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = C++ $in",
            "rule link",
            "  command = $cxx -shared $in -o $out $ldflags",
            "  description = LINK $out",
        ]
        targets = {}
        if cuda_exts:
            archs = cuda_archs()
            gencode = " ".join(f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs)
            gencode += f" -gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"
            ptxas = " -Xptxas -v" if os.environ.get("FASTEER_PTXAS_VERBOSE") == "1" else ""
            cuda_inc = f"-I{shlex.quote(str(cuda_home / 'include'))}"
            lib_dir = next((d for d in (cuda_home / "lib64", cuda_home / "lib")
                            if (d / "libcudart_static.a").exists()), cuda_home / "lib64")
            lines += [
                f"nvcc = {shlex.quote(nvcc)}",
                f"nvccflags = -O3 -std=c++17 --expt-relaxed-constexpr -Xcompiler -fPIC "
                f"-Xcompiler -fvisibility=hidden {gencode}{ptxas} {inc} {cuda_inc}",
                f"cuda_ldflags = -L{shlex.quote(str(lib_dir))} -lcudart_static -ldl -lrt -lpthread",
                "rule nvcc",
                "  command = $nvcc -MD -MF $out.d $nvccflags -c $in -o $out",
                "  depfile = $out.d",
                "  deps = gcc",
                "  description = NVCC $in",
            ]
            self._cuda_archs = archs
        for ext in cpu_exts + cuda_exts:
            objs = []
            for src in ext.sources:
                src_path = (ROOT / src).resolve()
                obj = build_dir / ext.name / (Path(src).with_suffix(".o").as_posix().replace("/", "_"))
                objs.append(str(obj))
                if src.endswith(".cu"):
                    lines.append(f"build {obj}: nvcc {src_path}")
                else:
                    lines.append(f"build {obj}: cxx {src_path}")
                    if getattr(ext, "is_cuda", False):
                        archs_macro = ",".join(self._cuda_archs)
                        lines.append(f"  extra = -DFASTEER_CUDA_ARCHS=\\\"{archs_macro}\\\"")
            out = build_dir / ext.name / ("lib" + ext.name.split(".")[-1] + ".so")
            ldflags = "$cuda_ldflags" if getattr(ext, "is_cuda", False) else ""
            lines.append(f"build {out}: link {' '.join(objs)}")
            lines.append(f"  ldflags = {ldflags}")
            targets[ext.name] = str(out)
        path.write_text("\n".join(lines) + "\n")
        return targets


class BuildPyWithKernels(build_py):
    """Copy the Triton kernels (top-level ``kernels/*.py``) into ``fasteer/kernels/``.

    The top-level folder has no ``__init__.py`` on purpose (a regular package named
    ``kernels`` would shadow Hugging Face's kernel hub whenever the repository root is
    on ``sys.path``). An editable install copies nothing: ``fasteer/kernels/__init__.py``
    then extends its ``__path__`` to the checkout's folder.
    """

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "fasteer" / "kernels"
        target.mkdir(parents=True, exist_ok=True)
        for src in sorted((ROOT / "kernels").glob("*.py")):
            self.copy_file(str(src), str(target / src.name))


def extension(name: str, sources: list[str], is_cuda: bool = False) -> Extension:
    ext = Extension(name, sources=sources)
    ext.is_cuda = is_cuda
    return ext


def sources(pattern_dir: str, *patterns: str) -> list[str]:
    out = []
    for p in patterns:
        out += sorted(str(f.relative_to(ROOT)) for f in (ROOT / pattern_dir).glob(p))
    return out


setup(
    # kernels/ (Triton) sits beside the package, apart from bindings and Python, and is
    # installed into fasteer.kernels by BuildPyWithKernels.
    packages=find_packages(include=["fasteer", "fasteer.*"]),
    ext_modules=[
        extension("fasteer._C", ["csrc/bindings.cpp"] + sources("csrc/cpu", "*.cpp")),
        extension("fasteer._cuda", ["csrc/cuda/bindings.cpp"] + sources("csrc/cuda", "*.cu"),
                  is_cuda=True),
    ],
    cmdclass={"build_ext": NinjaBuildExt, "build_py": BuildPyWithKernels},
)
