"""THE embedded default: tokenizer -> pretrain -> SFT -> reward model -> PPO on the demo task.

Command:
  python -m experiments.run --config=configs/pipeline_tiny.py --workdir=/tmp/ijx
Needs: any CPU; about 10-15 minutes on 2 cores; no downloads.
Produces: WORKDIR/<stage>/ for each stage, WORKDIR/summary.json (true score after pretrain,
SFT and PPO; reward accuracy; final KL; wall time per stage), WORKDIR/ppo_curves.png.
Override a stage's keys with --config.stages.<stage>.<key>=value, e.g.
  --config.stages.ppo.train.steps=20
"""

from configs import base, ppo_tiny, pretrain_tiny, reward_tiny, sft_tiny


def get_config():
    config = base.get_base("pipeline", model="tiny")
    config.stages.tokenizer = base.get_base("tokenizer", model="tiny")
    config.stages.pretrain = pretrain_tiny.get_config()
    config.stages.sft = sft_tiny.get_config()
    config.stages.reward = reward_tiny.get_config()
    config.stages.ppo = ppo_tiny.get_config()
    return config
