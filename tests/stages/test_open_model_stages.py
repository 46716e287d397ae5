"""Every stage starts from a Hugging Face directory (a small random Qwen2-family model with
its own ChatML tokenizer, made locally): pretraining starts from exactly the imported
weights, SFT trains with the model's chat template, the tokenizer is carried through the
later stages, PPO runs against our reward model and against an imported one (whose score
statistics it computes), and every stage's result exports to a directory that re-imports
exactly."""
import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from configs import base
from instructjax.data import demo_corpus, tokenizer as tok_lib
from instructjax.model import hf
from instructjax.model.hf.random_model import write_random_hf_model
from instructjax.stages import common, export, open_models, workdirs
from instructjax.stages.registry import get_stage
from instructjax.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("open")


@pytest.fixture(scope="module")
def qwen_dir(root):
    corpus = demo_corpus.write_demo_corpus(root / "corpus", seed=0, num_train_docs=300,
                                           num_eval_docs=10)
    texts = [json.loads(line)["text"] for line in open(corpus["train"], encoding="utf-8")]
    write_random_hf_model(root / "qwen", "qwen2", texts, embed_dim=32, num_heads=2,
                          num_kv_heads=1, mlp_dim=64, max_seq_len=512, tokenizer_vocab=600)
    return str(root / "qwen")


def _train(c, steps, lr=3e-3):
    c.train.update(dict(steps=steps, learning_rate=lr, warmup_steps=0, decay="constant",
                        eval_every=1000, checkpoint_every=1000, async_checkpoint=False))
    if "batch_size" in c.train:
        c.train.batch_size = 4
    c.model.update(dict(dtype="float32", param_dtype="float32", scan_layers=True,
                        remat_policy="none"))
    return c


def _small_eval(c):
    c.eval.update(dict(num_prompts=4, batch_size=4, max_prompt_len=192, max_new_tokens=4))


@pytest.fixture(scope="module")
def sft_dir(root, qwen_dir):
    c = _train(base.get_base("sft"), steps=6)
    c.init_from_hf = qwen_dir
    c.chat.format = "model"
    c.data.seq_len = 256
    _small_eval(c)
    workdir = str(root / "sft")
    get_stage("sft")(c, workdir)
    return workdir


@pytest.fixture(scope="module")
def reward_dir(root, sft_dir):
    c = _train(base.get_base("reward"), steps=3)
    c.init_from = sft_dir
    c.chat.format = "model"
    c.data.seq_len = 256
    c.reward.stats_samples = 8
    c.eval.update(dict(batch_size=8, max_prompt_len=192, max_new_tokens=4))
    c.export_hf = str(root / "reward_hf")
    workdir = str(root / "reward")
    get_stage("reward")(c, workdir)
    return workdir


def _ppo(root, sft_dir, reward_from, name):
    c = _train(base.get_base("ppo"), steps=1, lr=1e-4)
    c.init_from = sft_dir
    c.ppo.reward_from = reward_from
    c.chat.format = "model"
    c.ppo.update(dict(prompts_per_iteration=8, minibatch_size=4, epochs=1, max_prompt_len=192,
                      max_new_tokens=6, penalize_missing_eos=False))
    _small_eval(c)
    c.export_hf = str(root / f"{name}_hf")
    workdir = str(root / name)
    get_stage("ppo")(c, workdir)
    return workdir


def test_pretrain_starts_from_exactly_the_imported_weights(root, qwen_dir):
    c = _train(base.get_base("pretrain"), steps=1, lr=0.0)
    c.init_from_hf = qwen_dir
    c.data.seq_len = 64
    c.export_hf = str(root / "pretrain_hf")
    workdir = str(root / "pretrain")
    get_stage("pretrain")(c, workdir)
    imported, _, _ = hf.load_hf(qwen_dir)
    reexported, _, _ = hf.load_hf(str(root / "pretrain_hf"))
    # one step at learning rate 0 changes nothing (AdamW's decay is scaled by it too)
    chex.assert_trees_all_equal(jax.device_get(imported), jax.device_get(reexported))
    info = workdirs.read_run_info(workdir)
    assert info["tokenizer"] == open_models.TOKENIZER_DIR
    assert os.path.isfile(os.path.join(workdir, "tokenizer", "tokenizer.json"))
    assert info["model"]["qkv_bias"] and info["model"]["tie_embeddings"]

    c.tokenizer.path = "/some/tokenizer.model"
    with pytest.raises(common.StageError, match="brings its own tokenizer"):
        get_stage("pretrain")(c, str(root / "pretrain_both"))


def test_sft_trains_with_the_models_chat_template_and_keeps_its_tokenizer(sft_dir, qwen_dir):
    evals = [r for r in read_metrics(sft_dir) if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 6]
    assert evals[-1]["loss"] < evals[0]["loss"] - 1.0  # held-out answers in ChatML
    tokenizer = tok_lib.load_tokenizer(os.path.join(sft_dir, "tokenizer"))
    assert tokenizer.encode("<|im_start|>user") == tok_lib.load_tokenizer(qwen_dir).encode(
        "<|im_start|>user")
    assert tokenizer.bos_id is None and len(tokenizer.eos_ids) >= 1
    # the first training dialogue as SFT encoded it: ChatML, loss on the answers + <|im_end|>
    example = open(os.path.join(sft_dir, "encoded_example.txt"), encoding="utf-8").read()
    assert example.startswith("<|im_start|>system\n") and "用户：" not in example
    assert "<|im_start|>assistant\n⟦" in example and example.rstrip().endswith("<|im_end|>⟧")
    assert workdirs.read_run_info(sft_dir)["chat_format"] == "model"


def test_reward_and_ppo_from_the_imported_sft_and_an_imported_reward_model(root, sft_dir,
                                                                         reward_dir):
    assert os.path.isfile(os.path.join(reward_dir, workdirs.REWARD_STATS))
    assert workdirs.read_run_info(reward_dir)["tokenizer"] == open_models.TOKENIZER_DIR
    # the reward stage exported a Qwen2ForSequenceClassification that re-imports exactly
    rm_params, rm_cfg, _ = hf.load_hf_reward(str(root / "reward_hf"))
    from instructjax.model.heads import RewardModel
    from instructjax.parallel import mesh as mesh_lib
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    trained = workdirs.load_params(reward_dir, RewardModel(rm_cfg), mesh)
    chex.assert_trees_all_equal(jax.device_get(trained), jax.device_get(rm_params))
    hf_config = json.load(open(root / "reward_hf" / "config.json"))
    assert hf_config["architectures"] == ["Qwen2ForSequenceClassification"]

    ppo_dir = _ppo(root, sft_dir, reward_dir, "ppo")
    train = [r for r in read_metrics(ppo_dir) if r["split"] == "train"]
    assert len(train) == 1 and np.isfinite(train[0]["score"])

    ppo_imported = _ppo(root, sft_dir, str(root / "reward_hf"), "ppo_imported_rm")
    stats = json.load(open(os.path.join(ppo_imported, workdirs.REWARD_STATS)))
    assert stats["num_samples"] > 0 and stats["std"] > 0
    train = [r for r in read_metrics(ppo_imported) if r["split"] == "train"]
    assert len(train) == 1 and np.isfinite(train[0]["score"])

    # the policy's export re-imports exactly, and the command writes the same files
    policy, _, _ = hf.load_hf(str(root / "ppo_hf"))
    exported = export.export_stage(ppo_dir, str(root / "ppo_hf_again"))
    again, _, _ = hf.load_hf(exported)
    chex.assert_trees_all_equal(jax.device_get(policy), jax.device_get(again))
    out = subprocess.run([sys.executable, "-m", "experiments.export_hf", f"--workdir={ppo_dir}",
                          f"--out={root / 'ppo_hf_cmd'}"], cwd=REPO, capture_output=True,
                         text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert (root / "ppo_hf_cmd" / "model.safetensors").read_bytes() == \
        (root / "ppo_hf" / "model.safetensors").read_bytes()


def test_reward_and_ppo_start_directly_from_the_imported_model(root, qwen_dir, reward_dir):
    # reward: the imported LM as the trunk, a fresh head
    c = _train(base.get_base("reward"), steps=1)
    c.init_from_hf = qwen_dir
    c.chat.format = "model"
    c.data.seq_len = 256
    c.reward.stats_samples = 4
    c.eval.update(dict(batch_size=4, max_prompt_len=192, max_new_tokens=4))
    workdir = str(root / "reward_from_hf")
    get_stage("reward")(c, workdir)
    assert os.path.isfile(os.path.join(workdir, workdirs.REWARD_STATS))
    # PPO: policy and frozen reference both from the imported model
    ppo_dir = _ppo(root, qwen_dir, reward_dir, "ppo_from_hf")
    train = [r for r in read_metrics(ppo_dir) if r["split"] == "train"]
    # the policy starts as the reference: the first minibatch's ratio is exactly 1
    assert train[0]["first_minibatch_ratio"] == 1.0 and np.isfinite(train[0]["score"])


def test_export_refuses_an_unfinished_or_modelless_stage(root, tmp_path):
    with pytest.raises(common.StageError, match="not a finished stage workdir"):
        export.export_stage(str(tmp_path), str(tmp_path / "out"))
    os.makedirs(tmp_path / "run")
    json.dump({"stage": "sft", "model": {}, "tokenizer": "tokenizer.model"},
              open(tmp_path / "run" / workdirs.RUN_INFO, "w"))
    with pytest.raises(common.StageError, match="has not finished"):
        export.export_stage(str(tmp_path / "run"), str(tmp_path / "out"))


def test_init_from_and_init_from_hf_together_are_refused(qwen_dir, tmp_path):
    c = base.get_base("sft")
    c.init_from, c.init_from_hf = "/runs/pretrain", qwen_dir
    with pytest.raises(common.StageError, match="both set"):
        get_stage("sft")(c, str(tmp_path))
