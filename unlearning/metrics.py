"""UA, RA, TA and MIA-efficacy of a model on the forget, retain and test sets."""
from concurrent.futures import Future

import numpy as np
import torch

from .data import normalize
from .datasets import DATASETS, DEFAULT_DATASET
from .settings import EVAL_BATCH_SIZE, MIA_MAX_SAMPLES


@torch.no_grad()
def predict(model, images, idx, batch_size=EVAL_BATCH_SIZE, dataset=DEFAULT_DATASET):
    """Softmax probabilities of model on images[idx] of the dataset, float32 [len(idx), classes].

    Runs in fp32, without the training loop's bf16 autocast, as the methods' official evaluations do: every
    metric (arg-max, the MIA's confidences) comes from fp32 logits."""
    model.eval()
    device = next(model.parameters()).device
    probs = []
    for start in range(0, len(idx), batch_size):
        logits = model(normalize(images[idx[start:start + batch_size]], dataset))
        probs.append(logits.float().softmax(1))
    return torch.cat(probs) if probs else torch.zeros(0, DATASETS[dataset].num_classes, device=device)


def accuracy(probs, labels):
    """Percent of rows whose arg-max is the label (NaN for no rows)."""
    return (probs.argmax(1) == labels).float().mean().item() * 100 if len(labels) else float("nan")


def mia_efficacy(retain_conf, test_conf, forget_conf, seed=0, max_samples=MIA_MAX_SAMPLES):
    """Unlearn-Sparse's SVC MIA on true-label confidence: percent of forget samples called non-members.

    An RBF SVC (C=3, gamma='auto', as in Unlearn-Sparse) is fitted on equally many retain samples
    (members) and test samples (non-members), at most max_samples of each, drawn with the seed."""
    from sklearn.svm import SVC  # imported here: only the MIA needs scikit-learn

    rng = np.random.default_rng(seed)
    n = min(len(retain_conf), len(test_conf), max_samples)
    members = rng.choice(retain_conf, n, replace=False)
    non_members = rng.choice(test_conf, n, replace=False)
    features = np.concatenate([members, non_members])[:, None]
    is_member = np.concatenate([np.ones(n), np.zeros(n)])
    classifier = SVC(C=3, gamma="auto", kernel="rbf").fit(features, is_member)
    return float((classifier.predict(np.asarray(forget_conf)[:, None]) == 0).mean() * 100)


def run_now(function, *args):
    """function(*args), here and now: the default `submit` of the evaluation functions. An executor's submit
    instead runs their CPU-side parts (the MIA's SVC, the probe's fit) elsewhere, and they return Futures."""
    return function(*args)


def resolved(metrics):
    """metrics with every Future replaced by its result (waiting for it), in the same key order."""
    return {key: value.result() if isinstance(value, Future) else value for key, value in metrics.items()}


def evaluate_model(model, data, splits, seed=0, submit=run_now):
    """UA, RA, TA and MIA-efficacy (percent) of model on the splits; the forward passes run here, the MIA through
    submit (MIA_efficacy is then a Future, see resolved)."""
    all_train = torch.arange(len(data.train_labels), device=data.train_labels.device)
    train_probs = predict(model, data.train_images, all_train, dataset=data.dataset)
    test_probs = predict(model, data.test_images, splits.test_idx, dataset=data.dataset)
    train_conf = train_probs.gather(1, data.train_labels[:, None]).flatten()
    test_conf = test_probs.gather(1, data.test_labels[splits.test_idx][:, None]).flatten()
    forget, retain = splits.forget_idx, splits.retain_idx
    return {
        "UA": 100 - accuracy(train_probs[forget], data.train_labels[forget]),
        "RA": accuracy(train_probs[retain], data.train_labels[retain]),
        "TA": accuracy(test_probs, data.test_labels[splits.test_idx]),
        "MIA_efficacy": submit(mia_efficacy, train_conf[retain].cpu().numpy(), test_conf.cpu().numpy(),
                               train_conf[forget].cpu().numpy(), seed),
    }


METRIC_KEYS = ("UA", "RA", "TA", "MIA_efficacy")
