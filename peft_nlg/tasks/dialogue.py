"""Response generation: the conversation so far -> the next turn."""

from peft_nlg.data.sources import chitchat, hub
from peft_nlg.metrics import dialogue_metrics
from peft_nlg.tasks.base import HubSource, Source, Task

TASK = Task(
    name="dialogue",
    instruction="Write the next reply in this conversation.",
    config_task_key=None,
    embedded=Source(
        description="Chit-Chat Challenge conversations, PyPI chitchat-dataset==0.9.0",
        license="MIT", fetch=chitchat.fetch, build=chitchat.build),
    hub=HubSource(dataset_id="li2017dailydialog/daily_dialog", load=hub.load_daily_dialog),
    split_sizes=(500, 1000),
    metrics=dialogue_metrics,
    main_metric="rougeL",
    second_metric="distinct2",
    original_model="facebook/blenderbot_small-90M",
    max_new_tokens=64,
)
