"""The boundary: an experiment's ml_collections config, converted once into frozen dataclasses.

Everything below the stages (model, data, rlhf, train, eval, parallel) takes these
dataclasses, never the ConfigDict; the stages read them instead of `int(config...)` casts.
A stage's schema (configs/base.py) holds only the sections it reads; a section its schema
lacks is None here (the reward stage's `eval` keys go into RewardSettings, its `eval` is None).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from instructjax.data.chat_encoding import ChatTemplate
from instructjax.eval.true_score import EvalConfig
from instructjax.rlhf.experience import PPOHyper
from instructjax.rlhf.kl import KLControllerConfig
from instructjax.rlhf.rollout import SamplingConfig
from instructjax.stages.common import StageError
from instructjax.train.lifecycle import LoopConfig
from instructjax.train.optim import OptimConfig


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """`config.data`: path / eval_path (file, glob or directory; empty = the demo data),
    eval_percent held out when there is no eval_path, the pretraining text field, the
    packed row length seq_len, and the demo data's seed."""
    path: str
    eval_path: str
    demo_seed: int
    eval_percent: int = 5
    seq_len: int = 128
    text_field: str = "text"
    skip_malformed: bool = False


@dataclasses.dataclass(frozen=True)
class TokenizerSettings:
    """`config.tokenizer`: an existing sentencepiece model, or how to train one."""
    path: str
    vocab_size: int
    model_type: str
    max_training_lines: int


CHAT_FORMATS = ("chatyuan", "model")


@dataclasses.dataclass(frozen=True)
class ChatSettings:
    """`config.chat`: the dialogue template and how many earlier exchanges a prompt keeps.

    format "chatyuan" renders with `template` (ChatYuan's `用户：…\n小元：…` with the
    configured role names); "model" with the tokenizer's own chat template (an imported
    model's tokenizer_config.json), which `template_for` picks once the tokenizer is known.
    """
    template: ChatTemplate
    max_turns: int
    format: str = "chatyuan"

    def __post_init__(self):
        if self.format not in CHAT_FORMATS:
            raise ValueError(f"config.chat.format={self.format!r}; choose one of {CHAT_FORMATS}")

    def template_for(self, tokenizer):
        """The template a stage renders with, given the stage's tokenizer."""
        if self.format == "chatyuan":
            return self.template
        from instructjax.data import chat_template
        return chat_template.model_chat_template(tokenizer)


@dataclasses.dataclass(frozen=True)
class RewardSettings:
    """`config.reward` (+ `config.eval` for the score statistics' sampling).

    num_responses: K to pad comparisons to (0 = the largest K in the data); stats_samples:
    SFT-policy answers scored for the mean / std PPO normalises with, drawn with
    stats_sampling from prompts cut to stats_prompt_len, stats_batch_size at a time.
    """
    num_responses: int
    stats_samples: int
    stats_sampling: SamplingConfig
    stats_prompt_len: int
    stats_batch_size: int


@dataclasses.dataclass(frozen=True)
class PPOSettings:
    """`config.ppo` (the iterations are `loop.steps`; the policy's optimiser is
    `StageSettings.optim`, a separate critic's takes critic_learning_rate instead).

    sampling.num_samples answers per prompt, prompts_per_iteration prompts per iteration;
    hyper: what the jitted PPO functions close over; kl: the KL-coefficient controller.
    """
    reward_from: str
    prompts_per_iteration: int
    minibatch_size: int
    epochs: int
    sampling: SamplingConfig
    hyper: PPOHyper
    kl: KLControllerConfig
    critic: str
    critic_learning_rate: float
    frozen_dtype: str
    rollout_weights: str
    ptx_batch_size: int
    ptx_data_path: str


@dataclasses.dataclass(frozen=True)
class HardwareSettings:
    """`config.hardware`: the machine a config is sized for (read by the dry run)."""
    name: str
    num_devices: int
    memory_per_device_gb: float
    peak_tflops: float
    hbm_gbps: float


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """`config.distributed`: whether to start multi-process JAX, and with which coordinator
    ("host:port"; empty = found from the environment or the cluster)."""
    enabled: bool
    coordinator_address: str
    num_processes: int
    process_id: int


def distributed_from(config: Any) -> DistributedSettings:
    """DistributedSettings from `config.distributed` (read before any device is touched)."""
    d = config.distributed
    return DistributedSettings(enabled=bool(d.enabled),
                               coordinator_address=str(d.coordinator_address),
                               num_processes=int(d.num_processes), process_id=int(d.process_id))


@dataclasses.dataclass(frozen=True)
class StageSettings:
    """One stage's whole config, typed. Sections the stage's schema lacks are None.

    model: `config.model` as a dict (a ModelConfig is built from it, or from the earlier
    stage's run record plus its runtime fields, by stages/workdirs.py).
    train_batch_size: the supervised global batch (None in PPO, whose batches are ppo.*);
    its micro-batches are `loop.grad_accum_steps` (1 in PPO).
    """
    stage: str
    seed: int
    init_from: str
    mesh: dict
    model: dict
    hardware: HardwareSettings
    data: DataSettings | None = None
    tokenizer: TokenizerSettings | None = None
    chat: ChatSettings | None = None
    sft_train_on: str = "all"
    reward: RewardSettings | None = None
    ppo: PPOSettings | None = None
    eval: EvalConfig | None = None
    loop: LoopConfig | None = None
    optim: OptimConfig | None = None  # PPO: the policy's, over iterations x epochs x minibatches
    train_batch_size: int | None = None
    # A Hugging Face checkpoint directory pretraining starts from (the other stages read it
    # as `init_from`, which may name one); where the finished stage writes its result as
    # a Hugging Face directory ("" = nowhere).
    init_from_hf: str = ""
    export_hf: str = ""


def _section(config: Any, name: str) -> Any:
    return config[name] if name in config else None


def sampling_from(section: Any, num_samples: int = 1) -> SamplingConfig:
    """SamplingConfig from a section with max_new_tokens, temperature, top_k, top_p."""
    return SamplingConfig(max_new_tokens=int(section.max_new_tokens),
                          temperature=float(section.temperature), top_k=int(section.top_k),
                          top_p=float(section.top_p), num_samples=int(num_samples))


def optim_from(train: Any, **overrides) -> OptimConfig:
    """OptimConfig from `config.train` (total_steps = train.steps unless overridden)."""
    opt = OptimConfig(
        learning_rate=float(train.learning_rate), total_steps=int(train.steps),
        warmup_steps=int(train.warmup_steps), decay=str(train.decay),
        min_lr_ratio=float(train.min_lr_ratio), weight_decay=float(train.weight_decay),
        b1=float(train.b1), b2=float(train.b2), eps=float(train.eps),
        grad_clip=float(train.grad_clip))
    return dataclasses.replace(opt, **overrides)


def loop_from(train: Any, seed: int) -> LoopConfig:
    """LoopConfig from `config.train`; keys a stage's schema lacks (PPO has no log_every,
    eval_batches or grad_accum_steps) keep their defaults."""
    supervised = {}
    for name in ("log_every", "eval_batches", "grad_accum_steps"):
        if name in train:
            supervised[name] = int(train[name])
    return LoopConfig(steps=int(train.steps), eval_every=int(train.eval_every),
                      checkpoint_every=int(train.checkpoint_every),
                      keep_checkpoints=int(train.keep_checkpoints),
                      async_checkpoint=bool(train.async_checkpoint),
                      max_bad_steps=int(train.max_bad_steps), seed=seed, **supervised)


def ppo_from(config: Any) -> PPOSettings:
    """PPOSettings from `config.ppo`."""
    p = config.ppo
    hyper = PPOHyper(
        prompt_len=int(p.max_prompt_len), temperature=float(p.temperature), gamma=float(p.gamma),
        lam=float(p.lam), clip_eps=float(p.clip_eps), value_clip_eps=float(p.value_clip_eps),
        vf_coef=float(p.vf_coef), entropy_coef=float(p.entropy_coef),
        whiten_advantages=bool(p.whiten_advantages), kl_estimator=str(p.kl_estimator),
        reward_clip=float(p.reward_clip),
        missing_eos_penalty=float(p.missing_eos_penalty) if p.penalize_missing_eos else None,
        ptx_coef=float(p.ptx_coef), chunk=int(p.minibatch_size))
    kl = KLControllerConfig(kind=str(p.kl_controller), init_coef=float(p.init_kl_coef),
                            target=float(p.kl_target), horizon=float(p.kl_horizon))
    return PPOSettings(
        reward_from=str(p.reward_from),
        prompts_per_iteration=int(p.prompts_per_iteration),
        minibatch_size=int(p.minibatch_size), epochs=int(p.epochs),
        sampling=sampling_from(p, int(p.num_samples)), hyper=hyper, kl=kl,
        critic=str(p.critic), critic_learning_rate=float(p.critic_learning_rate),
        frozen_dtype=str(p.frozen_dtype), rollout_weights=str(p.rollout_weights),
        ptx_batch_size=int(p.ptx_batch_size), ptx_data_path=str(p.ptx_data_path))


def _eval_from(config: Any) -> EvalConfig | None:
    e = _section(config, "eval")
    if e is None or "num_prompts" not in e:
        return None
    return EvalConfig(num_prompts=int(e.num_prompts), batch_size=int(e.batch_size),
                      max_prompt_len=int(e.max_prompt_len),
                      max_turns=int(config.chat.max_turns),
                      sampling=sampling_from(e, int(e.num_samples)), seed=int(config.seed))


def _reward_from(config: Any) -> RewardSettings | None:
    r = _section(config, "reward")
    if r is None:
        return None
    e = config.eval
    return RewardSettings(num_responses=int(r.num_responses), stats_samples=int(r.stats_samples),
                          stats_sampling=sampling_from(e), stats_prompt_len=int(e.max_prompt_len),
                          stats_batch_size=int(e.batch_size))


def _data_from(config: Any) -> DataSettings | None:
    d = _section(config, "data")
    if d is None:
        return None
    optional = {}  # keys some stages' schemas lack (configs/base.UNUSED_KEYS)
    for name, kind in (("eval_percent", int), ("seq_len", int), ("text_field", str),
                       ("skip_malformed", bool)):
        if name in d:
            optional[name] = kind(d[name])
    return DataSettings(path=str(d.path), eval_path=str(d.eval_path),
                        demo_seed=int(d.demo_seed), **optional)


def _tokenizer_from(config: Any) -> TokenizerSettings | None:
    t = _section(config, "tokenizer")
    if t is None:
        return None
    return TokenizerSettings(path=str(t.path), vocab_size=int(t.vocab_size),
                             model_type=str(t.model_type),
                             max_training_lines=int(t.max_training_lines))


def _chat_from(config: Any) -> ChatSettings | None:
    c = _section(config, "chat")
    if c is None:
        return None
    return ChatSettings(ChatTemplate(user=str(c.user), assistant=str(c.assistant)),
                        max_turns=int(c.max_turns), format=str(c.format))


def _train_from(config: Any, seed: int) -> dict:
    train = _section(config, "train")
    if train is None:
        return {}
    if config.stage == "ppo":  # the optimiser counts minibatch updates, not iterations
        p = config.ppo
        minibatches = int(p.prompts_per_iteration) * int(p.num_samples) // int(p.minibatch_size)
        updates = int(train.steps) * int(p.epochs) * minibatches
        return {"loop": loop_from(train, seed), "optim": optim_from(train, total_steps=updates)}
    return {"loop": loop_from(train, seed), "optim": optim_from(train),
            "train_batch_size": int(train.batch_size)}


def _init_from(config: Any) -> str:
    """The directory a stage starts from: `init_from` (an earlier stage's workdir or a
    Hugging Face directory) or `init_from_hf`, never both."""
    earlier = str(config.init_from) if "init_from" in config else ""
    hf = str(config.init_from_hf) if "init_from_hf" in config else ""
    if earlier and hf:
        raise StageError(f"config.init_from={earlier!r} and config.init_from_hf={hf!r} are both "
                         "set: a stage starts from one model; clear one of them")
    return earlier or hf


def from_config(config: Any) -> StageSettings:
    """The stage's settings from its ml_collections config (already key- and range-checked
    by experiments/run.py); sections its schema lacks are None."""
    seed = int(config.seed)
    hw = config.hardware
    hardware = HardwareSettings(name=str(hw.name), num_devices=int(hw.num_devices),
                                memory_per_device_gb=float(hw.memory_per_device_gb),
                                peak_tflops=float(hw.peak_tflops), hbm_gbps=float(hw.hbm_gbps))
    model = config.model.to_dict() if "model" in config else {}
    return StageSettings(
        stage=str(config.stage), seed=seed, init_from=_init_from(config),
        init_from_hf=str(config.init_from_hf) if "init_from_hf" in config else "",
        export_hf=str(config.export_hf) if "export_hf" in config else "",
        mesh=dict(config.mesh), model=model, hardware=hardware,
        data=_data_from(config), tokenizer=_tokenizer_from(config), chat=_chat_from(config),
        sft_train_on=str(config.sft.train_on) if "sft" in config else "all",
        reward=_reward_from(config), ppo=ppo_from(config) if "ppo" in config else None,
        eval=_eval_from(config), **_train_from(config, seed))
