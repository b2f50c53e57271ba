"""Checking a reference on the driver before any work, without building the model.

The reference's family comes from the registry (families.py: `find`, which the loaders use too), and
that family's check runs: the configuration file is a JSON object of the right family, the tokenizer and
image preprocessing load from the folder (they are small: ~0.2 s); then every weights file it names passes
`weights_problem` (a safetensors header that parses and fills the file exactly; a PyTorch file that is a
state dict loaded with weights_only). A broken folder is one line naming the file, not task retries in
every worker."""

from __future__ import annotations

from .families import find, roles
from .folders import json_object  # noqa: F401  (lab reads its model cards with it, from here)
from .refs import Reference, parse_reference
from .safety import _refuse_pickles, weights_problem


def check_reference(ref: str, role: str) -> None:
    """Check on the driver, before any data is touched, that `ref` can be loaded as `role` ('clip',
    'captioner' or 'itm') without building the model: it parses, its files exist (or are cached, or the hub may
    be asked), it is of a family that can play the role, its configuration, tokenizer and preprocessing
    load, and every weights file is whole and needs no code to unpickle.
    Raises what the workers' loader would raise hours later: ModelNotAvailable, UnsafeCheckpoint or
    ValueError, each with one line."""
    if role not in roles():
        raise ValueError(f"unknown model role {role!r}")
    parsed = parse_reference(ref)
    family, folder = find(parsed, role)
    for weights in ([] if family is None else family.check(parsed, folder)):
        check_weights(parsed, weights)


def check_weights(ref: Reference, path) -> None:
    """One weights file of `ref`: whole, and loadable without running code (else one line naming it)."""
    problem = _refuse_pickles(ref, lambda: weights_problem(path))
    if problem:
        raise ValueError(f"model {ref.text!r}: {path} {problem}")
