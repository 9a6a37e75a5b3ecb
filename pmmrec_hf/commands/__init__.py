"""The installed commands of the workflow, each a module with ``main(argv=None)`` (returns what it computed) and
``cli(argv=None)`` (the console script: returns an exit status, prints errors without a traceback):

| command | module | example script |
|---|---|---|
| ``pmmrec-prepare`` | ``pmmrec_hf.data.cli`` | |
| ``pmmrec-train`` | ``pmmrec_hf.commands.train`` | ``examples/pretrain.py`` |
| ``pmmrec-finetune`` | ``pmmrec_hf.commands.finetune`` | ``examples/finetune.py`` |
| ``pmmrec-evaluate`` | ``pmmrec_hf.commands.evaluate`` | ``examples/evaluate.py`` |
| ``pmmrec-push`` | ``pmmrec_hf.commands.push`` | ``examples/push_to_hub.py`` |

Every one runs under a launcher too (``accelerate launch -m pmmrec_hf.commands.train ...``). Shared pieces:
``arguments`` (argument groups, data / model / collator building), ``run_config`` (``--config`` files),
``environment`` (torch threads, Hub reachability).
"""
