"""triton-rerank: reranking on NVIDIA Triton Inference Server.

The checkout's root is this package (``triton_rerank``); each folder is one part of the service:

- ``model_repository/``  what tritonserver loads (package data, found with importlib.resources)
- ``serving/``           what the Triton models import: request checks, tokenization, scoring, metrics
- ``models/``            model definitions (the packed cross-encoder) and checkpoint loading
- ``kernels/``           OpenAI-Triton ops: kernel, validating wrapper, torch reference
- ``launcher/``          ``triton-rerank serve``: find, configure, start and supervise tritonserver
- ``gateway/``           the HTTP rerank dialects (SGLang, TEI, Cohere) in front of the ensemble
- ``client/``            what users import: RerankClient, AsyncRerankClient, errors
- ``bench/``             benchmarks, peers, the GPU check, random-weight test models
"""

__version__ = "0.1.0"
