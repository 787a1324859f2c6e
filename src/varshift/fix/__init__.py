"""Remedies for the variance shift: re-estimate BatchNorm statistics with dropout off
(:func:`recalibrate_bn`) and swap dropout for variance-stable noise (:func:`convert_dropout`)."""

from varshift.fix.convert import convert_dropout
from varshift.fix.recalibrate import recalibrate_bn

__all__ = ["convert_dropout", "recalibrate_bn"]
