"""Summarization: a Debian package's long description -> its one-line synopsis."""

from peft_nlg.data.sources import apt_descriptions, hub
from peft_nlg.metrics import summarization_metrics
from peft_nlg.tasks.base import HubSource, Source, Task

TASK = Task(
    name="summarization",
    instruction="Summarize this software description in one line.",
    config_task_key="summarization",
    embedded=Source(
        description="Debian package descriptions (long description -> synopsis), apt Translation-en index",
        license="per package (the descriptions' own licenses; DFSG-free archive 'main')",
        fetch=apt_descriptions.fetch, build=apt_descriptions.build),
    hub=HubSource(dataset_id="abisee/cnn_dailymail", load=hub.load_cnn_dailymail),
    split_sizes=(500, 1000),
    metrics=summarization_metrics,
    main_metric="rouge2",
    second_metric="rougeL",
    original_model="google-t5/t5-small",
    max_new_tokens=48,
)
