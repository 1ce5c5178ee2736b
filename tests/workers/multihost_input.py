"""Two hosts of a 4-device slice, simulated in one SPMD process (torch_xla cannot start two on one machine).

Each simulated host builds its loader with its data rank (host index) and data world (2), as a real host would,
and takes its first batch. A multi-host torch_xla run assembles the global batch from the hosts' minibatches in
host order; this process holds all four devices, so it feeds that concatenation through the same input path
(``backend.move``) and writes, per device, the sample indices the device received. Saved to argv[1]."""

import sys

import torch

from digpt_xla.backend import create_backend
from digpt_xla.config import load_config
from digpt_xla.data import build_train_dataset, build_train_loader

HOSTS, PER_DEVICE = 2, 2
cfg = load_config(None, ["data.source=digits"])
backend = create_backend("xla-spmd", fsdp=2)
devices_per_host = backend.global_devices // HOSTS
dataset = build_train_dataset(cfg.data, 32)
host_batches = []
for host in range(HOSTS):
    loader = build_train_loader(
        dataset, PER_DEVICE * devices_per_host, rank=host, world_size=HOSTS, seed=0, start_batch=0, num_workers=0
    )
    host_batches.append(next(iter(loader)))
indices = torch.cat([b["index"] for b in host_batches])
images = torch.cat([b["images"] for b in host_batches])
on_device = backend.move({"index": indices.float(), "images": images})
shards = backend._xs.wrap_if_sharded(on_device["index"]).local_shards
per_device = [shard.data.long().tolist() for shard in shards]
torch.save(
    {
        "hosts": [b["index"].tolist() for b in host_batches],
        "per_device": per_device,
        "images_rows": [s[0] for s in backend.shard_shapes(on_device["images"])],
        "minibatch": all(spec.minibatch for spec in backend._input_specs.values()),
        "mesh": backend.describe(),
    },
    sys.argv[1],
)
