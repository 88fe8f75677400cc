"""Several processes: DDP and FSDP equal one process, resume exactly; unsupported launchers are refused."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import RECIPE, config, metrics

from unimm.errors import UnimmError

ROOT = Path(__file__).parents[1]


def _join(rank: int, world: int):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["UNIMM_TEST_PORT"])
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _leave() -> None:
    """After a worker's success: leave together, then end the process at once.

    A rank that tears the group down while its peer still uses it can abort gloo ("terminate
    called without an active exception", seen once under load), and interpreter finalization can
    still abort on gloo's threads (seen again under the full suite); the result is written, so end
    the way `unimm` ends a distributed run (cli._exit_now).
    """
    import torch.distributed as dist

    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _distributed_worker(rank: int, world: int, folder: str, shards: str, out: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    _join(rank, world)
    try:
        result, grads = _one_step(folder, shards, rank, world)
        for g in grads.values():
            dist.all_reduce(g)
            g /= world  # what DDP does
        if rank == 0:
            save_file(
                {
                    "loss_disc": torch.tensor([result.loss_disc]),
                    "loss_gen": torch.tensor([result.loss_gen]),
                    **grads,
                },
                out,
            )
    except BaseException:
        dist.destroy_process_group()
        raise
    _leave()


def _one_step(folder: str, shards: str, rank: int, world: int):
    from unimm.data.collate import Collator
    from unimm.data.shards import read_samples
    from unimm.model.core import RetrievalHead, UnimmModel, load_mllm
    from unimm.training.step import train_step

    mllm, processor = load_mllm(folder)
    torch.manual_seed(0)
    model = UnimmModel(mllm, RetrievalHead(mllm.config.text_config.hidden_size, 16))
    cfg = config("unused", shards, "train.alpha=1.0")
    samples = list(read_samples(shards, split_by_node=False, split_by_worker=False))[:8]
    col = Collator.for_model(
        model,
        processor,
        max_length=256,
        cut_points=3,
    )
    share = len(samples) // world
    batch = col(samples[rank * share : (rank + 1) * share])
    result = train_step(model, batch, cfg)
    result.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return result, grads


def test_two_processes_match_one(tmp_path, tiny_shards):
    import socket

    from safetensors.torch import load_file

    from unimm.tiny import save_tiny_llava

    folder = save_tiny_llava(tmp_path / "llava", ["a red square"])
    single, grads = _one_step(str(folder), str(tiny_shards), 0, 1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["UNIMM_TEST_PORT"] = str(s.getsockname()[1])
    out = tmp_path / "dist.safetensors"
    torch.multiprocessing.spawn(
        _distributed_worker, args=(2, str(folder), str(tiny_shards), str(out)), nprocs=2
    )
    got = load_file(out)
    assert got["loss_disc"].item() == pytest.approx(single.loss_disc, rel=1e-5)
    assert got["loss_gen"].item() == pytest.approx(single.loss_gen, rel=1e-5)
    assert set(grads) <= set(got)
    for name, grad in grads.items():
        torch.testing.assert_close(got[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def _guarded_worker(rank: int, world: int, folder: str, shards: str, out: str) -> None:
    """One training step in a 2-process group with every collective and alignment entry point
    wrapped: each collective must get tensors on the group's device and nothing pickled, the
    targets must be computed on the embeddings' device."""
    import torch.distributed as dist

    import unimm.model.targets as targets
    from unimm.training.distributed import collective_device

    _join(rank, world)
    seen: dict[str, list] = {"collectives": [], "pickled": [], "alignment": []}

    def guard(name, real):
        def wrapped(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
            seen["collectives"].append(
                [name, sorted({str(t.device) for t in tensors}), str(collective_device())]
            )
            return real(*args, **kwargs)

        return wrapped

    def pickled(name):
        def refuse(*args, **kwargs):
            seen["pickled"].append(name)
            raise AssertionError(f"{name}: a pickled collective in a training step")

        return refuse

    def aligned(name, real):
        def wrapped(u, v, *args, **kwargs):
            devices = sorted({str(t.device) for t in (u, v, *args) if isinstance(t, torch.Tensor)})
            seen["alignment"].append([name, devices])
            return real(u, v, *args, **kwargs)

        return wrapped

    for name in ("all_gather", "all_reduce", "broadcast", "reduce_scatter", "all_to_all"):
        setattr(dist, name, guard(name, getattr(dist, name)))
    for name in ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list"):
        setattr(dist, name, pickled(name))
    targets.gak_matrix_prefix = aligned("prefix", targets.gak_matrix_prefix)
    targets.gak_matrix_triple = aligned("triple", targets.gak_matrix_triple)
    import unimm.training.losses as losses

    real_targets = losses.view_targets

    def asked(teacher, views, align, device=None):  # where the loss asks for its targets
        seen["targets_device"] = str(device)
        return real_targets(teacher, views, align, device=device)

    losses.view_targets = asked
    try:
        _one_step(folder, shards, rank, world)  # the model and its embeddings are on the CPU
        if rank == 0:
            Path(out).write_text(json.dumps(seen))
    except BaseException:
        dist.destroy_process_group()
        raise
    _leave()


def test_collectives_and_targets_stay_on_their_devices(tmp_path, tiny_shards):
    """A training step's collectives take tensors on the process group's device (never pickled
    objects: teacher features travel as padded tensors), and the targets are computed where the
    embeddings are. Fails on a per-step all_gather_object or a CPU-made target matrix when the
    embeddings are elsewhere (on CPU both are the CPU; `pytest -m gpu` checks CUDA for real)."""
    import socket

    from unimm.tiny import save_tiny_llava

    folder = save_tiny_llava(tmp_path / "llava", ["a red square"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["UNIMM_TEST_PORT"] = str(s.getsockname()[1])
    out = tmp_path / "seen.json"
    torch.multiprocessing.spawn(_guarded_worker, args=(2, str(folder), str(tiny_shards), str(out)), nprocs=2)
    seen = json.loads(out.read_text())
    assert seen["pickled"] == []
    assert len(seen["collectives"]) >= 6  # header, embeddings, views, counts, v, modality, u, sums
    for name, devices, expected in seen["collectives"]:
        assert devices == [expected], (name, devices)
    assert seen["targets_device"] == "cpu"  # the embeddings' device, asked for explicitly
    assert seen["alignment"] and all(devices == ["cpu"] for _, devices in seen["alignment"])


def test_the_collective_device_follows_the_backend(monkeypatch):
    from unimm.training import distributed

    monkeypatch.setattr(distributed, "rank_and_world", lambda: (0, 2))
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a: "gloo")
    assert distributed.collective_device() == torch.device("cpu")
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert distributed.collective_device() == torch.device("cuda", 3)


def test_torchrun_two_processes_end_to_end(tmp_path, tiny_shards):
    """`torchrun` with 2 CPU processes: one log line per step, the single run's schedule, a checkpoint."""
    import shutil

    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    args = [
        "-m",
        "unimm.cli",
        "train",
        "--recipe",
        str(RECIPE),
        "--set",
        f"data.train={tiny_shards}",
        "--set",
        "train.max_steps=3",
        "--set",
        "train.save_every=3",
        "--set",
        "train.batch_size=2",
        "-q",
    ]
    done = subprocess.run(
        [torchrun, "--nproc_per_node", "2", *args, "--out", str(tmp_path / "ddp")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained to step 3") == 1  # printed by rank 0 only
    single = subprocess.run(
        [sys.executable, *args, "--out", str(tmp_path / "one")], capture_output=True, text=True
    )
    assert single.returncode == 0, single.stderr
    ddp, one = metrics(tmp_path / "ddp"), metrics(tmp_path / "one")
    assert [m["step"] for m in ddp] == [1, 2, 3]
    assert [m["lr"] for m in ddp] == pytest.approx([m["lr"] for m in one])
    from unimm.model.checkpoint import read_meta

    assert read_meta(tmp_path / "ddp" / "step-000003")["step"] == 3


def _launch(cmd: list[str], **env) -> subprocess.CompletedProcess:
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, **env}
    )
    return done


def test_fsdp_matches_ddp_resumes_exactly_and_merges(tmp_path, tiny_shards):
    """FSDP2 through the shipped accelerate config (2 CPU processes; see fsdp_on_cpu.py).

    Oracle: DDP on the same data, itself equal to one process (test_two_processes_match_one).
    LoRA with dropout and gradient accumulation make the resume depend on every rank's RNG state.
    """
    accelerate_cli, torchrun = shutil.which("accelerate"), shutil.which("torchrun")
    if accelerate_cli is None or torchrun is None:
        pytest.skip("accelerate/torchrun not on PATH")
    train_args = [
        "train",
        "--recipe",
        str(RECIPE),
        "-q",
        *(
            arg
            for setting in (
                f"data.train={tiny_shards}",
                f"data.eval={tiny_shards}",  # evaluation under FSDP: every rank takes part
                "train.eval_every=2",
                "train.max_steps=4",
                "train.save_every=2",
                "train.batch_size=2",
                "train.grad_accum=2",
                "train.log_every=1",
                "model.lora=true",
                "model.train_lm=false",
                "model.lora_r=4",
                "model.lora_alpha=8",
                "train.merge_lora=true",
            )
            for arg in ("--set", setting)
        ),
    ]
    fsdp = [
        accelerate_cli,
        "launch",
        "--config_file",
        str(ROOT / "recipes" / "accelerate" / "fsdp.yaml"),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        str(ROOT / "tests" / "fsdp_on_cpu.py"),
        *train_args,
    ]
    full = _launch([*fsdp, "--out", str(tmp_path / "fsdp")])
    assert full.returncode == 0, full.stderr[-3000:]
    # Found anywhere in the stream: the two ranks' lines may still interleave with other output.
    sharded = re.findall(r"fsdp-on-cpu: (\d+)/(\d+) parameters sharded in (\d+) units", full.stderr)
    assert len(sharded) == 2, full.stderr[-3000:]
    for done, total, _ in sharded:
        assert done == total and int(total) > 0  # every parameter is a shard (DTensor)
    meta = json.loads((tmp_path / "fsdp" / "step-000004" / "unimm.json").read_text())
    assert meta["parallelism"] == {"kind": "FSDP", "processes": 2, "mixed_precision": "no"}

    ddp = _launch(
        [torchrun, "--nproc_per_node", "2", "-m", "unimm.cli", *train_args, "--out", str(tmp_path / "ddp")]
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    want = metrics(tmp_path / "ddp")
    got = metrics(tmp_path / "fsdp")
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    assert [m["step"] for m in got if "eval_loss_gen" in m] == [2, 4]
    for a, b in zip(want, got, strict=True):
        for key in ("loss", "loss_gen", "loss_disc", "grad_norm", "lr", "eval_loss_gen", "eval_loss_disc"):
            assert (key in a) == (key in b), (a["step"], key)  # evaluation on the same steps
            if key in a:  # pytest >= 9.1 refuses approx(None)
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)

    killed = _launch([*fsdp, "--out", str(tmp_path / "part")], UNIMM_FAULT_AFTER_STEPS="3")
    assert killed.returncode != 0
    resumed = _launch([*fsdp, "--out", str(tmp_path / "part"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = metrics(tmp_path / "part")
    assert [m["step"] for m in again] == [1, 2, 3, 4]
    for a, b in zip(got, again, strict=True):
        for key in ("loss", "loss_gen", "loss_disc", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (a["step"], key)

    # The merged checkpoint (made from the gathered step-4 checkpoint) computes what it does.
    from unimm.data.collate import Collator
    from unimm.data.shards import read_samples
    from unimm.model.checkpoint import load_checkpoint

    adapters, processor, _ = load_checkpoint(tmp_path / "fsdp" / "step-000004")
    # Wrapped unit by unit (decoder layers, vision encoder layers, patch embeddings), plus the root.
    layers = [m for m in adapters.modules() if type(m).__name__ in adapters._no_split_modules]
    units = {"LlamaDecoderLayer", "CLIPEncoderLayer", "CLIPVisionEmbeddings"}
    assert {type(m).__name__ for m in layers} == units
    assert {int(units) for _, _, units in sharded} == {len(layers) + 1}
    merged, _, merged_meta = load_checkpoint(tmp_path / "fsdp" / "final-merged")
    assert not merged_meta["lora"] and merged_meta["step"] == 4
    batch = Collator.for_model(adapters, processor, max_length=256, cut_points=2)(
        list(read_samples(tiny_shards, split_by_node=False, split_by_worker=False))[:4]
    )
    with torch.no_grad():
        a, b = adapters.eval()(batch), merged.eval()(batch)
    torch.testing.assert_close(b.embeddings, a.embeddings, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.loss_gen, a.loss_gen, atol=1e-5, rtol=1e-5)


def test_unsupported_launchers_are_refused_up_front():
    """FSDP 1 and DeepSpeed are refused at start (not hours later, at the first checkpoint)."""
    from accelerate.utils import DistributedType

    from unimm.training.trainer import check_parallelism

    def accelerator(kind, fsdp2=False):
        return SimpleNamespace(distributed_type=kind, is_fsdp2=fsdp2)

    with pytest.raises(UnimmError, match="fsdp_version: 2"):
        check_parallelism(accelerator(DistributedType.FSDP))
    with pytest.raises(UnimmError, match=r"unimm recipes --path accelerate/fsdp"):
        check_parallelism(accelerator(DistributedType.DEEPSPEED))
    for kind in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        check_parallelism(accelerator(kind))
    check_parallelism(accelerator(DistributedType.FSDP, fsdp2=True))


def test_resume_refuses_another_process_count_and_old_formats(tmp_path):
    from unimm.model.checkpoint import pack_train_state, rank_state, restore_train_state

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    ranks = [rank_state({"draws": 4, "taken": [4]}), rank_state({"draws": 4, "taken": [3]})]
    state = pack_train_state(get_optimizer_state_dict(model, optimizer), None, ranks, {"step": 1})
    with pytest.raises(UnimmError, match=r"saved by 2 process.*launched with 1"):
        restore_train_state(state, model, optimizer, None, rank=0, world=1)
    meta = restore_train_state(state, model, optimizer, None, rank=1, world=2)
    assert meta["data_position"] == {"draws": 4, "taken": [3]} and meta["step"] == 1
    old = {"tensors": state["tensors"], "json": {k: v for k, v in state["json"].items() if k != "format"}}
    with pytest.raises(UnimmError, match="older unimm"):
        restore_train_state(old, model, optimizer, None)


def test_optimizer_state_round_trips_by_name(tmp_path):
    """What is saved and restored into a fresh optimizer gives the same next step."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from unimm.model.checkpoint import (
        STATE_DIR,
        _save_train_state,
        load_train_state,
        pack_train_state,
        rank_state,
        restore_train_state,
    )

    def make():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        net[0].bias.requires_grad_(False)  # a frozen parameter is not in the optimizer
        return net, torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=0.1)

    def step(net, opt):
        net(torch.arange(8.0).view(2, 4)).square().sum().backward()
        opt.step()
        opt.zero_grad()

    first, first_opt = make()
    step(first, first_opt)
    state = pack_train_state(get_optimizer_state_dict(first, first_opt), None, [rank_state({})], {})
    _save_train_state(tmp_path / STATE_DIR, state)
    second, second_opt = make()
    second.load_state_dict(first.state_dict())
    restore_train_state(load_train_state(tmp_path), second, second_opt, None)
    step(first, first_opt)
    step(second, second_opt)
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)


def test_shipped_ddp_config_on_two_processes_checks_the_data_fits(tmp_path, tiny_shards, tiny_teachers):
    """`accelerate launch` with the shipped DDP config: the number of processes is the one flag to
    give; data too small for processes × batch says so with the numbers and the fix; enough trains."""
    import shutil

    from unimm.commands.prepare import run as prepare
    from unimm.config import SHIPPED_RECIPES, PrepareConfig, build_config, load_recipe
    from unimm.data.synthetic import write_synthetic

    accelerate_cli = shutil.which("accelerate")
    if accelerate_cli is None:
        pytest.skip("accelerate is not on PATH")
    config = SHIPPED_RECIPES / "accelerate" / "ddp.yaml"
    assert not {"num_processes", "mixed_precision"} & set(load_recipe(config))
    data = write_synthetic(tmp_path / "data", 8, seed=3)
    options = {
        "prepare.inputs": [str(data)],
        "prepare.out": str(tmp_path / "small"),
        "prepare.image_size": 32,
        **{f"teachers.{k}": str(v) for k, v in tiny_teachers.items()},
    }
    prepare(build_config(PrepareConfig, options=options), progress=False)  # 8 samples, 1 shard

    def launch(shards, out, *more):
        cmd = [accelerate_cli, "launch", "--config_file", str(config), *more, "-m", "unimm.cli", "train"]
        sets = [f"data.train={shards}", "train.max_steps=2", "train.save_every=2", "train.batch_size=4"]
        return _launch(
            [*cmd, "--recipe", str(RECIPE), "-q", *(a for s in sets for a in ("--set", s)), "--out", out]
        )

    unasked = launch(tmp_path / "small", str(tmp_path / "a"))  # accelerate asks for the one flag
    assert unasked.returncode != 0 and "--num_processes" in unasked.stderr
    small = launch(tmp_path / "small", str(tmp_path / "b"), "--num_processes", "2")
    assert small.returncode != 0
    assert "data.train is too small for this launch" in small.stderr, small.stderr[-3000:]
    assert "has 1 shard(s) for 2 processes" in small.stderr and "--samples-per-shard 4" in small.stderr
    assert "8 training samples for 2 process(es) × train.batch_size 4 = 8" not in small.stderr  # 8 fit
    assert "no readable sample" not in small.stderr
    enough = launch(tiny_shards, str(tmp_path / "c"), "--num_processes", "2")  # 3 shards of 8
    assert enough.returncode == 0, enough.stderr[-3000:]
    meta = json.loads((tmp_path / "c" / "step-000002" / "unimm.json").read_text())
    assert meta["parallelism"] == {"kind": "MULTI_CPU", "processes": 2, "mixed_precision": "no"}
