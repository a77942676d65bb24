"""The offload tier (issue 14, docs/offload.md): optimizer state on host memory or NVMe under a
memory budget, each unit's optimizer step run while backward continues.

Modules: ``config`` (the ``offload`` section, torch-free), ``aio`` (aligned O_DIRECT I/O),
``store`` (where each unit's state rests and how it is brought in), ``pipeline`` (the per-unit
steps on worker threads), ``plugin`` (the ``offload`` step strategy), ``placement`` (the cost
model choosing resident / host / nvme).
"""
