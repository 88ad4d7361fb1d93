"""Several processes share a streaming compress (torch.distributed, gloo, on the CPU): the folder is
byte for byte the one-process folder, and a failure in any process stops every process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

import tiny
from hf_mlpfusion import FusionConfig
from hf_mlpfusion.compress import compress

HERE = Path(__file__).resolve().parent
CONFIGS = {
    "uneven": FusionConfig(ratio=0.5, layers=[0, 1, 2], seed=2, device="cpu"),  # 3 groups on 2 processes
    "fold": FusionConfig(ratio=0.25, fold_scale=True, device="cpu"),
}


def files(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, store_path: str, src: str, root: str, queue) -> None:
    """One process: join a FileStore group, run every config, then one in which process 1 fails."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    from hf_mlpfusion.io import stream

    out = {}
    for name, config in CONFIGS.items():
        try:
            out[name] = ("ok", compress(src, config, Path(root) / f"two-{name}", max_shard_size="30KB").inertia)
        except Exception as err:  # reported to the test, which fails on it
            out[name] = ("error", repr(err))
    if rank == 1:
        def broken(*args, **kwargs):
            raise MemoryError("process 1 ran out of memory")

        stream.reduce_group = broken
    try:
        compress(src, CONFIGS["uneven"], Path(root) / "two-broken")
        out["broken"] = ("ok", None)
    except BaseException as err:
        out["broken"] = ("error", f"{type(err).__name__}: {err}")
    dist.destroy_process_group()
    queue.put((rank, out))


def test_two_processes_write_the_one_process_bytes(tmp_path):
    src = tmp_path / "src"
    tiny.model("llama", "LlamaForCausalLM").save_pretrained(src)
    one = {name: compress(str(src), config, tmp_path / f"one-{name}", max_shard_size="30KB")
           for name, config in CONFIGS.items()}
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(r, 2, str(tmp_path / "store"), str(src), str(tmp_path), queue))
             for r in range(2)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    for name in CONFIGS:
        for rank in (0, 1):
            assert got[rank][name] == ("ok", one[name].inertia), (rank, got[rank][name])
        a, b = files(one[name].output), files(tmp_path / f"two-{name}")
        assert sorted(a) == sorted(b) and [k for k in a if a[k] != b[k]] == []
    # process 1 failed: it raised its own error, process 0 said so, and nothing was written
    assert got[1]["broken"] == ("error", "MemoryError: process 1 ran out of memory")
    assert got[0]["broken"][0] == "error" and "process 1 ran out of memory" in got[0]["broken"][1]
    assert not (tmp_path / "two-broken").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".two-")]  # no partial folder left


def test_torchrun_cli_writes_the_one_process_bytes(tmp_path):
    """The documented launch: torchrun ... -m hf_mlpfusion.cli.main compress (env:// rendezvous on 127.0.0.1)."""
    src = tmp_path / "src"
    tiny.model("bert", "BertForMaskedLM").save_pretrained(src)
    args = ["compress", str(src), "--ratio", "0.5", "--layers", "0-2", "--device", "cpu", "--max-shard-size", "30KB"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
                          "-m", "hf_mlpfusion.cli.main", *args, "-o", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("MLP fusion of") == 1  # only process 0 prints the summary
    one = compress(str(src), FusionConfig(ratio=0.5, layers="0-2", device="cpu"), tmp_path / "one",
                   max_shard_size="30KB")
    a, b = files(one.output), files(tmp_path / "two")
    assert sorted(a) == sorted(b) and [k for k in a if a[k] != b[k]] == []
