"""The pipeline: a command is a list of steps, each `(model, report) -> (model, report)`.

    load → rewrite (factor | binarize) → [refit on calibration data] → [finetune by distillation] → [train hook]
         → lower (+ fold) | emulate → check → gate → save

Steps never print: they append to the one Report. `commands.build(command, source, options)` makes the step
list of a command from its typed options; `run` runs it. Sweeps and recipes are lists of such pipelines.
"""
