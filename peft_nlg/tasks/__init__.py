"""The task registry: one small declarative module per task."""

from peft_nlg.tasks import dialogue, summarization, translation
from peft_nlg.tasks.base import Task

TASKS: dict[str, Task] = {m.TASK.name: m.TASK for m in (translation, dialogue, summarization)}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task '{name}'; choose from {', '.join(TASKS)}") from None
