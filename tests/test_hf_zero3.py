"""A 2-process DeepSpeed ZeRO-3 run started from a small Hugging Face Qwen2 model
(model.init_from): its sharded checkpoint, merged by zero_to_fp32 and exported as a Hugging Face
model, gives the logits of dcwdist's own final model (and so does model.pt)."""
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("deepspeed")

from dcwdist.attention import AttentionConfig, AttnContext  # noqa: E402
from dcwdist.cli import main as cli_main  # noqa: E402
from dcwdist.config import load_config  # noqa: E402
from dcwdist.train.trainer import build_model  # noqa: E402
from tests.distributed import SMALL, run_train  # noqa: E402
from tests.test_hf_convert import CASES, make_hf, save_hf  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("zero3"))
    hf_dir = save_hf(make_hf("qwen2", CASES["qwen2_gqa_tied_yarn"][1]),
                     tmp_path_factory.mktemp("hf"))
    run_train(run_dir, SMALL + ["zero.enabled=true", "zero.stage=3", "stages.0.steps=1",
                                "stages.1.steps=1", "stages.1.rope.base=1000000.0",
                                f"model.init_from={hf_dir}"], nproc=2)
    return run_dir


def dcwdist_logits(run_dir: str, tok: torch.Tensor) -> torch.Tensor:
    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    model = build_model(cfg, AttentionConfig(**vars(cfg.attention))).eval()  # adopts the HF shape
    model.set_rope(cfg.stages[-1].rope)
    model.load_state_dict(torch.load(os.path.join(run_dir, "model.pt"), weights_only=True))
    ctx = AttnContext(doc_ids=torch.zeros_like(tok), positions=torch.arange(tok.shape[1])
                      .expand_as(tok))
    with torch.no_grad():
        return model.logits(model(tok, ctx))


def hf_logits(out_dir: str, tok: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    with torch.no_grad():
        return model(tok).logits


def test_zero3_checkpoint_exports_to_transformers(zero3_run, tmp_path):
    tags = sorted(t for t in os.listdir(os.path.join(zero3_run, "checkpoints"))
                  if t.startswith("step"))
    tag_dir = os.path.join(zero3_run, "checkpoints", tags[-1])
    shards = [n for n in os.listdir(tag_dir) if n.endswith("optim_states.pt")]
    assert len(shards) == 2, os.listdir(tag_dir)  # one ZeRO-3 partition per rank

    tok = torch.randint(0, 264, (2, 700), generator=torch.Generator().manual_seed(0))
    ours = dcwdist_logits(zero3_run, tok)
    for source in (tags[-1], "model.pt"):
        out = str(tmp_path / source)
        assert cli_main(["hf-export", zero3_run, out, "--checkpoint", source]) == 0
        assert os.path.exists(os.path.join(out, "config.json"))
        theirs = hf_logits(out, tok)
        diff = (theirs - ours).abs()
        assert diff.max() < 1e-4, f"{source}: max |diff| {diff.max():.3e}, mean {diff.mean():.3e}"
