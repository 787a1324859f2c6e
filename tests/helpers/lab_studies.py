"""A small TOML study on the digits, shared by the lab CLI and kill tests."""

from __future__ import annotations


def study_toml(name: str, *, seeds: int, train_size: int, epochs: int) -> str:
    """A small study of two dropout rates on the digits (the kill test uses it too)."""
    return f"""
[study]
name = "{name}"
description = "two dropout rates on the digits"
seeds = {seeds}

[base]
data.dataset = "digits"
data.train_size = {train_size}
data.test_size = 60
model.widths = [8]
model.padding = "same"
model.head_hidden = [16]
train.epochs = {epochs}

[axes]
"dropout.rate" = [0.1, 0.4]
"""
