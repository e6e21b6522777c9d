"""What the teacher says: typed signals behind one interface, ``source.signal(batch)``."""

from .multi import MultiTeacher
from .online import OnlineTeacher, SignalSource, TeacherMemo, target_index, target_rows, teacher_tokens
from .types import DenseSignal, Head, Signal, SparseSignal, apply_head

__all__ = [
    "DenseSignal",
    "Head",
    "MultiTeacher",
    "OnlineTeacher",
    "Signal",
    "SignalSource",
    "SparseSignal",
    "TeacherMemo",
    "apply_head",
    "target_index",
    "target_rows",
    "teacher_tokens",
]
