"""Evaluating one checkpoint into a dict of metrics, and markdown tables of such rows."""
from .checkpoints import load_checkpoint
from .compiling import COMPILE_META_KEYS
from .data import load_data
from .forget import ForgetSpec, check_classes, make_splits
from .metrics import evaluate_model, run_now


def evaluate_checkpoint(path, data_root, device, spec=None, seed=None, data_cache=None, extra_metrics=None,
                        submit=run_now, described=None):
    """Metrics of one checkpoint as a dict with keys path, arch, dataset, method, UA, RA, TA, MIA_efficacy, RTE_s,
    peak_gpu_mem_mb (and forget, forget_names, seed, preset; compile_s, compiles, recompiles and late_compiles for a
    run trained with --compile). The data is the dataset the checkpoint's meta names;
    data_cache maps (data_root, preset, dataset) to loaded data.
    The forget setting is the checkpoint's unless spec is given;
    a checkpoint without one (the original model) is scored on the default (class 3). The MIA draws its
    samples with the seed recorded in the checkpoint unless seed is given.
    extra_metrics(model, meta, data, splits, spec, seed) -> dict adds further metrics (unlearning.representation's).
    The MIA's SVC goes through submit (see evaluate_model). described ({field: value}, e.g. {"arch": "vit"}) says
    what weights without this project's meta do not, and must agree with a meta that says it (see
    load_checkpoint)."""
    model, meta = load_checkpoint(path, device, **(described or {}))
    if seed is None:
        seed = meta.get("seed") or 0
    spec = spec or (ForgetSpec.from_dict(meta["forget"]) if meta.get("forget") else ForgetSpec())
    preset, dataset = meta["preset"], meta["dataset"]
    check_classes(spec, dataset)
    cache = {} if data_cache is None else data_cache
    if (data_root, preset, dataset) not in cache:
        cache[(data_root, preset, dataset)] = load_data(data_root, device, preset, dataset)
    data = cache[(data_root, preset, dataset)]
    splits = make_splits(data.train_labels, data.test_labels, spec)
    metrics = evaluate_model(model, data, splits, seed, submit)
    if extra_metrics is not None:
        metrics.update(extra_metrics(model, meta, data, splits, spec, seed))
    return {"path": str(path), "arch": meta["arch"], "dataset": dataset, "method": meta.get("method"), **metrics,
            "RTE_s": meta.get("rte_s"), "peak_gpu_mem_mb": meta.get("peak_gpu_mem_mb"),
            **{key: meta[key] for key in COMPILE_META_KEYS if key in meta},
            "forget": spec.tag, "forget_names": [data.class_names[c] for c in spec.classes], "seed": meta.get("seed"),
            "preset": preset}


def format_cell(value, digits=2):
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows, columns):
    """A markdown table of dict rows; columns maps key -> header."""
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_cell(row.get(key)) for key in columns) + " |" for row in rows]
    return "\n".join(lines)


EVALUATE_COLUMNS = {"method": "method", "arch": "arch", "dataset": "dataset", "forget": "forget", "UA": "UA %",
                    "RA": "RA %", "TA": "TA %", "MIA_efficacy": "MIA-efficacy %", "RTE_s": "RTE s",
                    "peak_gpu_mem_mb": "peak GPU MB", "path": "checkpoint"}


COMPILE_COLUMNS = {"compile_s": "compile s", "compiles": "compiles", "late_compiles": "late compiles"}


def with_compile_columns(columns, rows):
    """columns with, when a row was compiled (--compile), its compile seconds and counts after "RTE_s"."""
    if not any(row.get("compile_s") is not None for row in rows):
        return columns
    keys = list(columns)
    at = keys.index("RTE_s") + 1 if "RTE_s" in keys else len(keys)
    return {key: columns.get(key, COMPILE_COLUMNS.get(key)) for key in [*keys[:at], *COMPILE_COLUMNS, *keys[at:]]}
