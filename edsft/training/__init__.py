"""Supervised finetuning without Ray: data (chat template, response-only loss), batch plan and
lr schedule, DeepSpeed/DDP engines with LoRA, the resumable loop, and evaluation metrics.

Modules: ``data``, ``schedule``, ``engine``, ``loop`` (``train_loop``), ``metrics``,
``evaluation`` (``Evaluator``, ``build_metrics``). Ray Train and Ray Data wrappers live in
``edsft.distributed.train`` and ``edsft.distributed.evaluate``.
"""
