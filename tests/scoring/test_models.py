"""Model specs: builtins build once, deterministically and atomically; SmolLM2 stops at <|im_end|>."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edsft.models import (
    cpu_supports_bf16,
    dtype_name,
    end_of_turn_ids,
    load_model,
    load_tokenizer,
    model_fingerprint,
    resolve_dtype,
    resolve_model,
)

_BUILD = (
    "import sys; from edsft.models import resolve_model, model_fingerprint; "
    "print(model_fingerprint(resolve_model('builtin:tiny-llama', cache_dir=sys.argv[1])))"
)


def test_tiny_llama_is_bit_identical_across_processes_and_parallel_builds_do_not_race(tmp_path):
    # Two processes race on one cache dir, a third builds in another dir: all three folders are
    # byte-identical, one complete folder exists per dir and no temporary folder is left behind.
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    shared, other = tmp_path / "a", tmp_path / "b"
    procs = [
        subprocess.Popen([sys.executable, "-c", _BUILD, str(d)], stdout=subprocess.PIPE, text=True, env=env)
        for d in (shared, shared, other)
    ]
    prints = [p.communicate(timeout=240)[0].strip().splitlines()[-1] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(prints)) == 1, prints
    assert sorted(p.name for p in shared.iterdir()) == ["tiny-llama-v1", "tiny-llama-v1.lock"]
    assert model_fingerprint(shared / "tiny-llama-v1") == prints[0]


def test_tiny_llama_tokenizer_and_model_shape(tmp_path):
    tok = load_tokenizer("builtin:tiny-llama", cache_dir=tmp_path)
    model = load_model("builtin:tiny-llama", cache_dir=tmp_path)
    assert 1000 <= len(tok) <= 2048
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|im_end|>"
    assert end_of_turn_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok("What is 2+3? ünïcode")["input_ids"]) == "What is 2+3? ünïcode"  # byte-level: lossless
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert model.dtype == resolve_dtype("auto", "cpu") and not model.training


def test_smollm2_ends_the_turn_at_im_end():
    tok = load_tokenizer("builtin:smollm2-135m")
    model = load_model("builtin:smollm2-135m")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in end_of_turn_ids(tok)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    assert im_end in list(model.generation_config.eos_token_id)
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**enc, max_new_tokens=48, do_sample=False)
    new = out[0, enc["input_ids"].shape[1] :].tolist()
    assert new[-1] == im_end and len(new) < 48, tok.decode(new)  # stopped at the end of the turn
    text = tok.decode(new, skip_special_tokens=True)
    assert "5" in text and "user" not in text


def test_dtype_auto_is_bf16_where_the_cpu_has_it_and_bad_specs_are_clear(tmp_path, monkeypatch):
    # auto: bf16 on CUDA and on CPUs with native bf16 matmuls (the probe reads /proc/cpuinfo), else fp32
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    native = any(f in flags.split() for f in ("avx512_bf16", "amx_bf16", "bf16"))
    cpu_supports_bf16.cache_clear()
    assert cpu_supports_bf16() is native
    assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    for forced, expected in (("0", torch.float32), ("1", torch.bfloat16)):  # the override, both ways
        monkeypatch.setenv("EDSFT_CPU_BF16", forced)
        cpu_supports_bf16.cache_clear()
        assert resolve_dtype("auto", "cpu") == expected
    monkeypatch.delenv("EDSFT_CPU_BF16")
    cpu_supports_bf16.cache_clear()
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert dtype_name(torch.bfloat16) == "bfloat16"
    with pytest.raises(ValueError, match="dtype='int8'"):
        resolve_dtype("int8")
    with pytest.raises(ValueError, match="builtin:nope"):
        resolve_model("builtin:nope")
    with pytest.raises(ValueError, match="config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="empty"):
        resolve_model("  ")
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"  # hub id


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_s3_spec_is_synced_to_the_cache_and_loads(tmp_path, monkeypatch):
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        from edsft import storage

        monkeypatch.setitem(storage._DEFAULT, "endpoint_url", f"http://127.0.0.1:{port}")
        local = resolve_model("builtin:tiny-llama", cache_dir=tmp_path / "build")
        store = storage.get_store("s3://models/tiny")
        import boto3

        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1").create_bucket(Bucket="models")
        store.upload_from(local)
        got = resolve_model("s3://models/tiny", cache_dir=tmp_path / "cache")
        assert isinstance(got, Path) and got.is_relative_to(tmp_path / "cache")
        assert model_fingerprint(got) == model_fingerprint(local)
        assert load_model("s3://models/tiny", cache_dir=tmp_path / "cache").config.hidden_size == 64
        with pytest.raises(ValueError, match="does not exist"):
            resolve_model("s3://models/missing", cache_dir=tmp_path / "cache")
    finally:
        server.stop()
