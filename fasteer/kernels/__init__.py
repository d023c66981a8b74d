"""`fasteer.kernels`: the Triton kernels. Their source lives in the top-level ``kernels/``
directory of the repository, apart from bindings and from Python dispatch.

Why this file lives here and not in ``kernels/``: a top-level directory with an
``__init__.py`` is a regular package named ``kernels`` whenever the repository root is on
``sys.path`` (``python -m pytest`` or ``python -m fasteer`` from a clone), and a regular
package there shadows every other ``kernels`` -- Hugging Face's kernel hub among them,
which transformers >= 5.25 imports. Without an ``__init__.py`` the top-level folder can at
most be a namespace portion, and Python gives any regular package or module of that name,
anywhere on ``sys.path``, precedence over namespace portions.

So ``fasteer.kernels`` is this package, and its modules are found by:
- a wheel / ``pip install .``: setup.py's build_py copies ``kernels/*.py`` beside this file;
- a source checkout (editable install or none): the modules are not beside this file, and
  ``__path__`` is extended with the checkout's ``kernels/`` directory.

Kernels only: each takes raw tensors, strides and compile-time flags and knows nothing of
models, carriers or dispatch (that is `fasteer.ops`). Importing this package does not
touch CUDA. On CPU tensors the kernels run under Triton's interpreter, which must be
switched on (``TRITON_INTERPRET=1``) before a kernel module is imported.
"""
from pathlib import Path as _Path

_HERE = _Path(__file__).resolve().parent
_SOURCE = _HERE.parent.parent / "kernels"
# Extend only in a checkout: the modules are not here, and the folder beside the package
# is ours (it holds steer_norm.py and sits next to setup.py), never a foreign `kernels`.
if (not (_HERE / "steer_norm.py").is_file() and (_SOURCE / "steer_norm.py").is_file()
        and (_SOURCE.parent / "setup.py").is_file()):
    __path__.append(str(_SOURCE))  # noqa: F821 -- __path__ is set for every package
