"""Training: loss (CE + MTP + sequence-wise balance), aux-loss-free router-bias balancing, AdamW,
packed data, Orbax checkpoints and the `Trainer` loop (`dsv3 train`)."""
from dsv3_jax.train.balance import bias_update, load_ratio, router_biases, update_router_bias
from dsv3_jax.train.checkpointing import RunCheckpointer
from dsv3_jax.train.data import Batch, ByteTokenizer, DataState, TokenDataset, write_tokens
from dsv3_jax.train.loss import LossConfig, balance_loss, cross_entropy, shifted_targets, training_loss
from dsv3_jax.train.optim import OptimConfig, decay_mask, make_optimizer, make_schedule, training_runtime
from dsv3_jax.train.trainer import H100_PEAK_FLOPS, TrainConfig, Trainer, train_flops_per_token

__all__ = [
    "LossConfig", "training_loss", "cross_entropy", "shifted_targets", "balance_loss",
    "router_biases", "bias_update", "update_router_bias", "load_ratio",
    "OptimConfig", "make_optimizer", "make_schedule", "decay_mask", "training_runtime",
    "TokenDataset", "DataState", "Batch", "ByteTokenizer", "write_tokens",
    "RunCheckpointer", "TrainConfig", "Trainer", "train_flops_per_token", "H100_PEAK_FLOPS",
]
