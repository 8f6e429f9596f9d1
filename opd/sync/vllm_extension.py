"""Methods mixed into every vLLM worker (`worker_extension_cls`), reached via `collective_rpc`.

Every transport ends in `_opd_load`, which loads the weights in place: straight into the
parameters (`model.load_weights`) for an unquantized model on a GPU, where vLLM does nothing
after loading; otherwise through vLLM's `reload_weights`, which rebuilds each layer, loads it and
redoes what follows loading (the CPU backend's layout repacking, quantization) before copying it
back. Transports only differ in how the tensors reach the worker process:

- `opd_load_from_dir`: safetensors files in a shared-memory folder (CPU, or any single host);
- `opd_load_tensors`: tensors handed over in the same process (a learner in the process of an
  in-process engine, `RolloutWorker.load_weights_from_tensors`: one device-to-device copy per
  weight);
- `opd_init_weight_group` + `opd_receive_broadcast`: a NCCL broadcast from the learner's rank 0
  (GPU; the learner joins the same process group as rank 0);
- `opd_load_ipc`: a CUDA IPC handle to a flat buffer of the learner rank on the same GPU
  (colocated; one device-to-device copy per weight, across processes).

`opd_seed_sampling` also lives here: it seeds the worker's sampling for `rollout.seed_by: batch`.
"""

from __future__ import annotations

from pathlib import Path


class WeightSyncExtension:
    """Mixin for vLLM's Worker; `self` is the worker (it has `reload_weights`, `device`)."""

    def _opd_load(self, weights) -> None:
        """Load (name, tensor) pairs in place. The direct path skips vLLM's per-layer rebuild
        (measured: benchmarks/RESULTS.md); OPD_VLLM_DIRECT_LOAD=0 forces the rebuild."""
        if _direct_load_applies(self):
            import torch

            with torch.no_grad():
                self.model_runner.get_model().load_weights(weights)
        else:
            self.reload_weights(weights_iterator=weights)

    def opd_seed_sampling(self, seed: int) -> None:
        """Seed the generators that requests without a seed of their own sample from
        (`rollout.seed_by: batch`)."""
        import torch

        torch.manual_seed(seed)

    def opd_direct_load(self) -> bool:
        """Whether `_opd_load` takes the direct path on this worker."""
        return _direct_load_applies(self)

    def opd_load_from_dir(self, path: str, version: int) -> int:
        from safetensors import safe_open

        def tensors():
            for file in sorted(Path(path).glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)

        self._opd_load(tensors())
        return version

    def opd_load_tensors(self, named: list, version: int) -> int:
        """Load (name, tensor) pairs handed over in the same process: the weights of a learner
        that runs in the engine's process (`RolloutWorker.load_weights_from_tensors`, the
        public entry). The tensors arrive as they are, with no copy on the way, so this is
        only valid for an in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0, the
        `RolloutWorker` default); across processes they would be serialized."""
        self._opd_load(iter(named))
        return version

    def opd_init_weight_group(
        self, master_address: str, master_port: int, rank_offset: int, world_size: int
    ) -> None:
        import torch.distributed as dist

        rank = rank_offset + dist.get_rank() if dist.is_initialized() else rank_offset
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        group = StatelessProcessGroup.create(
            host=master_address, port=master_port, rank=rank, world_size=world_size
        )
        self.opd_comm = PyNcclCommunicator(group, device=self.device)

    def opd_receive_broadcast(self, specs: list[tuple[str, str, list[int]]], version: int) -> int:
        """Receive tensors named in `specs` ((name, dtype, shape) each) from rank 0, in order."""
        import torch

        def tensors():
            for name, dtype, shape in specs:
                buf = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
                self.opd_comm.broadcast(buf, src=0)
                yield name, buf

        self._opd_load(tensors())
        return version

    def opd_load_ipc(self, rows: list, handle: tuple, version: int) -> int:
        """Open the learner's buffer through its CUDA IPC handle (torch's rebuild function and
        its arguments) and load every weight from views of it; the buffer stays the
        learner's."""
        import torch

        from opd.sync.bucket import from_rows, views

        entries = from_rows(rows)
        rebuild, args = handle
        bucket = rebuild(*args)
        self._opd_load(iter(views(bucket, entries)))
        if bucket.is_cuda:  # the copies are done before the learner may write the buffer again
            torch.cuda.synchronize(bucket.device)
        del bucket
        return version


def _direct_load_applies(worker) -> bool:
    """True for an unquantized model off the CPU: nothing runs after its weights load, so
    copying them straight into the parameters gives the same model as vLLM's rebuild."""
    import os

    from vllm.platforms import current_platform

    if os.environ.get("OPD_VLLM_DIRECT_LOAD", "1") == "0" or current_platform.is_cpu():
        return False
    return worker.model_runner.model_config.quantization is None
