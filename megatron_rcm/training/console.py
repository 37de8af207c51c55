"""A quiet console: the known library notices of a run shown once, as one line of ours, on rank 0 only.

    from megatron_rcm.training.console import quiet
    quiet()  # first thing in a launcher's main(), before megatron / torch.distributed are imported

megatron-core, torch.distributed.checkpoint and torch print the same warnings from every rank and from several
modules at startup (Transformer Engine / Apex fallbacks, single-process checkpoint reads, deprecations). Each known
one is matched by its text; those that tell the user something become one line saying what it means for the run,
the rest of the known noise is dropped. Unknown warnings are shown as Python would show them.
"""

import dataclasses
import logging
import os
import re
import sys
import warnings


@dataclasses.dataclass(frozen=True)
class Notice:
    """A known library message and what it means for the user (None: noise, hidden)."""

    pattern: str
    meaning: str | None


NOTICES = (
    Notice(r"Transformer Engine and Apex are not installed",
           "Transformer Engine / Apex not installed: torch optimizers, megatron's local fused-op fallbacks and "
           "SDPA attention in use"),
    Notice(r"No CUDA runtime is found", "no CUDA runtime found: running on CPU (gloo)"),
    # reading or writing one rank's checkpoint files without a process group is what the checkpoint code does
    Notice(r"torch\.distributed is disabled, unavailable or uninitialized", None),
    Notice(r"The argument order of load has been changed", None),
    Notice(r"MCore's async save is deprecated", None),
    Notice(r"Warning\. tp_group is None", None),
    Notice(r"torch\.distributed\.reduce_op is deprecated", None),
    Notice(r"The following imports from `dynamic_context\.py` will be removed", None),
)

LOGGERS = ("torch.utils.cpp_extension", "megatron.core.dist_checkpointing.strategies.torch",
           "megatron.core.dist_checkpointing.strategies.async_utils", "megatron.core.utils")
"""Loggers that emit known notices (a filter on each: records are filtered where they are logged)."""

_shown: set[str] = set()
_installed = False


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _notice(text: str) -> Notice | None:
    for n in NOTICES:
        if re.search(n.pattern, text):
            return n
    return None


def _tell(notice: Notice) -> None:
    if notice.meaning is None or notice.pattern in _shown:
        return
    _shown.add(notice.pattern)
    if _is_rank_zero():
        print(f"note: {notice.meaning}", file=sys.stderr, flush=True)


def _filter(record: logging.LogRecord) -> bool:
    notice = _notice(record.getMessage())
    if notice is None:
        return True
    _tell(notice)
    return False


def quiet() -> None:
    """Install the warning hook and the logger filters (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        notice = _notice(str(message))
        if notice is None:
            return show(message, category, filename, lineno, file, line)
        _tell(notice)

    warnings.showwarning = showwarning
    # every occurrence reaches the hook (which shows ours once), not once per call site
    for n in NOTICES:
        warnings.filterwarnings("always", message=f".*{n.pattern}")
    for name in LOGGERS:
        logging.getLogger(name).addFilter(_filter)
