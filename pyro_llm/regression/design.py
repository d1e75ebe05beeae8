"""From a DataFrame and a formula to the arrays the estimators need.

The coded variable (``label``) is a column of the DataFrame whose missing values mark the
unlabelled rows. Its design columns depend on its value, so the right-hand side is built once
per class (``X_by_class[k]`` is the design with every row's label set to class k); the
estimators pick the row's class from the gold value or an imputation. Formulas are parsed
with formulaic, so ``C(region)``, interactions with the coded variable and transforms work.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from formulaic import Formula, model_matrix

__all__ = ["Design", "ROLES", "build_design", "plain_value"]

ROLES = ("covariate", "outcome")


@dataclass(frozen=True)
class Design:
    role: str
    label: str
    classes: tuple
    coef_names: tuple[str, ...]
    labelled: np.ndarray          # (N,) bool
    z: np.ndarray                 # (N,) int class index, -1 where unlabelled
    X_by_class: np.ndarray        # (K, N, p); identical slices in the outcome role
    y: np.ndarray | None          # (N,) response in the covariate role, None in the outcome role
    class_values: np.ndarray      # (K,) numeric value of each class as an outcome
    F: np.ndarray                 # (N, f) completion features: intercept, standardised Q (and Y)
    feature_names: tuple[str, ...]
    kind: str = "categorical"     # or "continuous": z holds values (NaN where unlabelled)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def X(self, z: np.ndarray) -> np.ndarray:
        """The design with row i's coded variable set to ``z[i]`` (``z`` (..., N): class indices, or
        values of a continuous variable, whose design is affine in it)."""
        if self.kind == "continuous":
            X0, X1 = self.X_by_class
            return X0 + z[..., None] * (X1 - X0)
        rows = np.arange(self.X_by_class.shape[1])
        return self.X_by_class[z, rows]

    @property
    def z_filled(self) -> np.ndarray:
        """The gold value where labelled, class 0 (or 0.0) elsewhere: a valid index everywhere."""
        return np.where(self.labelled, self.z, 0)

    def gold(self) -> tuple[np.ndarray, np.ndarray]:
        """The labelled rows' design and response with their gold values."""
        z = self.z_filled
        return self.X(z)[self.labelled], self.response(z)[self.labelled]

    def response(self, z: np.ndarray) -> np.ndarray:
        if self.role == "covariate":
            return np.broadcast_to(self.y, z.shape)
        return z.astype(float) if self.kind == "continuous" else self.class_values[z]


def _classes(values: pd.Series, label: str, classes) -> tuple:
    seen = list(pd.unique(values))
    if classes is None:
        try:
            classes = sorted(seen)
        except TypeError:
            classes = seen
    classes = tuple(plain_value(c) for c in classes)
    unknown = [v for v in seen if plain_value(v) not in classes]
    if unknown:
        raise ValueError(f"label column {label!r} has values {unknown[:5]} that are not among "
                         f"classes={list(classes)}; fix the data or pass classes=[...] listing every class")
    if len(classes) < 2:
        raise ValueError(f"label column {label!r} has a single class {list(classes)} among the "
                         "labelled rows; the labelled subset must contain every class")
    return classes


def plain_value(value):
    """numpy scalars to Python ones; integral floats (a 0/1 column with NaN) to int."""
    value = value.item() if isinstance(value, np.generic) else value
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _object_label(col: pd.Series, labelled: np.ndarray, label: str) -> pd.Series:
    """An object column of True/False (or of numbers) read as the boolean (numeric) column it
    stands for, with a warning; other object columns (strings, mixed) are left as categories."""
    values = col[labelled]
    if all(isinstance(v, (bool, np.bool_)) for v in values):
        held, read, fix = "True/False", "a boolean column (classes False, True)", "astype('boolean')"
        out = col.where(labelled, None).astype("boolean")
    elif all(isinstance(v, (int, float, np.number)) and not isinstance(v, (bool, np.bool_))
             for v in values):
        held, read, fix = "numbers", "a numeric column", "astype(float)"
        out = pd.to_numeric(col.where(labelled, np.nan))
    else:
        return col
    warnings.warn(f"label column {label!r} has dtype object holding {held}; it was read as {read}. "
                  f"Convert it first (df[{label!r}].{fix}) to silence this warning", UserWarning,
                  stacklevel=4)
    return out


def _standardise(cols: np.ndarray) -> np.ndarray:
    sd = cols.std(0)
    return (cols - cols.mean(0)) / np.where(sd > 0, sd, 1.0)


def _kind(values: pd.Series, label: str, kind: str, classes) -> str:
    if kind not in ("auto", "categorical", "continuous"):
        raise ValueError(f"kind must be 'auto', 'categorical' or 'continuous', got {kind!r}")
    numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
    if kind == "continuous" and not numeric:
        raise ValueError(f"kind='continuous' needs a numeric label column; {label!r} is {values.dtype}")
    if kind == "auto":
        kind = "continuous" if numeric and classes is None and values.nunique() > 10 else "categorical"
    return kind


def build_design(df: pd.DataFrame, formula: str, *, label: str, role: str = "covariate",
                 classes=None, text: str | None = None, kind: str = "auto") -> Design:
    """Parse ``formula`` on ``df`` for an LLM-coded ``label`` used as a covariate or as the outcome.

    ``kind="auto"`` treats a numeric label with more than 10 distinct labelled values as
    continuous, anything else as categorical (``classes`` lists and orders the categories)."""
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"df must be a pandas DataFrame, got {type(df).__name__}")
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    parsed = Formula(formula)
    if not hasattr(parsed, "lhs"):
        raise ValueError(f"formula {formula!r} has no left-hand side; write it as 'y ~ x1 + x2'")
    needed = sorted(parsed.required_variables) + ([text] if text else [])
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(f"formula {formula!r} names columns {missing} that are not in the DataFrame "
                         f"(columns: {list(df.columns)[:20]})")
    if label not in df.columns:
        raise ValueError(f"label column {label!r} is not in the DataFrame")
    lhs_vars, rhs_vars = parsed.lhs.required_variables, parsed.rhs.required_variables
    if role == "covariate" and label not in rhs_vars:
        raise ValueError(f"role='covariate' but {label!r} is not on the right-hand side of {formula!r}")
    if role == "outcome" and lhs_vars != {label}:
        raise ValueError(f"role='outcome' needs {label!r} alone on the left-hand side of {formula!r}")
    others = sorted((lhs_vars | rhs_vars) - {label})
    bad = [c for c in others if df[c].isna().any()]
    if bad:
        counts = {c: int(df[c].isna().sum()) for c in bad}
        raise ValueError(f"missing values in columns {counts}; only the label column may be missing "
                         "(it marks the unlabelled rows) - drop or impute those rows first")
    if text is not None:
        empty = df[text].isna() | (df[text].astype(str).str.strip() == "")
        if empty.any():
            raise ValueError(f"text column {text!r} has {int(empty.sum())} empty or missing entries "
                             f"(first at row {int(np.flatnonzero(empty.to_numpy())[0])}); drop those rows")
    labelled = df[label].notna().to_numpy()
    if df[label].dtype == object and labelled.any():
        df = df.assign(**{label: _object_label(df[label], labelled, label)})
    if not labelled.any():
        raise ValueError(f"label column {label!r} has no labelled rows; label a random subset of the "
                         "corpus with the gold value and leave the rest missing")
    if labelled.all():
        raise ValueError(f"every row of {label!r} is labelled; there is nothing for the LLM to code - "
                         "fit an ordinary regression instead")
    kind = _kind(df.loc[labelled, label], label, kind, classes)
    if kind == "continuous":
        classes, z = (), df[label].to_numpy(dtype=float)
        levels = (0.0, 1.0)
    else:
        classes = _classes(df.loc[labelled, label], label, classes)
        z = np.full(len(df), -1)
        z[labelled] = [classes.index(plain_value(v)) for v in df.loc[labelled, label]]
        levels = classes

    filled = df.copy()
    filled[label] = df[label].where(labelled, levels[0])
    if role == "covariate":
        mm = model_matrix(formula, filled)
        spec, y = mm.rhs.model_spec, mm.lhs.to_numpy(dtype=float).reshape(-1)

        def at(value):  # an object column stays one, so that formulaic encodes it as it did above
            column = pd.Series([value] * len(df), index=filled.index,
                               dtype=object if filled[label].dtype == object else None)
            return spec.get_model_matrix(filled.assign(**{label: column})).to_numpy(dtype=float)

        X_by_class = np.stack([at(c) for c in levels])
        affine = X_by_class[0] + 2 * (X_by_class[1] - X_by_class[0])
        if kind == "continuous" and not np.allclose(at(2.0), affine):
            raise ValueError(f"the formula {formula!r} is not linear in the continuous {label!r} (e.g. "
                             f"I({label}**2) or C({label})); only terms linear in it are supported")
        names = tuple(mm.rhs.columns)
        varies = (X_by_class != X_by_class[:1]).any(axis=(0, 1))
        Q = X_by_class[0][:, ~varies]
        F_raw = np.column_stack([Q, y])
        f_names = [n for n, v in zip(names, varies, strict=True) if not v] + ["<y>"]
        class_values = np.arange(len(classes), dtype=float)
    else:
        rhs = model_matrix(str(parsed.rhs), filled)
        X = rhs.to_numpy(dtype=float)
        X_by_class = np.broadcast_to(X, (len(levels),) + X.shape)
        names, y = tuple(rhs.columns), None
        F_raw, f_names = X, list(names)
        numeric = all(isinstance(c, (int, float, np.number)) for c in classes)
        if kind == "categorical" and len(classes) != 2 and not numeric:
            raise ValueError(f"role='outcome' with {len(classes)} non-numeric classes has no numeric "
                             "outcome to regress; use a binary or numeric label")
        class_values = (np.array(classes, dtype=float)
                        if all(isinstance(c, (int, float, np.number, bool)) for c in classes)
                        else np.arange(len(classes), dtype=float))
    keep = F_raw.std(0) > 0
    F = np.column_stack([np.ones(len(df)), _standardise(F_raw[:, keep])])
    f_names = ("<intercept>",) + tuple(n for n, k in zip(f_names, keep, strict=True) if k)
    return Design(role, label, classes, names, labelled, z, X_by_class, y, class_values, F, f_names, kind)
