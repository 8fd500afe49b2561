"""lrfast: a learning-rate range test fast enough to be free.

    res = lrfast.find(model, loader)     # exp 1e-7 -> 10, 100 steps, AdamW
    res.suggestion, res.plot("lr.png"), res.to_json("lr.json")
"""

from lrfast import suggest
from lrfast.api import find
from lrfast.info import info
from lrfast.result import LRFindResult

__version__ = "0.1.0"
__all__ = ["find", "info", "suggest", "LRFindResult", "__version__"]
