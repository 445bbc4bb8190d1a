"""The library behind the scripts: one idea per module. Scripts reach it through `common.py`; nothing here imports
that file or a script. From the ground up (a module imports only those above it):

    settings, errors             constants and recipes; one-line errors
    benchmarks                   published benchmarks: arch, forget setting, recipes, published values' file
    processes, files             children that die with their parent; atomic output files
    datasets                     the dataset table: files, readers, classes, normalisation, checksums
    data, forget, models         the data on the device; forget/retain splits; the arch table
    pruning, adapters            structured L2 pruning; LoRA through peft
    compiling                    --compile: the training step through torch.compile, compile seconds and counts
    training, baselines          the one training loop; the baselines' losses and saliency
    metrics, measure             UA/RA/TA/MIA; warm-up, RTE, peak memory, accuracy curves
    weights                      weights from any file (wrappers, prefixes, .safetensors); fields flags describe
    checkpoints, evaluation      saving, loading, naming; one checkpoint's metrics and tables
    arguments, scripts           flag helpers; the command-line runner, run_method, run_from_scratch
    representation               Probe-UA, CKA and relearn time
    costs, kernels               counted costs of a training step and an evaluation; a compiled step's kernels
    units, records, locks        the sweep's units and runs; run records, fingerprints and schema; unit locks
    runners, sweep, launch       running a step; the sweep behind reproduce.py; its parallel launchers
    comparison                   a published table set beside ours: differences, markdown, JSON, plot

The package imports nothing on its own, so `from unlearning import launch` stays light (SLURM jobs start fast).
"""
