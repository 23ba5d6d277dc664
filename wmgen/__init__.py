"""wmgen: GPT-2 text generation through a bounded, inspectable working memory.

    import wmgen
    lm = wmgen.load("gpt2")                       # the tokenizer now, the weights on first use
    out = lm.generate("Once upon a time", max_new_tokens=50, temperature=0)
    mem = lm.memory(capacity=256, keep="prompt")  # a WorkingMemory, reusable across calls
    wmgen.sessions.save(mem, "story")             # the files `wmgen generate -c` reads

Importing wmgen imports no torch: the names below load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = [
    "load",
    "Model",
    "WorkingMemory",
    "Shape",
    "Slot",
    "POLICIES",
    "Generation",
    "Score",
    "Started",
    "Token",
    "Evicted",
    "Finished",
    "Settings",
    "sessions",
    "WmgenError",
    "UsageError",
    "ModelError",
    "SessionError",
    "__version__",
]

# name -> the module that defines it, imported when the name is first used
_WHERE = {
    "load": "wmgen.api",
    "Model": "wmgen.api",
    "WorkingMemory": "wmgen.memory",
    "Shape": "wmgen.window",
    "Slot": "wmgen.policies",
    "POLICIES": "wmgen.policies",
    "Generation": "wmgen.events",
    "Started": "wmgen.events",
    "Token": "wmgen.events",
    "Evicted": "wmgen.events",
    "Finished": "wmgen.events",
    "Score": "wmgen.perplexity",
    "Settings": "wmgen.settings",
    "WmgenError": "wmgen.errors",
    "UsageError": "wmgen.errors",
    "ModelError": "wmgen.errors",
    "SessionError": "wmgen.errors",
}

if TYPE_CHECKING:
    from wmgen import session as sessions
    from wmgen.api import Model, load
    from wmgen.errors import ModelError, SessionError, UsageError, WmgenError
    from wmgen.events import Evicted, Finished, Generation, Started, Token
    from wmgen.memory import WorkingMemory
    from wmgen.perplexity import Score
    from wmgen.settings import Settings


def __getattr__(name: str):
    import importlib

    if name == "sessions":  # the public name of wmgen/session.py: saved memories
        return importlib.import_module("wmgen.session")
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'wmgen' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
