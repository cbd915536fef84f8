"""Tasks of a multi-task model: a name, a record filter, a kind, and the head the kind needs.

A task selects its records by ``match`` (record field -> value or list of values; default
``{"task": <name>}``, which fits the built-in world's ``task`` field and the ``task`` that the file
loaders set to the file stem or a manifest's task name). Its kind decides the head and the loss:

    kind                  head (tunelab.models.heads)   loss                         score
    generation            lm (the model's own logits)   SFT: CE on response tokens   the task's generation metric
    classification        classification (pooled)       CE over classes              accuracy
    token_classification  token_classification          CE per first sub-token       entity F1 (seqeval)
    extractive_qa         span_qa                       (CE(start) + CE(end)) / 2    token F1 of the span text
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tunelab.errors import ConfigError, DataError

KINDS = ("generation", "classification", "token_classification", "extractive_qa")
HEAD_KIND = {"generation": "lm", "classification": "classification",
             "token_classification": "token_classification", "extractive_qa": "span_qa"}
RECORD_KIND = {"generation": "generation", "classification": "classification", "ner": "token_classification",
               "token_classification": "token_classification", "extractive_qa": "extractive_qa"}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")


class TaskSpec(BaseModel):
    """One task of the ``multitask`` objective (``objective.options.tasks[i]``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., description="Task name: head name and (per-task sharing) adapter name.")
    kind: Literal["generation", "classification", "token_classification", "extractive_qa"] | None = Field(
        None, description="Default: the built-in task's kind (qa/summarization/translation are generation, ...).")
    match: dict[str, str | list[str]] | None = Field(
        None, description="Record filter, field -> value(s); default {task: <name>}.")
    labels: list[str] | None = Field(None, description="Class / tag names (default: the built-in task's).")
    group: str | None = Field(None, description="Group adapter of hierarchical sharing (e.g. generation, medical).")
    max_answer_length: int = Field(30, gt=0, description="Longest extractive answer in tokens (extractive_qa).")
    max_records: int | None = Field(None, gt=0, description="Train on at most this many of the task's records "
                                    "(the first ones; e.g. to make one task 10x smaller than another).")

    @model_validator(mode="after")
    def _resolve(self) -> TaskSpec:
        if not NAME.fullmatch(self.name) or self.name == "default" or self.name.startswith("group_"):
            raise ValueError(f"task name {self.name!r}: use letters, digits, '_' and '-', not 'default' or 'group_*'")
        if self.group is not None and not NAME.fullmatch(self.group):
            raise ValueError(f"group {self.group!r}: use letters, digits, '_' and '-'")
        self.match = dict(self.match) if self.match else {"task": self.name}
        builtin = builtin_task(self.match)
        if self.kind is None:
            if builtin is None:
                raise ValueError(f"task {self.name!r}: set kind (one of {', '.join(KINDS)}); it is not a built-in task")
            self.kind = RECORD_KIND[_synthetic().TASK_KINDS[builtin]]
        if self.kind in ("classification", "token_classification") and self.labels is None:
            if builtin is None:
                raise ValueError(f"task {self.name!r} ({self.kind}): list its labels (class or BIO tag names)")
            self.labels = list(_synthetic().label_names(builtin))
        return self

    @property
    def head_kind(self) -> str:
        return HEAD_KIND[self.kind]

    def matches(self, record: Mapping[str, Any]) -> bool:
        for key, wanted in self.match.items():
            value = record.get(key)
            if value is None or (str(value) not in wanted if isinstance(wanted, list) else str(value) != wanted):
                return False
        return True


def _synthetic():
    from tunelab.data import synthetic

    return synthetic


def builtin_task(match: Mapping[str, Any]) -> str | None:
    """The built-in task a filter selects (``{task: ner}`` -> ``ner``), or None."""
    value = match.get("task")
    return value if isinstance(value, str) and value in _synthetic().TASKS else None


def task_of(tasks: Sequence[TaskSpec], record: Mapping[str, Any]) -> TaskSpec:
    """The first task whose filter the record matches (DataError if none)."""
    for task in tasks:
        if task.matches(record):
            return task
    filters = "; ".join(f"{t.name}: {t.match}" for t in tasks)
    raise DataError(f"record {record.get('id', '?')!r} (task {record.get('task')!r}) matches no task of the multitask "
                    f"objective ({filters}); add a task or narrow data.tasks")


def group_records(tasks: Sequence[TaskSpec], records: Sequence[Mapping[str, Any]],
                  strict: bool = False) -> dict[str, list[int]]:
    """``{task name: record indices}`` (records matching no task are skipped, or an error with ``strict``)."""
    groups: dict[str, list[int]] = {task.name: [] for task in tasks}
    for index, record in enumerate(records):
        for task in tasks:
            if task.matches(record):
                groups[task.name].append(index)
                break
        else:
            if strict:
                task_of(tasks, record)
    return groups


def check_unique(tasks: Sequence[TaskSpec]) -> None:
    names = [t.name for t in tasks]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise ConfigError(f"two tasks are named {duplicate!r}; give each task a distinct name")
