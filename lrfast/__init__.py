"""lrfast: a learning-rate range test fast enough to be free.

    res = lrfast.find(model, loader)     # exp 1e-7 -> 10, 100 steps, AdamW
    res.suggestion, res.plot("lr.png"), res.to_json("lr.json")
    with lrfast.RangeTest(optimizer, restore=model) as rt:   # the same test inside your own loop
        for batch in rt.batches(loader): ...; rt.record(loss)
"""

from lrfast import suggest
from lrfast.api import find
from lrfast.info import info
from lrfast.rangetest import RangeTest
from lrfast.result import LRFindResult

__version__ = "0.1.0"
__all__ = ["find", "info", "suggest", "LRFindResult", "RangeTest", "__version__"]
