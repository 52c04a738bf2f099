"""Language probe: is the language of a text linearly decodable from a layer's activations?

A multinomial logistic regression (scikit-learn ``LogisticRegression``, L2 penalty, lbfgs)
is fitted on per-token activations (residual stream, MLP neurons or CLT features of one
layer) with the language of the text as label, after standardising every column on the
training set (``StandardScaler``; for a scipy sparse matrix the columns are only scaled,
so the zeros stay zeros). It is scored on held-out tokens:

* accuracy, and balanced accuracy (mean recall over languages, so a language with more
  tokens does not carry the score);
* the confusion matrix, rows = true language, columns = predicted, in ``labels`` order;
* chance: the accuracy of always answering the most frequent language of the training
  set, i.e. that language's share of the test tokens (1 / n for balanced sets).

Tokens of one text must not sit on both sides of the split, or the probe can learn the
text rather than the language: :func:`probe_split` splits by row (text), with the same
rows held out in every language of a parallel set.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from ..languages import check_languages, language_rng

MAX_ITER = 1000


@dataclass
class ProbeResult:
    """Scores of one fitted probe (see the module docstring); ``model`` is the fitted
    scikit-learn pipeline (scaler + logistic regression)."""

    accuracy: float
    balanced_accuracy: float
    chance: float
    confusion: Any                      # pandas DataFrame, rows true, columns predicted
    labels: list
    n_train: int
    n_test: int
    converged: bool
    model: Any = field(default=None, repr=False)

    def row(self) -> dict:
        return {"accuracy": self.accuracy, "balanced_accuracy": self.balanced_accuracy,
                "chance": self.chance, "n_train": self.n_train, "n_test": self.n_test,
                "converged": self.converged}


def _as_matrix(X, name: str):
    """A 2-D float array (or scipy sparse matrix) from a tensor, array or sparse matrix."""
    try:
        import scipy.sparse as sp
    except ModuleNotFoundError:  # pragma: no cover - scikit-learn depends on scipy
        sp = None
    if sp is not None and sp.issparse(X):
        X = sp.csr_matrix(X, dtype=np.float32)
        data = X.data
    else:
        try:
            import torch

            if isinstance(X, torch.Tensor):
                X = (X.to_dense() if X.is_sparse else X).detach().cpu().float().numpy()
        except ModuleNotFoundError:  # pragma: no cover
            pass
        X = np.asarray(X)
        if X.dtype.kind not in "fiub":
            raise ValueError(f"{name} has dtype {X.dtype}; activations must be numbers")
        X = X.astype(np.float32, copy=False)
        data = X
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D [tokens, units], got shape {tuple(X.shape)}")
    if not np.isfinite(data).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return X


def _as_labels(y, name: str, n: int) -> np.ndarray:
    try:
        import torch

        if isinstance(y, torch.Tensor):
            y = y.cpu().numpy()
    except ModuleNotFoundError:  # pragma: no cover
        pass
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one label per row), got shape {y.shape}")
    if len(y) != n:
        raise ValueError(f"{name} has {len(y)} labels for {n} rows of activations")
    return y


def fit_language_probe(X_train, y_train, X_test, y_test, max_iter: int = MAX_ITER, seed: int = 0,
                       C: float = 1.0, labels: Sequence | None = None) -> ProbeResult:
    """Fit the probe on (``X_train`` [N, d], ``y_train`` [N]) and score it on the test set.

    ``labels`` fixes the order of the confusion matrix (default: the training labels,
    sorted). ``C`` is the inverse L2 strength. Non-convergence within ``max_iter`` steps is
    reported in ``converged``, not as a warning.
    """
    import pandas as pd
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter is {max_iter!r}; it must be an integer >= 1")
    if not isinstance(C, (int, float)) or isinstance(C, bool) or not C > 0:
        raise ValueError(f"C is {C!r}; the inverse regularisation strength must be positive")
    Xtr, Xte = _as_matrix(X_train, "X_train"), _as_matrix(X_test, "X_test")
    if Xtr.shape[1] != Xte.shape[1]:
        raise ValueError(f"X_train has {Xtr.shape[1]} columns and X_test {Xte.shape[1]}; they must match")
    ytr = _as_labels(y_train, "y_train", Xtr.shape[0])
    yte = _as_labels(y_test, "y_test", Xte.shape[0])
    if len(yte) == 0:
        raise ValueError("the test set is empty")
    train_labels = sorted(set(ytr.tolist()))
    if len(train_labels) < 2:
        raise ValueError(f"the training set has labels {train_labels}; a probe needs at least two")
    unseen = sorted(set(yte.tolist()) - set(train_labels))
    if unseen:
        raise ValueError(f"test labels {unseen} never occur in the training set {train_labels}")
    if labels is None:
        labels = train_labels
    else:
        labels = list(labels)
        missing = sorted(set(train_labels) - set(labels))
        if missing or len(set(labels)) != len(labels):
            raise ValueError(f"labels {labels} must list every training label {train_labels} once")

    import scipy.sparse as sp

    scaler = StandardScaler(with_mean=not sp.issparse(Xtr))
    clf = LogisticRegression(C=float(C), max_iter=max_iter, random_state=seed)
    model = make_pipeline(scaler, clf)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(Xtr, ytr)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    pred = model.predict(Xte)
    majority = Counter(ytr.tolist()).most_common(1)[0][0]
    cm = confusion_matrix(yte, pred, labels=labels)
    confusion = pd.DataFrame(cm, index=pd.Index(labels, name="true"),
                             columns=pd.Index(labels, name="predicted"))
    with warnings.catch_warnings():  # a label absent from y_test: sklearn warns, the mean skips it
        warnings.simplefilter("ignore", UserWarning)
        balanced = float(balanced_accuracy_score(yte, pred))
    return ProbeResult(accuracy=float(accuracy_score(yte, pred)), balanced_accuracy=balanced,
                       chance=float(np.mean(yte == majority)), confusion=confusion, labels=labels,
                       n_train=int(Xtr.shape[0]), n_test=int(Xte.shape[0]), converged=converged,
                       model=model)


def probe_by_layer(features_by_layer: Mapping[int, tuple], **fit_options):
    """One probe per layer: ``features_by_layer[layer] = (X_train, y_train, X_test, y_test)``.

    Returns a DataFrame with columns layer, accuracy, balanced_accuracy, chance, n_train,
    n_test, converged, sorted by layer. ``fit_options`` go to :func:`fit_language_probe`.
    """
    import pandas as pd

    if not isinstance(features_by_layer, Mapping) or not features_by_layer:
        raise ValueError("features_by_layer must map at least one layer to (X_train, y_train, X_test, y_test)")
    for layer, data in features_by_layer.items():
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or layer < 0:
            raise ValueError(f"layer key {layer!r} is not a non-negative integer")
        if not isinstance(data, (tuple, list)) or len(data) != 4:
            raise ValueError(f"layer {layer}: expected (X_train, y_train, X_test, y_test), "
                             f"got {type(data).__name__} of length {len(data) if hasattr(data, '__len__') else '?'}")
    rows = []
    for layer in sorted(features_by_layer):
        result = fit_language_probe(*features_by_layer[layer], **fit_options)
        rows.append({"layer": int(layer), **result.row()})
    return pd.DataFrame(rows)


def probe_split(acts_by_lang: Mapping[str, Any], keep_by_lang: Mapping[str, Any] | None = None,
                test_fraction: float = 0.25, seed: int = 0,
                max_tokens_per_language: int | None = None):
    """Per-token probe data from per-row activations, split by row (text).

    ``acts_by_lang[lang]``: ``[rows, positions, units]`` activations of one layer;
    ``keep_by_lang[lang]``: ``[rows, positions]`` bool, the tokens to use (e.g.
    ``activations.kept_positions``: not BOS, not padding; default all). A seeded share
    ``test_fraction`` of the row indices is held out, the same indices in every language
    (parallel rows stay on one side). ``max_tokens_per_language`` caps the tokens of each
    language on each side (a seeded sample), so every language weighs the same.
    Returns ``(X_train, y_train, X_test, y_test)`` as numpy arrays, labels = language codes.
    """
    import torch

    if not isinstance(acts_by_lang, Mapping) or not acts_by_lang:
        raise ValueError("acts_by_lang must map at least one language code to activations")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction is {test_fraction!r}; it must lie strictly between 0 and 1")
    if max_tokens_per_language is not None and (isinstance(max_tokens_per_language, bool) or
                                                not isinstance(max_tokens_per_language, int)
                                                or max_tokens_per_language < 1):
        raise ValueError(f"max_tokens_per_language is {max_tokens_per_language!r}; use None or an integer >= 1")
    check_languages(list(acts_by_lang))
    acts = {lang: torch.as_tensor(a) for lang, a in acts_by_lang.items()}
    for lang, a in acts.items():
        if a.ndim != 3:
            raise ValueError(f"activations of {lang!r} must be [rows, positions, units], got {tuple(a.shape)}")
        if keep_by_lang is not None:
            if lang not in keep_by_lang:
                raise ValueError(f"keep_by_lang has no mask for {lang!r}")
            if tuple(torch.as_tensor(keep_by_lang[lang]).shape) != tuple(a.shape[:2]):
                raise ValueError(f"keep mask of {lang!r} has shape {tuple(torch.as_tensor(keep_by_lang[lang]).shape)}, "
                                 f"activations {tuple(a.shape[:2])}")
    n_rows = max(a.shape[0] for a in acts.values())
    n_test = max(1, round(test_fraction * n_rows))
    if n_test >= n_rows:
        raise ValueError(f"{n_rows} rows cannot be split into train and test at test_fraction {test_fraction}")
    test_rows = np.zeros(n_rows, dtype=bool)
    test_rows[np.random.default_rng(seed).permutation(n_rows)[:n_test]] = True
    parts = {"train": ([], []), "test": ([], [])}
    for lang, a in acts.items():
        keep = (torch.ones(a.shape[:2], dtype=torch.bool) if keep_by_lang is None
                else torch.as_tensor(keep_by_lang[lang]).bool())
        side_of_row = torch.from_numpy(test_rows[:a.shape[0]])
        for side, on in (("train", ~side_of_row), ("test", side_of_row)):
            X = a[on][keep[on]].float().numpy()
            if max_tokens_per_language is not None and len(X) > max_tokens_per_language:
                pick = language_rng(seed, lang, int(side == "test")).choice(len(X), max_tokens_per_language,
                                                                         replace=False)
                X = X[np.sort(pick)]
            parts[side][0].append(X)
            parts[side][1].extend([lang] * len(X))
    Xtr, ytr = np.concatenate(parts["train"][0]), np.array(parts["train"][1])
    Xte, yte = np.concatenate(parts["test"][0]), np.array(parts["test"][1])
    return Xtr, ytr, Xte, yte


__all__ = ["ProbeResult", "fit_language_probe", "probe_by_layer", "probe_split"]
