"""The commands of `kubectl finetune`, one module per command group.

Each `cmd_*` function takes an `App` (options, console, cluster, registry) and prints through it;
`parser` maps each command line to one of them. They read through `kube` / `storage`, decide with
the pure modules (`catalog`, `datasets`, `experiments`, `reading`) and show `views` tables.
"""
