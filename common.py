"""The scripts' shared module: every name a method script, pretrain.py, retrain.py or evaluate.py uses.

    import common
    common.run_method("loraprune", unlearn, __doc__)

Here a script finds the dataset table (`DATASETS`), data loading (`load_data`, `Batches`), forget-class
filtering (`make_splits`, `ForgetSpec`), structured L2 pruning (`prune`, `prune_physically`), LoRA (`add_lora`),
the training loop (`train`), the method runner (`run_method`, `run_from_scratch`, `Context`), checkpoints
(`save_checkpoint`, `load_checkpoint`, `weights_path`), weights from anywhere (`read_weights`, `described_by`), the
metrics (`evaluate_model`, `mia_efficacy`), the argument helpers and tracking (`add_tracking_arguments`, `open_run`:
TensorBoard and W&B under --track).
The code lives in the package `unlearning/`, one idea per module; this file only hands its names on. The sweep,
its launchers, the cost model and the representation-level metrics are imported from the package where used
(`from unlearning import sweep`), so that a script pays for none of them.
"""
from unlearning.adapters import LoraSettings, add_lora, finalize, import_peft, lora_settings
from unlearning.arguments import (
    OneLineParser,
    add_batchnorm_argument,
    add_common_arguments,
    add_compile_argument,
    add_dataset_arguments,
    add_described_arguments,
    add_device_argument,
    add_forget_arguments,
    add_lora_arguments,
    add_method_arguments,
    add_pretrain_option_arguments,
    add_prune_arguments,
    add_seed_argument,
    add_weights_argument,
    check_out_path,
    make_parser,
    nonnegative_float,
    nonnegative_int,
    number,
    open_unit_interval,
    positive_float,
    positive_int,
    seed_int,
    torch_device,
    unit_interval_open_above,
    unit_interval_open_below,
    with_overrides,
)
from unlearning.baselines import (
    L1_ALPHA,
    SALIENCY_SHARE,
    SCRUB_DISTILLATION,
    RandomLabelBatches,
    add_l1_gradient,
    away_from_teacher,
    close_to_teacher,
    distill_kl,
    l1_norm,
    masked_gradient,
    negated_cross_entropy,
    random_other_labels,
    saliency_mask,
)
from unlearning.checkpoints import (
    NAMED_OR_NEUTRAL_FLAGS,
    checkpoint_dataset,
    device_name,
    library_versions,
    load_checkpoint,
    model_for,
    model_from_weights,
    name_settings,
    save_checkpoint,
    setting_text,
    state_mismatch,
    weights_path,
)
from unlearning.compiling import COMPILE_BACKEND, COMPILE_META_KEYS, compile_counts, compiling
from unlearning.data import (
    DIFFERENT_DATA_LABEL,
    PROVENANCE_FILE,
    Batches,
    Data,
    augment,
    data_key,
    data_label,
    different_data_label,
    load_data,
    normalize,
    shared_data,
)
from unlearning.datasets import DATASET_NAMES, DATASETS, DEFAULT_DATASET, Dataset
from unlearning.errors import DamagedFile, ParentGone, Terminated, TrainingDiverged, UserError, raise_terminated
from unlearning.evaluation import (
    EVALUATE_COLUMNS,
    evaluate_checkpoint,
    format_cell,
    markdown_table,
    with_compile_columns,
)
from unlearning.files import (
    atomic_write,
    check_writable,
    save_figure,
    write_bytes,
    write_error,
    write_json,
    write_text,
    written,
)
from unlearning.forget import ForgetSpec, Splits, check_classes, check_splits, forget_spec_from_args, make_splits
from unlearning.measure import (
    AccuracyCurve,
    Measure,
    batch_sizes,
    before_timing,
    default_eval_every,
    reset_compiler_caches,
    warm_up,
    warm_up_on,
)
from unlearning.metrics import METRIC_KEYS, accuracy, evaluate_model, mia_efficacy, predict, resolved, run_now
from unlearning.models import (
    ARCHITECTURES,
    ARCHS,
    LORA_DEFAULTS,
    PAPER_ARCHS,
    PRETRAIN_DATASET_CHANGES,
    PRETRAIN_RECIPES,
    VGG,
    Architecture,
    SlimResNet,
    architecture,
    build_model,
    count_parameters,
    input_size,
    is_channels_last,
    keep_layout,
    pretrain_recipe,
    to_device,
)
from unlearning.processes import check_parent_alive, start_child
from unlearning.pruning import (
    batchnorm_after,
    import_torch_pruning,
    make_masks_permanent,
    model_cost,
    output_mask,
    prune,
    prune_physically,
    prune_targets,
    pruned_layers,
    resize_to_state,
)
from unlearning.scripts import (
    Context,
    cli,
    nested_cli,
    report_saved,
    run_from_scratch,
    run_meta,
    run_method,
    train_on_retain,
    unlearn_and_save,
)
from unlearning.settings import (
    BASELINE_SGD,
    BATCHNORM_MODES,
    DEFAULT_FORGET_CLASS,
    DIVERGENCE_CHECK_STEPS,
    EVAL_BATCH_SIZE,
    GPU_SHAPED_ENV,
    MIA_MAX_SAMPLES,
    PAPER_RECIPE,
    PRESETS,
    PRETRAIN_OPTIONS,
    PRUNE_AMOUNT,
    PRUNE_MODES,
    RESULTS_DIR,
    SMOKE,
    WEIGHTS_DIR,
    gpu_shaped,
    gpu_shaped_mode,
    preset_recipe,
)
from unlearning.tracking import activate, add_tracking_arguments, check_tracking, open_run
from unlearning.training import (
    autocast,
    beta_sample,
    cross_entropy,
    deterministic_mode,
    make_adam,
    make_sgd,
    mix_batch,
    seed_everything,
    train,
    train_from_scratch,
)
from unlearning.weights import (
    DESCRIBED_FIELDS,
    SAFETENSORS_SUFFIX,
    DescribedField,
    described_by,
    read_weights,
    resolve_meta,
)
