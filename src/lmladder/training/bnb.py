"""bitsandbytes only when a rung quantises.

bitsandbytes is a dependency (the ``qlora`` rung), and whenever it is installed peft
imports it: ``import peft`` runs ``peft/helpers.py``'s ``try: import bitsandbytes``, and
LoRA's layer dispatch (``peft.tuners.lora.model``) imports it for its 8-/4-bit
dispatchers; transformers' ``Trainer`` imports peft. On a CPU machine that import alone
logs ``Failed to load CPU gemm_4bit_forward from kernels-community ...`` in a plain LoRA
run, and costs about a second.

So the ``lmladder`` command hides it (:func:`defer`, called by ``cli.main``, which owns its
process; a library user's own process is left alone): ``sys.modules
["bitsandbytes"] = None`` makes ``importlib.util.find_spec`` answer None and ``import
bitsandbytes`` raise ImportError, which peft and transformers read as "not installed".
A rung that quantises calls :func:`require` first: the entry is removed, bitsandbytes is
imported, and the availability checks cached while it was hidden are cleared. A process
that imported bitsandbytes before lmladder keeps it (nothing is hidden then).
"""

from __future__ import annotations

import logging
import sys

_hidden = False

# modules that bind ``bnb`` at import time only when bitsandbytes is available
_BINDS_BNB = (
    "peft.helpers",
    "transformers.integrations.bitsandbytes",
    "trl.generation.vllm_generation",
    "trl.experimental.online_dpo.online_dpo_trainer",
)


def defer() -> None:
    """Hide bitsandbytes from peft / transformers until :func:`require` (no-op when it is
    already imported)."""
    global _hidden
    if "bitsandbytes" not in sys.modules:
        sys.modules["bitsandbytes"] = None  # type: ignore[assignment]
        _hidden = True


def hidden() -> bool:
    return "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None


def require():
    """Import bitsandbytes for a rung that quantises (qlora) and return it; ImportError when
    it is not installed."""
    global _hidden
    if hidden():
        del sys.modules["bitsandbytes"]
    _hidden = False
    # on CPU bitsandbytes warns that an optional fused kernel package is missing; its own
    # kernels work (tested), so the warning would only alarm
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes

    _clear_caches()
    for name in _BINDS_BNB:
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "bnb", None) is None:
            mod.bnb = bitsandbytes
    return bitsandbytes


def _clear_caches() -> None:
    """Availability checks that may have cached "not installed" while it was hidden."""
    checks = (
        ("transformers.utils.import_utils", "is_bitsandbytes_available"),
        ("peft.import_utils", "is_bnb_available"),
        ("peft.import_utils", "is_bnb_4bit_available"),
        ("accelerate.utils.imports", "is_bnb_available"),
    )
    for mod_name, fn in checks:
        f = getattr(sys.modules.get(mod_name), fn, None)
        if hasattr(f, "cache_clear"):
            f.cache_clear()
