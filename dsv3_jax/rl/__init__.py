"""R1-style post-training: SFT with chat masking, GRPO with verifiable rewards, rollouts through
the inference engine, the R1-Zero arithmetic demo."""
from dsv3_jax.rl.grpo import GRPOConfig, group_advantages, grpo_loss, token_logprobs
from dsv3_jax.rl.policy import GRPOObjective, PolicyTrainer
from dsv3_jax.rl.rewards import (Example, combined_reward, correctness_reward, extract_answer,
                                 format_reward, parse_number, split_think)
from dsv3_jax.rl.rollout import RolloutBatch, RolloutEngine
from dsv3_jax.rl.sft import SFTData, SFTObjective, pack, read_chat_jsonl, render_chat
from dsv3_jax.rl.tasks import ArithTask, write_byte_tokenizer

__all__ = ["GRPOConfig", "group_advantages", "grpo_loss", "token_logprobs", "GRPOObjective",
           "PolicyTrainer", "Example", "combined_reward", "correctness_reward", "extract_answer",
           "format_reward", "parse_number", "split_think", "RolloutBatch", "RolloutEngine",
           "SFTData", "SFTObjective", "pack", "read_chat_jsonl", "render_chat", "ArithTask",
           "write_byte_tokenizer"]
