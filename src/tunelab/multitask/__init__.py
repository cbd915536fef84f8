"""tunelab.multitask: several tasks on one backbone — heads, sharing structures, task switching per batch
or per row, task sampling, loss weighting, tasks added later, and the analysis (Δp, transfer).

See docs/multitask.md for the math and when to choose what.
"""

from tunelab.multitask.analysis import delta_p, transfer_matrix
from tunelab.multitask.collate import MultitaskCollator, SpanQACollator
from tunelab.multitask.objective import (
    MultitaskEncoderObjective,
    MultitaskObjective,
    MultitaskOptions,
    add_task,
    attached_heads,
    load_heads,
    prepare,
    saved_options,
)
from tunelab.multitask.routing import row_adapters
from tunelab.multitask.tasks import TaskSpec

__all__ = [
    "MultitaskCollator", "MultitaskEncoderObjective", "MultitaskObjective", "MultitaskOptions", "SpanQACollator",
    "TaskSpec", "add_task", "attached_heads", "delta_p", "load_heads", "prepare", "row_adapters", "saved_options",
    "transfer_matrix",
]
