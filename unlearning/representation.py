"""Representation-level forgetting: linear-probe UA, feature similarity (CKA) to the original, relearn time.

    python evaluate.py model_weights/resnet50_lora.pth --probe --cka --relearn

UA and MIA-efficacy read only a model's outputs; a model can stop answering a class while its features
still separate it. These metrics look underneath the classifier (see the README's "Representation-level
metrics"). evaluate.py and reproduce.py call evaluate_checkpoint() here with the flags of add_arguments().
"""
import copy
import itertools
import warnings
from concurrent.futures import Future
from pathlib import Path

import torch

from . import evaluation
from .arguments import number, open_unit_interval
from .checkpoints import checkpoint_dataset, model_from_weights, weights_path
from .data import Batches, normalize
from .datasets import DEFAULT_DATASET
from .errors import UserError
from .metrics import accuracy, predict, run_now
from .settings import EVAL_BATCH_SIZE, PAPER_RECIPE
from .training import make_adam, seed_everything, train
from .weights import read_weights

PROBE_PER_CLASS = 500      # training images per class the probe is fitted on (a seeded sample)
PROBE_CHECK_PER_CLASS = 100  # test images per retained class for Probe-TA, the check that the probe works
PROBE_MAX_ITER = 1000
CKA_SAMPLES = 1000         # forget and retain images compared with the original (each a seeded sample)
RELEARN = {"fraction": 0.01, "max_steps": 500, "eval_every": 5, "eval_samples": 1000, "tolerance": 5.0,
           "lr": PAPER_RECIPE["lr"], "batch_size": PAPER_RECIPE["batch_size"]}
COLUMNS = {"probe": {"probe_UA": "Probe-UA %"},
           "cka": {"CKA_forget": "CKA forget", "CKA_retain": "CKA retain"},
           "relearn": {"relearn_steps": "relearn steps"}}


# ------------------------------------------------------------------------------------------ features

def classifier(model):
    """The final linear layer: timm's head, torchvision's fc."""
    return model.get_classifier() if hasattr(model, "get_classifier") else model.fc


@torch.no_grad()
def penultimate_features(model, images, idx, batch_size=EVAL_BATCH_SIZE, dataset=DEFAULT_DATASET):
    """fp32 inputs of the classifier for images[idx], [len(idx), width], on the model's device.

    ResNet: after global pooling; ViT: after the final norm and pooling (timm's forward_head(pre_logits=True)).
    The width is whatever the model has, so physically pruned models work too. No autocast: full fp32."""
    model.eval()
    head = classifier(model)
    captured = []
    hook = head.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0].float()))
    try:
        for start in range(0, len(idx), batch_size):
            model(normalize(images[idx[start:start + batch_size]], dataset))
    finally:
        hook.remove()
    device = next(model.parameters()).device
    return torch.cat(captured) if captured else torch.zeros(0, head.in_features, device=device)


def seeded_sample(idx, k, seed):
    """Up to k entries of idx, drawn without replacement with seed, in increasing order."""
    if len(idx) <= k:
        return idx
    pick = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))[:k].to(idx.device)
    return idx[pick].sort().values


def per_class_sample(labels, idx, k, seed, num_classes=10):
    """Up to k entries of idx per class of num_classes, each class drawn with its own seed."""
    return torch.cat([seeded_sample(idx[labels[idx] == c], k, seed * num_classes + c)
                      for c in range(num_classes)])


# ---------------------------------------------------------------------------------------- linear probe

def fit_probe(features, labels, seed=0):
    """Logistic regression on standardised features (sklearn, lbfgs, seeded)."""
    from sklearn.exceptions import ConvergenceWarning  # imported here: only the probe and the MIA need scikit-learn
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=PROBE_MAX_ITER, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # separable features: lbfgs keeps growing the weights
        return probe.fit(features.cpu().numpy(), labels.cpu().numpy())


def probe_accuracy(probe, features, labels):
    """Percent of features the probe (or the Future of one) labels right; NaN for none."""
    if isinstance(probe, Future):
        probe = probe.result()
    if not len(labels):
        return float("nan")
    return float((probe.predict(features.cpu().numpy()) == labels.cpu().numpy()).mean() * 100)


def probe_error(probe, features, labels):
    return 100 - probe_accuracy(probe, features, labels)


def probe_ua(model, data, splits, spec, seed=0, per_class=PROBE_PER_CLASS, submit=run_now):
    """Probe-UA and Probe-TA (percent) of a frozen model's penultimate features.

    A linear probe is fitted on images it is not scored on. Class-wise forgetting: fitted on up to
    per_class training images of every class (forgotten ones included), scored on the forgotten classes'
    test images. Random-subset forgetting: fitted on up to per_class retain images per class, scored on
    (a sample of) the forget images. Probe-UA = 100 - that accuracy; Probe-TA = its accuracy on up to
    PROBE_CHECK_PER_CLASS test images of each retained class (every class for a random subset), a check
    that the probe works. The features are computed here, the fit and the scoring through submit (Futures then)."""
    train_images, train_labels = data.train_images, data.train_labels
    if spec.random_fraction is None:
        all_train = torch.arange(len(train_labels), device=train_labels.device)
        fit_idx = per_class_sample(train_labels, all_train, per_class, seed, data.num_classes)
        forgotten = torch.tensor(spec.classes, device=data.test_labels.device)
        score_images, score_labels = data.test_images, data.test_labels
        score_idx = torch.nonzero(torch.isin(data.test_labels, forgotten)).flatten()
    else:
        fit_idx = per_class_sample(train_labels, splits.retain_idx, per_class, seed, data.num_classes)
        score_images, score_labels = train_images, train_labels
        score_idx = seeded_sample(splits.forget_idx, per_class * data.num_classes, seed)
    check_idx = per_class_sample(data.test_labels, splits.test_idx, PROBE_CHECK_PER_CLASS, seed, data.num_classes)

    def features(images, idx):
        return penultimate_features(model, images, idx, dataset=data.dataset).cpu()
    fit = (features(train_images, fit_idx), train_labels[fit_idx].cpu())
    scored = (features(score_images, score_idx), score_labels[score_idx].cpu())
    check = (features(data.test_images, check_idx), data.test_labels[check_idx].cpu())
    probe = submit(fit_probe, *fit, seed)
    return {"probe_UA": submit(probe_error, probe, *scored), "probe_TA": submit(probe_accuracy, probe, *check)}


# ------------------------------------------------------------------------------------------------- CKA

def linear_cka(x, y):
    """Linear CKA (Kornblith et al. 2019) of two feature matrices [n, d1], [n, d2] of the same n samples.

    ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with column-centred Xc, Yc, in float64; computed through
    the n x n Gram matrices when n is the smaller side. NaN when either side has constant features."""
    x, y = x.double(), y.double()
    x, y = x - x.mean(0), y - y.mean(0)
    if len(x) < max(x.shape[1], y.shape[1]):
        gram_x, gram_y = x @ x.T, y @ y.T
        cross, norm_x, norm_y = (gram_x * gram_y).sum(), gram_x.norm(), gram_y.norm()
    else:
        cross, norm_x, norm_y = (y.T @ x).square().sum(), (x.T @ x).norm(), (y.T @ y).norm()
    denominator = norm_x * norm_y
    return (cross / denominator).item() if denominator > 0 else float("nan")


def feature_similarity(model, original, data, splits, seed=0, samples=CKA_SAMPLES):
    """Linear CKA between model's and original's penultimate features on seeded samples of the forget
    and retain sets (training images): {"CKA_forget", "CKA_retain"}."""
    similarity = {}
    for name, idx in (("forget", splits.forget_idx), ("retain", splits.retain_idx)):
        sample = seeded_sample(idx, samples, seed)
        similarity[f"CKA_{name}"] = linear_cka(
            *(penultimate_features(net, data.train_images, sample, dataset=data.dataset) for net in (model, original)))
    return similarity


# --------------------------------------------------------------------------------------- relearn time

def forget_accuracy(model, data, idx):
    return accuracy(predict(model, data.train_images, idx, dataset=data.dataset), data.train_labels[idx])


def relearn_time(model, original, data, splits, seed=0, fraction=RELEARN["fraction"],
                 max_steps=RELEARN["max_steps"], eval_every=RELEARN["eval_every"]):
    """Steps of fine-tuning until forget accuracy is back within RELEARN["tolerance"] points of the original's.

    A copy of model is trained on all its weights (Adam, the paper's lr, cross-entropy) on a seeded sample of
    `fraction` of the forget set mixed with equally many retain images, batch 128 or the whole sample if
    smaller. Forget accuracy is measured on a seeded sample of the forget images NOT in that sample, for the
    copy every eval_every steps and once for the original, so steps are rounded up to eval_every.
    {"relearn_steps": steps or None if max_steps passed first, "relearn_reached": bool, ...}."""
    forget = splits.forget_idx
    order = torch.randperm(len(forget), generator=torch.Generator().manual_seed(seed)).to(forget.device)
    relearn_count = max(1, round(fraction * len(forget)))
    held_out = seeded_sample(forget[order[relearn_count:]].sort().values, RELEARN["eval_samples"], seed)
    result = {"relearn_images": 2 * relearn_count, "relearn_max_steps": max_steps}
    if not len(held_out):
        return {**result, "relearn_steps": None, "relearn_reached": None,
                "relearn_note": "no forget image left to measure after taking the relearn sample"}
    sample = torch.cat([forget[order[:relearn_count]], seeded_sample(splits.retain_idx, relearn_count, seed)])
    target = forget_accuracy(original, data, held_out) - RELEARN["tolerance"]
    seed_everything(seed)
    model = copy.deepcopy(model).requires_grad_(True)
    batches = Batches(data.train_images, data.train_labels, sample, min(RELEARN["batch_size"], len(sample)),
                      seed=seed, dataset=data.dataset)
    stream = itertools.chain.from_iterable(itertools.repeat(batches))  # each pass over the sample reshuffles
    optimizer = make_adam(model.parameters(), RELEARN["lr"])
    steps, relearned = 0, forget_accuracy(model, data, held_out)
    while relearned < target and steps < max_steps:
        chunk = min(eval_every, max_steps - steps)
        train(model, list(itertools.islice(stream, chunk)), 1, optimizer=optimizer,
              desc=f"relearn step {steps}")
        steps += chunk
        relearned = forget_accuracy(model, data, held_out)
    reached = relearned >= target
    return {**result, "relearn_steps": steps if reached else None, "relearn_reached": reached,
            "relearn_target": target}


# ----------------------------------------------------------------------------------- original model

def find_original(path, meta, originals=(), cache=None, device="cpu"):
    """(model or None, {"original_weights": str or None, "original_from": how it was found}).

    In order: an --original checkpoint of the same arch, preset and dataset; the checkpoint meta's source_weights
    (method checkpoints); the checkpoint itself when it is an original model; the default
    model_weights/{arch}_original.pth. None (with a note) when none of these exists."""
    arch, preset, dataset = meta["arch"], meta.get("preset", "full"), checkpoint_dataset(meta)
    cache = {} if cache is None else cache

    def load(candidate):
        """(model, meta), or None for a checkpoint of another arch, preset or dataset; weights without this
        project's meta are taken to be of the evaluated model's arch, preset and dataset."""
        key = ("original model", str(candidate), str(device))
        if key not in cache:
            state, original_meta = read_weights(candidate)
            if original_meta is not None and (original_meta["arch"], original_meta.get("preset", "full"),
                                              checkpoint_dataset(original_meta)) != (arch, preset, dataset):
                cache[key] = None
            else:
                model, original_meta = model_from_weights(candidate, state, original_meta, device, arch=arch,
                                                          preset=preset, dataset=dataset)
                cache[key] = model, original_meta
        return cache[key]

    candidates = [(Path(p), "--original") for p in originals]
    if meta.get("source_weights"):
        candidates.append((Path(meta["source_weights"]), "checkpoint meta source_weights"))
    if meta.get("method") == "original":
        candidates.append((Path(path), "the checkpoint itself"))
    candidates.append((weights_path(arch, "original", preset, dataset=dataset), "default path"))
    for candidate, how in candidates:
        if candidate.is_file() and load(candidate) is not None:
            return load(candidate)[0], {"original_weights": str(candidate), "original_from": how}
    return None, {"original_weights": None, "original_from": f"not found: pass --original PATH (a {arch} "
                                                             f"{preset}-preset original model of {dataset})"}


# ----------------------------------------------------------------------------------------- evaluation

def representation_metrics(model, original, data, splits, spec, seed=0, probe=False, cka=False, relearn=False,
                           relearn_fraction=RELEARN["fraction"], relearn_max_steps=RELEARN["max_steps"],
                           submit=run_now):
    """The asked-for metrics of model as a dict; CKA and relearn are None when original is None. The probe's fit
    goes through submit."""
    metrics = {}
    if probe:
        metrics.update(probe_ua(model, data, splits, spec, seed, submit=submit))
    if cka:
        metrics.update(feature_similarity(model, original, data, splits, seed) if original is not None
                       else {"CKA_forget": None, "CKA_retain": None})
    if relearn:
        metrics.update(relearn_time(model, original, data, splits, seed, relearn_fraction, relearn_max_steps)
                       if original is not None else {"relearn_steps": None, "relearn_reached": None})
    return metrics


def evaluate_checkpoint(path, data_root, device, spec=None, seed=None, data_cache=None, probe=False, cka=False,
                        relearn=False, originals=(), relearn_fraction=RELEARN["fraction"],
                        relearn_max_steps=RELEARN["max_steps"], submit=run_now, described=None):
    """evaluate_checkpoint's row plus the asked-for representation metrics (and, for CKA and relearn,
    original_weights / original_from: where the original model came from). data_cache also keeps the
    loaded original models between calls. The MIA's and the probe's fits go through submit: with an executor's,
    the row holds Futures for them (common.resolved waits for them)."""
    cache = {} if data_cache is None else data_cache

    def extra_metrics(model, meta, data, splits, spec, seed):
        original, source = None, {}
        if cka or relearn:
            original, source = find_original(path, meta, originals, cache, device)
        return {**representation_metrics(model, original, data, splits, spec, seed, probe, cka, relearn,
                                          relearn_fraction, relearn_max_steps, submit), **source}

    return evaluation.evaluate_checkpoint(path, data_root, device, spec, seed, cache, extra_metrics=extra_metrics,
                                          submit=submit, described=described)


def columns(probe=False, cka=False, relearn=False):
    """Table columns (key -> header) of the asked-for metrics."""
    asked = {"probe": probe, "cka": cka, "relearn": relearn}
    return {key: header for name, table in COLUMNS.items() if asked[name] for key, header in table.items()}


def for_table(row):
    """row with a relearn run that hit the cap shown as "> cap" steps."""
    if row.get("relearn_reached") is False:
        return {**row, "relearn_steps": f"> {row['relearn_max_steps']}"}
    return row


# --------------------------------------------------------------------------------------- command line

def add_arguments(parser):
    """--probe, --cka, --relearn and their settings (evaluate.py, reproduce.py)."""
    parser.add_argument("--probe", action="store_true",
                        help="Probe-UA: 100 - accuracy of a linear probe on the penultimate features, on the "
                             "forgotten classes' test images (the forget images for a random subset)")
    parser.add_argument("--cka", action="store_true",
                        help="linear CKA of the penultimate features with the original model's, on forget and "
                             "retain images")
    parser.add_argument("--relearn", action="store_true",
                        help="relearn time: fine-tuning steps on a small forget sample until forget accuracy is "
                             "within 5 points of the original's")
    parser.add_argument("--original", action="append", default=[], metavar="PATH",
                        help="original model for --cka/--relearn; repeat once per arch (default: the checkpoint's "
                             "source weights, else model_weights/{arch}_original.pth)")
    parser.add_argument("--relearn-fraction", type=open_unit_interval, default=RELEARN["fraction"],
                        metavar="F", help=f"share of the forget set relearned from (default: {RELEARN['fraction']})")
    parser.add_argument("--relearn-max-steps", type=number(int, 1, 10**6), default=RELEARN["max_steps"],
                        metavar="N", help=f"give up relearning after N steps (default: {RELEARN['max_steps']})")


def options_from_args(args):
    """evaluate_checkpoint's keyword arguments from add_arguments' flags; refuses a missing --original."""
    for path in args.original:
        if not Path(path).is_file():
            raise UserError(f"--original {path}: no checkpoint there")
    return {"probe": args.probe, "cka": args.cka, "relearn": args.relearn, "originals": tuple(args.original),
            "relearn_fraction": args.relearn_fraction, "relearn_max_steps": args.relearn_max_steps}
