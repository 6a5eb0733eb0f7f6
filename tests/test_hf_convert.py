"""Hugging Face interop: small random Llama / Qwen2 models built with transformers (no download)
import with logits equal to transformers' (fp32, dense attention), export back and reload to the
same logits, sharded checkpoints import, and unsupported inputs fail in one line."""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from dcwdist.attention import AttentionConfig, AttnContext  # noqa: E402
from dcwdist.cli import main as cli_main  # noqa: E402
from dcwdist.config import load_config  # noqa: E402
from dcwdist.hf import load_hf_weights, model_config_from_hf  # noqa: E402
from dcwdist.model.transformer import Transformer  # noqa: E402
from dcwdist.train.trainer import build_model  # noqa: E402
from tests.conftest import REPO  # noqa: E402

VOCAB, T = 300, 96
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=64)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
        "rope_theta": 10000.0}
LINEAR = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32, "rope_theta": 5e5}
CASES = {  # name: (arch, extra config); GQA, tied/untied and rope scaling covered
    "llama_gqa_untied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "llama_tied_linear": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True,
                                        rope_parameters=LINEAR)),
    "llama_gqa_yarn": ("llama", dict(num_key_value_heads=1, rope_parameters=YARN)),
    "llama_gqa_llama3": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True,
                                       rope_parameters=LLAMA3)),
    "qwen2_gqa_tied_yarn": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True,
                                          rope_parameters={**YARN, "rope_theta": 1e6})),
    "qwen2_untied": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=False)),
}


def make_hf(arch: str, extra: dict, seed: int = 0):
    torch.manual_seed(seed)
    cls_cfg, cls = ((transformers.LlamaConfig, transformers.LlamaForCausalLM) if arch == "llama"
                    else (transformers.Qwen2Config, transformers.Qwen2ForCausalLM))
    model = cls(cls_cfg(**SHAPE, **extra)).eval()
    with torch.no_grad():  # random biases and norms, so a mapping error cannot hide behind 0/1
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.5 if "norm" in name else 0.0, 0.1)
    return model


def save_hf(model, path, **kw) -> str:
    model.save_pretrained(path, safe_serialization=True, **kw)
    return str(path)


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))


def dcw_logits(model: Transformer, tok: torch.Tensor) -> torch.Tensor:
    ctx = AttnContext(doc_ids=torch.zeros_like(tok), positions=torch.arange(tok.shape[1])
                      .expand_as(tok))
    with torch.no_grad():
        return model.logits(model(tok, ctx))


def hf_logits(model, tok: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tok).logits


def import_dense(hf_dir: str) -> Transformer:
    model = Transformer(model_config_from_hf(hf_dir), AttentionConfig(kind="dense")).eval()
    assert load_hf_weights(model, hf_dir) == []
    return model


def assert_logits_close(a, b, atol=1e-4):
    diff = (a - b).abs()
    assert diff.max() <= atol, f"max |diff| {diff.max():.3e}, mean {diff.mean():.3e}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_matches_transformers_and_export_round_trips(case, tmp_path):
    arch, extra = CASES[case]
    hf = make_hf(arch, extra)
    hf_dir = save_hf(hf, tmp_path / "hf")
    tok = tokens()
    ref = hf_logits(hf, tok)
    ours = import_dense(hf_dir)
    assert ours.cfg.qkv_bias == (arch == "qwen2")
    assert ours.cfg.tie_embeddings == extra.get("tie_word_embeddings", False)
    assert ours.cfg.n_kv_heads == extra["num_key_value_heads"]
    assert_logits_close(dcw_logits(ours, tok), ref)

    # Export (through a run directory, as `dcwdist hf-export` does) and reload in transformers.
    run_dir, out_dir = str(tmp_path / "run"), str(tmp_path / "out")
    assert cli_main(["hf-import", hf_dir, run_dir, "attention.kind=dense"]) == 0
    assert cli_main(["hf-export", run_dir, out_dir]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    assert type(back).__name__ == type(hf).__name__
    assert_logits_close(hf_logits(back, tok), ref, atol=1e-5)
    assert_logits_close(hf_logits(back, tok), dcw_logits(ours, tok))
    for key, value in hf.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_sharded_checkpoint_imports(tmp_path):
    hf = make_hf("qwen2", CASES["qwen2_untied"][1])
    hf_dir = save_hf(hf, tmp_path / "hf", max_shard_size="40KB")
    index = json.load(open(os.path.join(hf_dir, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 2
    assert not os.path.exists(os.path.join(hf_dir, "model.safetensors"))
    assert_logits_close(dcw_logits(import_dense(hf_dir), tokens()), hf_logits(hf, tokens()))


def test_sharded_export_reloads(tmp_path):
    hf = make_hf("llama", CASES["llama_gqa_untied"][1])
    hf_dir, run_dir, out = save_hf(hf, tmp_path / "hf"), str(tmp_path / "run"), tmp_path / "out"
    assert cli_main(["hf-import", hf_dir, run_dir]) == 0
    assert cli_main(["hf-export", run_dir, str(out), "--max-shard-gb", "0.00005"]) == 0
    assert (out / "model.safetensors.index.json").exists()
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert_logits_close(hf_logits(back, tokens()), hf_logits(hf, tokens()), atol=1e-5)


def test_dcw_import_fills_every_hf_tensor_and_leaves_scorer_and_alpha_fresh(tmp_path):
    hf = make_hf("qwen2", CASES["qwen2_gqa_tied_yarn"][1])
    hf_dir = save_hf(hf, tmp_path / "hf")
    cfg = load_config(os.path.join(REPO, "recipes/finetune_hf_dcw.yaml"),
                      [f"model.init_from={hf_dir}", "attention.block_size=32"])
    assert cfg.attention.kind == "dcw"
    model = build_model(cfg, AttentionConfig(**vars(cfg.attention)))  # the trainer's hook
    assert cfg.model.dim == 64 and cfg.model.qkv_bias and cfg.model.rope.scaling == "yarn"
    state = model.state_dict()
    for key, value in hf.state_dict().items():
        name = key[len("model."):] if key.startswith("model.") else key
        if name == "lm_head.weight":
            name = "embed_tokens.weight"  # tied
        assert torch.equal(state[name], value), key
    fresh = [n for n in state if n.startswith("segmenter.") or ".self_attn.attn." in n]
    assert any(n.startswith("segmenter.") for n in fresh)
    alphas = [n for n in fresh if n.endswith(".alpha")]
    assert len(alphas) == 2 and all(float(state[n].abs().max()) == 0.0 for n in alphas)
    assert set(state) - set(fresh) == {
        (k[len("model."):] if k.startswith("model.") else k) for k in hf.state_dict()
        if k != "lm_head.weight"}


def test_recipe_stages_extend_native_length_4x_with_yarn():
    cfg = load_config(os.path.join(REPO, "recipes/finetune_hf_dcw.yaml"))
    native = cfg.stages[0].seq_len
    assert cfg.model.init_from and cfg.stages[0].rope is None
    assert cfg.stages[-1].seq_len == 4 * native
    factors = [s.rope.factor for s in cfg.stages[1:]]
    assert factors == sorted(factors) and factors[-1] == 4.0
    assert all(s.rope.scaling == "yarn" and s.rope.original_max_len == native
               for s in cfg.stages[1:])


def _one_line_error(capsys, argv) -> str:
    capsys.readouterr()  # drop earlier output (transformers' save progress bars)
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dcwdist: error: ") and "\n" not in err, err
    return err


def test_bad_inputs_fail_in_one_line_naming_what_is_supported(tmp_path, capsys):
    err = _one_line_error(capsys, ["hf-import", str(tmp_path / "nope"), str(tmp_path / "r")])
    assert "not a directory" in err
    err = _one_line_error(capsys, ["hf-import", str(tmp_path), str(tmp_path / "r")])
    assert "no config.json" in err

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                  "model_type": "gpt2"}))
    err = _one_line_error(capsys, ["hf-import", str(gpt2), str(tmp_path / "r")])
    assert "GPT2LMHeadModel" in err and "LlamaForCausalLM" in err and "Qwen2ForCausalLM" in err

    hf = make_hf("llama", {"num_key_value_heads": 2})
    hf_dir = save_hf(hf, tmp_path / "hf")
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    for patch, words in [
        ({"rope_parameters": {"rope_type": "longrope", "factor": 8.0, "rope_theta": 5e5}},
         ("longrope", "default, linear, yarn, llama3")),
        ({"head_dim": 32}, ("head_dim=32", "hidden_size / num_attention_heads")),
        ({"rope_parameters": {**YARN, "attention_factor": 1.5}}, ("attention_factor",)),
    ]:
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **patch}))
        err = _one_line_error(capsys, ["hf-import", hf_dir, str(tmp_path / "r")])
        assert all(w in err for w in words), err
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))

    os.rename(os.path.join(hf_dir, "model.safetensors"), os.path.join(hf_dir, "pytorch_model.bin"))
    err = _one_line_error(capsys, ["hf-import", hf_dir, str(tmp_path / "r")])
    assert "pytorch_model.bin" in err and "pickle" in err


def test_shape_mismatch_and_stray_tensor_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_dir = save_hf(make_hf("llama", {"num_key_value_heads": 2}), tmp_path / "hf")
    path = os.path.join(hf_dir, "model.safetensors")
    tensors = load_file(path)
    save_file({**tensors, "model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}, path)
    with pytest.raises(ValueError, match="o_proj.bias has no place"):
        import_dense(hf_dir)
    del tensors["model.norm.weight"]
    save_file(tensors, path)
    with pytest.raises(ValueError, match="missing from the checkpoint, e.g. model.norm.weight"):
        import_dense(hf_dir)


def test_help_texts(capsys):
    for cmd in ("hf-import", "hf-export"):
        with pytest.raises(SystemExit):
            cli_main([cmd, "--help"])
        out = capsys.readouterr().out
        assert "Examples:" in out and "safetensors" in out
