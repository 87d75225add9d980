"""The text tower compiled with ``torch.compile`` in the background, used by the inference thread once it is ready.

Why: one short query through the text tower is hundreds of small ops; inductor fuses the element-wise ones (for
int8 the per-token quantize / dequantize passes around every matmul) and drops the Python overhead between them,
so each text query encodes faster, int8 most of all (see bench/README.md, "server": the compiled text tower rows).

Contracts:

* Serving never waits for compilation: until :attr:`CompiledText.ready`, calls run the eager tower. Compiling runs
  on its own short-lived thread (``torch.compile(dynamic=True)`` with inductor's weight freezing), warms up two
  graphs (one query; any other batch size and length), and checks both against the eager tower on real prompts
  before it is used: cosine >= ``MIN_COSINE`` per row (int8 rows may differ by a rounding step of a token scale).
* After warm-up no call compiles: they run under ``fail_on_recompile``; a shape the graphs do not cover runs eager
  (logged once). A failed compile (no C++ compiler, an inductor error, a failed check) leaves the eager tower in
  place; the reason is in :attr:`CompiledText.status` (shown by ``/api/stats``) and the log.
* The graphs are guarded on the calling thread's torch thread count and inductor fixes each kernel's OpenMP
  thread count when it compiles, so the compile thread runs with the inference thread's count (``threads``), set
  for itself only: the default of new threads (one, in the server) stays (:mod:`clip_model.process_tuning.threads`).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import clip_model
from clip_model.process_tuning import set_own_thread_count

logger = logging.getLogger(__name__)

TextFn = Callable[[torch.Tensor], torch.Tensor]  # tokens [B, L] int64 -> [B, D] float32 unit rows
WARMUP_PROMPTS = ("a photo of a cat", "two dogs playing in the snow at dusk", "red", "a small blue triangle")
MIN_COSINE = 0.999  # compiled vs eager, per row


def _inference_tensor(tokens: torch.Tensor) -> torch.Tensor:
    """A copy made under inference mode: the graphs guard on the input's dispatch keys, which differ between
    tensors made inside and outside inference mode, so every call hands them the same kind."""
    with torch.inference_mode():
        return tokens.clone()


class CompiledText:
    """``encode(tokens)`` = the text tower's unit embeddings, compiled once :meth:`start` has finished in the
    background, eager before that (see the module docstring)."""

    def __init__(self, model: clip_model.ImageTextModel, threads: int, text_input: clip_model.TextInput) -> None:
        """``text_input``: the model's (:meth:`clip_model.TextInput.of`), which makes the warm-up rows."""
        self._model = model
        self._threads = threads
        self._text_input = text_input
        self._compiled: TextFn | None = None
        self._warned_shapes: set[tuple[int, ...]] = set()
        self.status = "eager (compilation off)"

    def eager(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._model.encode_text(tokens, normalize=True)

    @property
    def ready(self) -> bool:
        return self._compiled is not None

    def start(self) -> threading.Thread:
        """Compile in the background; returns the compiling thread (daemon)."""
        self.status = "eager (compiling in the background)"
        thread = threading.Thread(target=self._compile, name="text-compiler", daemon=True)
        thread.start()
        return thread

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, L] int64 (cut by :func:`clip_model.trim_for`) -> [B, D] float32 unit rows. Call it from a thread
        whose torch thread count is ``threads`` (the inference thread): the graphs are guarded on it."""
        compiled = self._compiled
        if compiled is None:
            return self.eager(tokens)
        try:
            with torch.inference_mode(), torch.compiler.set_stance("fail_on_recompile"):
                return compiled(_inference_tensor(tokens))
        except Exception as exc:  # a shape outside the compiled graphs: eager is always right
            shape = tuple(tokens.shape)
            if shape not in self._warned_shapes:
                self._warned_shapes.add(shape)
                logger.warning("compiled text tower does not cover tokens %s (%s); encoding it eagerly", shape, exc)
            return self.eager(tokens)

    def _compile(self) -> None:
        started = time.perf_counter()
        try:
            if shutil.which("c++") is None and shutil.which("g++") is None:
                raise RuntimeError("no C++ compiler on PATH (inductor needs one: install g++)")
            import torch._inductor.config as inductor_config

            set_own_thread_count(self._threads)  # the count the graphs are guarded on and the kernels use
            inductor_config.freezing = True  # weights become constants: folded layouts, no per-call reads of them
            compiled = torch.compile(self.eager, dynamic=True)
            tokens = self._text_input.rows(WARMUP_PROMPTS).tokens
            with torch.inference_mode():
                for rows in (tokens[:1], tokens):  # one query; several
                    batch = clip_model.trim_for(self._model, rows)
                    self._check(compiled(_inference_tensor(batch)), self.eager(batch), tuple(batch.shape))
        except Exception as exc:  # any failure leaves the eager tower serving; the reason is shown
            self.status = f"eager (compilation failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
            logger.error("compiling the text tower failed, it stays eager: %s", exc)
            return
        self._compiled = compiled
        self.status = f"compiled (in {time.perf_counter() - started:.0f} s)"
        logger.info("text tower compiled in %.1f s; queries now use it", time.perf_counter() - started)

    @staticmethod
    def _check(compiled: torch.Tensor, eager: torch.Tensor, shape: tuple[int, ...]) -> None:
        cosine = F.cosine_similarity(compiled.float(), eager.float(), dim=-1).min().item()
        if not cosine >= MIN_COSINE:
            raise RuntimeError(f"compiled output differs from eager at tokens {shape}: min cosine {cosine:.5f}")
