"""A .gguf model is converted once into a Hugging Face directory; loading that gives exactly what reading the
GGUF file gives (weights, config, tokenizer), at a fraction of the start-up time."""

import os
import subprocess

import torch

from reranker.model import converted_gguf, default_model_file, load_model, model_cache

TEXTS = ["insulin lowers blood glucose", "  Ünïcödé — spaces\tand\nnewlines ", "<|im_start|>user\nhi<|im_end|>"]


def test_the_converted_directory_loads_what_the_gguf_file_gives():
    direct = load_model(device="cpu", dtype="fp32", cache="off")
    cached = load_model(device="cpu", dtype="fp32")  # converted on the session's first load, read from it since
    root = model_cache()
    assert root is not None and converted_gguf(default_model_file(), root) is not None, "written to the default cache"
    assert cached.name == direct.name, "adapters and scoring files name the GGUF file"

    direct_weights, cached_weights = direct.model.state_dict(), cached.model.state_dict()
    assert direct_weights.keys() == cached_weights.keys()
    assert all(torch.equal(direct_weights[k], cached_weights[k]) for k in direct_weights), "bit-identical weights"
    assert cached.model.lm_head.weight.data_ptr() == cached.model.model.embed_tokens.weight.data_ptr(), "still tied"
    ignored = {"_name_or_path", "architectures", "quantization_config", "transformers_version"}  # set by saving
    assert {k: v for k, v in cached.model.config.to_dict().items() if k not in ignored} == \
        {k: v for k, v in direct.model.config.to_dict().items() if k not in ignored}

    for attribute in ("bos_token_id", "eos_token_id", "pad_token_id", "chat_template"):
        assert getattr(cached.tokenizer, attribute) == getattr(direct.tokenizer, attribute), attribute
    for text in TEXTS:
        assert cached.tokenizer(text)["input_ids"] == direct.tokenizer(text)["input_ids"], text


def test_an_unwritable_cache_falls_back_to_the_gguf_file(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache directory should be")
    assert converted_gguf(default_model_file(), blocked / "models") is None
    assert model_cache("off") is None and model_cache(str(tmp_path)) == tmp_path


def test_a_dead_conversions_scratch_is_removed_and_a_live_ones_kept(tmp_path):
    gguf = default_model_file()
    root = model_cache()
    done = converted_gguf(gguf, root) if root else None  # the name the cache uses for this file
    assert done is not None
    (tmp_path / done.name).mkdir()
    (tmp_path / done.name / "config.json").write_text("{}")  # converted already: no conversion here
    child = subprocess.Popen(["true"])
    child.wait()  # its pid names a conversion that died
    dead = tmp_path / f".{done.name}.{child.pid}.tmp"
    live = tmp_path / f".{done.name}.{os.getpid()}.tmp"
    dead.mkdir()
    live.mkdir()
    assert converted_gguf(gguf, tmp_path) == tmp_path / done.name
    assert live.is_dir() and not dead.exists()
