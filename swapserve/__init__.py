"""swapserve: GPU-efficient serverless inference.

Every model stays in page-locked host memory; a request is bound to a GPU only when it arrives, and
the model is swapped in while it already executes.
"""

__version__ = "0.1.0"
