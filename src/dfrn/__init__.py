"""dfrn: Deep Factor Regression Network for symptom factors from structural MRI."""

from dfrn.errors import DfrnError, DfrnInputError

__version__ = "0.2.0"

__all__ = ["DfrnError", "DfrnInputError", "__version__"]
