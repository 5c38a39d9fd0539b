"""One non-logging training step makes no device sync (the documented handful is now none).

Counted with libmoe.syncs.HostSyncCounter around `TrainRun.train_step` (the CPU stands in for the
GPU: the ops that would make the host wait for it are the same), on the micro preset through the
GPU dispatch path (`dispatch: grouped`), with bias balancing on so that its update counts too.
The model itself (routing, dispatch, aux losses, bias balancing) makes none:
tests/moe/test_sync_free.py.
"""

from libmoe.syncs import HostSyncCounter
from libmoe.train import train
from libmoe.train.loop import TrainRun

# Reads of tensors that stay on the host in a GPU run as well, so they never wait for the GPU;
# the CPU stand-in counts them because there everything is on the host. By where they come from:
HOST_RESIDENT = {
    # The data sampler's window order (a CPU tensor, read with int() per sequence).
    "libmoe/data/": "the sampler's CPU indices",
    # AdamW's per-parameter step counters live on the CPU unless the optimizer is fused or
    # capturable; the foreach implementation reads them for the bias corrections.
    "torch/optim/": "the optimizer's CPU step counters",
}

# The device syncs a non-logging step may still make, per MoE layer and micro-batch, and why:
# none. (StepWindow.add in train/metrics.py used to count each layer's selections with a
# boolean-mask index and a bincount, 2 per layer and micro-batch; it now uses a scatter_add.)
PER_LAYER_AND_MICRO_BATCH: dict[str, int] = {}
# Not exercised here: a float16 run's GradScaler.step reads found_inf (one .item() per step);
# bf16 and fp32 runs have no scaler. Logging steps read the window's sums (StepWindow.row).


def test_one_training_step_makes_no_device_sync(micro_config, tmp_path, monkeypatch):
    cfg = micro_config("model.moe_options.dispatch=grouped", "model.moe_options.bias_balancing=0.001",
                       "train.log_every=100", "train.eval_every=100", "train.checkpoint_every=100",
                       steps=3)
    counted = []
    step = TrainRun.train_step

    def counting(self, window):
        if self.step != 1:  # the first step warms up (optimizer state); the last one logs
            return step(self, window)
        with HostSyncCounter() as syncs:
            result = step(self, window)
        counted.append((syncs, self.accum))
        return result

    monkeypatch.setattr(TrainRun, "train_step", counting)
    train(cfg, tmp_path / "run", progress=False)
    (syncs, accum), = counted
    device = [(name, where) for (name, _), where in zip(syncs.events, syncs.locations)
              if not any(root in where for root in HOST_RESIDENT)]
    report = syncs.summary() + "\n" + "\n".join(f"{name} at {where}" for name, where in device)
    layers = cfg.model.n_layers  # every micro block is an MoE layer
    for name in {name for name, _ in device}:
        allowed = PER_LAYER_AND_MICRO_BATCH.get(name, 0) * layers * accum
        assert sum(n == name for n, _ in device) <= allowed, report
